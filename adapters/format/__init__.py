"""Adapter files: read, write and validate LoRA adapters. Never unpickles anything.

Two on-disk forms, one in-memory ``Adapter``:

- ``NAME.safetensors``: one file. Its tensors are exactly a PEFT ``adapter_model.safetensors``
  (keys ``base_model.model.<module>.lora_A.weight: [r, in]`` / ``.lora_B.weight: [out, r]``)
  and its header metadata holds ``{"format": "pt", "loraserve.lora_config": JSON}``, where the
  JSON is a PEFT ``adapter_config.json`` subset plus ``base_fingerprint``. The trainer writes it.
- ``NAME/``: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``), read as
  ``save_pretrained`` left it. ``write_peft`` writes one that ``PeftModel.from_pretrained`` loads.

One job per module, each stating its contract:

- ``errors``       the ``InvalidAdapter`` hierarchy: one type per problem with a file
- ``config``       ``LoRAConfig`` (scales and targets as PEFT computes them) and the checks of a
                   config read from a file; bounded pattern matching
- ``safetensors``  the header checked before the data is read; the deterministic writer
- ``adapter``      ``Adapter`` / ``LoRAWeights`` in memory, names, the content-hash version
- ``peft``         PEFT's tensor keys and layout <-> our modules
- ``single_file``  our ``NAME.safetensors`` form: the config in the header metadata
- ``read``         ``read_adapter`` (either form), cheapest checks first
- ``validate``     ``validate_adapter``: does an adapter fit this base model
- ``write``        ``write_adapter`` / ``write_peft``, atomic and deterministic
- ``build``        ``build_adapter``, ``adapter_from_model``, ``apply_adapter``

Callers import from ``loraserve.adapters.format`` itself; the modules above are how it is built.
"""

from .adapter import NAME_RE, Adapter, LoRAWeights, check_name
from .build import adapter_from_model, apply_adapter, build_adapter
from .config import MAX_CONFIG_BYTES, MAX_PATTERN_CHARS, MAX_PATTERNS, MAX_RANK, LoRAConfig
from .errors import (
    AdapterTooLarge,
    CorruptAdapterFile,
    FingerprintMismatch,
    InvalidAdapter,
    InvalidAdapterConfig,
    InvalidAdapterName,
    MissingWeights,
    NonFiniteWeights,
    RankTooLarge,
    ShapeMismatch,
    UnknownTargetModule,
    UnsupportedAdapter,
    WeightsOutOfRange,
)
from .peft import (
    FINGERPRINT_KEY,
    MAX_SCALE,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    _peft_tensors,
    _plan_modules,
)
from .read import MAX_ADAPTER_BYTES, read_adapter
from .safetensors import (
    MAX_HEADER_BYTES,
    MAX_KEY_CHARS,
    MAX_WEIGHT,
    _check_header,
    _read_header,
    _serialize,
)
from .single_file import CONFIG_KEY, FORMAT_VERSION
from .validate import validate_adapter
from .write import write_adapter, write_peft

__all__ = [
    "CONFIG_KEY",
    "FINGERPRINT_KEY",
    "FORMAT_VERSION",
    "MAX_ADAPTER_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_KEY_CHARS",
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "MAX_RANK",
    "MAX_SCALE",
    "MAX_WEIGHT",
    "NAME_RE",
    "PEFT_CONFIG",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS",
    "Adapter",
    "AdapterTooLarge",
    "CorruptAdapterFile",
    "FingerprintMismatch",
    "InvalidAdapter",
    "InvalidAdapterConfig",
    "InvalidAdapterName",
    "LoRAConfig",
    "LoRAWeights",
    "MissingWeights",
    "NonFiniteWeights",
    "RankTooLarge",
    "ShapeMismatch",
    "UnknownTargetModule",
    "UnsupportedAdapter",
    "WeightsOutOfRange",
    "_check_header",
    "_peft_tensors",
    "_plan_modules",
    "_read_header",
    "_serialize",
    "adapter_from_model",
    "apply_adapter",
    "build_adapter",
    "check_name",
    "read_adapter",
    "validate_adapter",
    "write_adapter",
    "write_peft",
]
