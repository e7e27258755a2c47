"""One training run's state: what is fixed for its length (``Run``), what it has done so far
(``Progress``, which checkpoints save), and what it returns (``TrainResult``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from loraserve.adapters.models import LoadedModel

from .config import TrainConfig
from .data import Example
from .device import TrainDevice
from .model import count_parameters


@dataclass(frozen=True)
class Run:
    """Everything fixed for the length of one training run."""

    config: TrainConfig
    train_device: TrainDevice
    loaded: LoadedModel  # its model now holds the LoRA layers
    targets: tuple[str, ...] | str
    optimizer: torch.optim.Optimizer
    train_set: list[Example]
    eval_set: list[Example]
    total_steps: int
    warmup_steps: int
    pad_id: int
    identity: dict  # what a checkpoint must match to be resumed by this run


@dataclass
class Progress:
    """What the run has done so far; saved in checkpoints, so a resumed run's log is whole."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    path: Path  # the adapter written
    adapter_version: str  # content hash, as read_adapter and the server report it
    steps: int
    train_loss: float  # mean over the last (up to) 10 steps
    eval_loss: float | None
    eval_exact_match: float | None  # fraction of the prompt/completion eval records
    base_exact_match: float | None  # the same before training
    trainable_params: int
    total_params: int
    tokens: int
    seconds: float
    history: list[dict]  # one entry per step: step, loss, lr, grad_norm, tokens, elapsed_s
    evals: list[dict]  # step, eval_loss (+ exact_match before and after training)


def make_result(run: Run, progress: Progress, path: Path, version: str, seconds: float):
    trainable, total = count_parameters(run.loaded.model)
    recent = [h["loss"] for h in progress.history[-10:]]
    final = progress.evals[-1] if run.eval_set else {}
    first = progress.evals[0] if run.eval_set and progress.evals[0]["step"] == 0 else {}
    return TrainResult(
        path=path,
        adapter_version=version,
        steps=progress.step,
        train_loss=sum(recent) / len(recent) if recent else float("nan"),
        eval_loss=final.get("eval_loss"),
        eval_exact_match=final.get("exact_match"),
        base_exact_match=first.get("exact_match"),
        trainable_params=trainable,
        total_params=total,
        tokens=progress.tokens,
        seconds=seconds,
        history=progress.history,
        evals=progress.evals,
    )
