"""What the trainer says on the terminal: progress lines and warnings on stderr (through
tqdm, so the progress bar stays whole), the start report, and the final summary on stdout.

``--quiet`` silences all but warnings and errors.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from tqdm import tqdm

from .config import LOW_EXACT_MATCH, TrainConfig
from .model import count_parameters

if TYPE_CHECKING:
    from .run import Run, TrainResult

PROG = "loraserve-train"


def _report_start(run: Run) -> None:
    config, loaded = run.config, run.loaded
    trainable, total = count_parameters(loaded.model)
    convention = "alpha/sqrt(r)" if config.rslora else "alpha/r"
    _info(
        config,
        f"base {loaded.path} ({loaded.config.arch}, fingerprint {loaded.fingerprint}) on "
        f"{run.train_device.device}, {str(run.train_device.base_dtype).removeprefix('torch.')}\n"
        f"data: {len(run.train_set)} train / {len(run.eval_set)} eval examples; "
        f"{run.total_steps} steps of {config.batch_size} x {config.grad_accum} examples, "
        f"warmup {run.warmup_steps}\n"
        f"LoRA r={config.rank} alpha={config.alpha:g} scale={config.scale:g} ({convention}) "
        f"on {_show_targets(run.targets)}\n"
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}",
    )


def _summary(config: TrainConfig, r: TrainResult) -> None:
    if r.eval_exact_match is not None and r.eval_exact_match < LOW_EXACT_MATCH:
        _warn(  # a warning: shown even with --quiet
            f"eval exact match stayed at {r.eval_exact_match:.1%}; the adapter has not learned "
            "the task yet: try more --epochs, a higher --lr, --targets all-linear, or a larger "
            "--batch-size (the settings line at the start says where each value came from)"
        )
    if config.quiet:
        return
    lines = [
        f"trained {r.steps} steps in {r.seconds:.1f}s "
        f"({r.tokens / max(r.seconds, 1e-9):,.0f} tok/s overall); "
        f"train loss {r.train_loss:.4f} (last 10 steps)",
    ]
    if r.eval_loss is not None:
        line = f"eval loss {r.eval_loss:.4f}"
        if r.eval_exact_match is not None:
            before = "" if r.base_exact_match is None else f"{r.base_exact_match:.1%} -> "
            line += f", exact match {before}{r.eval_exact_match:.1%}"
        lines.append(line)
    lines.append(f"adapter {r.path} (version {r.adapter_version})")
    print("\n".join(lines))


def _show_targets(targets) -> str:
    return ",".join(targets) if isinstance(targets, tuple) else str(targets)


def _info(config: TrainConfig, message: str) -> None:
    if not config.quiet:
        tqdm.write(message, file=sys.stderr)


def _warn(message: str) -> None:
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)
