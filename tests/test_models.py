"""Base models against transformers (the oracle), the KV cache against full recomputation, and the
loader's file handling. Tiny random fp32 checkpoints, every family (`FAMILIES`) at least once;
parity bound 1e-4 max abs diff on logits of magnitude ~1-10. Max abs diffs are printed (run with
-s). Observed with torch 2.13 CPU and transformers 5.24: full forward 0.0 (llama, qwen2, mistral;
same ops as HF) and 1.2e-6 (gpt2); cached prefill + one-token decode and the ragged two-row
batch vs full recomputation <= 2.1e-6.
"""

import json
from functools import partial

import pytest
import torch
from loraserve.adapters.lora import target_names
from loraserve.adapters.models import (
    FAMILIES,
    KVCache,
    ModelConfig,
    ModelLoadError,
    UnsupportedModel,
    build_model,
    load_model,
    model_fingerprint,
)
from safetensors.torch import load_file, save_file

from tests.checkpoints import (
    VOCAB,
    hf_model,
    make_gpt2,
    make_llama,
    make_mistral,
    make_phi3,
    make_qwen2,
    make_qwen3,
)

TOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so all three frequency bands occur
}


CASES = [
    pytest.param(partial(make_gpt2), id="gpt2"),
    pytest.param(
        partial(make_llama, head_dim=32, rope_parameters=LLAMA3_ROPE),
        id="llama-gqa-llama3-headdim-untied",
    ),
    pytest.param(
        partial(
            make_llama,
            tie_word_embeddings=True,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
        ),
        id="llama-mqa-linear-tied",
    ),
    pytest.param(partial(make_qwen2, tie_word_embeddings=True), id="qwen2-tied"),
    pytest.param(partial(make_qwen2), id="qwen2-untied"),
    pytest.param(partial(make_mistral), id="mistral"),
    pytest.param(partial(make_qwen3), id="qwen3-gqa-headdim-untied"),
    pytest.param(
        partial(
            make_qwen3,
            tie_word_embeddings=True,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        ),
        id="qwen3-mqa-linear-tied",
    ),
    pytest.param(partial(make_phi3), id="phi3-fused-untied"),
    pytest.param(
        partial(make_phi3, tie_word_embeddings=True, partial_rotary_factor=0.5),
        id="phi3-fused-partial-rotary-tied",
    ),
]


def test_every_family_has_a_parity_case():
    ids = " ".join(p.id for p in CASES)
    assert all(spec.arch in ids for spec in FAMILIES)


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """(transformers model, our loaded model) for one tiny checkpoint."""
    folder = request.param(tmp_path_factory.mktemp("parity"))
    return hf_model(folder), load_model(folder)


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    print(f"\n{name}: max abs diff {diff:.2e} (|logits| max {a.abs().max().item():.2f})")
    return diff


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair, request):
    hf, ours = pair
    ids = random_ids(2, 24)
    positions = torch.arange(24).expand(2, 24) + torch.tensor([[0], [37]])  # row 1 starts at 37
    ref = hf(ids, position_ids=positions).logits
    out = ours.model(ids, positions=positions)
    assert out.dtype == torch.float32 and out.shape == (2, 24, ours.config.vocab_size)
    assert report(request.node.name, ref, out) <= TOL
    last = ours.model(ids, positions=positions, logits_at=torch.tensor([23, 5]))
    torch.testing.assert_close(last, torch.stack([out[0, 23], out[1, 5]]), atol=1e-5, rtol=0)


def test_module_paths_are_the_transformers_paths(pair):
    """Same state-dict keys as the HF model (so PEFT keys map 1:1), and the family's default
    LoRA targets name real layers."""
    hf, ours = pair
    assert set(ours.model.state_dict()) == set(hf.state_dict())
    targets = target_names(ours.model, ours.config.spec.lora_targets)
    assert len(targets) == ours.config.num_layers * len(ours.config.spec.lora_targets)


def garbage_cache(config: ModelConfig, max_batch: int, max_seq: int) -> KVCache:
    """A cache full of noise: stale entries must never be read."""
    cache = KVCache(config, max_batch, max_seq)
    for t in cache.k + cache.v:
        t.normal_(0, 10)
    return cache


@torch.no_grad()
def test_cached_decode_matches_full_forward(pair, request):
    hf, ours = pair
    seq = random_ids(1, 16, seed=1)
    ref = hf(seq).logits[0]  # [16, V]: causal, so position t's logits are step t's
    cache, row = garbage_cache(ours.config, 3, 32), torch.tensor([2])
    steps = [ours.model(seq[:, :6], kv_cache=cache, cache_rows=row)[0]]  # prefill 6 tokens
    for t in range(6, 16):
        step = ours.model(seq[:, t : t + 1], torch.tensor([[t]]), kv_cache=cache, cache_rows=row)
        steps.append(step[0])
    assert report(request.node.name, ref, torch.cat(steps)) <= TOL


@torch.no_grad()
def test_ragged_batch_with_cache_rows(pair, request):
    """Prompts of 11 and 5 tokens in cache rows 3 and 0: one right-padded prefill, then decode
    steps at different positions. Row 1's padding writes junk at positions 5..10, which its own
    decode steps overwrite before reading them."""
    hf, ours = pair
    prompt_lens, rows, steps = [11, 5], torch.tensor([3, 0]), 5
    seqs = [random_ids(n + steps, seed=2 + i) for i, n in enumerate(prompt_lens)]
    refs = [hf(s[None]).logits[0] for s in seqs]  # [len, V] each, computed alone
    cache = garbage_cache(ours.config, 4, 32)
    prompt = torch.zeros(2, 11, dtype=torch.long)  # positions default to arange(11) in each row
    for i, n in enumerate(prompt_lens):
        prompt[i, :n] = seqs[i][:n]
    last = torch.tensor(prompt_lens) - 1
    out = ours.model(prompt, kv_cache=cache, cache_rows=rows, logits_at=last)  # [2, V]
    want = torch.stack([refs[0][10], refs[1][4]])
    diffs = [report(f"{request.node.name}[prefill]", want, out)]
    for i in range(steps):
        positions = torch.tensor([[n + i] for n in prompt_lens])  # [2, 1]
        ids = torch.stack([s[p] for s, p in zip(seqs, positions)])  # [2, 1]
        out = ours.model(ids, positions, kv_cache=cache, cache_rows=rows)[:, 0]
        want = torch.stack([r[p[0]] for r, p in zip(refs, positions)])
        diffs.append((want - out).abs().max().item())
    print(f"{request.node.name}[decode]: max abs diff {max(diffs[1:]):.2e}")
    assert max(diffs) <= TOL


def test_cache_bounds(tiny_gpt2):
    config = load_model(tiny_gpt2).config
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache(config, 1, config.max_position_embeddings + 1)  # learned positions end there
    cache = KVCache(config, 2, 8)
    # 8 positions + the scratch column of static decode steps
    assert cache.nbytes == 2 * config.num_layers * 2 * config.num_heads * 9 * config.head_dim * 4
    with pytest.raises(ValueError, match="position 8"):
        cache.step(torch.tensor([[8]]))


def test_sharded_checkpoint_loads(tmp_path):
    folder = make_llama(tmp_path, save_kwargs={"max_shard_size": "20KB"})
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert not (folder / "model.safetensors").exists()
    ids = random_ids(1, 12)
    with torch.no_grad():
        diff = report("sharded", hf_model(folder)(ids).logits, load_model(folder).model(ids))
    assert diff <= TOL


def test_gpt2_without_transformer_prefix(tmp_path):
    bare = make_gpt2(tmp_path, bare=True, name="bare")
    full = make_gpt2(tmp_path, name="full")
    keys = load_file(bare / "model.safetensors").keys()
    assert "wte.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    a, b = load_model(bare), load_model(full)
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(a.model(ids), b.model(ids))
        assert report("gpt2-bare", hf_model(bare)(ids).logits, a.model(ids)) <= TOL
    assert a.fingerprint == b.fingerprint


def test_tied_embeddings_share_storage(tmp_path):
    loaded = load_model(make_qwen2(tmp_path, tie_word_embeddings=True))
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_fingerprint_stable_across_dtypes_and_distinct_between_models(tmp_path):
    a = make_llama(tmp_path, name="a", seed=0)
    b = make_llama(tmp_path, name="b", seed=1)
    fp32, bf16 = load_model(a), load_model(a, dtype=torch.bfloat16)
    assert fp32.model.lm_head.weight.dtype == torch.float32
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert len(fp32.fingerprint) == 16 and int(fp32.fingerprint, 16) >= 0
    assert fp32.fingerprint == bf16.fingerprint == load_model(a, dtype="auto").fingerprint
    assert fp32.fingerprint != load_model(b).fingerprint
    tensors = load_file(a / "model.safetensors")
    assert model_fingerprint(fp32.config, tensors) == fp32.fingerprint


@torch.no_grad()
def test_bfloat16_load_and_cache(tmp_path):
    folder = make_llama(tmp_path, head_dim=32, rope_parameters=LLAMA3_ROPE)
    fp32, bf16 = load_model(folder).model, load_model(folder, dtype="bfloat16").model
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    seq = random_ids(1, 12)
    full = bf16(seq)
    assert full.dtype == torch.float32
    assert (full - fp32(seq)).abs().max() < 0.1 * fp32(seq).abs().max()
    cache = KVCache(bf16.config, 1, 16, dtype=torch.bfloat16)
    steps = [bf16(seq[:, :8], kv_cache=cache)[0]]
    steps += [bf16(seq[:, t : t + 1], torch.tensor([[t]]), kv_cache=cache)[0] for t in range(8, 12)]
    assert (torch.cat(steps) - full[0]).abs().max() < 0.05 * full.abs().max()


def test_auto_dtype_follows_config(tmp_path):
    folder = make_llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder, dtype="auto").model.lm_head.weight.dtype == torch.bfloat16
    assert load_model(folder).model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(folder, dtype="int8")


def test_build_model_random_and_cast():
    hf = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    hf |= dict(num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    config = ModelConfig.from_hf({"model_type": "llama", **hf})
    model = build_model(config).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # not rounded to bf16
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 50)


# -- config.json forms ---------------------------------------------------------------------------

LLAMA_V4 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def v5_form(d: dict) -> dict:
    """The same config as transformers v5 writes it: rope_parameters holds rope_theta; dtype."""
    d = dict(d)
    d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
    d["dtype"] = d.pop("torch_dtype")
    return d


def test_v4_and_v5_config_forms_parse_the_same():
    v4, v5 = ModelConfig.from_hf(LLAMA_V4), ModelConfig.from_hf(v5_form(LLAMA_V4))
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.rope_scaling["original_max_position_embeddings"] == 8192
    assert (v4.dtype, v4.eos_token_ids) == ("bfloat16", (128001, 128008, 128009))
    plain = {"rope_type": "default", "rope_theta": 1e6}
    default = ModelConfig.from_hf({**v5_form(LLAMA_V4), "rope_parameters": plain})
    assert default.rope_scaling is None and default.rope_theta == 1e6
    old = ModelConfig.from_hf({**LLAMA_V4, "rope_scaling": {"type": "linear", "factor": 4}})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_model_types():
    mistral = {**LLAMA_V4, "model_type": "mistral", "rope_scaling": None, "sliding_window": None}
    assert ModelConfig.from_hf(mistral).arch == "llama"
    qwen = {**mistral, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    assert ModelConfig.from_hf(qwen).qkv_bias and ModelConfig.from_hf(qwen).arch == "qwen2"
    with pytest.raises(UnsupportedModel, match="sliding_window=4096"):
        ModelConfig.from_hf({**mistral, "sliding_window": 4096})
    with pytest.raises(UnsupportedModel, match="'yarn'"):
        ModelConfig.from_hf({**LLAMA_V4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModel, match="'falcon'"):
        ModelConfig.from_hf({**LLAMA_V4, "model_type": "falcon"})
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_hf({k: v for k, v in LLAMA_V4.items() if k != "hidden_size"})


def test_unknown_model_type_is_refused_by_name_with_the_supported_list():
    supported = "gpt2, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(UnsupportedModel, match=f"'falcon'.*{supported}"):
        ModelConfig.from_hf({**LLAMA_V4, "model_type": "falcon"})
    with pytest.raises(UnsupportedModel, match="None"):
        ModelConfig.from_hf({k: v for k, v in LLAMA_V4.items() if k != "model_type"})
    bare = {k: v for k, v in LLAMA_V4.items() if k != "model_type"}
    mistral = {**bare, "architectures": ["MistralForCausalLM"], "rope_scaling": None}
    assert ModelConfig.from_hf(mistral).model_type == "mistral"
    with pytest.raises(UnsupportedModel, match="unknown arch 'falcon'"):
        ModelConfig.from_hf(LLAMA_V4).replace(arch="falcon")


# Shipped config.json files (Qwen/Qwen3-0.6B; microsoft/Phi-3-mini-4k-instruct, v4 form).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}


def test_qwen3_and_phi3_configs():
    qwen3 = ModelConfig.from_hf(QWEN3_0_6B)
    assert (qwen3.arch, qwen3.head_dim, qwen3.num_kv_heads) == ("qwen3", 128, 8)
    assert qwen3.tie_word_embeddings and not qwen3.qkv_bias and qwen3.spec.layout.qk_norm
    no_head_dim = {k: v for k, v in QWEN3_0_6B.items() if k != "head_dim"}
    assert ModelConfig.from_hf({**no_head_dim, "hidden_size": 512}).head_dim == 128  # HF default
    with pytest.raises(UnsupportedModel, match="attention_bias"):
        ModelConfig.from_hf({**QWEN3_0_6B, "attention_bias": True})
    with pytest.raises(UnsupportedModel, match="sliding_window=4096"):
        ModelConfig.from_hf({**QWEN3_0_6B, "use_sliding_window": True, "sliding_window": 4096})
    with pytest.raises(UnsupportedModel, match="sliding_window=2047"):
        ModelConfig.from_hf(PHI3_MINI_4K)
    phi3 = ModelConfig.from_hf({**PHI3_MINI_4K, "sliding_window": None})
    assert (phi3.arch, phi3.head_dim, phi3.rotary_dim, phi3.tie_word_embeddings) == (
        "phi3",
        96,
        96,
        False,
    )
    partial = {**PHI3_MINI_4K, "sliding_window": None, "partial_rotary_factor": 0.75}
    assert ModelConfig.from_hf(partial).rotary_dim == 72
    longrope = {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}
    with pytest.raises(UnsupportedModel, match="'longrope'"):
        ModelConfig.from_hf({**PHI3_MINI_4K, "sliding_window": None, "rope_scaling": longrope})
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor"):  # Llama ignores it
        ModelConfig.from_hf({**QWEN3_0_6B, "partial_rotary_factor": 0.5})


# -- file errors ---------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    folder = make_llama(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(folder)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    folder = make_llama(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ModelLoadError, match="pickle.*safetensors"):
        load_model(folder)


def test_missing_shard_is_named(tmp_path):
    folder = make_llama(tmp_path, save_kwargs={"max_shard_size": "20KB"})
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        load_model(folder)


def test_corrupt_and_mismatched_tensors(tmp_path):
    folder = make_llama(tmp_path)
    tensors = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_model(folder)
    del tensors["lm_head.weight"]  # untied: required
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match="mlp.*shape"):
        load_model(folder)


def test_unsupported_model_via_load(tmp_path):
    folder = make_mistral(tmp_path, sliding_window=16)
    with pytest.raises(UnsupportedModel, match="sliding_window"):
        load_model(folder)


def test_tokenizer_and_eos_loaded(tmp_path):
    folder = make_llama(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = load_model(folder)
    assert loaded.config.eos_token_ids == (2, 7)
    assert loaded.tokenizer.eos_token_ids == (2, 7)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat")) == "the cat"
    (folder / "tokenizer.json").write_text("{")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_model(folder)
    (folder / "tokenizer.json").unlink()
    assert load_model(folder).tokenizer is None
