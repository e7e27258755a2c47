"""Adapter mixtures served: PEFT parity, batching, versions, errors, both APIs.

- Parity: our batched layers routing a mixture equal PEFT's ``add_weighted_adapter(...,
  combination_type="cat")`` of the same adapters and weights (fp32 logits within 1e-4, every
  backend), and a one-member mixture of weight 1 equals the plain adapter exactly.
- The server: mixtures batched with single-adapter and base rows give each row what it gets
  alone, and equal the trainer-side reference decode of the "cat" adapter built by hand; the
  response names each member's version; a member upgraded or deleted mid-request leaves the
  running request on the versions it started with; bad mixtures fail alone with a clear error;
  the OpenAI API takes the ``a:0.7+b:0.3`` spelling. (Access control per member: test_auth.)
"""

from __future__ import annotations

import os
import queue

import grpc
import openai
import pytest
import torch
from loraserve.adapters.format import LoRAConfig, build_adapter, read_adapter, write_adapter
from loraserve.adapters.kernels import cpu as cpu_kernels
from loraserve.adapters.lora import replace_linear_with_batched_lora
from loraserve.adapters.models import load_model
from loraserve.client import LoraClient
from loraserve.server.engine import (
    FinishEvent,
    GenerationRequest,
    MixtureMember,
    TokenEvent,
)
from loraserve.server.errors import AdapterNotFound
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams
from loraserve.v1 import inference_pb2 as pb
from peft import LoraConfig, PeftModel, get_peft_model

from tests.checkpoints import VOCAB, hf_model, make_llama
from tests.grpc_server import ServerThread
from tests.serving import random_adapter, reference_greedy, serving_config

ATOL = 1e-4
WEIGHTS = (0.7, -0.4)


# ---------------------------------------------------------------------------- PEFT parity


def peft_pair(tmp_path):
    """A llama checkpoint, two PEFT adapters of different ranks and scales saved as folders,
    and the PeftModel holding both plus their "cat" combination, ``mix``."""
    checkpoint = make_llama(tmp_path)
    folders = {}
    for name, seed, config in (
        ("a", 1, {"r": 8, "lora_alpha": 16}),
        ("b", 2, {"r": 4, "lora_alpha": 4, "use_rslora": True}),
    ):
        torch.manual_seed(seed)
        lora = LoraConfig(
            init_lora_weights=False, lora_dropout=0.0, target_modules="all-linear", **config
        )
        folders[name] = tmp_path / name
        get_peft_model(hf_model(checkpoint), lora).save_pretrained(folders[name])
    peft_model = PeftModel.from_pretrained(hf_model(checkpoint), folders["a"], adapter_name="a")
    peft_model.load_adapter(folders["b"], adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], list(WEIGHTS), "mix", combination_type="cat")
    return checkpoint, folders, peft_model.eval()


def peft_logits(peft_model, adapter: str, ids) -> torch.Tensor:
    peft_model.set_adapter(adapter)
    with torch.no_grad():
        return peft_model(input_ids=ids).logits.float()


def backends():
    yield "loop"
    yield "segment"
    yield "gather"
    if cpu_kernels.available() or os.environ.get("CI") == "true":
        yield "gather+op"


def test_mixture_matches_peft_cat(tmp_path):
    checkpoint, folders, peft_model = peft_pair(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(peft_model, "mix", ids)
    plain_a = peft_logits(peft_model, "a", ids)
    adapters = [read_adapter(folders[n]) for n in ("a", "b")]
    for backend in backends():
        loaded = load_model(checkpoint)
        table = replace_linear_with_batched_lora(
            loaded.model, "all-linear", 4, 16, backend=backend.split("+")[0]
        )
        if backend.endswith("+op"):
            table.context.row_op = cpu_kernels.lora_rows
        for slot, adapter in enumerate(adapters, start=1):
            table.fill(slot, {n: (w.A, w.B, w.scale) for n, w in adapter.modules.items()})
        mixture = ((1, WEIGHTS[0]), (2, WEIGHTS[1]))
        with torch.no_grad():
            table.set_row_slots([mixture, mixture], ids.shape[1], "cpu")
            got = loaded.model(ids)
            table.set_row_slots([1, 1], ids.shape[1], "cpu")
            plain = loaded.model(ids)
            table.set_row_slots([((1, 1.0),), ((1, 1.0),)], ids.shape[1], "cpu")
            one = loaded.model(ids)
            # decode-shaped rows (one token each): the native op's path when it is set
            table.set_row_slots([mixture, 1], 1, "cpu")
            last = loaded.model(ids[:, -1:] * 0 + ids[:, :1])
        diff = (got - want).abs().max().item()
        effect = (want - plain_a).abs().max().item()
        print(f"\n{backend}: max|ours - peft cat| = {diff:.2e}; mixture vs a alone {effect:.2e}")
        assert diff <= ATOL and effect > 0.1
        assert (plain - plain_a).abs().max().item() <= ATOL
        assert torch.equal(one, plain)  # a one-member mixture of weight 1 is the adapter
        with torch.no_grad():
            table.set_row_slots([mixture, mixture], 1, "cpu")
            alone = loaded.model(ids[:, :1])
        torch.testing.assert_close(last[0], alone[0], atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------- the server

NEW = 10
PROMPTS = [[5, 17, 42], [7, 7, 100, 250, 3, 9], [200], [11, 12]]


def cat_adapter(model, name: str, members) -> object:
    """The "cat" combination of ``members`` ((adapter, weight) pairs) as one adapter: A blocks
    stacked, B blocks stacked with weight x scale folded in, scale 1 (what PEFT builds)."""
    loaded = load_model(model)
    first = members[0][0]
    rank = sum(a.config.r for a, _ in members)
    config = LoRAConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=first.config.target_modules,
        base_fingerprint=loaded.fingerprint,
    )
    weights = {}
    for module in first.modules:
        A = torch.cat([a.modules[module].A for a, _ in members], dim=1)
        B = torch.cat([w * a.modules[module].scale * a.modules[module].B for a, w in members])
        weights[module] = (A, B)
    return build_adapter(name, config, weights)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtures")
    model = make_llama(root / "model")
    folder = root / "adapters"
    folder.mkdir()
    adapters = {}
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        adapters[name] = random_adapter(model, name, seed=70 + i, rank=4 if i % 2 else 2)
        write_adapter(folder / f"{name}.safetensors", adapters[name])
    config = serving_config(model, folder, http_port=0, served_model_name="base-model")
    server = ServerThread(config)
    yield server, model, adapters
    server.stop()


def grpc_generate(server, prompt, adapter="", mixture=(), **fields) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        adapter=adapter,
        prompt_token_ids=prompt,
        params=pb.SamplingParams(max_new_tokens=NEW),
        adapters=[pb.AdapterWeight(name=n, weight=w) for n, w in mixture],
        **fields,
    )
    return server.stub().Generate(request, timeout=60)


def rpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


JOBS = [
    ("mix-ab", (), (("a", 0.75), ("b", 0.25))),
    ("plain-a", "a", ()),
    ("base", "", ()),
    ("mix-bcd", (), (("b", 0.5), ("c", -0.5), ("d", 1.0))),
    ("one-a", (), (("a", 1.0),)),
    ("plain-c", "c", ()),
]


def test_mixtures_batched_with_single_adapters_and_base_rows(served):
    """Every row of one batch gets what it gets alone; the mixture equals the reference decode
    of the "cat" adapter; a one-member mixture of weight 1 is the plain adapter."""
    server, model, adapters = served
    client = LoraClient(server.target)

    def run(job, prompt):
        _, adapter, mixture = job
        return client.generate(prompt, dict(mixture) if mixture else adapter, max_new_tokens=NEW)

    jobs = [(job, p) for job in JOBS for p in PROMPTS[:2]]
    alone = [run(job, p).token_ids for job, p in jobs]
    stub = server.stub()
    futures = [
        stub.Generate.future(
            pb.GenerateRequest(
                adapter=job[1] or "",
                prompt_token_ids=p,
                params=pb.SamplingParams(max_new_tokens=NEW),
                adapters=[pb.AdapterWeight(name=n, weight=w) for n, w in job[2]],
            ),
            timeout=60,
        )
        for job, p in jobs
    ]  # submitted together: one mixed batch
    together = [tuple(f.result().token_ids) for f in futures]
    assert together == alone

    by_name = {(job[0], tuple(p)): ids for (job, p), ids in zip(jobs, alone)}
    for p in PROMPTS[:2]:
        key = tuple(p)
        assert by_name[("one-a", key)] == by_name[("plain-a", key)]
        assert by_name[("mix-ab", key)] != by_name[("plain-a", key)]
        members = [(adapters["a"], 0.75), (adapters["b"], 0.25)]
        want = reference_greedy(model, cat_adapter(model, "ab", members), p, NEW)
        assert list(by_name[("mix-ab", key)]) == want

    reply = grpc_generate(server, PROMPTS[0], mixture=JOBS[0][2])
    listed = {a.name: a.version for a in client.list_adapters()}
    assert [(v.name, v.version) for v in reply.adapter_versions] == [
        ("a", listed["a"]),
        ("b", listed["b"]),
    ]
    assert reply.adapter == "" and reply.adapter_version == ""
    assert client.server_info().max_mixture == 4


def test_streams_chat_and_score_take_mixtures(served):
    server, _, _ = served
    client = LoraClient(server.target)
    mixture = {"a": 0.75, "b": 0.25}
    whole = client.generate(PROMPTS[1], mixture, max_new_tokens=NEW)
    chunks = list(client.stream(PROMPTS[1], mixture, max_new_tokens=NEW))
    assert sum((c.token_ids for c in chunks), ()) == whole.token_ids
    assert (
        chunks[-1].adapter_versions == whole.adapter_versions and len(whole.adapter_versions) == 2
    )
    scores = client.score("hello", [" world", " there"], mixture)
    assert len(scores) == 2 and all(s.logprob < 0 for s in scores)
    plain = client.score("hello", [" world", " there"], "a")
    assert scores[0].logprob != plain[0].logprob


def test_bad_mixtures_fail_alone(served):
    server, _, _ = served
    stub = server.stub()
    cases = [
        (dict(adapter="a", mixture=(("b", 1.0),)), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (
            dict(mixture=tuple((n, 0.2) for n in "abcde")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 4",
        ),
        (dict(mixture=(("a", 1.0), ("a", 2.0))), grpc.StatusCode.INVALID_ARGUMENT, "'a' more"),
        (
            dict(mixture=(("a", float("nan")), ("b", 1.0))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "adapters[0].weight",
        ),
        (dict(mixture=(("a", 1.0), ("b", 1e9))), grpc.StatusCode.INVALID_ARGUMENT, "[1].weight"),
        (dict(mixture=(("a", 1.0), ("../x", 1.0))), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (dict(mixture=(("a", 1.0), ("nope", 1.0))), grpc.StatusCode.NOT_FOUND, "nope"),
    ]
    for fields, code, words in cases:
        got, details = rpc_error(lambda f=fields: grpc_generate(server, PROMPTS[0], **f))
        assert got is code and words in details, (fields, got, details)
    assert grpc_generate(server, PROMPTS[0], mixture=(("a", 0.5),)).completion_tokens == NEW
    del stub


def test_openai_api_spells_mixtures_in_model(served):
    server, _, _ = served
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="x", max_retries=0
    )
    want = LoraClient(server.target).generate(
        "hello there", {"a": 0.75, "b": 0.25}, max_new_tokens=6
    )
    reply = api.completions.create(
        model="a:0.75+b:0.25", prompt="hello there", max_tokens=6, temperature=0
    )
    assert reply.choices[0].text == want.text and reply.model == "a:0.75+b:0.25"
    for model, status, words in (
        ("a:x+b:1", 400, "not a number"),
        ("a:1+nope:1", 404, "nope"),
        ("a:1+a:1", 400, "more than once"),
        ("a:1+b:1+c:1+d:1+e:1", 400, "at most 4"),
    ):
        with pytest.raises(openai.APIStatusError) as info:
            api.completions.create(model=model, prompt="hi", max_tokens=2)
        assert info.value.status_code == status and words in info.value.message, model
    card = api.models.retrieve("a:0.5+b:0.5")
    assert card.id == "a:0.5+b:0.5"


def test_member_upgraded_or_deleted_mid_request(tmp_path):
    """Once a mixture runs, its members' slots are pinned: an upgrade of one and the deletion
    of the other, landing after its first token, change nothing for it (same tokens as a run
    on the old versions, the old versions reported); requests after them see the new state."""
    model = make_llama(tmp_path / "model")
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, name in enumerate(["a", "b"]):
        write_adapter(folder / f"{name}.safetensors", random_adapter(model, name, seed=90 + i))
    runtime = Runtime(serving_config(model, folder, max_active_adapters=4)).start()
    try:
        engine = runtime.engine
        mixture = (MixtureMember("a", 0.6), MixtureMember("b", 0.4))
        request = GenerationRequest(
            tuple(PROMPTS[1]), SamplingParams(max_new_tokens=NEW), mixture=mixture
        )
        before = engine.generate(request)
        old = {n: runtime.registry.resolve(n).version for n in ("a", "b")}
        assert before.adapter_versions == (("a", old["a"]), ("b", old["b"]))

        events: queue.SimpleQueue = queue.SimpleQueue()
        changed = []
        staged = tmp_path / "staging" / "a.safetensors"
        staged.parent.mkdir()
        write_adapter(staged, random_adapter(model, "a", seed=99))

        def on_event(event):  # runs on the engine thread: the request is mid-flight
            if isinstance(event, TokenEvent) and not changed:
                os.replace(staged, folder / "a.safetensors")
                os.unlink(folder / "b.safetensors")
                runtime.registry.scan()
                changed.append(runtime.registry.resolve("a").version)
            events.put(event)

        engine.submit(request, on_event=on_event)
        got, last = [], None
        while last is None:
            event = events.get(timeout=60)
            if isinstance(event, FinishEvent):
                last = event
            else:
                got.extend(event.token_ids)
        assert changed and changed[0] != old["a"]
        assert got == list(before.token_ids)
        assert last.adapter_versions == (("a", old["a"]), ("b", old["b"]))
        with pytest.raises(AdapterNotFound):
            engine.submit(request)
        after = engine.generate(
            GenerationRequest(tuple(PROMPTS[1]), SamplingParams(max_new_tokens=NEW), "a")
        )
        assert after.adapter_version == changed[0]
    finally:
        runtime.stop()


def test_a_weighted_single_adapter_and_the_default_weight(served):
    """A one-member mixture of weight 0.5 is not the plain adapter; a member sent without a
    weight weighs 1 (so it is the plain adapter); over 16 members are refused unread."""
    server, _, _ = served
    half = grpc_generate(server, PROMPTS[1], mixture=(("a", 0.5),)).token_ids
    plain = grpc_generate(server, PROMPTS[1], adapter="a").token_ids
    request = pb.GenerateRequest(
        prompt_token_ids=PROMPTS[1],
        params=pb.SamplingParams(max_new_tokens=NEW),
        adapters=[pb.AdapterWeight(name="a")],
    )
    assert server.stub().Generate(request, timeout=60).token_ids == plain != half
    request.adapters.extend(pb.AdapterWeight(name="b") for _ in range(20))
    code, details = rpc_error(lambda: server.stub().Generate(request, timeout=60))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "at most 16" in details
