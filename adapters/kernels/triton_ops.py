"""Triton LoRA kernels: BGMV for decode, SGMV for prefill segments.

Semantics: the loop in ``loraserve.adapters.kernels`` (``reference.py``); the kernels compute
exactly that, with fp32 accumulation.

- ``_shrink_bgmv`` (decode; one program per (token, K split)): reads the token's slot, returns at
  once on slot 0, then walks its share of ``in`` in ``BLOCK_K`` chunks, loading each chunk of
  ``x`` once for every group member (q/k/v share it) and accumulating ``A[slot, :rank, chunk] @
  x[chunk]`` in fp32. Split-K: with ``split_k > 1`` each split writes its partial sums to its own
  plane of an fp32 buffer and a second pass sums the planes. Deterministic, unlike atomics (and
  interpreter-safe): a row's output must not depend on what shares its batch.
- ``_expand_bgmv`` (decode; one program per (token, BLOCK_N block of one member's output)):
  early exit on slot 0; ``y[t, block] += h[t, member] @ B[slot, :rank, block]`` in fp32,
  stored back in ``y``'s dtype.
- ``_shrink_sgmv`` / ``_expand_sgmv`` (prefill; given ``Segments``): one program per (segment,
  BLOCK_M block of its tokens[, BLOCK_N block]); the segment's slot is read once and the block
  is a ``tl.dot`` of a ``[BLOCK_M, K]`` x-tile with the slot's table (tensor cores on GPU).
  16-bit tables: the expand's ``h`` tile is rounded to the table's dtype for the dot; fp32
  tables use IEEE fp32 dots (no TF32), so fp32 results match the reference.

Masks cover shapes that are not multiples of the block sizes and ``rank < r_max`` (only the
first ``rank`` rows of a slot are read). Interpreter-safe subset (``TRITON_INTERPRET=1`` runs
these on CPU tensors in the tests): base pointers + strides + slot ids as tensors, never
pointers loaded from memory; so a group's tables are separate arguments, up to ``MAX_GROUP``
per launch (larger groups take several launches). The innermost dimension of ``x``, of ``h``
and of every table must be contiguous (they are: activations and slot-table buffers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import Group, LoRAKernels, Segments

MAX_GROUP = 3  # tables per launch: q/k/v


# tl.zeros and tl.sum are themselves @triton.jit functions of triton's standard library: when
# triton was imported before TRITON_INTERPRET was set (pytest's conftest imports transformers,
# which imports triton), they are compiled-mode functions the interpreter cannot call. These
# equivalents use builtins only, so they run in both modes and compile to the same code. The
# sum reduces with the standard library's own combine function where it has one, which the
# interpreter recognises and hands to numpy (a combine function of ours it would run element by
# element, ~100x slower).


@triton.jit
def _add(a, b):
    return a + b


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _sum(values, axis: tl.constexpr):
    return tl.reduce(values, axis, _SUM_COMBINE)


@triton.jit
def _zeros(shape: tl.constexpr, dtype: tl.constexpr):
    return tl.full(shape, 0.0, dtype)


@triton.jit
def _rows_dot_x(a_ptr, stride_r, offs_r, offs_k, r_mask, k_mask, xv):
    """``A[:rank, chunk] @ x[chunk]`` for one slot's rows: ``[BLOCK_R]`` fp32."""
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_r + offs_k[None, :],
        mask=r_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    return _sum(a.to(tl.float32) * xv[None, :], axis=1)


@triton.jit
def _shrink_bgmv(
    x_ptr, stride_xt,
    slots_ptr,
    out_ptr, stride_os, stride_ot,
    a0_ptr, a1_ptr, a2_ptr,
    stride_a0s, stride_a0r, stride_a1s, stride_a1r, stride_a2s, stride_a2r,
    K, rank, k_per_split,
    NUM_TABLES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot == 0:
        return  # the buffer is zeroed: slot-0 rows stay zero
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc0 = _zeros([BLOCK_R], dtype=tl.float32)
    acc1 = _zeros([BLOCK_R], dtype=tl.float32)
    acc2 = _zeros([BLOCK_R], dtype=tl.float32)
    a0 = a0_ptr + slot * stride_a0s
    a1 = a1_ptr + slot * stride_a1s
    a2 = a2_ptr + slot * stride_a2s
    k_lo = split * k_per_split
    for k in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xv = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc0 += _rows_dot_x(a0, stride_a0r, offs_r, offs_k, r_mask, k_mask, xv)
        if NUM_TABLES > 1:
            acc1 += _rows_dot_x(a1, stride_a1r, offs_r, offs_k, r_mask, k_mask, xv)
        if NUM_TABLES > 2:
            acc2 += _rows_dot_x(a2, stride_a2r, offs_r, offs_k, r_mask, k_mask, xv)
    out = out_ptr + split * stride_os + t * stride_ot + offs_r  # member g at columns g*rank
    tl.store(out, acc0, mask=r_mask)
    if NUM_TABLES > 1:
        tl.store(out + rank, acc1, mask=r_mask)
    if NUM_TABLES > 2:
        tl.store(out + 2 * rank, acc2, mask=r_mask)


@triton.jit
def _expand_block(h_row, b_slot, stride_br, y_row, stride_yn, n, block, rank,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``y[block] += h @ B[slot, :rank, block]`` for one token and one member."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < n
    hv = tl.load(h_row + offs_r, mask=r_mask, other=0.0)
    b = tl.load(
        b_slot + offs_r[:, None] * stride_br + offs_n[None, :],
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    delta = _sum(hv[:, None] * b.to(tl.float32), axis=0)
    y = tl.load(y_row + offs_n * stride_yn, mask=n_mask, other=0.0)
    tl.store(y_row + offs_n * stride_yn, (y.to(tl.float32) + delta).to(y.dtype), mask=n_mask)


@triton.jit
def _expand_bgmv(
    h_ptr, stride_ht,
    slots_ptr, rank,
    b0_ptr, b1_ptr, b2_ptr,
    stride_b0s, stride_b0r, stride_b1s, stride_b1r, stride_b2s, stride_b2r,
    y0_ptr, y1_ptr, y2_ptr,
    stride_y0t, stride_y0n, stride_y1t, stride_y1n, stride_y2t, stride_y2n,
    n0, n1, n2, blocks0, blocks1,
    NUM_TABLES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    block = tl.program_id(1)  # blocks of member 0, then member 1's, then member 2's
    slot = tl.load(slots_ptr + t)
    if slot == 0:
        return
    h_row = h_ptr + t * stride_ht
    if block < blocks0:
        _expand_block(h_row, b0_ptr + slot * stride_b0s, stride_b0r,
                      y0_ptr + t * stride_y0t, stride_y0n, n0, block, rank,
                      BLOCK_R, BLOCK_N)  # fmt: skip
    else:
        if NUM_TABLES > 1:
            if block < blocks0 + blocks1:
                _expand_block(h_row + rank, b1_ptr + slot * stride_b1s, stride_b1r,
                              y1_ptr + t * stride_y1t, stride_y1n, n1, block - blocks0, rank,
                              BLOCK_R, BLOCK_N)  # fmt: skip
            else:
                if NUM_TABLES > 2:
                    _expand_block(h_row + 2 * rank, b2_ptr + slot * stride_b2s, stride_b2r,
                                  y2_ptr + t * stride_y2t, stride_y2n, n2,
                                  block - blocks0 - blocks1, rank,
                                  BLOCK_R, BLOCK_N)  # fmt: skip


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile_dot_table(x_tile, a_slot, stride_r, offs_r, offs_k, r_mask, k_mask, FP32: tl.constexpr):
    """``x_tile [BLOCK_M, BLOCK_K] @ A[slot, :rank, chunk]^T`` -> ``[BLOCK_M, BLOCK_R]`` fp32."""
    a = tl.load(
        a_slot + offs_r[None, :] * stride_r + offs_k[:, None],  # [BLOCK_K, BLOCK_R]
        mask=k_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    return _dot(x_tile, a, FP32)


@triton.jit
def _shrink_sgmv(
    x_ptr, stride_xt,
    starts_ptr, seg_slots_ptr,
    h_ptr, stride_ht,
    a0_ptr, a1_ptr, a2_ptr,
    stride_a0s, stride_a0r, stride_a1s, stride_a1r, stride_a2s, stride_a2r,
    K, rank,
    NUM_TABLES: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m_block = tl.program_id(1)
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    first = start + m_block * BLOCK_M
    if (slot == 0) | (first >= end):
        return  # base-model segment, or past this segment's last token
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc0 = _zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc1 = _zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc2 = _zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    a0 = a0_ptr + slot * stride_a0s
    a1 = a1_ptr + slot * stride_a1s
    a2 = a2_ptr + slot * stride_a2s
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc0 += _tile_dot_table(x_tile, a0, stride_a0r, offs_r, offs_k, r_mask, k_mask, FP32)
        if NUM_TABLES > 1:
            acc1 += _tile_dot_table(x_tile, a1, stride_a1r, offs_r, offs_k, r_mask, k_mask, FP32)
        if NUM_TABLES > 2:
            acc2 += _tile_dot_table(x_tile, a2, stride_a2r, offs_r, offs_k, r_mask, k_mask, FP32)
    out = h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    tl.store(out, acc0, mask=mask)
    if NUM_TABLES > 1:
        tl.store(out + rank, acc1, mask=mask)
    if NUM_TABLES > 2:
        tl.store(out + 2 * rank, acc2, mask=mask)


@triton.jit
def _expand_tile(h_ptr, stride_ht, offs_m, m_mask, b_slot, stride_br, y_ptr, stride_yt,
                 stride_yn, n, block, rank, FP32: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``y[rows, block] += h[rows, member] @ B[slot, :rank, block]`` for one token block."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < n
    h = tl.load(
        h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :],
        mask=m_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    b = tl.load(
        b_slot + offs_r[:, None] * stride_br + offs_n[None, :],
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    delta = _dot(h.to(b.dtype), b, FP32)  # [BLOCK_M, BLOCK_N] fp32
    y_at = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_at, mask=mask, other=0.0)
    tl.store(y_at, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@triton.jit
def _expand_sgmv(
    h_ptr, stride_ht,
    starts_ptr, seg_slots_ptr, rank,
    b0_ptr, b1_ptr, b2_ptr,
    stride_b0s, stride_b0r, stride_b1s, stride_b1r, stride_b2s, stride_b2r,
    y0_ptr, y1_ptr, y2_ptr,
    stride_y0t, stride_y0n, stride_y1t, stride_y1n, stride_y2t, stride_y2n,
    n0, n1, n2, blocks0, blocks1,
    NUM_TABLES: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m_block = tl.program_id(1)
    block = tl.program_id(2)  # blocks of member 0, then member 1's, then member 2's
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    first = start + m_block * BLOCK_M
    if (slot == 0) | (first >= end):
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    if block < blocks0:
        _expand_tile(h_ptr, stride_ht, offs_m, m_mask, b0_ptr + slot * stride_b0s, stride_b0r,
                     y0_ptr, stride_y0t, stride_y0n, n0, block, rank,
                     FP32, BLOCK_R, BLOCK_N)  # fmt: skip
    else:
        if NUM_TABLES > 1:
            if block < blocks0 + blocks1:
                _expand_tile(h_ptr + rank, stride_ht, offs_m, m_mask,
                             b1_ptr + slot * stride_b1s, stride_b1r,
                             y1_ptr, stride_y1t, stride_y1n, n1, block - blocks0, rank,
                             FP32, BLOCK_R, BLOCK_N)  # fmt: skip
            else:
                if NUM_TABLES > 2:
                    _expand_tile(h_ptr + 2 * rank, stride_ht, offs_m, m_mask,
                                 b2_ptr + slot * stride_b2s, stride_b2r,
                                 y2_ptr, stride_y2t, stride_y2n, n2,
                                 block - blocks0 - blocks1, rank,
                                 FP32, BLOCK_R, BLOCK_N)  # fmt: skip


class TritonKernels(LoRAKernels):
    """BGMV (decode) and SGMV (prefill, when given ``Segments``) Triton kernels.

    Block sizes are constructor arguments so tests can force several blocks on small shapes.
    ``split_k=None`` picks the split of ``in`` for the decode shrink from the batch size: few
    tokens need more programs per token to fill the device.
    """

    name = "triton"

    def __init__(
        self,
        block_k: int = 64,
        block_n: int = 64,
        block_m: int = 16,
        split_k: int | None = None,
        target_programs: int = 256,
    ):
        for name, block in (("block_k", block_k), ("block_n", block_n), ("block_m", block_m)):
            if block < 16 or block & (block - 1):
                raise ValueError(f"{name}={block}: blocks are powers of two >= 16 (tl.dot)")
        self.block_k, self.block_n, self.block_m = block_k, block_n, block_m
        self.split_k = split_k
        self.target_programs = target_programs

    # ----------------------------------------------------------------------------------------
    # shrink

    def _shrink(
        self, x: Tensor, As: Group, token_slots: Tensor, rank: int, segments: Segments | None
    ) -> Tensor:
        x = _inner_contiguous(x)
        As = tuple(_inner_contiguous(a) for a in As)
        T, K = x.shape
        block_r = _block_r(rank)
        if T == 0 or (segments is not None and segments.max_len == 0):
            return torch.zeros(T, len(As) * rank, dtype=torch.float32, device=x.device)
        if segments is not None:
            h = torch.zeros(T, len(As) * rank, dtype=torch.float32, device=x.device)
            for c in range(0, len(As), MAX_GROUP):
                chunk = As[c : c + MAX_GROUP]
                a, sa = _pad3(chunk), _strides3(chunk)
                grid = (segments.slots.shape[0], triton.cdiv(segments.max_len, self.block_m))
                _shrink_sgmv[grid](
                    x, x.stride(0), segments.starts, segments.slots,
                    h[:, c * rank :], h.stride(0), *a, *sa, K, rank,
                    NUM_TABLES=len(chunk), FP32=x.dtype == torch.float32,
                    BLOCK_M=self.block_m, BLOCK_R=block_r, BLOCK_K=self.block_k,
                )  # fmt: skip
            return h
        split = self._split_k(T, K)
        k_per_split = triton.cdiv(triton.cdiv(K, split), self.block_k) * self.block_k
        split = triton.cdiv(K, k_per_split)  # no empty splits
        # [split, T, G*rank]: each split's partial sums; zeroed because slot-0 rows exit early
        part = torch.zeros(split, T, len(As) * rank, dtype=torch.float32, device=x.device)
        for c in range(0, len(As), MAX_GROUP):
            chunk = As[c : c + MAX_GROUP]
            a, sa = _pad3(chunk), _strides3(chunk)
            out = part[:, :, c * rank :]
            _shrink_bgmv[(T, split)](
                x, x.stride(0), token_slots, out, out.stride(0), out.stride(1),
                *a, *sa, K, rank, k_per_split,
                NUM_TABLES=len(chunk), BLOCK_R=block_r, BLOCK_K=self.block_k,
            )  # fmt: skip
        return part[0] if split == 1 else part.sum(0)  # the second (reduction) pass

    def _split_k(self, T: int, K: int) -> int:
        if self.split_k is not None:
            return max(1, min(self.split_k, triton.cdiv(K, self.block_k)))
        # enough programs to fill the device, but at least 4 chunks of K per split
        want = triton.cdiv(self.target_programs, max(T, 1))
        return max(1, min(want, triton.cdiv(K, 4 * self.block_k)))

    # ----------------------------------------------------------------------------------------
    # expand

    def _expand(
        self,
        h: Tensor,
        Bs: Group,
        token_slots: Tensor,
        rank: int,
        ys: Group,
        segments: Segments | None,
    ) -> None:
        h = _inner_contiguous(h)
        Bs = tuple(_inner_contiguous(b) for b in Bs)
        T = h.shape[0]
        if T == 0 or (segments is not None and segments.max_len == 0):
            return
        block_r = _block_r(rank)
        for c in range(0, len(Bs), MAX_GROUP):
            tables, outs = Bs[c : c + MAX_GROUP], ys[c : c + MAX_GROUP]
            b, sb = _pad3(tables), _strides3(tables)
            y = _pad3(outs)
            sy = [s for out in (*outs, outs[0], outs[0])[:MAX_GROUP] for s in out.stride()]
            n = [out.shape[1] for out in (*outs, outs[0], outs[0])[:MAX_GROUP]]
            blocks = [triton.cdiv(width, self.block_n) for width in n[: len(outs)]]
            blocks += [0] * (MAX_GROUP - len(blocks))
            hc = h[:, c * rank :]
            if segments is not None:
                grid = (
                    segments.slots.shape[0],
                    triton.cdiv(segments.max_len, self.block_m),
                    sum(blocks),
                )
                _expand_sgmv[grid](
                    hc, h.stride(0), segments.starts, segments.slots, rank,
                    *b, *sb, *y, *sy, *n, blocks[0], blocks[1],
                    NUM_TABLES=len(tables), FP32=tables[0].dtype == torch.float32,
                    BLOCK_M=self.block_m, BLOCK_R=block_r, BLOCK_N=self.block_n,
                )  # fmt: skip
            else:
                _expand_bgmv[(T, sum(blocks))](
                    hc, h.stride(0), token_slots, rank,
                    *b, *sb, *y, *sy, *n, blocks[0], blocks[1],
                    NUM_TABLES=len(tables), BLOCK_R=block_r, BLOCK_N=self.block_n,
                )  # fmt: skip


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot wants every dimension >= 16


def _inner_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad3(group: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Exactly MAX_GROUP tensors: unused arguments repeat the first (never read)."""
    return (*group, *(group[0],) * (MAX_GROUP - len(group)))


def _strides3(tables: tuple[Tensor, ...]) -> list[int]:
    """(slot stride, rank stride) per table, padded like ``_pad3``."""
    return [s for table in _pad3(tables) for s in table.stride()[:2]]
