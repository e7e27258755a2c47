"""safetensors, checked before it is trusted: the header on its own, then the data.

Layout: ``u64 little-endian n`` | ``n bytes of JSON`` (tensor entries + ``__metadata__``) |
tensor data. Reading is bounded by the file and by our caps, whatever the bytes claim:

- ``_read_header`` reads at most ``MAX_HEADER_BYTES`` + 8 bytes, after checking the file's size
  against ``max_bytes``; ``_check_header`` checks every dtype, shape and byte range (the ranges
  must cover the data section exactly, no gap, overlap or trailing bytes).
- ``_read_body`` reads the data section once, into one buffer; ``_tensor`` views a tensor in it
  and refuses weights that are not finite or beyond float16's range (``_check_weights``, also
  used by the writers).
- ``_serialize`` is the deterministic writer: sorted keys and metadata, so the same tensors
  always give the same bytes (hence the same content hash, the adapter's version).
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from .config import _is_int, _load_json
from .errors import (
    AdapterTooLarge,
    CorruptAdapterFile,
    InvalidAdapterConfig,
    NonFiniteWeights,
    UnsupportedAdapter,
    WeightsOutOfRange,
)

# safetensors allows 100 MB, which parses into ~1 GB of Python objects; an adapter header is a
# few hundred bytes per tensor (8 MiB: ~50k tensors, far above any real adapter)
MAX_HEADER_BYTES = 8 << 20
MAX_KEY_CHARS = 512  # a tensor key, hence a module name
# A trained LoRA has weights of order 1 (and a scale of order 1 to 100); beyond this it is a
# corrupt or hostile file (and its deltas would overflow a half-precision base).
MAX_WEIGHT = 65504.0  # float16's largest finite value

_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


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


def _read_header(
    f: BinaryIO, path: Path, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> _Header:
    """Read and check the header alone; at most ``max_header_bytes`` + 8 bytes, whatever the file.

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
    if n > min(size - 8, MAX_HEADER_BYTES) or n > max_header_bytes:
        if n <= size - 8:
            raise AdapterTooLarge(
                f"{path}: a {n}-byte header is over the {max_header_bytes}-byte limit "
                "(an adapter's header holds a few hundred bytes per module)"
            )
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
