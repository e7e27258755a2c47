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

from . import Outputs, Segments, Tables, as_group, check_expand, check_shrink


class TorchKernels:
    name = "torch"

    def shrink(
        self,
        x: Tensor,
        A: Tables,
        token_slots: Tensor,
        rank: int,
        segments: Segments | None = None,
    ) -> Tensor:
        As = as_group(A)
        check_shrink(x, As, token_slots, rank)
        xt = x.unsqueeze(2)  # [T, in, 1]
        hs = [
            torch.bmm(table[:, :rank].index_select(0, token_slots), xt).squeeze(2)  # [T, rank]
            for table in As
        ]
        return torch.cat(hs, dim=1).float()  # [T, G*rank]

    def expand(
        self,
        h: Tensor,
        B: Tables,
        token_slots: Tensor,
        rank: int,
        outputs: Outputs,
        segments: Segments | None = None,
    ) -> None:
        Bs, ys = as_group(B), as_group(outputs)
        check_expand(h, Bs, token_slots, rank, ys)
        for g, (table, y) in enumerate(zip(Bs, ys)):
            b = table[:, :rank].index_select(0, token_slots)  # [T, rank, out]
            hg = h[:, g * rank : (g + 1) * rank].to(b.dtype).unsqueeze(1)  # [T, 1, rank]
            y.add_(torch.bmm(hg, b).squeeze(1))  # slot-0 rows add B[0] = 0
