"""The command line, ``loraserve-train``: flags -> ``TrainConfig`` -> ``train``.

    loraserve-train --base demo --data task.jsonl --out adapters/task.safetensors

Flags map 1:1 onto ``TrainConfig`` fields and take their defaults from it. Exit codes: 0 done,
2 bad input (a usage error, or ``TrainError`` / ``ModelLoadError`` / ``UnsupportedModel`` /
``InvalidAdapter``, printed as one ``loraserve-train: error: ...`` line naming the file, line or
flag), 1 an I/O failure while writing, 130 interrupted (with how to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from loraserve.adapters.format import InvalidAdapter
from loraserve.adapters.models import ModelLoadError, UnsupportedModel

from .config import RECOMMENDATIONS_FILE, TUNABLE, TrainConfig, TrainError, base_recommendations
from .loop import train
from .report import PROG


def build_parser() -> argparse.ArgumentParser:
    """Flags map 1:1 onto TrainConfig fields; defaults come from TrainConfig."""
    fields = TrainConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a LoRA adapter for a frozen base model from a JSONL file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(group, flag: str, help: str, **kwargs) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        default = fields[name].default
        if name in TUNABLE:  # unset: the base's recommendation, else the field's default
            kwargs.setdefault("type", type(default) if default is not None else str)
            help += f" (default: the base's {RECOMMENDATIONS_FILE}, else {default})"
            group.add_argument(flag, help=help, default=argparse.SUPPRESS, **kwargs)
            return
        if default is None or default is dataclasses.MISSING:
            default = argparse.SUPPRESS  # TrainConfig fills it in; the help says what it means
        if kwargs.get("action") is None and "type" not in kwargs and default is not SUPPRESS:
            kwargs["type"] = type(default)
        group.add_argument(flag, help=help, default=default, **kwargs)

    SUPPRESS = argparse.SUPPRESS
    io = parser.add_argument_group("inputs and output")
    add(io, "--base", "'demo' (the embedded base) or a Hugging Face model folder")
    add(
        io,
        "--data",
        'JSONL, one {"prompt", "completion"} or {"text"} per line',
        type=Path,
        required=True,
    )
    add(
        io,
        "--out",
        "NAME.safetensors, or a folder NAME/ with --format peft",
        type=Path,
        required=True,
    )
    add(io, "--format", "single file or PEFT folder", choices=("safetensors", "peft"))
    lora = parser.add_argument_group("LoRA")
    add(lora, "--rank", "LoRA rank r")
    add(lora, "--alpha", "PEFT's lora_alpha: scale = alpha / r")
    add(lora, "--rslora", "scale = alpha / sqrt(r) instead", action="store_true")
    add(
        lora,
        "--targets",
        "module names, comma-separated, or all-linear (default: the "
        "attention projections, q_proj,k_proj,v_proj,o_proj; GPT-2: c_attn,attn.c_proj)",
    )
    add(lora, "--dropout", "LoRA dropout")
    opt = parser.add_argument_group("optimisation (AdamW, linear warmup, cosine decay to 0)")
    add(opt, "--epochs", "passes over the data")
    add(opt, "--max-steps", "optimizer steps (overrides --epochs)", type=int)
    add(opt, "--lr", "peak learning rate")
    warmup = opt.add_mutually_exclusive_group()
    add(warmup, "--warmup-steps", "warmup steps (default: --warmup-ratio of all)", type=int)
    add(warmup, "--warmup-ratio", "warmup as a fraction of all steps")
    add(opt, "--weight-decay", "AdamW weight decay")
    add(opt, "--batch-size", "examples per micro-batch")
    add(opt, "--grad-accum", "micro-batches per optimizer step")
    add(opt, "--max-grad-norm", "gradient clipping; 0 turns it off")
    add(opt, "--max-len", "tokens per record (prompt + completion + EOS)")
    add(
        opt,
        "--on-long",
        "a record over --max-len: cut its end with a warning, or refuse it",
        choices=("truncate", "error"),
    )
    add(opt, "--seed", "data order, LoRA init and dropout")
    ev = parser.add_argument_group("evaluation (loss; exact match of greedy completions)")
    held = ev.add_mutually_exclusive_group()
    add(held, "--eval-file", "JSONL to evaluate on", type=Path)
    add(held, "--eval-split", "or: this fraction of --data, held out")
    add(ev, "--eval-every", "eval loss every N steps too (0: before and after only)")
    run = parser.add_argument_group("running")
    add(run, "--device", "auto, cpu, cuda or cuda:N (CUDA: bfloat16 base and autocast)")
    add(run, "--threads", "CPU threads (default: torch's; 1 is fastest for tiny models)", type=int)
    add(run, "--checkpoint-dir", "save resumable checkpoints here (safetensors + JSON)", type=Path)
    add(run, "--save-every", "checkpoint every N steps (0: at the end only)")
    add(run, "--resume", "a checkpoint folder, or a --checkpoint-dir (its latest)", type=Path)
    add(run, "--log-json", "write the loss curve and results here", type=Path)
    add(
        run, "--quiet", "no progress bar, no summary; warnings and errors only", action="store_true"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        settings, sources = choose_settings(args)
        config = TrainConfig(**args, **settings)
    except TrainError as e:
        parser.error(str(e))
    if not config.quiet:
        shown = ", ".join(f"{k} {_show(settings[k])} ({sources[k]})" for k in TUNABLE)
        print(f"{PROG}: settings: {shown}", file=sys.stderr)
    return config


def choose_settings(args: dict) -> tuple[dict, dict]:
    """The tunable settings the command line left unset, from the base's recommendations or
    the defaults; and where each came from (given, the base's file, the default). Removes the
    given ones from ``args``."""
    base = args.get("base", TrainConfig.__dataclass_fields__["base"].default)
    folder = base_folder(base)
    recommended = base_recommendations(folder) if folder is not None else {}
    why = recommended.pop("why", None)
    settings, sources = {}, {}
    for name in TUNABLE:
        if name in args:
            settings[name], sources[name] = args.pop(name), "given"
        elif name in recommended:
            settings[name] = recommended[name]
            sources[name] = f"recommended by {base}'s {RECOMMENDATIONS_FILE}"
            if why:
                sources[name] += f": {why}"
                why = None  # said once
        else:
            settings[name] = TrainConfig.__dataclass_fields__[name].default
            sources[name] = "default"
    return settings, sources


def base_folder(base: str) -> Path | None:
    from loraserve.adapters.train.model import base_path

    try:
        folder = base_path(base)
    except TrainError:
        return None  # load_base says why, once
    return folder if folder.is_dir() else None


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(value)
    return (
        "the model's attention projections"
        if value is None
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 done, 2 bad input, 1 an I/O failure while writing, 130 interrupted."""
    try:
        config = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 0
    try:
        train(config)
    except (TrainError, ModelLoadError, UnsupportedModel, InvalidAdapter) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            f"; resume with --resume {config.checkpoint_dir}"
            if config.checkpoint_dir is not None
            else " (no --checkpoint-dir: nothing to resume from)"
        )
        print(f"\n{PROG}: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0
