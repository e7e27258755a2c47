"""The LoRA layer: seed semantics, module swapping, and the batched slot table vs the reference."""

import math

import pytest
import torch
from loraserve.adapters.lora import (
    BatchedLoRALinear,
    LinearWithLoRA,
    LoRAContext,
    LoRALayer,
    linear_shapes,
    lora_parameters,
    mark_only_lora_trainable,
    match_target,
    peft_scale,
    replace_linear_with_batched_lora,
    replace_linear_with_lora,
)
from torch import nn

# "triton" runs on CUDA, or on CPU under TRITON_INTERPRET=1: tests/test_lora_kernels.py checks
# its kernels against the reference and serves with it, in a process of its own.
TORCH_BACKENDS = [b for b in BatchedLoRALinear.BACKENDS if b != "triton"]


def randomize(layer: LinearWithLoRA, seed: int) -> LinearWithLoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=g))
        layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g))
    return layer


def test_lora_layer_init_follows_the_classic_formulation():
    torch.manual_seed(0)
    layer = LoRALayer(64, 32, rank=8, alpha=4)
    assert layer.A.shape == (64, 8) and layer.B.shape == (8, 32)
    assert torch.count_nonzero(layer.B) == 0
    # kaiming_uniform(a=sqrt(5)) with fan_in=in_dim: bound = 1/sqrt(in_dim)
    bound = 1 / math.sqrt(64)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
    assert layer.scale == 4


def test_fresh_linear_with_lora_equals_the_wrapped_linear():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    expected = linear(x)
    wrapped = LinearWithLoRA(linear, rank=4, alpha=8)
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)


def test_alpha_scales_the_delta_linearly():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    x = torch.randn(7, 16)
    one = randomize(LinearWithLoRA(linear, rank=4, alpha=1), seed=1)
    three = randomize(LinearWithLoRA(linear, rank=4, alpha=3), seed=1)
    base = linear(x)
    torch.testing.assert_close(three(x) - base, 3 * (one(x) - base), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one(x) - base, x @ one.lora.A @ one.lora.B, rtol=1e-5, atol=1e-5)


def test_explicit_scale_overrides_alpha_for_peft_conventions():
    assert peft_scale(16, 32) == 2.0
    assert peft_scale(16, 32, use_rslora=True) == 8.0
    layer = LoRALayer(8, 8, rank=16, alpha=32, scale=peft_scale(16, 32))
    assert layer.scale == 2.0


def test_merge_and_unmerge_are_idempotent():
    torch.manual_seed(0)
    layer = randomize(LinearWithLoRA(nn.Linear(16, 24), rank=4, alpha=2), seed=2)
    x = torch.randn(5, 16)
    before = layer(x)
    w0 = layer.linear.weight.clone()
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.linear.weight, w0, rtol=1e-6, atol=1e-6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.o_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 11)


def test_replace_swaps_exactly_the_targeted_layers():
    model = Tiny()
    names = replace_linear_with_lora(model, rank=2, alpha=1, targets=["q_proj", "v_proj"])
    assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    for name, module in model.named_modules():
        if name in names:
            assert isinstance(module, LinearWithLoRA)
        elif name.endswith(("o_proj", "lm_head")):
            assert type(module) is nn.Linear
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)}
    assert len(trainable) == 8
    # the shapes a validator sees are unchanged by wrapping
    assert linear_shapes(model) == linear_shapes(Tiny())


def test_target_patterns_follow_peft():
    assert match_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not match_target("model.layers.0.self_attn.q_proj_x", ["q_proj"])
    assert match_target("model.layers.0.self_attn.q_proj", r".*\.0\.self_attn\.q_proj")
    assert not match_target("model.layers.1.self_attn.q_proj", r".*\.0\.self_attn\.q_proj")
    assert match_target("model.layers.0.mlp.up_proj", "all-linear")
    assert not match_target("lm_head", "all-linear")
    with pytest.raises(ValueError, match="no Linear layer matches"):
        replace_linear_with_lora(Tiny(), rank=2, alpha=1, targets=["qproj"])


def make_adapters(n: int, in_dim: int, out_dim: int, ranks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(in_dim, r, generator=g), torch.randn(r, out_dim, generator=g), 0.5 + i)
        for i, r in zip(range(n), ranks)
    ]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_batched_layer_equals_each_row_through_its_own_linear_with_lora(backend):
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    adapters = make_adapters(3, 32, 48, ranks=[2, 8, 5])
    ctx = LoRAContext()
    batched = BatchedLoRALinear(linear, max_slots=4, max_rank=8, context=ctx, backend=backend)
    for slot, (A, B, s) in enumerate(adapters, start=1):
        batched.set_slot(slot, A, B, s)
    # 6 rows of 4 tokens: slots 0 (base), 1, 2, 3, 2, 4 (empty slot = base)
    row_slots = [0, 1, 2, 3, 2, 4]
    x = torch.randn(len(row_slots), 4, 32)
    ctx.set_slots(torch.tensor(row_slots)[:, None].expand(-1, 4))
    got = batched(x)
    for row, slot in enumerate(row_slots):
        if slot in (0, 4):
            expected = linear(x[row])
        else:
            A, B, s = adapters[slot - 1]
            ref = LinearWithLoRA(linear, rank=A.shape[1], alpha=1.0, scale=s)
            with torch.no_grad():
                ref.lora.A.copy_(A)
                ref.lora.B.copy_(B)
            expected = ref(x[row])
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["segment", "gather"])
def test_fast_paths_equal_the_reference_loop_on_random_routing(backend):
    torch.manual_seed(1)
    linear = nn.Linear(24, 40)
    ctx_ref, ctx_fast = LoRAContext(), LoRAContext()
    ref = BatchedLoRALinear(linear, max_slots=6, max_rank=8, context=ctx_ref, backend="loop")
    fast = BatchedLoRALinear(linear, max_slots=6, max_rank=8, context=ctx_fast, backend=backend)
    for slot, (A, B, s) in enumerate(make_adapters(6, 24, 40, [8, 1, 4, 8, 3, 2]), start=1):
        ref.set_slot(slot, A, B, s)
        fast.set_slot(slot, A, B, s)
    for trial in range(5):
        slots = torch.randint(0, 7, (37,))
        if trial == 3:
            slots.fill_(5)  # the whole batch on one adapter
        if trial == 4:
            slots.zero_()  # base only
        x = torch.randn(37, 24)
        ctx_ref.set_slots(slots)
        ctx_fast.set_slots(slots)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["segment", "gather"])
def test_fast_paths_equal_the_reference_on_batched_rows(backend):
    """[B, S] inputs: one slot per row (the engine's case: gathered per row) and mixed rows."""
    torch.manual_seed(2)
    linear = nn.Linear(24, 40)
    ctx_ref, ctx_fast = LoRAContext(), LoRAContext()
    ref = BatchedLoRALinear(linear, max_slots=5, max_rank=8, context=ctx_ref, backend="loop")
    fast = BatchedLoRALinear(linear, max_slots=5, max_rank=8, context=ctx_fast, backend=backend)
    for slot, (A, B, s) in enumerate(make_adapters(5, 24, 40, [8, 1, 4, 8, 3]), start=1):
        ref.set_slot(slot, A, B, s)
        fast.set_slot(slot, A, B, s)
    rows = torch.tensor([3, 0, 5, 3, 1, 2, 4])
    for slots in (rows[:, None].expand(-1, 9), torch.randint(0, 6, (7, 9))):
        x = torch.randn(7, 9, 24)
        ctx_ref.set_slots(slots)
        ctx_fast.set_slots(slots)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    assert ctx_fast.row_slots is None  # the mixed rows took the per-token path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_16_bit_tables_compute_what_their_rounded_values_do(backend, dtype):
    """Slot tables narrower than the layer (``--lora-dtype``): adapters are rounded to the
    table's dtype once, when the slot is filled, and every path computes in the input's dtype,
    so the layer equals a float32 one holding the rounded values (one-slot, per-row and
    per-token routing, and a mixture)."""
    torch.manual_seed(3)
    linear = nn.Linear(24, 40)
    ctx_ref, ctx = LoRAContext(), LoRAContext()
    ref = BatchedLoRALinear(linear, max_slots=4, max_rank=8, context=ctx_ref, backend="loop")
    narrow = BatchedLoRALinear(linear, 4, 8, ctx, backend=backend, dtype=dtype)
    assert narrow.A.dtype == narrow.B.dtype == dtype and narrow.linear.weight.dtype == torch.float32
    for slot, (A, B, s) in enumerate(make_adapters(4, 24, 40, [8, 3, 4, 8]), start=1):
        narrow.set_slot(slot, A, B, s)
        ref.set_slot(slot, A.to(dtype).float(), (B * s).to(dtype).float(), 1.0)
    x = torch.randn(5, 3, 24)
    routings = [
        ([2, 2, 2, 2, 2], 3),  # one adapter
        ([1, 0, 3, 4, 1], 3),  # a slot per row
        ([1, 0, 3, 4, ((2, 0.5), (4, -1.0))], 3),  # with a mixture
        ([4, 1, 2, 3, 0], 1),  # decode rows
    ]
    for rows, seq_len in routings:
        ctx_ref.slot_rank = ctx.slot_rank = {1: 8, 2: 3, 3: 4, 4: 8}
        ctx_ref.set_rows(rows, seq_len)
        ctx.set_rows(rows, seq_len)
        xs = x[:, :seq_len]
        torch.testing.assert_close(narrow(xs), ref(xs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="triton LoRA backend keeps the slot tables"):
        BatchedLoRALinear(linear, 4, 8, LoRAContext(), backend="triton", dtype=dtype)


def test_slots_can_be_cleared_and_refilled_and_slot_zero_is_protected():
    linear = nn.Linear(8, 8)
    ctx = LoRAContext()
    layer = BatchedLoRALinear(linear, max_slots=2, max_rank=4, context=ctx)
    A, B, s = make_adapters(1, 8, 8, [4])[0]
    layer.set_slot(2, A, B, s)
    x = torch.randn(3, 8)
    ctx.set_slots(torch.full((3,), 2))
    assert not torch.allclose(layer(x), linear(x))
    layer.clear_slot(2)
    torch.testing.assert_close(layer(x), linear(x))
    with pytest.raises(IndexError):
        layer.set_slot(0, A, B, s)
    with pytest.raises(ValueError, match="exceeds"):
        layer.set_slot(1, torch.randn(8, 5), torch.randn(5, 8), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_slot(1, torch.randn(9, 2), torch.randn(2, 8), 1.0)
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        BatchedLoRALinear(linear, 1, 1, ctx, backend="no-such-backend")


def test_replace_with_batched_lora_shares_one_context():
    model = Tiny()
    table = replace_linear_with_batched_lora(model, ["q_proj"], max_slots=3, max_rank=4)
    assert sorted(table.layers) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert all(layer.context is table.context for layer in table.layers.values())
    assert isinstance(model.layers[0].q_proj, BatchedLoRALinear)
    assert linear_shapes(model) == linear_shapes(Tiny())
    # filling a slot writes every layer; layers the adapter does not name are zeroed
    A, B, s = make_adapters(1, 8, 8, [4])[0]
    table.fill(1, {"layers.0.q_proj": (A, B, s)})
    assert table.layers["layers.0.q_proj"].A[1].abs().sum() > 0
    assert table.layers["layers.1.q_proj"].A[1].abs().sum() == 0
    table.fill(1, {"layers.1.q_proj": (A, B, s)})
    assert table.layers["layers.0.q_proj"].A[1].abs().sum() == 0
    with pytest.raises(ValueError, match="no LoRA-enabled layer"):
        table.fill(2, {"layers.0.v_proj": (A, B, s)})


def test_the_table_reads_only_the_ranks_in_use_not_the_zero_padding():
    """Slots are padded to ``max_rank``; a step computes with the largest rank it routes to,
    in every backend and path (one slot, per row, per token), also after a slot is refilled
    with a smaller rank."""
    torch.manual_seed(3)
    linear = nn.Linear(16, 16)
    tables = {}
    for backend in TORCH_BACKENDS:
        model = nn.Sequential()
        model.add_module("q_proj", nn.Linear(16, 16))
        model.q_proj.load_state_dict(linear.state_dict())
        table = replace_linear_with_batched_lora(
            model, ["q_proj"], max_slots=3, max_rank=16, backend=backend
        )
        tables[backend] = (model, table)
    adapters = make_adapters(3, 16, 16, [2, 5, 9])

    def fill(slot, adapter):
        A, B, s = adapter
        for _model, table in tables.values():
            table.fill(slot, {"q_proj": (A, B, s)})

    fill(1, adapters[0])
    ctx = tables["gather"][1].context
    x = torch.randn(4, 3, 16)
    routes = [
        torch.tensor([1, 1, 1, 1])[:, None].expand(-1, 3),  # one slot
        torch.tensor([1, 0, 2, 1])[:, None].expand(-1, 3),  # one slot per row
        torch.tensor([[1, 2, 0], [0, 0, 2], [1, 1, 1], [2, 0, 1]]),  # per token
    ]
    smaller = (adapters[1][0][:, :3], adapters[1][1][:3], 2.0)
    for second in (adapters[1], adapters[2], smaller):  # slot 2: rank 5, then 9, then 3
        fill(2, second)
        r2 = second[0].shape[1]
        assert ctx.slot_rank == {1: 2, 2: r2}
        for slots, rank in zip(routes, (2, r2, r2)):
            outs = {}
            for backend, (model, table) in tables.items():
                table.set_token_slots(slots)
                outs[backend] = model(x)
            assert ctx.rank == rank
            for backend in ("segment", "gather"):
                torch.testing.assert_close(outs[backend], outs["loop"], rtol=1e-5, atol=1e-5)
    tables["gather"][1].clear(2)
    assert ctx.slot_rank == {1: 2}
