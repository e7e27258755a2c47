"""Rotary position embedding, Hugging Face "rotate-half" layout.

Contract: `RotaryEmbedding(config)(positions, dtype)` maps Long[B, S] positions to (cos, sin),
each [B, S, rotary_dim], computed in float32 and then cast to dtype (as transformers does);
`apply_rope(x, cos, sin)` rotates the first rotary_dim of x: [B, H, S, head_dim] and passes the
rest through (rotary_dim = head_dim unless config.partial_rotary_factor < 1, as in Phi-3).
Frequencies follow transformers' `_compute_*_parameters` exactly for rope types default, linear
and llama3 (the config refuses every other type). They are kept in float32 whatever the model
dtype: `Module.to(dtype)` would round them, so `_apply` recomputes them instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig


def inv_frequencies(config: ModelConfig, device: torch.device | str = "cpu") -> Tensor:
    """float32 [rotary_dim // 2] inverse frequencies, scaled as config.rope_scaling says."""
    dim = config.rotary_dim
    # Same expression as transformers, so the float32 rounding matches bit for bit.
    inv_freq = 1.0 / (
        config.rope_theta
        ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})


def _llama3(
    inv_freq: Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by factor, blend in between."""
    old_len = original_max_position_embeddings
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Built under torch.device("meta") (the loader does), the frequencies stay real on the CPU.
        device = torch.get_default_device()
        device = "cpu" if device.type == "meta" else device
        self.register_buffer("inv_freq", inv_frequencies(config, device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = inv_frequencies(self.config, self.inv_freq.device)
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, rotary_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D]; cos, sin: [B, S, R], R <= D -> broadcast over heads
    rotary_dim = cos.shape[-1]
    if x.shape[-1] > rotary_dim:  # partial rotary: the last D - R dims pass through unrotated
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((apply_rope(rot, cos, sin), rest), dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
