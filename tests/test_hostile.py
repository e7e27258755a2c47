"""The server against an attacker and a careless operator, over real gRPC on loopback.

Hostile adapter files (crafted here) never stop start-up, never hide themselves, and never cost
other tenants anything; hostile requests are refused before they cost anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import loraserve.server.registry
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loraserve.adapters.format import (
    CONFIG_KEY,
    FORMAT_VERSION,
    LoRAWeights,
    _peft_tensors,
    _serialize,
    write_adapter,
)
from loraserve.server.metrics import UNKNOWN_LABEL
from loraserve.server.resources import available_cpus, parse_bytes
from loraserve.server.runtime import Runtime
from loraserve.v1 import inference_pb2 as pb

from tests.checkpoints import make_llama
from tests.grpc_server import ServerThread
from tests.replicas import free_port
from tests.serving import random_adapter, serving_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def good(model_dir):
    return [random_adapter(model_dir, f"good-{i}", seed=500 + i) for i in range(2)]


def crafted(adapter, path: Path, config_changes: dict | None = None, raw_config=None, fill=None):
    """Write ``adapter`` as a single file with its config or weights tampered with."""
    tensors = _peft_tensors(adapter.modules)
    if fill is not None:
        tensors = {k: v.clone().fill_(fill) for k, v in tensors.items()}
    if raw_config is None:
        config = {"format_version": FORMAT_VERSION, **adapter.config.to_dict()}
        config.update(config_changes or {})
        raw_config = json.dumps(config)
    path.write_bytes(_serialize(tensors, {"format": "pt", CONFIG_KEY: raw_config}))


def hostile_files(folder: Path, adapter, outside: Path) -> list[str]:
    """Every kind of bad entry the issue names; returns their adapter names."""
    crafted(adapter, folder / "layers-pattern.safetensors", {"layers_pattern": 5})
    crafted(adapter, folder / "deep-json.safetensors", raw_config="[" * 100_000 + "]" * 100_000)
    crafted(adapter, folder / "huge-alpha.safetensors", raw_config=_with_huge_alpha(adapter))
    crafted(adapter, folder / "nan.safetensors", fill=float("nan"))
    crafted(adapter, folder / "big-weights.safetensors", fill=1e30)
    crafted(
        adapter,
        folder / "regex-bomb.safetensors",
        # 2^n backtracking on every module name that does not end in a digit (all of them)
        {"target_modules": r"(\w|.)*\d"},
    )
    (folder / "garbage.safetensors").write_bytes(os.urandom(4096))
    # a 4 MiB header of nested lists: parsing it would hold the GIL for a second or more
    fat = b"[" + b"[]," * (4 << 18) + b"[]]"
    (folder / "fat-header.safetensors").write_bytes(len(fat).to_bytes(8, "little") + fat)
    write_adapter(outside / "linked.safetensors", adapter)
    (folder / "linked.safetensors").symlink_to(outside / "linked.safetensors")
    # a base checkpoint dropped in by mistake: 1 GiB declared, sparse on disk
    header = json.dumps(
        {
            "model.embed_tokens.weight": {
                "dtype": "F32",
                "shape": [1 << 28],
                "data_offsets": [0, 1 << 30],
            }
        }
    ).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 30))
    return [
        "layers-pattern",
        "deep-json",
        "huge-alpha",
        "nan",
        "big-weights",
        "regex-bomb",
        "garbage",
        "fat-header",
        "linked",
        "model",
    ]


def _with_huge_alpha(adapter) -> str:
    config = {"format_version": FORMAT_VERSION, **adapter.config.to_dict(), "lora_alpha": 0}
    return json.dumps(config).replace('"lora_alpha": 0', '"lora_alpha": 1' + "0" * 400)


def invalid_now(srv) -> float:
    """The ``loraserve_adapters_invalid`` gauge as a scrape would read it."""
    return srv.runtime.metrics.invalid_now.collect()[0].samples[0].value


def listed(stub) -> dict[str, pb.AdapterInfo]:
    return {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}


def generate(stub, adapter: str, timeout: float = 30, **fields):
    return stub.Generate(
        pb.GenerateRequest(
            adapter=adapter,
            prompt_token_ids=fields.pop("ids", [5, 6, 7]),
            params=pb.SamplingParams(max_new_tokens=4),
            **fields,
        ),
        timeout=timeout,
    )


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# ------------------------------------------------------------------ hostile adapter files


def test_the_server_starts_with_every_hostile_file_and_lists_each(tmp_path, model_dir, good):
    folder, outside = tmp_path / "adapters", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    write_adapter(folder / "good-0.safetensors", good[0])
    names = hostile_files(folder, good[0], outside)
    t0 = time.monotonic()
    srv = ServerThread(serving_config(model_dir, folder, metrics_port=0))
    try:
        assert time.monotonic() - t0 < 30  # no regex or big file holds start-up
        stub = srv.stub()
        adapters = listed(stub)
        for name in names:
            assert adapters[name].state == pb.INVALID and adapters[name].error, name
            code, details = code_of(lambda n=name: generate(stub, n))
            assert code is grpc.StatusCode.FAILED_PRECONDITION, (name, details)
        assert "symbolic link" in adapters["linked"].error
        assert "header is over" in adapters["fat-header"].error  # refused unparsed
        # refused names never own a metrics label: only deployed adapters do
        assert srv.runtime.metrics.label("nan") == UNKNOWN_LABEL
        assert srv.runtime.metrics.label("good-0") == "good-0"
        assert generate(stub, "good-0").completion_tokens == 4
        assert invalid_now(srv) == len(names)
    finally:
        srv.stop()


def test_hostile_files_found_at_run_time_are_listed_and_counted(tmp_path, model_dir, good):
    folder, outside = tmp_path / "adapters", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    write_adapter(folder / "good-0.safetensors", good[0])
    srv = ServerThread(serving_config(model_dir, folder))
    try:
        stub = srv.stub()
        names = hostile_files(folder, good[0], outside)
        wait_for(lambda: all(n in listed(stub) for n in names), timeout=15)
        assert all(listed(stub)[n].state == pb.INVALID for n in names)
        assert srv.runtime.metrics.invalid_files._value.get() >= len(names)
        for n in names:
            (folder / f"{n}.safetensors").unlink()
        wait_for(lambda: invalid_now(srv) == 0, timeout=15)
        assert generate(stub, "good-0").completion_tokens == 4
    finally:
        srv.stop()


def evicted_server(tmp_path, model_dir, good) -> tuple[Path, ServerThread]:
    """A server with one device slot and one host-cache entry, on which good-0 has been served
    and then pushed out of both by good-1: its next request reads the disk again."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    for a in good:
        write_adapter(folder / f"{a.name}.safetensors", a)
    srv = ServerThread(
        serving_config(model_dir, folder, max_active_adapters=1, max_cached_adapters=1)
    )
    stub = srv.stub()
    generate(stub, "good-0")
    generate(stub, "good-1")
    return folder, srv


def test_a_bad_file_over_an_evicted_adapter_fails_fast_without_a_reload_loop(
    tmp_path, model_dir, good, caplog
):
    folder, srv = evicted_server(tmp_path, model_dir, good)
    try:
        stub = srv.stub()
        crafted(good[0], folder / "good-0.safetensors", {"layers_pattern": 5})
        wait_for(lambda: listed(stub)["good-0"].error, timeout=10)
        loads = srv.runtime.metrics.loads.labels("invalid")
        before = loads._value.get()
        t0 = time.monotonic()
        for _ in range(5):
            code, details = code_of(lambda: generate(stub, "good-0", timeout=10))
            assert code is grpc.StatusCode.FAILED_PRECONDITION, details
            assert "layers_pattern" in details
        assert time.monotonic() - t0 < 5  # no request hangs to its deadline
        time.sleep(1.0)
        assert loads._value.get() - before <= 4  # bounded retries, not a tight loop
        assert any("loading adapter good-0" in r.getMessage() for r in caplog.records)
        assert generate(stub, "good-1").completion_tokens == 4
    finally:
        srv.stop()


def test_a_transient_read_failure_heals_without_a_restart(tmp_path, model_dir, good, monkeypatch):
    folder, srv = evicted_server(tmp_path, model_dir, good)
    try:
        stub = srv.stub()
        real = loraserve.server.registry.read_adapter

        def denied(path, *args, **kwargs):
            if Path(path).name.startswith("good-0"):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(loraserve.server.registry, "read_adapter", denied)
        code, details = code_of(lambda: generate(stub, "good-0"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "Permission denied" in details
        assert "Permission denied" in listed(stub)["good-0"].error
        # the operator fixes it; the watcher's next retry (forced here) finds the file valid,
        # which ends the failed load's back-off at once
        monkeypatch.setattr(loraserve.server.registry, "read_adapter", real)
        srv.runtime.registry.refresh("good-0")
        assert generate(stub, "good-0").completion_tokens == 4

        def served():
            try:
                return generate(stub, "good-0").completion_tokens == 4
            except grpc.RpcError:
                return False

        wait_for(served, timeout=10, interval=0.3)
        wait_for(lambda: not listed(stub)["good-0"].error, timeout=5)
    finally:
        srv.stop()


# ------------------------------------------------------------------ hostile requests


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, good):
    folder = tmp_path_factory.mktemp("adapters")
    write_adapter(folder / "good-0.safetensors", good[0])
    srv = ServerThread(serving_config(model_dir, folder, health_port=0))
    yield srv
    srv.stop()


def test_huge_prompts_are_refused_before_tokenizing_and_stall_nobody(served):
    stub = served.stub()
    huge = "x" * (1 << 20)
    t0 = time.monotonic()
    code, details = code_of(lambda: stub.Generate(pb.GenerateRequest(prompt=huge), timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt:")
    assert time.monotonic() - t0 < 1.0

    def info_latency():
        t = time.monotonic()
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        return time.monotonic() - t

    with ThreadPoolExecutor(4) as pool:
        flood = [
            pool.submit(
                lambda: code_of(lambda: stub.Generate(pb.GenerateRequest(prompt=huge), timeout=10))
            )
            for _ in range(3)
        ]
        latencies = [info_latency() for _ in range(5)]
        assert all(f.result()[0] is grpc.StatusCode.INVALID_ARGUMENT for f in flood)
    assert max(latencies) < 0.5, latencies
    too_many = list(range(served.runtime.config.max_seq_len))
    code, details = code_of(lambda: generate(stub, "", ids=too_many))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt_token_ids")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"request_id": "r" * (1 << 20)}, "request_id"),
        ({"params": {"temperature": 1e-45}}, "params.temperature"),
        ({"params": {"temperature": float("inf")}}, "params.temperature"),
    ],
)
def test_bad_fields_are_refused_up_front(served, fields, field):
    params = pb.SamplingParams(max_new_tokens=4, **fields.pop("params", {}))
    request = pb.GenerateRequest(prompt="hi", params=params, **fields)
    t0 = time.monotonic()
    code, details = code_of(lambda: served.stub().Generate(request, timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "ListAdapters"])
def test_garbage_bytes_get_invalid_argument_and_one_log_line(served, method, caplog):
    channel = grpc.insecure_channel(served.target)
    path = f"/loraserve.v1.LoraInference/{method}"
    call = channel.unary_stream(path) if method == "GenerateStream" else channel.unary_unary(path)

    def send():
        result = call(b"\xff\xff\xff\xff\x0f", timeout=5)
        return list(result) if method == "GenerateStream" else result

    code, details = code_of(send)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid loraserve.v1." in details
    assert not any(r.exc_info for r in caplog.records)


def test_the_log_names_request_ids(served, caplog):
    caplog.set_level("INFO", logger="loraserve.server.servicer")
    generate(served.stub(), "good-0", request_id="trace-me-42")
    assert any("trace-me-42" in r.getMessage() for r in caplog.records)


def test_plaintext_health_port_reports_serving(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.server.health_port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_demo_tokenizer_refuses_characters_it_cannot_encode():
    srv = ServerThread(serving_config("demo", None, max_seq_len=64))
    try:
        stub = srv.stub()
        request = pb.GenerateRequest(adapter="upper", prompt="h\u00e9llo\U0001f600=")
        code, details = code_of(lambda: stub.Generate(request, timeout=10))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "'\u00e9'" in details and "'\U0001f600'" in details
        assert stub.Generate(pb.GenerateRequest(adapter="upper", prompt="hello=")).text
    finally:
        srv.stop()


# ------------------------------------------------------------------ the operator's view


def run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "server", "--model", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_is_one_clear_line_before_the_model_loads(flag):
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        proc = run_server(flag, str(port), other, str(free_port()))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{flag} {port}" in errors[0], proc.stderr
    assert "memory plan" not in proc.stderr  # refused before the model was loaded


def test_the_memory_plan_is_logged_and_enforced(tmp_path, model_dir, caplog):
    caplog.set_level("INFO")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="exceeds --max-memory .*--max-batch-size"):
        Runtime(serving_config(model_dir, tmp_path / "a", max_memory=parse_bytes("64KiB")))
    line = next(r.getMessage() for r in caplog.records if "memory plan" in r.getMessage())
    for part in ("weights", "KV cache", "LoRA slot tables", "host adapter cache"):
        assert part in line


def test_threads_follow_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def loraserve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve.client.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )


def test_cli_wait_ready(served):
    ok = loraserve_cli("--target", served.target, "--wait-ready", "10", "info")
    assert ok.returncode == 0 and "device:" in ok.stdout
    t0 = time.monotonic()
    nobody = loraserve_cli("--target", f"127.0.0.1:{free_port()}", "--wait-ready", "1", "info")
    assert nobody.returncode == 1 and "not ready after 1s" in nobody.stderr
    assert time.monotonic() - t0 < 15


# ------------------------------------------------------------------ the watched folder


def test_events_resume_after_the_folder_is_deleted_and_created_again(tmp_path, model_dir, good):
    folder = tmp_path / "adapters"
    folder.mkdir()
    cfg = serving_config(model_dir, folder, watch_poll_interval=0.3)
    srv = ServerThread(cfg)
    try:
        watcher = srv.runtime.watcher
        old = watcher._observer
        folder.rmdir()
        folder.mkdir()
        wait_for(lambda: watcher._observer is not None and watcher._observer is not old, 10)
        watcher.poll_interval = 3600  # from now on only file events can deploy
        time.sleep(0.4)  # let the watcher thread pick up the new interval after its wait
        touched = threading.Event()
        real_touch = watcher.touch

        def spy(name):
            if threading.current_thread() is not watcher._thread:
                touched.set()
            real_touch(name)

        watcher.touch = spy
        write_adapter(folder / "good-1.safetensors", good[1])
        assert touched.wait(10)
        wait_for(lambda: "good-1" in listed(srv.stub()), timeout=10)
    finally:
        srv.stop()


def test_a_scale_that_overflows_the_serving_dtype_is_refused(tmp_path, model_dir, good):
    """Each weight fits float16, but B times the scale does not: refused when serving fp16."""
    big = dataclasses.replace(
        good[0],
        name="overflow",
        modules={
            n: LoRAWeights(w.A, torch.full_like(w.B, 60_000.0), w.scale)
            for n, w in good[0].modules.items()
        },
    )
    folder = tmp_path / "adapters"
    folder.mkdir()
    write_adapter(folder / "overflow.safetensors", big)
    runtime = Runtime(serving_config(model_dir, folder, dtype="float16")).start()
    try:
        assert "float16's largest value" in runtime.registry.errors()["overflow"]
    finally:
        runtime.stop()


def test_every_config_field_is_a_flag_and_round_trips():
    import argparse
    import dataclasses

    from loraserve.server.config import ServerConfig, add_arguments, flag_name, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([])) == ServerConfig()
    config = from_args(
        parser.parse_args(
            ["--adapters", "/srv/a", "--metrics-port", "-1", "--max-cached-bytes", "2GiB"]
            + ["--threads", "3", "--lora-backend", "loop", "--watch-debounce", "0.5"]
        )
    )
    assert config.adapters_dir == Path("/srv/a") and config.metrics_port is None
    assert config.max_cached_bytes == 2 << 30 and config.threads == 3
    assert config.lora_backend == "loop" and config.watch_debounce == 0.5
    text = parser.format_help()
    for f in dataclasses.fields(ServerConfig):
        assert flag_name(f) in text and f.metadata["help"][:20] in " ".join(text.split())
