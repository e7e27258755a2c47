"""The OpenAI-compatible HTTP API, through the official ``openai`` client against a real server
on loopback (sync, streaming, async), raw HTTP for what the client hides (error bodies, body
caps, disconnects). The README's curl lines run in tests/test_smollm2_adapters.py, against the
model `make serve` starts.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import openai
import pytest
from loraserve.adapters.format import write_adapter

from tests.grpc_server import ServerThread
from tests.serving import random_adapter, serving_config, wait_for
from tests.test_chat import CONVERSATIONS, SMOLLM2, chat_model, hf_chat_ids


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = chat_model(root / "smol", SMOLLM2)
    adapters = root / "adapters"
    adapters.mkdir()
    for i, name in enumerate(["tenant-a", "tenant-b"]):
        write_adapter(adapters / f"{name}.safetensors", random_adapter(model, name, seed=20 + i))
    server = ServerThread(
        serving_config(
            model, adapters, http_port=0, max_seq_len=128, max_queue=8, served_model_name="smol"
        )
    )
    base = f"http://127.0.0.1:{server.server.http_port}/v1"
    yield server, base, model
    server.stop()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def post(base: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        base + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_base_and_every_adapter(api):
    server, base, _ = api
    models = client(base).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["smol", "tenant-a", "tenant-b"]
    assert models.data[1].parent == "smol"
    assert client(base).models.retrieve("tenant-a").id == "tenant-a"


def test_chat_completion_equals_grpc_chat(api):
    server, base, model = api
    from loraserve.v1 import inference_pb2 as pb

    messages = CONVERSATIONS[1]
    got = client(base).chat.completions.create(
        model="tenant-a", messages=messages, max_tokens=8, temperature=0
    )
    want = server.stub().Chat(
        pb.ChatRequest(
            adapter="tenant-a",
            messages=[pb.ChatMessage(**m) for m in messages],
            params=pb.SamplingParams(max_new_tokens=8),
        )
    )
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == {pb.STOP: "stop", pb.LENGTH: "length"}[want.finish_reason]
    assert got.usage.prompt_tokens == len(hf_chat_ids(model, messages))
    assert got.usage.completion_tokens == want.completion_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.model == "tenant-a" and got.object == "chat.completion"


def test_chat_streaming_with_usage_and_logprobs(api):
    _, base, _ = api
    kwargs = dict(model="tenant-b", messages=CONVERSATIONS[0], max_tokens=6, temperature=0)
    whole = client(base).chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    chunks = list(
        client(base).chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, logprobs=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)


def test_completions_sync_streaming_n_seed_and_echo_logprobs(api):
    server, base, _ = api
    c = client(base)
    greedy = c.completions.create(
        model="smol", prompt="The quick brown", max_tokens=5, temperature=0
    )
    assert greedy.object == "text_completion" and greedy.choices[0].finish_reason in (
        "stop",
        "length",
    )
    streamed = list(
        c.completions.create(
            model="smol", prompt="The quick brown", max_tokens=5, temperature=0, stream=True
        )
    )
    assert "".join(s.choices[0].text for s in streamed) == greedy.choices[0].text
    sampled = c.completions.create(
        model="tenant-a", prompt=["Hello", "The lazy"], max_tokens=4, n=2, seed=5, temperature=1.0
    )
    assert sorted(ch.index for ch in sampled.choices) == [0, 1, 2, 3]
    again = c.completions.create(
        model="tenant-a", prompt=["Hello", "The lazy"], max_tokens=4, n=2, seed=5, temperature=1.0
    )
    assert [ch.text for ch in again.choices] == [ch.text for ch in sampled.choices]  # seeded
    scored = c.completions.create(
        model="smol", prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "The quick brown fox"
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == "The quick brown fox"
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_async_client(api):
    _, base, _ = api

    async def run():
        c = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        answers = await asyncio.gather(
            *(
                c.chat.completions.create(
                    model=name, messages=CONVERSATIONS[0], max_tokens=4, temperature=0
                )
                for name in ("smol", "tenant-a", "tenant-b")
            )
        )
        stream = await c.chat.completions.create(
            model="tenant-a", messages=CONVERSATIONS[0], max_tokens=4, temperature=0, stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await c.close()
        return answers, text

    answers, text = asyncio.run(run())
    assert text == answers[1].choices[0].message.content
    assert len({a.model for a in answers}) == 3


def test_errors_have_openais_shape_and_status(api):
    server, base, _ = api
    c = client(base)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="nope", messages=CONVERSATIONS[0])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="smol", messages=CONVERSATIONS[0], temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="smol", messages=CONVERSATIONS[0], top_logprobs=25, logprobs=True
        )
    assert err.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="smol", prompt="hi", stop=["x"] * 17)
    assert err.value.body["param"] == "stop"
    status, body = post(base, "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post(base, "/chat/completions", json.dumps({"model": "smol"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    port = server.server.http_port  # refused from its Content-Length, before the body is read
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {5 << 20}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "x" * 100_000}]
        )
    assert err.value.body["param"] == "messages"


def test_queue_full_is_429_and_draining_is_503(tmp_path):
    from loraserve.v1 import inference_pb2 as pb

    model = chat_model(tmp_path / "m", SMOLLM2)
    (tmp_path / "a").mkdir()
    config = serving_config(
        model, tmp_path / "a", http_port=0, max_queue=1, max_batch_size=1, max_seq_len=200
    )
    server = ServerThread(config)
    base = f"http://127.0.0.1:{server.server.http_port}/v1"
    try:
        stub = server.stub()
        long = pb.SamplingParams(max_new_tokens=150)
        running = stub.GenerateStream(pb.GenerateRequest(prompt="hi", params=long))
        next(running)  # holds the only KV row ...
        waiting = stub.Generate.future(pb.GenerateRequest(prompt="hi", params=long))
        wait_for(lambda: server.runtime.engine.stats()["waiting"] == 1)  # ... and the queue
        for stream in (False, True):  # a stream is refused before its 200 goes out
            with pytest.raises(openai.RateLimitError) as err:
                client(base).completions.create(
                    model="llama", prompt="hi", max_tokens=2, stream=stream
                )
            assert err.value.body["code"] == "queue_full"  # the folder's name is the model's
        with pytest.raises(openai.BadRequestError) as err:  # never fits the queue
            client(base).completions.create(model="llama", prompt="hi", max_tokens=2, n=2)
        assert err.value.body["param"] == "n"
        running.cancel()
        waiting.cancel()
    finally:
        server.server.draining = True
        try:
            with pytest.raises(openai.InternalServerError) as err:
                client(base).completions.create(model="llama", prompt="hi", max_tokens=2)
            assert err.value.status_code == 503
        finally:
            server.stop()


def test_a_client_that_hangs_up_frees_its_sequence(api):
    server, base, _ = api
    engine = server.runtime.engine
    port = server.server.http_port
    finished = server.runtime.metrics.finished

    def cancelled() -> float:
        return finished.labels("__base__", "cancelled")._value.get()

    for stream in (True, False):
        body = json.dumps(
            {
                "model": "smol",
                "prompt": "The",
                "max_tokens": 100,
                "stream": stream,
                "temperature": 0,
            }
        ).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: engine.stats()["running"] == 1, timeout=20)
        before = cancelled()
        sock.close()
        wait_for(lambda: engine.stats()["running"] == 0, timeout=5)
        assert cancelled() == before + 1  # stopped by the hang-up, not run to its end


def test_usage_echo_streams_and_filtered_alternatives(api):
    """Usage counts each prompt once whatever n (duplicates too), streamed or not; a streamed
    echo carries its prompt's log-probabilities and offsets that run on; tokens top_p removed
    are no alternatives (no -inf in the JSON)."""
    _, base, _ = api
    c = client(base)
    kwargs = dict(model="smol", prompt=["hi", "hi"], max_tokens=3, n=2, temperature=0)
    whole = c.completions.create(**kwargs)
    one = c.completions.create(model="smol", prompt="hi", max_tokens=3, temperature=0)
    assert whole.usage.prompt_tokens == 2 * one.usage.prompt_tokens
    assert whole.usage.completion_tokens == 4 * one.usage.completion_tokens
    chunks = list(
        c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    echo = dict(model="smol", prompt="The quick brown", max_tokens=4, temperature=0)
    full = c.completions.create(**echo, echo=True, logprobs=2)
    parts = list(c.completions.create(**echo, echo=True, logprobs=2, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    tokens = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert tokens == full.choices[0].logprobs.tokens
    assert offsets == full.choices[0].logprobs.text_offset

    narrow = c.chat.completions.create(
        model="smol",
        messages=CONVERSATIONS[0],
        max_tokens=4,
        temperature=1.0,
        top_p=0.01,
        seed=3,
        logprobs=True,
        top_logprobs=5,
    )
    for token in narrow.choices[0].logprobs.content:
        assert 1 <= len(token.top_logprobs) < 5  # top_p kept only the likeliest few
