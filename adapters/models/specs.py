"""ArchSpec: what makes one base-model family what it is, declared in one place.

A family (GPT-2, Llama, Qwen3, Phi-3, ...) is one `ArchSpec` in its own module under
`loraserve.adapters.models.families`. Nothing else in the package branches on a family's name: the
config
parser dispatches on `model_types`, the shell (`loraserve.adapters.models.model`) builds itself from
`names` and `layout`, the loader reads `names`, `conv1d` and `ignored_suffixes`, and the trainer
takes `lora_targets` and `conv1d`. A spec has no silent defaults for what differs between
families (names, layout, targets, weight layout): a new family states each one.

Contract:
- `arch` is the name stored in `ModelConfig.arch`; it is part of every base model's fingerprint
  (`model_fingerprint`), so an existing family's `arch` never changes.
- `names` are Hugging Face's module names, so our state-dict keys and PEFT's adapter keys are
  theirs (`model.layers.0.self_attn.q_proj`). A projection tuple of one name is a fused layer:
  `qkv=("qkv_proj",)` is one Linear whose output is [q; k; v], `up=("gate_up_proj",)` one
  whose output is [gate; up], and a LoRA adapter on it adapts the fused output as a whole.
- `conv1d`: the checkpoint stores every 2-D weight inside the blocks as [in, out] (GPT-2's
  Conv1D). The loader transposes them to nn.Linear's [out, in]; PEFT adapters for such a base
  have `fan_in_fan_out=True` (their A/B are still in Linear layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass(frozen=True)
class ModuleNames:
    """A family's Hugging Face module names; the defaults are LlamaForCausalLM's."""

    root: str = "model"  # the *Model inside *ForCausalLM; lm_head sits next to it
    embed: str = "embed_tokens"
    pos_embed: str | None = None  # learned absolute positions (GPT-2's wpe)
    layers: str = "layers"
    final_norm: str = "norm"
    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # or one fused [q; k; v]
    o: str = "o_proj"
    up: tuple[str, ...] = ("gate_proj", "up_proj")  # gated: gate, up (or fused); plain: up
    down: str = "down_proj"


@dataclass(frozen=True)
class BlockLayout:
    """The options of the one shared block; the defaults are Llama's."""

    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (with bias)
    positions: str = "rope"  # "rope" (rotate-half, see rope.py) | "learned" (names.pos_embed)
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)) | "plain": down(act(up(x)))
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3)
    bias: bool = False  # every projection but lm_head has a bias (GPT-2)

    def __post_init__(self):
        for field, value, allowed in (
            ("norm", self.norm, ("rmsnorm", "layernorm")),
            ("positions", self.positions, ("rope", "learned")),
            ("mlp", self.mlp, ("gated", "plain")),
        ):
            if value not in allowed:
                raise ValueError(f"BlockLayout.{field}={value!r}: expected one of {allowed}")


@dataclass(frozen=True)
class ArchSpec:
    arch: str  # ModelConfig.arch; part of the fingerprint
    model_types: tuple[str, ...]  # config.json "model_type" values this family reads
    # (config.json "architectures" class name, its model_type): for a config without model_type
    architectures: tuple[tuple[str, str], ...]
    parse: Callable[[dict, str], ModelConfig]  # (config.json dict, model_type) -> ModelConfig
    names: ModuleNames
    layout: BlockLayout
    lora_targets: tuple[str, ...]  # the trainer's default targets (PEFT suffix match)
    conv1d: bool  # 2-D block weights stored [in, out]; PEFT's fan_in_fan_out
    ignored_suffixes: tuple[str, ...] = ()  # checkpoint buffers we recompute (causal masks)

    def __post_init__(self):
        names, layout = self.names, self.layout
        if len(names.qkv) not in (1, 3):
            raise ValueError(f"{self.arch}: names.qkv must be one fused or three names")
        if len(names.up) not in ((1, 2) if layout.mlp == "gated" else (1,)):
            raise ValueError(f"{self.arch}: names.up does not fit a {layout.mlp} MLP")
        if any(t not in self.model_types for _, t in self.architectures):
            raise ValueError(f"{self.arch}: architectures name a model_type it does not list")
        if (layout.positions == "learned") != (names.pos_embed is not None):
            raise ValueError(f"{self.arch}: learned positions need names.pos_embed, and only they")

    @property
    def embedding_key(self) -> str:
        """State-dict key of the token embedding (the fingerprint reads its first rows)."""
        return f"{self.names.root}.{self.names.embed}.weight"

    @property
    def blocks_prefix(self) -> str:
        return f"{self.names.root}.{self.names.layers}."
