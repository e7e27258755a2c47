"""LoRA kernels (shrink / expand) against the reference loop.

Every implementation, fp32 and fp16, on shapes that are not multiples of the block sizes, a rank
below the tables' max (the rows past it hold junk, so a kernel that reads them fails), slot-0
and padded rows, one adapter for all tokens and all tokens distinct, groups of 1 and 3 tables
(q/k/v with different output sizes). Without a GPU the Triton kernels run under the Triton
interpreter on CPU tensors (slow: the shapes stay tiny).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # triton reads this when a kernel is decorated, so before triton_ops is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraserve.adapters.kernels import (  # noqa: E402
    KERNELS,
    KernelUnavailable,
    Segments,
    make_kernels,
)
from loraserve.adapters.kernels.reference import ReferenceKernels  # noqa: E402
from loraserve.adapters.kernels.torch_ops import TorchKernels  # noqa: E402
from loraserve.adapters.lora import BatchedLoRALinear, LoRAContext  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# `make test` installs the test extra, which brings triton: under CI a missing triton fails.
requires_triton = pytest.mark.skipif(
    not HAVE_TRITON and os.environ.get("CI") != "true",
    reason="triton is not installed (pip install -e '.[test]'); under CI=true this fails",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

IN, OUTS, R_MAX, RANK, SLOTS = 72, (40, 24, 56), 16, 5, 4  # none a multiple of the blocks
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
}
ROUTINGS = {
    "mixed": [0, 2, 1, 2, 0, 4, 3],  # slot-0 rows between adapter rows
    "one_adapter": [3, 3, 3, 3, 3],
    "distinct_padded": [4, 1, 3, 2, 0, 0],  # every row its own adapter, then padded rows
    "all_base": [0, 0, 0],
    "one_token": [2],
}


def triton_kernels(**options):
    from loraserve.adapters.kernels.triton_ops import TritonKernels

    return TritonKernels(**options)


IMPLEMENTATIONS = {
    "torch": TorchKernels,
    # small blocks: several K / N blocks, the last one partly masked; one split
    "triton_bgmv": lambda: triton_kernels(block_k=32, block_n=16, split_k=1),
    # split-K: three splits over in=72 (32 + 32 + 8), summed in the second pass
    "triton_split_k": lambda: triton_kernels(block_k=16, block_n=16, split_k=3),
    "triton_default": lambda: make_kernels("triton", DEVICE),
}


def implementation_params():
    return [
        pytest.param(name, marks=requires_triton if name.startswith("triton") else (), id=name)
        for name in IMPLEMENTATIONS
    ]


@pytest.fixture(params=implementation_params())
def kernels(request):
    return IMPLEMENTATIONS[request.param]()


def make_tables(n_tables, dtype, seed=0, outs=OUTS):
    """A and B slot tables: slot 0 zero; every other slot random in *all* r_max rows, so rows
    past ``RANK`` are junk that a kernel must not read."""
    gen = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for out in outs[:n_tables] if n_tables <= len(outs) else [*outs, 32][:n_tables]:
        A = torch.randn(SLOTS + 1, R_MAX, IN, generator=gen) * 0.1
        B = torch.randn(SLOTS + 1, R_MAX, out, generator=gen) * 0.1
        A[0], B[0] = 0, 0
        As.append(A.to(DEVICE, dtype))
        Bs.append(B.to(DEVICE, dtype))
    return tuple(As), tuple(Bs)


def make_batch(slots, dtype, outs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T = len(slots)
    x = torch.randn(T, IN, generator=gen).to(DEVICE, dtype)
    ys = tuple(torch.randn(T, out, generator=gen).to(DEVICE, dtype) for out in outs)
    return x, ys, torch.tensor(slots, dtype=torch.long, device=DEVICE)


def group(tables):
    return tables[0] if len(tables) == 1 else tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("n_tables", [1, 3])
def test_shrink_and_expand_match_the_reference(kernels, dtype, routing, n_tables):
    slots = ROUTINGS[routing]
    As, Bs = make_tables(n_tables, dtype)
    x, ys, token_slots = make_batch(slots, dtype, [B.shape[2] for B in Bs])
    ref = ReferenceKernels()

    h_ref = ref.shrink(x, group(As), token_slots, RANK)
    h = kernels.shrink(x, group(As), token_slots, RANK)
    assert h.dtype == torch.float32 and h.shape == (len(slots), n_tables * RANK)
    torch.testing.assert_close(h, h_ref, **TOL[dtype])

    expected = tuple(y.clone() for y in ys)
    ref.expand(h_ref, group(Bs), token_slots, RANK, group(expected))
    kernels.expand(h_ref, group(Bs), token_slots, RANK, group(ys))  # in place
    for y, want in zip(ys, expected):
        torch.testing.assert_close(y, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_slot_0_rows_are_untouched(kernels, dtype):
    As, Bs = make_tables(3, dtype)
    x, ys, token_slots = make_batch(ROUTINGS["mixed"], dtype, OUTS)
    base = token_slots == 0
    before = tuple(y.clone() for y in ys)
    h = kernels.shrink(x, As, token_slots, RANK)
    assert torch.equal(h[base], torch.zeros_like(h[base]))
    kernels.expand(h, Bs, token_slots, RANK, ys)
    for y, old in zip(ys, before):
        assert torch.equal(y[base], old[base])
        assert not torch.equal(y[~base], old[~base])  # the adapter rows did change


def test_the_reference_is_the_batched_layer_loop():
    """The kernels' semantics are the ``loop`` backend of the layer the server uses."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUTS[0])
    ctx = LoRAContext()
    layer = BatchedLoRALinear(linear, SLOTS, R_MAX, ctx, backend="loop")
    for slot in range(1, SLOTS + 1):
        layer.set_slot(slot, torch.randn(IN, RANK), torch.randn(RANK, OUTS[0]), scale=0.5)
    slots = torch.tensor(ROUTINGS["mixed"])
    ctx.set_slots(slots)
    x = torch.randn(len(slots), IN)
    with torch.no_grad():
        want = layer(x)
        y = linear(x)
        ref = ReferenceKernels()
        ref.expand(ref.shrink(x, layer.A, slots, RANK), layer.B, slots, RANK, y)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# SGMV: prefill segments

SEGMENT_ROWS = [(2, 5), (0, 3), (1, 18), (3, 1)]  # (slot, tokens): 18 > one 16-token block


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n_tables", [1, 3])
def test_sgmv_segments_match_the_reference(dtype, n_tables):
    kernels = triton_kernels(block_k=32, block_n=16, block_m=16)
    segments = Segments.from_rows(
        [s for s, _ in SEGMENT_ROWS], [n for _, n in SEGMENT_ROWS], DEVICE
    )
    slots = [s for s, n in SEGMENT_ROWS for _ in range(n)]
    As, Bs = make_tables(n_tables, dtype)
    x, ys, token_slots = make_batch(slots, dtype, [B.shape[2] for B in Bs])
    ref = ReferenceKernels()

    h_ref = ref.shrink(x, group(As), token_slots, RANK, segments)
    h = kernels.shrink(x, group(As), token_slots, RANK, segments)
    torch.testing.assert_close(h, h_ref, **TOL[dtype])

    expected = tuple(y.clone() for y in ys)
    ref.expand(h_ref, group(Bs), token_slots, RANK, group(expected), segments)
    kernels.expand(h_ref, group(Bs), token_slots, RANK, group(ys), segments)
    for y, want in zip(ys, expected):
        torch.testing.assert_close(y, want, **TOL[dtype])


def test_segments_must_agree_with_token_slots():
    As, _ = make_tables(1, torch.float32)
    x, _, token_slots = make_batch([1, 1, 2], torch.float32, OUTS[:1])
    wrong = Segments.from_rows([1, 2], [1, 2], DEVICE)
    with pytest.raises(ValueError, match="same routing"):
        ReferenceKernels().shrink(x, As[0], token_slots, RANK, wrong)


# --------------------------------------------------------------------------------------------
# groups larger than one launch, and the interface's errors


@requires_triton
def test_triton_groups_larger_than_one_launch():
    """Four tables sharing one input take two launches; columns land at g * rank."""
    As, Bs = make_tables(4, torch.float32)
    x, ys, token_slots = make_batch(ROUTINGS["mixed"], torch.float32, [B.shape[2] for B in Bs])
    kernels, ref = triton_kernels(block_k=32, block_n=32), ReferenceKernels()
    h_ref = ref.shrink(x, As, token_slots, RANK)
    torch.testing.assert_close(kernels.shrink(x, As, token_slots, RANK), h_ref, **TOL[x.dtype])
    expected = tuple(y.clone() for y in ys)
    ref.expand(h_ref, Bs, token_slots, RANK, expected)
    kernels.expand(h_ref, Bs, token_slots, RANK, ys)
    for y, want in zip(ys, expected):
        torch.testing.assert_close(y, want, **TOL[x.dtype])


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_rank_above_the_table_max_is_refused(name):
    As, Bs = make_tables(1, torch.float32)
    x, ys, token_slots = make_batch([1], torch.float32, OUTS[:1])
    kernels = make_kernels(name)
    with pytest.raises(ValueError, match="rank 17"):
        kernels.shrink(x, As[0], token_slots, R_MAX + 1)
    with pytest.raises(ValueError, match="2 B tables but 1 outputs"):
        kernels.expand(torch.zeros(1, 2 * RANK), Bs * 2, token_slots, RANK, ys[0])


def test_make_kernels_names():
    assert KERNELS == ("reference", "torch", "triton")
    assert make_kernels("reference").name == "reference"
    assert make_kernels("torch").name == "torch"
    with pytest.raises(ValueError, match="unknown LoRA kernels 'cuda'"):
        make_kernels("cuda")


def test_make_kernels_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # as if not installed
    with pytest.raises(KernelUnavailable, match="pip install triton"):
        make_kernels("triton")
    monkeypatch.undo()
    if not HAVE_TRITON:
        return
    with pytest.raises(KernelUnavailable, match="'mps'"):
        make_kernels("triton", "mps")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        make_kernels("triton", "cpu")


# --------------------------------------------------------------------------------------------
# compiled mode, without a GPU

COMPILE_FOR_SM90 = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from loraserve.adapters.kernels import triton_ops as k

def signature(fn, dtype, constexprs):
    types = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif "slots" in name or "starts" in name:
            types[name] = "*i64"
        elif name in ("out_ptr", "h_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
    return types

for dtype in ("bf16", "fp32"):
    blocks = dict(NUM_TABLES=3, BLOCK_R=16)
    sgmv = dict(blocks, FP32=dtype == "fp32", BLOCK_M=16)
    for fn, constexprs in [
        (k._shrink_bgmv, dict(blocks, BLOCK_K=64)),
        (k._expand_bgmv, dict(blocks, BLOCK_N=64)),
        (k._shrink_sgmv, dict(sgmv, BLOCK_K=64)),
        (k._expand_sgmv, dict(sgmv, BLOCK_N=64)),
    ]:
        src = ASTSource(fn, signature(fn, dtype, constexprs), constexprs=constexprs)
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
print("compiled")
"""


@requires_triton
def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts more than the compiler: compile every kernel to an sm_90 cubin
    (triton ships ptxas; no GPU needed), for the three-table group and bf16 / fp32."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a warm cache
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "compiled"


SERVE_WITH_TRITON = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
from pathlib import Path
from loraserve.server.engine import GenerationRequest
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams
from tests.serving import serving_config

model, folder = Path(sys.argv[1]), Path(sys.argv[2])
jobs = [("a0", (5, 6, 7)), ("a1", (9,)), ("", (3, 4)), ("a0", (8, 8, 8, 8)), ("a1", (2, 5))]
out = {}
for backend in ("gather", "triton"):
    runtime = Runtime(serving_config(model, folder, lora_backend=backend)).start()
    try:
        handles = [
            runtime.engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=4), adapter=a))
            for a, p in jobs
        ]
        out[backend] = [h.result().token_ids for h in handles]
    finally:
        runtime.stop()
assert out["gather"] == out["triton"], out
print("same", out["triton"])
"""


def test_the_server_serves_with_the_triton_backend(tmp_path):
    """The server's batched layers on the Triton kernels (interpreter): mixed adapters and base
    rows, prefill (SGMV over row segments) and decode (BGMV), greedy tokens equal to gather's."""
    from loraserve.adapters.format import write_adapter

    from tests.checkpoints import make_llama
    from tests.serving import random_adapter

    model = make_llama(tmp_path / "model")
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i in range(2):
        write_adapter(folder / f"a{i}.safetensors", random_adapter(model, f"a{i}", seed=70 + i))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_WITH_TRITON, str(model), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("same")
