"""The performance summary, rendered from the committed JSON results (never typed by hand).

    python -m bench.summary           # write bench/results/SUMMARY.md and README.md's block
    python -m bench.summary --check   # exit 1 when README.md's block differs from the JSON

``python -m bench`` (the full suite) runs this at the end. A test checks that README.md's block
between the ``bench-summary`` markers is exactly what the committed JSON renders to, so a
number in the README cannot drift from the measurement it quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- bench-summary:start (python -m bench.summary renders this from bench/results) -->"
END = "<!-- bench-summary:end -->"


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or _cpu(report)
    commit = m.get("git_commit") or "commit not recorded"
    return f"{where}, {m['dtype']}, torch {m['torch']}, {commit}"


def _cpu(report: dict) -> str:
    """The CPU a result was measured on: the targets are ratios, but which ones a 2-core VM
    meets depends on its CPU (AMD EPYC and Intel Xeon VMs differ in GEMM rate against memory
    bandwidth), so every row says which."""
    m = report["machine"]
    return f"{m['logical_cpus']}-core {m.get('cpu') or 'CPU'}"


def _r(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: Path = RESULTS) -> str:
    """The markdown block: targets, then engine, PEFT and load tables."""
    engines = [r for d in ("cpu", "cuda") if (r := _load(results, f"engine-{d}"))]
    peers = _load(results, "peers-cpu")
    load = _load(results, "load-cpu")
    real = _load(results, "real-cpu")
    lines = [
        "| target (the issues set them for the CPU machine) | measured | met | where, on |",
        "| --- | --- | --- | --- |",
    ]
    for report in (r for r in engines if r["machine"]["device"] == "cpu"):
        label, _ = _engine_default(report)
        for t in report["targets"]:
            if t.get("variant", t.get("backend")) == label:
                target = t["target"] if isinstance(t["target"], str) else f">= {t['target']}"
                lines.append(
                    f"| {t['metric']} {target}, hidden {t['hidden']} | "
                    f"{t['measured']:.3f} | {'yes' if t['met'] else 'no'} | "
                    f"engine-{report['machine']['device']}, {_cpu(report)} |"
                )
    if peers:
        for t in peers["targets"]:
            lines.append(
                f"| {t['metric']} >= {t['target']} | {_r(t['measured'], 2)} | "
                f"{'yes' if t['met'] else 'no'} | peers-cpu, {_cpu(peers)} |"
            )
    if real:
        for t in real["targets"]:
            lines.append(
                f"| {t['metric']} >= {t['target']} ({real['settings']['model']['name']}) | "
                f"{_r(t['measured'], 2)} | {'yes' if t['met'] else 'no'} | "
                f"real-cpu, {_cpu(real)} |"
            )
    if load:
        t = load["summary"]["target"]
        lines.append(
            f"| {t['what']} >= {t['target']}, errors 0 | {_r(t['measured'], 3)}, errors "
            f"{load['summary']['errors']} | {'yes' if t['met'] else 'no'} | "
            f"load-cpu, {_cpu(load)} |"
        )
    lines += [
        "",
        "Engine, batch 32, rank 16 on every linear layer but `lm_head`: tok/s of (b) every row on "
        "one adapter, (c) every row on its own adapter (32), (c') the same with slots padded to "
        "rank 64, (c'') the same with bfloat16 slot tables (`--lora-dtype bfloat16`), each / (a) "
        "the base model; and (c)'s decode step / its physical floor.",
        "",
        "| machine | hidden | (b)/(a) | (c)/(a) | (c')/(a) | (c'')/(a) | (c) step / floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for report in engines:
        label, sizes = _engine_default(report)
        for size, b in sizes.items():
            lines.append(
                f"| {_machine(report)} ({label}) | {size} | {_r(b['one/base'])} | "
                f"{_r(b['distinct/base'])} | {_r(b.get('distinct-r64/base'))} | "
                f"{_r(b.get('distinct-bf16/base'))} | {_r(b['distinct step / floor step'])}x |"
            )
    compiled = [r for r in engines if len(r["settings"].get("variants", [])) > 1]
    if compiled:
        lines += [
            "",
            "The static, compiled decode step (`--compile auto`, the default) against the eager "
            "one (`--compile off`), same run: tok/s ratio, and (a)'s decode step / its compute "
            "floor (every Linear as one GEMM at this machine's best rate) for each.",
            "",
            "| machine | hidden | (a) | (b) | (c) | (a) step / compute floor, eager -> compiled |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for report in compiled:
            first, last = report["settings"]["variants"][0], report["settings"]["variants"][-1]
            for size, s in report["summary"].items():
                v, e = s["variants"][last], s["variants"][first]
                vs = v["tok/s vs first variant"]
                lines.append(
                    f"| {_machine(report)} | {size} | {_x(vs['base'])} | {_x(vs['one'])} | "
                    f"{_x(vs['distinct'])} | {_r(e['base step / compute floor'])} -> "
                    f"{_r(v['base step / compute floor'])} |"
                )
    if peers:
        lines += [
            "",
            f"Against Hugging Face PEFT {peers['machine'].get('peft')} on the same checkpoint and "
            f"adapter files ({_machine(peers)}; batch 32, "
            f"{peers['settings']['new_tokens']} new tokens, greedy):",
            "",
            "| hidden | rank | adapters | vs PEFT switching | vs PEFT mixed batch "
            "| gRPC / in-process | / base | / floor | tokens equal PEFT |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in peers["summary"]["grid"]:
            equal = row.get("greedy tokens equal to peft-mixed")
            lines.append(
                f"| {row['hidden']} | {row['rank']} | {row['adapters']} | "
                f"{_x(row.get('engine / peft-switch'))} | {_x(row.get('engine / peft-mixed'))} | "
                f"{_r(row.get('grpc / engine'))} | {_r(row.get('engine / base'))} | "
                f"{_r(row.get('engine / floor'))} | "
                f"{'-' if equal is None else f'{100 * equal:.0f}%'} |"
            )
    if load:
        lines += _load_lines(load)
    return "\n".join(lines) + "\n"


def _engine_default(report: dict) -> tuple[str, dict[str, dict]]:
    """The default configuration of an engine report and its ratios per hidden size: the last
    variant (backend:compile) of a report from issue 13 on, the chosen backend before that."""
    if "variants" in report["settings"]:
        variant = report["settings"]["variants"][-1]
        return variant, {size: s["variants"][variant] for size, s in report["summary"].items()}
    backend = report["default_backend"]["backend"]
    return backend, {
        size: {**s["backends"][backend], "distinct-r64/base": s.get("distinct-r64/base")}
        for size, s in report["summary"].items()
    }


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _load_lines(load: dict) -> list[str]:
    plan = load["settings"]["plan"]
    many, res = plan["many"], plan["resident"]
    lines = [
        "",
        f"Open-loop gRPC load ({_machine(load)}): Poisson arrivals, Zipf(s={plan['zipf']}) "
        f"popularity; `many` = {many['adapters']} adapters on disk, {many['slots']} device "
        f"slots, {many['host_cache']} in host memory; `resident` = {res['adapters']} adapters, "
        f"all in slots; the same offered load for both:",
        "",
        "| load | many / resident tok/s | errors | TTFT p50 / p99 ms, resident | "
        "TTFT p50 / p99 ms, many | device / host hit, many |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, ratio in load["summary"]["ratios"].items():
        r, m = load["runs"]["resident"][label], load["runs"]["many"][label]
        errors = sum(r["errors"].values()) + sum(m["errors"].values())
        s = m["server"]
        lines.append(
            f"| {label} ({m['offered_rate']} req/s) | {ratio:.3f} | {errors} | "
            f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} | "
            f"{m['ttft_ms']['p50']:.0f} / {m['ttft_ms']['p99']:.0f} | "
            f"{_pct(s['device_hit_rate'])} / {_pct(s['host_hit_rate'])} |"
        )
    cold = load["cold_load"]
    parts = []
    for rank, first in cold["rename_to_first_token_ms"].items():
        dd = cold["disk_to_device_ms"][rank]
        parts.append(
            f"rank {rank} ({dd['mib']} MiB): {first['p50']:.0f} / {first['p99']:.0f} ms from "
            f"rename to first token, {dd['total']['p50']:.1f} / {dd['total']['p99']:.1f} ms "
            "disk -> device"
        )
    lines += ["", "Adapter cold load, p50 / p99: " + "; ".join(parts) + "."]
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def readme_block(readme: str) -> str | None:
    if START not in readme or END not in readme:
        return None
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def update_readme(text: str, readme: Path = README) -> None:
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = content.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{text}{END}{tail}")


def write(results: Path = RESULTS, readme: Path = README) -> Path:
    text = render(results)
    path = results / "SUMMARY.md"
    path.write_text("# Benchmark summary\n\nRendered by `python -m bench.summary`.\n\n" + text)
    update_readme(text, readme)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare README.md's block; change none")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.check:
        same = readme_block(README.read_text()) == render()
        print("README.md matches bench/results" if same else "README.md differs: rerun")
        return 0 if same else 1
    print("wrote", write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
