"""PEFT parity: adapters made by PEFT run on OUR models exactly as ``PeftModel`` runs them.

For each case a tiny random HF checkpoint is saved, PEFT wraps the transformers model with a
random LoRA (``init_lora_weights=False``, so B is not zero and a wrong scale or transpose shows)
and ``save_pretrained``s it; we ``read_adapter`` the untouched folder, ``apply_adapter`` it to
``load_model`` of the same checkpoint and compare fp32 logits. The way back is checked too: a
folder from ``write_peft`` loads in ``PeftModel.from_pretrained``.

Every family is covered, Phi-3 with PEFT's own targets for it: the fused ``qkv_proj`` and
``gate_up_proj`` (one LoRA over the whole fused output) plus ``o_proj`` and ``down_proj``. The
last test serves Qwen3 and Phi-3 adapters through ``loraserve.server.runtime.Runtime``, whose
batched slot
tables replace every Linear, fused ones included, and checks greedy tokens against the
trainer-side reference decode.
"""

import dataclasses
from functools import partial

import pytest
import torch
from loraserve.adapters.format import (
    FingerprintMismatch,
    apply_adapter,
    build_adapter,
    read_adapter,
    validate_adapter,
    write_adapter,
    write_peft,
)
from loraserve.adapters.lora import linear_shapes
from loraserve.adapters.models import load_model
from loraserve.server.engine import GenerationRequest
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams
from peft import LoraConfig, PeftModel, get_peft_model

from tests.checkpoints import (
    VOCAB,
    hf_model,
    make_gpt2,
    make_llama,
    make_phi3,
    make_qwen2,
    make_qwen3,
)
from tests.serving import TARGETS, random_adapter, reference_greedy, serving_config

ATOL = 1e-4
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # PEFT's for Phi-3

CASES = {
    "gpt2-c_attn": (make_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    "gpt2-all": (
        make_gpt2,
        {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "r": 4},
    ),
    "llama-all-linear": (make_llama, {"target_modules": "all-linear", "r": 8, "lora_alpha": 16}),
    "llama-rslora": (
        make_llama,
        {"target_modules": ["q_proj", "v_proj"], "r": 16, "lora_alpha": 8, "use_rslora": True},
    ),
    "llama-patterns": (
        make_llama,
        {
            "target_modules": "all-linear",
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 4},
            "alpha_pattern": {"v_proj": 32, "model.layers.0.mlp.up_proj": 3},
        },
    ),
    "qwen2-regex-rslora": (
        make_qwen2,
        {"target_modules": r".*\.(q|k|v)_proj", "r": 4, "lora_alpha": 4, "use_rslora": True},
    ),
    "qwen3-all-linear": (make_qwen3, {"target_modules": "all-linear", "r": 8, "lora_alpha": 16}),
    "qwen3-patterns-tied": (
        partial(make_qwen3, tie_word_embeddings=True),
        {
            "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"k_proj": 2},
        },
    ),
    "phi3-fused": (make_phi3, {"target_modules": PHI3_TARGETS, "r": 8, "lora_alpha": 16}),
    "phi3-fused-partial-rotary-rslora-tied": (
        partial(make_phi3, tie_word_embeddings=True, partial_rotary_factor=0.5),
        {"target_modules": PHI3_TARGETS, "r": 4, "lora_alpha": 8, "use_rslora": True},
    ),
}


def peft_adapter(tmp_path, case: str):
    """(checkpoint folder, saved PEFT adapter folder, the PeftModel that saved it)."""
    make, lora_kwargs = CASES[case]
    checkpoint = make(tmp_path)
    torch.manual_seed(1)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(hf_model(checkpoint), config).eval()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    return checkpoint, folder, peft_model


def logits(model, ids):
    with torch.no_grad():
        if isinstance(model, PeftModel):
            return model(input_ids=ids).logits.float()
        return model(ids)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_matches_peft_model(tmp_path, case, ids):
    checkpoint, folder, peft_model = peft_adapter(tmp_path, case)
    adapter = read_adapter(folder)
    loaded = load_model(checkpoint)
    validate_adapter(adapter, linear_shapes(loaded.model), loaded.fingerprint, max_rank=16)
    base = logits(loaded.model, ids)
    ours = logits(apply_adapter(loaded.model, adapter), ids)
    theirs = logits(peft_model, ids)

    diff = (ours - theirs).abs().max().item()
    effect = (theirs - base).abs().max().item()
    print(f"\n{case}: max|ours - peft| = {diff:.2e}, max|peft - base| = {effect:.2e}")
    assert effect > 0.1, "the adapter barely changes the logits: the comparison would prove little"
    assert diff <= ATOL


@pytest.mark.parametrize("case", ["gpt2-c_attn", "llama-patterns", "phi3-fused"])
def test_written_peft_folder_loads_in_peft(tmp_path, case, ids):
    checkpoint, folder, peft_model = peft_adapter(tmp_path, case)
    adapter = read_adapter(folder)
    out = write_peft(tmp_path / "ours", adapter)
    reloaded = PeftModel.from_pretrained(hf_model(checkpoint), out).eval()
    ours = logits(apply_adapter(load_model(checkpoint).model, read_adapter(out)), ids)

    diff = (logits(reloaded, ids) - logits(peft_model, ids)).abs().max().item()
    print(f"\n{case}: write_peft -> PeftModel.from_pretrained vs original PeftModel = {diff:.2e}")
    assert diff == 0  # same tensors, same scales: bit-identical
    assert (ours - logits(reloaded, ids)).abs().max().item() <= ATOL


def test_single_file_round_trip_runs_identically(tmp_path, ids):
    checkpoint, folder, _ = peft_adapter(tmp_path, "llama-patterns")
    loaded = load_model(checkpoint)
    from_peft = read_adapter(folder)
    config = dataclasses.replace(from_peft.config, base_fingerprint=loaded.fingerprint)
    weights = {name: (w.A, w.B) for name, w in from_peft.modules.items()}
    adapter = build_adapter("task", config, weights)
    back = read_adapter(write_adapter(tmp_path / "task.safetensors", adapter))
    assert back.version == adapter.version

    validate_adapter(back, linear_shapes(loaded.model), loaded.fingerprint)
    expected = logits(apply_adapter(load_model(checkpoint).model, from_peft), ids)
    got = logits(apply_adapter(loaded.model, back), ids)
    assert torch.equal(got, expected)

    other_base = load_model(make_llama(tmp_path, name="other", seed=1))
    with pytest.raises(FingerprintMismatch, match=loaded.fingerprint):
        validate_adapter(back, linear_shapes(other_base.model), other_base.fingerprint)


SERVED = {
    "qwen3": (make_qwen3, TARGETS),
    "phi3": (make_phi3, tuple(PHI3_TARGETS)),
}
PROMPTS = [[5, 17, 42], [7, 7, 100, 250, 3, 9], [200]]
NEW = 8


@pytest.mark.parametrize("family", list(SERVED))
def test_server_batched_lora_matches_the_reference_decode(tmp_path, family):
    make, targets = SERVED[family]
    model = make(tmp_path)
    adapter = random_adapter(model, "task", seed=0, targets=targets)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    write_adapter(adapters / "task.safetensors", adapter)
    jobs = [(name, p) for name in ("task", "") for p in range(len(PROMPTS))]
    want = [reference_greedy(model, adapter if name else None, PROMPTS[p], NEW) for name, p in jobs]
    assert want[: len(PROMPTS)] != want[len(PROMPTS) :], "the adapter must change the output"

    runtime = Runtime(serving_config(model, adapters)).start()
    try:
        fused = {"phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj")}.get(family, ())
        assert all(f"model.layers.0.{name}" in runtime.table.layers for name in fused)
        handles = [
            runtime.engine.submit(
                GenerationRequest(tuple(PROMPTS[p]), SamplingParams(max_new_tokens=NEW), name)
            )
            for name, p in jobs
        ]  # one mixed batch: adapter and base rows together
        got = [h.result().token_ids for h in handles]
    finally:
        runtime.stop()
    assert got == want
