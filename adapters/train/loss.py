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
    """Summed cross-entropy over the batch's target tokens (float32 scalar)."""
    logits = model(batch.inputs)  # [B, S, V] float32
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
