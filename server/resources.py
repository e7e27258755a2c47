"""What the server may use of its machine: CPU threads, and a memory plan checked before it
allocates.

Threads. torch's default is every CPU of the machine, even in a container limited to two of
them; under contention that collapses latency (a demo request took 0.4-1.5 s instead of 30 ms on
2 shared cores). ``available_cpus`` counts what this process may really run on: its CPU affinity
and its cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``).

Memory. Everything the server allocates up front is known from the config before it is
allocated: the base weights, the KV cache (``max_batch_size`` rows of ``max_seq_len``), and the
LoRA slot tables (``max_active_adapters + 1`` slots of ``max_lora_rank`` on every adapted
layer), plus the host adapter cache's byte bound. ``MemoryPlan`` adds them up, is logged at
start-up, and refuses to start, with a message naming the knobs, when the plan exceeds
``--max-memory`` or what the device has free.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.adapters.format import MAX_CONFIG_BYTES

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": 1 << 20}
_UNITS |= {"gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1.5G"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 8GiB, 512M, 1000000)")
    return int(float(m[1]) * _UNITS[m[2] or ""])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:
        parts = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:  # v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device, cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes free for new allocations on ``device``: CUDA's free memory, or for the CPU the
    kernel's MemAvailable capped by the cgroup's memory limit. None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            room = int(limit) - used
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # base model, already loaded
    kv_cache: int
    slot_tables: int
    host_cache: int  # the host adapter cache's byte bound (filled on demand)
    device: torch.device
    packed: int = 0  # packed copies of the Linear weights (compiled CPU step)

    @property
    def to_allocate(self) -> int:
        """What start-up still allocates on the device."""
        return self.kv_cache + self.slot_tables + self.packed

    @property
    def total(self) -> int:
        """Everything, the host cache bound included when it shares the device's memory."""
        host = self.host_cache if self.device.type == "cpu" else 0
        return self.weights + self.packed + self.kv_cache + self.slot_tables + host

    def describe(self) -> str:
        f = format_bytes
        packed = f" (+ {f(self.packed)} packed for the CPU GEMM)" if self.packed else ""
        return (
            f"memory plan on {self.device}: weights {f(self.weights)}{packed}, "
            f"KV cache {f(self.kv_cache)}"
            f", LoRA slot tables {f(self.slot_tables)}, host adapter cache up to "
            f"{f(self.host_cache)}; total {f(self.total)}"
        )

    def check(self, budget: int | None, free: int | None) -> None:
        """Raise ``ValueError`` if the plan does not fit ``--max-memory`` or the device."""
        knobs = (
            "lower --max-batch-size or --max-seq-len (KV cache), --max-active-adapters or "
            "--max-lora-rank (slot tables), or --max-cached-bytes (host cache)"
        )
        if budget is not None and self.total > budget:
            raise ValueError(
                f"{self.describe()} exceeds --max-memory {format_bytes(budget)}: {knobs}"
            )
        if free is not None and self.to_allocate > free:
            raise ValueError(
                f"{self.describe()}: the KV cache and slot tables need "
                f"{format_bytes(self.to_allocate)} but {self.device} has {format_bytes(free)} "
                f"free: {knobs}"
            )


def plan_memory(
    model: torch.nn.Module,
    model_config,
    lora_shapes: dict[str, tuple[int, int]],
    *,
    max_batch_size: int,
    max_seq_len: int,
    slots: int,
    max_rank: int,
    host_cache_bytes: int,
    dtype: torch.dtype,
    device: torch.device,
    packed: bool = False,
    lora_dtype: torch.dtype | None = None,
) -> MemoryPlan:
    """``packed``: the Linear weights get packed copies (``adapters.models.packed``).
    ``lora_dtype``: the slot tables' dtype (default ``dtype``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    table_itemsize = torch.empty((), dtype=lora_dtype or dtype).element_size()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    kv = (
        2
        * model_config.num_layers
        * max_batch_size
        * model_config.num_kv_heads
        * (max_seq_len + 1)  # + the scratch column of static decode steps
        * model_config.head_dim
        * itemsize
    )
    tables = sum((slots + 1) * max_rank * (i + o) * table_itemsize for i, o in lora_shapes.values())
    linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    packed_bytes = sum(w.numel() * w.element_size() for w in linears.values()) if packed else 0
    return MemoryPlan(weights, kv, tables, host_cache_bytes, device, packed_bytes)


def max_header_bytes(lora_shapes: dict[str, tuple[int, int]]) -> int:
    """The largest safetensors header an adapter of this server can need: two tensors per
    adaptable module at a few hundred bytes each, plus the LoRA config a single file carries in
    its metadata (JSON-escaped). Parsing a header holds the GIL, so it is capped this tight."""
    return 2 * MAX_CONFIG_BYTES + 1024 * len(lora_shapes)


def max_adapter_bytes(lora_shapes: dict[str, tuple[int, int]], max_rank: int) -> int:
    """The largest adapter file that can fit this server: every adapted layer at the max rank in
    float64, plus room for the header. Larger files are refused before they are read."""
    return sum(max_rank * (i + o) * 8 for i, o in lora_shapes.values()) + (16 << 20)
