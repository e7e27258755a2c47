"""Our single-file form, ``NAME.safetensors``: PEFT's tensors with the config in the header.

Its tensors are exactly a PEFT ``adapter_model.safetensors`` (see ``peft``) and its header
metadata holds ``{"format": "pt", "loraserve.lora_config": JSON}`` (``CONFIG_KEY``), where the
JSON is a PEFT ``adapter_config.json`` subset plus ``base_fingerprint`` and
``format_version``. The trainer writes it. ``_single_file_bytes`` makes its bytes (the same
adapter always gives the same bytes); ``_config_from_metadata`` reads the config back, refusing
a missing, oversized or newer one.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

from .adapter import LoRAWeights
from .config import (
    MAX_CONFIG_BYTES,
    LoRAConfig,
    _config_from_dict,
    _is_int,
    _load_json,
)
from .errors import InvalidAdapterConfig, UnsupportedAdapter
from .peft import PEFT_CONFIG, PEFT_WEIGHTS, _peft_tensors
from .safetensors import _serialize

CONFIG_KEY = "loraserve.lora_config"  # single file: the LoRA config JSON in the header metadata
FORMAT_VERSION = 1


def _single_file_bytes(config: LoRAConfig, modules: dict[str, LoRAWeights]) -> bytes:
    meta = {"format_version": FORMAT_VERSION, **config.to_dict()}
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(meta, sort_keys=True)}
    return _serialize(_peft_tensors(modules), metadata)


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
