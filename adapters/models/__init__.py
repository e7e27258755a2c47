"""Base causal LMs in plain PyTorch (no transformers at run time) and their checkpoint loader.

Layout: each supported family (GPT-2, Llama/Mistral, Qwen2, Qwen3, Phi-3) is one `ArchSpec`
declaration in `families/` (HF model types, config parsing, module names, block layout, default
LoRA targets, checkpoint weight layout) over one shared shell, `model.CausalLM`. `config.py`
parses config.json into a `ModelConfig`, `loading.py` reads checkpoint folders, `attention.py`
holds the KV cache, `rope.py` the rotary embedding.

Every model built by `build_model(config)` / returned by `load_model(path)` is a `CausalLM`
whose module paths mirror Hugging Face's *ForCausalLM, uses nn.Linear for every projection
(fused ones included, so LoRA can be swapped in by module name), never samples, and has this
forward:

    logits = model(input_ids, positions=None, kv_cache=None, cache_rows=None, logits_at=None)

- input_ids: Long[B, S]. positions: Long[B, S], default arange(S) in every row.
- kv_cache=None: plain causal attention over the S tokens given (positions only move RoPE /
  position embeddings).
- kv_cache=KVCache(...): row b's k, v are written into cache row cache_rows[b] (default b) at
  positions[b], then each query attends to the keys of its row at positions <= its own. See
  `loraserve.adapters.models.attention` for what the engine must respect (positions, padding,
  slots).
- logits_at: Long[B] -> logits [B, V] at index logits_at[b] of each row (prefill needs only the
  last real token); else [B, S, V]. Logits are float32 whatever the model dtype.
"""

from .attention import KVCache
from .config import ModelConfig, ModelLoadError, UnsupportedModel
from .families import FAMILIES, spec_for_arch, supported_model_types
from .loading import (
    LoadedModel,
    build_model,
    load_model,
    model_fingerprint,
    read_config,
)
from .model import CausalLM
from .specs import ArchSpec, BlockLayout, ModuleNames

# Older names, from when GPT-2 and Llama had their own classes: both are the one shell now,
# which builds whatever family config.arch names.
GPT2ForCausalLM = LlamaForCausalLM = CausalLM

__all__ = [
    "FAMILIES",
    "ArchSpec",
    "BlockLayout",
    "CausalLM",
    "GPT2ForCausalLM",
    "KVCache",
    "LlamaForCausalLM",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "ModuleNames",
    "UnsupportedModel",
    "build_model",
    "load_model",
    "model_fingerprint",
    "read_config",
    "spec_for_arch",
    "supported_model_types",
]
