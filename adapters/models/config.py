"""ModelConfig: the one frozen description of a base model, parsed from HF config.json.

Contract:
- `ModelConfig.from_hf(d)` accepts the dict of a Hugging Face `config.json` written by
  transformers v4 or v5 (`rope_scaling` + top-level `rope_theta` or v5 `rope_parameters`;
  `torch_dtype` or v5 `dtype`). It finds the family by `model_type` (or `architectures` when
  that is missing) in `loraserve.adapters.models.families` and lets the family's `ArchSpec.parse`
  read
  the rest. An unknown model_type is refused by name with the list of supported ones.
- `config.spec` is the family's `ArchSpec` (module names, block layout, LoRA defaults); `arch`
  names it. Mistral is arch "llama"; Qwen2, Qwen3 and Phi-3 keep their own arch.
- Anything we would compute differently from transformers is refused with `UnsupportedModel`
  (a `ValueError` whose message says what and why); a config missing a required key raises
  `ModelLoadError`. Nothing is silently approximated.
- `rope_scaling` is normalised to None (plain RoPE) or a dict with "rope_type" in
  {"linear", "llama3"} and every parameter that type needs filled in.

The `read_*` / `check_*` / `llama_like` helpers below read the config.json keys many families
share; each family module says which of them it uses and what it refuses on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F

if TYPE_CHECKING:
    from .specs import ArchSpec


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

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # an ArchSpec.arch: "gpt2" | "llama" | "qwen2" | "qwen3" | "phi3"
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
    partial_rotary_factor: float = 1.0  # RoPE rotates the first rotary_dim of each head (Phi-3)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); layout.bias puts them everywhere
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None  # as written in config.json ("bfloat16"), not applied by itself
    model_type: str = ""  # the HF model_type it came from ("mistral" has arch "llama")

    def __post_init__(self):
        from .families import spec_for_arch  # the families import this module

        spec_for_arch(self.arch)  # refuses an unknown arch
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModel(
                f"activation {self.activation!r} is not supported (have {sorted(ACTIVATIONS)})"
            )
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise UnsupportedModel(
                f"partial_rotary_factor={self.partial_rotary_factor} gives an odd or empty "
                f"rotary dimension {self.rotary_dim} of head_dim={self.head_dim}"
            )

    @property
    def spec(self) -> ArchSpec:
        """The family's declaration (module names, block layout, LoRA defaults)."""
        from .families import spec_for_arch  # the families import this module

        return spec_for_arch(self.arch)

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (transformers' int(head_dim * f))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        from .families import spec_for_hf_config  # the families import this module

        spec, model_type = spec_for_hf_config(d)
        return spec.parse(d, model_type)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# -- helpers the families share ------------------------------------------------------------------


def require(d: dict, *keys: str):
    """The first of `keys` that config.json sets (aliases, e.g. n_embd / hidden_size)."""
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    raise ModelLoadError(f"config.json has no {keys[0]!r}")


def read_eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def read_dtype(d: dict) -> str | None:
    value = d.get("dtype") or d.get("torch_dtype")  # v5 writes "dtype", v4 "torch_dtype"
    return str(value).removeprefix("torch.") if value else None


def refuse_flags(d: dict, model_type: str, *flags: str) -> None:
    """Refuse options that would add computation we do not implement (attention_bias, ...)."""
    for flag in flags:
        if d.get(flag):
            raise UnsupportedModel(f"{model_type} with {flag}=true is not supported")


def check_full_attention(d: dict, model_type: str, max_pos: int, switch: str | None = None) -> None:
    """Refuse sliding-window attention unless the window covers every position anyway.

    switch: the config key that turns the window on (Qwen's `use_sliding_window`); configs of
    such families carry a window that is unused while the switch is off.
    """
    window = d.get("sliding_window")
    if switch is not None and not d.get(switch, False):
        window = None
    if window is not None and window < max_pos:
        raise UnsupportedModel(
            f"{model_type} with sliding_window={window} < max_position_embeddings={max_pos} "
            "is not supported (only full attention is implemented)"
        )


def read_rope(
    d: dict, max_pos: int, types: tuple[str, ...] = ROPE_TYPES, partial_rotary: bool = False
) -> dict[str, Any]:
    """ModelConfig's rope fields from v4 `rope_theta` + `rope_scaling` or v5 `rope_parameters`.

    types: the rope types this family computes like transformers does; partial_rotary: whether
    the family's transformers code honours partial_rotary_factor (Phi-3 does, Llama does not).
    """
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel("per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    factor = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    if factor != 1.0 and not partial_rotary:
        raise UnsupportedModel(f"partial_rotary_factor={factor} is not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in types:
        raise UnsupportedModel(
            f"rope type {rope_type!r} is not supported (have {', '.join(types)})"
        )
    fields = {"rope_theta": theta, "rope_scaling": None, "partial_rotary_factor": float(factor)}
    if rope_type == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": float(params["factor"])}
    elif rope_type == "llama3":
        fields["rope_scaling"] = {
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
    return fields


def llama_like(
    d: dict, arch: str, model_type: str, rope: dict | None = None, **fields
) -> ModelConfig:
    """A ModelConfig from the Llama-style keys (hidden_size, num_attention_heads, rms_norm_eps,
    rope ...) that most families share. rope: `read_rope`'s fields (default: plain
    `read_rope(d, max_pos)`); fields: the family's own values (qkv_bias=True, head_dim=...)."""
    refuse_flags(d, model_type, "mlp_bias")
    hidden = require(d, "hidden_size")
    heads = require(d, "num_attention_heads")
    max_pos = require(d, "max_position_embeddings")
    values = dict(
        arch=arch,
        vocab_size=require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        intermediate_size=require(d, "intermediate_size"),
        max_position_embeddings=max_pos,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        activation=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=read_eos_ids(d.get("eos_token_id")),
        dtype=read_dtype(d),
        model_type=model_type,
    )
    return ModelConfig(**{**values, **(rope or read_rope(d, max_pos)), **fields})
