"""Issue 16: what does serving adapter mixtures cost? Generated tokens/s through the engine,
in-process, side by side in one run:

    (a) base      every row on the base model
    (c) distinct  every row on its own adapter (32 rows, 32 adapters)
    (m) mix2      row i mixes adapters i and i+1 (mod 32), weights 0.5 / 0.5: 32 rows, the
                  same 32 adapters, two per row

each under every variant (LoRA backend x ``--compile``; ``gather:off`` = the eager step, whose
mixed rows gather both members' blocks and run one bmm over the stacked ranks;
``gather:auto`` = the server default, the compiled static step whose LoRA rows run the native
CPU op, which streams each member's blocks in place), on the random hidden-512 Llama-style
checkpoint of ``bench.engine`` with rank-16 adapters on every linear layer but lm_head, batch
32, prompt 32 tokens, greedy, all requests submitted at once, one fresh process per
configuration, the median of ``--reps`` timed repetitions.

Floors, from the same run's (a) decode step and memory bandwidth:

- physical: (m) reads the same 32 adapters as (c), once each, and adds rank-16 FLOPs that are
  noise next to the base model's, so its floor equals (c)'s: a floor ratio (m)/(c) of 1.00;
- row-streaming: a kernel that reads each row's members for that row (ours: the native op and
  the gather path; also what SGMV/BGMV kernels do) reads every adapter twice per step:
  ``floor_step(m) = step(a) + 2 * adapter bytes / bandwidth`` against ``step(a) + adapter bytes
  / bandwidth`` for (c). Its tok/s ratio is what our design can reach.

    python -m bench.mixtures [--quick] [--variants gather:off,gather:auto] [--out DIR]

Writes ``mixtures-<device>.json`` and ``.md`` under ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import checkpoints as ck
from bench.engine import BATCH, RANK, RESULTS, VARIANTS
from bench.harness import report_stem, run_worker, write_report
from bench.machine import describe

SCENARIOS = ("base", "distinct", "mix2")


def row_adapters(scenario: str, batch: int = BATCH) -> list[str]:
    if scenario == "base":
        return [""] * batch
    if scenario == "distinct":
        return [ck.adapter_name(i) for i in range(batch)]
    return [
        f"{ck.adapter_name(i)}:0.5+{ck.adapter_name((i + 1) % batch)}:0.5" for i in range(batch)
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mixtures", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 reps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", default=None, help="checkpoints and adapters")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--size", type=int, default=512, help="hidden size (512 or 2048)")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.variants = args.variants.split(",")
    args.new_tokens = 16 if args.quick else 32
    args.reps = args.reps or (2 if args.quick else 3)
    args.cache_dir = Path(args.cache_dir) if args.cache_dir else ck.default_cache_dir()
    return args


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    machine = describe(args.device, args.dtype)
    bandwidth = {"kind": "bandwidth", "device": args.device}
    bw = [run_worker("bench.engine", bandwidth)["gb_s"]]
    spec = ck.SPECS[args.size]
    model = ck.checkpoint(spec, args.cache_dir)
    adapters_dir = ck.adapter_folder(model, RANK, BATCH, args.cache_dir)
    runs = []
    for variant in args.variants:
        backend, compile_ = variant.split(":")
        for scenario in SCENARIOS:
            job = {
                "kind": "engine",
                "model": str(model),
                "adapters_dir": str(adapters_dir),
                "adapters": row_adapters(scenario),
                "backend": backend,
                "compile": compile_,
                "device": args.device,
                "dtype": args.dtype,
                "rank": RANK,
                "batch": BATCH,
                "prompt_len": 32,
                "new_tokens": args.new_tokens,
                "reps": args.reps,
                "vocab": spec.vocab,
                "quiet_wait": 5.0 if args.quick else 20.0,
            }
            result = run_worker("bench.engine", job)
            result.update(scenario=scenario, variant=variant)
            runs.append(result)
            print(
                f"{scenario:9s} {variant:12s} {result['tok_s']:8.1f} tok/s  decode step "
                f"{result['decode_step_ms']:.2f} ms  reps {result['tok_s_reps']}",
                flush=True,
            )
    bw.append(run_worker("bench.engine", bandwidth)["gb_s"])
    report = {
        "suite": "mixtures",
        "machine": machine,
        "settings": {
            "hidden": args.size,
            "batch": BATCH,
            "rank": RANK,
            "adapters": BATCH,
            "mixture": "row i: adapters i and i+1 (mod 32), weights 0.5 / 0.5",
            "prompt_len": 32,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "greedy": True,
            "quick": args.quick,
            "variants": args.variants,
        },
        "memory_bandwidth_gb_s": {"before": bw[0], "after": bw[1], "used": max(bw)},
        "runs": runs,
    }
    report["summary"] = summarize(report, args)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def summarize(report: dict, args) -> dict:
    bw = report["memory_bandwidth_gb_s"]["used"]
    element = 2 if args.dtype in ("bfloat16", "float16") else 4
    shapes = ck.adapted_shapes(ck.checkpoint(ck.SPECS[args.size], args.cache_dir))
    one_adapter = ck.adapter_bytes(shapes, RANK, element)
    steps, tokens = args.new_tokens - 1, BATCH * args.new_tokens
    runs = {(r["scenario"], r["variant"]): r for r in report["runs"]}
    out = {"adapter_mib": one_adapter / 2**20, "variants": {}}
    for variant in args.variants:
        base, distinct, mix = (runs[(s, variant)] for s in SCENARIOS)

        def floor_tok_s(reads: int, base=base) -> tuple[float, float]:
            """(floor step ms, floor tok/s) when a step reads ``reads`` adapters' bytes."""
            step = base["decode_step_ms"] + 1000 * reads * one_adapter / (bw * 1e9)
            return step, tokens / ((base["prefill_ms_per_rep"] + steps * step) / 1000)

        distinct_step, distinct_floor = floor_tok_s(BATCH)
        mix_step, mix_floor = floor_tok_s(2 * BATCH)
        out["variants"][variant] = {
            "base tok/s": base["tok_s"],
            "distinct tok/s": distinct["tok_s"],
            "mix2 tok/s": mix["tok_s"],
            "mix2/distinct": mix["tok_s"] / distinct["tok_s"],
            "mix2/distinct decode step": distinct["decode_step_ms"] / mix["decode_step_ms"],
            "physical floor ratio": 1.0,
            "row-streaming floor ratio": mix_floor / distinct_floor,
            "mix2 step ms": mix["decode_step_ms"],
            "mix2 row-streaming floor step ms": mix_step,
            "mix2 step / row-streaming floor step": mix["decode_step_ms"] / mix_step,
            "distinct step / floor step": distinct["decode_step_ms"] / distinct_step,
        }
    return out


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Adapter mixtures: {m.get('gpu') or m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"{m['dtype']}, torch {m['torch']}, commit {m.get('git_commit') or '-'}",
        "",
        f"hidden {s['hidden']}, batch {s['batch']}, rank {s['rank']}, {s['mixture']}; "
        f"{s['new_tokens']} new tokens, median of {s['reps']} reps; memory bandwidth "
        f"{report['memory_bandwidth_gb_s']['used']:.1f} GB/s; "
        f"one adapter {report['summary']['adapter_mib']:.2f} MiB",
        "",
        "| variant | base tok/s | distinct tok/s | mix2 tok/s | mix2/distinct | floor ratio "
        "(physical / row-streaming) | mix2 step / row-streaming floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, v in report["summary"]["variants"].items():
        lines.append(
            f"| {variant} | {v['base tok/s']:.0f} | {v['distinct tok/s']:.0f} | "
            f"{v['mix2 tok/s']:.0f} | {v['mix2/distinct']:.3f} | "
            f"{v['physical floor ratio']:.2f} / {v['row-streaming floor ratio']:.3f} | "
            f"{v['mix2 step / row-streaming floor step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = run_suite(args)
    paths = write_report(args.out, report_stem("mixtures", report), report, markdown(report))
    print(markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
