"""Issue 17: what does structured output cost? SmolLM2-135M-Instruct (the real model and its
49,152-token vocabulary: the masks are only as costly as the real tokenizer makes them),
in-process, 32 chat prompts (held-out questions of ``adapters/smollm2``), greedy, 48 new
tokens, side by side in one run:

    free    32 unconstrained rows
    json    32 rows under one JSON schema (an object holding an array of exactly 8 short
            strings: long enough to keep every row busy for the whole budget)
    regex   32 rows under a regular expression (8 comma-separated lowercase words)

Reported: tokens/s (wall time, prefill included), the median decode step with all 32 rows
running and its tokens/s (``32 / step``: the clean ratio, since free rows end at their own EOS
while constrained ones do not), and the per-step mask work: llguidance filling 32 rows' masks
(on a helper thread, overlapped with the forward) and adding them to the logits (on the engine
thread, after it). Target (issue 17): constrained / free decode throughput >= 0.85.
``bench/grammar.py`` compares the grammar engines themselves.

    python -m bench.structured [--compile auto|off] [--reps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import StepLog, report_stem, run_worker, worker_main, write_report
from bench.machine import describe, wait_until_quiet

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, NEW_TOKENS = 32, 48
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 8,
            "maxItems": 8,
        }
    },
    "required": ["items"],
}
REGEX = r"[a-z]{1,12}(, [a-z]{1,12}){7}"
SCENARIOS = ("free", "json", "regex")


def structured_job(job: dict) -> dict:
    from loraserve.adapters.smollm2_recipe import RECIPE_DIR
    from loraserve.server.engine import GenerationRequest
    from loraserve.server.grammar import Constraint
    from loraserve.server.runtime import Runtime, ServerConfig
    from loraserve.server.sampling import SamplingParams

    constraint = {
        "free": None,
        "json": Constraint("json_schema", json.dumps(SCHEMA)),
        "regex": Constraint("regex", REGEX),
    }[job["scenario"]]
    with tempfile.TemporaryDirectory() as adapters:
        config = ServerConfig(
            model="smollm2",
            adapters_dir=Path(adapters),
            port=0,
            metrics_port=None,
            max_batch_size=BATCH,
            max_seq_len=256,
            compile=job["compile"],
        )
        runtime = Runtime(config).start()
        try:
            questions = json.loads((RECIPE_DIR / "questions.json").read_text())["eval"][:BATCH]
            template, tok = runtime.chat_template, runtime.tokenizer
            ids = [
                tuple(tok.encode(template.render([{"role": "user", "content": q}]), False))
                for q in questions
            ]
            timings = {"fill": [], "apply": []}
            timing = [False]
            _time_calls(runtime.grammars, "fill", timings["fill"], timing)
            _time_calls(runtime.grammars, "apply", timings["apply"], timing)
            log = StepLog()
            log.wrap(runtime.engine)

            def run(new_tokens: int) -> int:
                params = SamplingParams(max_new_tokens=new_tokens, constraint=constraint)
                handles = [runtime.engine.submit(GenerationRequest(p, params)) for p in ids]
                return sum(len(h.result().token_ids) for h in handles)

            run(4)  # warm-up: every shape, the grammar compiled
            reps = []
            for rep in range(job["reps"]):
                wait_until_quiet(max_wait=20.0)
                log.rep, timing[0] = rep, True
                t = time.perf_counter()
                tokens = run(NEW_TOKENS)
                wall = time.perf_counter() - t
                log.rep, timing[0] = None, False
                reps.append({"tok_s": round(tokens / wall, 2), "tokens": tokens, "wall_s": wall})
        finally:
            runtime.stop(1.0)
    steps = log.summary(BATCH, list(range(job["reps"])))
    out = {
        "tok_s": statistics.median(r["tok_s"] for r in reps),
        "reps": reps,
        **steps,
        "full_batch_tok_s": round(1000 * BATCH / steps["decode_step_ms"], 2),
    }
    for name, values in timings.items():
        full = [v for v, rows in values if rows == BATCH]
        if full:
            out[f"{name}_ms_mean"] = round(1000 * statistics.mean(full), 3)
            out[f"{name}_ms_p95"] = round(1000 * sorted(full)[int(0.95 * (len(full) - 1))], 3)
    return out


def _time_calls(grammars, name: str, into: list, timing: list) -> None:
    """Record (seconds, rows) of every ``grammars.<name>`` call while ``timing[0]``."""
    inner = getattr(grammars, name)

    def timed(*args):
        t = time.perf_counter()
        result = inner(*args)
        if timing[0]:
            rows = len(args[0]) if name == "fill" else len(args[1])
            into.append((time.perf_counter() - t, rows))
        return result

    setattr(grammars, name, timed)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.structured", description=__doc__.split("\n")[0]
    )
    p.add_argument("--compile", default="auto", choices=("auto", "off"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def run_suite(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    runs = {}
    for scenario in SCENARIOS:
        job = {
            "kind": "structured",
            "scenario": scenario,
            "compile": args.compile,
            "reps": args.reps,
        }
        runs[scenario] = run_worker("bench.structured", job, timeout=1800)
        r = runs[scenario]
        print(
            f"{scenario:6s} {r['tok_s']:7.1f} tok/s  full-batch step {r['decode_step_ms']:.1f} ms "
            f"({r['full_batch_tok_s']:.0f} tok/s)  mask fill {r.get('fill_ms_mean', '-')} ms  "
            f"apply {r.get('apply_ms_mean', '-')} ms",
            flush=True,
        )
    free = runs["free"]
    summary = {
        s: {
            "full-batch decode / free": runs[s]["full_batch_tok_s"] / free["full_batch_tok_s"],
            "tok/s / free": runs[s]["tok_s"] / free["tok_s"],
            "target": 0.85,
            "met": runs[s]["full_batch_tok_s"] / free["full_batch_tok_s"] >= 0.85,
        }
        for s in SCENARIOS[1:]
    }
    return {
        "suite": "structured",
        "machine": describe("cpu", "float32"),
        "settings": {
            "model": "smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32)",
            "batch": BATCH,
            "new_tokens": NEW_TOKENS,
            "greedy": True,
            "compile": args.compile,
            "reps": args.reps,
            "schema": SCHEMA,
            "regex": REGEX,
            "grammar_engine": "llguidance",
        },
        "runs": runs,
        "summary": summary,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }


def markdown(report: dict) -> str:
    m, runs = report["machine"], report["runs"]
    lines = [
        f"# Structured output: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch "
        f"{m['torch']}, commit {m.get('git_commit') or '-'}",
        "",
        f"SmolLM2-135M-Instruct, batch {BATCH}, {NEW_TOKENS} new tokens, greedy, --compile "
        f"{report['settings']['compile']}; grammar engine llguidance",
        "",
        "| rows | tok/s (wall) | full-batch decode step ms | full-batch tok/s | vs free | "
        "mask fill ms (mean / p95) | mask apply ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, r in runs.items():
        ratio = report["summary"].get(s, {}).get("full-batch decode / free", 1.0)
        fill = f"{r['fill_ms_mean']:.2f} / {r['fill_ms_p95']:.2f}" if "fill_ms_mean" in r else "-"
        apply = f"{r['apply_ms_mean']:.2f}" if "apply_ms_mean" in r else "-"
        lines.append(
            f"| {s} | {r['tok_s']:.0f} | {r['decode_step_ms']:.1f} | {r['full_batch_tok_s']:.0f} "
            f"| {ratio:.3f} | {fill} | {apply} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, {"structured": structured_job}):
        return
    args = parse_args(argv)
    report = run_suite(args)
    stem = report_stem("structured", {"machine": report["machine"], "settings": {}})
    paths = write_report(args.out, stem, report, markdown(report))
    print(markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
