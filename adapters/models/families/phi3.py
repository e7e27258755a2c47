"""Phi-3: Llama's block with fused projections, checkpoints and PEFT adapters alike:
`self_attn.qkv_proj` outputs [q; k; v] (H*D + 2*Hkv*D) and `mlp.gate_up_proj` outputs
[gate; up] (2 * intermediate_size). RoPE may rotate only the first partial_rotary_factor of each
head. Only plain RoPE: `longrope` (Phi-3 128k, Phi-3.5) is refused, and so is a sliding window
shorter than the context (Phi-3-mini-4k's 2047). Module paths:

    model.embed_tokens, model.norm, lm_head
    model.layers.{i}.input_layernorm, .self_attn.qkv_proj, .self_attn.o_proj,
    model.layers.{i}.post_attention_layernorm, .mlp.gate_up_proj, .mlp.down_proj
"""

from __future__ import annotations

from ..config import ModelConfig, check_full_attention, llama_like, read_rope, require
from ..specs import ArchSpec, BlockLayout, ModuleNames


def parse(d: dict, model_type: str) -> ModelConfig:
    max_pos = require(d, "max_position_embeddings")
    check_full_attention(d, model_type, max_pos)
    rope = read_rope(d, max_pos, types=("default",), partial_rotary=True)
    return llama_like(d, "phi3", model_type, rope=rope)


SPEC = ArchSpec(
    arch="phi3",
    model_types=("phi3",),
    architectures=(("Phi3ForCausalLM", "phi3"),),
    parse=parse,
    names=ModuleNames(qkv=("qkv_proj",), up=("gate_up_proj",)),
    layout=BlockLayout(),
    lora_targets=("qkv_proj", "o_proj"),
    conv1d=False,
)
