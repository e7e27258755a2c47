"""Structured output: JSON-schema, JSON-object, regex and choice constraints.

Through a real server on the demo model (its character vocabulary goes through llguidance's
token-list path; SmolLM2's byte-level BPE is tested in test_smollm2_adapters.py): hundreds of
completions sampled at temperature 1 across several schemas, patterns and choice lists, every
finished one parsing and validating (jsonschema, an oracle independent of the grammar engine);
constrained rows next to free rows and other adapters' rows, the free rows' greedy tokens equal
to their solo runs; max tokens, stop strings, streaming, mixtures; every kind of bad constraint
refused with INVALID_ARGUMENT naming it; the OpenAI API's response_format and guided_* fields.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
import torch
from loraserve.adapters.demo_paths import demo_adapters_dir
from loraserve.client import Constraint, LoraClient
from loraserve.server.errors import InvalidRequest
from loraserve.server.grammar import Constraint as EngineConstraint
from loraserve.server.grammar import Grammars, allowed_bias
from loraserve.v1 import inference_pb2 as pb

from tests.grpc_server import ServerThread
from tests.serving import serving_config

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["a", "b", "c"]},
                "maxItems": 2,
            },
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "answer": {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 12}},
        "required": ["answer"],
        "additionalProperties": False,
    },
    "flags": {
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 1,
        "maxItems": 4,
    },
    "enum": {"enum": ["red", "green", 3, None]},
}
REGEXES = [r"[0-9]{3}-[a-z]{2,8}", r"(yes|no)!", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}"]
CHOICES = [("alpha", "beta", "gamma"), ("only",)]
WINDOW = 64  # positions the demo model holds
NEW = WINDOW - 8


@pytest.fixture(scope="module")
def server():
    config = serving_config(
        Path("demo"),
        demo_adapters_dir(),
        http_port=0,
        max_lora_rank=16,
        max_seq_len=160,
        max_batch_size=32,
        max_queue=512,  # the sampling test queues 260 requests at once
    )
    torch.set_num_threads(1)
    server = ServerThread(config)
    yield server
    server.stop()


def cases():
    """(constraint, validate) for every schema, regex and choice list."""
    out = []
    for schema in SCHEMAS.values():
        out.append(
            (
                Constraint(json_schema=schema),
                lambda t, s=schema: jsonschema.validate(json.loads(t), s),
            )
        )
    out.append((Constraint(json_object=True), lambda t: _is_object(json.loads(t))))
    for pattern in REGEXES:
        out.append((Constraint(regex=pattern), lambda t, p=pattern: _full(p, t)))
    for choices in CHOICES:
        out.append((Constraint(choices=choices), lambda t, c=choices: _one_of(t, c)))
    return out


def _is_object(value) -> None:
    assert isinstance(value, dict)


def _full(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), (pattern, text)


def _one_of(text: str, choices) -> None:
    assert text in choices, (text, choices)


def test_sampled_outputs_parse_and_validate(server):
    """Hundreds of completions at temperature 1: every one that finished (STOP) is valid."""
    stub = server.stub()
    prompts = ["abc=", "hello=", "x", "json: "]
    jobs = []
    for k, (constraint, validate) in enumerate(cases()):
        for j in range(26):
            request = pb.GenerateRequest(
                adapter=["", "upper", "reverse"][j % 3],
                prompt=prompts[j % len(prompts)],
                params=pb.SamplingParams(
                    max_new_tokens=NEW,
                    temperature=1.0,
                    seed=1000 * k + j,
                    constraint=constraint.to_pb(),
                ),
            )
            jobs.append((k, validate, stub.Generate.future(request, timeout=120)))
    finished = [0] * len(cases())
    for k, validate, future in jobs:
        reply = future.result()
        if reply.finish_reason == pb.STOP:
            validate(reply.text)
            finished[k] += 1
        else:  # the budget ran out first: a prefix of a valid output
            assert reply.finish_reason == pb.LENGTH and reply.completion_tokens == NEW
    print(f"\nfinished (valid) of 26 per constraint: {finished}")
    assert len(jobs) >= 250 and sum(finished) >= 0.8 * len(jobs)


def test_free_rows_are_unchanged_by_constrained_neighbours(server):
    client = LoraClient(server.target)
    free = [("upper", "hello="), ("reverse", "abcdef="), ("", "xyz="), ("sort", "dcba=")]
    alone = [client.generate(p, a, max_new_tokens=12).token_ids for a, p in free]
    stub = server.stub()
    futures = []
    for i, (adapter, prompt) in enumerate(free * 4):  # free rows between constrained ones
        futures.append(
            stub.Generate.future(
                pb.GenerateRequest(
                    adapter=adapter, prompt=prompt, params=pb.SamplingParams(max_new_tokens=12)
                ),
                timeout=60,
            )
        )
        params = pb.SamplingParams(
            max_new_tokens=24,
            temperature=0.8,
            seed=i,
            constraint=Constraint(json_schema=SCHEMAS["answer"]).to_pb(),
        )
        futures.append(
            stub.Generate.future(pb.GenerateRequest(prompt=prompt, params=params), timeout=60)
        )
    together = [tuple(f.result().token_ids) for f in futures[0::2]]
    assert together == [tuple(t) for t in alone] * 4


def test_greedy_constrained_rows_batch_invariant_with_adapters_and_mixtures(server):
    client = LoraClient(server.target)
    constraint = Constraint(regex=r"[A-Z]{2,6}!")
    targets = ["upper", {"upper": 0.5, "reverse": 0.5}, ""]
    alone = [
        client.generate("hello=", t, constraint=constraint, max_new_tokens=10) for t in targets
    ]
    for reply in alone:
        assert re.fullmatch(r"[A-Z]{2,6}!", reply.text) and reply.finish_reason.name == "STOP"
    stub = server.stub()
    futures = [
        stub.Generate.future(
            pb.GenerateRequest(
                prompt="hello=",
                params=pb.SamplingParams(max_new_tokens=10, constraint=constraint.to_pb()),
                **(
                    {"adapter": t}
                    if isinstance(t, str)
                    else {"adapters": [pb.AdapterWeight(name=n, weight=w) for n, w in t.items()]}
                ),
            ),
            timeout=60,
        )
        for t in targets * 3
    ]
    assert [f.result().text for f in futures] == [r.text for r in alone] * 3


def test_budget_stop_strings_and_streaming(server):
    client = LoraClient(server.target)
    schema = Constraint(json_schema=SCHEMAS["person"])
    short = client.generate("x", constraint=schema, max_new_tokens=3, temperature=1.0, seed=3)
    assert short.finish_reason.name == "LENGTH" and short.text.startswith("{")
    stopped = client.generate(
        "x", constraint=Constraint(regex=r"ab(cd)+"), max_new_tokens=40, stop=["c"]
    )
    assert stopped.text == "ab" and stopped.finish_reason.name == "STOP"
    chunks = list(
        client.stream("x", constraint=schema, max_new_tokens=NEW, temperature=1.0, seed=5)
    )
    text = "".join(c.text for c in chunks)
    if chunks[-1].finish_reason.name == "STOP":
        jsonschema.validate(json.loads(text), SCHEMAS["person"])
    else:  # out of tokens, never anything else
        assert chunks[-1].finish_reason.name == "LENGTH" and chunks[-1].completion_tokens == NEW
    choice = client.generate("x", constraint=Constraint(choices=("only",)), max_new_tokens=40)
    assert choice.text == "only" and choice.finish_reason.name == "STOP"


@pytest.mark.parametrize(
    "constraint, words",
    [
        (pb.Constraint(json_schema="{not json"), "json_schema: is not valid JSON"),
        (pb.Constraint(json_schema="[1, 2]"), "must be a JSON object"),
        (pb.Constraint(json_schema='{"type": "string", "not": {"const": "a"}}'), "json_schema"),
        (pb.Constraint(json_schema="x" * 70000), "at most 65536"),
        (pb.Constraint(regex="(ab"), "constraint.regex"),
        (pb.Constraint(regex="(a{1000}){1000}"), "constraint.regex"),
        (pb.Constraint(choices=pb.Choices()), "at least one choice"),
        (pb.Constraint(choices=pb.Choices(choices=["a", ""])), "choices[1]"),
        (pb.Constraint(json_object=False), "json_object: must be true"),
        (pb.Constraint(), "is set but empty"),
    ],
)
def test_bad_constraints_are_refused_by_name(server, constraint, words):
    stub = server.stub()
    request = pb.GenerateRequest(
        prompt="x", params=pb.SamplingParams(max_new_tokens=4, constraint=constraint)
    )
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details(), info.value.details()
    assert time.monotonic() - t0 < 10  # a costly pattern is bounded, not run to the end
    assert LoraClient(server.target).generate("x", max_new_tokens=2).completion_tokens == 2


def test_each_schema_compiles_once(server):
    grammars = server.runtime.grammars
    client = LoraClient(server.target)
    schema = {"type": "object", "properties": {"k": {"const": "v"}}, "required": ["k"]}
    client.generate("x", constraint=Constraint(json_schema=schema), max_new_tokens=20)
    before = grammars.compiled
    for _ in range(3):
        reply = client.generate("x", constraint=Constraint(json_schema=schema), max_new_tokens=20)
        assert json.loads(reply.text) == {"k": "v"}
    assert grammars.compiled == before


def finished(response, max_tokens: int) -> bool:
    """Did the (one-choice) OpenAI completion end because its format was complete? If not,
    it must have run out of tokens or of the model's window: a constrained row ends in no
    other way."""
    if response.choices[0].finish_reason == "stop":
        return True
    usage = response.usage
    assert response.choices[0].finish_reason == "length"
    assert usage.completion_tokens == max_tokens or usage.total_tokens == WINDOW
    return False


def test_openai_api_response_format_and_guided_fields(server):
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="x", max_retries=0
    )
    messages = [{"role": "user", "content": "hello"}]
    schema = SCHEMAS["answer"]
    reply = api.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=40,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    if finished(reply, 40):
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    obj = api.chat.completions.create(
        model="upper", messages=messages, max_tokens=60, response_format={"type": "json_object"}
    )
    if finished(obj, 60):
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = api.completions.create(
        model="demo", prompt="x", max_tokens=20, extra_body={"guided_regex": r"(yes|no)!"}
    )
    assert regex.choices[0].text in ("yes!", "no!")
    choice = api.completions.create(
        model="demo", prompt="x", max_tokens=20, extra_body={"guided_choice": ["up", "down"]}
    )
    assert choice.choices[0].text in ("up", "down")
    guided = api.completions.create(
        model="demo", prompt="x", max_tokens=60, extra_body={"guided_json": schema}
    )
    if finished(guided, 60):
        jsonschema.validate(json.loads(guided.choices[0].text), schema)
    for body, words in (
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"guided_regex": "(ab"}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one of"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            api.completions.create(model="demo", prompt="x", max_tokens=4, extra_body=body)
        assert words in info.value.message, info.value.message


# ------------------------------------------------------------------------------- the module


def test_the_byte_table_bias_equals_unpacking_the_bits():
    mask = torch.randint(-(2**31), 2**31 - 1, (5, 4), dtype=torch.int32)
    bias = allowed_bias(mask, 120)
    bits = [[(int(w) >> b) & 1 for w in row.tolist() for b in range(32)] for row in mask]
    want = torch.tensor(bits)[:, :120].bool()
    assert torch.equal(torch.isfinite(bias), want) and bias[want].eq(0).all()


def test_grammars_refuse_before_work_and_name_the_field(tmp_path):
    grammars = Grammars(demo_adapters_dir().parent / "base" / "tokenizer.json", 98, [2])
    with pytest.raises(InvalidRequest, match="params.constraint.regex"):
        grammars.compile(EngineConstraint("regex", "a" * 5000))
    with pytest.raises(InvalidRequest, match="unknown kind"):
        grammars.compile(EngineConstraint("grammar", "x"))
    assert grammars.compiled == 0
    template = grammars.compile(EngineConstraint("choice", ("ab", "cd")))
    assert grammars.compile(EngineConstraint("choice", ("ab", "cd"))) is template
    assert grammars.compiled == 1


def test_the_cli_takes_a_constraint_and_a_mixture(server, tmp_path):
    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "loraserve.client.cli", "--target", server.target, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert cli("generate", "base", "x", "--choice", "up", "--choice", "down") in ("up", "down")
    assert re.fullmatch(r"[0-9]{3}", cli("generate", "upper", "x", "--regex", "[0-9]{3}"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["left", "right", 7]}))
    text = cli("generate", "upper:0.5+reverse:0.5", "x", "--json-schema", f"@{schema}")
    assert json.loads(text) in ("left", "right", 7)
