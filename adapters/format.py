"""Adapter files: read, write and validate LoRA adapters. Never unpickles anything.

Two on-disk forms, one in-memory ``Adapter``:

- ``NAME.safetensors``: one file. Its tensors are exactly a PEFT ``adapter_model.safetensors``
  (keys ``base_model.model.<module>.lora_A.weight: [r, in]`` / ``.lora_B.weight: [out, r]``)
  and its header metadata holds ``{"format": "pt", "loraserve.lora_config": JSON}``, where the
  JSON is a PEFT ``adapter_config.json`` subset plus ``base_fingerprint``. The trainer writes it.
- ``NAME/``: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), read as
  ``save_pretrained`` left it. ``write_peft`` writes one that ``PeftModel.from_pretrained`` loads.

Contract of ``read_adapter``:

- It returns ``Adapter(name, config, modules, version, nbytes)``; ``modules`` maps OUR module
  paths (== Hugging Face ``*ForCausalLM`` paths, ``model.layers.0.self_attn.q_proj``) to
  ``LoRAWeights(A: [in, r], B: [r, out], scale)``, transposes of PEFT's, dtype as stored.
- ``scale`` is recovered exactly as PEFT computes it: ``lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``), ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` /
  ``alpha_pattern`` with PEFT's matching rule (first key ``k`` in file order such that
  ``re.match(rf"(.*\\.)?({k})$", module)``).
- ``version`` is the content hash: sha256 of the file bytes (of ``adapter_config.json`` then
  ``adapter_model.safetensors`` for a folder), first 16 hex chars. The bytes are read once, so
  the hash always describes the tensors returned.
- Everything wrong with the file itself raises a subclass of ``InvalidAdapter`` naming the
  problem, and nothing else does (``OSError`` only when the file cannot be read at all; a reader
  bug that a file triggers is reported as ``CorruptAdapterFile``). Cheap checks come first and
  the tensor data is read only once the file is known to be a LoRA that fits its config: the
  size against ``max_bytes``; the safetensors header (at most ``MAX_HEADER_BYTES``; dtypes,
  shapes, offsets that cover the file exactly); the config (types, ranges, patterns); every
  tensor a LoRA A/B weight whose ranks and A/B shapes fit the config, every scale within
  ``MAX_SCALE``. Then the data: every weight finite and within float16's range
  (``NonFiniteWeights``, ``WeightsOutOfRange``); anything else is not a trained LoRA.
- Patterns from the file (``target_modules`` / ``exclude_modules`` strings, ``rank_pattern`` /
  ``alpha_pattern`` keys, ``layers_pattern``) are capped in length and number and run on
  ``adapters.lora.bounded_match``: one read spends at most ``MATCH_BUDGET_S`` matching them, and
  a pattern that needs more is refused as too costly to match.
- ``validate_adapter`` then checks the adapter against a base model (module names, shapes,
  targeted modules present, rank limit, base fingerprint), with a matching budget of its own.

Both writers are atomic (temp name in the same directory, then ``os.replace``) and
deterministic: the same adapter always gives the same bytes, hence the same version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from adapters.lora import (
    LinearWithLoRA,
    MatchBudget,
    PatternError,
    bounded_match,
    compile_pattern,
    linear_shapes,
    match_target,
    peft_scale,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONFIG_KEY = "loraserve.lora_config"  # single file: the LoRA config JSON in the header metadata
FINGERPRINT_KEY = "loraserve.base_fingerprint"  # PEFT folder written by us: fingerprint only
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Memory-bomb caps: checked against the file size before anything is read or allocated.
MAX_ADAPTER_BYTES = 4 << 30
# safetensors allows 100 MB, which parses into ~1 GB of Python objects; an adapter header is a
# few hundred bytes per tensor (8 MiB: ~50k tensors, far above any real adapter)
MAX_HEADER_BYTES = 8 << 20
MAX_CONFIG_BYTES = 1 << 20
# What a file may make us compile and match (the time is bounded by lora.MATCH_BUDGET_S per
# read; these keep each step small and every message short). Real configs hold a few patterns
# of a few dozen characters, and module names are under 100.
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 1024  # keys of rank_pattern / alpha_pattern, entries of a list of names
MAX_KEY_CHARS = 512  # a tensor key, hence a module name
MAX_RANK = 1 << 16
# A trained LoRA has weights of order 1 and a scale of order 1 to 100; beyond these it is a
# corrupt or hostile file (and its deltas would overflow a half-precision base).
MAX_WEIGHT = 65504.0  # float16's largest finite value
MAX_SCALE = 1e6

_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

_CONVERT_BIN = (
    "convert it to safetensors once, in an environment you trust:\n"
    "    import torch; from safetensors.torch import save_file\n"
    '    sd = torch.load("adapter_model.bin", map_location="cpu", weights_only=True)\n'
    '    save_file({k: v.contiguous() for k, v in sd.items()}, "adapter_model.safetensors",'
    ' metadata={"format": "pt"})'
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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

# --------------------------------------------------------------------------------------------
# Errors: one type per problem, all InvalidAdapter(ValueError), messages name file and problem.


class InvalidAdapter(ValueError):
    """An adapter file that cannot be served; the message says why."""


class InvalidAdapterName(InvalidAdapter):
    pass


class InvalidAdapterConfig(InvalidAdapter):
    pass


class CorruptAdapterFile(InvalidAdapter):
    pass


class AdapterTooLarge(InvalidAdapter):
    pass


class UnsupportedAdapter(InvalidAdapter):
    pass


class UnknownTargetModule(InvalidAdapter):
    pass


class MissingWeights(InvalidAdapter):
    pass


class ShapeMismatch(InvalidAdapter):
    pass


class RankTooLarge(InvalidAdapter):
    pass


class FingerprintMismatch(InvalidAdapter):
    pass


class NonFiniteWeights(InvalidAdapter):
    """A LoRA tensor holds NaN or an infinity."""


class WeightsOutOfRange(InvalidAdapter):
    """Finite LoRA weights beyond float16's range: no trained LoRA has them."""


# --------------------------------------------------------------------------------------------
# Data


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

    The lookups match patterns within ``budget`` (``adapters.lora.MatchBudget``; a fresh one per
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


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear layer, OUR layout: ``y += scale * (x @ A) @ B``."""

    A: Tensor  # [in, r]
    B: Tensor  # [r, out]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class Adapter:
    """A whole adapter in memory; ``modules`` keys are OUR module paths."""

    name: str
    config: LoRAConfig
    modules: dict[str, LoRAWeights] = field(hash=False)
    version: str  # sha256 of the file content, 16 hex chars
    nbytes: int  # bytes of A and B tensors

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())


# --------------------------------------------------------------------------------------------
# Building an adapter in memory (trainer, tests)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"adapter name {name!r} is not allowed: names match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )
    return name


def build_adapter(
    name: str, config: LoRAConfig, weights: dict[str, tuple[Tensor, Tensor]]
) -> Adapter:
    """An ``Adapter`` from ``{module: (A [in, r], B [r, out])}``; scales come from ``config``.

    ``version`` is the hash of the single-file form, i.e. what ``read_adapter`` will report
    after ``write_adapter``.
    """
    check_name(name)
    if not weights:
        raise MissingWeights(f"adapter {name!r} has no LoRA weights")
    modules = {}
    for module, (A, B) in weights.items():
        A, B = A.detach(), B.detach()
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ShapeMismatch(
                f"adapter {name!r}: {module} has A{list(A.shape)}, B{list(B.shape)}; "
                "need A [in, r] and B [r, out]"
            )
        if A.shape[1] != config.rank_for(module):
            raise ShapeMismatch(
                f"adapter {name!r}: {module} has rank {A.shape[1]} but the config gives "
                f"r={config.rank_for(module)} (r / rank_pattern)"
            )
        modules[module] = LoRAWeights(A, B, config.scale_for(module))
    data = _single_file_bytes(config, modules)
    return Adapter(name, config, modules, _digest(data), _nbytes(modules))


def adapter_from_model(model: nn.Module, name: str, config: LoRAConfig) -> Adapter:
    """Collect every ``LinearWithLoRA`` of ``model`` into an adapter (the inverse of apply)."""
    weights = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            if not math.isclose(module.lora.scale, config.scale_for(module_name), rel_tol=1e-9):
                raise ValueError(
                    f"{module_name} runs with scale {module.lora.scale} but the config gives "
                    f"{config.scale_for(module_name)}; the file could not reproduce it"
                )
            weights[module_name] = (module.lora.A, module.lora.B)
    return build_adapter(name, config, weights)


# --------------------------------------------------------------------------------------------
# Reading


def read_adapter(
    path: str | os.PathLike, name: str | None = None, max_bytes: int = MAX_ADAPTER_BYTES
) -> Adapter:
    """Read ``NAME.safetensors`` or a PEFT folder ``NAME/``; ``name`` defaults to NAME.

    ``max_bytes`` caps the weights file (a server can pass one derived from its model). Raises
    ``InvalidAdapter`` for anything wrong with the file, ``OSError`` when it cannot be read.
    """
    path = Path(path)
    if name is None:
        name = (
            path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        )
    check_name(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    try:
        if path.is_dir():
            return _read_peft_folder(path, name, max_bytes)
        return _read_single_file(path, name, max_bytes)
    except (InvalidAdapter, OSError):
        raise
    except Exception as err:  # a reader bug that a file can trigger still fails only that file
        raise CorruptAdapterFile(
            f"{path}: could not be read: {type(err).__name__}: {reprlib.repr(str(err))}"
        ) from err


def _read_single_file(path: Path, name: str, max_bytes: int) -> Adapter:
    if path.suffix in _PICKLE_SUFFIXES:
        raise UnsupportedAdapter(f"{path}: pickle checkpoints are never loaded; {_CONVERT_BIN}")
    if path.suffix != ".safetensors":
        raise UnsupportedAdapter(
            f"{path}: not an adapter (expected NAME.safetensors or a PEFT folder NAME/)"
        )
    with open(path, "rb") as f:
        header = _read_header(f, path, max_bytes)
        config = _config_from_metadata(header.metadata, path)
        plan = _plan_modules(header.tensors, config, path)
        body = _read_body(f, header, path)
    modules = _modules_from_body(plan, header, body, path)
    return Adapter(name, config, modules, _digest(header.raw, body), _nbytes(modules))


def _config_from_metadata(metadata: dict[str, str], path: Path) -> LoRAConfig:
    if CONFIG_KEY not in metadata:
        raise InvalidAdapterConfig(
            f"{path}: no {CONFIG_KEY!r} in the safetensors header metadata, so r and lora_alpha "
            f"are unknown (a PEFT {PEFT_WEIGHTS} needs its folder with {PEFT_CONFIG})"
        )
    text = metadata[CONFIG_KEY]
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidAdapterConfig(
            f"{path}: {CONFIG_KEY} metadata is {len(text)} characters, over the "
            f"{MAX_CONFIG_BYTES} limit"
        )
    config_dict = _load_json(text, path, f"{CONFIG_KEY} metadata", InvalidAdapterConfig)
    if not isinstance(config_dict, dict):
        raise InvalidAdapterConfig(f"{path}: {CONFIG_KEY} metadata is not a JSON object")
    version = config_dict.get("format_version")
    if not (_is_int(version) and 1 <= version <= FORMAT_VERSION):
        raise UnsupportedAdapter(
            f"{path}: format_version {reprlib.repr(version)}; this loraserve reads up to "
            f"{FORMAT_VERSION}"
        )
    return _config_from_dict(config_dict, path)


def _read_peft_folder(folder: Path, name: str, max_bytes: int) -> Adapter:
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not weights_path.is_file():
        for suffix in _PICKLE_SUFFIXES:
            if (folder / f"adapter_model{suffix}").is_file():
                raise UnsupportedAdapter(
                    f"{folder}: only adapter_model{suffix} (a pickle) is present and pickles are "
                    f"never loaded; {_CONVERT_BIN}"
                )
        raise MissingWeights(f"{folder}: no {PEFT_WEIGHTS} in the adapter folder")
    if not config_path.is_file():
        raise InvalidAdapterConfig(f"{folder}: no {PEFT_CONFIG} in the adapter folder")
    config_bytes = _read_bytes(config_path, MAX_CONFIG_BYTES)
    config_dict = _load_json(config_bytes, config_path, "the config", InvalidAdapterConfig)
    with open(weights_path, "rb") as f:
        header = _read_header(f, weights_path, max_bytes)
        config = _config_from_dict(config_dict, config_path)
        fingerprint = header.metadata.get(FINGERPRINT_KEY)
        if fingerprint is not None and config.base_fingerprint is None:
            config = replace(config, base_fingerprint=fingerprint)
        plan = _plan_modules(header.tensors, config, weights_path)
        body = _read_body(f, header, weights_path)
    modules = _modules_from_body(plan, header, body, weights_path)
    version = _digest(config_bytes, header.raw, body)
    return Adapter(name, config, modules, version, _nbytes(modules))


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AdapterTooLarge(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
        return f.read(size)  # bounded even if the file grows meanwhile


def _load_json(text: bytes | str, path: Path, what: str, error: type[InvalidAdapter]):
    try:
        return json.loads(text)
    except RecursionError:  # json recurses per nesting level: "[" * 100000 exhausts the stack
        raise error(f"{path}: {what} is nested too deeply to parse") from None
    except ValueError as e:  # bad JSON, bad UTF-8, or an int over Python's 4300-digit limit
        raise error(f"{path}: {what} is not valid JSON ({e})") from None


def _digest(*chunks: bytes | np.ndarray) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def _nbytes(modules: dict[str, LoRAWeights]) -> int:
    return sum(w.A.nbytes + w.B.nbytes for w in modules.values())


# ---- safetensors: the header is read and checked on its own; the data only once it is a LoRA


@dataclass(frozen=True)
class _Entry:
    """One tensor as the header declares it; ``[begin, end)`` is its byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    raw: bytes  # the file's first 8 + n bytes, the start of what the content hash covers
    tensors: dict[str, _Entry]
    metadata: dict[str, str]
    body_bytes: int  # size of the data section that follows


def _read_header(f: BinaryIO, path: Path, max_bytes: int) -> _Header:
    """Read and check the header alone; at most ``MAX_HEADER_BYTES`` + 8 bytes, whatever the file.

    Layout: ``u64 little-endian n`` | ``n bytes of JSON`` | tensor data. Catches truncation and
    non-safetensors files with a readable message, and never allocates more than the file.
    """
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise AdapterTooLarge(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    if size < 8:
        raise CorruptAdapterFile(f"{path}: {size} bytes, too short to be a safetensors file")
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CorruptAdapterFile(
            f"{path}: header length {n} does not fit in a {size}-byte file "
            "(truncated, or not a safetensors file)"
        )
    text = f.read(n)
    if len(prefix) + len(text) != 8 + n:
        raise CorruptAdapterFile(f"{path}: the file changed while it was read")
    tensors, metadata = _check_header(text, size - 8 - n, path)
    return _Header(prefix + text, tensors, metadata, size - 8 - n)


def _check_header(text: bytes, body: int, path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The tensors and metadata, after checking every size and offset against the ``body``
    bytes that follow the header."""
    header = _load_json(text, path, "safetensors header", CorruptAdapterFile)
    if not isinstance(header, dict):
        raise CorruptAdapterFile(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptAdapterFile(f"{path}: __metadata__ must map strings to strings")
    tensors = {}
    for key, info in header.items():
        if len(key) > MAX_KEY_CHARS:
            raise InvalidAdapterConfig(
                f"{path}: tensor key {key[:60]!r}... is {len(key)} characters; tensor keys "
                f"(hence module names) are limited to {MAX_KEY_CHARS}"
            )
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CorruptAdapterFile(f"{path}: header entry for {key!r} is malformed") from None
        if dtype not in _ITEMSIZE:
            raise UnsupportedAdapter(
                f"{path}: tensor {key!r} has dtype "
                f"{dtype[:16] if isinstance(dtype, str) else reprlib.repr(dtype)}; "
                "LoRA weights must be F16, BF16, F32 or F64"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CorruptAdapterFile(
                f"{path}: tensor {key!r} has an invalid shape {reprlib.repr(shape)}"
            )
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end):
            raise CorruptAdapterFile(f"{path}: tensor {key!r} has invalid data_offsets")
        if end > body:
            raise CorruptAdapterFile(
                f"{path}: tensor {key!r} needs data bytes [{begin}, {end}) but the file holds "
                f"only {body} (truncated)"
            )
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CorruptAdapterFile(
                f"{path}: tensor {key!r} {dtype}{reprlib.repr(shape)} does not match its byte "
                f"range [{begin}, {end})"
            )
        tensors[key] = _Entry(dtype, tuple(shape), begin, end)
    covered = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            raise CorruptAdapterFile(
                f"{path}: tensor data overlaps or has gaps at byte {entry.begin}"
            )
        covered = entry.end
    if covered != body:
        raise CorruptAdapterFile(
            f"{path}: {body - covered} bytes after the last tensor (corrupt or concatenated file)"
        )
    return tensors, metadata


def _read_body(f: BinaryIO, header: _Header, path: Path) -> np.ndarray:
    """The data section, into one buffer the tensors will view (no copy per tensor)."""
    body = np.empty(header.body_bytes, np.uint8)  # a bytearray's zero-fill doubled the read time
    if f.readinto(body) != len(body) or f.read(1):
        raise CorruptAdapterFile(f"{path}: the file changed while it was read")
    return body


def _tensor(body: np.ndarray, key: str, entry: _Entry, path: Path) -> Tensor:
    """Tensor ``key``, a view of ``body``; refused unless its weights are finite and plausible."""
    dtype = _TORCH_DTYPES[entry.dtype]
    if entry.begin == entry.end:
        return torch.empty(entry.shape, dtype=dtype)
    # safetensors data is little-endian, as every platform torch ships for.
    t = torch.frombuffer(body, dtype=dtype, count=math.prod(entry.shape), offset=entry.begin)
    if entry.begin % t.element_size():  # safetensors does not align tensors; kernels expect it
        t = t.clone()
    _check_weights(t, key, path)
    return t.reshape(entry.shape)


def _check_weights(t: Tensor, key: str, path: Path) -> None:
    # One pass and no temporary: aminmax propagates a NaN to both ends and an infinity is an
    # end (isfinite().all() plus abs().max() takes two passes, two temporaries and ~30x longer).
    lo, hi = (v.item() for v in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        what = "NaN" if math.isnan(hi) else "infinite"
        raise NonFiniteWeights(f"{path}: tensor {key!r} holds {what} values")
    if max(-lo, hi) > MAX_WEIGHT:
        raise WeightsOutOfRange(
            f"{path}: tensor {key!r} holds weights of magnitude {max(-lo, hi):.3g}, over "
            f"float16's largest value {MAX_WEIGHT:g}: that cannot be a trained LoRA, and it "
            "would overflow half precision"
        )


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a fixed key order.

    Written by hand because safetensors' own writer emits the metadata map in random order,
    which would give the same adapter a new content hash (version) on every write.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes, as safetensors does
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


# ---- config


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


# ---- tensors -> modules

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


def _parse_key(key: str, path: Path) -> tuple[str, str, str | None]:
    """``base_model.model.<module>.lora_A[.<adapter>].weight`` -> (module, "lora_A", adapter)."""
    stripped = key.removeprefix(PEFT_PREFIX)
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        raise UnsupportedAdapter(f"{path}: embedding LoRA is not supported (tensor {key!r})")
    if "lora_magnitude_vector" in key:
        raise UnsupportedAdapter(f"{path}: DoRA is not supported (tensor {key!r})")
    if "modules_to_save" in key:
        raise UnsupportedAdapter(f"{path}: modules_to_save is not supported (tensor {key!r})")
    match = _LORA_KEY.fullmatch(stripped)
    if match is None:
        raise UnsupportedAdapter(
            f"{path}: tensor {key!r} is not a LoRA A/B weight (trained biases, embeddings or "
            "other base weights are not supported)"
        )
    return match["module"], match["part"], match["adapter"]


# A module's (lora_A key, lora_B key, scale), planned from the header before the data is read.
_Plan = dict[str, tuple[str, str, float]]


def _plan_modules(tensors: dict[str, _Entry], config: LoRAConfig, path: Path) -> _Plan:
    """Check from the header alone that the tensors are one adapter's LoRA A/B pairs with the
    config's ranks and sane scales; the data is read only when this passes."""
    parsed = {key: _parse_key(key, path) for key in tensors}
    adapter_names = {adapter_name for _, _, adapter_name in parsed.values()}
    if len(adapter_names) > 1:
        raise UnsupportedAdapter(
            f"{path}: holds several adapters ({sorted(map(str, adapter_names))}); save one per file"
        )
    parts: dict[str, dict[str, str]] = {}
    for key, (module, part, _) in parsed.items():
        if part in parts.setdefault(module, {}):
            raise CorruptAdapterFile(f"{path}: {module}.{part} appears twice")
        parts[module][part] = key
    if not parts:
        raise MissingWeights(f"{path}: holds no LoRA weights")
    budget = MatchBudget()  # one budget for all of this file's pattern matching
    plan = {}
    for module in sorted(parts):
        found = parts[module]
        for part in ("lora_A", "lora_B"):
            if part not in found:
                raise MissingWeights(f"{path}: {module} has no {part}.weight")
        a, b = tensors[found["lora_A"]].shape, tensors[found["lora_B"]].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:  # PEFT layout: a [r, in], b [out, r]
            raise ShapeMismatch(
                f"{path}: {module} has lora_A {list(a)} and lora_B {list(b)}; "
                "need lora_A [r, in] and lora_B [out, r]"
            )
        try:
            r, scale = config.rank_for(module, budget), config.scale_for(module, budget)
        except PatternError as e:
            raise InvalidAdapterConfig(f"{path}: {e}") from None
        if a[0] != r:
            raise ShapeMismatch(
                f"{path}: {module} has rank {a[0]} in the file but the config gives r={r}"
            )
        if not abs(scale) <= MAX_SCALE:  # also catches NaN
            raise InvalidAdapterConfig(
                f"{path}: {module} gets scale {scale:g} (lora_alpha / r, after rank_pattern, "
                f"alpha_pattern and use_rslora): a scale that is not finite or over "
                f"{MAX_SCALE:g} in magnitude cannot be a trained LoRA"
            )
        plan[module] = (found["lora_A"], found["lora_B"], scale)
    return plan


def _modules_from_body(
    plan: _Plan, header: _Header, body: np.ndarray, path: Path
) -> dict[str, LoRAWeights]:
    modules = {}
    for module, (a_key, b_key, scale) in plan.items():
        a = _tensor(body, a_key, header.tensors[a_key], path)  # [r, in]
        b = _tensor(body, b_key, header.tensors[b_key], path)  # [out, r]
        # Views, not copies: the serving slot tables store A as [r, in] and B as [r, out]
        # rows, so filling a slot from the file's layout is a plain copy (copying here cost a
        # third of reading an adapter).
        modules[module] = LoRAWeights(A=a.T, B=b.T, scale=scale)
    return modules


# --------------------------------------------------------------------------------------------
# Validation against a base model


def _show(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def validate_adapter(
    adapter: Adapter,
    shapes: dict[str, tuple[int, int]],
    fingerprint: str | None = None,
    max_rank: int | None = None,
) -> None:
    """Raise the specific ``InvalidAdapter`` if ``adapter`` cannot run on this base model.

    ``shapes``: the base's linear layers, name -> (in_features, out_features) (``linear_shapes``).
    The fingerprint is only compared when both sides know one (PEFT folders carry none). The
    config's patterns are matched within one ``MatchBudget``; one too costly to match is an
    ``InvalidAdapterConfig``.
    """
    where = f"adapter {adapter.name!r}"
    theirs = adapter.config.base_fingerprint
    if fingerprint is not None and theirs is not None and theirs != fingerprint:
        raise FingerprintMismatch(
            f"{where} was made for base model fingerprint {theirs}, this base is {fingerprint} "
            f"(adapter base_model: {adapter.config.base_model})"
        )
    unknown = set(adapter.modules) - set(shapes)
    if unknown:
        raise UnknownTargetModule(
            f"{where} has weights for modules that are not linear layers of the base model: "
            f"{_show(unknown)} (base has e.g. {_show(list(shapes)[:3], 3)})"
        )
    for module, w in sorted(adapter.modules.items()):
        in_features, out_features = shapes[module]
        if w.A.shape[0] != in_features or w.B.shape[1] != out_features:
            raise ShapeMismatch(
                f"{where}: {module} is {in_features} -> {out_features} in the base model but the "
                f"adapter's A is [{w.A.shape[0]}, r] and B [r, {w.B.shape[1]}] (in -> out)"
            )
    if adapter.config.target_modules is not None:
        budget = MatchBudget()
        try:
            targeted = {n for n in shapes if adapter.config.targets(n, budget)}
        except PatternError as e:
            raise InvalidAdapterConfig(f"{where}: {e}") from None
        missing = targeted - set(adapter.modules)
        if missing:
            raise MissingWeights(
                f"{where}: target_modules={_show_targets(adapter.config.target_modules)} "
                f"selects {_show(missing)} but the file has no weights for them"
            )
    if max_rank is not None and adapter.rank > max_rank:
        raise RankTooLarge(
            f"{where} has rank {adapter.rank}, above this server's max rank {max_rank}"
        )


def _show_targets(targets) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)


# --------------------------------------------------------------------------------------------
# Applying (trainer / tests; the server fills slot tables instead)


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Swap each adapted Linear of ``model`` for a ``LinearWithLoRA`` holding the adapter. In place.

    A layer that already holds a LoRA gets this adapter instead (its frozen linear is reused).
    """
    validate_adapter(adapter, linear_shapes(model))
    for name, w in adapter.modules.items():
        module = model.get_submodule(name)
        linear = module.linear if isinstance(module, LinearWithLoRA) else module
        layer = LinearWithLoRA(linear, w.rank, alpha=w.scale, scale=w.scale)
        with torch.no_grad():
            layer.lora.A.copy_(w.A)
            layer.lora.B.copy_(w.B)
        model.set_submodule(name, layer)
    return model


# --------------------------------------------------------------------------------------------
# Writing


def _peft_tensors(modules: dict[str, LoRAWeights]) -> dict[str, Tensor]:
    tensors = {}
    for module, w in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = w.A.T  # [r, in]
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = w.B.T  # [out, r]
    return tensors


def _check_scales(adapter: Adapter) -> None:
    """The file stores r/alpha, not scales, and every reader refuses NaN or huge weights:
    refuse to write what could not be read back (a diverged training run, say)."""
    for module, w in adapter.modules.items():
        for part, t in (("lora_A", w.A), ("lora_B", w.B)):
            _check_weights(t, f"{PEFT_PREFIX}{module}.{part}.weight", Path(adapter.name))
        want = adapter.config.scale_for(module)
        if not math.isclose(w.scale, want, rel_tol=1e-9):
            raise ValueError(
                f"adapter {adapter.name!r}: {module} has scale {w.scale} but its config gives "
                f"{want} (r={adapter.config.rank_for(module)}, "
                f"lora_alpha={adapter.config.alpha_for(module)}); fix lora_alpha or alpha_pattern"
            )


def _single_file_bytes(config: LoRAConfig, modules: dict[str, LoRAWeights]) -> bytes:
    meta = {"format_version": FORMAT_VERSION, **config.to_dict()}
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(meta, sort_keys=True)}
    return _serialize(_peft_tensors(modules), metadata)


def write_adapter(path: str | os.PathLike, adapter: Adapter) -> Path:
    """Write the single-file form ``NAME.safetensors`` atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file adapter must be named NAME.safetensors")
    _check_scales(adapter)
    _atomic_write(path, _single_file_bytes(adapter.config, adapter.modules))
    return path


def write_peft(directory: str | os.PathLike, adapter: Adapter) -> Path:
    """Write a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) atomically.

    The folder is built under a temp name next to ``directory`` and renamed into place; an
    existing folder is first renamed aside, so readers see the old or the new one, never a mix.
    """
    directory = Path(directory)
    _check_scales(adapter)
    config = adapter.config.to_dict()
    config.pop("base_fingerprint", None)  # PEFT warns on unknown keys; it goes in the metadata
    metadata = {"format": "pt"}
    if adapter.config.base_fingerprint is not None:
        metadata[FINGERPRINT_KEY] = adapter.config.base_fingerprint
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / PEFT_WEIGHTS).write_bytes(_serialize(_peft_tensors(adapter.modules), metadata))
        if directory.exists():
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{directory.name}.", suffix=".old.tmp", dir=directory.parent
                )
            )
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a server running as another user reads it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
