"""The /metrics endpoint: families and label cap, and a real Prometheus server scraping it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import grpc
import pytest
from loraserve.adapters.format import write_adapter
from loraserve.server.metrics import OTHER_LABEL, UNKNOWN_LABEL, AdapterLabels
from loraserve.v1 import inference_pb2 as pb

from tests.checkpoints import make_llama
from tests.grpc_server import ServerThread
from tests.replicas import free_port
from tests.serving import random_adapter, serving_config, wait_for

FAMILIES = [
    "loraserve_requests_total",
    "loraserve_request_duration_seconds",
    "loraserve_time_to_first_token_seconds",
    "loraserve_inter_token_latency_seconds",
    "loraserve_prompt_tokens_total",
    "loraserve_generated_tokens_total",
    "loraserve_running_requests",
    "loraserve_waiting_requests",
    "loraserve_batch_size",
    "loraserve_adapters_resident",
    "loraserve_adapter_loads_total",
    "loraserve_adapter_load_duration_seconds",
    "loraserve_adapter_cache_hits_total",
    "loraserve_adapter_cache_misses_total",
    "loraserve_adapter_cache_evictions_total",
    "loraserve_kv_cache_usage_ratio",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_llama(tmp_path_factory.mktemp("model"))
    d = tmp_path_factory.mktemp("adapters")
    for i in range(3):
        write_adapter(d / f"m{i}.safetensors", random_adapter(model, f"m{i}", seed=i))
    server = ServerThread(
        serving_config(model, d, metrics_port=0, max_adapter_labels=2, max_active_adapters=2)
    )
    yield server
    server.stop()


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def test_families_are_exported_and_adapter_labels_are_capped(served):
    stub = served.stub()
    for name in ["m0", "m1", "m2", ""]:
        stub.Generate(
            pb.GenerateRequest(
                adapter=name, prompt="hi", params=pb.SamplingParams(max_new_tokens=3)
            )
        )
    text = scrape(served)
    for family in FAMILIES:
        assert f"\n{family}" in text, family
    ok = 'code="OK",method="Generate"'  # the exposition sorts label names
    assert f'loraserve_requests_total{{adapter="m0",{ok}}} 1.0' in text
    assert f'loraserve_requests_total{{adapter="m1",{ok}}} 1.0' in text
    assert f'loraserve_requests_total{{adapter="{OTHER_LABEL}",{ok}}} 1.0' in text
    assert f'loraserve_requests_total{{adapter="__base__",{ok}}} 1.0' in text
    assert 'adapter="m2"' not in text  # past the cap of two names
    assert 'loraserve_adapters_resident{tier="disk"} 3.0' in text
    assert 'loraserve_adapters_resident{tier="device"} 2.0' in text  # 3 adapters, 2 slots
    assert 'loraserve_generated_tokens_total{adapter="m0"} 3.0' in text


def test_label_cap_is_first_come_first_served():
    labels = AdapterLabels(cap=2)
    assert [labels(n) for n in ["a", "b", "c", "a", ""]] == ["a", "b", OTHER_LABEL, "a", "__base__"]


def test_names_the_folder_does_not_hold_share_one_label():
    deployed = {"real-0", "real-1"}
    labels = AdapterLabels(cap=2, known=deployed.__contains__)
    assert {labels(f"typo-{i}") for i in range(100)} == {UNKNOWN_LABEL}
    assert [labels("real-0"), labels("real-1")] == ["real-0", "real-1"]


def test_unknown_adapters_do_not_spend_the_label_slots(served):
    stub = served.stub()
    for i in range(5):  # more typos than label slots (2)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(adapter=f"typo-{i}", prompt="hi"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    stub.Generate(
        pb.GenerateRequest(adapter="m0", prompt="hi", params=pb.SamplingParams(max_new_tokens=1))
    )
    text = scrape(served)
    assert "typo-" not in text
    labels = f'adapter="{UNKNOWN_LABEL}",code="NOT_FOUND",method="Generate"'
    assert f"loraserve_requests_total{{{labels}}} 5.0" in text
    assert 'adapter="m0"' in text


def test_operator_series(served):
    stub = served.stub()
    stub.Generate(
        pb.GenerateRequest(adapter="m1", prompt="hi", params=pb.SamplingParams(max_new_tokens=2))
    )
    list(
        stub.GenerateStream(
            pb.GenerateRequest(
                adapter="m1", prompt="hi", params=pb.SamplingParams(max_new_tokens=2)
            )
        )
    )
    text = scrape(served)
    assert "\nprocess_resident_memory_bytes " in text
    assert "\nprocess_start_time_seconds " in text
    assert "\npython_info{" in text
    build = re.search(r"^loraserve_build_info\{(.*)\} 1\.0$", text, re.M)
    assert build and 'architecture="llama"' in build[1] and 'dtype="float32"' in build[1]
    assert re.search(
        r'^loraserve_requests_finished_total\{adapter="m1",finish_reason="length"\} ', text, re.M
    )
    assert 'code="OK",method="GenerateStream"' in text and 'code="OK",method="Generate"' in text
    assert "loraserve_adapters_invalid 0.0" in text
    assert "_created" not in text  # no created-timestamp noise


def test_a_real_prometheus_scrapes_the_request_count(served, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed; make test installs Debian's prometheus")
        pytest.skip("prometheus not installed (apt-get install prometheus); CI runs this test")
    stub = served.stub()
    before = served.runtime.metrics.requests.labels("m0", "Generate", "OK")._value.get()
    sent = 5
    for _ in range(sent):
        stub.Generate(
            pb.GenerateRequest(adapter="m0", prompt="x", params=pb.SamplingParams(max_new_tokens=2))
        )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: loraserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{served.server.metrics_port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'sum(loraserve_requests_total{adapter="m0",code="OK"})'
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})

        def value():
            try:
                body = json.load(urllib.request.urlopen(url, timeout=2))
            except OSError:
                return None
            result = body["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        got = wait_for(value, timeout=30, interval=0.5)
        assert got == before + sent
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_router_series_name_adapters_in_flight_and_resident(tmp_path):
    """loraserve_lora_requests_info lists the adapters with requests running and waiting (the
    Gateway API Inference Extension's LoRA-affinity input), under vLLM's name too with
    --vllm-metrics; loraserve_adapter_resident names what sits in each tier."""
    model = make_llama(tmp_path / "model")
    d = tmp_path / "adapters"
    d.mkdir()
    for i in range(3):
        write_adapter(d / f"r{i}.safetensors", random_adapter(model, f"r{i}", seed=i))
    server = ServerThread(
        serving_config(
            model,
            d,
            metrics_port=0,
            max_active_adapters=2,
            max_batch_size=1,
            max_seq_len=200,
            vllm_metrics=True,
        )
    )
    try:
        stub = server.stub()
        params = pb.SamplingParams(max_new_tokens=150)
        running = stub.GenerateStream(pb.GenerateRequest(adapter="r0", prompt="hi", params=params))
        next(running)  # r0 holds the only KV row ...
        waiting = stub.Generate.future(
            pb.GenerateRequest(
                adapter="r1", prompt="hi", params=pb.SamplingParams(max_new_tokens=1)
            )
        )  # ... so r1 waits
        wait_for(lambda: server.runtime.engine.stats()["waiting"] == 1)
        text = scrape(server)
        info = 'max_lora="2",running_lora_adapters="r0",waiting_lora_adapters="r1"'
        assert re.search(rf"loraserve_lora_requests_info\{{{info}\}} \d\.\d+e\+09", text)
        assert re.search(rf"vllm:lora_requests_info\{{{info}\}} \d\.\d+e\+09", text)
        assert "vllm:num_requests_waiting 1.0" in text
        assert "vllm:num_requests_running 1.0" in text
        assert 'loraserve_adapter_resident{adapter="r0",tier="device"} 1.0' in text
        running.cancel()
        waiting.result(timeout=30)
        wait_for(lambda: not server.runtime.engine.busy())
        text = scrape(server)
        idle = 'max_lora="2",running_lora_adapters="",waiting_lora_adapters=""'
        assert f"loraserve_lora_requests_info{{{idle}}}" in text
        assert 'loraserve_adapter_resident{adapter="r1",tier="device"} 1.0' in text
        assert 'adapter="r2",tier="device"' not in text  # never asked for: host at most
    finally:
        server.stop()
