"""The reference LoRA kernels: the plain per-token loop that defines the semantics.

Slow and host-driven (it reads the slots back); every other implementation is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Group, LoRAKernels, Segments


class ReferenceKernels(LoRAKernels):
    name = "reference"

    def _shrink(
        self, x: Tensor, As: Group, token_slots: Tensor, rank: int, segments: Segments | None
    ) -> Tensor:
        slots = _token_slots(token_slots, segments)
        h = torch.zeros(x.shape[0], len(As) * rank, dtype=torch.float32, device=x.device)
        for t, s in enumerate(slots):
            if s == 0:
                continue  # rows on slot 0 stay zero
            for g, table in enumerate(As):
                h[t, g * rank : (g + 1) * rank] = table[s, :rank].float() @ x[t].float()
        return h

    def _expand(
        self,
        h: Tensor,
        Bs: Group,
        token_slots: Tensor,
        rank: int,
        ys: Group,
        segments: Segments | None,
    ) -> None:
        slots = _token_slots(token_slots, segments)
        for t, s in enumerate(slots):
            if s == 0:
                continue  # the base model: y untouched
            for g, (table, y) in enumerate(zip(Bs, ys)):
                delta = h[t, g * rank : (g + 1) * rank].float() @ table[s, :rank].float()
                y[t] = (y[t].float() + delta).to(y.dtype)


def _token_slots(token_slots: Tensor, segments: Segments | None) -> list[int]:
    """The per-token slots, after checking that ``segments`` (if any) says the same."""
    slots = token_slots.tolist()
    if segments is not None:
        starts, seg_slots = segments.starts.tolist(), segments.slots.tolist()
        from_segments = [
            s for i, s in enumerate(seg_slots) for _ in range(starts[i + 1] - starts[i])
        ]
        if from_segments != slots or starts[0] != 0:
            raise ValueError("segments do not describe the same routing as token_slots")
    return slots
