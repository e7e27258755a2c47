"""The offline LoRA trainer: a frozen base model + a JSONL data set -> one adapter file.

    loraserve-train --base demo --data task.jsonl --out adapters/task.safetensors

Contract:
- Data: JSON Lines, one record per line (blank lines skipped, other keys ignored), either
  ``{"prompt": str, "completion": str}`` or ``{"text": str}``. Tokens are
  ``encode(prompt) + encode(completion, add_special_tokens=False) + [eos]``; the loss is the
  mean cross-entropy over the completion tokens and that EOS only (a text record: every token).
  A record longer than ``max_len`` is cut at the end with a warning (``on_long="truncate"``,
  the default) or refused (``on_long="error"``).
- Only the LoRA ``A`` and ``B`` train; the base weights are never written to.
- Determinism: the same config, data and base give a bit-identical adapter file on the same
  device. The data order depends on ``seed`` alone; LoRA init and dropout use torch's global RNG,
  seeded once. A checkpoint holds LoRA weights, AdamW state, step, history and RNG state, so
  "stop, then resume" gives the same adapter as one straight run.
- Output: ``write_adapter`` (NAME.safetensors) or ``write_peft`` (a PEFT folder), both atomic
  (temp name + rename), recording r, lora_alpha, use_rslora, target_modules and the base
  fingerprint. Checkpoints (``DIR/step-NNNNNNNN/state.{safetensors,json}``) never use pickle.
- Errors in the inputs raise ``TrainError`` (or ``ModelLoadError`` / ``InvalidAdapter`` from the
  loaders), each naming the file, line or flag; ``main`` prints them and returns 2.

One job per module:

- ``config``       ``TrainConfig`` (every flag, checked once) and ``TrainError``
- ``data``         JSONL records -> tokenized examples -> padded micro-batches
- ``loss``         the objective: cross-entropy on target tokens
- ``device``       ``TrainDevice``: device, base dtype, autocast, CPU threads
- ``model``        the base loaded, LoRA swapped in, everything else frozen
- ``loop``         ``train``: setup, optimizer steps, schedule, periodic evals and checkpoints
- ``evaluate``     eval loss and greedy exact match (``loraserve.adapters.models.generate``)
- ``checkpoints``  resumable safetensors + JSON checkpoints
- ``run``          one run's state: ``Run``, ``Progress``, ``TrainResult``
- ``output``       the adapter and the JSON log, written atomically
- ``report``       progress lines, warnings and the summary on the terminal
- ``cli``          flags, ``main``, exit codes (``python -m loraserve.adapters.train`` runs it)
"""

from loraserve.adapters.models.generate import (
    greedy_generate as greedy_complete,  # the trainer's name
)

from .checkpoints import CHECKPOINT_FORMAT, find_checkpoint, load_checkpoint, save_checkpoint
from .cli import build_parser, main, parse_args
from .config import TrainConfig, TrainError, parse_targets
from .data import (
    IGNORE,
    Batch,
    Example,
    Record,
    batches,
    collate,
    load_data,
    load_records,
    split_eval,
    tokenize_records,
    total_steps,
)
from .device import TrainDevice, resolve_device
from .evaluate import evaluation, exact_match
from .loop import fit, lr_at, setup, train, train_step
from .loss import batch_loss
from .model import DEFAULT_TARGETS, add_lora, count_parameters, load_base
from .output import check_output_paths, write_log, write_output
from .report import PROG
from .run import Progress, Run, TrainResult, make_result

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_TARGETS",
    "IGNORE",
    "PROG",
    "Batch",
    "Example",
    "Progress",
    "Record",
    "Run",
    "TrainConfig",
    "TrainDevice",
    "TrainError",
    "TrainResult",
    "add_lora",
    "batch_loss",
    "batches",
    "build_parser",
    "check_output_paths",
    "collate",
    "count_parameters",
    "evaluation",
    "exact_match",
    "find_checkpoint",
    "fit",
    "greedy_complete",
    "load_base",
    "load_checkpoint",
    "load_data",
    "load_records",
    "lr_at",
    "main",
    "make_result",
    "parse_args",
    "parse_targets",
    "resolve_device",
    "save_checkpoint",
    "setup",
    "split_eval",
    "tokenize_records",
    "total_steps",
    "train",
    "train_step",
    "write_log",
    "write_output",
]
