"""``LoRAConfig``: what an adapter file says about its LoRA, and the checks on what it says.

- ``LoRAConfig`` holds a PEFT ``adapter_config.json`` subset plus ``base_fingerprint``; it
  rebuilds each module's scale exactly as PEFT computes it: ``lora_alpha / r`` (``/ sqrt(r)``
  with ``use_rslora``), ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` /
  ``alpha_pattern`` with PEFT's matching rule (first key ``k`` in file order such that
  ``re.match(rf"(.*\\.)?({k})$", module)``), and says which modules PEFT would target.
- ``_config_from_dict`` turns a config from a file into a ``LoRAConfig`` or raises
  ``InvalidAdapterConfig`` / ``UnsupportedAdapter``: types, ranges, features beyond
  ``(A, B, s)`` on Linear layers, patterns.
- Patterns from the file (``target_modules`` / ``exclude_modules`` strings, ``rank_pattern`` /
  ``alpha_pattern`` keys, ``layers_pattern``) are capped in length and number here, and every
  lookup runs them on ``loraserve.adapters.lora.bounded_match`` within a ``MatchBudget``: a pattern
  that needs more than its budget is refused as too costly to match (``PatternError``).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.adapters.lora import (
    MatchBudget,
    PatternError,
    bounded_match,
    compile_pattern,
    match_target,
    peft_scale,
)

from .errors import InvalidAdapter, InvalidAdapterConfig, UnsupportedAdapter

MAX_CONFIG_BYTES = 256 << 10  # parsing JSON holds the GIL; a real config is a few KiB
# What a file may make us compile and match (the time is bounded by lora.MATCH_BUDGET_S per
# read; these keep each step small and every message short). Real configs hold a few patterns
# of a few dozen characters, and module names are under 100.
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 1024  # keys of rank_pattern / alpha_pattern, entries of a list of names
MAX_RANK = 1 << 16

# PEFT config fields that change what the adapter computes beyond (A, B, s) on Linear layers.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}

# Initialisations that also rewrite the base weights: the saved A/B only fit the rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

# How PEFT applies each kind of pattern (its own words, run on the bounded matcher).
_KEY_TEMPLATE = r"(.*\.)?({})$"  # get_pattern_key: a rank/alpha key matches a dotted suffix
_LAYER_TEMPLATE = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # the layer index after layers_pattern
_ANY_LAYER = r".*?\.[^.]*\.(?P<idx>\d+)\."  # the layer index without layers_pattern


def _pattern_key(keys, name: str, what: str, budget: MatchBudget | None) -> str | None:
    """PEFT's ``get_pattern_key``: the first key that matches the end of ``name`` at a dot."""
    budget = MatchBudget() if budget is None else budget
    for key in keys:
        if bounded_match(key, name, budget, template=_KEY_TEMPLATE, what=f"{what} key"):
            return key
    return None


@dataclass(frozen=True)
class LoRAConfig:
    """What is needed to rebuild each module's scale and to know which modules are targeted.

    ``target_modules`` has PEFT's meaning (tuple of names or suffixes, a full-match regex, or
    ``"all-linear"``). ``None`` declares no targets: the modules that have weights are the
    adapted set, and ``validate_adapter`` cannot tell whether any are missing.
    ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` narrow it as in PEFT.

    The lookups match patterns within ``budget`` (``loraserve.adapters.lora.MatchBudget``; a fresh
    one per
    call when None) and raise ``PatternError`` when one is too costly to match.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict, hash=False)
    alpha_pattern: dict[str, float] = field(default_factory=dict, hash=False)
    base_fingerprint: str | None = None
    base_model: str | None = None
    fan_in_fan_out: bool = False
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None

    def rank_for(self, name: str, budget: MatchBudget | None = None) -> int:
        key = _pattern_key(self.rank_pattern, name, "rank_pattern", budget)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str, budget: MatchBudget | None = None) -> float:
        key = _pattern_key(self.alpha_pattern, name, "alpha_pattern", budget)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, name: str, budget: MatchBudget | None = None) -> float:
        budget = MatchBudget() if budget is None else budget
        return peft_scale(
            self.rank_for(name, budget), self.alpha_for(name, budget), self.use_rslora
        )

    def targets(self, name: str, budget: MatchBudget | None = None) -> bool:
        """Would PEFT adapt linear module ``name``? (PEFT's ``check_target_module_exists``)"""
        budget = MatchBudget() if budget is None else budget
        if self.exclude_modules and match_target(name, self.exclude_modules, budget=budget):
            return False
        if not match_target(name, self.target_modules, budget=budget):
            return False
        if self.layers_to_transform is None or not isinstance(self.target_modules, tuple):
            return True
        if name in self.target_modules:  # PEFT: an exact name skips the layer filter
            return True
        return _layer_index(name, self.layers_pattern, budget) in self.layers_to_transform

    def to_dict(self) -> dict:
        """PEFT ``adapter_config.json`` fields (plus ``base_fingerprint`` when set)."""
        d = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": (
                list(self.target_modules)
                if isinstance(self.target_modules, tuple)
                else self.target_modules
            ),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": self.fan_in_fan_out,
            "exclude_modules": _listify(self.exclude_modules),
            "layers_to_transform": _listify(self.layers_to_transform),
            "layers_pattern": _listify(self.layers_pattern),
            "bias": "none",
            "lora_dropout": 0.0,
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
        }
        if self.base_fingerprint is not None:
            d["base_fingerprint"] = self.base_fingerprint
        return d


def _listify(value):
    return list(value) if isinstance(value, tuple) else value


def _layer_index(
    name: str, layers_pattern: tuple[str, ...] | None, budget: MatchBudget
) -> int | None:
    """The first numbered segment of ``name`` (PEFT: the layer index for layers_to_transform)."""
    if not layers_pattern:
        match = bounded_match(_ANY_LAYER, name, budget)
    else:
        match = None
        for pattern in layers_pattern:
            match = bounded_match(
                pattern, name, budget, template=_LAYER_TEMPLATE, what="layers_pattern"
            )
            if match is not None:
                break
    return int(match["idx"]) if match else None


# --------------------------------------------------------------------------------------------
# A config from a file: every field checked before it is used


def _config_from_dict(d: dict, path: Path) -> LoRAConfig:
    if not isinstance(d, dict):
        raise InvalidAdapterConfig(f"{path}: the LoRA config is not a JSON object")
    peft_type = d.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{path}: peft_type {reprlib.repr(peft_type)} is not supported (only LORA)"
        )
    features = [desc for key, desc in _UNSUPPORTED_FIELDS.items() if d.get(key)]
    if d.get("bias", "none") != "none":
        features.append(f"bias={reprlib.repr(d['bias'])} (trained base biases; only bias='none')")
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        features.append(
            f"init_lora_weights={reprlib.repr(init)} (it changed the base weights; save with "
            "PEFT's path_initial_model_for_weight_conversion to get an adapter for the original "
            "base)"
        )
    if features:
        raise UnsupportedAdapter(f"{path}: uses unsupported features: {', '.join(features)}")

    r = d.get("r")
    if not (_is_int(r) and 1 <= r <= MAX_RANK):
        raise InvalidAdapterConfig(
            f"{path}: r must be a positive integer up to {MAX_RANK}, got {reprlib.repr(r)}"
        )
    alpha = d.get("lora_alpha", 8)  # PEFT's default
    if not _is_number(alpha):
        raise InvalidAdapterConfig(
            f"{path}: lora_alpha must be a finite number, got {reprlib.repr(alpha)}"
        )
    rank_pattern = _pattern_map(d, "rank_pattern", path)
    if not all(_is_int(v) and 1 <= v <= MAX_RANK for v in rank_pattern.values()):
        raise InvalidAdapterConfig(
            f"{path}: rank_pattern must map patterns to ranks from 1 to {MAX_RANK}"
        )
    alpha_pattern = _pattern_map(d, "alpha_pattern", path)
    if not all(_is_number(v) for v in alpha_pattern.values()):
        raise InvalidAdapterConfig(f"{path}: alpha_pattern must map patterns to finite numbers")
    layers = d.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and len(layers) <= MAX_PATTERNS and all(map(_is_int, layers))
    ):
        raise InvalidAdapterConfig(
            f"{path}: layers_to_transform must be an int or a list of at most {MAX_PATTERNS} ints"
        )
    return LoRAConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=_flag(d, "use_rslora", path),
        target_modules=_names_or_regex(d.get("target_modules"), "target_modules", path),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_fingerprint=_optional_str(d, "base_fingerprint", path),
        base_model=_optional_str(d, "base_model_name_or_path", path),
        fan_in_fan_out=_flag(d, "fan_in_fan_out", path),
        exclude_modules=_names_or_regex(d.get("exclude_modules"), "exclude_modules", path),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=_layers_pattern(d.get("layers_pattern"), path),
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A JSON number that is a finite float: ``math.isfinite`` itself raises OverflowError for
    an int beyond float's range (``10**400``), which JSON allows."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _flag(d: dict, key: str, path: Path) -> bool:
    value = d.get(key)
    if value is None:  # absent, or null, which PEFT reads as off
        return False
    if not isinstance(value, bool):
        raise InvalidAdapterConfig(
            f"{path}: {key} must be true or false, got {reprlib.repr(value)}"
        )
    return value


def _optional_str(d: dict, key: str, path: Path) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidAdapterConfig(f"{path}: {key} must be a string, got {reprlib.repr(value)}")
    return value


def _check_regex(pattern: str, what: str, path: Path, template: str = "{}") -> None:
    """``pattern`` from the file, as PEFT will use it (``template``), is one we can afford."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidAdapterConfig(
            f"{path}: {what} {pattern[:60]!r}... is {len(pattern)} characters; patterns are "
            f"limited to {MAX_PATTERN_CHARS}"
        )
    try:
        compile_pattern(pattern, template, what)
    except PatternError as e:
        raise InvalidAdapterConfig(f"{path}: {e}") from None


def _check_count(values, what: str, path: Path) -> None:
    if len(values) > MAX_PATTERNS:
        raise InvalidAdapterConfig(
            f"{path}: {what} has {len(values)} entries; at most {MAX_PATTERNS} are accepted"
        )


def _pattern_map(d: dict, what: str, path: Path) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: pattern keys (JSON keys, always strings) checked."""
    patterns = d.get(what) or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapterConfig(f"{path}: {what} must map patterns to values")
    _check_count(patterns, what, path)
    for key in patterns:
        _check_regex(key, f"{what} key", path, _KEY_TEMPLATE)
    return dict(patterns)


def _names_or_regex(value, what: str, path: Path) -> tuple[str, ...] | str | None:
    if value is None or value == []:
        return None
    if isinstance(value, str):
        _check_regex(value, what, path)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        _check_count(value, what, path)
        if any(len(v) > MAX_PATTERN_CHARS for v in value):
            raise InvalidAdapterConfig(
                f"{path}: {what} holds a name over {MAX_PATTERN_CHARS} characters"
            )
        return tuple(value)
    raise InvalidAdapterConfig(
        f"{path}: {what} must be a list of names or a regex, got {reprlib.repr(value)}"
    )


def _layers_pattern(value, path: Path) -> tuple[str, ...] | None:
    if value is None or value == "" or value == []:  # PEFT: no layers_pattern, any layer
        return None
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
        raise InvalidAdapterConfig(
            f"{path}: layers_pattern must be a string or a list of strings, got "
            f"{reprlib.repr(value)}"
        )
    _check_count(value, "layers_pattern", path)
    for pattern in value:
        _check_regex(pattern, "layers_pattern", path, _LAYER_TEMPLATE)
    return tuple(value)


def _load_json(text: bytes | str, path: Path, what: str, error: type[InvalidAdapter]):
    try:
        return json.loads(text)
    except RecursionError:  # json recurses per nesting level: "[" * 100000 exhausts the stack
        raise error(f"{path}: {what} is nested too deeply to parse") from None
    except ValueError as e:  # bad JSON, bad UTF-8, or an int over Python's 4300-digit limit
        raise error(f"{path}: {what} is not valid JSON ({e})") from None
