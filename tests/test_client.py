"""The client package against a real gRPC server on loopback with a fake servicer.

The fake records what arrives (requests, metadata, call counts, cancellation) and answers with
canned responses or scripted errors; the real servicer is tested elsewhere. Covered: typed
round trips for all four RPCs (sync and async), the x-lora-adapter metadata, unset sampling
fields staying unset, status code -> exception class, UNAVAILABLE retries and their bound,
cancellation of a stream closed early, TLS, and the ``loraserve`` CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest
from loraserve.client import (
    AdapterInfo,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterState,
    AsyncLoraClient,
    Completion,
    DeadlineExceededError,
    FinishReason,
    InvalidArgumentError,
    LoraClient,
    LoraServeError,
    OverloadedError,
    SamplingParams,
    ServerInfo,
    UnavailableError,
)
from loraserve.client.cli import main
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

STREAM_PIECES = ("Hel", "lo", " world")
VERSION = "3f2a9c" + "0" * 58
SERVER_INFO = pb.ServerInfo(
    base_model="demo",
    architecture="llama",
    base_fingerprint="fp-1234",
    dtype="float32",
    device="cpu",
    vocab_size=512,
    max_seq_len=256,
    max_batch_size=8,
    max_queue=64,
    max_active_adapters=4,
    max_cached_adapters=16,
    max_lora_rank=64,
    running_requests=2,
    waiting_requests=1,
    server_version="0.1.0",
)
ADAPTERS = pb.ListAdaptersResponse(
    adapters=[
        pb.AdapterInfo(name="sql", version=VERSION, rank=8, state=pb.DEVICE, size_bytes=1572864),
        pb.AdapterInfo(
            name="broken", version="", rank=0, state=pb.INVALID, error="rank 128 > max 64"
        ),
        pb.AdapterInfo(name="poem", version="b" * 64, rank=4, state=pb.ON_DISK, size_bytes=900),
    ]
)


class FakeServicer(inference_pb2_grpc.LoraInferenceServicer):
    """Records every call; ``failures`` are (code, details) aborts consumed one per call."""

    def __init__(self):
        self.calls = Counter()
        self.requests: list = []
        self.metadata: list[dict[str, str]] = []
        self.failures: list[tuple[grpc.StatusCode, str]] = []
        self.slow_s = 0.0  # Generate waits this long (while the call is alive)
        self.stream_mode = "finite"  # or "forever" (until cancelled), "fail_after_first"
        self.stream_ended = threading.Event()

    def _begin(self, method: str, request, context) -> None:
        self.calls[method] += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.failures:
            context.abort(*self.failures.pop(0))

    def Generate(self, request, context):
        self._begin("Generate", request, context)
        deadline = time.monotonic() + self.slow_s
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return pb.GenerateResponse(
            text="Hello world",
            token_ids=[15496, 995],
            finish_reason=pb.LENGTH,
            prompt_tokens=len(request.prompt_token_ids) or 3,
            completion_tokens=2,
            adapter=request.adapter,
            adapter_version=VERSION if request.adapter else "",
            request_id=request.request_id,
        )

    def GenerateStream(self, request, context):
        self._begin("GenerateStream", request, context)
        context.add_callback(self.stream_ended.set)
        if self.stream_mode == "forever":
            while context.is_active():
                yield pb.GenerateStreamResponse(text="x", token_ids=[87])
                time.sleep(0.01)
            return
        for i, piece in enumerate(STREAM_PIECES):
            yield pb.GenerateStreamResponse(text=piece, token_ids=[100 + i])
            if self.stream_mode == "fail_after_first":
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining")
        yield pb.GenerateStreamResponse(
            finish_reason=pb.STOP,
            prompt_tokens=4,
            completion_tokens=4,
            adapter=request.adapter,
            adapter_version=VERSION,
            request_id=request.request_id,
        )

    def ListAdapters(self, request, context):
        self._begin("ListAdapters", request, context)
        return ADAPTERS

    def GetServerInfo(self, request, context):
        self._begin("GetServerInfo", request, context)
        return SERVER_INFO


def start_server(servicer, credentials=None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_LoraInferenceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def fake():
    return FakeServicer()


@pytest.fixture
def target(fake):
    server, port = start_server(fake)
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(target):
    with LoraClient(target, timeout=5) as c:
        yield c


# --- round trips and typed results -------------------------------------------------------------


def test_generate_returns_typed_completion(client, fake):
    completion = client.generate("SELECT", adapter="sql", request_id="r-1")
    assert completion == Completion(
        text="Hello world",
        token_ids=(15496, 995),
        finish_reason=FinishReason.LENGTH,
        prompt_tokens=3,
        completion_tokens=2,
        adapter="sql",
        adapter_version=VERSION,
        request_id="r-1",
    )
    assert completion.finish_reason == "length"
    (request,) = fake.requests
    assert request.prompt == "SELECT" and list(request.prompt_token_ids) == []


def test_token_id_prompt_goes_in_prompt_token_ids(client, fake):
    completion = client.generate([5, 6, 7, 8], adapter="sql")
    (request,) = fake.requests
    assert list(request.prompt_token_ids) == [5, 6, 7, 8]
    assert request.prompt == ""
    assert completion.prompt_tokens == 4


def test_bytes_prompt_is_refused(client, fake):
    with pytest.raises(TypeError):
        client.generate(b"hello")
    assert fake.calls["Generate"] == 0


def test_stream_yields_chunks_with_usage_on_the_last(client, fake):
    chunks = list(client.stream("Hi", adapter="poem", request_id="r-2"))
    assert [c.text for c in chunks] == [*STREAM_PIECES, ""]
    assert [c.token_ids for c in chunks[:3]] == [(100,), (101,), (102,)]
    assert all(c.finish_reason is None and c.prompt_tokens is None for c in chunks[:-1])
    assert not chunks[0].is_last and chunks[-1].is_last
    last = chunks[-1]
    assert last.finish_reason is FinishReason.STOP
    assert (last.prompt_tokens, last.completion_tokens) == (4, 4)
    assert (last.adapter, last.adapter_version, last.request_id) == ("poem", VERSION, "r-2")
    assert fake.metadata[0]["x-lora-adapter"] == "poem"


def test_list_adapters(client):
    adapters = client.list_adapters()
    assert adapters[0] == AdapterInfo(
        name="sql", version=VERSION, rank=8, state=AdapterState.DEVICE, size_bytes=1572864, error=""
    )
    assert [a.state for a in adapters] == ["device", "invalid", "on_disk"]
    assert adapters[1].error == "rank 128 > max 64"


def test_server_info_carries_every_proto_field(client):
    info = client.server_info()
    proto_fields = {f.name for f in pb.ServerInfo.DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(ServerInfo)} == proto_fields
    assert dataclasses.asdict(info) == {name: getattr(SERVER_INFO, name) for name in proto_fields}


# --- what goes on the wire ---------------------------------------------------------------------


def test_adapter_metadata_is_sent_and_omitted_for_the_base_model(client, fake):
    client.generate("a", adapter="sql")
    client.generate("b")  # base model
    assert fake.metadata[0]["x-lora-adapter"] == "sql"
    assert "x-lora-adapter" not in fake.metadata[1]
    assert fake.requests[1].adapter == ""


def test_unset_sampling_fields_stay_unset(client, fake):
    client.generate("a", adapter="sql")
    params = fake.requests[0].params
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not params.HasField(name), name
    assert list(params.stop) == []


def test_set_sampling_fields_arrive(client, fake):
    client.generate(
        "a",
        adapter="sql",
        max_new_tokens=7,
        temperature=0.0,  # zero is a value, not "unset"
        top_p=0.5,
        top_k=40,
        seed=2**40,
        stop=["\n", "END"],
    )
    params = fake.requests[0].params
    assert all(params.HasField(f) for f in ("max_new_tokens", "temperature", "top_p", "seed"))
    assert (params.max_new_tokens, params.temperature, params.top_p) == (7, 0.0, 0.5)
    assert (params.top_k, params.seed, list(params.stop)) == (40, 2**40, ["\n", "END"])


def test_a_lone_stop_string_is_one_stop_string():
    assert SamplingParams(stop="END").stop == ("END",)
    assert list(SamplingParams(stop="END").to_pb().stop) == ["END"]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.NOT_FOUND, AdapterNotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.FAILED_PRECONDITION, AdapterInvalidError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, LoraServeError),
    ],
)
def test_status_code_maps_to_exception_class(target, fake, code, cls):
    fake.failures = [(code, "why it failed"), (code, "why it failed")]
    with LoraClient(target, retries=0) as c:
        with pytest.raises(LoraServeError) as generate_error:
            c.generate("a", adapter="sql")
        with pytest.raises(LoraServeError) as stream_error:
            list(c.stream("a", adapter="sql"))
    for error in (generate_error.value, stream_error.value):
        assert type(error) is cls
        assert error.code == code
        assert error.details == "why it failed"
        assert str(error) == f"{code.name}: why it failed"


def test_client_deadline_raises_deadline_exceeded(client, fake):
    fake.slow_s = 5
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.generate("a", timeout=0.2)
    assert time.monotonic() - start < 2


def test_unreachable_server_is_unavailable():
    with LoraClient("127.0.0.1:1", retries=0, timeout=5) as c, pytest.raises(UnavailableError):
        c.server_info()


# --- retries -----------------------------------------------------------------------------------


def test_unavailable_is_retried_once_by_default(client, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "replica draining")]
    assert client.generate("a", adapter="sql").text == "Hello world"
    assert fake.calls["Generate"] == 2
    assert fake.metadata[1]["x-lora-adapter"] == "sql"  # the retry routes the same way


def test_retries_are_bounded(target, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "down")] * 10
    with LoraClient(target, retries=2) as c, pytest.raises(UnavailableError):
        c.list_adapters()
    assert fake.calls["ListAdapters"] == 3

    fake.calls.clear()
    with LoraClient(target, retries=0) as c, pytest.raises(UnavailableError):
        c.server_info()
    assert fake.calls["GetServerInfo"] == 1


def test_other_codes_are_not_retried(client, fake):
    fake.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")]
    with pytest.raises(OverloadedError):
        client.generate("a")
    assert fake.calls["Generate"] == 1


def test_stream_is_retried_only_before_its_first_chunk(client, fake):
    fake.failures = [(grpc.StatusCode.UNAVAILABLE, "replica draining")]
    assert "".join(c.text for c in client.stream("a")) == "Hello world"
    assert fake.calls["GenerateStream"] == 2

    fake.calls.clear()
    fake.stream_mode = "fail_after_first"
    received = []
    with pytest.raises(UnavailableError):
        for chunk in client.stream("a"):
            received.append(chunk.text)
    assert received == ["Hel"]  # no retry: it would repeat text already handed out
    assert fake.calls["GenerateStream"] == 1


# --- cancellation ------------------------------------------------------------------------------


def test_closing_a_stream_early_cancels_the_rpc(client, fake):
    fake.stream_mode = "forever"
    chunks = client.stream("a", adapter="sql")
    assert next(chunks).text == "x"
    assert not fake.stream_ended.is_set()
    chunks.close()
    assert fake.stream_ended.wait(5), "the server never saw the cancellation"


def test_breaking_out_of_a_stream_cancels_the_rpc(client, fake):
    fake.stream_mode = "forever"
    for _chunk in client.stream("a"):
        break
    assert fake.stream_ended.wait(5), "the server never saw the cancellation"


# --- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(folder) -> dict[str, bytes]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=loraserve-test-ca", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pem", ".key")}


def test_mutual_tls(tmp_path, fake, capsys):
    if shutil.which("openssl") is None:  # make test installs it: under CI a missing one fails
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed; make test installs it")
        pytest.skip("needs the openssl command (make test installs it)")
    pem = _make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [(pem["server.key"], pem["server.pem"])],
        root_certificates=pem["ca.pem"],
        require_client_auth=True,
    )
    server, port = start_server(fake, credentials)
    try:
        with LoraClient(
            f"127.0.0.1:{port}",
            tls=True,
            root_certificates=pem["ca.pem"],
            private_key=pem["client.key"],
            certificate_chain=pem["client.pem"],
            timeout=5,
        ) as c:
            assert c.server_info().base_model == "demo"

        def cli(*flags: str) -> int:
            return main(["--target", f"127.0.0.1:{port}", "--timeout", "5", *flags, "info"])

        ca = str(tmp_path / "ca.pem")
        mtls = ("--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"))
        assert cli("--ca", ca, *mtls) == 0  # --ca implies --tls
        assert "base_model: demo" in capsys.readouterr().out
        assert cli("--ca", ca, "--retries", "0") == 1  # no client certificate: refused
        assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
    finally:
        server.stop(None)


def test_certificates_without_tls_are_refused():
    with pytest.raises(ValueError, match="tls=True"):
        LoraClient("127.0.0.1:1", root_certificates=b"pem")
    with pytest.raises(ValueError, match="both"):
        LoraClient("127.0.0.1:1", tls=True, private_key=b"key")


# --- async client ------------------------------------------------------------------------------


def test_async_generate_and_stream(target, fake):
    async def scenario():
        async with AsyncLoraClient(target, timeout=5) as c:
            completion = await c.generate([1, 2], adapter="sql", max_new_tokens=3)
            chunks = [chunk async for chunk in c.stream("Hi", adapter="poem", stop="END")]
            adapters = await c.list_adapters()
            info = await c.server_info()
        return completion, chunks, adapters, info

    completion, chunks, adapters, info = asyncio.run(scenario())
    assert completion.text == "Hello world" and completion.finish_reason is FinishReason.LENGTH
    assert completion.adapter_version == VERSION and completion.prompt_tokens == 2
    assert "".join(c.text for c in chunks) == "Hello world"
    assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].completion_tokens == 4
    assert [a.name for a in adapters] == ["sql", "broken", "poem"]
    assert info.max_lora_rank == 64
    generate_request, stream_request = fake.requests[:2]
    assert [m.get("x-lora-adapter") for m in fake.metadata[:2]] == ["sql", "poem"]
    assert list(generate_request.prompt_token_ids) == [1, 2]
    assert generate_request.params.max_new_tokens == 3
    assert not generate_request.params.HasField("temperature")
    assert list(stream_request.params.stop) == ["END"]


def test_async_errors_and_retries(target, fake):
    async def scenario():
        async with AsyncLoraClient(target, timeout=5, retries=1) as c:
            fake.failures = [(grpc.StatusCode.UNAVAILABLE, "draining")]
            retried = await c.generate("a")
            fake.failures = [(grpc.StatusCode.UNAVAILABLE, "draining")]
            streamed = [chunk.text async for chunk in c.stream("a")]
            fake.failures = [(grpc.StatusCode.UNAVAILABLE, "draining")] * 2
            with pytest.raises(UnavailableError):
                await c.generate("a")
            fake.failures = [(grpc.StatusCode.NOT_FOUND, "adapter 'nope' is not deployed")]
            with pytest.raises(AdapterNotFoundError) as not_found:
                async for _ in c.stream("a", adapter="nope"):
                    pass
        return retried, streamed, not_found.value

    retried, streamed, not_found = asyncio.run(scenario())
    assert retried.text == "Hello world" and "".join(streamed) == "Hello world"
    assert fake.calls == Counter(Generate=4, GenerateStream=3)
    assert not_found.code == grpc.StatusCode.NOT_FOUND
    assert not_found.details == "adapter 'nope' is not deployed"


def test_async_stream_closed_early_cancels_the_rpc(target, fake):
    fake.stream_mode = "forever"

    async def scenario():
        async with AsyncLoraClient(target) as c:
            async for chunk in c.stream("a", adapter="sql"):
                assert chunk.text == "x"
                break
            # The dropped async generator is closed by the event loop (aclose), which cancels.
            return await asyncio.to_thread(fake.stream_ended.wait, 5)

    assert asyncio.run(scenario()), "the server never saw the cancellation"


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_generate_prints_the_text(target, fake, capsys):
    argv = ["--target", target, "generate", "sql", "hi", "--max-new-tokens", "5", "--stop", "."]
    assert main(argv) == 0
    assert capsys.readouterr().out == "Hello world\n"
    (request,) = fake.requests
    assert (request.adapter, request.prompt, request.params.max_new_tokens) == ("sql", "hi", 5)
    assert list(request.params.stop) == ["."] and not request.params.HasField("top_p")
    assert fake.metadata[0]["x-lora-adapter"] == "sql"


@pytest.mark.parametrize("name", ["base", "-"])
def test_cli_base_model(target, fake, capsys, name):
    assert main(["--target", target, "generate", name, "hi"]) == 0
    assert fake.requests[0].adapter == ""
    assert "x-lora-adapter" not in fake.metadata[0]


def test_cli_generate_json(target, capsys):
    assert main(["--target", target, "--json", "generate", "sql", "hi", "--seed", "7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "Hello world" and out["finish_reason"] == "length"
    assert out["token_ids"] == [15496, 995] and out["adapter_version"] == VERSION


def test_cli_stream(target, capsys):
    assert main(["--target", target, "stream", "poem", "hi"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["--target", target, "--json", "stream", "poem", "hi"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == [*STREAM_PIECES, ""]
    assert lines[-1]["finish_reason"] == "stop" and lines[0]["finish_reason"] is None


def test_cli_adapters_table(target, capsys):
    assert main(["--target", target, "adapters"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "VERSION", "RANK", "STATE", "SIZE", "ERROR"]
    assert [row.split()[0] for row in rows] == ["broken", "poem", "sql"]
    assert rows[2].split() == ["sql", VERSION[:12], "8", "device", "1.5", "MiB"]
    assert rows[0].split()[:5] == ["broken", "0", "invalid", "0", "B"]  # no version
    assert rows[0].endswith("rank 128 > max 64")
    assert main(["--target", target, "--json", "adapters"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"][0]["state"] == "device" and out["adapters"][0]["version"] == VERSION


def test_cli_info_and_default_target_from_environment(target, capsys, monkeypatch):
    monkeypatch.setenv("LORASERVE_TARGET", target)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(pb.ServerInfo.DESCRIPTOR.fields)
    assert lines[0] == "base_model: demo" and "max_lora_rank: 64" in lines
    assert main(["--json", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["max_queue"] == 64


def test_cli_server_error_exits_1_without_traceback(target, fake, capsys):
    fake.failures = [(grpc.StatusCode.NOT_FOUND, "adapter 'nope' is not deployed")]
    assert main(["--target", target, "generate", "nope", "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: NOT_FOUND: adapter 'nope' is not deployed\n"
    assert captured.out == ""


def test_cli_usage_errors_exit_2(target, capsys):
    for argv in (
        ["--target", target, "generate", "sql"],  # no prompt
        ["--target", target, "generate", "sql", "hi", "--top-k", "many"],
        ["--target", target, "--cert", "c.pem", "info"],  # --cert without --key
        ["--target", target, "--ca", "/nonexistent/ca.pem", "info"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    assert "Traceback" not in capsys.readouterr().err
