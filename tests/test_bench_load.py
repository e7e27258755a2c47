"""bench.load end to end on a tiny model: a real server process, real gRPC streams, a real
/metrics scrape, the cold-load path, and the JSON/markdown/plot it writes. Not timed: what
is checked is that every request is accounted for and the numbers are consistent."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import load
from tests.checkpoints import make_llama


def test_arrivals_are_poisson_and_zipf_and_reproducible():
    times, picks = load.arrivals(50, rate=200.0, duration=5.0, zipf=1.0, seed=3)
    assert (times, picks) == load.arrivals(50, 200.0, 5.0, 1.0, seed=3)
    assert 850 < len(times) < 1150 and times == sorted(times) and times[-1] < 5.0
    counts = [picks.count(k) for k in range(50)]
    assert counts[0] > 3 * counts[9] > 0  # p(k) ~ 1/k: the first is ten times the tenth
    burst, _ = load.arrivals(4, float("inf"), 12, 1.0, seed=0)
    assert burst == [0.0] * 12


def test_request_summary_counts_errors_and_short_outputs():
    logs = [
        load.RequestLog("a", 0.0, [(0.5, 1), (0.7, 1), (1.0, 2)]),
        load.RequestLog("b", 0.2, [(0.6, 1), (0.9, 3)]),
        load.RequestLog("a", 0.3, [], error="NOT_FOUND"),
    ]
    s = load.summarize_requests(logs, new_tokens=4)
    assert s["completed"] == 2 and s["errors"] == {"NOT_FOUND": 1} and s["short_outputs"] == 0
    assert s["wall_s"] == 1.0 and s["output_tok_s"] == 8.0
    assert s["ttft_ms"]["n"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(450.0)
    # per token: 0.2 s once, 0.15 s twice, 0.1 s three times
    assert s["itl_ms"]["n"] == 6 and s["itl_ms"]["p50"] == pytest.approx(125.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(997.0)  # 0.7 and 1.0 s, interpolated


def test_load_suite_end_to_end_on_a_tiny_model(tmp_path):
    ckpt = make_llama(tmp_path / "model")
    plan = load.Plan(
        many=load.Setup("many", 6, 2, 3),
        resident=load.Setup("resident", 2, 2, 3),
        rank=4,
        zipf=1.0,
        batch=4,
        prompt_len=6,
        new_tokens=4,
        duration=1.5,
        calibrate_requests=8,
        rates=(("saturate", 1.3),),
        cold_ranks=(2, 8),
        cold_per_rank=2,
    )
    args = argparse.Namespace(
        quick=True, device="cpu", dtype="float32", cache_dir=tmp_path, duration=None
    )
    report = load.run_suite(args, plan, ckpt)
    for setup in ("resident", "many"):
        run = report["runs"][setup]["saturate"]
        assert run["errors"] == {} and run["completed"] == run["requests"] > 0
        server = run["server"]
        # every request was placed once: on a device hit or a miss
        assert server["device_hits"] + server["device_misses"] == run["completed"]
        assert server["engine_steps"] > 0 and 0 < server["mean_batch"] <= plan.batch
        assert 0 < run["ttft_ms"]["p50"] <= run["e2e_ms"]["p99"]
    many = report["runs"]["many"]["saturate"]["server"]
    # 6 adapters, 3 in host memory: the tail is read from disk, and each read is a host miss
    assert 0 < many["host_misses"] <= many["disk_loads"]
    assert report["runs"]["resident"]["saturate"]["server"]["disk_loads"] == 0
    cold = report["cold_load"]
    assert set(cold["rename_to_first_token_ms"]) == {"2", "8"}
    for rank in ("2", "8"):
        assert cold["rename_to_first_token_ms"][rank]["n"] == 2
        dd = cold["disk_to_device_ms"][rank]
        assert dd["total"]["p50"] >= dd["read"]["p50"] > 0
    assert cold["disk_to_device_ms"]["8"]["mib"] > cold["disk_to_device_ms"]["2"]["mib"]
    assert report["summary"]["errors"] == 0 and "saturate" in report["summary"]["ratios"]
    paths = load.write(report, tmp_path / "out")
    assert json.loads(paths[0].read_text())["summary"] == report["summary"]
    assert "many adapters / all resident" in paths[1].read_text()
    assert paths[2].suffix == ".png" and paths[2].stat().st_size > 0
