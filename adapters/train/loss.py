"""The training objective: summed cross-entropy over a batch's target tokens.

A target of ``IGNORE`` (a prompt token's prediction, padding; see ``data.collate``) carries no
loss. The training step and the eval loss both use ``batch_loss``, so the loss that is reported
is the loss that is minimised.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE, Batch


def batch_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Summed cross-entropy over the batch's target tokens (float32 scalar).

    The head runs on the target positions only: on a real vocabulary (49k rows for SmolLM2)
    it is a large share of the step, and a chat prompt's tokens carry no loss."""
    hidden = model.hidden_states(batch.inputs)  # [B, S, C]
    targets = batch.targets.flatten()
    keep = (targets != IGNORE).nonzero().squeeze(1)
    logits = model.head(hidden.flatten(0, 1).index_select(0, keep))  # [T, V] float32
    return F.cross_entropy(logits, targets.index_select(0, keep), reduction="sum")
