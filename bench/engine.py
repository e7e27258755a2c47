"""Issues 3 and 13: what does serving many adapters at once cost, and what does the static,
compiled decode step buy? Generated tokens/s through the engine, in-process, side by side in one
run:

    (a) base     every row on the base model
    (b) one      every row on the same adapter
    (c) distinct every row on a different adapter (32 adapters)
    (c') (c) with the server's default --max-lora-rank 64: slots are padded to 64, and a step
         must compute with the ranks in use only
    (c'') (c) with bfloat16 slot tables (``--lora-dtype bfloat16``) on a float32 server: half
         the adapter bytes per step (CPU float32 only)

each under every *variant* (LoRA backend x ``--compile``; default ``gather:off`` = the eager
step and ``gather:auto`` = the static step, compiled with inductor and packed weights on
CPU, CUDA graphs on GPU), on random Llama-style checkpoints at hidden 512 (6 layers, ~27M
parameters) and hidden 2048 (4 layers), rank-16 adapters on every linear layer but lm_head,
batch 32, prompt 32 tokens, greedy, all requests submitted at once. Every configuration runs
in a fresh process (``bench.harness.run_worker``); each reports the median of ``--reps`` timed
repetitions after a warm-up (a compiled server has compiled every bucket before it starts).

Two physical floors, both measured in the same run:

- the compute floor of (a)'s decode step: every Linear of the model (lm_head included) as one
  GEMM of 32 rows, timed alone at its shape with the best GEMM this machine has there (the
  BLAS, oneDNN, or the server's own, ``bench.machine.gemm_floor``); attention and norms come
  on top, so a step can only approach it;
- the floor of (c): a decode step must read every distinct adapter's A and B once,
  ``n * r * (d_in + d_out)`` values per adapted layer, on top of what (a)'s step does. So
  ``floor_step(c) = step(a) + adapter bytes / memory bandwidth`` (same variant), the bandwidth
  measured in the same run (``bench.machine.memory_bandwidth``, the faster of before and after).

    python -m bench.engine [--quick] [--device cuda --dtype bfloat16] [--out DIR]

Writes ``engine-<device>.json`` and ``engine-<device>.md`` under ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import checkpoints as ck
from bench.harness import (
    Workload,
    report_stem,
    run_engine,
    run_worker,
    server_config,
    worker_main,
    write_report,
)
from bench.machine import describe, gemm_floor, memory_bandwidth, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("gather:off", "gather:auto")  # backend:compile; the last one is the server default
SCENARIOS = ("base", "one", "distinct", "distinct-r64", "distinct-bf16")
LABELS = {
    "base": "(a)",
    "one": "(b)",
    "distinct": "(c)",
    "distinct-r64": "(c')",
    "distinct-bf16": "(c'')",
}
PADDED_RANK = 64  # the server's default --max-lora-rank
RANK = 16
BATCH = 32
# (size, metric, target, higher is better): issue 13's targets for this machine, for the
# default variant (the last one)
TARGETS = [
    (512, "distinct/base", 0.80, True),
    (512, "distinct step / floor step", 1.10, False),
    (512, "base step / compute floor", 1.25, False),
    (2048, "distinct/base", 0.88, True),
    (2048, "one/base", 0.97, True),
    # the same bar for (c'') (bfloat16 tables: an option, not the default)
    (512, "distinct-bf16/base", 0.80, True),
    (2048, "distinct-bf16/base", 0.88, True),
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
        compile=job.get("compile", "auto"),
        lora_dtype=job.get("lora_dtype", "auto"),
    )
    result = run_engine(config, work, job["vocab"], thread=job.get("thread", "caller"))
    result.pop("outputs")
    return result


def bandwidth_job(job: dict) -> dict:
    busy = wait_until_quiet()
    return {"gb_s": memory_bandwidth(job["device"]), "cpu_busy_before": busy}


def gemm_job(job: dict) -> dict:
    """The compute floor of a decode step of ``job["model"]``: its Linear shapes, timed."""
    import torch
    from loraserve.adapters.lora import linear_shapes
    from loraserve.adapters.models import build_model, read_config
    from loraserve.server.resources import available_cpus

    torch.set_num_threads(available_cpus())  # the server's threads

    model = build_model(read_config(Path(job["model"])), device="meta")
    shapes: dict[tuple[int, int], int] = {}
    for shape in linear_shapes(model).values():
        shapes[shape] = shapes.get(shape, 0) + 1
    busy = wait_until_quiet()
    return {**gemm_floor(shapes, job["batch"], job["device"], job["dtype"]), "cpu_busy": busy}


# --------------------------------------------------------------------------------------------
# the suite


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="hidden 512 only, 16 new tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None, help="checkpoints and adapters")
    p.add_argument("--sizes", default=None, help="hidden sizes, e.g. 512,2048")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="backend:compile pairs, the default variant last (default %(default)s)",
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
    args.variants = args.variants.split(",")
    args.new_tokens = args.new_tokens or (16 if args.quick else 32)
    args.cache_dir = args.cache_dir or ck.default_cache_dir()
    return args


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    machine = describe(args.device, args.dtype)
    bw = [run_worker("bench.engine", {"kind": "bandwidth", "device": args.device})["gb_s"]]
    print(f"memory bandwidth {bw[0]:.1f} GB/s (copy, read + written)", flush=True)
    runs, gemm = [], {}
    for size in args.sizes:
        spec = ck.SPECS[size]
        model = ck.checkpoint(spec, args.cache_dir)
        adapters_dir = ck.adapter_folder(model, RANK, BATCH, args.cache_dir)
        job = {"model": str(model), "batch": BATCH, "device": args.device, "dtype": args.dtype}
        gemm[str(size)] = run_worker("bench.engine", {"kind": "gemm", **job})
        print(
            f"hidden {size:5d} compute floor of a decode step {gemm[str(size)]['floor_ms']:.2f} ms"
            f" ({gemm[str(size)]['gflops_at_floor']:.0f} GFLOPS; BLAS alone "
            f"{gemm[str(size)]['blas_ms']:.2f} ms)",
            flush=True,
        )
        for scenario, variant in configurations(args.variants, args.dtype):
            backend, compile_ = variant.split(":")
            job = {
                "kind": "engine",
                "model": str(model),
                "adapters_dir": str(adapters_dir),
                "adapters": list(row_adapters(scenario, BATCH)),
                "backend": backend,
                "compile": compile_,
                "device": args.device,
                "dtype": args.dtype,
                "rank": RANK,
                "max_rank": PADDED_RANK if scenario == "distinct-r64" else RANK,
                "lora_dtype": "bfloat16" if scenario == "distinct-bf16" else "auto",
                "batch": BATCH,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "reps": args.reps,
                "vocab": spec.vocab,
                "quiet_wait": 5.0 if args.quick else 20.0,
                "thread": args.runtime_thread,
            }
            result = run_worker("bench.engine", job)
            result.update(hidden=size, scenario=scenario, variant=variant)
            runs.append(result)
            print(
                f"hidden {size:5d} {scenario:12s} {variant:12s} {result['tok_s']:9.1f} tok/s  "
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
            "variants": args.variants,
            "models": {
                s: {**asdict(ck.SPECS[s]), "params": ck.parameter_count(_ckpt(args, s))}
                for s in args.sizes
            },
        },
        "memory_bandwidth_gb_s": {"before": bw[0], "after": bw[1], "used": max(bw)},
        "compute_floor": gemm,
        "runs": runs,
    }
    report["summary"] = summarize(report, args)
    report["targets"] = check_targets(report["summary"], args.variants[-1])
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ckpt(args, size: int) -> Path:
    return ck.checkpoint(ck.SPECS[size], args.cache_dir)


def configurations(variants: list[str], dtype: str) -> list[tuple[str, str]]:
    """(a), (b), (c) per variant, then (c') with the default variant (the last one), and
    (c'') where the weights are float32."""
    runs = [(s, v) for v in variants for s in ("base", "one", "distinct")]
    runs.append(("distinct-r64", variants[-1]))
    if dtype == "float32":
        runs.append(("distinct-bf16", variants[-1]))
    return runs


def summarize(report: dict, args) -> dict:
    """Per size and variant: ratios to that variant's (a), the floors, and the ratio of each
    scenario to the first variant (the eager step, by default)."""
    bw = report["memory_bandwidth_gb_s"]["used"]
    element = 2 if args.dtype in ("bfloat16", "float16") else 4
    out = {}
    for size in args.sizes:
        runs = {(r["scenario"], r["variant"]): r for r in report["runs"] if r["hidden"] == size}
        shapes = ck.adapted_shapes(_ckpt(args, size))
        one_adapter = ck.adapter_bytes(shapes, RANK, element)
        compute_floor = report["compute_floor"][str(size)]["floor_ms"]
        steps = args.new_tokens - 1  # the first token of each request comes from prefill
        tokens = BATCH * args.new_tokens
        size_out = {
            "adapter_mib": one_adapter / 2**20,
            "distinct_bytes_per_step_mib": BATCH * one_adapter / 2**20,
            "compute_floor_ms": compute_floor,
            "variants": {},
        }
        first = args.variants[0]
        for variant in args.variants:
            base, one = runs[("base", variant)], runs[("one", variant)]
            distinct = runs[("distinct", variant)]
            floor_step = base["decode_step_ms"] + 1000 * BATCH * one_adapter / (bw * 1e9)
            floor_tok_s = tokens / ((base["prefill_ms_per_rep"] + steps * floor_step) / 1000)
            v = {
                "base tok/s": base["tok_s"],
                "base step ms": base["decode_step_ms"],
                "base step / compute floor": base["decode_step_ms"] / compute_floor,
                "one/base": one["tok_s"] / base["tok_s"],
                "distinct/base": distinct["tok_s"] / base["tok_s"],
                "one/base decode step": base["decode_step_ms"] / one["decode_step_ms"],
                "distinct/base decode step": base["decode_step_ms"] / distinct["decode_step_ms"],
                "distinct floor step ms": floor_step,
                "distinct floor tok/s": floor_tok_s,
                "distinct floor ratio": floor_tok_s / base["tok_s"],
                "distinct step over floor ms": distinct["decode_step_ms"] - floor_step,
                "distinct step / floor step": distinct["decode_step_ms"] / floor_step,
                "distinct tok/s / floor tok/s": distinct["tok_s"] / floor_tok_s,
                "tok/s vs first variant": {
                    sc: runs[(sc, variant)]["tok_s"] / runs[(sc, first)]["tok_s"]
                    for sc in ("base", "one", "distinct")
                },
            }
            padded = runs.get(("distinct-r64", variant))
            if padded:
                v["distinct-r64/base"] = padded["tok_s"] / base["tok_s"]
                v["distinct-r64 decode step ms"] = padded["decode_step_ms"]
            narrow = runs.get(("distinct-bf16", variant))
            if narrow:
                v["distinct-bf16/base"] = narrow["tok_s"] / base["tok_s"]
                v["distinct-bf16 decode step ms"] = narrow["decode_step_ms"]
                half = 1000 * BATCH * one_adapter / 2 / (bw * 1e9)  # bfloat16: half the bytes
                v["distinct-bf16 floor step ms"] = base["decode_step_ms"] + half
            size_out["variants"][variant] = v
        out[str(size)] = size_out
    return out


def check_targets(summary: dict, variant: str) -> list[dict]:
    rows = []
    for size, metric, target, higher in TARGETS:
        value = summary.get(str(size), {}).get("variants", {}).get(variant, {}).get(metric)
        if value is None:  # a size or scenario this run left out
            continue
        rows.append(
            {
                "hidden": size,
                "metric": metric,
                "variant": variant,
                "target": f"{'>=' if higher else '<='} {target}",
                "measured": round(value, 3),
                "met": value >= target if higher else value <= target,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# output


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    bw = report["memory_bandwidth_gb_s"]
    lines = [
        f"# Engine throughput: base vs one adapter vs {s['adapters']} distinct adapters, eager"
        " vs compiled decode step",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f", dtype {m['dtype']}; commit {m.get('git_commit')}. Memory bandwidth (copy, read +"
        f" written): {bw['before']:.1f} GB/s before, {bw['after']:.1f} GB/s after; floors use "
        f"{bw['used']:.1f}.",
        "",
        f"Workload: batch {s['batch']}, prompt {s['prompt_len']} tokens, {s['new_tokens']} new "
        f"tokens per request (greedy), all submitted at once; rank {s['rank']} on "
        f"{s['targets']}. Median of {s['reps']} repetitions after warm-up, one process per "
        f"row. Variants are LoRA backend:`--compile` (off = the eager step; auto = the static "
        "step, compiled). tok/s = generated tokens / wall time (prefill included); decode step "
        "= median engine step with the full batch (forward + sampling).",
        "",
    ]
    for size, summ in report["summary"].items():
        spec = s["models"][int(size)]
        floor = report["compute_floor"][size]
        lines += [
            f"## hidden {size} ({spec['layers']} layers, {spec['params'] / 1e6:.0f}M params)",
            "",
            f"Compute floor of a decode step (every Linear as one GEMM of {s['batch']} rows at "
            f"the best rate this machine has at its shape): {floor['floor_ms']:.2f} ms "
            f"({floor['gflop']:.2f} GFLOP at {floor['gflops_at_floor']:.0f} GFLOPS; through the "
            f"BLAS alone {floor['blas_ms']:.2f} ms).",
            "",
            "| config | variant | tok/s | / base | vs eager | decode step ms | / base (step) |"
            " prefill ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["runs"]:
            if str(r["hidden"]) != size:
                continue
            v = summ["variants"][r["variant"]]
            vs = v["tok/s vs first variant"].get(r["scenario"])
            lines.append(
                f"| {LABELS[r['scenario']]} {r['scenario']} | {r['variant']} | "
                f"{r['tok_s']:.1f} | {r['tok_s'] / v['base tok/s']:.3f} | "
                f"{'-' if vs is None else f'{vs:.2f}x'} | {r['decode_step_ms']:.2f} | "
                f"{v['base step ms'] / r['decode_step_ms']:.3f} | "
                f"{r['prefill_ms_per_rep']:.1f} |"
            )
        lines += [
            "",
            f"Floor of (c): each decode step reads {summ['distinct_bytes_per_step_mib']:.1f} MiB "
            f"of adapters ({s['adapters']} x {summ['adapter_mib']:.2f} MiB) on top of (a)'s "
            "step.",
            "",
        ]
        for variant, v in summ["variants"].items():
            lines.append(
                f"- {variant}: (a)'s step is {v['base step / compute floor']:.2f}x the compute "
                f"floor; (c)'s floor step {v['distinct floor step ms']:.2f} ms "
                f"({v['distinct floor ratio']:.3f} of base); (c)'s step is "
                f"{v['distinct step over floor ms']:+.2f} ms "
                f"({v['distinct step / floor step']:.2f}x) from it; (c) throughput is "
                f"{v['distinct tok/s / floor tok/s']:.2f} of the floor throughput."
                + (
                    f" (c') slots padded to rank {PADDED_RANK} (the server's default "
                    f"`--max-lora-rank`): {v['distinct-r64/base']:.3f} of base, decode step "
                    f"{v['distinct-r64 decode step ms']:.2f} ms."
                    if "distinct-r64/base" in v
                    else ""
                )
                + (
                    f" (c'') bfloat16 slot tables: {v['distinct-bf16/base']:.3f} of base, decode "
                    f"step {v['distinct-bf16 decode step ms']:.2f} ms against its floor of "
                    f"{v['distinct-bf16 floor step ms']:.2f} ms (half (c)'s bytes)."
                    if "distinct-bf16/base" in v
                    else ""
                )
            )
        lines.append("")
    lines += ["## Targets (issue 13)", ""]
    lines.append("| hidden | metric | variant | target | measured | met |")
    lines.append("|---:|---|---|---:|---:|---|")
    for t in report["targets"]:
        lines.append(
            f"| {t['hidden']} | {t['metric']} | {t['variant']} | {t['target']} | "
            f"{t['measured']:.3f} | {'yes' if t['met'] else 'NO'} |"
        )
    lines += ["", f"Suite wall time {report['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    return write_report(out, report_stem("engine", report), report, markdown(report))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, {"engine": engine_job, "bandwidth": bandwidth_job, "gemm": gemm_job}):
        return
    args = parse_args(argv)
    report = run_suite(args)
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
