"""Llama family in plain PyTorch: Llama 2/3.x, SmolLM, TinyLlama, Mistral (full attention) and
Qwen2/2.5 (`config.qkv_bias`: biases on q/k/v, none on o_proj). GQA, head_dim override and tied or
untied embeddings come from the config. Module paths mirror transformers' LlamaForCausalLM:

    model.embed_tokens, model.norm, lm_head
    model.layers.{i}.input_layernorm, .self_attn.{q,k,v,o}_proj,
    model.layers.{i}.post_attention_layernorm, .mlp.{gate,up,down}_proj

`model.rotary_emb` holds only non-persistent float32 frequencies. The forward contract is in the
`adapters.models` package docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import CacheStep, KVCache, attention
from .config import ACTIVATIONS, ModelConfig
from .rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, cast back, then scale: HF's order, which matters in bf16.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        H, Hkv, D, C = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.H, self.Hkv, self.D = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, step: CacheStep | None
    ) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.H, self.D).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(B, S, self.Hkv, self.D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, layer, step)  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.H * self.D))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, F, bias=False)
        self.up_proj = nn.Linear(C, F, bias=False)
        self.down_proj = nn.Linear(F, C, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, step: CacheStep | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers)),
                norm=RMSNorm(config.hidden_size, config.norm_eps),
                rotary_emb=RotaryEmbedding(config),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_rows: Tensor | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        step = kv_cache.step(positions, cache_rows) if kv_cache is not None else None
        x = self.model.embed_tokens(input_ids)  # [B, S, C]
        cos, sin = self.model.rotary_emb(positions, x.dtype)  # [B, S, D]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, step)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # [B, C]
        return self.lm_head(self.model.norm(x)).float()


def _init_weights(module: nn.Module) -> None:
    """HF's Llama initialisation (std 0.02, zero biases); the loader overwrites all of it."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
