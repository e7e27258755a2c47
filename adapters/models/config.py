"""ModelConfig: the one frozen description of a base architecture, parsed from HF config.json.

Contract:
- `ModelConfig.from_hf(d)` accepts the dict of a Hugging Face `config.json` written by
  transformers v4 or v5 (`rope_scaling` + top-level `rope_theta` or v5 `rope_parameters`;
  `torch_dtype` or v5 `dtype`) for model_type gpt2, llama (also SmolLM, TinyLlama), mistral
  (no sliding window) and qwen2. Mistral becomes arch "llama"; Qwen2 is "llama" plus q/k/v bias
  but keeps arch "qwen2" so a reader can tell them apart.
- Anything we would compute differently from transformers is refused with `UnsupportedModel`
  (a `ValueError` whose message says what and why); a config missing a required key raises
  `ModelLoadError`. Nothing is silently approximated.
- `rope_scaling` is normalised to None (plain RoPE) or a dict with "rope_type" in
  {"linear", "llama3"} and every parameter that type needs filled in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch.nn.functional as F


class ModelLoadError(ValueError):
    """A checkpoint folder is missing a file, holds a pickle, or its tensors do not fit."""


class UnsupportedModel(ValueError):
    """config.json describes an architecture or option this package does not implement."""


ACTIVATIONS: dict[str, Callable] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    # HF "gelu_new" is the tanh approximation GPT-2 was trained with.
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}

LLAMA_LIKE = ("llama", "mistral", "qwen2")
ARCHITECTURE_TO_TYPE = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "gpt2" | "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)  # hash=False: dicts don't hash
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None  # as written in config.json ("bfloat16"), not applied by itself
    model_type: str = ""  # the HF model_type it came from ("mistral" has arch "llama")

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama", "qwen2"):
            raise UnsupportedModel(f"unknown arch {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModel(
                f"activation {self.activation!r} is not supported (have {sorted(ACTIVATIONS)})"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type") or _type_from_architectures(d)
        if model_type == "gpt2":
            return _gpt2_from_hf(d)
        if model_type in LLAMA_LIKE:
            return _llama_from_hf(d, model_type)
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; loraserve runs gpt2, llama "
            "(incl. SmolLM, TinyLlama), mistral and qwen2"
        )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _type_from_architectures(d: dict) -> str | None:
    for name in d.get("architectures") or ():
        if name in ARCHITECTURE_TO_TYPE:
            return ARCHITECTURE_TO_TYPE[name]
    return None


def _require(d: dict, *keys: str):
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    raise ModelLoadError(f"config.json has no {keys[0]!r}")


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _dtype(d: dict) -> str | None:
    value = d.get("dtype") or d.get("torch_dtype")  # v5 writes "dtype", v4 "torch_dtype"
    return str(value).removeprefix("torch.") if value else None


def _gpt2_from_hf(d: dict) -> ModelConfig:
    if d.get("scale_attn_by_inverse_layer_idx"):
        raise UnsupportedModel("gpt2 with scale_attn_by_inverse_layer_idx=true is not supported")
    if d.get("scale_attn_weights") is False:
        raise UnsupportedModel("gpt2 with scale_attn_weights=false is not supported")
    hidden = _require(d, "n_embd", "hidden_size")
    heads = _require(d, "n_head", "num_attention_heads")
    return ModelConfig(
        arch="gpt2",
        vocab_size=_require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(d, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=d.get("n_inner") or 4 * hidden,
        max_position_embeddings=_require(d, "n_positions", "n_ctx"),
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True,
        activation=d.get("activation_function", "gelu_new"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        dtype=_dtype(d),
        model_type="gpt2",
    )


def _llama_from_hf(d: dict, model_type: str) -> ModelConfig:
    hidden = _require(d, "hidden_size")
    heads = _require(d, "num_attention_heads")
    max_pos = _require(d, "max_position_embeddings")
    _check_full_attention(d, model_type, max_pos)
    if model_type != "qwen2" and d.get("attention_bias"):
        raise UnsupportedModel(f"{model_type} with attention_bias=true is not supported")
    if d.get("mlp_bias"):
        raise UnsupportedModel(f"{model_type} with mlp_bias=true is not supported")
    theta, scaling = _rope(d, max_pos)
    return ModelConfig(
        arch="qwen2" if model_type == "qwen2" else "llama",
        vocab_size=_require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        intermediate_size=_require(d, "intermediate_size"),
        max_position_embeddings=max_pos,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias (and no o_proj bias)
        activation=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        dtype=_dtype(d),
        model_type=model_type,
    )


def _check_full_attention(d: dict, model_type: str, max_pos: int) -> None:
    """Refuse sliding-window attention unless the window covers every position anyway."""
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window that is only used with use_sliding_window
    if window is not None and window < max_pos:
        raise UnsupportedModel(
            f"{model_type} with sliding_window={window} < max_position_embeddings={max_pos} "
            "is not supported (only full attention is implemented)"
        )


def _rope(d: dict, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from v4 `rope_theta` + `rope_scaling` or v5 `rope_parameters`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel("per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    factor = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    if factor != 1.0:
        raise UnsupportedModel(f"partial_rotary_factor={factor} is not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    if rope_type == "llama3":
        return theta, {
            "rope_type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(
                params.get("original_max_position_embeddings")
                or d.get("original_max_position_embeddings")
                or max_pos
            ),
        }
    raise UnsupportedModel(
        f"rope type {rope_type!r} is not supported (have default, linear, llama3)"
    )
