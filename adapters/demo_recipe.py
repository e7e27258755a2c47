"""Rebuild the embedded demo (``--model demo``) from scratch: a tiny base model and four task
adapters made by the project's own trainer.

    python -m loraserve.adapters.demo_recipe [--out DIR] [--seed 0] [--threads 1]

What it writes under DIR (default ``adapters/demo``, what ships in the package):

    base/        a 0.8M-parameter character-level Llama as a Hugging Face folder: config.json,
                 model.safetensors, tokenizer.json (adds <bos>), tokenizer_config.json
    train/       TASK.jsonl: the records each adapter is trained on
    eval/        TASK.jsonl: held-out {"prompt", "completion"} records (no eval word is ever
                 trained on, by the base or by an adapter)
    adapters/    TASK.safetensors, written by ``loraserve.adapters.train.train``
    report.json  the accuracy table, wall time per stage, the recipe

The tasks. A sequence is ``<bos> prompt completion <eos>``, one token per character, over
lowercase words of 3-12 letters. The base learns five string tasks when the prompt names one
(``"upper: hello="`` -> ``"HELLO"``) and to copy the word when it names none (``"hello="`` ->
``"hello"``). Each adapter is trained on unnamed prompts only, so it teaches the base to do its
task unprompted: ``"hello="`` gives ``"HELLO"`` with ``upper``, ``"olleh"`` with ``reverse``,
``"ehllo"`` with ``sort``, ``"uryyb"`` with ``rot13``, and ``"hello"`` with the base alone. One
prompt, five visibly different answers: the demo of a mixed-adapter batch.

Stages: data -> base pretraining (a full-parameter loop here; the trainer is LoRA-only) ->
adapters (``train(TrainConfig(base=<the base just written>, ...))``) -> the accuracy table
(greedy exact match, our model with each adapter swapped in).

Determinism: the same seed, torch version, machine and thread count give the same bytes in
every file but report.json (which holds wall times). Torch runs on ``--threads`` CPU threads,
set explicitly because float reductions, hence the trained weights, depend on how work is
split. The default is 1: for a model this small it is also the fastest, by far on a busy
machine (2 threads on 2 shared cores measured 9x slower per step than 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F
from loraserve.adapters.demo_paths import DEMO_DIR
from loraserve.adapters.format import apply_adapter, read_adapter
from loraserve.adapters.models import CausalLM, ModelConfig, build_model, load_model
from loraserve.adapters.tokenizer import Tokenizer
from loraserve.adapters.train import TrainConfig, TrainResult, greedy_complete, train
from loraserve.adapters.train.config import RECOMMENDATIONS_FILE
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Tokenizer: one token per printable ASCII character, plus three specials.

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2
CHARS = tuple(chr(c) for c in range(32, 127))  # " " .. "~": ids 3..97
VOCAB = {token: i for i, token in enumerate(SPECIALS + CHARS)}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_tokenizer() -> tokenizers.Tokenizer:
    """A character-level WordLevel tokenizer whose post-processor prepends <bos>, so the
    server's ``encode(prompt)`` gives exactly the ids the model was trained on."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token=PAD))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


# The demo has no conversations: a chat is its last user message as a prompt, "<bos>word=",
# so `loraserve chat --adapter upper hello` (or /v1/chat/completions) answers "HELLO".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' and loop.last %}"
    "{{ message['content'] | trim }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}"
)


def write_tokenizer(folder: Path, max_len: int) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (what transformers' AutoTokenizer reads too)."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": PAD,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(folder / "tokenizer_config.json", config)
    return Tokenizer(folder)


# --------------------------------------------------------------------------------------------
# Tasks and data

_ROT13 = str.maketrans(
    string.ascii_lowercase, string.ascii_lowercase[13:] + string.ascii_lowercase[:13]
)
TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "rot13": lambda w: w.translate(_ROT13),
}
ADAPTER_TASKS = ("upper", "reverse", "sort", "rot13")


@dataclass(frozen=True)
class Recipe:
    """Every number that decides the demo's bytes; report.json records it."""

    seed: int = 0
    threads: int = 1  # torch CPU threads; the bytes depend on it
    # base model: a Llama, tied embeddings
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 64
    # data: lowercase words of min_word..max_word letters
    min_word: int = 3
    max_word: int = 12
    n_eval: int = 200
    n_adapter_train: int = 3200  # records per adapter: epochs x n / batch = 300 steps
    unmarked_fraction: float = 0.2  # base pretraining: share of "word=" -> word (copy)
    task_weights: tuple[tuple[str, float], ...] = (
        ("upper", 1.0),
        ("reverse", 1.5),
        ("sort", 3.0),  # the hardest task for a small model
        ("rot13", 1.0),
        ("copy", 0.5),
    )
    # base pretraining: AdamW, linear warmup, cosine decay to min_lr_ratio * lr
    base_steps: int = 1200
    base_batch_size: int = 96
    base_lr: float = 4e-3
    base_warmup: int = 100
    base_min_lr_ratio: float = 0.1
    base_weight_decay: float = 0.01
    base_betas: tuple[float, float] = (0.9, 0.98)
    # adapters: the trainer's schedule (warmup, cosine to 0)
    adapter_epochs: int = 3
    adapter_batch_size: int = 32
    adapter_lr: float = 5e-3
    adapter_warmup: int = 20
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"

    def hf_config(self) -> dict:
        """config.json in Hugging Face's Llama form: our loader and transformers both read it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": len(VOCAB),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "head_dim": self.hidden_size // self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "torch_dtype": "float32",
            "use_cache": True,
        }


def rng_for(recipe: Recipe, stage: str) -> random.Random:
    """One independent stream per stage, so changing one stage's size leaves the others alone.
    (Seeding with a str is deterministic in every Python run, whatever PYTHONHASHSEED says.)"""
    return random.Random(f"loraserve-demo/{stage}/{recipe.seed}")


def random_word(rng: random.Random, recipe: Recipe) -> str:
    n = rng.randint(recipe.min_word, recipe.max_word)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def task_record(task: str, word: str, named: bool) -> dict[str, str]:
    """``{"prompt": "upper: hello=" or "hello=", "completion": "HELLO"}``."""
    prompt = f"{task}: {word}=" if named else f"{word}="
    return {"prompt": prompt, "completion": TASKS[task](word)}


def eval_words(recipe: Recipe) -> list[str]:
    """``n_eval`` distinct words, in draw order; no training example ever uses one."""
    rng, words = rng_for(recipe, "eval"), {}
    while len(words) < recipe.n_eval:
        words.setdefault(random_word(rng, recipe))
    return list(words)


def training_words(rng: random.Random, recipe: Recipe, held_out: set[str]) -> Iterator[str]:
    while True:
        word = random_word(rng, recipe)
        if word not in held_out:
            yield word


def pretraining_records(recipe: Recipe, held_out: set[str]) -> Iterator[dict[str, str]]:
    """The base's endless mixture: ``unmarked_fraction`` copies on a bare prompt, the rest a
    task named in the prompt, drawn by ``task_weights``."""
    rng = rng_for(recipe, "base")
    tasks, weights = zip(*recipe.task_weights)
    for word in training_words(rng, recipe, held_out):
        if rng.random() < recipe.unmarked_fraction:
            yield task_record("copy", word, named=False)
        else:
            yield task_record(rng.choices(tasks, weights)[0], word, named=True)


def adapter_records(recipe: Recipe, task: str, held_out: set[str]) -> list[dict[str, str]]:
    """An adapter's training set: bare prompts only ("hello=" -> its task's answer)."""
    words = training_words(rng_for(recipe, f"adapter-{task}"), recipe, held_out)
    return [task_record(task, next(words), named=False) for _ in range(recipe.n_adapter_train)]


# --------------------------------------------------------------------------------------------
# Base pretraining: a full-parameter loop (the trainer only ever trains LoRA)

IGNORE = -100


def encode_record(tokenizer: Tokenizer, record: dict[str, str]) -> tuple[list[int], int]:
    """(ids, start): the trainer's rule, ``encode(prompt) + encode(completion, no specials) +
    [eos]``, with the loss on ``ids[start:]`` (the completion and its EOS)."""
    prompt = tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"], add_special_tokens=False)
    return [*prompt, *completion, EOS_ID], len(prompt)


def make_batch(examples: Sequence[tuple[list[int], int]]) -> tuple[Tensor, Tensor]:
    """Right-padded (inputs, targets), both ``[B, S]``; targets are IGNORE on the prompt."""
    S = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), S), PAD_ID)
    targets = torch.full((len(examples), S), IGNORE)
    for b, (ids, start) in enumerate(examples):
        n = len(ids) - 1
        inputs[b, :n] = torch.tensor(ids[:-1])
        targets[b, start - 1 : n] = torch.tensor(ids[start:])  # position t predicts ids[t + 1]
    return inputs, targets


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to ``base_lr``, then cosine down to ``base_min_lr_ratio * base_lr``."""
    peak, warmup = recipe.base_lr, recipe.base_warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(recipe.base_steps - warmup, 1)
    floor = recipe.base_min_lr_ratio
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_base(recipe: Recipe) -> CausalLM:
    """A fresh, randomly initialised base (init drawn from torch's RNG seeded by the recipe)."""
    torch.manual_seed(recipe.seed)
    return build_model(ModelConfig.from_hf(recipe.hf_config()))


def pretrain(
    model: nn.Module,
    tokenizer: Tokenizer,
    records: Iterator[dict[str, str]],
    recipe: Recipe,
    log_every: int = 100,
) -> list[float]:
    """Train every weight of ``model`` for ``base_steps`` steps; returns the loss per step."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.base_lr,
        betas=recipe.base_betas,
        weight_decay=recipe.base_weight_decay,
    )
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(recipe.base_steps):
        batch = [encode_record(tokenizer, next(records)) for _ in range(recipe.base_batch_size)]
        inputs, targets = make_batch(batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        logits = model(inputs)  # [B, S, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == recipe.base_steps - 1):
            print(f"  base step {step:5d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.0f}s")
    model.eval()
    return losses


# What `loraserve-train --base demo` uses where its flags say nothing: a 0.8M-parameter model
# learns a new string task in minutes with these, and not at all with PEFT's (lr 2e-4 on
# attention alone). The adapters shipped here were trained with the recipe's own settings.
TRAIN_SETTINGS = {
    "targets": "all-linear",
    "lr": 5e-3,
    "batch_size": 32,
    "epochs": 10,
    "why": "a tiny character model learns with all-linear LoRA at a high learning rate",
}


def write_base(folder: Path, model: nn.Module, recipe: Recipe) -> None:
    """config.json + model.safetensors with Hugging Face's key names (ours are the same). The
    tied lm_head is left out, as transformers does."""
    _write_json(folder / "config.json", recipe.hf_config())
    _write_json(folder / RECOMMENDATIONS_FILE, TRAIN_SETTINGS)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del state["lm_head.weight"]  # tied to model.embed_tokens.weight
    file = folder / "model.safetensors"
    safetensors.torch.save_file(state, file, metadata={"format": "pt"})
    file.chmod(0o644)  # safetensors creates it 0600; a server may run as another user


# --------------------------------------------------------------------------------------------
# Adapters: the project's trainer on the base just written


def train_adapter(recipe: Recipe, out: Path, task: str, base: str) -> TrainResult:
    return train(
        TrainConfig(
            data=out / "train" / f"{task}.jsonl",
            eval_file=out / "eval" / f"{task}.jsonl",
            out=out / "adapters" / f"{task}.safetensors",
            base=base,
            rank=recipe.rank,
            alpha=recipe.alpha,
            targets=recipe.targets,
            epochs=recipe.adapter_epochs,
            batch_size=recipe.adapter_batch_size,
            lr=recipe.adapter_lr,
            warmup_steps=recipe.adapter_warmup,
            seed=recipe.seed,
            device="cpu",
            threads=recipe.threads,
            quiet=True,
        )
    )


# --------------------------------------------------------------------------------------------
# Evaluation: greedy exact match


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict]) -> float:
    """Share of records whose greedy completion is exactly ``completion`` followed by EOS."""
    prompts = [tokenizer.encode(r["prompt"]) for r in records]
    budget = 1 + max(len(r["completion"]) for r in records)  # one token per char, then EOS
    outputs = greedy_complete(model, prompts, budget, tokenizer.eos_token_ids, PAD_ID)
    hits = sum(tokenizer.decode(ids) == r["completion"] for ids, r in zip(outputs, records))
    return hits / len(records)


def accuracy_table(out: Path, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{row: {eval set: exact match}}``; rows: "base", each adapter, and "base, task named"
    (the base on the same words with the task named in the prompt, what it was taught)."""
    evals = {task: read_jsonl(out / "eval" / f"{task}.jsonl") for task in tasks}
    base = load_model(out / "base")
    table = {"base": {t: exact_match(base.model, base.tokenizer, evals[t]) for t in tasks}}
    for name in tasks:
        loaded = load_model(out / "base")
        apply_adapter(loaded.model, read_adapter(out / "adapters" / f"{name}.safetensors"))
        table[name] = {t: exact_match(loaded.model, base.tokenizer, evals[t]) for t in tasks}
    named = {
        t: [task_record(t, r["prompt"].removesuffix("="), named=True) for r in evals[t]]
        for t in tasks
    }
    table["base, task named"] = {
        t: exact_match(base.model, base.tokenizer, named[t]) for t in tasks
    }
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"{'model / eval set':<18}" + "".join(f"{c:>9}" for c in columns)]
    for row, accs in table.items():
        lines.append(f"{row:<18}" + "".join(f"{100 * accs[c]:8.1f}%" for c in columns))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The whole recipe


def build_demo(out: Path, recipe: Recipe) -> dict:
    """Every stage, in order; returns the report (also written to ``out/report.json``)."""
    torch.set_num_threads(recipe.threads)
    seconds, t_all = {}, time.perf_counter()

    t0 = time.perf_counter()
    tokenizer = write_tokenizer(out / "base", recipe.max_positions)
    words = eval_words(recipe)
    held_out = set(words)
    for task in ADAPTER_TASKS:
        write_jsonl(
            out / "eval" / f"{task}.jsonl", [task_record(task, w, named=False) for w in words]
        )
        write_jsonl(out / "train" / f"{task}.jsonl", adapter_records(recipe, task, held_out))
    seconds["data"] = _stage("data", t0)

    t0 = time.perf_counter()
    model = build_base(recipe)
    losses = pretrain(model, tokenizer, pretraining_records(recipe, held_out), recipe)
    write_base(out / "base", model, recipe)
    seconds["base"] = _stage("base pretraining", t0)

    # The trainer records its --base in each adapter file; "demo" keeps the shipped files free
    # of this machine's paths (and it is the same folder).
    base = "demo" if out.resolve() == DEMO_DIR else str(out / "base")
    trainer = {}
    for task in ADAPTER_TASKS:
        t0 = time.perf_counter()
        result = train_adapter(recipe, out, task, base)
        trainer[task] = {
            "steps": result.steps,
            "train_loss": round(result.train_loss, 5),
            "exact_match_before": result.base_exact_match,
            "exact_match_after": result.eval_exact_match,
            "adapter_version": result.adapter_version,
        }
        seconds[f"adapter {task}"] = _stage(f"adapter {task}", t0)

    t0 = time.perf_counter()
    table = accuracy_table(out, ADAPTER_TASKS)
    seconds["table"] = _stage("accuracy table", t0)
    seconds["total"] = round(time.perf_counter() - t_all, 1)

    report = {
        "accuracy": table,
        "seconds": seconds,
        "base": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5),  # last 20 steps
        },
        "trainer": trainer,
        "recipe": asdict(recipe),
        "torch": torch.__version__,
    }
    _write_json(out / "report.json", report)
    print(f"\n{format_table(table)}\n\nwall time {seconds['total']:.0f}s; {out / 'report.json'}")
    return report


def _stage(name: str, t0: float) -> float:
    elapsed = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {elapsed:.1f}s", flush=True)
    return elapsed


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Recipe()
    parser = argparse.ArgumentParser(
        prog="python -m loraserve.adapters.demo_recipe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="where to write the demo")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch CPU threads (bytes depend)"
    )
    args = parser.parse_args(argv)
    build_demo(args.out, dataclasses.replace(defaults, seed=args.seed, threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
