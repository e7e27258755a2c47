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
  problem; ``validate_adapter`` then checks it against a base model (module names, shapes,
  targeted modules present, rank limit, base fingerprint).

Both writers are atomic (temp name in the same directory, then ``os.replace``) and
deterministic: the same adapter always gives the same bytes, hence the same version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from adapters.lora import LinearWithLoRA, linear_shapes, match_target, peft_scale

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONFIG_KEY = "loraserve.lora_config"  # single file: the LoRA config JSON in the header metadata
FINGERPRINT_KEY = "loraserve.base_fingerprint"  # PEFT folder written by us: fingerprint only
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Memory-bomb caps: checked against the file size before anything is read or allocated.
MAX_ADAPTER_BYTES = 4 << 30
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_CONFIG_BYTES = 1 << 20

_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

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


# --------------------------------------------------------------------------------------------
# Data


def _pattern_key(keys, name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key that matches the end of ``name`` at a dot."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass(frozen=True)
class LoRAConfig:
    """What is needed to rebuild each module's scale and to know which modules are targeted.

    ``target_modules`` has PEFT's meaning (tuple of names or suffixes, a full-match regex, or
    ``"all-linear"``). ``None`` declares no targets: the modules that have weights are the
    adapted set, and ``validate_adapter`` cannot tell whether any are missing.
    ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` narrow it as in PEFT.
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

    def rank_for(self, name: str) -> int:
        key = _pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        key = _pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, name: str) -> float:
        return peft_scale(self.rank_for(name), self.alpha_for(name), self.use_rslora)

    def targets(self, name: str) -> bool:
        """Would PEFT adapt linear module ``name``? (PEFT's ``check_target_module_exists``)"""
        if self.exclude_modules and match_target(name, self.exclude_modules):
            return False
        if not match_target(name, self.target_modules):
            return False
        if self.layers_to_transform is None or not isinstance(self.target_modules, tuple):
            return True
        if name in self.target_modules:  # PEFT: an exact name skips the layer filter
            return True
        return _layer_index(name, self.layers_pattern) in self.layers_to_transform

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


def _layer_index(name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The first numbered segment of ``name`` (PEFT: the layer index for layers_to_transform)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
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
    """Read ``NAME.safetensors`` or a PEFT folder ``NAME/``; ``name`` defaults to NAME."""
    path = Path(path)
    if name is None:
        name = (
            path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        )
    check_name(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    if path.is_dir():
        return _read_peft_folder(path, name, max_bytes)
    if path.suffix in _PICKLE_SUFFIXES:
        raise UnsupportedAdapter(f"{path}: pickle checkpoints are never loaded; {_CONVERT_BIN}")
    if path.suffix != ".safetensors":
        raise UnsupportedAdapter(
            f"{path}: not an adapter (expected NAME.safetensors or a PEFT folder NAME/)"
        )
    data = _read_bytes(path, max_bytes)
    tensors, metadata = _load_safetensors(data, path)
    if CONFIG_KEY not in metadata:
        raise InvalidAdapterConfig(
            f"{path}: no {CONFIG_KEY!r} in the safetensors header metadata, so r and lora_alpha "
            f"are unknown (a PEFT {PEFT_WEIGHTS} needs its folder with {PEFT_CONFIG})"
        )
    try:
        config_dict = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise InvalidAdapterConfig(
            f"{path}: {CONFIG_KEY} metadata is not valid JSON: {e}"
        ) from None
    if not isinstance(config_dict, dict):
        raise InvalidAdapterConfig(f"{path}: {CONFIG_KEY} metadata is not a JSON object")
    version = config_dict.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION:
        raise UnsupportedAdapter(
            f"{path}: format_version {version!r}; this loraserve reads up to {FORMAT_VERSION}"
        )
    config = _config_from_dict(config_dict, path)
    modules = _modules_from_tensors(tensors, config, path)
    return Adapter(name, config, modules, _digest(data), _nbytes(modules))


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
    try:
        config_dict = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapterConfig(f"{config_path}: not valid JSON: {e}") from None
    data = _read_bytes(weights_path, max_bytes)
    tensors, metadata = _load_safetensors(data, weights_path)
    config = _config_from_dict(config_dict, config_path)
    if FINGERPRINT_KEY in metadata and config.base_fingerprint is None:
        config = replace(config, base_fingerprint=metadata[FINGERPRINT_KEY])
    modules = _modules_from_tensors(tensors, config, weights_path)
    return Adapter(name, config, modules, _digest(config_bytes + data), _nbytes(modules))


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterTooLarge(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
    with open(path, "rb") as f:
        return f.read()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _nbytes(modules: dict[str, LoRAWeights]) -> int:
    return sum(w.A.nbytes + w.B.nbytes for w in modules.values())


# ---- safetensors: check the header ourselves, then let safetensors build the tensors


def _check_header(data: bytes, path: Path) -> dict[str, str]:
    """The header's metadata, after checking every size and offset against the file size.

    Layout: ``u64 little-endian n`` | ``n bytes of JSON`` | tensor data. Catches truncation and
    non-safetensors files with a readable message, and never allocates more than the file.
    """
    if len(data) < 8:
        raise CorruptAdapterFile(f"{path}: {len(data)} bytes, too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER_BYTES):
        raise CorruptAdapterFile(
            f"{path}: header length {n} does not fit in a {len(data)}-byte file "
            "(truncated, or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptAdapterFile(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptAdapterFile(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptAdapterFile(f"{path}: __metadata__ must map strings to strings")
    body = len(data) - 8 - n
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CorruptAdapterFile(f"{path}: header entry for {key!r} is malformed") from None
        if dtype not in _ITEMSIZE:
            raise UnsupportedAdapter(
                f"{path}: tensor {key!r} has dtype {dtype}; "
                "LoRA weights must be F16, BF16, F32 or F64"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CorruptAdapterFile(f"{path}: tensor {key!r} has an invalid shape {shape}")
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end):
            raise CorruptAdapterFile(f"{path}: tensor {key!r} has invalid data_offsets")
        if end > body:
            raise CorruptAdapterFile(
                f"{path}: tensor {key!r} needs data bytes [{begin}, {end}) but the file holds "
                f"only {body} (truncated)"
            )
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CorruptAdapterFile(
                f"{path}: tensor {key!r} {dtype}{shape} does not match its byte range "
                f"[{begin}, {end})"
            )
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise CorruptAdapterFile(f"{path}: tensor data overlaps or has gaps at byte {begin}")
        covered = end
    if covered != body:
        raise CorruptAdapterFile(
            f"{path}: {body - covered} bytes after the last tensor (corrupt or concatenated file)"
        )
    return metadata


def _load_safetensors(data: bytes, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    metadata = _check_header(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as e:
        raise CorruptAdapterFile(f"{path}: safetensors could not read it: {e}") from None
    return tensors, metadata


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
        raise UnsupportedAdapter(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
    features = [desc for key, desc in _UNSUPPORTED_FIELDS.items() if d.get(key)]
    if d.get("bias", "none") != "none":
        features.append(f"bias={d['bias']!r} (trained base biases; only bias='none')")
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        features.append(
            f"init_lora_weights={init!r} (it changed the base weights; save with PEFT's "
            "path_initial_model_for_weight_conversion to get an adapter for the original base)"
        )
    if features:
        raise UnsupportedAdapter(f"{path}: uses unsupported features: {', '.join(features)}")

    r = d.get("r")
    if not _is_int(r) or r < 1:
        raise InvalidAdapterConfig(f"{path}: r must be a positive integer, got {r!r}")
    alpha = d.get("lora_alpha", 8)  # PEFT's default
    if not _is_number(alpha):
        raise InvalidAdapterConfig(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    rank_pattern = d.get("rank_pattern") or {}
    alpha_pattern = d.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
        _is_int(v) and v >= 1 for v in rank_pattern.values()
    ):
        raise InvalidAdapterConfig(f"{path}: rank_pattern must map patterns to positive integers")
    if not isinstance(alpha_pattern, dict) or not all(
        _is_number(v) for v in alpha_pattern.values()
    ):
        raise InvalidAdapterConfig(f"{path}: alpha_pattern must map patterns to numbers")
    for pattern in [*rank_pattern, *alpha_pattern]:
        _check_regex(pattern, "rank_pattern/alpha_pattern key", path)

    target_modules = _names_or_regex(d.get("target_modules"), "target_modules", path)
    layers = d.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise InvalidAdapterConfig(f"{path}: layers_to_transform must be int or list of ints")
    layers_pattern = d.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    for pattern in layers_pattern or []:
        _check_regex(pattern, "layers_pattern", path)
    fingerprint = d.get("base_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise InvalidAdapterConfig(f"{path}: base_fingerprint must be a string")
    return LoRAConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(d.get("use_rslora", False)),
        target_modules=target_modules,
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        base_fingerprint=fingerprint,
        base_model=d.get("base_model_name_or_path"),
        fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
        exclude_modules=_names_or_regex(d.get("exclude_modules"), "exclude_modules", path),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(layers_pattern) if layers_pattern else None,
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_regex(pattern: str, what: str, path: Path) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InvalidAdapterConfig(
            f"{path}: {what} {pattern!r} is not a valid regex ({e})"
        ) from None


def _names_or_regex(value, what: str, path: Path) -> tuple[str, ...] | str | None:
    if value is None or value == []:
        return None
    if isinstance(value, str):
        _check_regex(value, what, path)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidAdapterConfig(f"{path}: {what} must be a list of names or a regex, got {value!r}")


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


def _modules_from_tensors(
    tensors: dict[str, Tensor], config: LoRAConfig, path: Path
) -> dict[str, LoRAWeights]:
    parsed = [(_parse_key(key, path), tensor) for key, tensor in tensors.items()]
    adapter_names = {adapter_name for (_, _, adapter_name), _ in parsed}
    if len(adapter_names) > 1:
        raise UnsupportedAdapter(
            f"{path}: holds several adapters ({sorted(map(str, adapter_names))}); save one per file"
        )
    parts: dict[str, dict[str, Tensor]] = {}
    for (module, part, _), tensor in parsed:
        if part in parts.setdefault(module, {}):
            raise CorruptAdapterFile(f"{path}: {module}.{part} appears twice")
        parts[module][part] = tensor
    if not parts:
        raise MissingWeights(f"{path}: holds no LoRA weights")
    modules = {}
    for module in sorted(parts):
        found = parts[module]
        for part in ("lora_A", "lora_B"):
            if part not in found:
                raise MissingWeights(f"{path}: {module} has no {part}.weight")
        a, b = found["lora_A"], found["lora_B"]  # PEFT layout: a [r, in], b [out, r]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ShapeMismatch(
                f"{path}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                "need lora_A [r, in] and lora_B [out, r]"
            )
        r = config.rank_for(module)
        if a.shape[0] != r:
            raise ShapeMismatch(
                f"{path}: {module} has rank {a.shape[0]} in the file but the config gives r={r}"
            )
        # Views, not copies: the serving slot tables store A as [r, in] and B as [r, out]
        # rows, so filling a slot from the file's layout is a plain copy (copying here cost a
        # third of reading an adapter).
        modules[module] = LoRAWeights(A=a.T, B=b.T, scale=config.scale_for(module))
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
    The fingerprint is only compared when both sides know one (PEFT folders carry none).
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
        missing = {n for n in shapes if adapter.config.targets(n)} - set(adapter.modules)
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
    """The file stores r/alpha, not scales: refuse to write what could not be read back."""
    for module, w in adapter.modules.items():
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
