"""Turning logits into tokens. The model never samples; the engine calls ``sample`` once per step.

Semantics per row (the order matters and matches vLLM/HF): temperature 0 means greedy argmax;
otherwise divide by temperature, keep the top-k logits (k > 0), keep the smallest set of tokens
whose probability mass reaches top-p, and draw from what is left with the row's own generator,
so a request with a seed gives the same tokens whatever else shares its batch.

Isolation: a row fails alone. A row whose logits are not all finite (a broken adapter) or whose
draw fails gets a ``ServingError`` in place of its token; every other row is sampled as usual.
Temperatures in (0, ``MIN_TEMPERATURE``) or infinite are refused when the request is validated:
``logits / 1e-45`` is infinite and cannot be sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from loraserve.server.errors import NonFiniteLogits, ServingError
from torch import Tensor

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MIN_TEMPERATURE = 1e-5  # below it, logits / temperature may overflow; 0 is greedy


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """One CPU generator per request (None for greedy): same seed, same draws."""
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def sample(
    logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[int | ServingError]:
    """``logits: [B, V]`` -> one token id per row, or the error that fails that row alone."""
    logits = logits.float()
    # one read-back for the argmax and the finiteness of every row
    greedy, finite = torch.stack(
        [logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1).long()]
    ).tolist()
    if not all(p.greedy for p in params):
        logits = logits.cpu()
    out: list[int | ServingError] = []
    for i, (p, g) in enumerate(zip(params, gens)):
        if not finite[i]:
            out.append(NonFiniteLogits())
        elif p.greedy:
            out.append(greedy[i])
        else:
            try:
                out.append(_sample_row(logits[i], p, g))
            except RuntimeError as err:  # e.g. probabilities multinomial refuses
                out.append(ServingError(f"sampling failed: {err}"))
    return out


def _sample_row(logits: Tensor, p: SamplingParams, g: torch.Generator) -> int:
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))
