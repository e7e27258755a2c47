"""The real server over loopback gRPC: calls, status codes, cancellation, deadlines, hot deploy,
health, reflection, TLS and SIGTERM drain."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from loraserve.adapters.format import write_adapter
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

from tests.checkpoints import make_llama
from tests.grpc_server import ServerThread
from tests.serving import random_adapter, serving_config, serving_device, wait_for

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "loraserve.v1.LoraInference"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapters(model_dir):
    return [random_adapter(model_dir, f"a{i}", seed=100 + i) for i in range(6)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, adapters):
    d = tmp_path_factory.mktemp("adapters")
    for a in adapters[:4]:
        write_adapter(d / f"{a.name}.safetensors", a)
    (d / "broken.safetensors").write_bytes(b"\xff" * 40)
    server = ServerThread(serving_config(model_dir, d, max_batch_size=4, max_queue=16))
    server.adapters_dir = d
    slow = threading.Event()

    def maybe_slow(module, args):
        if slow.is_set():
            time.sleep(0.05)

    server.runtime.loaded.model.register_forward_pre_hook(maybe_slow)
    server.slow = slow
    yield server
    server.stop()


def gen(adapter="", prompt="Hello world", request_id="", **params) -> pb.GenerateRequest:
    params = pb.SamplingParams(**{"max_new_tokens": 6, **params})
    return pb.GenerateRequest(adapter=adapter, prompt=prompt, params=params, request_id=request_id)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def running(server) -> int:
    return server.stub().GetServerInfo(pb.GetServerInfoRequest()).running_requests


def test_generate_stream_list_and_info(served):
    stub = served.stub()
    full = stub.Generate(gen("a1", request_id="r-1"))
    assert full.finish_reason == pb.LENGTH
    assert len(full.token_ids) == 6 and full.completion_tokens == 6
    assert full.adapter == "a1" and full.adapter_version and full.request_id == "r-1"
    chunks = list(stub.GenerateStream(gen("a1")))
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == pb.LENGTH and chunks[-1].completion_tokens == 6
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    ids = stub.Generate(pb.GenerateRequest(adapter="a1", prompt_token_ids=[5, 6, 7]))
    assert ids.prompt_tokens == 3
    listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert set(listed) == {"a0", "a1", "a2", "a3", "broken"}
    assert listed["a1"].state == pb.DEVICE and listed["a1"].rank == 4
    assert listed["a0"].state in (pb.HOST, pb.DEVICE) and listed["a0"].size_bytes > 0
    assert listed["broken"].state == pb.INVALID and "broken" in listed["broken"].error
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.architecture == "llama" and info.dtype == "float32"
    assert info.device.startswith(serving_device())
    assert info.max_seq_len == 64 and info.max_batch_size == 4 and len(info.base_fingerprint) == 16


def test_concurrent_calls_across_adapters_equal_alone(served):
    stub = served.stub()
    jobs = [gen(f"a{i % 4}" if i % 5 else "", prompt=f"prompt {i}") for i in range(12)]
    alone = [stub.Generate(j).token_ids for j in jobs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda j: stub.Generate(j).token_ids, jobs))
    assert together == alone


@pytest.mark.parametrize(
    "request_, code, field",
    [
        (gen("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (gen("../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "adapter"),
        (gen("broken"), grpc.StatusCode.FAILED_PRECONDITION, "broken"),
        (gen(max_new_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT, "params.max_new_tokens"),
        (gen(max_new_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT, "params.max_new_tokens"),
        (gen(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "params.temperature"),
        (gen(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "params.top_p"),
        (gen(top_p=1.01), grpc.StatusCode.INVALID_ARGUMENT, "params.top_p"),
        (gen(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "params.top_k"),
        (gen(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (gen(prompt="word " * 200), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.GenerateRequest(prompt_token_ids=[1, 99999]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt_token_ids",
        ),
        (
            pb.GenerateRequest(prompt="x", prompt_token_ids=[1]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
    ],
)
def test_each_error_gets_its_status_code(served, request_, code, field):
    got, details = code_of(lambda: served.stub().Generate(request_))
    assert got == code
    assert field in details
    got, _ = code_of(lambda: list(served.stub().GenerateStream(request_)))
    assert got == code


def test_queue_full_is_resource_exhausted(served):
    served.slow.set()
    stub = served.stub()
    try:
        streams = [stub.GenerateStream(gen("a0", max_new_tokens=40)) for _ in range(30)]
        results = []
        for s in streams:
            try:
                results.append(next(s) and "ok")
            except grpc.RpcError as err:
                results.append(err.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in results
        assert "ok" in results
        for s in streams:
            s.cancel()
    finally:
        served.slow.clear()
    wait_for(lambda: running(served) == 0)


def test_cancelling_mid_stream_frees_the_sequence(served):
    served.slow.set()
    try:
        stream = served.stub().GenerateStream(gen("a2", max_new_tokens=60))
        next(stream)
        assert running(served) == 1
        stream.cancel()
        wait_for(lambda: running(served) == 0, timeout=2)
    finally:
        served.slow.clear()
    requests = served.runtime.metrics.requests
    cancelled = requests.labels("a2", "GenerateStream", "CANCELLED")._value.get()
    assert cancelled >= 1


def test_deadline_is_honoured_and_frees_the_sequence(served):
    served.slow.set()
    try:
        t0 = time.monotonic()
        got, _ = code_of(lambda: served.stub().Generate(gen("a3", max_new_tokens=60), timeout=0.5))
        assert got == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2
        wait_for(lambda: running(served) == 0, timeout=2)
    finally:
        served.slow.clear()


def test_adapter_dropped_in_is_callable_within_two_seconds(served, adapters):
    stub = served.stub()
    assert code_of(lambda: stub.Generate(gen("a5")))[0] == grpc.StatusCode.NOT_FOUND
    t0 = time.monotonic()
    write_adapter(served.adapters_dir / "a5.safetensors", adapters[5])

    def callable_():
        try:
            return stub.Generate(gen("a5")).adapter_version
        except grpc.RpcError:
            return None

    assert wait_for(callable_, timeout=2.0) == adapters[5].version
    assert time.monotonic() - t0 < 2.0


def test_reflection_lists_the_service_and_health_is_serving(served):
    channel = grpc.insecure_channel(served.target)
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_is_not_serving_until_loaded_and_while_draining(model_dir, tmp_path):
    (tmp_path / "ads").mkdir()
    import asyncio

    from loraserve.server.app import LoraServer

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def make():
        return LoraServer(serving_config(model_dir, tmp_path / "ads"))

    server = call(make())
    port = call(server.start(load=False))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = inference_pb2_grpc.LoraInferenceStub(channel)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code_of(lambda: stub.Generate(gen()))[0] == grpc.StatusCode.UNAVAILABLE
    call(server.load())
    assert status() == health_pb2.HealthCheckResponse.SERVING
    server.runtime.engine.stop_accepting()  # what stop() does first
    assert code_of(lambda: stub.Generate(gen()))[0] == grpc.StatusCode.UNAVAILABLE
    call(server.stop(1))
    loop.call_soon_threadsafe(loop.stop)


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_tls_round_trip(model_dir, tmp_path):
    key, cert = make_cert(tmp_path)
    (tmp_path / "ads").mkdir()
    server = ServerThread(serving_config(model_dir, tmp_path / "ads", tls_cert=cert, tls_key=key))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(f"localhost:{server.port}", creds)
        reply = inference_pb2_grpc.LoraInferenceStub(channel).Generate(gen())
        assert reply.completion_tokens == 6
        plain = inference_pb2_grpc.LoraInferenceStub(grpc.insecure_channel(server.target))
        assert code_of(lambda: plain.Generate(gen(), timeout=3))[0] in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    finally:
        server.stop()


def test_sigterm_drains_running_requests_then_exits_zero(model_dir, adapters, tmp_path):
    d = tmp_path / "ads"
    d.mkdir()
    write_adapter(d / "a0.safetensors", adapters[0])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(model_dir),
            "--adapters",
            str(d),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--max-lora-rank",
            "8",
            "--max-seq-len",
            "256",
            "--device",
            "cpu",
            "--drain-grace",
            "60",  # 200 tokens on 2 busy cores: room to spare
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = None
        for line in proc.stderr:
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                port = int(m[1])
            if "adapters folder" in line:
                break
        stub = inference_pb2_grpc.LoraInferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stream = stub.GenerateStream(gen("a0", max_new_tokens=200))
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the running request finishes despite the signal
        assert rest[-1].finish_reason == pb.LENGTH
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 200
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
