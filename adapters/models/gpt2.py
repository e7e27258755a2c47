"""GPT-2 in plain PyTorch. Module paths mirror transformers' GPT2LMHeadModel so PEFT keys map 1:1:

    transformer.wte, transformer.wpe, transformer.ln_f, lm_head (tied to wte unless untied)
    transformer.h.{i}.ln_1, .attn.c_attn, .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj

Every projection is an nn.Linear ([out, in] weights); the loader transposes HF's Conv1D [in, out]
weights. c_attn packs q, k, v along its output, in that order. The forward contract is the one
described in `adapters.models.llama` (positions, KV cache, logits_at, float32 logits). Position
embeddings are learned, so every position must be < config.max_position_embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import CacheStep, KVCache, attention
from .config import ACTIVATIONS, ModelConfig


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, layer: int, step: CacheStep | None) -> Tensor:
        B, S, C = x.shape
        # q, k, v: [B, H, S, D]
        q, k, v = (
            t.view(B, S, self.n_head, self.head_dim).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=-1)
        )
        y = attention(q, k, v, layer, step).transpose(1, 2).reshape(B, S, C)
        return self.c_proj(y)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, layer: int, step: CacheStep | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), layer, step)
        return x + self.mlp(self.ln_2(x))


class GPT2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.hidden_size),
                wpe=nn.Embedding(config.max_position_embeddings, config.hidden_size),
                h=nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers)),
                ln_f=nn.LayerNorm(config.hidden_size, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

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
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # [B, S, C]
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, step)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # [B, C]
        return self.lm_head(self.transformer.ln_f(x)).float()


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation (std 0.02, zero biases); the loader overwrites all of it."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
