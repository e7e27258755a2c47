"""Evaluation on held-out examples: the mean loss per target token, and exact match of greedy
completions (before and after training).

Greedy decoding is the models' shared ``loraserve.adapters.models.generate.greedy_generate``
(prefill,
then one token at a time with the KV cache), so evaluation decodes as the demo recipe does. A
hit is a completion whose text equals the reference after stripping; the budget is the
reference's tokens + EOS + 4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from loraserve.adapters.models.generate import greedy_generate
from loraserve.adapters.tokenizer import Tokenizer
from torch import nn

from .data import Example, collate
from .loss import batch_loss

if TYPE_CHECKING:
    from .run import Run


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Mean cross-entropy per target token over ``examples``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id).to(device)
        with autocast():
            total += float(batch_loss(model, batch))
        n += batch.n_targets
    model.train(was_training)
    return total / n


def exact_match(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[int, int]:
    """(hits, total) over the prompt/completion examples: a hit is a greedy completion whose
    text equals the reference after stripping. Budget: the reference's tokens + EOS + 4."""
    pairs = [e for e in examples if e.record.prompt is not None]
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        budget = max(e.completion_tokens for e in chunk) + 4
        with autocast():
            outputs = greedy_generate(
                model, [e.ids[: e.start] for e in chunk], budget, tokenizer.eos_token_ids
            )
        for e, ids in zip(chunk, outputs):
            hits += tokenizer.decode(ids).strip() == e.record.completion.strip()
    model.train(was_training)
    return hits, len(pairs)


def evaluation(run: Run, step: int, greedy: bool) -> dict:
    """Eval loss, plus exact match of greedy completions when ``greedy``."""
    model, tokenizer, config = run.loaded.model, run.loaded.tokenizer, run.config
    autocast = run.train_device.autocast
    result = {
        "step": step,
        "eval_loss": evaluate(model, run.eval_set, config.batch_size, run.pad_id, autocast),
    }
    if greedy:
        hits, n = exact_match(model, tokenizer, run.eval_set, config.batch_size, autocast)
        result["exact_match"] = hits / n if n else None
    return result
