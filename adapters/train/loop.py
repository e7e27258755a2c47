"""The training loop: ``train(config)`` reads the data, loads the base, adds LoRA, optimises,
evaluates, checkpoints and writes the adapter. In the words of its functions::

    run = setup(config)                                   # data, base + LoRA, AdamW, schedule
    for step in range(progress.step, total_steps):        # fit(run, progress)
        micro = [next(stream) for _ in range(grad_accum)]   # stream = batches(examples, ...)
        train_step(model, optimizer, micro, lr_at(step, ...), max_grad_norm)
    evaluation(run, step, greedy=True)                    # eval loss; exact match
    write_output(run)                                     # the adapter, atomically

Optimisation: AdamW on the LoRA weights only, linear warmup then cosine decay to 0, gradient
accumulation in which every target token of a step weighs the same, optional clipping.

Determinism: the same config, data and base give a bit-identical adapter file on the same
device. The data order depends on ``seed`` alone; LoRA init and dropout use torch's global RNG,
seeded once; a resumed run (see ``checkpoints``) continues exactly where the first stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from loraserve.adapters.chat_template import ChatTemplate, ChatTemplateError
from loraserve.adapters.lora import lora_parameters
from torch import nn
from tqdm import tqdm

from .checkpoints import CHECKPOINT_FORMAT, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, TrainError
from .data import Batch, batches, chat_records, load_data, tokenize_records, total_steps
from .device import resolve_device
from .evaluate import evaluation
from .loss import batch_loss
from .model import add_lora, load_base
from .output import check_output_paths, write_log, write_output
from .report import _info, _report_start, _summary
from .run import Progress, Run, TrainResult, make_result


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup to ``peak`` over ``warmup``
    steps, then cosine decay towards 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    lr: float,
    max_grad_norm: float = 0.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float | None]:
    """One optimizer step over ``micro_batches`` (gradient accumulation): (mean loss per target
    token, gradient norm before clipping or None). Every target token of the step weighs the
    same, however the tokens fall into micro-batches. Gradients stay set until the next step."""
    optimizer.zero_grad(set_to_none=True)
    n_targets = sum(b.n_targets for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        with autocast():
            loss = batch_loss(model, batch)
        (loss / n_targets).backward()
        total += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = None
    if max_grad_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return float(total) / n_targets, norm


def train(config: TrainConfig) -> TrainResult:
    """Train one adapter as ``config`` says and write it; see the module docstring."""
    t0 = time.perf_counter()
    run = setup(config)
    progress = Progress()
    if config.resume is not None:
        checkpoint = find_checkpoint(config.resume)
        progress = load_checkpoint(checkpoint, run.loaded.model, run.optimizer, run.identity)
        _info(config, f"resumed from {checkpoint} at step {progress.step}/{run.total_steps}")
    if run.eval_set and progress.step == 0:
        progress.evals.append(evaluation(run, 0, greedy=True))
    fit(run, progress)
    if run.eval_set:
        progress.evals.append(evaluation(run, progress.step, greedy=True))
    path, version = write_output(run)
    result = make_result(run, progress, path, version, time.perf_counter() - t0)
    if config.log_json is not None:
        write_log(config.log_json, config, result)
    _summary(config, result)
    return result


def setup(config: TrainConfig) -> Run:
    """Check the paths, read the data, load the base, add LoRA: everything before step 1."""
    train_device = resolve_device(config.device, config.threads)
    check_output_paths(config)
    records, eval_records = load_data(config)
    loaded = load_base(config.base, train_device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if any(r.messages is not None for r in [*records, *eval_records]):
        try:
            template = ChatTemplate.from_folder(loaded.path)
        except ChatTemplateError as e:
            raise TrainError(
                f"{loaded.path}: the base's chat template cannot be used: {e}"
            ) from None
        eos_text = tokenizer.decode(tokenizer.eos_token_ids[:1], skip_special_tokens=False)
        records, eval_records = (
            chat_records(records, template, eos_text),
            chat_records(eval_records, template, eos_text),
        )
    max_len = min(config.max_len, model.config.max_position_embeddings)
    train_set = tokenize_records(records, tokenizer, max_len, config.on_long, str(config.data))
    eval_set = []
    if eval_records:
        what = str(config.eval_file or f"{config.data} (--eval-split)")
        eval_set = tokenize_records(eval_records, tokenizer, max_len, config.on_long, what)
    steps = total_steps(config, len(train_set))
    warmup = config.warmup_steps
    if warmup is None:
        warmup = round(config.warmup_ratio * steps)

    torch.manual_seed(config.seed)  # LoRA init and dropout draw from the global RNG
    targets = add_lora(model, config)
    optimizer = torch.optim.AdamW(
        [p for _, p in lora_parameters(model)], lr=config.lr, weight_decay=config.weight_decay
    )
    identity = {
        "format": CHECKPOINT_FORMAT,
        "base_fingerprint": loaded.fingerprint,
        "data_sha256": _sha256(config.data),
        "schedule": {"peak_lr": config.lr, "warmup_steps": warmup, "total_steps": steps},
        "config": config.trajectory(),
    }
    run = Run(
        config, train_device, loaded, targets, optimizer, train_set, eval_set, steps, warmup,
        pad_id=tokenizer.eos_token_ids[0], identity=identity,
    )  # fmt: skip
    _report_start(run)
    return run


def fit(run: Run, progress: Progress) -> None:
    """Optimizer steps from ``progress.step`` to the end, with periodic evals and checkpoints."""
    config, model = run.config, run.loaded.model
    stream = batches(
        run.train_set, config.batch_size, config.seed, run.pad_id,
        start=progress.step * config.grad_accum,
    )  # fmt: skip
    model.train()
    bar = tqdm(
        total=run.total_steps, initial=progress.step, desc="train", unit="step",
        disable=config.quiet, dynamic_ncols=True, mininterval=0.5,
    )  # fmt: skip
    with bar:
        while progress.step < run.total_steps:
            t0 = time.perf_counter()
            micro = [next(stream).to(run.train_device.device) for _ in range(config.grad_accum)]
            lr = lr_at(progress.step, run.total_steps, config.lr, run.warmup_steps)
            loss, norm = train_step(
                model, run.optimizer, micro, lr, config.max_grad_norm, run.train_device.autocast
            )
            progress.step += 1
            progress.tokens += sum(b.n_tokens for b in micro)
            progress.elapsed_s += time.perf_counter() - t0
            progress.history.append({
                "step": progress.step, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens": progress.tokens, "elapsed_s": round(progress.elapsed_s, 4),
            })  # fmt: skip
            rate = progress.tokens / max(progress.elapsed_s, 1e-9)
            bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {rate:,.0f} tok/s", refresh=False)
            bar.update()
            last = progress.step == run.total_steps
            if run.eval_set and not last and _due(progress.step, config.eval_every):
                progress.evals.append(evaluation(run, progress.step, greedy=False))
                _info(
                    config, f"step {progress.step}: eval loss {progress.evals[-1]['eval_loss']:.4f}"
                )
            if config.checkpoint_dir is not None and (
                last or _due(progress.step, config.save_every)
            ):
                meta = {**run.identity, "progress": asdict(progress)}
                save_checkpoint(config.checkpoint_dir, model, run.optimizer, meta)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
