"""Timing a workload through loraserve, in-process or over gRPC, and one process per config.

A *workload* is ``len(adapters)`` greedy requests, request ``i`` on ``adapters[i]`` ("" = base
model), every prompt ``prompt_len`` tokens and every output exactly ``new_tokens`` tokens (the
bench checkpoints have no EOS), all submitted at once. ``run_engine`` times it through
``Runtime(config).engine`` on this process; ``run_grpc`` through a real ``LoraServer`` on a
loopback port with one client thread per batch row. Both:

1. warm up: one short request per distinct adapter (loads every adapter into its device slot),
   then the whole workload with a few tokens (every shape once);
2. time ``reps`` repetitions, each after ``machine.wait_until_quiet()``; a repetition is
   generated tokens / wall time from the first submit to the last result;
3. record each engine step (prefill or decode, wall time, rows) by wrapping the engine's
   ``_run_batch`` (the forward plus sampling, which reads the tokens back to the host, so CUDA
   steps are timed after they finish).

``run_worker(module, job)`` runs ``python -m module --worker JOB --result FILE`` and returns
the JSON the worker wrote: the suites build a fresh process (fresh model, fresh allocator, fresh
OpenMP pools) for every configuration.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import OthersMeter, wait_until_quiet

# absolute(), not resolve(): a bench/ symlinked into another checkout runs that checkout's code
REPO = Path(__file__).absolute().parent.parent
NOISY = 0.15  # a repetition is redone when other processes kept more of the CPUs busy than this


@dataclass(frozen=True)
class Workload:
    # one entry per request: an adapter, "" = base model, or a mixture spelled "a:0.5+b:0.5"
    adapters: tuple[str, ...]
    batch: int = 32  # engine rows (max_batch_size); decode steps with this many rows are timed
    prompt_len: int = 32
    new_tokens: int = 32
    reps: int = 3
    warmup_tokens: int = 4
    quiet_wait: float = 20.0  # max seconds to wait for idle CPUs before each repetition

    @property
    def distinct(self) -> list[str]:
        return sorted({name for a in self.adapters for name in members(a)})


def members(spec: str) -> list[str]:
    """The adapter names a workload entry uses."""
    return [part.partition(":")[0] for part in spec.split("+")] if spec else []


def request_target(spec: str) -> dict:
    """A workload entry as ``GenerationRequest`` fields: ``adapter``, or ``mixture``."""
    from loraserve.server.engine import MixtureMember

    if ":" not in spec:
        return {"adapter": spec}
    parts = [part.partition(":") for part in spec.split("+")]
    return {"mixture": tuple(MixtureMember(name, float(w)) for name, _, w in parts)}


def server_config(
    model: Path,
    adapters_dir: Path,
    *,
    backend: str,
    device: str,
    dtype: str,
    rank: int,
    slots: int,
    batch: int,
    max_seq_len: int,
    requests: int,
    compile: str = "auto",
    lora_dtype: str = "auto",
):
    """The ``ServerConfig`` every bench run uses: all adapters fit in device and host slots (the
    steady state of a warm server), no metrics endpoint, no folder polling during timing."""
    from loraserve.server.runtime import ServerConfig

    return ServerConfig(
        model=str(model),
        adapters_dir=adapters_dir,
        port=0,
        metrics_port=None,
        device=device,
        dtype=dtype,
        max_active_adapters=max(1, slots),
        max_cached_adapters=max(64, slots),
        max_cached_bytes=16 << 30,
        max_lora_rank=rank,
        lora_backend=backend,
        max_batch_size=batch,
        max_seq_len=max_seq_len,
        max_queue=max(256, requests),
        watch_poll_interval=3600.0,
        drain_grace=1.0,
        compile=compile,
        lora_dtype=lora_dtype,
    )


def report_stem(suite: str, report: dict) -> str:
    """``<suite>-<device>[-quick]``: the file name of a suite's results, without extension."""
    device = report["machine"]["device"].split(":")[0]
    return f"{suite}-{device}" + ("-quick" if report["settings"].get("quick") else "")


def write_report(out: Path, stem: str, report: dict, markdown: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the report) and ``<stem>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def greedy_generate(model, ids, new_tokens: int, **kwargs) -> list[list[int]]:
    """transformers' ``generate`` of exactly ``new_tokens`` greedy tokens for each row of
    ``ids`` (equal-length prompts, no padding); the new tokens only."""
    import torch

    with torch.inference_mode():
        seqs = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return seqs[:, ids.shape[1] :].tolist()


def prompts(n: int, length: int, vocab: int) -> list[tuple[int, ...]]:
    """``n`` different deterministic prompts of ``length`` token ids."""
    return [tuple((7919 * i + 104729 * j + 13) % vocab for j in range(length)) for i in range(n)]


@dataclass
class StepLog:
    """Every engine step of the timed repetitions: (repetition, prefill?, seconds, rows)."""

    steps: list[tuple[int, bool, float, int]] = field(default_factory=list)
    rep: int | None = None  # the repetition being timed; None: not timing

    def wrap(self, engine) -> None:
        inner = engine._run_batch

        def timed(seqs, prefill):
            t = time.perf_counter()
            inner(seqs, prefill)
            if self.rep is not None:
                self.steps.append((self.rep, prefill, time.perf_counter() - t, len(seqs)))

        engine._run_batch = timed

    def summary(self, batch: int, reps: list[int]) -> dict:
        """Median full-batch decode step and prefill time per repetition, over ``reps``."""
        steps = [(p, s, n) for r, p, s, n in self.steps if r in reps]
        decode = [s for p, s, n in steps if not p and n == batch]
        prefill = [s for p, s, _ in steps if p]
        return {
            "decode_step_ms": _ms(statistics.median(decode)) if decode else None,
            "decode_steps_timed": len(decode),
            "prefill_ms_per_rep": _ms(sum(prefill) / len(reps)) if prefill else None,
        }


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def timed_reps(work: Workload, submit_all: Callable[[int], list[list[int]]], log: StepLog):
    """Warm up, then time ``work.reps`` repetitions of ``submit_all(new_tokens)``.

    A repetition during which other processes kept more than ``NOISY`` of the CPUs busy is
    redone (at most ``work.reps`` extra times); the medians (throughput, and the engine steps in
    ``log``) are over the clean ones, or over all when fewer than ``work.reps`` came out clean.
    Every repetition is in the result.
    """
    submit_all(work.warmup_tokens)
    reps, outputs, meter = [], None, OthersMeter()
    while sum(r["clean"] for r in reps) < work.reps and len(reps) < 2 * work.reps:
        busy_before = wait_until_quiet(max_wait=work.quiet_wait)
        log.rep = len(reps)
        meter.start()
        t = time.perf_counter()
        outputs = submit_all(work.new_tokens)
        wall = time.perf_counter() - t
        others = meter.stop()
        log.rep = None
        generated = sum(len(o) for o in outputs)
        expected = len(work.adapters) * work.new_tokens
        if generated != expected:
            raise RuntimeError(f"generated {generated} tokens, expected {expected}")
        reps.append(
            {
                "tok_s": round(generated / wall, 2),
                "wall_s": round(wall, 4),
                "others_busy": others,
                "busy_before": busy_before,
                "clean": others <= NOISY,
            }
        )
    used = [i for i, r in enumerate(reps) if r["clean"]]
    used = used if len(used) >= work.reps else list(range(len(reps)))
    result = {
        "tok_s": statistics.median(reps[i]["tok_s"] for i in used),
        "tok_s_reps": [reps[i]["tok_s"] for i in used],
        "reps": reps,
        "outputs": outputs,
    }
    result.update(log.summary(work.batch, used))
    return result


# --------------------------------------------------------------------------------------------
# loraserve in-process


def build_runtime(config, thread: str = "caller"):
    """``Runtime(config).start()`` on this thread ("caller", what tests and users do), or on a
    thread that exits before the engine runs ("ephemeral"; see bench/README.md: libgomp keeps
    one worker pool per thread that ran a parallel op, and a second live pool slows every small
    op the engine thread runs)."""
    from loraserve.server.runtime import Runtime

    if thread == "caller":
        return Runtime(config).start()
    box: list = []

    def build():
        try:
            box.append(Runtime(config))
        except BaseException as e:  # re-raised on the caller's thread
            box.append(e)

    t = threading.Thread(target=build, name="bench-build")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0].start()


def run_engine(config, work: Workload, vocab: int, thread: str = "caller") -> dict:
    """Time ``work`` through the engine of ``Runtime(config)`` on this process."""
    from loraserve.server.engine import GenerationRequest
    from loraserve.server.sampling import SamplingParams

    runtime = build_runtime(config, thread)
    try:
        engine = runtime.engine
        ps = prompts(len(work.adapters), work.prompt_len, vocab)

        def submit_all(new_tokens: int, rows=None) -> list[list[int]]:
            rows = range(len(work.adapters)) if rows is None else rows
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
            handles = [
                engine.submit(GenerationRequest(ps[i], params, **request_target(work.adapters[i])))
                for i in rows
            ]
            return [h.result().token_ids for h in handles]

        _load_adapters(work, lambda rows: submit_all(1, rows))
        log = StepLog()
        log.wrap(engine)
        result = timed_reps(work, submit_all, log)
        return result
    finally:
        runtime.stop(1.0)


def _load_adapters(work: Workload, submit_rows: Callable[[list[int]], object]) -> None:
    """One request per distinct adapter, so every adapter is resident before timing."""
    first = {}
    for i, name in enumerate(work.adapters):
        first.setdefault(name, i)
    submit_rows(sorted(first.values()))


# --------------------------------------------------------------------------------------------
# loraserve over gRPC


class ServerThread:
    """A real ``LoraServer`` on a loopback port, on an event loop thread of its own."""

    def __init__(self, config):
        from loraserve.server.app import LoraServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            return LoraServer(config)  # built on the loop: it owns asyncio primitives

        self.server = self.call(make())
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def run_grpc(config, work: Workload, vocab: int, clients: int) -> dict:
    """Time ``work`` through a real gRPC server with ``clients`` concurrent client threads, each
    with its own channel, taking requests from a shared list in order."""
    from loraserve.client import LoraClient

    server = ServerThread(config)
    conns = [LoraClient(server.target) for _ in range(clients)]
    try:
        ps = prompts(len(work.adapters), work.prompt_len, vocab)

        def submit_all(new_tokens: int, rows=None) -> list[list[int]]:
            rows = list(range(len(work.adapters)) if rows is None else rows)
            out: dict[int, list[int]] = {}
            lock = threading.Lock()

            def client_loop(c) -> None:
                while True:
                    with lock:
                        if not rows:
                            return
                        i = rows.pop(0)
                    done = c.generate(
                        ps[i], work.adapters[i], max_new_tokens=new_tokens, temperature=0.0
                    )
                    out[i] = list(done.token_ids)

            threads = [threading.Thread(target=client_loop, args=(c,)) for c in conns]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [out[i] for i in sorted(out)]

        _load_adapters(work, lambda rows: submit_all(1, rows))
        log = StepLog()
        log.wrap(server.server.runtime.engine)
        result = timed_reps(work, submit_all, log)
        return result
    finally:
        for c in conns:
            c.close()
        server.stop()


# --------------------------------------------------------------------------------------------
# one process per configuration


def run_worker(module: str, job: dict, timeout: float = 900) -> dict:
    """Run ``python -m module --worker JOB --result FILE`` from the repo root; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="loraserve-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--worker", json.dumps(job), "--result", str(result)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"worker {module} failed (exit {proc.returncode}) for {job}:\n{proc.stderr[-3000:]}"
            )
        return json.loads(result.read_text())


def worker_main(argv: list[str], handlers: dict[str, Callable[[dict], dict]]) -> bool:
    """If ``argv`` is a worker invocation, run the job's handler, write its result, return True."""
    if "--worker" not in argv:
        return False
    job = json.loads(argv[argv.index("--worker") + 1])
    result_path = Path(argv[argv.index("--result") + 1])
    result = handlers[job["kind"]](job)
    result_path.write_text(json.dumps(result))
    return True
