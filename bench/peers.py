"""Issue 5: loraserve against Hugging Face PEFT on the same checkpoint and the same adapter files.

Methods, each timed on the same workload (``len(requests)`` greedy requests, request ``i`` on
adapter ``i % n``, prompt and output lengths fixed, batch 32):

- ``peft-switch``: one PeftModel holding every adapter; requests grouped by adapter,
  ``set_adapter(name)`` then ``generate`` per group (chunks of at most ``batch``);
- ``peft-mixed``: PEFT's mixed-adapter batch, ``generate(..., adapter_names=[...])`` per chunk
  of ``batch`` requests (PEFT >= 0.10; each LoRA layer loops over the adapters in the batch);
- ``engine``: loraserve's engine in-process (``bench.harness.run_engine``), every request
  submitted at once;
- ``grpc``: a real loraserve gRPC server on loopback with ``batch`` concurrent client threads
  (``bench.harness.run_grpc``).

Also the engine on the base model alone, so each grid point reports throughput with ``n``
distinct adapters / base only next to its physical floor (see ``bench.engine``), and scaling
curves: throughput vs batch size, vs number of distinct adapters, vs rank.

    python -m bench.peers [--quick] [--device cuda --dtype bfloat16] [--out DIR]

Writes ``peers-<device>.json``, ``peers-<device>.md`` and ``peers-<device>-*.png`` under
``--out``. One process per (hidden, method, rank): a fresh model for every grid point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import checkpoints as ck
from bench.harness import (
    StepLog,
    Workload,
    greedy_generate,
    prompts,
    report_stem,
    run_engine,
    run_grpc,
    run_worker,
    server_config,
    timed_reps,
    worker_main,
    write_report,
)
from bench.machine import describe, memory_bandwidth, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("peft-switch", "peft-mixed", "engine", "grpc")
BATCH = 32
# the targets at hidden 512, rank 16, 32 distinct adapters
TARGETS = [
    ("engine", "peft-switch", 5.0),
    ("engine", "peft-mixed", 2.0),
    ("grpc", "engine", 0.8),
]


@dataclass(frozen=True)
class Job:
    """One worker process: one method at one (hidden, rank), over several (n, batch) points,
    a fresh model for each point. ``n == 0`` is the base model alone (engine only)."""

    hidden: int
    method: str
    rank: int
    points: tuple[tuple[int, int], ...]  # (n distinct adapters, batch)


@dataclass(frozen=True)
class Plan:
    jobs: tuple[Job, ...]
    new_tokens: int
    prompt_len: int
    reps: int
    quiet_wait: float
    trimmed: tuple[str, ...]


def _grid_jobs(hidden, ranks, ns, methods, switch_ns=None) -> list[Job]:
    jobs = []
    for rank in ranks:
        for method in methods:
            points = switch_ns if method == "peft-switch" and switch_ns else ns
            points = ([0] if method == "engine" else []) + points  # base, for n / base
            jobs.append(Job(hidden, method, rank, tuple((n, BATCH) for n in points)))
    return jobs


def _batch_curve_jobs(sizes: list[int]) -> list[Job]:
    """Throughput vs batch size at hidden 512, rank 16: every row its own adapter, and base."""
    engine = tuple(p for b in sizes for p in ((b, b), (0, b)))
    return [
        Job(512, "engine", 16, engine),
        Job(512, "peft-mixed", 16, tuple((b, b) for b in sizes)),
    ]


def make_plan(quick: bool, device: str) -> Plan:
    if quick:
        return Plan(
            jobs=tuple(_grid_jobs(512, [16], [32], METHODS)),
            new_tokens=8,
            prompt_len=32,
            reps=3,
            quiet_wait=2.0,
            trimmed=("quick: hidden 512, rank 16, 32 adapters only; 8 new tokens",),
        )
    if device.startswith("cuda"):
        jobs = []
        for hidden in (512, 2048):
            jobs += _grid_jobs(hidden, [8, 16, 64], [1, 8, 32, 128], METHODS)
        return Plan(
            jobs=tuple(jobs + _batch_curve_jobs([1, 4, 8, 16])),
            new_tokens=32,
            prompt_len=32,
            reps=3,
            quiet_wait=0.0,
            trimmed=(),
        )
    jobs = _grid_jobs(512, [16], [1, 8, 32, 128], METHODS, switch_ns=[1, 8, 32])
    jobs += _grid_jobs(512, [8, 64], [32], ("peft-switch", "peft-mixed", "engine"))
    jobs += _batch_curve_jobs([1, 8])
    jobs += _grid_jobs(2048, [16], [32], ("peft-mixed", "engine", "grpc"))
    return Plan(
        jobs=tuple(jobs),
        new_tokens=16,
        prompt_len=32,
        reps=3,
        quiet_wait=15.0,
        trimmed=(
            "16 new tokens per request",
            "hidden 512: all four methods at rank 16 for 1/8/32/128 adapters, except PEFT "
            "switching at 128 (128 sequential batch-1 generates per repetition); ranks 8 and "
            "64 at 32 adapters without gRPC",
            "hidden 2048: rank 16, 32 adapters: PEFT mixed batch, the engine and gRPC (PEFT "
            "switching left out: 32 sequential batch-1 generates of a 0.3B model per "
            "repetition, ~3 minutes on 2 cores)",
            "batch curve: 1, 8 and 32",
        ),
    )


def workload_adapters(n: int, batch: int) -> tuple[str, ...]:
    """max(batch, n) requests, request i on adapter i % n; n == 0: batch base-model requests."""
    if n == 0:
        return ("",) * batch
    return tuple(ck.adapter_name(i % n) for i in range(max(batch, n)))


# --------------------------------------------------------------------------------------------
# workers


def peers_job(job: dict) -> dict:
    """One ``Job``: every point with a fresh model (a fresh Runtime or PeftModel)."""
    out = []
    for point in job["points"]:
        n, batch = point["adapters"], point["batch"]
        work = Workload(
            adapters=workload_adapters(n, batch),
            batch=batch,
            prompt_len=job["prompt_len"],
            new_tokens=job["new_tokens"],
            reps=job["reps"],
            quiet_wait=job["quiet_wait"],
        )
        folder = Path(point["folder"])
        method = job["method"]
        if method.startswith("peft"):
            result = run_peft(job, folder, work, batch, mixed=method == "peft-mixed")
        else:
            config = server_config(
                Path(job["model"]),
                folder,
                backend=job["backend"],
                device=job["device"],
                dtype=job["dtype"],
                rank=job["rank"],
                slots=len(work.distinct),
                batch=batch,
                max_seq_len=job["prompt_len"] + job["new_tokens"],
                requests=len(work.adapters),
            )
            if method == "grpc":
                result = run_grpc(config, work, job["vocab"], clients=batch)
            else:
                result = run_engine(config, work, job["vocab"])
        result.update(adapters=n, batch=batch, requests=len(work.adapters))
        out.append(result)
    return {"points": out}


def run_peft(job: dict, folder: Path, work: Workload, batch: int, mixed: bool) -> dict:
    """Time ``work`` through transformers + PEFT (every adapter loaded once, up front)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    base = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).to(device).eval()
    names = work.distinct
    model = PeftModel.from_pretrained(base, folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    model.eval()
    ps = torch.tensor(prompts(len(work.adapters), work.prompt_len, job["vocab"]), device=device)

    def generate(rows: list[int], new_tokens: int, adapter_names=None) -> list[list[int]]:
        kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
        return greedy_generate(model, ps[rows], new_tokens, **kwargs)

    def submit_all(new_tokens: int) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        if mixed:
            for start in range(0, len(work.adapters), batch):
                rows = list(range(start, min(start + batch, len(work.adapters))))
                tokens = generate(rows, new_tokens, [work.adapters[i] for i in rows])
                out.update(zip(rows, tokens))
        else:
            for name in names:
                group = [i for i, a in enumerate(work.adapters) if a == name]
                model.set_adapter(name)
                for start in range(0, len(group), batch):
                    rows = group[start : start + batch]
                    out.update(zip(rows, generate(rows, new_tokens)))
        return [out[i] for i in range(len(work.adapters))]

    return timed_reps(work, submit_all, StepLog())


def bandwidth_job(job: dict) -> dict:
    busy = wait_until_quiet()
    return {"gb_s": memory_bandwidth(job["device"]), "cpu_busy_before": busy}


# --------------------------------------------------------------------------------------------
# the suite


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--backend", default=None, help="loraserve LoRA backend (default: the server's)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.cache_dir = args.cache_dir or ck.default_cache_dir()
    if args.backend is None:
        from loraserve.server.runtime import ServerConfig

        args.backend = ServerConfig().lora_backend
    return args


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    plan = make_plan(args.quick, args.device)
    machine = describe(args.device, args.dtype)
    bw = run_worker("bench.peers", {"kind": "bandwidth", "device": args.device})["gb_s"]
    print(f"memory bandwidth {bw:.1f} GB/s (copy, read + written)", flush=True)
    points, failures = [], []
    for job in plan.jobs:
        points += _measure(args, plan, job, failures)
    grid: dict[str, dict] = {}
    for job in plan.jobs:
        if all(b == BATCH for _, b in job.points):
            g = grid.setdefault(str(job.hidden), {"ranks": set(), "adapters": set()})
            g["ranks"].add(job.rank)
            g["adapters"].update(n for n, _ in job.points if n)
    report = {
        "suite": "peers",
        "machine": machine,
        "settings": {
            "batch": BATCH,
            "prompt_len": plan.prompt_len,
            "new_tokens": plan.new_tokens,
            "reps": plan.reps,
            "greedy": True,
            "lora_backend": args.backend,
            "targets": "all linear layers but lm_head",
            "grid": {h: {k: sorted(v) for k, v in g.items()} for h, g in grid.items()},
            "jobs": [asdict(j) for j in plan.jobs],
            "trimmed": list(plan.trimmed),
            "quick": args.quick,
        },
        "memory_bandwidth_gb_s": bw,
        "points": points,
        "failed_jobs": failures,
    }
    report["summary"] = summarize(report, args)
    report["targets"] = check_targets(report["summary"])
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def _measure(args, plan: Plan, job: Job, failures: list) -> list:
    spec = ck.SPECS[job.hidden]
    model = ck.checkpoint(spec, args.cache_dir)
    points = [
        {
            "adapters": n,
            "batch": b,
            "folder": str(ck.adapter_folder(model, job.rank, max(n, 1), args.cache_dir)),
        }
        for n, b in job.points
    ]
    payload = {
        "kind": "peers",
        "method": job.method,
        "model": str(model),
        "points": points,
        "rank": job.rank,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_len": plan.prompt_len,
        "new_tokens": plan.new_tokens,
        "reps": plan.reps,
        "vocab": spec.vocab,
        "quiet_wait": plan.quiet_wait,
    }
    t0 = time.monotonic()
    try:
        results = run_worker("bench.peers", payload)["points"]
    except RuntimeError as e:  # keep what the other workers measured; say what failed
        print(f"  FAILED: {job.method}, hidden {job.hidden}, rank {job.rank}: {e}", flush=True)
        failures.append({**asdict(job), "error": str(e)[-2000:]})
        return []
    elapsed = time.monotonic() - t0
    for p in results:
        p.update(hidden=job.hidden, method=job.method if p["adapters"] else "base", rank=job.rank)
        print(
            f"hidden {job.hidden:5d} rank {job.rank:3d} batch {p['batch']:3d} {p['method']:12s} "
            f"n={p['adapters']:<4d} {p['tok_s']:9.1f} tok/s  reps {p['tok_s_reps']}",
            flush=True,
        )
    print(f"  ({job.method}, hidden {job.hidden}, rank {job.rank}: worker {elapsed:.0f} s)")
    return results


def _point(report, hidden, method, rank, n, batch=BATCH):
    for p in report["points"]:
        if (p["hidden"], p["method"], p["rank"], p["adapters"], p["batch"]) == (
            hidden,
            method,
            rank,
            n,
            batch,
        ):
            return p
    return None


def summarize(report: dict, args) -> dict:
    """Ratios between methods per grid point, n distinct / base next to the floor, parity."""
    bw = report["memory_bandwidth_gb_s"]
    element = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows = []
    for size, plan in report["settings"]["grid"].items():
        size = int(size)
        shapes = ck.adapted_shapes(ck.checkpoint(ck.SPECS[size], args.cache_dir))
        for rank in plan["ranks"]:
            base = _point(report, size, "base", rank, 0)
            for n in plan["adapters"]:
                got = {m: _point(report, size, m, rank, n) for m in METHODS}
                if not any(got.values()):
                    continue
                row = {"hidden": size, "rank": rank, "adapters": n}
                row.update({f"{m} tok/s": p["tok_s"] for m, p in got.items() if p})
                engine, grpc = got.get("engine"), got.get("grpc")
                for m in ("peft-switch", "peft-mixed"):
                    if engine and got.get(m):
                        row[f"engine / {m}"] = engine["tok_s"] / got[m]["tok_s"]
                if engine and grpc:
                    row["grpc / engine"] = grpc["tok_s"] / engine["tok_s"]
                if engine and base:
                    row["engine / base"] = engine["tok_s"] / base["tok_s"]
                    row.update(_floor(base, engine, shapes, rank, n, element, bw, report))
                if engine and got.get("peft-mixed"):
                    row["greedy tokens equal to peft-mixed"] = _agreement(engine, got["peft-mixed"])
                rows.append(row)
    return {"grid": rows}


def _floor(base, engine, shapes, rank, n, element, bw, report) -> dict:
    """(c)-style floor: base decode step + the distinct adapters of a step read once."""
    if None in (base["decode_step_ms"], base["prefill_ms_per_rep"], engine["decode_step_ms"]):
        return {}  # too few tokens for a full-batch decode step
    distinct_per_step = min(n, BATCH)
    extra_ms = 1000 * distinct_per_step * ck.adapter_bytes(shapes, rank, element) / (bw * 1e9)
    steps = report["settings"]["new_tokens"] - 1
    waves = max(1, engine["requests"] // BATCH)
    tokens = engine["requests"] * report["settings"]["new_tokens"]
    floor_wall = waves * (base["prefill_ms_per_rep"] + steps * (base["decode_step_ms"] + extra_ms))
    floor_tok_s = tokens / (floor_wall / 1000)
    return {
        "floor tok/s": floor_tok_s,
        "floor / base": floor_tok_s / base["tok_s"],
        "engine / floor": engine["tok_s"] / floor_tok_s,
        "engine decode step ms": engine["decode_step_ms"],
        "base decode step ms": base["decode_step_ms"],
        "floor decode step ms": base["decode_step_ms"] + extra_ms,
    }


def _agreement(a: dict, b: dict) -> float:
    pairs = list(zip(a["outputs"], b["outputs"]))
    return sum(x == y for x, y in pairs) / len(pairs)


def check_targets(summary: dict) -> list[dict]:
    row = next(
        (r for r in summary["grid"] if (r["hidden"], r["rank"], r["adapters"]) == (512, 16, 32)),
        None,
    )
    if row is None:
        return []
    out = []
    for num, den, target in TARGETS:
        key = f"{num} / {den}"
        value = row.get(key)
        out.append(
            {
                "metric": f"{num} / {den} tok/s (hidden 512, rank 16, 32 adapters)",
                "target": target,
                "measured": None if value is None else round(value, 3),
                "met": value is not None and value >= target,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# output


def markdown(report: dict, plots: list[Path]) -> str:
    m, s = report["machine"], report["settings"]
    bw = report["memory_bandwidth_gb_s"]
    lines = [
        "# loraserve vs Hugging Face PEFT",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, peft {m['peft']}, "
        f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "") + f", dtype "
        f"{m['dtype']}. Memory bandwidth (copy, read + written) {bw:.1f} GB/s.",
        "",
        f"Workload: max(32, n) requests, request i on adapter i % n, batch {s['batch']}, prompt "
        f"{s['prompt_len']} tokens, {s['new_tokens']} new tokens (greedy), adapters on "
        f"{s['targets']}; loraserve LoRA backend {s['lora_backend']}. tok/s = generated tokens /"
        f" wall time, median of {s['reps']} repetitions after warm-up; one process per "
        "(hidden, method, rank).",
        "",
        "Trimmed: " + "; ".join(s["trimmed"]) + ".",
        "",
        "| hidden | rank | n | peft-switch | peft-mixed | engine | grpc | engine/switch | "
        "engine/mixed | grpc/engine | engine/base | floor/base | engine/floor | same tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["summary"]["grid"]:
        lines.append(
            f"| {r['hidden']} | {r['rank']} | {r['adapters']} | "
            + " | ".join(
                _fmt(r.get(k), 1)
                for k in ("peft-switch tok/s", "peft-mixed tok/s", "engine tok/s", "grpc tok/s")
            )
            + " | "
            + " | ".join(
                _fmt(r.get(k), 2)
                for k in (
                    "engine / peft-switch",
                    "engine / peft-mixed",
                    "grpc / engine",
                    "engine / base",
                    "floor / base",
                    "engine / floor",
                    "greedy tokens equal to peft-mixed",
                )
            )
            + " |"
        )
    lines += [
        "",
        "engine/base: throughput with n distinct adapters over the base model alone (same "
        "engine, same workload shape); floor/base: the same ratio if each decode step only had to "
        "read its distinct adapters once on top of the base step (memory bandwidth above).",
        "",
        "## Targets (hidden 512, rank 16, 32 distinct adapters)",
        "",
        "| metric | target | measured | met |",
        "|---|---:|---:|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['metric']} | >= {t['target']} | {_fmt(t['measured'], 3)} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    for f in report.get("failed_jobs", []):
        reason = f["error"].strip().splitlines()[-1]
        lines.append(f"\nFAILED: {f['method']} at hidden {f['hidden']}, rank {f['rank']}: {reason}")
    lines += ["", "## Scaling curves", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", f"Suite wall time {report['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: dict, out: Path, stem: str) -> list[Path]:
    """Three PNGs: tok/s vs batch size, vs distinct adapters, vs rank (hidden 512)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    paths = []

    def save(fig, name):
        path = out / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # vs batch size: every row its own adapter (rank 16), and the base model
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label, n_of in (
        ("engine", "loraserve, every row its own adapter", lambda b: b),
        ("peft-mixed", "PEFT mixed batch, every row its own adapter", lambda b: b),
        ("base", "loraserve, base model", lambda b: 0),
    ):
        xs, ys = [], []
        for b in sorted({p["batch"] for p in pts if p["hidden"] == 512 and p["rank"] == 16}):
            p = _point(report, 512, method, 16, n_of(b), batch=b)
            if p:
                xs.append(b)
                ys.append(p["tok_s"])
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="batch size", ylabel="generated tokens/s", title="hidden 512, rank 16")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    save(fig, "batch")

    # vs number of distinct adapters (rank 16), per method and hidden size
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({p["hidden"] for p in pts}):
        for method in METHODS:
            series = sorted(
                (p["adapters"], p["tok_s"])
                for p in pts
                if p["hidden"] == size
                and p["method"] == method
                and p["rank"] == 16
                and p["batch"] == BATCH
            )
            if series:
                ax.plot(*zip(*series), marker="o", label=f"{method}, hidden {size}")
    ax.set(xlabel="distinct adapters", ylabel="generated tokens/s", title="rank 16, batch 32")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save(fig, "adapters")

    # vs rank (32 distinct adapters), hidden 512
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        series = sorted(
            (p["rank"], p["tok_s"])
            for p in pts
            if p["hidden"] == 512 and p["method"] == method and p["adapters"] == 32
        )
        if len(series) > 1:
            ax.plot(*zip(*series), marker="o", label=method)
    ax.set(xlabel="rank", ylabel="generated tokens/s", title="hidden 512, 32 adapters, batch 32")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(fig, "rank")
    return paths


def write(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem("peers", report)
    plots = plot(report, out, stem)
    slim = json.loads(json.dumps(report))
    for p in slim["points"]:
        p.pop("outputs", None)  # token ids: used for the parity column, not worth keeping
    return [*write_report(out, stem, slim, markdown(report, plots)), *plots]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, {"peers": peers_job, "bandwidth": bandwidth_job}):
        return
    args = parse_args(argv)
    report = run_suite(args)
    paths = write(report, args.out)
    print(markdown(report, paths[2:]))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
