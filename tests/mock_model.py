"""A model with no weights for engine tests (nanochat's habit): fast and fully predictable.

Its next token after token ``t`` is ``(t + 1) % vocab`` (greedy), so a prompt ending in ``t``
generates ``t+1, t+2, ...``. It records every forward so tests can check what the engine batched.
Tokens decode to letters: id ``i`` is ``chr(ord("a") + i % 26)``; ids >= ``EOS`` are special.
"""

from __future__ import annotations

import torch

VOCAB = 40
EOS = 39


class MockModel(torch.nn.Module):
    def __init__(self, vocab: int = VOCAB, delay: float = 0.0):
        super().__init__()
        self.vocab = vocab
        self.calls: list[dict] = []
        self.delay = delay
        self.fail_on_token: int | None = None

    def forward(
        self, input_ids, positions=None, kv_cache=None, cache_rows=None, logits_at=None, kv_len=None
    ):
        if self.delay:
            import time

            time.sleep(self.delay)
        B, S = input_ids.shape
        self.calls.append(
            {
                "shape": (B, S),
                "rows": list(range(B)) if cache_rows is None else cache_rows.tolist(),
                "positions": positions.tolist(),
            }
        )
        last = input_ids[torch.arange(B), logits_at]
        if self.fail_on_token is not None and (last == self.fail_on_token).any():
            raise RuntimeError("boom")
        logits = torch.zeros(B, self.vocab)
        logits[torch.arange(B), (last + 1) % self.vocab] = 10.0
        # per-row wobble so sampling with temperature has something to choose among; a function
        # of the row's own token and position only, as a real model's logits are
        pos = positions[torch.arange(B), logits_at].float()
        v = torch.arange(self.vocab).float()
        return logits + 3 * torch.sin(v[None, :] * (last.float()[:, None] + 1.3) + pos[:, None])


class MockTokenizer:
    vocab_size = VOCAB
    eos_token_ids = (EOS,)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if i < EOS)

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]
