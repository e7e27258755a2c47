"""The native CPU ops (``loraserve.adapters.kernels.cpu``): the decode rows' LoRA delta against
the layer's reference loop, the packed GEMM against ``F.linear``, decode attention against
torch's products; and their place in the server: built once, used by the static step, compiled
blocks call them without recompiling, and a machine that cannot build them serves without them.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loraserve.adapters.kernels import KernelUnavailable
from loraserve.adapters.kernels import cpu as cpu_kernels
from loraserve.adapters.lora import BatchedLoRALinear, LoRAContext
from loraserve.adapters.models.attention import decode_attention
from loraserve.adapters.models.packed import can_pack, forget_packed

# `make test` runs on a machine with g++ (inductor needs it too): under CI a missing op fails.
if not cpu_kernels.available():
    if os.environ.get("CI") == "true":
        raise RuntimeError("the native CPU ops could not be built (see the log)")
    pytest.skip("no C++ compiler to build the native CPU ops", allow_module_level=True)

IN, OUT, R_MAX, SLOTS = 72, 40, 16, 5  # not multiples of any vector width


def table(rank: int, seed: int = 0) -> BatchedLoRALinear:
    """A layer whose slots hold rank-``rank`` adapters and junk past ``rank`` (so reading past
    the rank in use shows)."""
    g = torch.Generator().manual_seed(seed)
    layer = BatchedLoRALinear(torch.nn.Linear(IN, OUT), SLOTS, R_MAX, LoRAContext(), "loop")
    with torch.no_grad():
        for s in range(1, SLOTS + 1):
            layer.set_slot(s, torch.randn(IN, rank, generator=g), torch.randn(rank, OUT), 0.5)
            layer.A[s, rank:] = 1e6
            layer.B[s, rank:] = 1e6
    return layer


@pytest.mark.parametrize(
    "slots",
    [
        [0, 2, 1, 2, 0, 5, 3],
        [3, 3, 3, 3],
        [5, 4, 3, 2, 1, 0, 0],
        [0, 0, 0],
        [2],
        [1] * 9 + [2, 2, 0, 0, 0, 0, 4],
    ],
    ids=["mixed", "one_adapter", "distinct_padded", "all_base", "one_row", "runs"],
)
@pytest.mark.parametrize("rank", [3, 6, 8])  # the op takes four ranks per pass, then the rest
def test_lora_rows_matches_the_reference_loop(slots, rank):
    """Rows one at a time, and runs of rows on the same slot four at a time (tiles), with
    the rest after them; y a slice of a wider output (fused projections), read in place."""
    layer = table(rank)
    x = torch.randn(len(slots), IN)
    y = torch.randn(len(slots), OUT + 9)[:, 3 : 3 + OUT]
    rows = torch.tensor(slots)
    got = cpu_kernels.lora_rows(x, y, layer.A, layer.B, rows, rank)
    want = y.clone()
    for b, s in enumerate(slots):
        want[b] += (x[b] @ layer.A[s, :rank].T) @ layer.B[s, :rank]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    for b, s in enumerate(slots):
        if s == 0:
            assert torch.equal(got[b], y[b])  # slot-0 rows: exactly the base output
    assert torch.equal(cpu_kernels.lora_rows(x, y, layer.A, layer.B, rows, 0), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_rows_reads_16_bit_tables(dtype):
    """``--lora-dtype``: tables of 16-bit values, widened to float32 as they are read, give what
    float32 tables holding the same values give, up to the order of the float32 sums (plain
    rows and mixtures)."""
    layer = table(6, seed=2)
    A, B = layer.A.to(dtype), layer.B.to(dtype)
    x, y = torch.randn(6, IN), torch.randn(6, OUT)
    rows = torch.tensor([0, 2, 1, 5, 5, 3])
    want = cpu_kernels.lora_rows(x, y, A.float(), B.float(), rows, 6)
    torch.testing.assert_close(cpu_kernels.lora_rows(x, y, A, B, rows, 6), want)
    mixed, weights = torch.tensor([[1, 3], [2, 0]] * 3), torch.tensor([[0.5, -1.0], [1.0, 0.0]] * 3)
    want = cpu_kernels.lora_rows(x, y, A.float(), B.float(), mixed, 6, weights)
    torch.testing.assert_close(cpu_kernels.lora_rows(x, y, A, B, mixed, 6, weights), want)


def test_lora_rows_weighs_each_row_of_a_tile():
    """Rows that mix the same adapters with different weights: a tile of four computes each
    row's own weighted sum (and a row after the tile alone)."""
    layer = table(6, seed=3)
    x, y = torch.randn(5, IN), torch.randn(5, OUT)
    slots = torch.tensor([[1, 4]] * 5)
    weights = torch.tensor([[0.5, -1.0], [1.0, 0.0], [2.0, 0.25], [-0.5, 1.0], [1.0, 1.0]])
    got = cpu_kernels.lora_rows(x, y, layer.A, layer.B, slots, 6, weights)
    want = y.clone()
    for b in range(5):
        for s, w in zip(slots[b].tolist(), weights[b].tolist()):
            want[b] += w * (x[b] @ layer.A[s, :6].T) @ layer.B[s, :6]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_lora_rows_refuses_what_it_cannot_read():
    layer = table(4)
    x, y = torch.randn(2, IN), torch.randn(2, OUT)
    with pytest.raises(RuntimeError, match="slot 9 outside"):
        cpu_kernels.lora_rows(x, y, layer.A, layer.B, torch.tensor([1, 9]), 4)
    with pytest.raises(RuntimeError, match="rank outside"):
        cpu_kernels.lora_rows(x, y, layer.A, layer.B, torch.tensor([1, 2]), R_MAX + 1)
    with pytest.raises(RuntimeError, match="float32 x and y"):
        cpu_kernels.lora_rows(x.half(), y.half(), layer.A, layer.B, torch.tensor([1, 2]), 4)
    with pytest.raises(RuntimeError, match="both tables float32, bfloat16 or float16"):
        cpu_kernels.lora_rows(x, y, layer.A.bfloat16(), layer.B, torch.tensor([1, 2]), 4)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_kernels.lora_rows(torch.randn(2, IN + 1), y, layer.A, layer.B, torch.tensor([1, 2]), 4)


def test_the_gather_layer_takes_the_op_for_one_token_rows():
    """The layer with ``row_op`` set equals the gather path (decode rows, and a static step's
    routing with the rank as a probe's size); rows of several tokens keep gather + bmm."""
    layer = table(8, seed=1)
    layer.backend, layer._forward_delta = "gather", layer._delta_gather
    ctx = layer.context
    ctx.slot_rank = {s: 8 for s in range(1, SLOTS + 1)}  # what LoRASlotTable.fill records
    x1 = torch.randn(4, 1, IN)
    ctx.set_rows([1, 0, 4, 2], 1)
    want = layer(x1)
    calls = []
    ctx.row_op = lambda *a: calls.append(1) or cpu_kernels.lora_rows(*a)
    torch.testing.assert_close(layer(x1), want, atol=1e-4, rtol=1e-5)
    ctx.set_static(torch.tensor([1, 0, 4, 2]), 8, torch.zeros(8))
    torch.testing.assert_close(layer(x1), want, atol=1e-4, rtol=1e-5)
    assert len(calls) == 2
    ctx.set_rows([1, 3], 3)
    layer(torch.randn(2, 3, IN))  # prefill rows: not the op
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "positions"),
    [(8, 8, 64, 64), (9, 3, 64, 37), (32, 4, 64, 5), (4, 2, 20, 7), (1, 1, 8, 1)],
    ids=["one_head_per_kv", "smollm2_groups", "eight_per_kv", "odd_sizes", "smallest"],
)
def test_decode_attention_matches_torch(heads, kv_heads, head_dim, positions):
    """The op on views of a cache (rows and positions past the window, as the decode step
    reads them), with each row's own read length, equals torch's products; a masked position
    holding NaN (a stale entry) does not reach the op's result."""
    g = torch.Generator().manual_seed(heads * 100 + positions)
    B, T = 5, positions
    k_cache = torch.randn(B + 2, kv_heads, T + 3, head_dim, generator=g)
    v_cache = torch.randn(B + 2, kv_heads, T + 3, head_dim, generator=g)
    k, v = k_cache[:B, :, :T], v_cache[:B, :, :T]
    q = torch.randn(B, 1, heads, head_dim, generator=g).transpose(1, 2)  # strided, as in a step
    last = torch.tensor([T - 1, 0, T // 2, T - 1, max(0, T - 2)])
    mask = torch.arange(T) <= last[:, None, None, None]
    got = cpu_kernels.decode_attention(q, k, v, mask)
    assert got.shape == (B, heads, 1, head_dim) and got.is_contiguous()
    torch.testing.assert_close(got, decode_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    if T > 1:
        v_cache[1, :, T - 1] = float("nan")  # row 1 reads position 0 only
        assert torch.isfinite(cpu_kernels.decode_attention(q, k, v, mask)).all()


def test_decode_attention_refuses_what_it_cannot_read():
    q, kv = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 3, 8)
    mask = torch.ones(2, 1, 1, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="float32 q, k and v"):
        cpu_kernels.decode_attention(q.half(), kv.half(), kv.half(), mask)
    with pytest.raises(RuntimeError, match="4 query heads over 3 KV heads"):
        cpu_kernels.decode_attention(q, torch.randn(2, 3, 3, 8), torch.randn(2, 3, 3, 8), mask)
    with pytest.raises(RuntimeError, match="one query per row"):
        cpu_kernels.decode_attention(torch.randn(2, 4, 2, 8), kv, kv, mask)
    with pytest.raises(RuntimeError, match="the mask does not fit"):
        cpu_kernels.decode_attention(q, kv, kv, mask[..., :2])
    with pytest.raises(RuntimeError, match="bool mask"):
        cpu_kernels.decode_attention(q, kv, kv, mask.float())


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_the_linear(bias):
    """The native twin of ``loraserve::packed_linear``: ``F.linear`` for 2-D and 3-D inputs."""
    if not can_pack("cpu", torch.float32):
        pytest.fail("this torch build has no oneDNN: the CPU library's GEMM cannot pack")
    linear = torch.nn.Linear(IN, OUT, bias=bias)
    with torch.inference_mode():
        for x in (torch.randn(7, IN), torch.randn(3, 5, IN), torch.randn(1, IN)):
            got = cpu_kernels.packed_linear(x, linear.weight, linear.bias)
            torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="does not fit the weight"):
        cpu_kernels.packed_linear(torch.randn(2, IN + 1), linear.weight)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 32, 37, 600])
def test_packed_linear_every_tile_and_panel_edge(rows, bias):
    """The op's GEMM at every edge of its tiling: rows not a multiple of the 8-row tile (and
    past the size where it hands over to the BLAS), outputs not a multiple of the 48-column
    panel (a narrow one, a partial last panel), odd inner sizes, a strided input and a
    transposed (non-contiguous) weight. Each weight the op packed keeps a twin: the count
    shows which products took the packed GEMM and which the BLAS."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    avx512 = any(line.startswith("flags") and " avx512f" in line for line in lines)
    assert cpu_kernels.packed_kernel() == ("panels" if avx512 else "onednn")
    forget_packed()
    g = torch.Generator().manual_seed(rows)
    weights = []  # alive until the count (a freed weight's twin goes)
    for d_in, d_out in ((5, 3), (72, 40), (33, 97), (576, 960), (129, 48)):
        w = torch.randn(d_out, d_in, generator=g)
        weights.append(w)
        b = torch.randn(d_out, generator=g) if bias else None
        x = torch.randn(rows, d_in, generator=g)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        with torch.inference_mode():
            got = cpu_kernels.packed_linear(x, w, b)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    wide = torch.randn(rows, 2 * d_in, generator=g)[:, ::2]  # every other column
    wt = torch.randn(d_in, d_out, generator=g).T  # a transposed weight
    with torch.inference_mode():
        got = cpu_kernels.packed_linear(wide, wt, b)
        # a weight made under inference mode has no version counter: no twin, the BLAS
        inference_w = wt.clone()
        torch.testing.assert_close(
            cpu_kernels.packed_linear(wide, inference_w, b), got, atol=1e-4, rtol=1e-4
        )
    torch.testing.assert_close(got, F.linear(wide, wt, b), atol=1e-4, rtol=1e-4)
    # the panel GEMM up to 512 rows (five weights and the transposed one, not the inference
    # one), the BLAS above; oneDNN packs them all
    packed = 6 if rows <= 512 or not avx512 else 0
    assert torch.ops.loraserve_cpu.packed_count() == packed, weights
    forget_packed()


def test_row_max_is_torch_max():
    """Each row's largest logit and the index of its first occurrence, as ``torch.max(dim=-1)``
    gives them: vocabularies shorter than and not a multiple of the 16 lanes, ties (in one
    lane and across lanes), rows of -inf (a structured-output mask), +inf, NaN (its first
    index, whatever else the row holds), a non-contiguous input."""
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(n, v, generator=g) for n, v in ((1, 1), (3, 15), (2, 16), (5, 17), (32, 1000))
    ]
    ties = torch.zeros(5, 100)
    ties[0, [37, 90]] = 5  # two lanes
    ties[1, [3, 19, 35]] = 2  # one lane
    ties[2] = float("-inf")  # all masked: index 0
    ties[3, 99] = float("inf")  # in the tail
    ties[4, [70, 20]] = float("-inf")  # zeros elsewhere: the first zero
    nan = torch.randn(4, 70, generator=g)
    nan[0, [40, 50]] = float("nan")
    nan[1, 2] = float("inf")
    nan[1, 65] = float("nan")  # NaN in the tail, after an inf
    nan[2, 69] = float("nan")
    nan[3] = float("nan")
    strided = torch.randn(6, 80, generator=g)[:, ::3]
    for logits in (*cases, ties, nan, strided):
        values, indices = cpu_kernels.row_max(logits)
        want_values, want_indices = logits.max(dim=-1)
        assert torch.equal(indices, want_indices), (logits.shape, indices, want_indices)
        torch.testing.assert_close(values, want_values, equal_nan=True)
    with pytest.raises(RuntimeError, match="float32 logits"):
        cpu_kernels.row_max(torch.zeros(2, 3, dtype=torch.float64))


def test_packed_twins_follow_their_weights():
    """A weight written in place is packed again; a freed weight's twin is dropped when the
    next one is packed, and a new weight at the same address never gets a stale twin."""
    forget_packed()
    count = torch.ops.loraserve_cpu.packed_count
    x = torch.randn(4, IN)
    w = torch.randn(OUT, IN)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.packed_linear(x, w), x @ w.T)
        assert count() == 1
        cpu_kernels.packed_linear(x, w)
        assert count() == 1  # found, not packed again
    w.mul_(-2)  # an in-place write bumps the version
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.packed_linear(x, w), x @ w.T)
    for _ in range(3):  # freed weights; the allocator may hand the same memory out again
        del w
        w = torch.randn(OUT, IN)
        with torch.inference_mode():
            torch.testing.assert_close(cpu_kernels.packed_linear(x, w), x @ w.T)
        assert count() == 1
    compiled = torch.compile(lambda x, w: cpu_kernels.packed_linear(x, w).relu(), dynamic=True)
    with torch.inference_mode():  # an opaque kernel inside a compiled graph
        x6 = torch.randn(6, IN)
        torch.testing.assert_close(compiled(x6, w), (x6 @ w.T).relu())
    forget_packed()
    assert count() == 0


def test_a_machine_that_cannot_build_it_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with pytest.raises(KernelUnavailable, match="need a C\\+\\+ compiler"):
        cpu_kernels.load()
    assert not cpu_kernels.available()  # the failure is kept: no second attempt
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    # a compiler that fails (the process has the op loaded already: a build that succeeded
    # here would load a second copy, which torch refuses by aborting)
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: name == "/bin/false" or None)
    monkeypatch.setenv("LORASERVE_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(KernelUnavailable, match="building the native CPU ops failed"):
        cpu_kernels.load()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_the_library_is_cached_by_source_torch_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASERVE_KERNEL_CACHE", str(tmp_path))
    path = cpu_kernels.library_path(cpu_kernels.cxx_compiler())
    assert path.parent == tmp_path and path.name.startswith("loraserve_cpu-")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags : another cpu")
    assert cpu_kernels.library_path(cpu_kernels.cxx_compiler()) != path
