"""GPT-2: learned absolute positions, LayerNorm, fused c_attn, a plain GELU MLP, biases on every
projection, Conv1D weights. Module paths (HF GPT2LMHeadModel's):

    transformer.wte, transformer.wpe, transformer.ln_f, lm_head (tied to wte unless untied)
    transformer.h.{i}.ln_1, .attn.c_attn, .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj

c_attn packs q, k, v along its output, in that order. Checkpoints store Conv1D [in, out] weights
(transposed on load) and may come from the bare GPT2Model (no `transformer.` prefix). Position
embeddings are learned, so every position must be < max_position_embeddings.
"""

from __future__ import annotations

from ..config import ModelConfig, UnsupportedModel, read_dtype, read_eos_ids, require
from ..specs import ArchSpec, BlockLayout, ModuleNames


def parse(d: dict, model_type: str) -> ModelConfig:
    if d.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModel("gpt2 with scale_attn_by_inverse_layer_idx=true is not supported")
    if d.get("scale_attn_weights") is False:
        raise UnsupportedModel("gpt2 with scale_attn_weights=false is not supported")
    hidden = require(d, "n_embd", "hidden_size")
    heads = require(d, "n_head", "num_attention_heads")
    return ModelConfig(
        arch="gpt2",
        vocab_size=require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(d, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=d.get("n_inner") or 4 * hidden,
        max_position_embeddings=require(d, "n_positions", "n_ctx"),
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True,
        activation=d.get("activation_function", "gelu_new"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=read_eos_ids(d.get("eos_token_id")),
        dtype=read_dtype(d),
        model_type=model_type,
    )


SPEC = ArchSpec(
    arch="gpt2",
    model_types=("gpt2",),
    architectures=(("GPT2LMHeadModel", "gpt2"), ("GPT2Model", "gpt2")),
    parse=parse,
    names=ModuleNames(
        root="transformer",
        embed="wte",
        pos_embed="wpe",
        layers="h",
        final_norm="ln_f",
        attn_norm="ln_1",
        attn="attn",
        mlp_norm="ln_2",
        mlp="mlp",
        qkv=("c_attn",),
        o="c_proj",
        up=("c_fc",),
        down="c_proj",
    ),
    layout=BlockLayout(norm="layernorm", positions="learned", mlp="plain", bias=True),
    # "c_proj" names both the attention output and the MLP output; "attn.c_proj" picks the
    # attention one only (PEFT matches it as a name suffix too).
    lora_targets=("c_attn", "attn.c_proj"),
    conv1d=True,
    ignored_suffixes=(".attn.bias", ".attn.masked_bias"),  # old files' causal-mask buffers
)
