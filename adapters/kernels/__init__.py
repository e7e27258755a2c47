"""LoRA compute kernels: how a batch's adapter delta is computed from the slot tables.

Storage and compute are separate (DESIGN, "The LoRA math"): a batched layer owns slot tables,
and a ``LoRAKernels`` implementation, chosen once at start-up, computes with them. Two ops:

- ``shrink``: ``h = x @ A[slot]^T`` for every token, for one table or a *group* of tables that
  share one input (q/k/v read the same ``x``; so do gate/up), in one call;
- ``expand``: ``y += h @ B[slot]`` for every token, in place, one output per group member.

Tables (per layer, as ``BatchedLoRALinear`` stores them)::

    A: [S+1, r_max, in]    stored transposed, so the first ``rank`` rows of a slot are one block
    B: [S+1, r_max, out]   the adapter's scale is already folded in
    slot 0 is all zeros and means "base model only"

Semantics (``reference.py`` is exactly this loop; every implementation is tested against it)::

    # shrink(x [T, in], As (G tables), token_slots [T], rank) -> h [T, G*rank] float32
    h = zeros(T, G * rank, float32)
    for t in range(T):
        s = token_slots[t]
        if s == 0:
            continue                                # rows on slot 0 stay zero
        for g, A in enumerate(As):
            h[t, g*rank:(g+1)*rank] = A[s, :rank].float() @ x[t].float()

    # expand(h, Bs (G tables), token_slots, rank, ys (G outputs [T, out_g])) -> None
    for t in range(T):
        s = token_slots[t]
        if s == 0:
            continue                                # y untouched: the base model
        for g, (B, y) in enumerate(zip(Bs, ys)):
            y[t] = (y[t].float() + h[t, g*rank:(g+1)*rank] @ B[s, :rank].float()).to(y.dtype)

``h`` is float32 whatever ``x``'s dtype: the rank-r intermediate is tiny and rounding it to 16
bits would throw away the fp32 accumulation of the shrink. ``rank`` is a host int, the largest
rank in use this step (the rest of each table is zero padding, so it need not be read); it must
not exceed any table's ``r_max``. ``x``, the tables and the outputs share one dtype and device;
``token_slots`` is a long tensor on that device.

Host-built routing: nothing here reads a device value back (except the reference, which is the
semantics, not a fast path), so a step that calls these ops can be captured as a CUDA graph.
For prefill, the engine may also pass ``Segments`` (tokens of one slot contiguous, with segment
starts built on the host): the Triton implementation then runs SGMV-style kernels (one program
per segment block), the others ignore it. ``Segments`` must describe the same routing as
``token_slots``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

Tables = Tensor | tuple[Tensor, ...]  # one slot table, or a group that shares one input
Outputs = Tensor | tuple[Tensor, ...]
Group = tuple[Tensor, ...]  # tables (or outputs) after grouping: what implementations see

KERNELS = ("reference", "torch", "triton")


class KernelUnavailable(RuntimeError):
    """The chosen kernel implementation cannot run here (Triton missing, device unsupported)."""


@dataclass(frozen=True)
class Segments:
    """Prefill routing for SGMV kernels: tokens ``starts[i]:starts[i+1]`` all use ``slots[i]``.

    Built by the engine on the host (a prefill row is one sequence on one slot, so its tokens are
    already contiguous: no sort needed). ``max_len`` is a host int, the longest segment, so the
    launch grid is sized without reading a device value back.
    """

    starts: Tensor  # [n+1] long, on the device; starts[0] == 0, starts[n] == T
    slots: Tensor  # [n] long, on the device
    max_len: int

    @classmethod
    def from_rows(cls, row_slots: list[int], row_lens: list[int], device=None) -> Segments:
        """One segment per row: row ``i`` holds ``row_lens[i]`` tokens on ``row_slots[i]``."""
        starts = [0]
        for n in row_lens:
            starts.append(starts[-1] + n)
        return cls(
            starts=torch.tensor(starts, dtype=torch.long, device=device),
            slots=torch.tensor(row_slots, dtype=torch.long, device=device),
            max_len=max(row_lens, default=0),
        )


class LoRAKernels(ABC):
    """Shrink and expand over slot tables; see the module docstring for the semantics.

    The public ops group the tables and check the shapes once for every implementation, which
    only defines ``_shrink(x, As, token_slots, rank, segments)`` and ``_expand(h, Bs,
    token_slots, rank, ys, segments)`` on the grouped, checked arguments.
    """

    name: str

    def shrink(
        self,
        x: Tensor,
        A: Tables,
        token_slots: Tensor,
        rank: int,
        segments: Segments | None = None,
    ) -> Tensor:
        """``x [T, in]`` through each table of ``A`` -> ``h [T, len(A) * rank]`` float32."""
        As = as_group(A)
        check_shrink(x, As, token_slots, rank)
        return self._shrink(x, As, token_slots, rank, segments)

    def expand(
        self,
        h: Tensor,
        B: Tables,
        token_slots: Tensor,
        rank: int,
        outputs: Outputs,
        segments: Segments | None = None,
    ) -> None:
        """Add ``h[:, g*rank:(g+1)*rank] @ B_g[slot, :rank]`` into ``outputs[g]`` in place."""
        Bs, ys = as_group(B), as_group(outputs)
        check_expand(h, Bs, token_slots, rank, ys)
        self._expand(h, Bs, token_slots, rank, ys, segments)

    @abstractmethod
    def _shrink(self, x, As, token_slots, rank, segments) -> Tensor:
        """``h [T, len(As) * rank]`` float32 for grouped, checked arguments."""

    @abstractmethod
    def _expand(self, h, Bs, token_slots, rank, ys, segments) -> None:
        """Add each group member's ``h`` slice times its ``B`` into its output, in place."""


def make_kernels(name: str, device: torch.device | str | None = None) -> LoRAKernels:
    """The implementation called ``name`` for tensors on ``device``; chosen once at start-up.

    ``"reference"``: the loop (slow; the semantics). ``"torch"``: gather + bmm, any device.
    ``"triton"``: BGMV/SGMV Triton kernels on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (the
    interpreter, for tests). Raises ``KernelUnavailable`` when Triton cannot run here.
    """
    if name == "reference":
        from .reference import ReferenceKernels

        return ReferenceKernels()
    if name == "torch":
        from .torch_ops import TorchKernels

        return TorchKernels()
    if name == "triton":
        check_triton(device)
        from .triton_ops import TritonKernels

        return TritonKernels()
    raise ValueError(f"unknown LoRA kernels {name!r}; choose from {KERNELS}")


def check_triton(device: torch.device | str | None = None) -> None:
    """Raise ``KernelUnavailable`` unless Triton kernels can run on ``device``."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise KernelUnavailable(
            "LoRA kernels 'triton' need the triton package (pip install triton); "
            "use 'torch' instead"
        ) from e
    kind = torch.device(device).type if device is not None else None
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise KernelUnavailable("LoRA kernels 'triton': no CUDA device is available")
        return
    # The interpreter runs kernels on CPU tensors; triton decides at decoration time, so the
    # variable must be set before triton_ops is first imported (tests do so).
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise KernelUnavailable(
        f"LoRA kernels 'triton' do not run on device {kind!r}: they need CUDA "
        "(on CPU only under TRITON_INTERPRET=1, for tests); use 'torch' instead"
    )


def as_group(tables: Tables) -> tuple[Tensor, ...]:
    return (tables,) if isinstance(tables, Tensor) else tuple(tables)


def check_shrink(x: Tensor, As: tuple[Tensor, ...], token_slots: Tensor, rank: int) -> None:
    """Shape checks only (host attributes: no device sync)."""
    if x.dim() != 2 or token_slots.shape != (x.shape[0],):
        raise ValueError(
            f"shrink wants x [T, in] and token_slots [T]; got {tuple(x.shape)}, "
            f"{tuple(token_slots.shape)}"
        )
    for A in As:
        if A.dim() != 3 or A.shape[2] != x.shape[1]:
            raise ValueError(f"table A{tuple(A.shape)} does not fit x{tuple(x.shape)}")
        if not 1 <= rank <= A.shape[1]:
            raise ValueError(f"rank {rank} outside 1..{A.shape[1]} (the table's max rank)")


def check_expand(
    h: Tensor, Bs: tuple[Tensor, ...], token_slots: Tensor, rank: int, ys: tuple[Tensor, ...]
) -> None:
    if len(Bs) != len(ys):
        raise ValueError(f"{len(Bs)} B tables but {len(ys)} outputs")
    T = token_slots.shape[0]
    if h.shape != (T, len(Bs) * rank):
        raise ValueError(f"h{tuple(h.shape)} is not [T={T}, {len(Bs)} * rank={rank}]")
    for B, y in zip(Bs, ys):
        if B.dim() != 3 or y.shape != (T, B.shape[2]):
            raise ValueError(f"table B{tuple(B.shape)} does not fit output y{tuple(y.shape)}")
        if not 1 <= rank <= B.shape[1]:
            raise ValueError(f"rank {rank} outside 1..{B.shape[1]} (the table's max rank)")
