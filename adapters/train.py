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

The loop, in the words of its functions::

    records  = load_records(data)                       # JSONL -> Record
    examples = tokenize_records(records, tokenizer, ...)  # Record -> ids + where the loss starts
    for step in range(total_steps):
        micro = [next(stream) for _ in range(grad_accum)]  # stream = batches(examples, ...)
        train_step(model, optimizer, micro, lr_at(step, ...), max_grad_norm)
    evaluate(...) ; exact_match(...)                      # greedy_complete with the KV cache
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from adapters.demo_paths import demo_base_dir
from adapters.format import (
    InvalidAdapter,
    LoRAConfig,
    adapter_from_model,
    check_name,
    read_adapter,
    write_adapter,
    write_peft,
)
from adapters.lora import (
    ALL_LINEAR,
    lora_parameters,
    mark_only_lora_trainable,
    peft_scale,
    replace_linear_with_lora,
    target_names,
)
from adapters.models import KVCache, LoadedModel, ModelLoadError, UnsupportedModel, load_model
from adapters.tokenizer import Tokenizer

PROG = "loraserve-train"
IGNORE = -100  # target id that the loss skips (prompt tokens, padding)
CHECKPOINT_FORMAT = "loraserve-train-checkpoint/1"

# Default LoRA targets: every attention projection, the usual starting point (PEFT's own
# defaults adapt only q/v). GPT-2's "c_proj" names both the attention output and the MLP output;
# "attn.c_proj" picks the attention one only (PEFT matches it as a name suffix too).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}


class TrainError(ValueError):
    """Bad input (data, flags, paths, checkpoint); the message says what and where."""


# --------------------------------------------------------------------------------------------
# Config


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
    targets: tuple[str, ...] | str | None = None  # None: DEFAULT_TARGETS[arch]; or "all-linear"
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


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Record:
    """One JSONL line. A text record has ``prompt=None`` and its text in ``completion``."""

    where: str  # "FILE:LINE", for messages
    completion: str
    prompt: str | None = None


@dataclass(frozen=True)
class Example:
    """A tokenized record: ``ids[start:]`` are the tokens the loss is on."""

    ids: tuple[int, ...]  # prompt + completion + eos, cut to max_len
    start: int  # first target token (0 for a text record)
    record: Record
    completion_tokens: int  # completion + eos before any cut: the greedy budget in evaluation

    @property
    def n_targets(self) -> int:
        return len(self.ids) - max(self.start, 1)  # token 0 is never predicted


def load_records(path: Path) -> list[Record]:
    """Parse a JSONL data file; ``TrainError`` names the line of the first bad record."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TrainError(f"{path}: no such data file") from None
    except OSError as e:
        raise TrainError(f"{path}: cannot read the data file ({e.strerror})") from None
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            raise TrainError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise TrainError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(_parse_record(obj, where))
    if not records:
        raise TrainError(f"{path}: no records (the data set is empty)")
    return records


def _parse_record(obj, where: str) -> Record:
    forms = '{"prompt": ..., "completion": ...} or {"text": ...}'
    if not isinstance(obj, dict):
        raise TrainError(f"{where}: expected a JSON object {forms}, got {type(obj).__name__}")
    has_pair = "prompt" in obj or "completion" in obj
    if "text" in obj and has_pair:
        raise TrainError(f'{where}: has both "text" and "prompt"/"completion"; use one form')
    if "text" in obj:
        return Record(where, _string_field(obj, "text", where))
    if not has_pair:
        keys = ", ".join(sorted(obj)) or "none"
        raise TrainError(f"{where}: expected {forms}; the record's keys are: {keys}")
    prompt = _string_field(obj, "prompt", where)
    return Record(where, _string_field(obj, "completion", where), prompt)


def _string_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise TrainError(f'{where}: field "{key}" is missing')
    if not isinstance(obj[key], str):
        raise TrainError(f'{where}: field "{key}" must be a string, got {type(obj[key]).__name__}')
    return obj[key]


def split_eval(records: list[Record], fraction: float, seed: int):
    """Hold out ``ceil(fraction * n)`` records chosen by ``seed``: (train, eval), file order."""
    n_eval = math.ceil(fraction * len(records))
    if n_eval >= len(records):
        raise TrainError(
            f"--eval-split {fraction} of {len(records)} records leaves none to train on"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    max_len: int,
    on_long: str = "truncate",
    what: str = "data",
) -> list[Example]:
    """Records -> examples; a record longer than ``max_len`` is cut at the end or refused."""
    eos = tokenizer.eos_token_ids[0]
    examples, cut, dropped = [], [], []
    for record in records:
        if record.prompt is None:
            prompt, completion = [], tokenizer.encode(record.completion)
        else:
            prompt = tokenizer.encode(record.prompt)
            completion = tokenizer.encode(record.completion, add_special_tokens=False)
        ids = [*prompt, *completion, eos]
        if len(ids) > max_len:
            if on_long == "error":
                raise TrainError(
                    f"{record.where}: {len(ids)} tokens, longer than --max-len={max_len} "
                    "(raise --max-len, or use --on-long=truncate to cut such records)"
                )
            cut.append(record.where)
        example = Example(tuple(ids[:max_len]), len(prompt), record, len(completion) + 1)
        if example.n_targets > 0:
            examples.append(example)
        else:
            dropped.append(record.where)
    if cut:
        _warn(
            f"{what}: {len(cut)} record(s) longer than --max-len={max_len} were cut to fit "
            f"(first: {cut[0]}); --on-long=error refuses them instead"
        )
    if dropped:
        _warn(f"{what}: {len(dropped)} record(s) left no completion token (first: {dropped[0]})")
    if not examples:
        raise TrainError(f"{what}: no record has a token to train on (the data set is empty)")
    return examples


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # [B, S] token ids, right-padded
    targets: Tensor  # [B, S] the next token, or IGNORE (prompt, padding)
    n_targets: int
    n_tokens: int  # real (non-pad) input tokens

    def to(self, device) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.n_targets,
            self.n_tokens,
        )


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad; ``targets[b, t] = ids[t + 1]`` where ``t + 1 >= start``, else IGNORE.

    Right padding is safe with causal attention: a real token never sees a later pad.
    """
    S = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), S), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), S), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        n = len(e.ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        targets[b, : max(e.start - 1, 0)] = IGNORE  # predictions of prompt tokens
    n_targets = sum(e.n_targets for e in examples)
    return Batch(inputs, targets, n_targets, sum(len(e.ids) - 1 for e in examples))


def batches(
    examples: Sequence[Example], batch_size: int, seed: int, pad_id: int, start: int = 0
) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, each epoch a new permutation drawn from
    ``seed``; the first ``start`` micro-batches are skipped (resume). The last batch of an epoch
    may be smaller."""
    generator = torch.Generator().manual_seed(seed)
    index = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            if index >= start:
                yield collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            index += 1


def total_steps(config: TrainConfig, n_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(n_examples / config.batch_size)
    return math.ceil(config.epochs * per_epoch / config.grad_accum)


# --------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Runtime:
    """Where the math runs, chosen once: CPU in float32, or CUDA with a bfloat16 base and
    bfloat16 autocast (LoRA weights and AdamW state stay float32)."""

    device: torch.device
    base_dtype: torch.dtype
    autocast: Callable[[], contextlib.AbstractContextManager]


def resolve_runtime(device: str, threads: int | None = None) -> Runtime:
    if threads is not None:
        # Small models run fastest on one thread; on a busy machine torch's default (one per
        # core) can make each step 10x slower.
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {device}: no CUDA device is available")
        if torch.cuda.is_bf16_supported():
            bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
            return Runtime(torch.device(device), torch.bfloat16, bf16)
        return Runtime(torch.device(device), torch.float32, contextlib.nullcontext)
    return Runtime(torch.device("cpu"), torch.float32, contextlib.nullcontext)


def load_base(base: str, runtime: Runtime) -> LoadedModel:
    """``load_model`` of the folder (or the demo), with a tokenizer that knows its EOS."""
    path = demo_base_dir() if base == "demo" else Path(base)
    if base == "demo" and not (path / "config.json").is_file():
        raise TrainError(
            f"--base demo: the embedded demo base model is not installed ({path} is missing); "
            "build the demo assets first, or pass --base PATH to a Hugging Face model folder"
        )
    loaded = load_model(path, runtime.device, runtime.base_dtype)
    if loaded.tokenizer is None:
        raise TrainError(f"{path}: no tokenizer.json; the trainer needs the base's tokenizer")
    if not loaded.tokenizer.eos_token_ids:
        raise TrainError(
            f"{path}: no EOS token (config.json eos_token_id, generation_config.json or "
            "tokenizer_config.json eos_token); completions need one to end"
        )
    return loaded


def add_lora(model: nn.Module, config: TrainConfig) -> tuple[str, ...] | str:
    """Swap LoRA into ``model`` (init from torch's global RNG), freeze all else; the targets."""
    targets = config.targets or DEFAULT_TARGETS[model.config.arch]
    if not target_names(model, targets):
        linear = sorted({name.rsplit(".", 1)[-1] for name in target_names(model, ALL_LINEAR)})
        raise TrainError(
            f"--targets {','.join(targets) if isinstance(targets, tuple) else targets}: no "
            f"linear layer of this {model.config.arch} model matches; its layers are named "
            f"{', '.join(linear)} (or use all-linear)"
        )
    replace_linear_with_lora(
        model, config.rank, config.alpha, targets, scale=config.scale, dropout=config.dropout
    )
    for _, param in lora_parameters(model):
        param.data = param.data.float()  # master weights in float32 even on a bfloat16 base
    mark_only_lora_trainable(model)
    return targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a tied embedding counts once."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# --------------------------------------------------------------------------------------------
# Optimisation


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup to ``peak`` over ``warmup``
    steps, then cosine decay towards 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Summed cross-entropy over the batch's target tokens (float32 scalar)."""
    logits = model(batch.inputs)  # [B, S, V] float32
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


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


# --------------------------------------------------------------------------------------------
# Evaluation


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


@torch.no_grad()
def greedy_complete(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuation of each prompt with the KV cache, batched; stops at EOS (not
    returned) or after ``max_new_tokens``. The caller chooses train/eval mode and autocast.

    Prompts are right-padded; padding gets positions after its row's real tokens (the cache's
    contract), so every row decodes as it would alone.
    """
    param = next(model.parameters())
    B, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=param.device)
    P = int(lengths.max())
    max_seq = min(P + max_new_tokens, model.config.max_position_embeddings)
    cache = KVCache(model.config, B, max_seq, param.device, param.dtype)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    ids = ids.to(param.device)
    positions = torch.arange(P, device=param.device).expand(B, P)
    logits = model(ids, positions, cache, logits_at=lengths - 1)  # [B, V]
    eos = set(eos_token_ids)
    out, done = [[] for _ in range(B)], [False] * B
    for t in range(max_new_tokens):
        tokens = logits.argmax(-1)  # [B]
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                done[b] = token in eos
                if not done[b]:
                    out[b].append(token)
        if all(done) or t == max_new_tokens - 1 or P + t >= max_seq:
            break
        logits = model(tokens[:, None], (lengths + t)[:, None], cache)[:, -1]  # [B, V]
    return out


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
            outputs = greedy_complete(
                model, [e.ids[: e.start] for e in chunk], budget, tokenizer.eos_token_ids
            )
        for e, ids in zip(chunk, outputs):
            hits += tokenizer.decode(ids).strip() == e.record.completion.strip()
    model.train(was_training)
    return hits, len(pairs)


# --------------------------------------------------------------------------------------------
# Checkpoints: DIR/step-NNNNNNNN/{state.safetensors, state.json}, written atomically


@dataclass
class Progress:
    """What the run has done so far; saved in checkpoints, so a resumed run's log is whole."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict] = field(default_factory=list)


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict
) -> Path:
    """LoRA weights + AdamW state + RNG state as safetensors, the rest as JSON."""
    tensors = {f"lora.{name}": p.detach().cpu() for name, p in lora_parameters(model)}
    params = optimizer.param_groups[0]["params"]
    for i, param in enumerate(params):
        for key, value in optimizer.state[param].items():
            tensors[f"optim.{i}.{key}"] = value.detach().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine leaves CUDA alone
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    final = directory / f"step-{meta['progress']['step']:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors"
        )
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest ``step-*`` checkpoint inside."""
    if (path / "state.json").is_file():
        return path
    if not path.is_dir():
        raise TrainError(f"--resume {path}: no such checkpoint or checkpoint folder")
    steps = [p for p in path.glob("step-*") if (p / "state.json").is_file()]
    if not steps:
        raise TrainError(f"--resume {path}: holds no checkpoint (step-*/state.json)")
    return max(steps, key=lambda p: int(p.name.removeprefix("step-")))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, expect: dict
) -> Progress:
    """Restore LoRA weights, AdamW state and RNG state; refuse a checkpoint of another run."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = safetensors.torch.load_file(path / "state.safetensors")
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        raise TrainError(f"--resume {path}: unreadable checkpoint ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume {path}: not a {CHECKPOINT_FORMAT} checkpoint")
    try:
        progress = Progress(**meta["progress"])
    except (KeyError, TypeError):
        raise TrainError(f"--resume {path}: state.json has no valid progress record") from None
    theirs = meta.get("config", {})
    differ = [k for k, v in expect.items() if k != "config" and meta.get(k) != v]
    differ += [k for k, v in expect["config"].items() if theirs.get(k) != v]
    if differ:
        raise TrainError(
            f"--resume {path}: the checkpoint comes from a different run; these differ: "
            f"{', '.join(differ)} (resume with the same data, base and training flags)"
        )
    lora = dict(lora_parameters(model))
    if {f"lora.{n}" for n in lora} != {k for k in tensors if k.startswith("lora.")}:
        raise TrainError(f"--resume {path}: its LoRA modules differ from this run's")
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(tensors[f"lora.{name}"])
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [
        tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors
    ]
    if cuda_states and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return progress


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Run:
    """Everything fixed for the length of one training run."""

    config: TrainConfig
    runtime: Runtime
    loaded: LoadedModel  # its model now holds the LoRA layers
    targets: tuple[str, ...] | str
    optimizer: torch.optim.Optimizer
    train_set: list[Example]
    eval_set: list[Example]
    total_steps: int
    warmup_steps: int
    pad_id: int
    identity: dict  # what a checkpoint must match to be resumed by this run


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
    runtime = resolve_runtime(config.device, config.threads)
    check_output_paths(config)
    records, eval_records = load_data(config)
    loaded = load_base(config.base, runtime)
    model, tokenizer = loaded.model, loaded.tokenizer
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
        config, runtime, loaded, targets, optimizer, train_set, eval_set, steps, warmup,
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
            micro = [next(stream).to(run.runtime.device) for _ in range(config.grad_accum)]
            lr = lr_at(progress.step, run.total_steps, config.lr, run.warmup_steps)
            loss, norm = train_step(
                model, run.optimizer, micro, lr, config.max_grad_norm, run.runtime.autocast
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


def evaluation(run: Run, step: int, greedy: bool) -> dict:
    """Eval loss, plus exact match of greedy completions when ``greedy``."""
    model, tokenizer, config = run.loaded.model, run.loaded.tokenizer, run.config
    autocast = run.runtime.autocast
    result = {
        "step": step,
        "eval_loss": evaluate(model, run.eval_set, config.batch_size, run.pad_id, autocast),
    }
    if greedy:
        hits, n = exact_match(model, tokenizer, run.eval_set, config.batch_size, autocast)
        result["exact_match"] = hits / n if n else None
    return result


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


def load_data(config: TrainConfig) -> tuple[list[Record], list[Record]]:
    """(train records, eval records) from --data and --eval-file / --eval-split."""
    records = load_records(config.data)
    if config.eval_file is not None:
        return records, load_records(config.eval_file)
    if config.eval_split > 0:
        return split_eval(records, config.eval_split, config.seed)
    return records, []


def check_output_paths(config: TrainConfig) -> None:
    """Fail before training, not after it, when an output cannot be written."""
    out = config.out
    if config.format == "safetensors":
        if out.suffix != ".safetensors":
            raise TrainError(
                f"--out {out}: a single-file adapter is named NAME.safetensors "
                "(or pass --format peft to write a PEFT folder)"
            )
        if out.is_dir():
            raise TrainError(f"--out {out}: is a directory")
    else:
        if out.suffix == ".safetensors":
            raise TrainError(f"--out {out}: --format peft writes a folder; drop the suffix")
        if out.exists() and not out.is_dir():
            raise TrainError(f"--out {out}: exists and is not a folder")
    try:
        check_name(out.name.removesuffix(".safetensors"))
    except InvalidAdapter as e:
        raise TrainError(f"--out {out}: {e}") from None
    _check_writable(out.parent, "--out")
    if config.log_json is not None:
        _check_writable(config.log_json.parent, "--log-json")
    if config.checkpoint_dir is not None:
        _check_writable(config.checkpoint_dir, "--checkpoint-dir")


def _check_writable(directory: Path, flag: str) -> None:
    """``directory`` exists and takes a file, or the nearest existing ancestor is writable."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"{flag}: cannot write under {directory}: {existing} is not a directory")
    if existing == directory:
        try:  # a real probe: os.access says yes to root even on a read-only mount
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise TrainError(f"{flag}: cannot write in {directory} ({e.strerror})") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"{flag}: cannot create {directory}: {existing} is not writable")


def write_output(run: Run) -> tuple[Path, str]:
    """Write the adapter atomically; returns (path, version as read back)."""
    config, model = run.config, run.loaded.model
    lora_config = LoRAConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        use_rslora=config.rslora,
        target_modules=run.targets,
        base_fingerprint=run.loaded.fingerprint,
        # the folder's name, not its path: the file's bytes must not depend on where it was built
        base_model=config.base if config.base == "demo" else Path(config.base).name,
        fan_in_fan_out=model.config.arch == "gpt2",  # what PEFT sets for GPT-2's Conv1D
    )
    name = config.out.name.removesuffix(".safetensors")
    adapter = adapter_from_model(model, name, lora_config)
    if config.format == "peft":
        path = write_peft(config.out, adapter)
    else:
        path = write_adapter(config.out, adapter)
    return path, read_adapter(path, name).version


def write_log(path: Path, config: TrainConfig, result: TrainResult) -> None:
    """Config, outcome, loss curve and evals as one JSON file (written atomically)."""
    summary = {k: v for k, v in asdict(result).items() if k not in ("history", "evals")}
    log = {
        "config": config.to_dict(),
        "result": _jsonable(summary),
        "steps": result.history,
        "evals": result.evals,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(log, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _report_start(run: Run) -> None:
    config, loaded = run.config, run.loaded
    trainable, total = count_parameters(loaded.model)
    convention = "alpha/sqrt(r)" if config.rslora else "alpha/r"
    _info(
        config,
        f"base {loaded.path} ({loaded.config.arch}, fingerprint {loaded.fingerprint}) on "
        f"{run.runtime.device}, {str(run.runtime.base_dtype).removeprefix('torch.')}\n"
        f"data: {len(run.train_set)} train / {len(run.eval_set)} eval examples; "
        f"{run.total_steps} steps of {config.batch_size} x {config.grad_accum} examples, "
        f"warmup {run.warmup_steps}\n"
        f"LoRA r={config.rank} alpha={config.alpha:g} scale={config.scale:g} ({convention}) "
        f"on {_show_targets(run.targets)}\n"
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}",
    )


def _summary(config: TrainConfig, r: TrainResult) -> None:
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


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _info(config: TrainConfig, message: str) -> None:
    if not config.quiet:
        tqdm.write(message, file=sys.stderr)


def _warn(message: str) -> None:
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Flags map 1:1 onto TrainConfig fields; defaults come from TrainConfig."""
    fields = TrainConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a LoRA adapter for a frozen base model from a JSONL file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(group, flag: str, help: str, **kwargs) -> None:
        default = fields[flag.removeprefix("--").replace("-", "_")].default
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
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except TrainError as e:
        parser.error(str(e))


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


if __name__ == "__main__":
    raise SystemExit(main())
