"""Where the trainer's math runs, chosen once per run: ``TrainDevice``.

CPU runs in float32. CUDA runs a bfloat16 base under bfloat16 autocast when the GPU supports it
(float32 otherwise); LoRA weights and AdamW state stay float32 either way. ``threads`` sets
torch's intra-op CPU threads. (The server has its own runtime; nothing here is shared with it.)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import TrainError


@dataclass(frozen=True)
class TrainDevice:
    """Where the math runs, chosen once: CPU in float32, or CUDA with a bfloat16 base and
    bfloat16 autocast (LoRA weights and AdamW state stay float32)."""

    device: torch.device
    base_dtype: torch.dtype
    autocast: Callable[[], contextlib.AbstractContextManager]


def resolve_device(device: str, threads: int | None = None) -> TrainDevice:
    if threads is not None:
        # Small models run fastest on one thread; on a busy machine torch's default (one per
        # core) can make each step 10x slower.
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {device}: no CUDA device is available")
        if torch.cuda.is_bf16_supported():
            bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
            return TrainDevice(torch.device(device), torch.bfloat16, bf16)
        return TrainDevice(torch.device(device), torch.float32, contextlib.nullcontext)
    return TrainDevice(torch.device("cpu"), torch.float32, contextlib.nullcontext)
