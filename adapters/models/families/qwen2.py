"""Qwen2 / Qwen2.5: Llama's block plus biases on q, k and v (none on o_proj). Same module paths
as Llama. Its configs carry a sliding window that only applies with `use_sliding_window`."""

from __future__ import annotations

from ..config import ModelConfig, check_full_attention, llama_like, require
from ..specs import ArchSpec, BlockLayout, ModuleNames
from .llama import ATTENTION


def parse(d: dict, model_type: str) -> ModelConfig:
    max_pos = require(d, "max_position_embeddings")
    check_full_attention(d, model_type, max_pos, switch="use_sliding_window")
    return llama_like(d, "qwen2", model_type, qkv_bias=True)  # always, whatever the config says


SPEC = ArchSpec(
    arch="qwen2",
    model_types=("qwen2",),
    architectures=(("Qwen2ForCausalLM", "qwen2"),),
    parse=parse,
    names=ModuleNames(),
    layout=BlockLayout(),
    lora_targets=ATTENTION,
    conv1d=False,
)
