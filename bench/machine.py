"""The machine a benchmark runs on: what it is, its memory bandwidth, and whether it is quiet.

- ``describe(device, dtype)``: CPU model, logical CPUs, torch threads, library versions, device.
- ``memory_bandwidth(device)``: GB/s of a large tensor copy, counting bytes read + written
  (``2 * nbytes / time``), median of several copies. This is the number the physical floors
  divide by: a decode step must at least read every byte of weights it uses once.
- ``wait_until_quiet()``: the benchmarks share a small machine with other jobs; before each timed
  repetition they wait (bounded) until the other processes leave the CPUs idle.
- ``OthersMeter``: how much CPU *other* processes used while a repetition ran (all CPU time
  minus this process's), so a repetition a neighbour slowed down can be recognised and redone.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata

import torch


def describe(device: str, dtype: str) -> dict:
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(_mem_total_gib(), 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": device,
        "dtype": dtype,
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _git_commit() -> str | None:
    """The checkout the numbers come from (``+dirty`` with uncommitted code changes), if any."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            # results being written by this very run do not count
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def memory_bandwidth(device: str, nbytes: int = 512 << 20, reps: int = 9) -> float:
    """GB/s of ``dst.copy_(src)`` on ``device``, bytes read + written, median of ``reps``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        nbytes = max(nbytes, 2 << 30)  # large enough to leave the GPU's L2 far behind
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        if i >= 2:  # first copies fault pages in
            times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_busy(interval: float = 0.25) -> float:
    """Fraction of all CPUs busy over ``interval`` (0..1), from /proc/stat; 0 where unknown."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None:
        return 0.0
    idle, total = b[0] - a[0], b[1] - a[1]
    return 1.0 - idle / total if total > 0 else 0.0


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def wait_until_quiet(threshold: float = 0.3, max_wait: float = 30.0) -> float:
    """Wait (at most ``max_wait`` s) until the CPUs are at most ``threshold`` busy while this
    process is idle; returns the last busy fraction seen (recorded next to each repetition)."""
    end = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < end:
        busy = cpu_busy(0.5)
    return round(busy, 2)


class OthersMeter:
    """Fraction of the machine's CPUs that other processes kept busy between ``start`` and
    ``stop`` (0..1): busy time from /proc/stat minus this process's own CPU time."""

    def start(self) -> None:
        self._t, self._own, self._cpu = time.monotonic(), time.process_time(), _cpu_times()

    def stop(self) -> float:
        wall, own, cpu = time.monotonic() - self._t, time.process_time() - self._own, _cpu_times()
        if cpu is None or self._cpu is None or wall <= 0:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        busy = ((cpu[1] - cpu[0]) - (self._cpu[1] - self._cpu[0])) / tick
        return round(max(0.0, busy - own) / (wall * (os.cpu_count() or 1)), 3)


def gemm_floor(
    shapes: dict[tuple[int, int], int], batch: int, device: str, dtype: str, reps: int = 30
) -> dict:
    """The compute floor of one decode step: every Linear of the model as one GEMM of ``batch``
    rows, timed alone on this machine at its own shape.

    ``shapes``: ``(d_in, d_out) -> how many layers have it``. Each shape is timed through
    ``F.linear`` (the BLAS) and, where they run (CPU float32), through oneDNN's linear on a
    packed weight and through the native op the compiled step uses (``native``: the library's
    own GEMM on AVX-512); the floor takes the fastest per shape, so it is the best GEMM this
    machine offers at that shape, ours or not. Weights are *streamed* as in a real step (whose
    weights outgrow the caches): each call takes the next of enough copies to fill 64 MiB, so
    it reads its weight from memory; the same GEMM on a cache-resident weight is reported too
    (``hot``). Returns per shape ms and GFLOPS, and the totals: ``floor_ms`` (sum of the best
    streamed times), ``hot_floor_ms``, ``blas_ms`` (streamed, BLAS only), ``gflop``."""
    import torch.nn.functional as F
    from loraserve.adapters.kernels import cpu as cpu_kernels
    from loraserve.adapters.models.packed import can_pack, packed_linear

    dev, dt = torch.device(device), getattr(torch, dtype)
    packable = can_pack(dev, dt)
    native = packable and cpu_kernels.available()
    rows, totals, flops = [], {"floor": 0.0, "hot": 0.0, "blas": 0.0}, 0
    for (d_in, d_out), count in sorted(shapes.items()):
        x = torch.randn(batch, d_in, device=dev, dtype=dt)
        size = d_in * d_out * torch.empty((), dtype=dt).element_size()
        ws = [torch.randn(d_out, d_in, device=dev, dtype=dt) for _ in range(-(-64 * 2**20 // size))]
        ops = {"blas": F.linear}
        if packable:
            ops["onednn"] = lambda x, w: packed_linear(x, w, None)
            if native:
                ops["native"] = lambda x, w: cpu_kernels.packed_linear(x, w, None)
        times = {}
        for name, op in ops.items():
            times[name] = _time_cycling(op, x, ws, dev, reps)
            times[f"{name}_hot"] = _time_cycling(op, x, ws[:1], dev, reps)
        best = min(times[name] for name in ops)
        hot = min(times[f"{name}_hot"] for name in ops)
        f = 2 * batch * d_in * d_out
        rows.append(
            {
                "shape": [d_in, d_out],
                "count": count,
                **{f"{k}_ms": round(v * 1e3, 4) for k, v in times.items()},
                "best_gflops": round(f / best / 1e9, 1),
                "hot_gflops": round(f / hot / 1e9, 1),
            }
        )
        totals["floor"] += count * best
        totals["hot"] += count * hot
        totals["blas"] += count * times["blas"]
        flops += count * f
    return {
        "batch": batch,
        "shapes": rows,
        "floor_ms": round(totals["floor"] * 1e3, 3),
        "hot_floor_ms": round(totals["hot"] * 1e3, 3),
        "blas_ms": round(totals["blas"] * 1e3, 3),
        "gflop": round(flops / 1e9, 4),
        "gflops_at_floor": round(flops / totals["floor"] / 1e9, 1),
    }


def _time_cycling(op, x, weights, device: torch.device, reps: int) -> float:
    """Median seconds of ``op(x, w)``, ``w`` cycling through ``weights`` (after a warm-up that
    touches every one)."""
    with torch.inference_mode():
        for w in weights * 2:
            op(x, w)
        times = []
        for i in range(max(reps, len(weights))):
            w = weights[i % len(weights)]
            _sync(device)
            t = time.perf_counter()
            op(x, w)
            _sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)
