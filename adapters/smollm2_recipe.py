"""Chat adapters for SmolLM2-135M-Instruct (``--model smollm2``), made by the project's own
trainer from data the base model writes itself.

    python -m loraserve.adapters.smollm2_recipe [--out DIR] [--threads 2] [--only NAME ...]

What it writes under DIR (default ``adapters/smollm2``, what ships in the package):

    questions.json   the generated questions, split into train and held-out eval sets
    answers.json     the base model's own greedy answer to every question (no system prompt)
    train/NAME.jsonl chat records ({"messages": [user, assistant]}) the adapter is trained on,
                     and NAME.result.json: what training it gave (a rerun reuses it while the
                     data and the recipe are the same)
    adapters/NAME.safetensors   written by ``loraserve.adapters.train.train``
    eval.json        every held-out question's answer, by the base alone and by each adapter
    report.json      the behaviour table (each check's pass rate, base vs adapter, held-out
                     questions), training time per adapter, the recipe

How the data is made (self-distillation, no download): questions come from templates over
topic lists (held-out questions use topics no training question uses); the base answers each
one greedily; each behaviour rewrites that answer by a fixed rule, and a record is kept only
when the rewrite passes the behaviour's own check. The adapter learns to answer that way
without being asked. A behaviour is one a person sees at once and a program can check:

    short   one short sentence (at most 20 words)
    json    a JSON object {"answer": "..."} and nothing else
    bullets a bulleted list, one short point per line

The checks are ``BEHAVIOURS[name].check``; the tests run them on answers sampled through the
server. Attention-only rank-8 adapters keep the shipped files small (README.md gives sizes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.adapters.chat_template import ChatTemplate
from loraserve.adapters.format import apply_adapter, read_adapter
from loraserve.adapters.models import load_model
from loraserve.adapters.models.generate import greedy_generate
from loraserve.adapters.models.names import model_folder
from loraserve.adapters.train import TrainConfig, train

RECIPE_DIR = Path(__file__).resolve().parent / "smollm2"

# --------------------------------------------------------------------------------------------
# Questions: templates over topics. Held-out questions use held-out topics.


def _topics(text: str) -> list[str]:
    """One topic per comma-separated item."""
    return [t.strip() for t in text.replace("\n", " ").split(",") if t.strip()]


CONCEPTS = _topics(
    """photosynthesis, gravity, democracy, electricity, the internet, vaccines, recycling,
    exercise, music, friendship, inflation, evolution, volcanoes, earthquakes, the moon, the sun,
    rainbows, clouds, rain, snow, tides, magnets, batteries, computers, robots, bridges,
    airplanes, trains, bicycles, coffee, tea, chocolate, bread, cheese, honey, rice, soap,
    glass, paper, plastic, cotton, steel, gold, oxygen, salt, sugar, vitamins, sleep, dreams,
    memory, laughter, kindness, patience, honesty, teamwork, leadership, history, mathematics,
    chemistry, physics, biology, astronomy, geography, poetry, painting, photography, dancing,
    libraries, museums, newspapers, maps, clocks, money, banks, taxes, elections, hospitals,
    farming, forests, deserts, oceans, rivers, mountains, glaciers, wind power, solar power,
    nuclear energy, climate change, pollution, bees, ants, sharks, whales, dolphins, owls"""
)
ACTIVITIES = _topics(
    """bake bread, learn a new language, plant a tree, save money, start running, cook rice,
    write a good essay, make friends at a new school, study for an exam, sleep better,
    learn to swim, take care of a cat, grow tomatoes, paint a room, fix a flat tire,
    prepare for a job interview, learn to play the guitar, reduce stress, drink more water,
    keep a houseplant alive, organize my desk, write a short story, train a puppy,
    make a cup of coffee, learn to draw, speak in public, wake up early, eat more vegetables,
    read more books, clean a kitchen, pack for a trip, make pancakes, stay focused,
    learn to code, start a garden, be more patient, take better photos, ride a bike,
    memorize a poem, make a budget, write a thank-you note, plan a birthday party,
    learn chess, improve my handwriting, stay warm in winter, make a paper airplane,
    brew green tea, care for a goldfish, build a birdhouse, tie a tie"""
)
TEMPLATES = {
    "concept": [
        "Tell me about {}.",
        "Explain {} in simple terms.",
        "What is interesting about {}?",
        "Give me a fact about {}.",
        "What should everyone know about {}?",
    ],
    "activity": [
        "How do I {}?",
        "Give me a tip to {}.",
        "What is the best way to {}?",
        "Can you help me {}?",
    ],
}
EVAL_FRACTION = 0.2  # of the topics of each kind


def make_questions(seed: int = 0) -> dict[str, list[str]]:
    """{"train": [...], "eval": [...]}: every template over every topic, the topics split."""
    rng = random.Random(seed)
    split: dict[str, list[str]] = {"train": [], "eval": []}
    for kind, topics in (("concept", CONCEPTS), ("activity", ACTIVITIES)):
        topics = sorted(topics)
        rng.shuffle(topics)
        n_eval = round(EVAL_FRACTION * len(topics))
        for part, chosen in (("eval", topics[:n_eval]), ("train", topics[n_eval:])):
            for topic in chosen:
                for template in TEMPLATES[kind]:
                    q = template.format(topic)
                    split[part].append(q[0].upper() + q[1:])
    for part in split.values():
        rng.shuffle(part)
    return split


# --------------------------------------------------------------------------------------------
# Behaviours: a rewrite of the base's answer, and the check a program runs on any answer.

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(text: str) -> list[str]:
    """The complete sentences of ``text`` (a trailing fragment is dropped)."""
    text = " ".join(text.split())
    parts = _SENTENCE_END.split(text)
    return [p for p in parts if p and p[-1] in ".!?"]


def _first(answer: str, n: int, max_words: int) -> str | None:
    chosen = sentences(answer)[:n]
    text = " ".join(chosen)
    if not chosen or len(text.split()) > max_words:
        return None
    return text


def is_one_short_sentence(text: str, max_words: int = 20) -> bool:
    text = text.strip()
    return (
        bool(text)
        and "\n" not in text
        and text[-1] in ".!?"
        and 3 <= len(text.split()) <= max_words
        and len(_SENTENCE_END.split(text)) == 1
    )


def is_answer_json(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"answer"}
        and isinstance(value["answer"], str)
        and bool(value["answer"].strip())
    )


def is_bulleted_list(text: str) -> bool:
    lines = text.strip().split("\n")
    return len(lines) >= 2 and all(
        line.startswith("- ") and len(line[2:].split()) >= 2 for line in lines
    )


def _bulleted(answer: str) -> str | None:
    """The answer's first two or three sentences, one per line as ``- `` bullets."""
    chosen = [s for s in sentences(answer)[:3] if len(s.split()) <= 25]
    return "\n".join(f"- {s}" for s in chosen) if len(chosen) >= 2 else None


def _then(text: str | None, fn: Callable[[str], str]) -> str | None:
    return None if text is None else fn(text)


@dataclass(frozen=True)
class Behaviour:
    name: str
    what: str  # for people
    rewrite: Callable[[str], str | None]  # the base's answer -> the adapter's, or None
    check: Callable[[str], bool]
    epochs: int = 2
    records: int | None = None  # the recipe's number unless set


BEHAVIOURS = {
    b.name: b
    for b in (
        Behaviour(
            "short",
            "answers in one short sentence (at most 20 words)",
            lambda a: _first(a, 1, 15),  # taught shorter than checked: a margin
            is_one_short_sentence,
            epochs=3,
        ),
        Behaviour(
            "json",
            'answers as a JSON object {"answer": "..."}, nothing else',
            lambda a: _then(_first(a, 1, 30), lambda t: json.dumps({"answer": t})),
            is_answer_json,
        ),
        Behaviour(
            "bullets",
            "answers as a bulleted list, one short point per line",
            _bulleted,
            is_bulleted_list,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    answer_tokens: int = 64  # the base's answers (only their first sentences are used)
    eval_tokens: int = 96  # the budget of an evaluated answer
    batch: int = 32  # generation batch
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 2e-3
    batch_size: int = 16
    records: int = 320  # per adapter, the first that pass the check


def chat_prompts(template: ChatTemplate, tokenizer, questions: Sequence[str]) -> list[list[int]]:
    return [
        tokenizer.encode(
            template.render([{"role": "user", "content": q}], add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in questions
    ]


def answer_all(model, tokenizer, prompts, max_new_tokens: int, batch: int) -> list[str]:
    """Greedy answers, ``batch`` prompts at a time (similar lengths together)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for k in range(0, len(order), batch):
        chunk = order[k : k + batch]
        ids = greedy_generate(
            model, [prompts[i] for i in chunk], max_new_tokens, tokenizer.eos_token_ids
        )
        for i, answer in zip(chunk, ids):
            out[i] = tokenizer.decode(answer).strip()
    return out


def base_answers(out: Path, recipe: Recipe, questions: dict) -> tuple[dict[str, str], float]:
    """The base's answer to every question, and the seconds that took; kept in
    ``out/answers.json`` and read from there when the questions are the same."""
    path = out / "answers.json"
    everything = [*questions["train"], *questions["eval"]]
    if path.is_file():
        kept = json.loads(path.read_text())
        if [r["question"] for r in kept["answers"]] == everything:
            return {r["question"]: r["answer"] for r in kept["answers"]}, kept["seconds"]
    t0 = time.perf_counter()
    loaded = load_model(model_folder("smollm2"), torch.device("cpu"), torch.float32)
    template = ChatTemplate.from_folder(loaded.path)
    prompts = chat_prompts(template, loaded.tokenizer, everything)
    with torch.no_grad():
        answers = answer_all(
            loaded.model.eval(), loaded.tokenizer, prompts, recipe.answer_tokens, recipe.batch
        )
    seconds = round(time.perf_counter() - t0, 1)
    rows = [{"question": q, "answer": a} for q, a in zip(everything, answers)]
    path.write_text(json.dumps({"seconds": seconds, "answers": rows}, indent=0) + "\n")
    return dict(zip(everything, answers)), seconds


def training_records(
    behaviour: Behaviour, questions: Sequence[str], answers: dict, limit: int
) -> list:
    records = []
    for q in questions:
        if len(records) == limit:
            break
        target = behaviour.rewrite(answers[q])
        if target and behaviour.check(target):
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": target},
                    ]
                }
            )
    return records


def train_behaviour(out: Path, recipe: Recipe, name: str, threads: int):
    data = out / "train" / f"{name}.jsonl"
    return train(
        TrainConfig(
            data=data,
            out=out / "adapters" / f"{name}.safetensors",
            base="smollm2",
            rank=recipe.rank,
            alpha=recipe.alpha,
            targets=recipe.targets,
            lr=recipe.lr,
            batch_size=recipe.batch_size,
            epochs=BEHAVIOURS[name].epochs,
            seed=recipe.seed,
            threads=threads,
            max_len=256,
        )
    )


def behaviour_table(out: Path, recipe: Recipe, questions: Sequence[str], names) -> dict:
    """Each behaviour's check on the held-out answers of the base alone and of its adapter."""
    loaded = load_model(model_folder("smollm2"), torch.device("cpu"), torch.float32)
    template = ChatTemplate.from_folder(loaded.path)
    prompts = chat_prompts(template, loaded.tokenizer, questions)
    model = loaded.model.eval()
    with torch.no_grad():
        outputs = {"base": answer_all(model, loaded.tokenizer, prompts, recipe.eval_tokens, 32)}
        for name in names:
            apply_adapter(model, read_adapter(out / "adapters" / f"{name}.safetensors"))
            outputs[name] = answer_all(model, loaded.tokenizer, prompts, recipe.eval_tokens, 32)
    table = {}
    for name in names:
        check = BEHAVIOURS[name].check
        table[name] = {
            "base": sum(map(check, outputs["base"])) / len(questions),
            "adapter": sum(map(check, outputs[name])) / len(questions),
        }
    answers = [
        {"question": q, **{who: texts[i] for who, texts in outputs.items()}}
        for i, q in enumerate(questions)
    ]
    (out / "eval.json").write_text(json.dumps(answers, indent=1) + "\n")
    samples = {who: dict(zip(questions[:3], texts[:3])) for who, texts in outputs.items()}
    return {"table": table, "samples": samples, "questions": len(questions)}


def build(out: Path, recipe: Recipe, names: Sequence[str], threads: int) -> dict:
    """Every stage into ``out``. A stage whose inputs are unchanged is not run again: the base's
    answers (same questions), an adapter (same data and recipe: ``train/NAME.result.json``)."""
    torch.set_num_threads(threads)
    for folder in (out, out / "train", out / "adapters"):
        folder.mkdir(parents=True, exist_ok=True)
    questions = make_questions(recipe.seed)
    (out / "questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    answers, seconds = base_answers(out, recipe, questions)
    stages = {"base answers": seconds}
    trained = {}
    for name in names:
        limit = BEHAVIOURS[name].records or recipe.records
        records = training_records(BEHAVIOURS[name], questions["train"], answers, limit)
        data = "".join(json.dumps(r) + "\n" for r in records)
        (out / "train" / f"{name}.jsonl").write_text(data)
        trained[name] = train_once(out, recipe, name, threads, data, len(records))
        stages[f"train {name}"] = trained[name]["seconds"]
    t0 = time.perf_counter()
    evaluation = behaviour_table(out, recipe, questions["eval"], names)
    stages["evaluation"] = round(time.perf_counter() - t0, 1)
    report = {
        "recipe": _recipe_dict(recipe),
        "behaviours": {n: BEHAVIOURS[n].what for n in names},
        "trained": trained,
        **evaluation,
        "seconds": stages,
        "threads": threads,
        "torch": torch.__version__,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _recipe_dict(recipe: Recipe) -> dict:
    return recipe.__dict__ | {"targets": list(recipe.targets)}


def train_once(out: Path, recipe: Recipe, name: str, threads: int, data: str, n: int) -> dict:
    """Train ``name``'s adapter unless ``train/NAME.result.json`` says it was trained on this
    very data with this recipe and the file is still the one it wrote."""
    adapter = out / "adapters" / f"{name}.safetensors"
    result_path = out / "train" / f"{name}.result.json"
    key = {
        "data_sha256": hashlib.sha256(data.encode()).hexdigest(),
        "recipe": _recipe_dict(recipe),
        "epochs": BEHAVIOURS[name].epochs,
    }
    if result_path.is_file() and adapter.is_file():
        kept = json.loads(result_path.read_text())
        if kept["key"] == key and kept["version"] == read_adapter(adapter).version:
            return kept["result"]
    t0 = time.perf_counter()
    result = train_behaviour(out, recipe, name, threads)
    info = {
        "records": n,
        "steps": result.steps,
        "train_loss": round(result.train_loss, 4),
        "trainable_params": result.trainable_params,
        "seconds": round(time.perf_counter() - t0, 1),
        "version": result.adapter_version,
        "bytes": result.path.stat().st_size,
    }
    result_path.write_text(
        json.dumps({"key": key, "version": result.adapter_version, "result": info}, indent=1) + "\n"
    )
    return info


def format_table(report: dict) -> str:
    """The behaviour table of ``report.json`` as Markdown (both READMEs show it; a test checks
    they match the report)."""
    n = report["questions"]
    lines = [
        f"| adapter | behaviour | its check on {n} held-out questions: adapter | base alone "
        "| training (2 CPU cores) | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in report["table"].items():
        trained = report["trained"][name]
        lines.append(
            f"| `{name}` | {report['behaviours'][name]} | **{row['adapter']:.1%}** "
            f"| {row['base']:.1%} | {trained['steps']} steps, {trained['seconds'] / 60:.1f} min "
            f"| {trained['bytes'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RECIPE_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(BEHAVIOURS), choices=list(BEHAVIOURS))
    args = parser.parse_args(argv)
    report = build(args.out, Recipe(), args.only, args.threads)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
