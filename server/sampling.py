"""Turning logits into tokens. The model never samples; the engine calls ``sample`` once per step.

Semantics per row (the order matters and matches vLLM/HF): temperature 0 means greedy argmax;
otherwise divide by temperature, keep the top-k logits (k > 0), keep the smallest set of tokens
whose probability mass reaches top-p, and draw from what is left with the row's own generator,
so a request with a seed gives the same tokens whatever else shares its batch.

Log-probabilities (``logprobs`` = k >= 0): the chosen token's log-probability and the k most
likely tokens', under the distribution the token was drawn from: for a sampled row the one
after temperature, top-k and top-p (tokens they removed are left out of the alternatives); for
a greedy row the model's own ``log_softmax(logits)``. Computed in float32 from the same tensor
the draw uses.

Isolation: a row fails alone. A row whose logits hold a NaN or +inf, or nothing finite (a
broken adapter), or whose draw fails, gets a ``ServingError`` in place of its token; every other
row is sampled as usual. (-inf is what a structured-output mask writes over disallowed tokens.)
Temperatures in (0, ``MIN_TEMPERATURE``) or infinite are refused when the request is validated:
``logits / 1e-45`` is infinite and cannot be sampled from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from loraserve.server.errors import NonFiniteLogits, ServingError
from loraserve.server.grammar import Constraint
from torch import Tensor

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MIN_TEMPERATURE = 1e-5  # below it, logits / temperature may overflow; 0 is greedy
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None  # None: off; k: the chosen token's and the k likeliest
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    constraint: Constraint | None = None  # structured output (``loraserve.server.grammar``)

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


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the ``top`` alternatives (id, logprob), likeliest first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def torch_row_max(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's largest logit and its first index (NaN, and its index, where a row has
    one): ``torch.max(logits, dim=-1)``."""
    return logits.max(dim=-1)


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    gens: list[torch.Generator | None],
    row_max: Callable[[Tensor], tuple[Tensor, Tensor]] = torch_row_max,
) -> tuple[list[int | ServingError], list[TokenLogprob | None]]:
    """``logits: [B, V]`` -> one token id per row, or the error that fails that row alone; and
    per row its ``TokenLogprob`` when ``params.logprobs`` asks for one (None otherwise).
    ``row_max``: ``torch_row_max``, or the native CPU op with its semantics
    (``loraserve.adapters.kernels.cpu.row_max``, float32 CPU logits)."""
    logits = logits.float()
    # one read-back for the argmax and the health of every row: its largest logit is finite
    # (torch.max propagates NaN; -inf elsewhere is a structured-output mask, not a fault)
    largest, greedy = row_max(logits)
    greedy, finite = torch.stack([greedy, torch.isfinite(largest).long()]).tolist()
    if not all(p.greedy and p.logprobs is None for p in params):
        logits = logits.cpu()
    out: list[int | ServingError] = []
    logprobs: list[TokenLogprob | None] = []
    for i, (p, g) in enumerate(zip(params, gens)):
        if not finite[i]:
            out.append(NonFiniteLogits())
            logprobs.append(None)
            continue
        try:
            if p.greedy:
                token, processed = greedy[i], logits[i]
            else:
                processed = _processed(logits[i], p)
                token = int(torch.multinomial(torch.softmax(processed, dim=-1), 1, generator=g))
        except RuntimeError as err:  # e.g. probabilities multinomial refuses
            out.append(ServingError(f"sampling failed: {err}"))
            logprobs.append(None)
            continue
        out.append(token)
        logprobs.append(None if p.logprobs is None else token_logprob(processed, token, p.logprobs))
    return out, logprobs


def token_logprob(logits: Tensor, token: int, k: int) -> TokenLogprob:
    """``token``'s log-probability under ``softmax(logits)`` (``[V]``) and the ``k`` likeliest."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        # tokens a filter removed (-inf) are no alternatives, and JSON cannot carry -inf
        top = tuple((i, v) for i, v in zip(ids.tolist(), values.tolist()) if math.isfinite(v))
    return TokenLogprob(token, float(lp[token]), top)


def prompt_logprobs(
    logits_at: Callable[[int, int], Tensor], prompt: Sequence[int], k: int
) -> list[TokenLogprob]:
    """The log-probability of each prompt token but the first given the ones before it, with
    the ``k`` likeliest at each position. ``logits_at(start, stop)``: the model's logits at
    prompt positions ``start..stop-1``, ``[stop - start, V]``; asked a chunk at a time, so the
    ``[n, V]`` float32 log-probabilities of a long prompt are never all held at once."""
    out: list[TokenLogprob] = []
    for start in range(0, len(prompt) - 1, PROMPT_CHUNK):
        stop = min(start + PROMPT_CHUNK, len(prompt) - 1)
        lp = torch.log_softmax(logits_at(start, stop).float(), dim=-1)
        targets = torch.tensor(prompt[start + 1 : stop + 1], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        tops: list[tuple] = [()] * len(chosen)
        if k:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        for j, (value, top) in enumerate(zip(chosen, tops)):
            out.append(TokenLogprob(prompt[start + j + 1], value, top))
    return out


PROMPT_CHUNK = 256  # prompt positions turned into log-probabilities at once


def _processed(logits: Tensor, p: SamplingParams) -> Tensor:
    """The row's logits as sampled from: over temperature, top-k and top-p applied (-inf
    where a filter removed a token)."""
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
    return logits
