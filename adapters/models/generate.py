"""Greedy generation with the KV cache, for offline use: the trainer's exact-match evaluation
and the demo recipe. (The server's engine schedules its own batches; it does not use this.)

The model never samples; this module takes the argmax of its logits. It reads as the loop it is:

    logits = prefill(model, prompts, lengths, cache)           # [B, V], each prompt's last token
    for t in range(max_new_tokens):
        tokens = logits.argmax(-1)                             # [B]; rows that hit EOS stop
        logits = decode_one_token(model, tokens, lengths + t, cache)

Prompts of different lengths share one batch: they are right-padded, and padding gets positions
after its row's real tokens (the cache's contract, see ``loraserve.adapters.models.attention``), so
every
row decodes exactly as it would alone. The caller chooses train/eval mode and autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from loraserve.adapters.models import KVCache
from torch import Tensor, nn


def prefill(model: nn.Module, ids: Tensor, lengths: Tensor, cache: KVCache) -> Tensor:
    """Write the prompts ``ids: [B, P]`` (right-padded, ``lengths: [B]`` real tokens) into
    ``cache``; returns the logits at each row's last real token, [B, V]."""
    B, P = ids.shape
    positions = torch.arange(P, device=ids.device).expand(B, P)
    return model(ids, positions, cache, logits_at=lengths - 1)


def decode_one_token(model: nn.Module, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """One token per row, ``tokens: [B]`` at ``positions: [B]``; the next logits, [B, V]."""
    return model(tokens[:, None], positions[:, None], cache)[:, -1]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_id: int = 0,
    kv_cache: KVCache | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, batched; a row stops at EOS (not returned), after
    ``max_new_tokens`` or at the end of the cache.

    ``kv_cache``: rows ``0..B-1`` are used and must hold zeros beyond what this call writes
    (a fresh cache, or rows cleared with ``clear_row``); by default one is made for
    ``min(longest prompt + max_new_tokens, max_position_embeddings)`` positions.
    """
    param = next(model.parameters())
    B, lengths = len(prompt_ids), torch.tensor([len(p) for p in prompt_ids], device=param.device)
    P = int(lengths.max())
    if kv_cache is None:
        max_seq = min(P + max_new_tokens, model.config.max_position_embeddings)
        kv_cache = KVCache(model.config, B, max_seq, param.device, param.dtype)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for b, prompt in enumerate(prompt_ids):
        ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    logits = prefill(model, ids.to(param.device), lengths, kv_cache)
    eos = set(eos_token_ids)
    out, done = [[] for _ in range(B)], [False] * B
    for t in range(max_new_tokens):
        tokens = logits.argmax(-1)  # [B]
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                done[b] = token in eos
                if not done[b]:
                    out[b].append(token)
        if all(done) or t == max_new_tokens - 1 or P + t >= kv_cache.max_seq:
            break
        logits = decode_one_token(model, tokens, lengths + t, kv_cache)
    return out
