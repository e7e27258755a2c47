"""Base causal LMs in plain PyTorch (no transformers at run time) and their checkpoint loader.

Every model built by `build_model(config)` / returned by `load_model(path)` has module paths that
mirror Hugging Face's *ForCausalLM, uses nn.Linear for every projection (so LoRA can be swapped
in by module name), never samples, and has this forward:

    logits = model(input_ids, positions=None, kv_cache=None, cache_rows=None, logits_at=None)

- input_ids: Long[B, S]. positions: Long[B, S], default arange(S) in every row.
- kv_cache=None: plain causal attention over the S tokens given (positions only move RoPE /
  position embeddings).
- kv_cache=KVCache(...): row b's k, v are written into cache row cache_rows[b] (default b) at
  positions[b], then each query attends to the keys of its row at positions <= its own. See
  `adapters.models.attention` for what the engine must respect (positions, padding, slots).
- logits_at: Long[B] -> logits [B, V] at index logits_at[b] of each row (prefill needs only the
  last real token); else [B, S, V]. Logits are float32 whatever the model dtype.
"""

from .attention import KVCache
from .config import ModelConfig, ModelLoadError, UnsupportedModel
from .gpt2 import GPT2ForCausalLM
from .llama import LlamaForCausalLM
from .loading import (
    CausalLM,
    LoadedModel,
    build_model,
    load_model,
    model_fingerprint,
    read_config,
)

__all__ = [
    "CausalLM",
    "GPT2ForCausalLM",
    "KVCache",
    "LlamaForCausalLM",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "UnsupportedModel",
    "build_model",
    "load_model",
    "model_fingerprint",
    "read_config",
]
