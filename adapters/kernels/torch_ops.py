"""Gather + bmm LoRA kernels in plain PyTorch (BGMV semantics), for any device.

Each token gathers its slot's ``A[:rank]`` / ``B[:rank]`` and a batched matmul does the rest: a
gather and a bmm per table whatever the number of adapters, no host sync. Unlike the reference,
the matmuls run in the tables' dtype (cuBLAS accumulates 16-bit inputs in fp32); ``h`` is
widened to float32 afterwards and narrowed back for the expand, so 16-bit results differ from
the reference by one rounding of ``h``. ``segments`` is ignored: the gather covers any routing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Group, LoRAKernels, Segments


class TorchKernels(LoRAKernels):
    name = "torch"

    def _shrink(
        self, x: Tensor, As: Group, token_slots: Tensor, rank: int, segments: Segments | None
    ) -> Tensor:
        xt = x.unsqueeze(2)  # [T, in, 1]
        hs = [
            torch.bmm(table[:, :rank].index_select(0, token_slots), xt).squeeze(2)  # [T, rank]
            for table in As
        ]
        return torch.cat(hs, dim=1).float()  # [T, G*rank]

    def _expand(
        self,
        h: Tensor,
        Bs: Group,
        token_slots: Tensor,
        rank: int,
        ys: Group,
        segments: Segments | None,
    ) -> None:
        for g, (table, y) in enumerate(zip(Bs, ys)):
            b = table[:, :rank].index_select(0, token_slots)  # [T, rank, out]
            hg = h[:, g * rank : (g + 1) * rank].to(b.dtype).unsqueeze(1)  # [T, 1, rank]
            y.add_(torch.bmm(hg, b).squeeze(1))  # slot-0 rows add B[0] = 0
