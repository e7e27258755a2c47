"""Grammar engines for structured output: what a constrained decode step costs on the CPU.

    python -m bench.grammar --tokenizer FOLDER [--batch 32] [--steps 100] [--out FILE]

Structured output (JSON schema, json_object, regex, choice) needs a token mask per constrained
row at every decode step, made on the CPU while the model runs: its cost adds to every step.
This compares xgrammar, llguidance and outlines-core (PyPI; one not installed is skipped) on
one tokenizer (SmolLM2's for loraserve, V = 49152), pinned to one CPU and one torch thread:
- setup: the tokenizer made into the engine's vocabulary (once per model);
- compile (ms, first and median of up to 3, caches off): a small JSON schema (string, integer,
  enum, array of strings), {"type": "object"} (json_object), a regex, a choice of 5 strings;
- steps: --batch rows, each its own matcher. A step fills the int32 bitmask [B, ceil(V/32)] of
  the batch with the engine's batch call (timed), then each row draws a random allowed token
  (JSON punctuation 50x likelier, so strings end as a model's would; EOS half the time when
  allowed, then the row restarts) and advances (timed apart). "same": all rows the schema in
  lockstep; "mixed": the four constraints round-robin, each row on its own;
- threads: does compile / fill drop the GIL (a thread waking from a 1 ms sleep waits about
  half a call if not), and does compiling in a background thread while this one fills masks
  raise or change them;
- apply: disallowed logits of a float32 [B, V] tensor set to -inf from the bitmask (the same
  layout for all three) in plain torch, two ways, and with xgrammar's CPU kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "tags"],
}
ANY_OBJECT = {"type": "object"}
REGEX = r"\d{3}-[a-z]{2,8}"
CHOICES = ["red", "green", "blue", "dark red", "light-green"]
KINDS = ("json_schema", "json_object", "regex", "choice")


def special_ids(tok) -> set[int]:
    """Added/special tokens (<|im_start|>, ...): not text, so no grammar may allow them."""
    return set(tok.added_tokens_decoder) | set(tok.all_special_ids)


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: token character -> the byte it stands for."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]  # printable: their own char
    moved = [b for b in range(256) if b not in kept]  # the rest (space...): chr(256 + n)
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(moved)}


class XGrammar:
    """C++ pushdown automaton; token masks precomputed per grammar position at compile."""

    module = "xgrammar"  # imports transformers, torch, pydantic, tvm_ffi

    def __init__(self, tok, vocab: int, folder: str):
        import xgrammar as xgr

        self.xgr = xgr
        hf = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)  # detects the vocab type
        # ... but leaves SmolLM2's added tokens as plain text (special_token_ids empty: a JSON
        # string may contain "<|im_start|>"); a blank entry makes a token special, never allowed
        text, skip = {i: t for t, i in tok.get_vocab().items()}, special_ids(tok)
        encoded = ["" if i in skip else text.get(i, "") for i in range(vocab)]
        info = xgr.TokenizerInfo(
            encoded,
            hf.vocab_type,
            vocab_size=vocab,
            stop_token_ids=[tok.eos_token_id],
            add_prefix_space=hf.add_prefix_space,
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, kind: str):
        if kind in ("json_schema", "json_object"):
            schema = SCHEMA if kind == "json_schema" else ANY_OBJECT
            return self.compiler.compile_json_schema(json.dumps(schema))
        if kind == "regex":
            return self.compiler.compile_regex(REGEX)
        return self.compiler.compile_grammar("root ::= " + " | ".join(map(json.dumps, CHOICES)))

    def new_row(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, rows, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(rows, bitmask)

    def advance(self, row, token: int) -> bool:
        return row.accept_token(token)


class LLGuidance:
    """Rust Earley parser over a lexer; masks computed lazily at each step, no big tables."""

    module = "llguidance"  # not llguidance.torch: its @torch.compile costs 4 s at import

    def __init__(self, tok, vocab: int, folder: str):
        import llguidance

        self.llg = llguidance  # reads tokenizer.json itself (Rust tokenizers), no transformers
        path = os.path.join(folder, "tokenizer.json")
        self.tok = llguidance.LLTokenizer(path, n_vocab=vocab, eos_token=tok.eos_token_id)
        self.executor = llguidance.LLExecutor(num_threads=1)

    def compile(self, kind: str):
        m = self.llg.LLMatcher
        if kind in ("json_schema", "json_object"):
            grammar = m.grammar_from_json_schema(SCHEMA if kind == "json_schema" else ANY_OBJECT)
        elif kind == "regex":
            grammar = m.grammar_from_regex(REGEX)
        else:
            grammar = m.grammar_from_lark("start: " + " | ".join(map(json.dumps, CHOICES)))
        matcher = m(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher  # a template: each row is a deep copy (microseconds)

    def new_row(self, grammar):
        return grammar.deep_copy()

    def fill(self, rows, bitmask: torch.Tensor) -> None:
        pairs = [(row, i) for i, row in enumerate(rows)]  # row i -> bitmask row i
        ptr, row_bytes = bitmask.data_ptr(), bitmask.stride(0) * 4
        self.executor.unsafe_compute_mask_ptr(pairs, ptr, row_bytes, bitmask.shape[0])

    def advance(self, row, token: int) -> bool:
        return row.consume_token(token)


class OutlinesCore:
    """Rust regex DFA x vocabulary index, built eagerly at compile; a JSON schema is a regex."""

    module = "outlines_core"

    def __init__(self, tok, vocab: int, folder: str):
        import outlines_core

        self.oc = outlines_core
        decode, skip, by_bytes = byte_decoder(), special_ids(tok), {}
        for text, i in tok.get_vocab().items():
            if i < vocab and i not in skip:  # EOS is given apart; other specials never allowed
                by_bytes.setdefault(bytes(decode[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_token_id, by_bytes)
        self.words = math.ceil(vocab / 32)

    def compile(self, kind: str):
        if kind in ("json_schema", "json_object"):
            schema = SCHEMA if kind == "json_schema" else ANY_OBJECT
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        elif kind == "regex":
            regex = REGEX
        else:
            regex = "|".join("".join(c if c.isalnum() else "\\" + c for c in s) for s in CHOICES)
        return self.oc.Index(regex, self.vocab)

    def new_row(self, grammar):
        return self.oc.Guide(grammar)

    def fill(self, rows, bitmask: torch.Tensor) -> None:
        ptr, stride = bitmask.data_ptr(), bitmask.stride(0) * 4
        for i, row in enumerate(rows):  # no batch call: one per row (it zeroes the row first)
            row.write_mask_into(ptr + i * stride, self.words, 4)

    def advance(self, row, token: int) -> bool:
        try:
            row.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False


ENGINES = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}
SHIFTS = torch.arange(32, dtype=torch.int32)
# mask byte -> the additive bias of its 8 tokens, lowest bit first: 0 allowed, -inf not
BYTE_BIAS = torch.where(
    ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf")
)


def apply_unpack(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The obvious way: bits -> bool [B, V], masked_fill_ (a scalar loop on the CPU)."""
    allowed = ((bitmask.unsqueeze(-1) >> SHIFTS) & 1).bool().view(bitmask.shape[0], -1)
    logits.masked_fill_(~allowed[:, : logits.shape[1]], float("-inf"))


def apply_byte_bias(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Each mask byte (little-endian: byte k = tokens 8k..8k+7) looks up 8 biases, one add."""
    bias = torch.nn.functional.embedding(bitmask.view(torch.uint8).long(), BYTE_BIAS)
    logits.add_(bias.view(logits.shape[0], -1)[:, : logits.shape[1]])


def ms(ns: list[float]) -> dict:
    v = [x / 1e6 for x in ns]
    p95 = statistics.quantiles(v, n=20)[-1] if len(v) > 1 else v[0]
    return {"mean": round(statistics.fmean(v), 3), "p95": round(p95, 3), "n": len(v)}


def time_compiles(engine) -> tuple[dict, dict]:
    timings, compiled = {}, {}
    for kind in KINDS:
        runs = []
        while len(runs) < 3 and sum(runs) < 2e9:  # one is enough when it takes seconds
            t = time.perf_counter_ns()
            compiled[kind] = engine.compile(kind)
            runs.append(time.perf_counter_ns() - t)
        first, median = (round(x / 1e6, 2) for x in (runs[0], statistics.median(runs)))
        timings[kind] = {"first": first, "median": median, "n": len(runs)}
    return timings, compiled


class Sampler:
    """A random allowed token per row (JSON punctuation 50x likelier, EOS half the time it is
    allowed), drawn from random scores masked as a server would; times the apply methods too."""

    def __init__(self, tok, vocab: int, apply_times: dict):
        decode, self.bias = byte_decoder(), torch.zeros(vocab)
        for text, i in tok.get_vocab().items():
            if i < vocab and any(c in b'"{}[],:' for c in bytes(decode.get(c, 0) for c in text)):
                self.bias[i] = math.log(50)
        self.eos, self.vocab, self.apply_times = tok.eos_token_id, vocab, apply_times
        self.gen = torch.Generator().manual_seed(0)
        self.methods = {
            "torch_unpack_masked_fill": apply_unpack,
            "torch_byte_bias": apply_byte_bias,
        }
        with contextlib.suppress(ImportError):
            from xgrammar import apply_token_bitmask_inplace

            self.methods["xgrammar_cpu_kernel"] = apply_token_bitmask_inplace

    def draw(self, bitmask: torch.Tensor) -> tuple[list, list]:
        uniform = torch.rand(bitmask.shape[0], self.vocab, generator=self.gen).clamp_(min=1e-12)
        for name, fn in self.methods.items():
            trial = uniform.clone()
            t = time.perf_counter_ns()
            fn(trial, bitmask)
            self.apply_times.setdefault(name, []).append(time.perf_counter_ns() - t)
        scores = self.bias - torch.log(-torch.log(uniform))  # Gumbel-max: weighted draw...
        apply_byte_bias(scores, bitmask)  # ... among the allowed tokens
        tokens, eos = scores.argmax(-1), self.eos
        eos_ok = ((bitmask[:, eos // 32] >> (eos % 32)) & 1).bool()
        tokens[eos_ok & (torch.rand(len(tokens), generator=self.gen) < 0.5)] = eos
        return tokens.tolist(), torch.isinf(scores.max(-1).values).tolist()


def run_steps(engine, grammars: list, kinds: list, steps: int, sampler: Sampler, lockstep: bool):
    rows, eos = [engine.new_row(g) for g in grammars], sampler.eos
    bitmask = torch.full((len(rows), math.ceil(sampler.vocab / 32)), -1, dtype=torch.int32)
    fills, advances, finished, rejected, empty = [], [], dict.fromkeys(kinds, 0), 0, 0
    for step in range(steps + 5):  # 5 warm-up steps
        t = time.perf_counter_ns()
        engine.fill(rows, bitmask)
        fill_ns = time.perf_counter_ns() - t
        tokens, none_allowed = sampler.draw(bitmask)
        if lockstep:
            tokens = [tokens[0]] * len(rows)
        t = time.perf_counter_ns()
        for i, token in enumerate(tokens):
            if token == eos or none_allowed[i]:  # done (or stuck): the row starts anew
                rows[i] = engine.new_row(grammars[i])
                finished[kinds[i]] += int(not none_allowed[i])
                empty += int(none_allowed[i])
            elif not engine.advance(rows[i], token):
                rows[i] = engine.new_row(grammars[i])
                rejected += 1
        if step >= 5:
            fills.append(fill_ns)
            advances.append(time.perf_counter_ns() - t)
    counts = {"finished": finished, "rejected_tokens": rejected, "empty_masks": empty}
    return {"fill_ms": ms(fills), "advance_ms": ms(advances), **counts}, rows


def gil_wait(fn, seconds: float = 0.3) -> dict:
    """Median ms that a thread waking from a 1 ms sleep waits for the GIL while ``fn`` runs in a
    loop: about half a call if ``fn`` holds the GIL, near 0 if it drops it."""
    stop, waits, calls = threading.Event(), [], []

    def watch():
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            waits.append(time.perf_counter() - t - 0.001)

    th = threading.Thread(target=watch)
    th.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(calls) < 3:
        t = time.perf_counter_ns()
        fn()
        calls.append(time.perf_counter_ns() - t)
    stop.set()
    th.join()
    return {"call_ms": ms(calls)["mean"], "gil_wait_ms": round(statistics.median(waits) * 1e3, 3)}


def thread_checks(engine, rows: list, vocab: int) -> dict:
    """GIL use of compile and fill; then compiles in a background thread for 0.5 s while this
    one fills the masks of ``rows`` (mid-decode, not advanced): errors, or masks that change."""
    bitmask = torch.zeros((len(rows), math.ceil(vocab / 32)), dtype=torch.int32)
    engine.fill(rows, bitmask)
    reference, fills, changed, error = bitmask.clone(), [], 0, None
    out = {"compile": gil_wait(lambda: engine.compile("json_schema"))}
    out["fill"] = gil_wait(lambda: engine.fill(rows, bitmask))

    def compile_for_half_a_second():
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            engine.compile("json_schema")

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(compile_for_half_a_second)
        while not job.done():
            t = time.perf_counter_ns()
            engine.fill(rows, bitmask)
            fills.append(time.perf_counter_ns() - t)
            changed += int(not torch.equal(bitmask, reference))
        error = repr(job.exception()) if job.exception() else None
    out["concurrent"] = {"fill_ms": ms(fills), "changed_masks": changed, "error": error}
    return out


def package_info(name: str) -> dict:
    dist = metadata.distribution(name)
    return {
        "version": dist.version,
        "installed_kib": sum(f.size or 0 for f in dist.files or []) // 1024,
        "requires": [r for r in dist.requires or [] if "extra ==" not in r],
    }


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "pinned_cpus": sorted(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="HF folder with tokenizer.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--out", default="bench/results/grammar-cpu.json")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # threads started later inherit it
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab, config = len(tok), os.path.join(args.tokenizer, "config.json")
    if os.path.exists(config):  # the logits width, which the masks must cover
        vocab = json.loads(Path(config).read_text()).get("vocab_size", vocab)
    result = {
        "machine": machine(),
        "vocab_size": vocab,
        "eos": tok.eos_token_id,
        "batch": args.batch,
        "steps": args.steps,
        "engines": {},
        "constraints": dict(zip(KINDS, (SCHEMA, ANY_OBJECT, REGEX, CHOICES))),
    }
    apply_times: dict = {}
    for name in args.engines.split(","):
        try:
            info = package_info(name)
            importlib.import_module(ENGINES[name].module)
            t = time.perf_counter()
            engine = ENGINES[name](tok, vocab, args.tokenizer)
        except (ImportError, metadata.PackageNotFoundError) as e:
            print(f"skip {name}: not installed ({e!r})")
            result["engines"][name] = {"skipped": f"not installed: {e!r}"}
            continue
        info["setup_ms"] = round((time.perf_counter() - t) * 1000, 1)
        print(f"{name} {info['version']}: setup {info['setup_ms']} ms", flush=True)
        info["compile_ms"], compiled = time_compiles(engine)
        info["steps"] = {}
        for label in ("same", "mixed"):
            kinds = [KINDS[i % 4] if label == "mixed" else KINDS[0] for i in range(args.batch)]
            sampler = Sampler(tok, vocab, apply_times if label == "mixed" else {})
            grammars = [compiled[k] for k in kinds]
            info["steps"][label], rows = run_steps(
                engine, grammars, kinds, args.steps, sampler, lockstep=label == "same"
            )
        info["threads"] = thread_checks(engine, rows, vocab)
        result["engines"][name] = info
    result["apply_ms"] = {k: ms(v[5:]) for k, v in apply_times.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    print(f"wrote {args.out}")
    return result


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"\nV={r['vocab_size']} batch={r['batch']} steps={r['steps']} cpu={m['cpu']}, ms:")
    cols = ["setup", *KINDS, "same fill", "mixed fill", "advance", "GIL c/f"]
    print(f"{'engine':14}" + "".join(f"{c:>13}" for c in cols))
    for name, e in r["engines"].items():
        if "skipped" in e:
            print(f"{name:14}skipped: {e['skipped']}")
            continue
        steps, th = e["steps"], e["threads"]
        fill = [f"{steps[x]['fill_ms']['mean']}/{steps[x]['fill_ms']['p95']}" for x in steps]
        cells = [e["setup_ms"], *(e["compile_ms"][k]["median"] for k in KINDS), *fill]
        cells += [
            steps["mixed"]["advance_ms"]["mean"],
            f"{th['compile']['gil_wait_ms']}/{th['fill']['gil_wait_ms']}",
        ]
        print(f"{name:14}" + "".join(f"{c:>13}" for c in cells))
    print("compile: median; fill: batch mean/p95; advance: batch mean; GIL: median wait")
    for k, v in r["apply_ms"].items():
        print(f"apply {k:26} mean {v['mean']} ms  p95 {v['p95']} ms")


if __name__ == "__main__":
    main()
