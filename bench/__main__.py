"""The benchmark suite: ``python -m bench [--quick] [--device cuda --dtype bfloat16] [--out DIR]``.

Runs ``bench.engine``, ``bench.peers``, ``bench.load`` and (not with ``--quick``) ``bench.real``
with the same arguments and prints where the results went; see bench/README.md for how long
each takes on this project's 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import engine, load, peers, real, summary


def shared_args(argv: list[str]) -> list[str]:
    """The options both suites take, parsed here so a typo fails before anything runs."""
    p = argparse.ArgumentParser(prog="python -m bench", description="engine, peers and load suites")
    p.add_argument("--quick", action="store_true", help="about 2 minutes on a 2-core CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", default=None, help="default: bench/results")
    p.add_argument("--cache-dir", default=None, help="checkpoints and adapters")
    args = p.parse_args(argv)
    out = ["--quick"] if args.quick else []
    for flag in ("device", "dtype", "out", "cache_dir"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", value]
    return out


def main(argv: list[str] | None = None) -> None:
    shared = shared_args(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    engine_args = engine.parse_args(shared)
    engine_report = engine.run_suite(engine_args)
    engine_paths = engine.write(engine_report, engine_args.out)
    print(engine.markdown(engine_report))
    peers_args = peers.parse_args(shared)
    peers_report = peers.run_suite(peers_args)
    peers_paths = peers.write(peers_report, peers_args.out)
    print(peers.markdown(peers_report, peers_paths[2:]))
    load_args = load.parse_args(shared)
    load_report = load.run_suite(load_args)
    load_paths = load.write(load_report, load_args.out)
    print(load.markdown(load_report, load_paths[2:]))
    written = [*engine_paths, *peers_paths, *load_paths]
    if "--quick" not in shared:
        real_args = real.parse_args(shared)
        real_report = real.run_suite(real_args)
        written += real.write(real_report, real_args.out)
        print(real.markdown(real_report))
    if "--quick" not in shared and "--out" not in shared:
        written.append(summary.write())  # the README's numbers, from the JSON just written
    print(f"suite done in {time.monotonic() - t0:.0f} s; wrote:")
    for path in written:
        print(" ", path)


if __name__ == "__main__":
    main()
