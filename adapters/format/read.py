"""``read_adapter``: a ``NAME.safetensors`` file or a PEFT folder ``NAME/`` -> ``Adapter``.

Contract:

- It returns ``Adapter(name, config, modules, version, nbytes)`` (see ``adapter``); each
  module's scale is recovered exactly as PEFT computes it (see ``config``).
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
- Patterns from the file run on ``loraserve.adapters.lora.bounded_match``: one read spends at most
  ``MATCH_BUDGET_S`` matching them, and a pattern that needs more is refused as too costly to
  match.
- Pickles (``.bin``, ``.pt``, ...) are never loaded; the message says how to convert one.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import replace
from pathlib import Path

from loraserve.adapters.chat_template import ChatTemplate, ChatTemplateError

from .adapter import Adapter, _digest, _nbytes, check_name
from .config import MAX_CONFIG_BYTES, _config_from_dict, _load_json
from .errors import (
    AdapterTooLarge,
    CorruptAdapterFile,
    InvalidAdapter,
    InvalidAdapterConfig,
    MissingWeights,
    UnsupportedAdapter,
)
from .peft import (
    FINGERPRINT_KEY,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    _modules_from_body,
    _plan_modules,
)
from .safetensors import MAX_HEADER_BYTES, _read_body, _read_header
from .single_file import _config_from_metadata

# Memory-bomb cap: checked against the file size before anything is read or allocated.
MAX_ADAPTER_BYTES = 4 << 30

_CONVERT_BIN = (
    "convert it to safetensors once, in an environment you trust:\n"
    "    import torch; from safetensors.torch import save_file\n"
    '    sd = torch.load("adapter_model.bin", map_location="cpu", weights_only=True)\n'
    '    save_file({k: v.contiguous() for k, v in sd.items()}, "adapter_model.safetensors",'
    ' metadata={"format": "pt"})'
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_adapter(
    path: str | os.PathLike,
    name: str | None = None,
    max_bytes: int = MAX_ADAPTER_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Adapter:
    """Read ``NAME.safetensors`` or a PEFT folder ``NAME/``; ``name`` defaults to NAME.

    ``max_bytes`` caps the weights file and ``max_header_bytes`` its JSON header (parsing JSON
    holds the GIL, so a server passes caps derived from its model: a few hundred bytes per
    LoRA-able module, not megabytes). Raises
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
            return _read_peft_folder(path, name, max_bytes, max_header_bytes)
        return _read_single_file(path, name, max_bytes, max_header_bytes)
    except (InvalidAdapter, OSError):
        raise
    except Exception as err:  # a reader bug that a file can trigger still fails only that file
        raise CorruptAdapterFile(
            f"{path}: could not be read: {type(err).__name__}: {reprlib.repr(str(err))}"
        ) from err


def _read_single_file(path: Path, name: str, max_bytes: int, max_header_bytes: int) -> Adapter:
    if path.suffix in _PICKLE_SUFFIXES:
        raise UnsupportedAdapter(f"{path}: pickle checkpoints are never loaded; {_CONVERT_BIN}")
    if path.suffix != ".safetensors":
        raise UnsupportedAdapter(
            f"{path}: not an adapter (expected NAME.safetensors or a PEFT folder NAME/)"
        )
    with open(path, "rb") as f:
        header = _read_header(f, path, max_bytes, max_header_bytes)
        config = _config_from_metadata(header.metadata, path)
        plan = _plan_modules(header.tensors, config, path)
        body = _read_body(f, header, path)
    modules = _modules_from_body(plan, header, body, path)
    template = _template(lambda: ChatTemplate.from_metadata(header.metadata), path)
    version = _digest(header.raw, body)
    return Adapter(name, config, modules, version, _nbytes(modules), template)


def _read_peft_folder(folder: Path, name: str, max_bytes: int, max_header_bytes: int) -> Adapter:
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
        header = _read_header(f, weights_path, max_bytes, max_header_bytes)
        config = _config_from_dict(config_dict, config_path)
        fingerprint = header.metadata.get(FINGERPRINT_KEY)
        if fingerprint is not None and config.base_fingerprint is None:
            config = replace(config, base_fingerprint=fingerprint)
        plan = _plan_modules(header.tensors, config, weights_path)
        body = _read_body(f, header, weights_path)
    modules = _modules_from_body(plan, header, body, weights_path)
    template = _template(lambda: ChatTemplate.from_folder(folder), folder)
    version = _digest(config_bytes, header.raw, body, (template or "").encode())
    return Adapter(name, config, modules, version, _nbytes(modules), template)


def _template(read, where: Path) -> str | None:
    """The adapter's own chat template, from ``read()`` (``ChatTemplate.from_folder`` for a
    PEFT folder: ``chat_template.jinja`` or ``tokenizer_config.json``'s, read, bounded and
    confined to the folder; ``from_metadata`` for a single file), compiled now: one that cannot
    be used refuses the adapter."""
    try:
        template = read()
    except ChatTemplateError as err:
        raise InvalidAdapterConfig(f"{where}: its chat template cannot be used: {err}") from None
    return None if template is None else template.source


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AdapterTooLarge(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
        return f.read(size)  # bounded even if the file grows meanwhile
