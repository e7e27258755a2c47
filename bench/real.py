"""Issue 13, a real model's shapes: loraserve over gRPC against transformers and PEFT.

A checkpoint with SmolLM2-135M-Instruct's shapes (``bench.checkpoints.SMOLLM2_SHAPED``: 30
layers, hidden 576, GQA 9/3, vocab 49152, tied embeddings; random weights, the same files for
every method), batch 32, 36-token prompts, 32 new tokens, greedy, prefill included:

- ``hf-base``: transformers' ``generate`` on the base model, the 32 prompts as one batch;
- ``peft-mixed``: PEFT's mixed-adapter batch, ``generate(..., adapter_names=[...])`` with 32
  distinct rank-16 adapters (every linear layer but lm_head);
- ``grpc-base`` / ``grpc-distinct``: a real loraserve gRPC server on loopback (``--compile``
  as given, default auto) with 32 client threads, the base model / the same 32 adapters;
- ``grpc-distinct-bf16``: the same with bfloat16 slot tables (``--lora-dtype bfloat16``: half
  the adapter bytes per step; an option, not the default).

Ratios (the issue's targets): grpc-distinct / grpc-base >= 0.92, grpc-distinct / peft-mixed
>= 3.5, grpc-base / hf-base >= 1.3.

The methods run in rounds: each round runs every method once, in a fresh process, for
``--reps`` timed repetitions after its warm-up; a method's figure is the median over all its
rounds' repetitions. A shared 2-core VM drifts by 10-25% over minutes (hf-base read 210, 253
and 276 tok/s on one day), so methods timed one after the other, each over a few minutes,
gave ratios that moved with the machine; interleaved, each ratio compares methods that ran
under the same conditions.

    python -m bench.real [--compile auto|off] [--rounds N] [--reps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench import checkpoints as ck
from bench.harness import (
    StepLog,
    Workload,
    greedy_generate,
    prompts,
    report_stem,
    run_grpc,
    run_worker,
    server_config,
    timed_reps,
    worker_main,
    write_report,
)
from bench.machine import describe
from bench.peers import run_peft

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = ck.SMOLLM2_SHAPED
BATCH, PROMPT, NEW, RANK = 32, 36, 32, 16
METHODS = ("hf-base", "peft-mixed", "grpc-base", "grpc-distinct", "grpc-distinct-bf16")
TARGETS = [
    ("grpc-distinct", "grpc-base", 0.92),
    ("grpc-distinct-bf16", "grpc-base", 0.92),
    ("grpc-distinct", "peft-mixed", 3.5),
    ("grpc-base", "hf-base", 1.3),
]


def real_job(job: dict) -> dict:
    import torch
    from loraserve.server.resources import available_cpus

    torch.set_num_threads(available_cpus())  # transformers and PEFT get the server's threads
    method = job["method"]
    distinct = method in ("peft-mixed", "grpc-distinct", "grpc-distinct-bf16")
    adapters = tuple(ck.adapter_name(i) for i in range(BATCH)) if distinct else ("",) * BATCH
    work = Workload(
        adapters=adapters,
        batch=BATCH,
        prompt_len=PROMPT,
        new_tokens=NEW,
        reps=job["reps"],
        quiet_wait=20.0,
    )
    folder = Path(job["adapters_dir"])
    if method == "hf-base":
        return run_hf(job, work)
    if method == "peft-mixed":
        return run_peft(job, folder, work, BATCH, mixed=True)
    config = server_config(
        Path(job["model"]),
        folder,
        backend="gather",
        device=job["device"],
        dtype=job["dtype"],
        rank=RANK,
        slots=BATCH,
        batch=BATCH,
        max_seq_len=PROMPT + NEW,
        requests=BATCH,
        compile=job["compile"],
        lora_dtype="bfloat16" if method == "grpc-distinct-bf16" else "auto",
    )
    return run_grpc(config, work, SPEC.vocab, clients=BATCH)


def run_hf(job: dict, work: Workload) -> dict:
    """transformers' ``generate`` on the base model, the whole batch at once."""
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).to(device).eval()
    ps = torch.tensor(prompts(len(work.adapters), work.prompt_len, SPEC.vocab), device=device)

    return timed_reps(work, lambda new_tokens: greedy_generate(model, ps, new_tokens), StepLog())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", default="auto", help="loraserve's --compile (default auto)")
    p.add_argument("--rounds", type=int, default=3, help="every method once per round")
    p.add_argument("--reps", type=int, default=1, help="timed repetitions per method per round")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.cache_dir = args.cache_dir or ck.default_cache_dir()
    args.methods = args.methods.split(",")
    return args


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    machine = describe(args.device, args.dtype)
    model = ck.checkpoint(SPEC, args.cache_dir)
    adapters_dir = ck.adapter_folder(model, RANK, BATCH, args.cache_dir)
    rounds: dict[str, list[dict]] = {method: [] for method in args.methods}
    for n in range(args.rounds):
        for method in args.methods:
            job = {
                "kind": "real",
                "method": method,
                "model": str(model),
                "adapters_dir": str(adapters_dir),
                "device": args.device,
                "dtype": args.dtype,
                "compile": args.compile,
                "reps": args.reps,
                "vocab": SPEC.vocab,
            }
            result = run_worker("bench.real", job)
            result.pop("outputs", None)
            rounds[method].append(result)
            print(
                f"round {n + 1} {method:20s} {result['tok_s']:8.1f} tok/s  "
                f"reps {result['tok_s_reps']}",
                flush=True,
            )
    results = {method: combine(runs) for method, runs in rounds.items()}
    targets = []
    for num, den, target in TARGETS:
        if num in results and den in results:
            value = results[num]["tok_s"] / results[den]["tok_s"]
            targets.append(
                {
                    "metric": f"{num} / {den} tok/s",
                    "target": target,
                    "measured": round(value, 3),
                    "met": value >= target,
                }
            )
    return {
        "suite": "real",
        "machine": machine,
        "settings": {
            "model": {**SPEC.__dict__, "params": ck.parameter_count(model)},
            "batch": BATCH,
            "prompt_len": PROMPT,
            "new_tokens": NEW,
            "rank": RANK,
            "adapters": BATCH,
            "compile": args.compile,
            "rounds": args.rounds,
            "reps": args.reps,
            "greedy": True,
        },
        "results": results,
        "targets": targets,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def combine(runs: list[dict]) -> dict:
    """One method's rounds as one result: medians over every repetition (throughput) and
    over the rounds (engine step, prefill); each round as it came."""

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    reps = [tok_s for r in runs for tok_s in r["tok_s_reps"]]
    return {
        "tok_s": round(statistics.median(reps), 2),
        "tok_s_reps": reps,
        "decode_step_ms": median("decode_step_ms"),
        "prefill_ms_per_rep": median("prefill_ms_per_rep"),
        "rounds": runs,
    }


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# A real model's shapes: loraserve over gRPC vs transformers and PEFT",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m.get('transformers')}, peft "
        f"{m.get('peft')}, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f", dtype {m['dtype']}; commit {m.get('git_commit')}.",
        "",
        f"Model: {s['model']['name']} ({s['model']['layers']} layers, hidden "
        f"{s['model']['hidden']}, {s['model']['params'] / 1e6:.0f}M params, random weights). "
        f"Batch {s['batch']}, {s['prompt_len']}-token prompts, {s['new_tokens']} new tokens, "
        f"greedy, prefill included; {s['adapters']} distinct rank-{s['rank']} adapters; "
        f"loraserve `--compile {s['compile']}`. The methods ran in {s.get('rounds', 1)} "
        f"interleaved rounds of {s['reps']} timed repetition(s) each, every round a fresh "
        "process per method; the median over all of a method's repetitions.",
        "",
        "| method | tok/s | repetitions (round by round) | decode step ms | prefill ms |",
        "|---|---:|---|---:|---:|",
    ]
    for method, r in report["results"].items():
        step, prefill = r.get("decode_step_ms"), r.get("prefill_ms_per_rep")
        lines.append(
            f"| {method} | {r['tok_s']:.1f} | {r['tok_s_reps']} | "
            f"{'-' if step is None else f'{step:.1f}'} | "
            f"{'-' if prefill is None else f'{prefill:.0f}'} |"
        )
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['metric']} >= {t['target']} | {t['measured']:.3f} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    lines += ["", f"Suite wall time {report['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, {"real": real_job}):
        return
    args = parse_args(argv)
    report = run_suite(args)
    paths = write(report, args.out)
    print(markdown(report))
    print("wrote", *paths)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    return write_report(out, report_stem("real", report), report, markdown(report))


if __name__ == "__main__":
    main()
