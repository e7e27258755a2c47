"""Issue 3: what does serving many adapters at once cost? Generated tokens/s through the engine,
in-process, side by side in one run:

    (a) base     every row on the base model
    (b) one      every row on the same adapter
    (c) distinct every row on a different adapter (32 adapters)
    (c') (c) with the server's default --max-lora-rank 64: slots are padded to 64, and a step
         must compute with the ranks in use only (default backend only)

on random Llama-style checkpoints at hidden 512 (6 layers, ~27M parameters) and hidden 2048
(4 layers), rank-16 adapters on every linear layer but lm_head, batch 32, prompt 32 tokens,
greedy, all requests submitted at once; (b) and (c) once per LoRA backend ("segment",
"gather"). Every configuration runs in a fresh process (``bench.harness.run_worker``); each
reports the median of ``--reps`` timed repetitions after a warm-up.

The physical floor of (c): a decode step must read every distinct adapter's A and B once,
``n * r * (d_in + d_out)`` values per adapted layer, on top of what (a)'s step reads. So
``floor_step(c) = step(a) + adapter bytes / memory bandwidth``, the bandwidth measured in the
same run (``bench.machine.memory_bandwidth``, the faster of a measurement before and after).

    python -m bench.engine [--quick] [--device cuda --dtype bfloat16] [--out DIR]

Writes ``engine-<device>.json`` and ``engine-<device>.md`` under ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import checkpoints as ck
from bench.harness import Workload, run_engine, run_worker, server_config, worker_main
from bench.machine import describe, memory_bandwidth, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("segment", "gather")
SCENARIOS = ("base", "one", "distinct", "distinct-r64")
LABELS = {"base": "(a)", "one": "(b)", "distinct": "(c)", "distinct-r64": "(c')"}
PADDED_RANK = 64  # the server's default --max-lora-rank
RANK = 16
BATCH = 32
# (size, metric, target): the targets for this machine
TARGETS = [
    (2048, "distinct/base", 0.75),
    (2048, "one/base", 0.95),
    (512, "distinct/base", 0.65),
]


def row_adapters(scenario: str, batch: int) -> tuple[str, ...]:
    if scenario == "base":
        return ("",) * batch
    if scenario == "one":
        return (ck.adapter_name(0),) * batch
    # "distinct" and "distinct-r64"
    return tuple(ck.adapter_name(i) for i in range(batch))


# --------------------------------------------------------------------------------------------
# workers (one process each)


def engine_job(job: dict) -> dict:
    work = Workload(
        adapters=tuple(job["adapters"]),
        batch=job["batch"],
        prompt_len=job["prompt_len"],
        new_tokens=job["new_tokens"],
        reps=job["reps"],
        quiet_wait=job["quiet_wait"],
    )
    config = server_config(
        Path(job["model"]),
        Path(job["adapters_dir"]),
        backend=job["backend"],
        device=job["device"],
        dtype=job["dtype"],
        rank=job.get("max_rank", job["rank"]),
        slots=len(work.distinct),
        batch=job["batch"],
        max_seq_len=job["prompt_len"] + job["new_tokens"],
        requests=len(work.adapters),
    )
    result = run_engine(config, work, job["vocab"], thread=job.get("thread", "caller"))
    result.pop("outputs")
    return result


def bandwidth_job(job: dict) -> dict:
    busy = wait_until_quiet()
    return {"gb_s": memory_bandwidth(job["device"]), "cpu_busy_before": busy}


# --------------------------------------------------------------------------------------------
# the suite


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="hidden 512, the gather backend, 16 new tokens"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None, help="checkpoints and adapters")
    p.add_argument("--sizes", default=None, help="hidden sizes, e.g. 512,2048")
    p.add_argument(
        "--backends", default=None, help=f"default {','.join(BACKENDS)} (--quick: gather)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (16 with --quick)")
    p.add_argument(
        "--runtime-thread",
        choices=("caller", "ephemeral"),
        default="caller",
        help="build the Runtime on the measuring thread (as users do) or on a thread that exits "
        "before timing (see bench/README.md, 'OpenMP pools')",
    )
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    default_sizes = "512" if args.quick else "512,2048"
    args.sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    args.backends = (args.backends or ("gather" if args.quick else ",".join(BACKENDS))).split(",")
    args.new_tokens = args.new_tokens or (16 if args.quick else 32)
    args.cache_dir = args.cache_dir or ck.default_cache_dir()
    return args


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    machine = describe(args.device, args.dtype)
    bw = [run_worker("bench.engine", {"kind": "bandwidth", "device": args.device})["gb_s"]]
    print(f"memory bandwidth {bw[0]:.1f} GB/s (copy, read + written)", flush=True)
    runs = []
    for size in args.sizes:
        spec = ck.SPECS[size]
        model = ck.checkpoint(spec, args.cache_dir)
        adapters_dir = ck.adapter_folder(model, RANK, BATCH, args.cache_dir)
        for scenario, backend in configurations(args.backends):
            job = {
                "kind": "engine",
                "model": str(model),
                "adapters_dir": str(adapters_dir),
                "adapters": list(row_adapters(scenario, BATCH)),
                "backend": backend,
                "device": args.device,
                "dtype": args.dtype,
                "rank": RANK,
                "max_rank": PADDED_RANK if scenario == "distinct-r64" else RANK,
                "batch": BATCH,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "reps": args.reps,
                "vocab": spec.vocab,
                "quiet_wait": 5.0 if args.quick else 20.0,
                "thread": args.runtime_thread,
            }
            result = run_worker("bench.engine", job)
            result.update(hidden=size, scenario=scenario, backend=backend)
            runs.append(result)
            print(
                f"hidden {size:5d} {scenario:9s} {backend:8s} {result['tok_s']:9.1f} tok/s  "
                f"decode step {_num(result['decode_step_ms'], 2)} ms  "
                f"prefill {_num(result['prefill_ms_per_rep'], 1)} ms  "
                f"reps {result['tok_s_reps']}",
                flush=True,
            )
    bw.append(run_worker("bench.engine", {"kind": "bandwidth", "device": args.device})["gb_s"])
    report = {
        "suite": "engine",
        "machine": machine,
        "settings": {
            "batch": BATCH,
            "rank": RANK,
            "adapters": BATCH,
            "targets": "all linear layers but lm_head",
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "greedy": True,
            "runtime_thread": args.runtime_thread,
            "quick": args.quick,
            "models": {
                s: {**asdict(ck.SPECS[s]), "params": ck.parameter_count(_ckpt(args, s))}
                for s in args.sizes
            },
        },
        "memory_bandwidth_gb_s": {"before": bw[0], "after": bw[1], "used": max(bw)},
        "runs": runs,
    }
    report["summary"] = summarize(report, args)
    report["targets"] = check_targets(report["summary"])
    report["default_backend"] = pick_backend(report["summary"], args.backends)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ckpt(args, size: int) -> Path:
    return ck.checkpoint(ck.SPECS[size], args.cache_dir)


def configurations(backends: list[str]) -> list[tuple[str, str]]:
    """(a) once (no LoRA work at all, so no backend), then (b) and (c) per backend, then (c')
    with the default backend (the last one listed)."""
    runs = [("base", "segment")] + [(s, b) for b in backends for s in ("one", "distinct")]
    return runs + [("distinct-r64", backends[-1])]


def summarize(report: dict, args) -> dict:
    """Per size: ratios to (a), decode-step ratios, and (c)'s floor per backend."""
    bw = report["memory_bandwidth_gb_s"]["used"]
    element = 2 if args.dtype in ("bfloat16", "float16") else 4
    out = {}
    for size in args.sizes:
        runs = {(r["scenario"], r["backend"]): r for r in report["runs"] if r["hidden"] == size}
        base = runs[("base", "segment")]
        shapes = ck.adapted_shapes(_ckpt(args, size))
        one_adapter = ck.adapter_bytes(shapes, RANK, element)
        floor_step = base["decode_step_ms"] + 1000 * BATCH * one_adapter / (bw * 1e9)
        steps = args.new_tokens - 1  # the first token of each request comes from prefill
        tokens = BATCH * args.new_tokens
        floor_tok_s = tokens / ((base["prefill_ms_per_rep"] + steps * floor_step) / 1000)
        size_out = {
            "base_tok_s": base["tok_s"],
            "base_decode_step_ms": base["decode_step_ms"],
            "adapter_mib": one_adapter / 2**20,
            "distinct_bytes_per_step_mib": BATCH * one_adapter / 2**20,
            "distinct_floor_step_ms": floor_step,
            "distinct_floor_tok_s": floor_tok_s,
            "distinct_floor_ratio": floor_tok_s / base["tok_s"],
            "backends": {},
        }
        for backend in args.backends:
            one, distinct = runs[("one", backend)], runs[("distinct", backend)]
            size_out["backends"][backend] = {
                "one/base": one["tok_s"] / base["tok_s"],
                "distinct/base": distinct["tok_s"] / base["tok_s"],
                "one/base decode step": base["decode_step_ms"] / one["decode_step_ms"],
                "distinct/base decode step": base["decode_step_ms"] / distinct["decode_step_ms"],
                "distinct step over floor ms": distinct["decode_step_ms"] - floor_step,
                "distinct step / floor step": distinct["decode_step_ms"] / floor_step,
                "distinct tok/s / floor tok/s": distinct["tok_s"] / floor_tok_s,
            }
        padded = [r for (sc, _), r in runs.items() if sc == "distinct-r64"]
        if padded:
            size_out["distinct-r64/base"] = padded[0]["tok_s"] / base["tok_s"]
            size_out["distinct-r64 decode step ms"] = padded[0]["decode_step_ms"]
        out[str(size)] = size_out
    return out


def check_targets(summary: dict) -> list[dict]:
    rows = []
    for size, metric, target in TARGETS:
        if str(size) not in summary:
            continue
        for backend, ratios in summary[str(size)]["backends"].items():
            value = ratios[metric]
            rows.append(
                {
                    "hidden": size,
                    "metric": f"({'c' if metric.startswith('distinct') else 'b'})/(a) tok/s",
                    "backend": backend,
                    "target": target,
                    "measured": round(value, 3),
                    "met": value >= target,
                }
            )
    return rows


def pick_backend(summary: dict, backends: list[str]) -> dict:
    """The default: the best geometric mean of (b)/(a) and (c)/(a) over all sizes measured."""
    scores = {}
    for backend in backends:
        ratios = [
            summary[size]["backends"][backend][m]
            for size in summary
            for m in ("one/base", "distinct/base")
        ]
        scores[backend] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    best = max(scores, key=scores.get)
    return {"backend": best, "geomean_ratio": scores}


# --------------------------------------------------------------------------------------------
# output


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    bw = report["memory_bandwidth_gb_s"]
    lines = [
        f"# Engine throughput: base vs one adapter vs {s['adapters']} distinct adapters",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f", dtype {m['dtype']}. Memory bandwidth (copy, read + written): "
        f"{bw['before']:.1f} GB/s before, {bw['after']:.1f} GB/s after; floors use "
        f"{bw['used']:.1f}.",
        "",
        f"Workload: batch {s['batch']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new "
        f"tokens per request (greedy), all submitted at once; rank {s['rank']} on "
        f"{s['targets']}. Median of {s['reps']} repetitions after warm-up, one process per "
        f"row. Runtime built on the {s['runtime_thread']} thread. tok/s = generated tokens / "
        "wall time (prefill included); decode step = median engine step with the full batch.",
        "",
    ]
    for size, summ in report["summary"].items():
        spec = s["models"][int(size)]
        lines += [
            f"## hidden {size} ({spec['layers']} layers, {spec['params'] / 1e6:.0f}M params)",
            "",
            "| config | backend | tok/s | / base | decode step ms | / base (step) | prefill ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in report["runs"]:
            if str(r["hidden"]) != size:
                continue
            backend = "-" if r["scenario"] == "base" else r["backend"]
            lines.append(
                f"| {LABELS[r['scenario']]} {r['scenario']} | {backend} | "
                f"{r['tok_s']:.1f} | {r['tok_s'] / summ['base_tok_s']:.3f} | "
                f"{r['decode_step_ms']:.2f} | "
                f"{summ['base_decode_step_ms'] / r['decode_step_ms']:.3f} | "
                f"{r['prefill_ms_per_rep']:.1f} |"
            )
        lines += [
            "",
            f"Floor of (c): each decode step reads {summ['distinct_bytes_per_step_mib']:.1f} MiB "
            f"of adapters ({s['adapters']} x {summ['adapter_mib']:.2f} MiB) on top of (a)'s step:"
            f" {summ['distinct_floor_step_ms']:.2f} ms per step, "
            f"{summ['distinct_floor_tok_s']:.1f} tok/s ({summ['distinct_floor_ratio']:.3f} of "
            "base).",
            "",
        ]
        for backend, b in summ["backends"].items():
            lines.append(
                f"- {backend}: (c) decode step is {b['distinct step over floor ms']:+.2f} ms "
                f"({b['distinct step / floor step']:.2f}x) from its floor; (c) throughput is "
                f"{b['distinct tok/s / floor tok/s']:.2f} of the floor throughput."
            )
        if "distinct-r64/base" in summ:
            lines.append(
                f"- (c') the same adapters in slots padded to rank {PADDED_RANK} (the server's "
                f"default `--max-lora-rank`): {summ['distinct-r64/base']:.3f} of base, decode "
                f"step {summ['distinct-r64 decode step ms']:.2f} ms."
            )
        lines.append("")
    lines += ["## Targets", "", "| hidden | metric | backend | target | measured | met |"]
    lines.append("|---:|---|---|---:|---:|---|")
    for t in report["targets"]:
        lines.append(
            f"| {t['hidden']} | {t['metric']} | {t['backend']} | >= {t['target']} | "
            f"{t['measured']:.3f} | {'yes' if t['met'] else 'NO'} |"
        )
    d = report["default_backend"]
    scores = ", ".join(f"{b} {v:.3f}" for b, v in d["geomean_ratio"].items())
    lines += [
        "",
        f"Default backend by geometric mean of (b)/(a) and (c)/(a) over sizes: "
        f"**{d['backend']}** ({scores}).",
        "",
        f"Suite wall time {report['elapsed_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    device = report["machine"]["device"].split(":")[0]
    stem = f"engine-{device}" + ("-quick" if report["settings"]["quick"] else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, {"engine": engine_job, "bandwidth": bandwidth_job}):
        return
    args = parse_args(argv)
    report = run_suite(args)
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
