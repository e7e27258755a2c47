"""Llama: Llama 2/3.x (incl. `llama3` rope scaling), SmolLM, TinyLlama, and Mistral with full
attention (a sliding window shorter than the context is refused). RMSNorm, RoPE, GQA, a gated
SiLU MLP, no biases; head_dim and tied or untied embeddings come from config.json. Module paths
(HF LlamaForCausalLM's):

    model.embed_tokens, model.norm, lm_head
    model.layers.{i}.input_layernorm, .self_attn.{q,k,v,o}_proj,
    model.layers.{i}.post_attention_layernorm, .mlp.{gate,up,down}_proj
"""

from __future__ import annotations

from ..config import ModelConfig, check_full_attention, llama_like, refuse_flags, require
from ..specs import ArchSpec, BlockLayout, ModuleNames

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # default LoRA targets of q/k/v/o families


def parse(d: dict, model_type: str) -> ModelConfig:
    check_full_attention(d, model_type, require(d, "max_position_embeddings"))
    refuse_flags(d, model_type, "attention_bias")
    return llama_like(d, "llama", model_type)


SPEC = ArchSpec(
    arch="llama",
    model_types=("llama", "mistral"),
    architectures=(("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral")),
    parse=parse,
    names=ModuleNames(),
    layout=BlockLayout(),
    lora_targets=ATTENTION,
    conv1d=False,
)
