"""Qwen3 (dense): Llama's block with an RMSNorm over head_dim on every q and k head before RoPE
(`self_attn.q_norm`, `self_attn.k_norm`), no q/k/v bias, head_dim from config.json (128 when it
is absent, as transformers' default), GQA. Module paths are Llama's plus the two norms."""

from __future__ import annotations

from ..config import ModelConfig, check_full_attention, llama_like, refuse_flags, require
from ..specs import ArchSpec, BlockLayout, ModuleNames
from .llama import ATTENTION


def parse(d: dict, model_type: str) -> ModelConfig:
    max_pos = require(d, "max_position_embeddings")
    check_full_attention(d, model_type, max_pos, switch="use_sliding_window")
    refuse_flags(d, model_type, "attention_bias")  # would put a bias on o_proj too
    return llama_like(d, "qwen3", model_type, head_dim=d.get("head_dim") or 128)


SPEC = ArchSpec(
    arch="qwen3",
    model_types=("qwen3",),
    architectures=(("Qwen3ForCausalLM", "qwen3"),),
    parse=parse,
    names=ModuleNames(),
    layout=BlockLayout(qk_norm=True),
    lora_targets=ATTENTION,
    conv1d=False,
)
