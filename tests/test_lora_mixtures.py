"""Adapter mixtures in the batched LoRA layer: rows that add several adapters' deltas, weighted.

Every backend (the reference loop, per-slot segments, gather + bmm, the native CPU op, the
Triton kernels under the interpreter) against the formula ``y + sum_k w_k (x A_k^T) B_k``
written out here, for mixtures batched with plain-adapter rows and base rows, in decode and
prefill shapes and in the static decode step's routing; a one-member mixture of weight 1 equals
the plain adapter bit for bit. PEFT parity and the server's side are in test_mixtures.py.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_ops is first imported

from loraserve.adapters.kernels import cpu as cpu_kernels  # noqa: E402
from loraserve.adapters.lora import BatchedLoRALinear, LoRAContext, plain_route  # noqa: E402
from loraserve.adapters.models.decode import DecodeStep  # noqa: E402

IN, OUT, R_MAX, RANK, SLOTS = 40, 24, 8, 5, 6
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_OP = cpu_kernels.available()

# a mixture, a plain row, a base row, a 3-way mixture with a negative weight, a one-member
# mixture of weight 0.5
ROUTES = [((1, 0.7), (2, 0.3)), 3, 0, ((4, 1.5), (1, -0.5), (5, 0.25)), ((2, 0.5),)]


def layer(backend: str, seed: int = 0) -> BatchedLoRALinear:
    """Slots 1..SLOTS hold rank-RANK adapters, with junk past RANK (reading it shows) except
    for the loop, the reference, which reads whole slots."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(IN, OUT)
    out = BatchedLoRALinear(lin, SLOTS, R_MAX, LoRAContext(), backend)
    with torch.no_grad():
        for s in range(1, SLOTS + 1):
            out.set_slot(s, torch.randn(IN, RANK, generator=g), torch.randn(RANK, OUT), 0.5)
            if backend != "loop":
                out.A[s, RANK:] = 1e6
                out.B[s, RANK:] = 1e6
            out.context.slot_rank[s] = RANK
    return out


def expected(lay: BatchedLoRALinear, x: torch.Tensor, routes) -> torch.Tensor:
    """``x [B, S, in]``: the base output plus each row's weighted member deltas."""
    y = lay.linear(x)
    for b, route in enumerate(routes):
        pairs = [(route, 1.0)] if isinstance(route, int) else route
        for s, w in pairs:
            if s:
                y[b] += w * ((x[b] @ lay.A[s, :RANK].T) @ lay.B[s, :RANK])
    return y


def backends():
    params = ["loop", "segment", "gather"]
    no_op = "no C++ compiler to build the native CPU ops (under CI=true this fails)"
    params.append(pytest.param("gather+op", marks=_skip(not HAVE_OP, no_op)))
    no_triton = "triton is not installed (pip install -e '.[test]'; under CI=true this fails)"
    params.append(pytest.param("triton", marks=_skip(not HAVE_TRITON, no_triton)))
    return params


def _skip(cond: bool, why: str):
    """Skip for ``why`` outside CI; under CI=true the test runs, and fails without the part."""
    return pytest.mark.skipif(cond and os.environ.get("CI") != "true", reason=why)


def make(backend: str) -> BatchedLoRALinear:
    lay = layer(backend.split("+")[0])
    if backend.endswith("+op"):
        lay.context.row_op = cpu_kernels.lora_rows
    return lay


@pytest.mark.parametrize("seq_len", [1, 3], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", backends())
def test_mixtures_batched_with_plain_and_base_rows(backend, seq_len):
    lay = make(backend)
    x = torch.randn(len(ROUTES), seq_len, IN, generator=torch.Generator().manual_seed(3))
    lay.context.set_rows(ROUTES, seq_len)
    with torch.no_grad():
        got = lay(x)
        want = expected(lay, x, ROUTES)
        base = lay.linear(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(got[2], base[2])  # the base row: exactly the base output


@pytest.mark.parametrize("backend", backends())
def test_one_member_of_weight_one_is_the_plain_adapter_exactly(backend):
    lay = make(backend)
    x = torch.randn(3, 1, IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        lay.context.set_rows([2, 4, 0], 1)
        plain = lay(x)
        lay.context.set_rows([((2, 1.0),), ((4, 1.0),), 0], 1)
        assert torch.equal(lay(x), plain)
        # next to a real mixture (every row then goes through the mixed path), a plain row
        # and a one-member mixture of weight 1 of the same input compute the same thing
        same = torch.cat([x[:1], x[:1], x[2:]])
        lay.context.set_rows([2, ((2, 1.0),), ((1, 0.5), (3, 0.5))], 1)
        out = lay(same)
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0], plain[0], atol=1e-5, rtol=1e-6)


def test_plain_route():
    assert plain_route(3) == 3
    assert plain_route([(3, 1.0)]) == 3
    assert plain_route([(3, 0.5)]) == ((3, 0.5),)
    assert plain_route([(3, 1), (2, 1)]) == ((3, 1.0), (2, 1.0))
    with pytest.raises(ValueError):
        plain_route(())


@pytest.mark.parametrize(
    "op", [False, pytest.param(True, marks=_skip(not HAVE_OP, "no C++ compiler for the op"))]
)
def test_static_routing_at_a_width(op):
    """``set_static`` with ``[b, K]`` buffers, as the decode step fills them (padding members
    on slot 0, weight 0), for the gather path and the native op."""
    lay = make("gather+op" if op else "gather")
    x = torch.randn(4, 1, IN, generator=torch.Generator().manual_seed(5))
    routes = [((1, 0.7), (2, 0.3)), 3, 0, ((6, 2.0),)]
    slots = torch.tensor([[1, 2], [3, 0], [0, 0], [6, 0]])
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    lay.context.set_static(slots, RANK, torch.zeros(RANK), weights)
    with torch.no_grad():
        got = lay(x)
        torch.testing.assert_close(got, expected(lay, x, routes), atol=1e-4, rtol=1e-5)
        lay.context.set_static(torch.tensor([1, 3, 0, 6]), RANK, torch.zeros(RANK))
        plain = lay(x)
    if op:  # the op: a plain row at width K is the same row at width 1, bit for bit
        assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])
    else:  # bmm over K*r ranks sums in another order (so steps without mixtures stay at 1)
        torch.testing.assert_close(got[1], plain[1], atol=1e-4, rtol=1e-5)


@_skip(not HAVE_OP, "no C++ compiler to build the native CPU ops (under CI=true this fails)")
def test_native_op_mixture_rows():
    lay = layer("gather")
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, IN, generator=g), torch.randn(3, OUT, generator=g)
    slots = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 3, 5]])
    weights = torch.tensor([[0.25, 0.75, 9.0], [1.0, 1.0, 1.0], [0.5, 0.5, -1.0]])
    got = cpu_kernels.lora_rows(x, y, lay.A, lay.B, slots, RANK, weights)
    want = y.clone()
    for b in range(3):
        for k in range(3):
            s, w = int(slots[b, k]), float(weights[b, k])
            if s:
                want[b] += w * ((x[b] @ lay.A[s, :RANK].T) @ lay.B[s, :RANK])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(got[1], y[1])  # slot 0 is padding whatever its weight
    ones = cpu_kernels.lora_rows(x, y, lay.A, lay.B, slots[:, :1], RANK, torch.ones(3, 1))
    assert torch.equal(ones, cpu_kernels.lora_rows(x, y, lay.A, lay.B, slots[:, 0], RANK))
    with pytest.raises(RuntimeError, match="weights"):
        cpu_kernels.lora_rows(x, y, lay.A, lay.B, slots, RANK, torch.ones(3, 2))


class _Recorder:
    """Stands in for a model in a DecodeStep: records the routing each step hands the layers."""

    def __init__(self, context):
        self.context = context
        self.seen = []

    def run(self, tokens, positions, step, blocks=None):
        ctx = self.context
        self.seen.append(
            (ctx.row_slots.clone(), None if ctx.row_weights is None else ctx.row_weights.clone())
        )
        return torch.zeros(tokens.shape[0], 1, 7)


class _Table:
    def __init__(self, context):
        self.context = context
        self.layers = {"x": layer("gather")}
        self.num_slots = SLOTS


class _Cache:
    max_batch, max_seq, scratch = 8, 16, 16

    def step(self, *args):
        return None


@pytest.mark.parametrize("op", [False, True], ids=["gather", "native-op"])
def test_decode_step_routings(op):
    """Without the native op a step without mixtures runs plain and a step with one runs mixed
    (``[b, max_mixture]``); with it every step runs mixed (one graph). A weighted one-member
    route runs mixed even when the server mixes at most one adapter."""
    context = LoRAContext()
    context.slot_rank.update({s: RANK for s in range(1, SLOTS + 1)})
    if op:
        context.row_op = lambda *a: None
    table = _Table(context)
    model = _Recorder(context)
    step = DecodeStep(model, _Cache(), table, max_batch=4, max_rank=8, max_mixture=3)
    assert step.modes == ([True] if op else [False, True])
    step([1, 2, 3], [4, 4, 4], [2, 0, 5])
    step([1, 2, 3], [4, 4, 4], [((1, 0.5), (2, 0.5)), 0, ((3, 1.0),)])
    (plain, plain_w), (mixed, mixed_w) = model.seen
    if op:
        assert plain.tolist() == [[2, 0, 0], [0, 0, 0], [5, 0, 0], [0, 0, 0]]
        assert plain_w[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0]
    else:
        assert plain.tolist() == [2, 0, 5, 0] and plain_w is None
    assert mixed.tolist() == [[1, 2, 0], [0, 0, 0], [3, 0, 0], [0, 0, 0]]
    assert mixed_w.tolist()[0] == [0.5, 0.5, 0.0]

    single = DecodeStep(_Recorder(context), _Cache(), table, max_batch=2, max_rank=8)
    single([1, 2], [4, 4], [((2, 0.5),), 3])
    slots, weights = single.model.seen[-1]
    assert slots.tolist() == [[2], [3]] and weights.tolist() == [[0.5], [1.0]]
