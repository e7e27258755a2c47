"""Causal attention, with or without the static KV cache the engine drives.

Contract for the engine:
- `KVCache(config, max_batch, max_seq, device, dtype)` preallocates, per layer, k and v of shape
  [max_batch, num_kv_heads, max_seq, head_dim]. A sequence owns one row (slot) of it for its
  whole life; the engine chooses the row and passes it as `cache_rows`.
- A forward with a cache first writes each token's k, v at cache[row, :, position], then a query
  at position p attends to cache[row, :, 0..p] and nothing else. Therefore:
  * a sequence's positions must cover 0..n-1 (prefill at once or in chunks, then one token per
    decode step); each query reads entries 0..p, all written by this sequence;
  * padding tokens in a ragged (right-padded) batch must get positions after their row's real
    tokens and < max_seq (just keep counting). Their junk lies beyond every real query's
    position and the real token that later takes that position overwrites it before any read;
  * positions inside one row of one call must be distinct (the write is a scatter);
  * stale entries are masked, but a masked entry still reaches the output if it is not finite
    (`0 * NaN = NaN` in `softmax(...) @ V`). So the owner of a row clears what it wrote when it
    gives the row back (`clear_row`): a row handed to a new sequence holds only zeros beyond
    what that sequence writes itself, whatever the previous one left there.
- The read window kv_len (largest position + 1) is passed in by the engine, which knows it on
  the host; a caller that does not pass it pays one read-back of `positions.max()` per forward.
- With `cache_rows=None` rows 0..B-1 are read as views (no gather).
- `KVCache.decode_kernel`: what computes attention for one query per row on CPU (a decode
  step), `decode_attention` below unless the runtime sets the native op
  (`loraserve.adapters.kernels.cpu.decode_attention`, float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        max_batch: int,
        max_seq: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        learned = config.spec.layout.positions == "learned"
        if learned and max_seq > config.max_position_embeddings:
            # learned position embeddings: a position past the table is a CUDA device assert
            raise ValueError(
                f"max_seq={max_seq} > max_position_embeddings={config.max_position_embeddings}"
            )
        self.max_batch, self.max_seq, self.dtype = max_batch, max_seq, dtype
        # One column past every real position: the padded rows of a static decode step write
        # their k/v there, and no real query ever reads it (its positions are < max_seq).
        self.scratch = max_seq
        shape = (max_batch, config.num_kv_heads, max_seq + 1, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.decode_kernel: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = decode_attention

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def clear_row(self, row: int, upto: int) -> None:
        """Zero positions ``[0, upto)`` of ``row`` in every layer (a sequence gives it back)."""
        upto = min(upto, self.max_seq)
        if upto <= 0:
            return
        for t in (*self.k, *self.v):
            t[row, :, :upto].zero_()

    def move_row(self, src: int, dst: int, upto: int) -> None:
        """Move positions ``[0, upto)`` of row ``src`` to the (cleared) row ``dst`` and clear
        them in ``src``: the engine keeps its running sequences on rows 0..n-1 this way."""
        upto = min(upto, self.max_seq)
        if upto <= 0 or src == dst:
            return
        for t in (*self.k, *self.v):
            t[dst, :, :upto].copy_(t[src, :, :upto])
            t[src, :, :upto].zero_()

    def step(
        self,
        positions: Tensor,
        rows: Tensor | None = None,
        kv_len: int | None = None,
        write_at: Tensor | None = None,
    ) -> CacheStep:
        """The view of this cache one forward uses. positions: Long[B, S]; rows: Long[B].

        ``kv_len`` (the largest position + 1) is known to the engine on the host; without it it
        is read back from ``positions``, a device sync. ``write_at`` (default ``positions``):
        where each token's k/v are written; a static step's padded rows write at
        ``self.scratch``."""
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        if kv_len > self.max_seq:
            raise ValueError(f"position {kv_len - 1} does not fit a KV cache of {self.max_seq}")
        key_pos = torch.arange(kv_len, device=positions.device)
        mask = key_pos <= positions[:, None, :, None]  # [B, 1, S, kv_len]
        write_at = positions if write_at is None else write_at
        return CacheStep(self, rows, write_at, mask)


@dataclass
class CacheStep:
    cache: KVCache
    rows: Tensor | None  # [B] cache rows, or None for rows 0..B-1
    write_at: Tensor  # [B, S] where each token's k/v go
    mask: Tensor  # bool [B, 1, S, kv_len], True where key_pos <= query_pos

    def layer(self, i: int) -> LayerKV:
        cache = self.cache
        return LayerKV(
            cache.k[i], cache.v[i], self.rows, self.write_at, self.mask, cache.decode_kernel
        )


@dataclass
class LayerKV:
    """One layer's share of a ``CacheStep``: plain tensors (no layer index, no cache object)
    and the cache's decode kernel, so a compiled block sees the same kind of input at every
    layer."""

    k: Tensor  # [rows, Hkv, max_seq + 1, D]: the layer's whole cache
    v: Tensor
    rows: Tensor | None
    write_at: Tensor
    mask: Tensor
    decode_kernel: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # KVCache.decode_kernel

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v: [B, Hkv, S, D]; return this batch's [B, Hkv, kv_len, D] to attend."""
        B, kv_len = k.shape[0], self.mask.shape[-1]
        rows = self.rows if self.rows is not None else torch.arange(B, device=k.device)
        index = (rows[:, None], slice(None), self.write_at)  # selects [B, S, Hkv, D]
        self.k[index] = k.transpose(1, 2).to(self.k.dtype)
        self.v[index] = v.transpose(1, 2).to(self.v.dtype)
        if self.rows is None:
            return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]
        return self.k[self.rows, :, :kv_len], self.v[self.rows, :, :kv_len]


def attention(q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None) -> Tensor:
    """q: [B, H, S, D], k, v: [B, Hkv, S, D] -> [B, H, S, D]; scale 1/sqrt(D) as in HF."""
    if kv is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k, v = kv.update(k, v)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if q.shape[2] == 1 and q.device.type == "cpu":
        return kv.decode_kernel(q, k, v, kv.mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kv.mask, enable_gqa=True)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query per row: ``softmax(q k^T / sqrt(D), masked) v`` as two batched products.

    q: [B, H, 1, D]; k, v: [B, Hkv, T, D]; mask: bool [B, 1, 1, T]. The query heads that share
    a KV head are stacked as rows of one product (head h reads KV head h // (H / Hkv), HF's
    repeat_kv order), so nothing is repeated in memory. On CPU PyTorch's fused SDPA kernel
    spends ~1 ms per call on this shape (blocking for long queries); the products take
    microseconds, and inductor fuses the mask and softmax around them."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (D**-0.5)  # [B, Hkv, G, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, D)
