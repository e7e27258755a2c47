"""``TrainConfig``: everything one training run needs, checked once on construction.

The CLI flags map 1:1 onto its fields (``cli.build_parser``); a library caller builds it
directly. Every bad value raises ``TrainError`` naming the flag; ``TrainError`` is also what the
rest of the trainer raises for bad input (data, paths, checkpoints), so ``main`` can print it
and return 2.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loraserve.adapters.lora import ALL_LINEAR, peft_scale


class TrainError(ValueError):
    """Bad input (data, flags, paths, checkpoint); the message says what and where."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; validated on construction (``TrainError``)."""

    data: Path
    out: Path  # NAME.safetensors, or a folder NAME/ with format="peft"
    base: str = "demo"  # "demo" or a Hugging Face model folder
    format: str = "safetensors"  # "safetensors" (single file) | "peft" (folder)
    # LoRA: scale = alpha / rank (PEFT), alpha / sqrt(rank) with rslora
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] | str | None = None  # None: spec.lora_targets; or "all-linear"
    dropout: float = 0.0
    # optimisation: AdamW, linear warmup then cosine decay to 0
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: round(warmup_ratio * total steps)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    max_len: int = 512
    on_long: str = "truncate"  # "truncate" | "error"
    seed: int = 0
    # evaluation
    eval_file: Path | None = None
    eval_split: float = 0.0  # fraction of --data held out, chosen by seed
    eval_every: int = 0  # eval loss every N steps (0: only before and after)
    # running
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    threads: int | None = None  # torch intra-op CPU threads; None: torch's default
    checkpoint_dir: Path | None = None
    save_every: int = 0  # 0: a checkpoint at the end only (when checkpoint_dir is set)
    resume: Path | None = None  # a checkpoint folder, or a checkpoint_dir (latest step)
    log_json: Path | None = None
    quiet: bool = False

    def __post_init__(self):
        for name in ("data", "out", "eval_file", "checkpoint_dir", "resume", "log_json"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "targets", parse_targets(self.targets))
        rules = [
            (self.format in ("safetensors", "peft"), "--format must be safetensors or peft"),
            (self.rank >= 1, "--rank must be >= 1"),
            (math.isfinite(self.alpha) and self.alpha > 0, "--alpha must be > 0"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be > 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)"),
            (self.max_len >= 2, "--max-len must be >= 2"),
            (self.on_long in ("truncate", "error"), "--on-long must be truncate or error"),
            (0 <= self.eval_split < 1, "--eval-split must be in [0, 1)"),
            (
                self.eval_file is None or self.eval_split == 0,
                "--eval-file and --eval-split exclude each other",
            ),
            (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (
                self.save_every == 0 or self.checkpoint_dir is not None,
                "--save-every needs --checkpoint-dir",
            ),
            (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                "--device must be auto, cpu, cuda or cuda:N",
            ),
        ]
        for ok, message in rules:
            if not ok:
                raise TrainError(message)

    @property
    def scale(self) -> float:
        return peft_scale(self.rank, self.alpha, self.rslora)

    def trajectory(self) -> dict:
        """The fields that decide the training trajectory: a resumed run must match them."""
        skip = {"data", "out", "base", "format", "eval_file", "eval_every", "device", "threads"}
        skip |= {"checkpoint_dir", "save_every", "resume", "log_json", "quiet"}
        return _jsonable({k: v for k, v in asdict(self).items() if k not in skip})

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


# Settings a base model folder may recommend for its adapters (RECOMMENDATIONS_FILE), used
# where the command line does not set them. Real models keep PEFT-like defaults (the fields'
# own); a tiny model such as the demo learns nothing in a few epochs at lr 2e-4 on attention
# alone, and says so in its folder.
TUNABLE = ("rank", "alpha", "targets", "lr", "batch_size", "epochs")
RECOMMENDATIONS_FILE = "loraserve_train.json"
MAX_RECOMMENDATIONS_BYTES = 64 << 10
LOW_EXACT_MATCH = 0.5  # below it at the end of a run, the trainer says what to try


def base_recommendations(folder: Path) -> dict:
    """The settings ``folder/RECOMMENDATIONS_FILE`` recommends (``{}`` without one); its
    ``"why"`` string is kept for the report. Raises ``TrainError`` for a bad file."""
    path = Path(folder) / RECOMMENDATIONS_FILE
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_RECOMMENDATIONS_BYTES:
        raise TrainError(f"{path}: over {MAX_RECOMMENDATIONS_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: must be a JSON object")
    unknown = set(data) - set(TUNABLE) - {"why"}
    if unknown:
        raise TrainError(f"{path}: unknown settings {sorted(unknown)}; allowed: {TUNABLE}")
    return data


def parse_targets(targets: str | Sequence[str] | None) -> tuple[str, ...] | str | None:
    """``"q_proj,v_proj"`` or a sequence -> ``("q_proj", "v_proj")``; "all-linear" stays a str."""
    if targets is None or targets == ALL_LINEAR:
        return targets
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(n.strip() for n in names)
    if not names or not all(names):
        raise TrainError(f"--targets {targets!r}: give module names separated by commas")
    return names


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
