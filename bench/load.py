"""Issue 5: many adapters through few slots under open-loop load, and adapter cold loads.

    python -m bench.load [--quick] [--device cuda --dtype bfloat16] [--out DIR]

**Load** (what a platform serving a long tail of tasks sees). A real ``loraserve-server``
process (``python -m loraserve.server``) on loopback, a real ``/metrics`` endpoint, and this
process as
the client: requests arrive open-loop (Poisson, so a slow server does not slow the arrivals),
each streams ``new_tokens`` greedy tokens for a ``prompt_len``-token prompt, and picks its
adapter by Zipf popularity (``p(k) ~ 1/k^s``). Two servers get the same load:

- ``many``: ``--adapters`` holds 1000 adapters, ``--max-active-adapters 16`` device slots,
  ``--max-cached-adapters 128`` in host memory: most of the tail is read from disk when asked
  for and takes its turn in a slot;
- ``resident``: 16 adapters that all fit in the 16 slots (Zipf over 16).

The offered rates are fixed from the ``resident`` server's capacity, measured first (a burst of
requests, every row of the batch busy): ``saturate`` offers more than that capacity (throughput
then *is* capacity; latency is queueing), ``steady`` offers 60% of it (latency is the service's
own). Per run: completed requests, errors by status code (must be 0), output tokens/s, p50/p99
time to first token (TTFT), inter-token latency (ITL) and end-to-end latency, and from the
server's ``/metrics`` (scraped before and after) the cache hit rates per tier, evictions, disk
loads and the mean running batch. Target: ``many`` >= 0.7x ``resident`` throughput at ``saturate``.

**Cold load**, per rank (8, 16, 64): a new adapter is written under a dotfile name (ignored),
flushed to disk and dropped from the page cache (``fsync`` + ``POSIX_FADV_DONTNEED``), then
renamed into the served folder; the time from the rename to its first streamed token (the
watcher's debounce, read, validate, slot fill, prefill) is measured by a client that retries
NOT_FOUND every 5 ms. After the server stops, the same files' disk -> device time is measured
in this process on the server's own code path (``read_adapter`` + ``validate_adapter`` + slot
fill, page cache dropped before each read). p50/p99 per rank.

Writes ``load-<device>[-quick].{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import checkpoints as ck
from bench.harness import REPO, prompts, report_stem, write_report
from bench.machine import describe, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.7  # many / resident throughput at saturation


@dataclass(frozen=True)
class Setup:
    """One side of the comparison: what is on disk and what fits where."""

    name: str  # "many" or "resident"
    adapters: int  # on disk, all requested (Zipf)
    slots: int  # --max-active-adapters
    host_cache: int  # --max-cached-adapters


@dataclass(frozen=True)
class Plan:
    many: Setup
    resident: Setup
    rank: int
    zipf: float
    batch: int
    prompt_len: int
    new_tokens: int
    duration: float  # seconds of arrivals per run
    calibrate_requests: int
    rates: tuple[tuple[str, float], ...]  # (label, fraction of the resident capacity)
    cold_ranks: tuple[int, ...]
    cold_per_rank: int


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            many=Setup("many", 128, 8, 32),
            resident=Setup("resident", 8, 8, 32),
            rank=16,
            zipf=1.0,
            batch=32,
            prompt_len=32,
            new_tokens=16,
            duration=4.0,
            calibrate_requests=48,
            rates=(("saturate", 1.3),),
            cold_ranks=(8, 16, 64),
            cold_per_rank=2,
        )
    return Plan(
        many=Setup("many", 1000, 16, 128),
        resident=Setup("resident", 16, 16, 128),
        rank=16,
        zipf=1.0,
        batch=32,
        prompt_len=32,
        new_tokens=32,
        duration=20.0,
        calibrate_requests=96,
        rates=(("saturate", 1.3), ("steady", 0.6)),
        cold_ranks=(8, 16, 64),
        cold_per_rank=15,
    )


# --------------------------------------------------------------------------------------------
# adapters on disk


def adapter_pool(ckpt: Path, rank: int, n: int, cache_dir: Path) -> list[Path]:
    """``n`` single-file adapters ``task-NNN.safetensors`` of ``rank`` for ``ckpt``, made once
    (adding to the pool when more are asked for); the same index always has the same weights."""
    folder = cache_dir / f"{ckpt.name}-adapters" / f"files-r{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{ck.adapter_name(i)}.safetensors" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        from loraserve.adapters.format import write_adapter

        config, shapes = _adapter_config(ckpt, rank)
        t0 = time.monotonic()
        for i in missing:
            write_adapter(paths[i], ck.random_adapter(config, shapes, rank, seed=i))
        print(f"wrote {len(missing)} adapters in {time.monotonic() - t0:.0f} s", flush=True)
    return paths


def _adapter_config(ckpt: Path, rank: int):
    from loraserve.adapters.format import LoRAConfig

    shapes, fingerprint = _base_facts(ckpt)
    config = LoRAConfig(
        r=rank, lora_alpha=2 * rank, target_modules=ck.TARGETS, base_fingerprint=fingerprint
    )
    return config, shapes


@functools.cache
def _base_facts(ckpt: Path) -> tuple[dict[str, tuple[int, int]], str]:
    """The adapted layers' shapes and the base fingerprint (the model is loaded once)."""
    from loraserve.adapters.lora import linear_shapes
    from loraserve.adapters.models import load_model

    loaded = load_model(ckpt)
    shapes = {n: s for n, s in linear_shapes(loaded.model).items() if n.endswith(ck.TARGETS)}
    return shapes, loaded.fingerprint


def serving_folder(pool: list[Path], parent: Path) -> Path:
    """A fresh folder holding ``pool``'s files as hard links (same bytes, no copy)."""
    folder = Path(tempfile.mkdtemp(prefix="load-", dir=parent))
    for path in pool:
        os.link(path, folder / path.name)
    return folder


def drop_from_page_cache(path: Path) -> None:
    """Flush ``path`` and ask the kernel to forget its cached pages, so the next read hits disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# the server, as its own process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m loraserve.server`` on loopback with a metrics port; started, waited for,
    stopped."""

    def __init__(self, args: list[str], log_path: Path, ready_timeout: float = 900.0):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--metrics-port", str(self.metrics_port), *args]
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:  # a failed or interrupted start leaves no server behind
            self.stop()
            raise
        self.start_s = round(time.monotonic() - t0, 2)

    def _wait_ready(self, timeout: float) -> None:
        from loraserve.client import LoraClient, LoraServeError

        end = time.monotonic() + timeout
        with LoraClient(self.target, retries=0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    client.server_info(timeout=2.0)
                    return
                except LoraServeError:
                    pass
                if time.monotonic() > end:
                    raise RuntimeError(f"server not ready in {timeout} s:\n{self.log_tail()}")
                time.sleep(0.2)

    def log_tail(self, n: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-n:]

    def metrics(self) -> dict[str, float]:
        """The ``/metrics`` samples as ``{'name{label="v",...}': value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def server_args(setup: Setup, folder: Path, ckpt: Path, plan: Plan, device: str, dtype: str):
    return [
        "--model", str(ckpt),
        "--adapters", str(folder),
        "--device", device,
        "--dtype", dtype,
        "--max-active-adapters", str(setup.slots),
        "--max-cached-adapters", str(setup.host_cache),
        "--max-batch-size", str(plan.batch),
        "--max-seq-len", str(plan.prompt_len + plan.new_tokens),
        "--max-queue", "100000",  # open-loop overload queues instead of refusing
        "--watch-poll-interval", "3600",
        "--drain-grace", "5",
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# the load generator


@dataclass
class RequestLog:
    adapter: str
    sent: float  # perf_counter of its scheduled arrival (latencies count from here)
    chunks: list[tuple[float, int]]  # (arrival, tokens) per streamed chunk
    error: str | None = None
    lag: float = 0.0  # how late the client actually sent it (an overloaded client shows here)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def arrivals(n_adapters: int, rate: float, duration: float, zipf: float, seed: int):
    """Poisson arrival times over ``duration`` s (all at 0 when ``rate`` is inf) and a Zipf
    adapter index for each (0 the most popular)."""
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / k**zipf for k in range(1, n_adapters + 1)))
    times, t = [], 0.0
    if rate == float("inf"):
        times = [0.0] * int(duration)  # a burst of ``duration`` requests
    else:
        while (t := t + rng.expovariate(rate)) < duration:
            times.append(t)
    picks = rng.choices(range(n_adapters), cum_weights=cum, k=len(times))
    return times, picks


async def drive(
    target: str,
    names: list[str],
    times: list[float],
    picks: list[int],
    prompt_len: int,
    new_tokens: int,
    vocab: int,
    channels: int = 8,
    timeout: float = 900.0,
) -> list[RequestLog]:
    """Send request ``i`` at ``times[i]`` on adapter ``names[picks[i]]``, streaming; open loop."""
    from loraserve.client import AsyncLoraClient, LoraServeError

    clients = [AsyncLoraClient(target, retries=0) for _ in range(channels)]
    ps = prompts(len(times), prompt_len, vocab)
    start = time.perf_counter() + 0.05

    async def one(i: int) -> RequestLog:
        due = start + times[i]
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        rec = RequestLog(names[picks[i]], due, [], lag=time.perf_counter() - due)
        try:
            stream = clients[i % channels].stream(
                ps[i], rec.adapter, max_new_tokens=new_tokens, temperature=0.0, timeout=timeout
            )
            async for chunk in stream:
                if chunk.token_ids:
                    rec.chunks.append((time.perf_counter(), len(chunk.token_ids)))
        except LoraServeError as err:
            rec.error = err.code.name
        return rec

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(times)))))
    finally:
        for c in clients:
            await c.close()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    if len(values) == 1:
        v = round(1000 * values[0], 2)
        return {"p50": v, "p90": v, "p99": v, "n": 1}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(1000 * q[49], 2),
        "p90": round(1000 * q[89], 2),
        "p99": round(1000 * q[98], 2),
        "n": len(values),
    }  # milliseconds


def summarize_requests(logs: list[RequestLog], new_tokens: int) -> dict:
    ok = [r for r in logs if r.error is None]
    errors: dict[str, int] = {}
    for r in logs:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    short = sum(1 for r in ok if r.tokens != new_tokens)
    first = min(r.sent for r in logs) if logs else 0.0
    last = max((r.chunks[-1][0] for r in ok if r.chunks), default=first)
    wall = max(last - first, 1e-9)
    tokens = sum(r.tokens for r in ok)
    # one sample per token: a chunk of n tokens after a gap g counts n times, as g / n
    itl = [
        (b[0] - a[0]) / b[1]
        for r in ok
        for a, b in itertools.pairwise(r.chunks)
        for _ in range(b[1])
    ]
    return {
        "requests": len(logs),
        "completed": len(ok),
        "errors": errors,
        "short_outputs": short,
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "requests_s": round(len(ok) / wall, 3),
        "distinct_adapters": len({r.adapter for r in logs}),
        "ttft_ms": percentiles([r.chunks[0][0] - r.sent for r in ok if r.chunks]),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles([r.chunks[-1][0] - r.sent for r in ok if r.chunks]),
        "send_lag_ms": percentiles([r.lag for r in logs]),
    }


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict:
    """Cache hit rates per tier, evictions, disk loads and the mean running batch in a run."""

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict = {}
    for tier in ("device", "host"):
        hits = d(f'loraserve_adapter_cache_hits_total{{tier="{tier}"}}')
        misses = d(f'loraserve_adapter_cache_misses_total{{tier="{tier}"}}')
        out[f"{tier}_hits"], out[f"{tier}_misses"] = int(hits), int(misses)
        out[f"{tier}_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
        out[f"{tier}_evictions"] = int(
            d(f'loraserve_adapter_cache_evictions_total{{tier="{tier}"}}')
        )
    out["disk_loads"] = int(d('loraserve_adapter_loads_total{result="ok"}'))
    count = d("loraserve_adapter_load_duration_seconds_count")
    total = d("loraserve_adapter_load_duration_seconds_sum")
    out["disk_load_mean_ms"] = round(1000 * total / count, 2) if count else None
    steps = d("loraserve_batch_size_count")
    out["mean_batch"] = round(d("loraserve_batch_size_sum") / steps, 2) if steps else None
    out["engine_steps"] = int(d("loraserve_engine_steps_total"))
    return out


def run_load(server: ServerProcess, names: list[str], rate: float, plan: Plan, vocab: int,
             seed: int, duration: float | None = None) -> dict:  # fmt: skip
    times, picks = arrivals(len(names), rate, duration or plan.duration, plan.zipf, seed)
    before = server.metrics()
    logs = asyncio.run(
        drive(server.target, names, times, picks, plan.prompt_len, plan.new_tokens, vocab)
    )
    result = summarize_requests(logs, plan.new_tokens)
    result["server"] = metric_deltas(before, server.metrics())
    result["offered_rate"] = None if rate == float("inf") else round(rate, 3)
    return result


def warm_up(server: ServerProcess, names: list[str], plan: Plan, vocab: int) -> None:
    """Every shape once and the most popular adapters into their slots (not timed)."""
    n = min(len(names), plan.many.slots)
    times, picks = [0.0] * n, list(range(n))
    asyncio.run(drive(server.target, names, times, picks, plan.prompt_len, 4, vocab))


# --------------------------------------------------------------------------------------------
# cold loads


def cold_loads(
    server: ServerProcess,
    folder: Path,
    ckpt: Path,
    ranks,
    per_rank: int,
    vocab: int,
    deadline: float = 60.0,
) -> tuple[dict, list[Path]]:
    """Rename -> first token, per rank; returns the times and the files (kept in ``folder``)."""
    from loraserve.adapters.format import write_adapter
    from loraserve.client import AdapterNotFoundError, LoraClient

    results, files = {}, []
    prompt = prompts(1, 8, vocab)[0]
    with LoraClient(server.target, retries=0) as client:
        for rank in ranks:
            config, shapes = _adapter_config(ckpt, rank)
            times = []
            for i in range(per_rank):
                name = f"cold-r{rank}-{i:03d}"
                hidden = folder / f".{name}.safetensors"
                adapter = ck.random_adapter(config, shapes, rank, seed=50_000 + i, name=name)
                write_adapter(hidden, adapter)
                drop_from_page_cache(hidden)
                final = folder / f"{name}.safetensors"
                t0 = time.perf_counter()
                os.rename(hidden, final)
                while time.perf_counter() - t0 < deadline:
                    chunks = client.stream(prompt, name, max_new_tokens=1, temperature=0.0)
                    try:
                        next(chunks)
                        break
                    except AdapterNotFoundError:
                        time.sleep(0.005)
                    finally:
                        chunks.close()
                else:
                    raise RuntimeError(
                        f"{name} not served {deadline} s after its rename:\n{server.log_tail()}"
                    )
                times.append(time.perf_counter() - t0)
                files.append(final)
            results[str(rank)] = percentiles(times)
    return results, files


def disk_to_device(ckpt: Path, files: list[Path], device: str, dtype: str, max_rank: int) -> dict:
    """The server's disk -> device path, in this process, per rank: read + validate (disk ->
    host) and slot fill (host -> device), page cache dropped before each read."""
    import torch
    from loraserve.adapters.format import read_adapter, validate_adapter
    from loraserve.adapters.lora import linear_shapes, replace_linear_with_batched_lora
    from loraserve.adapters.models import load_model

    dev = torch.device(device)
    loaded = load_model(ckpt, dev, getattr(torch, dtype))
    base_shapes = linear_shapes(loaded.model)
    table = replace_linear_with_batched_lora(loaded.model, "all-linear", 1, max_rank, "gather")
    shapes = {n: base_shapes[n] for n in table.layers}
    per_rank: dict[str, dict[str, list[float]]] = {}
    for path in files:
        drop_from_page_cache(path)
        name = path.name.removesuffix(".safetensors")
        t0 = time.perf_counter()
        adapter = read_adapter(path, name)
        validate_adapter(adapter, shapes, loaded.fingerprint, max_rank)
        t1 = time.perf_counter()
        table.fill(1, {n: (w.A.to(dev), w.B.to(dev), w.scale) for n, w in adapter.modules.items()})
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        times = per_rank.setdefault(str(adapter.rank), {"read": [], "fill": [], "total": []})
        times["read"].append(t1 - t0)
        times["fill"].append(t2 - t1)
        times["total"].append(t2 - t0)
        times.setdefault("mib", adapter.nbytes / 2**20)
    return {
        r: {k: percentiles(v) for k, v in t.items() if k != "mib"} | {"mib": round(t["mib"], 2)}
        for r, t in per_rank.items()
    }


# --------------------------------------------------------------------------------------------
# the suite


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="128 adapters, 8 slots, 4 s runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None, help="checkpoints and adapters")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.cache_dir = args.cache_dir or ck.default_cache_dir()
    return args


def run_suite(args: argparse.Namespace, plan: Plan | None = None, ckpt: Path | None = None) -> dict:
    """The whole suite; ``plan`` and ``ckpt`` default to ``make_plan(args.quick)`` and the
    hidden-512 bench checkpoint (tests pass a tiny model and plan)."""
    from loraserve.adapters.models import read_config

    t_start = time.monotonic()
    plan = plan or make_plan(args.quick)
    if args.duration:
        plan = replace(plan, duration=args.duration)
    ckpt = ckpt or ck.checkpoint(ck.SMALL, args.cache_dir)
    from loraserve.adapters.tokenizer import Tokenizer

    config = read_config(ckpt)
    vocab = min(config.vocab_size, Tokenizer(ckpt / "tokenizer.json").vocab_size)
    pool = adapter_pool(ckpt, plan.rank, plan.many.adapters, args.cache_dir)
    names = [p.name.removesuffix(".safetensors") for p in pool]
    report: dict = {
        "machine": describe(args.device, args.dtype),
        "settings": {
            "quick": args.quick,
            "model": f"hidden {config.hidden_size}, {config.num_layers} layers",
            "plan": asdict(plan),
            "adapter_mib": round(pool[0].stat().st_size / 2**20, 2),
        },
        "runs": {},
    }
    work = Path(tempfile.mkdtemp(prefix="loraserve-load-", dir=args.cache_dir))
    try:
        # the resident side first: its capacity fixes the offered rates for both
        folder = serving_folder(pool[: plan.resident.adapters], work)
        server = ServerProcess(
            server_args(plan.resident, folder, ckpt, plan, args.device, args.dtype),
            work / "resident.log",
        )
        try:
            report["runs"]["resident"] = {"start_s": server.start_s}
            warm_up(server, names[: plan.resident.adapters], plan, vocab)
            wait_until_quiet(max_wait=10)
            burst = run_load(server, names[: plan.resident.adapters], float("inf"), plan,
                             vocab, seed=1, duration=plan.calibrate_requests)  # fmt: skip
            capacity = burst["requests_s"]
            report["capacity"] = {"requests_s": capacity, "burst": burst}
            print(f"resident capacity {capacity:.2f} req/s ({burst['output_tok_s']} tok/s)")
            for label, fraction in plan.rates:
                wait_until_quiet(max_wait=10)
                run = run_load(server, names[: plan.resident.adapters], fraction * capacity,
                               plan, vocab, seed=2)  # fmt: skip
                report["runs"]["resident"][label] = run
                _print_run("resident", label, run)
        finally:
            server.stop()
        shutil.rmtree(folder)

        folder = serving_folder(pool[: plan.many.adapters], work)
        server = ServerProcess(
            server_args(plan.many, folder, ckpt, plan, args.device, args.dtype),
            work / "many.log",
        )
        try:
            report["runs"]["many"] = {"start_s": server.start_s}
            warm_up(server, names[: plan.many.adapters], plan, vocab)
            for label, fraction in plan.rates:
                wait_until_quiet(max_wait=10)
                run = run_load(server, names[: plan.many.adapters], fraction * capacity, plan,
                               vocab, seed=2)  # fmt: skip
                report["runs"]["many"][label] = run
                _print_run("many", label, run)
            wait_until_quiet(max_wait=10)
            cold, files = cold_loads(
                server, folder, ckpt, plan.cold_ranks, plan.cold_per_rank, vocab
            )
            report["cold_load"] = {"rename_to_first_token_ms": cold}
        finally:
            server.stop()
        report["cold_load"]["disk_to_device_ms"] = disk_to_device(
            ckpt, files, args.device, args.dtype, max(plan.cold_ranks)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["summary"] = summarize(report)
    report["settings"]["suite_s"] = round(time.monotonic() - t_start, 1)
    return report


def _print_run(setup: str, label: str, run: dict) -> None:
    s = run["server"]
    print(
        f"{setup:8s} {label:8s} offered {run['offered_rate']} req/s: {run['output_tok_s']} tok/s, "
        f"ttft p50 {run['ttft_ms']['p50']} p99 {run['ttft_ms']['p99']} ms, itl p50 "
        f"{run['itl_ms']['p50']} ms, errors {run['errors'] or 0}, device hit "
        f"{s['device_hit_rate']}, host hit {s['host_hit_rate']}, batch {s['mean_batch']}",
        flush=True,
    )


def summarize(report: dict) -> dict:
    runs = report["runs"]
    out: dict = {"ratios": {}, "errors": 0}
    for label in runs["many"]:
        if label == "start_s":
            continue
        many, resident = runs["many"][label], runs["resident"][label]
        out["ratios"][label] = round(many["output_tok_s"] / resident["output_tok_s"], 3)
        out["errors"] += sum(many["errors"].values()) + sum(resident["errors"].values())
    ratio = out["ratios"].get("saturate")
    out["target"] = {
        "what": "many adapters / all resident, output tok/s at saturation",
        "target": TARGET,
        "measured": ratio,
        "met": ratio is not None and ratio >= TARGET and out["errors"] == 0,
    }
    return out


# --------------------------------------------------------------------------------------------
# output


def markdown(report: dict, plots: list[Path]) -> str:
    m, plan = report["machine"], report["settings"]["plan"]
    many, res = plan["many"], plan["resident"]
    lines = [
        f"# Many adapters, few slots: open-loop gRPC load ({m['device']}, {m['dtype']})",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads){', ' + m['gpu'] if 'gpu' in m else ''}.",
        f"Model: {report['settings']['model']}; adapters rank {plan['rank']} on every linear "
        f"layer but lm_head ({report['settings']['adapter_mib']} MiB each); batch "
        f"{plan['batch']}; prompt {plan['prompt_len']}, output {plan['new_tokens']} tokens, "
        f"greedy, streamed; Zipf s={plan['zipf']}; Poisson arrivals for {plan['duration']} s.",
        f"`many`: {many['adapters']} adapters on disk, {many['slots']} device slots, "
        f"{many['host_cache']} in host memory. `resident`: {res['adapters']} adapters, "
        f"{res['slots']} slots. Resident capacity (burst): "
        f"{report['capacity']['requests_s']} req/s. Suite {report['settings']['suite_s']} s.",
        "",
        "| setup | load | offered req/s | done | errors | tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | e2e p50 / p99 ms | device hit | host hit | disk loads "
        "| mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setup in ("resident", "many"):
        for label, run in report["runs"][setup].items():
            if label == "start_s":
                continue
            s = run["server"]
            lines.append(
                f"| {setup} | {label} | {run['offered_rate']} | {run['completed']}/"
                f"{run['requests']} | {sum(run['errors'].values())} | {run['output_tok_s']} | "
                f"{_pp(run['ttft_ms'])} | {_pp(run['itl_ms'])} | {_pp(run['e2e_ms'])} | "
                f"{_rate(s['device_hit_rate'])} | {_rate(s['host_hit_rate'])} | "
                f"{s['disk_loads']} | {s['mean_batch']} |"
            )
    t = report["summary"]["target"]
    lines += [
        "",
        f"**{t['what']}: {t['measured']}** (target >= {t['target']}: "
        f"{'met' if t['met'] else 'MISSED'}). Ratios per load: {report['summary']['ratios']}. "
        f"Server start-up (registry scan included): resident "
        f"{report['runs']['resident']['start_s']} s, many {report['runs']['many']['start_s']} s.",
        "",
        "## Adapter cold load",
        "",
        "Rename into the folder -> first streamed token (watcher debounce 0.25 s included), and "
        "disk -> device on the server's code path (page cache dropped first), milliseconds.",
        "",
        "| rank | MiB | rename -> first token p50 / p99 | disk -> device p50 / p99 "
        "| of which read + validate p50 | slot fill p50 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    cold = report["cold_load"]
    for rank, first in cold["rename_to_first_token_ms"].items():
        dd = cold["disk_to_device_ms"].get(rank, {})
        lines.append(
            f"| {rank} | {dd.get('mib')} | {_pp(first)} | {_pp(dd.get('total', {}))} | "
            f"{dd.get('read', {}).get('p50')} | {dd.get('fill', {}).get('p50')} |"
        )
    n = report["settings"]["plan"]["cold_per_rank"]
    lines += ["", f"{n} adapters per rank (p99 of {n} samples is close to the maximum)."]
    if plots:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(lines) + "\n"


def _pp(p: dict) -> str:
    return f"{p.get('p50')} / {p.get('p99')}"


def _rate(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot(report: dict, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [k for k in report["runs"]["resident"] if k != "start_s"]
    x = range(len(labels))
    for i, setup in enumerate(("resident", "many")):
        runs = report["runs"][setup]
        axes[0].bar([j + 0.4 * i for j in x], [runs[k]["output_tok_s"] for k in labels], 0.4,
                    label=setup)  # fmt: skip
    axes[0].set_xticks([j + 0.2 for j in x], labels)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput at the same offered load")
    axes[0].legend()
    width, pos = 0.2, 0
    for setup in ("resident", "many"):
        for metric in ("ttft_ms", "itl_ms"):
            runs = report["runs"][setup]
            axes[1].bar([j + width * pos for j in x], [runs[k][metric]["p50"] for k in labels],
                        width, label=f"{setup} {metric[:-3]} p50")  # fmt: skip
            pos += 1
    axes[1].set_xticks([j + 1.5 * width for j in x], labels)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log)")
    axes[1].set_title("latency p50")
    axes[1].legend(fontsize=7)
    cold = report["cold_load"]
    ranks = list(cold["rename_to_first_token_ms"])
    first = [cold["rename_to_first_token_ms"][r]["p50"] for r in ranks]
    dd = [cold["disk_to_device_ms"][r]["total"]["p50"] for r in ranks]
    axes[2].bar([j - 0.2 for j in range(len(ranks))], first, 0.4, label="rename -> 1st token")
    axes[2].bar([j + 0.2 for j in range(len(ranks))], dd, 0.4, label="disk -> device")
    axes[2].set_xticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    axes[2].set_ylabel("ms, p50")
    axes[2].set_title("adapter cold load")
    axes[2].legend()
    fig.suptitle(f"bench.load on {report['machine']['device']} ({report['machine']['dtype']})")
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def write(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem("load", report)
    plots = plot(report, out, stem)
    return [*write_report(out, stem, report, markdown(report, plots)), *plots]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run_suite(args)
    paths = write(report, args.out)
    print(markdown(report, paths[2:]))
    for path in paths:
        print(" ", path)


if __name__ == "__main__":
    main()
