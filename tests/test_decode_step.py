"""The static decode step (``loraserve.adapters.models.decode``) against the eager one.

Greedy tokens must be identical, token for token, whatever the mode: the padded eager step
(``static``), inductor on CPU, CUDA graphs on a GPU. The workloads go through every batch bucket
with rows joining and leaving (staggered lengths, more requests than KV rows, so the engine
moves sequences down to keep rows 0..n-1), mixed adapters of two ranks and base rows (slot 0).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from loraserve.adapters.format import write_adapter
from loraserve.adapters.kernels import cpu as cpu_kernels
from loraserve.adapters.lora import replace_linear_with_batched_lora
from loraserve.adapters.models import KVCache, load_model
from loraserve.adapters.models.decode import (
    DecodeStep,
    batch_buckets,
    compile_blocks,
    group_size,
    rank_buckets,
)
from loraserve.adapters.models.packed import (
    PackedLinear,
    can_pack,
    fuse_projections,
    pack_linears,
)
from loraserve.server.engine import GenerationRequest, MixtureMember
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams

from tests.checkpoints import make_gpt2, make_llama, make_phi3, make_qwen2
from tests.serving import random_adapter, serving_config
from tests.test_sync_free import forbid_host_sync

CUDA = torch.cuda.is_available()
MODES = ["static", "inductor"] + (["cuda-graphs"] if CUDA else [])


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert rank_buckets(64) == [0, 8, 16, 32, 64]
    assert rank_buckets(12) == [0, 8, 12]
    assert rank_buckets(4) == [0, 4]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama and adapters of rank 4 and 8 (two rank buckets with --max-lora-rank 8)."""
    model = make_llama(tmp_path_factory.mktemp("model"))
    folder = tmp_path_factory.mktemp("adapters")
    for i in range(4):
        adapter = random_adapter(model, f"a{i}", seed=60 + i, rank=4 if i % 2 else 8)
        write_adapter(folder / f"a{i}.safetensors", adapter)
    return model, folder


def workload(adapters: list, n: int = 13) -> list[GenerationRequest]:
    """``n`` greedy requests, lengths staggered so the batch shrinks through every bucket; an
    adapter is a name or a mixture (a tuple of ``MixtureMember``)."""
    return [
        GenerationRequest(
            tuple((7 * i + 3 * j + 5) % 60 + 3 for j in range(2 + i % 5)),
            SamplingParams(max_new_tokens=2 + (5 * i) % 14),
            **_target(adapters[i % len(adapters)]),
        )
        for i in range(n)
    ]


def _target(adapter) -> dict:
    return {"adapter": adapter} if isinstance(adapter, str) else {"mixture": adapter}


def serve(config, requests) -> tuple[list[list[int]], set[int]]:
    """Greedy tokens of ``requests`` (all submitted at once) and the decode batch sizes seen.
    Once the server is up, a compilation is an error: warm-up must have compiled everything
    (every batch bucket, rank bucket and KV length) before it said SERVING."""
    import torch._dynamo.config as dynamo_config

    runtime = Runtime(config).start()
    sizes: set[int] = set()
    try:
        decoder = runtime.engine.decoder
        if decoder is not None and decoder.device.type == "cpu":
            # the static step on CPU computes its attention and LoRA rows with the native ops
            # (where they build), and the sampler its greedy tokens
            native = cpu_kernels.available() and runtime.dtype == torch.float32
            attend = runtime.kv_cache.decode_kernel
            assert (attend is cpu_kernels.decode_attention) == native
            assert (runtime.engine.row_max is cpu_kernels.row_max) == native
            if runtime.table.num_slots:
                assert (runtime.table.context.row_op is not None) == native
        if decoder is not None and decoder.mode == "inductor" and can_pack("cpu", torch.float32):
            # its Linears are packed, through the native op where the library builds
            packed = [m for m in runtime.loaded.model.modules() if isinstance(m, PackedLinear)]
            assert packed and all(m.native == cpu_kernels.available() for m in packed)
            # and the projections that share an input are one GEMM (GPT-2's are in the file)
            model = runtime.loaded.model
            assert all(m.fused is not None for m in model.modules() if getattr(m, "fusable", ()))
        if decoder is not None:
            inner = decoder.__call__

            def spy(tokens, positions, slots):
                sizes.add(len(tokens))
                return inner(tokens, positions, slots)

            runtime.engine.decoder = spy
        with dynamo_config.patch(error_on_recompile=True):
            handles = [runtime.engine.submit(r) for r in requests]
            return [h.result().token_ids for h in handles], sizes
    finally:
        runtime.stop()


@pytest.mark.parametrize("mode", MODES)
def test_static_step_equals_eager_for_every_bucket(llama, mode):
    model, folder = llama
    requests = workload(["a0", "", "a1", "a2", "", "a3"])
    config = serving_config(model, folder, max_batch_size=8, max_active_adapters=4)
    eager, _ = serve(replace(config, compile="off"), requests)
    static, sizes = serve(replace(config, compile=mode), requests)
    assert static == eager
    buckets = {next(b for b in batch_buckets(8) if b >= n) for n in sizes}
    assert buckets == set(batch_buckets(8))  # every bucket ran


@pytest.mark.parametrize("mode", MODES)
def test_static_step_with_mixtures_equals_eager(llama, mode):
    """Mixtures (two and three members, a negative weight) batched with plain and base rows:
    the static step at its mixture width computes what the eager step does, compiled at
    warm-up (no recompilation once serving)."""
    model, folder = llama
    two = (MixtureMember("a1", 0.6), MixtureMember("a2", 0.4))
    three = (MixtureMember("a0", 1.0), MixtureMember("a3", -0.5), MixtureMember("a1", 0.5))
    requests = workload(["a0", two, "", three, "a2"])
    config = serving_config(model, folder, max_batch_size=8, max_active_adapters=4)
    eager, _ = serve(replace(config, compile="off"), requests)
    static, _ = serve(replace(config, compile=mode), requests)
    assert static == eager
    plain, _ = serve(replace(config, compile="off"), workload(["a0", "a1", "", "a2", "a2"]))
    assert eager != plain  # the mixtures changed their rows


def test_block_groups(llama):
    """Compiled groups of blocks are all as long (one compilation serves them), as long as
    MAX_GROUP allows, and together run every layer once, in order."""
    sizes = (30, 6, 4, 2, 1, 7, 13, 32, 24, 22)
    assert [group_size(n) for n in sizes] == [6, 6, 4, 2, 1, 7, 1, 8, 8, 2]
    model = load_model(llama[0]).model
    layers = list(model.body[model.spec.names.layers])
    groups = compile_blocks(model)
    size = group_size(len(layers))
    assert [n for _, n in groups] == [size] * (len(layers) // size)
    assert [block for fn, _ in groups for block in fn.args[0]] == layers


def test_bfloat16_slot_tables(llama):
    """``--lora-dtype bfloat16`` on a float32 server: the tables hold bfloat16 (half the bytes,
    and the memory plan counts half), the compiled step equals the eager step on them, with
    plain rows, a mixture and base rows batched together, and the adapters still change their
    rows."""
    model, folder = llama
    two = (MixtureMember("a1", 0.6), MixtureMember("a2", 0.4))
    requests = workload(["a0", two, "", "a3"], n=9)
    config = serving_config(model, folder, max_batch_size=8, max_active_adapters=4)
    narrow = replace(config, lora_dtype="bfloat16")
    runtime = Runtime(replace(narrow, compile="off"))
    layers = list(runtime.table.layers.values())
    assert all(m.A.dtype == m.B.dtype == torch.bfloat16 for m in layers)
    assert runtime.memory_plan.slot_tables == sum(m.A.nbytes + m.B.nbytes for m in layers)
    eager, _ = serve(replace(narrow, compile="off"), requests)
    static, _ = serve(replace(narrow, compile="inductor"), requests)
    assert static == eager
    base, _ = serve(replace(narrow, compile="off"), workload([""], n=9))
    assert eager != base
    with pytest.raises(ValueError, match="--lora-dtype bfloat16 needs --lora-backend gather"):
        Runtime(replace(narrow, lora_backend="triton"))


@pytest.mark.parametrize("mode", MODES)
def test_static_step_on_gpt2_and_the_demo(tmp_path, mode):
    """Learned positions (GPT-2: padded rows at position 0) and the demo with its adapters."""
    from loraserve.adapters.demo_paths import demo_adapters_dir

    gpt2 = make_gpt2(tmp_path)
    (tmp_path / "none").mkdir()
    cases = [
        (serving_config(gpt2, tmp_path / "none", max_batch_size=4), [""]),
        (
            serving_config("demo", demo_adapters_dir(), max_batch_size=4, max_lora_rank=16),
            ["upper", "", "reverse", "rot13", "sort"],
        ),
    ]
    for config, adapters in cases:
        requests = workload(adapters, n=7)
        eager, _ = serve(replace(config, compile="off"), requests)
        static, sizes = serve(replace(config, compile=mode), requests)
        assert sizes  # the static step ran
        assert static == eager, config.model


def test_padded_rows_write_only_the_scratch_column(llama):
    """A step with 3 real rows in bucket 4: the padded row's KV row stays zero at every real
    position, and the real rows' logits equal the eager forward's."""
    model_dir, _ = llama
    loaded = load_model(model_dir)
    cache = KVCache(loaded.config, 4, 16)
    step = DecodeStep(loaded.model, cache, None, max_batch=4, mode="static")
    eager_cache = KVCache(loaded.config, 4, 16)
    tokens, positions = [5, 9, 11], [0, 0, 0]
    with torch.inference_mode():
        logits = step(tokens, positions, [0, 0, 0])
        want = loaded.model(
            torch.tensor(tokens)[:, None],
            torch.tensor(positions)[:, None],
            kv_cache=eager_cache,
            logits_at=torch.zeros(3, dtype=torch.long),
            kv_len=1,
        )
    assert torch.allclose(logits, want, atol=1e-5, rtol=1e-5)  # GEMMs of 4 rows vs 3
    for t in (*cache.k, *cache.v):
        assert not t[3, :, : cache.max_seq].any()  # padded row: nothing at real positions
        assert t[3, :, cache.scratch].any()  # ... its k/v went to the scratch column
        assert t[:3, :, 0].any()


def test_the_static_step_never_reads_the_device(llama):
    """Routing, buffers and the forward of a static step, under the host-sync guard."""
    model_dir, folder = llama
    runtime = Runtime(serving_config(model_dir, folder, max_batch_size=4, compile="static"))
    try:
        runtime.start()
        free = [runtime.engine.generate(r).token_ids for r in workload(["a0", "", "a1"], n=3)]
        decoder = runtime.engine.decoder
        inner = decoder._forward
        calls = []

        def guarded(*args):
            calls.append(args)
            with forbid_host_sync():
                return inner(*args)

        decoder._forward = guarded
        handles = [runtime.engine.submit(r) for r in workload(["a0", "", "a1"], n=3)]
        assert [h.result().token_ids for h in handles] == free
        assert len(calls) >= 5
    finally:
        runtime.stop()


def test_move_row_keeps_what_was_written_and_clears_the_source(llama):
    model_dir, _ = llama
    cache = KVCache(load_model(model_dir).config, 3, 8)
    for t in (*cache.k, *cache.v):
        t[2, :, :5].normal_()
    before = [t[2, :, :5].clone() for t in cache.k]
    cache.move_row(2, 0, 5)
    assert all(torch.equal(t[0, :, :5], b) for t, b in zip(cache.k, before))
    assert all(not t[2].any() for t in (*cache.k, *cache.v))


@pytest.mark.parametrize("native", [False, True], ids=["python_op", "native_op"])
def test_packed_linears_compute_what_the_dense_ones_do(llama, native):
    if not can_pack("cpu", torch.float32):  # the stock CPU wheel has oneDNN: CI must too
        if os.environ.get("CI") == "true":
            pytest.fail("this torch build has no oneDNN: the compiled CPU step cannot pack")
        pytest.skip("this torch build has no oneDNN (packed linears need it)")
    if native and not cpu_kernels.available():
        if os.environ.get("CI") == "true":
            pytest.fail("the CPU library could not be built (see the log)")
        pytest.skip("no C++ compiler to build the CPU library's packed op")
    model_dir, _ = llama
    dense = load_model(model_dir).model
    packed = load_model(model_dir).model
    n = sum(isinstance(m, torch.nn.Linear) for m in dense.modules())
    assert pack_linears(packed, native) == n
    assert all(type(m) is not torch.nn.Linear for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear) and packed.lm_head.native == native
    assert packed.state_dict().keys() == dense.state_dict().keys()  # same checkpoint names
    ids = torch.randint(0, 100, (3, 7))
    with torch.inference_mode():
        assert torch.allclose(packed(ids), dense(ids), atol=1e-5, rtol=1e-4)
        compiled = torch.compile(packed.lm_head, dynamic=True)
        x = torch.randn(5, packed.lm_head.in_features)
        assert torch.allclose(compiled(x), dense.lm_head(x), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # a weight written after packing is packed again, never stale
        packed.lm_head.weight.mul_(2)
        assert torch.allclose(packed.lm_head(x), x @ packed.lm_head.weight.T, atol=1e-4)


@pytest.mark.parametrize("make", [make_llama, make_qwen2], ids=["llama", "qwen2_qkv_bias"])
@pytest.mark.parametrize("backend", ["gather", "segment"])
def test_fused_projections_compute_what_the_separate_ones_do(tmp_path, make, backend):
    """q/k/v and gate/up as one GEMM each, with LoRA on some of them (q, v, gate: each
    wrapper's delta lands on its own slice) and plain Linears beside them: the logits of the
    separate model, for rows on different adapters, one adapter, and the base; the separate
    weights become views of the fused one (no second copy)."""
    folder = make(tmp_path)
    models, tables = [], []
    for _ in range(2):
        model = load_model(folder).model
        table = replace_linear_with_batched_lora(
            model, ["q_proj", "v_proj", "gate_proj"], 2, 8, backend=backend
        )
        g = torch.Generator().manual_seed(5)
        for slot in (1, 2):
            weights = {}
            for name, layer in table.layers.items():
                n_in, n_out = layer.A.shape[2], layer.B.shape[2]
                A, B = torch.randn(n_in, 8, generator=g), torch.randn(8, n_out, generator=g)
                weights[name] = (A * 0.1, B * 0.1, 0.5)
            table.fill(slot, weights)
        models.append(model)
        tables.append(table)
    separate, fused = models
    layers = len(fused.model.layers)
    assert fuse_projections(fused) == 2 * layers  # attention and MLP of every layer
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.fused.weight.shape[0] == sum(attn.widths)
    assert attn.q_proj.linear.weight.data_ptr() == attn.fused.weight.data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.fused.weight.data_ptr()
    assert (attn.fused.bias is not None) == (attn.k_proj.bias is not None)
    ids = torch.randint(0, 100, (3, 6))
    for routes in ([1, 2, 0], [2, 2, 2], [0, 0, 0]):
        with torch.inference_mode():
            want, got = [
                (table.set_row_slots(routes, 6, "cpu"), model(ids))[1]
                for table, model in zip(tables, models)
            ]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert fuse_projections(fused) == 0  # once


def test_checkpoint_fused_projections_stay_as_they_are(tmp_path):
    model = load_model(make_phi3(tmp_path)).model  # qkv_proj and gate_up_proj in the file
    assert fuse_projections(model) == 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["static", "cuda-graphs"])
def test_a_cuda_step_never_syncs(llama, mode):
    """torch's sync debug mode turns any host sync in the step (a read-back, a pageable copy)
    into an error."""
    model_dir, folder = llama
    loaded = load_model(model_dir, "cuda")
    cache = KVCache(loaded.config, 4, 16, "cuda")
    step = DecodeStep(loaded.model, cache, None, max_batch=4, mode=mode, device="cuda")
    step.warm_up()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            logits = step([5, 9, 11], [0, 0, 0], [0, 0, 0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (3, loaded.config.vocab_size)


def test_compile_auto_picks_a_mode_that_can_run(monkeypatch):
    from loraserve.server import runtime
    from loraserve.server.config import ServerConfig

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.decode_mode(ServerConfig(compile="off"), cpu) is None
    assert runtime.decode_mode(ServerConfig(), cpu) == "inductor"
    assert runtime.decode_mode(ServerConfig(lora_backend="segment"), cpu) is None
    monkeypatch.delenv("LORASERVE_CUDA_GRAPHS", raising=False)
    assert runtime.decode_mode(ServerConfig(), cuda) is None  # until it has run on a GPU
    monkeypatch.setenv("LORASERVE_CUDA_GRAPHS", "1")
    assert runtime.decode_mode(ServerConfig(), cuda) == "cuda-graphs"
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)  # no C++ compiler
    assert runtime.decode_mode(ServerConfig(), cpu) is None
    assert runtime.decode_mode(ServerConfig(compile="static"), cpu) == "static"
    with pytest.raises(ValueError, match="needs --lora-backend gather or triton"):
        runtime.decode_mode(ServerConfig(compile="inductor", lora_backend="loop"), cpu)


def test_a_failed_warm_up_falls_back_to_the_eager_step(llama, monkeypatch, caplog):
    """--compile auto: a compiler that fails at start-up costs speed, never the server."""
    model_dir, folder = llama

    def broken(self):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(DecodeStep, "warm_up", broken)
    runtime = Runtime(serving_config(model_dir, folder, compile="auto")).start()
    try:
        assert runtime.decoder is None and runtime.engine.decoder is None
        assert "failed to warm up; using the eager step" in caplog.text
        request = GenerationRequest((5, 6, 7), SamplingParams(max_new_tokens=3), adapter="a0")
        assert runtime.engine.generate(request).completion_tokens == 3
    finally:
        runtime.stop()
    with pytest.raises(RuntimeError, match="no working C"):  # asked for by name: it fails
        Runtime(serving_config(model_dir, folder, compile="static"))
