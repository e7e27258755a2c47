"""The one causal-LM shell every family is built from (gpt-fast / litgpt style, config-driven).

`CausalLM(config)` reads `config.spec` (an `ArchSpec`): `names` puts every module at its Hugging
Face path, `layout` picks the options of the one Block / Attention / MLP below (LayerNorm or
RMSNorm, learned positions or RoPE, plain or gated MLP, separate or fused q/k/v and gate/up,
q/k norm, biases). The per-checkpoint numbers (sizes, heads, rope, tied embeddings, q/k/v bias)
come from the config itself. The forward contract is in the `loraserve.adapters.models` docstring.

Every projection is an nn.Linear ([out, in] weights) registered under its HF name, so LoRA swaps
in by name and PEFT keys map 1:1. Submodules are looked up by name inside `forward` on purpose:
LoRA replaces Linears in place (`setattr` on the parent), which a cached reference would miss.
A serving step may give an attention or MLP a `fused` Linear over its separate q/k/v or
gate/up weights (`models.packed.fuse_projections`); `project` runs either form.
`<root>.rotary_emb` holds only non-persistent float32 frequencies. Construction order (hence
the random init of `build_model`) is the HF order: embeddings, blocks, final norm, lm_head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .attention import CacheStep, KVCache, LayerKV, attention
from .config import ACTIVATIONS, ModelConfig
from .rope import RotaryEmbedding, apply_rope
from .specs import ArchSpec

Rope = tuple[Tensor, Tensor]  # cos, sin: [B, S, rotary_dim]


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


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)


def project(
    parent: nn.Module, names: tuple[str, ...], widths: tuple[int, ...], x: Tensor
) -> list[Tensor]:
    """The outputs of ``parent``'s projections ``names`` (output widths ``widths``) of ``x``.
    Where they were fused for serving (``parent.fused``, see ``models.packed.fuse_projections``)
    it is one GEMM over their weights concatenated, then each LoRA wrapper's delta on its
    slice; otherwise one call each."""
    if parent.fused is None:
        return [getattr(parent, name)(x) for name in names]
    parts = parent.fused(x).split(widths, dim=-1)
    modules = [getattr(parent, name) for name in names]
    return [y if isinstance(m, nn.Linear) else m.add_delta(x, y) for m, y in zip(modules, parts)]


def add_projections(
    parent: nn.Module, names: tuple[str, ...], in_dim: int, widths: tuple[int, ...], bias: bool
) -> None:
    """One Linear per name, or a single fused one whose output is the widths concatenated."""
    if len(names) == 1:
        widths = (sum(widths),)
    for name, width in zip(names, widths):
        parent.add_module(name, nn.Linear(in_dim, width, bias=bias))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: ArchSpec):
        super().__init__()
        names, layout = spec.names, spec.layout
        H, Hkv, D, C = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.H, self.Hkv, self.D = H, Hkv, D
        self.widths = (H * D, Hkv * D, Hkv * D)
        self.qkv_names, self.o_name = names.qkv, names.o
        add_projections(self, names.qkv, C, self.widths, config.qkv_bias or layout.bias)
        # separate q, k, v read one input: fuse_projections may make them one GEMM (`project`)
        self.fusable = names.qkv if len(names.qkv) > 1 else ()
        self.fused: nn.Linear | None = None
        self.add_module(names.o, nn.Linear(H * D, C, bias=layout.bias))
        self.qk_norm = layout.qk_norm
        if layout.qk_norm:
            self.q_norm = RMSNorm(D, config.norm_eps)
            self.k_norm = RMSNorm(D, config.norm_eps)

    def forward(self, x: Tensor, rope: Rope | None, kv: LayerKV | None) -> Tensor:
        B, S, _ = x.shape
        projections = project(self, self.qkv_names, self.widths, x)
        if len(projections) == 1:  # fused [q; k; v] along the output
            projections = projections[0].split(self.widths, dim=-1)
        # q: [B, S, H, D]; k, v: [B, S, Hkv, D]
        q, k, v = (t.view(B, S, -1, self.D) for t in projections)
        if self.qk_norm:  # per head, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H or Hkv, S, D]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v, kv)  # [B, H, S, D]
        return getattr(self, self.o_name)(y.transpose(1, 2).reshape(B, S, self.H * self.D))


class MLP(nn.Module):
    """gated: down(act(gate(x)) * up(x)), gate and up separate or fused [gate; up];
    plain: down(act(up(x)))."""

    def __init__(self, config: ModelConfig, spec: ArchSpec):
        super().__init__()
        names, layout = spec.names, spec.layout
        C, F = config.hidden_size, config.intermediate_size
        self.gated = layout.mlp == "gated"
        self.up_names, self.down_name = names.up, names.down
        self.widths = (F, F) if self.gated else (F,)
        add_projections(self, names.up, C, self.widths, layout.bias)
        self.fusable = names.up if len(names.up) > 1 else ()  # separate gate and up
        self.fused: nn.Linear | None = None
        self.add_module(names.down, nn.Linear(F, C, bias=layout.bias))
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        h = project(self, self.up_names, self.widths, x)
        if not self.gated:
            h = self.act(h[0])
        else:
            gate, up = h if len(h) == 2 else h[0].chunk(2, dim=-1)  # fused: [gate; up]
            h = self.act(gate) * up
        return getattr(self, self.down_name)(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, spec: ArchSpec):
        super().__init__()
        n, layout = spec.names, spec.layout
        self.parts = (n.attn_norm, n.attn, n.mlp_norm, n.mlp)
        self.add_module(n.attn_norm, make_norm(layout.norm, config.hidden_size, config.norm_eps))
        self.add_module(n.attn, Attention(config, spec))
        self.add_module(n.mlp_norm, make_norm(layout.norm, config.hidden_size, config.norm_eps))
        self.add_module(n.mlp, MLP(config, spec))

    def forward(self, x: Tensor, rope: Rope | None, kv: LayerKV | None) -> Tensor:
        attn_norm, attn, mlp_norm, mlp = (getattr(self, name) for name in self.parts)
        x = x + attn(attn_norm(x), rope, kv)
        return x + mlp(mlp_norm(x))


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config, self.spec = config, config.spec
        n, layout = self.spec.names, self.spec.layout
        C = config.hidden_size
        body: dict[str, nn.Module] = {n.embed: nn.Embedding(config.vocab_size, C)}
        if layout.positions == "learned":
            body[n.pos_embed] = nn.Embedding(config.max_position_embeddings, C)
        body[n.layers] = nn.ModuleList(Block(config, self.spec) for _ in range(config.num_layers))
        body[n.final_norm] = make_norm(layout.norm, C, config.norm_eps)
        if layout.positions == "rope":
            body["rotary_emb"] = RotaryEmbedding(config)
        self.add_module(n.root, nn.ModuleDict(body))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.tie_weights()

    @property
    def body(self) -> nn.ModuleDict:
        """The HF *Model inside (`model` or `transformer`): embeddings, blocks, final norm."""
        return getattr(self, self.spec.names.root)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.body[self.spec.names.embed].weight

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_rows: Tensor | None = None,
        logits_at: Tensor | None = None,
        kv_len: int | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        step = kv_cache.step(positions, cache_rows, kv_len) if kv_cache is not None else None
        return self.run(input_ids, positions, step, logits_at, return_hidden=return_hidden)

    def run(
        self,
        input_ids: Tensor,
        positions: Tensor,
        step: CacheStep | None,
        logits_at: Tensor | None = None,
        blocks: Sequence[tuple[Callable, int]] | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``forward`` once the cache step is built: embeddings, blocks, final norm, head.
        ``blocks``: ``(fn, n)`` pairs to run in order instead of the blocks, each over the next
        ``n`` layers as ``x = fn(x, rope, kvs)`` with ``kvs`` those layers' ``LayerKV``s
        (compiled groups of blocks: a static decode step compiles its own, leaving the
        modules, hence prefill, eager). ``return_hidden``:
        also return the final-normed hidden states of every position, ``[B, S, C]``, whose
        ``head`` gives any position's logits (prompt log-probabilities, a row at a time)."""
        B = input_ids.shape[0]
        n, body = self.spec.names, self.body
        x = self._blocks(input_ids, positions, step, blocks)
        if return_hidden:
            hidden = body[n.final_norm](x)
            at = (
                hidden if logits_at is None else hidden[torch.arange(B, device=x.device), logits_at]
            )
            return self.head(at), hidden
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # [B, C]
        return self.head(body[n.final_norm](x))

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """The final-normed hidden states of every position, ``[B, S, C]``, without the head
        and without a cache (training: the loss takes the head only where there are targets)."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device).expand(B, S)
        x = self._blocks(input_ids, positions, None, None)
        return self.body[self.spec.names.final_norm](x)

    def _blocks(
        self,
        input_ids: Tensor,
        positions: Tensor,
        step: CacheStep | None,
        blocks: Sequence[tuple[Callable, int]] | None,
    ) -> Tensor:
        """Embeddings and the blocks: the last block's output, ``[B, S, C]``."""
        n, body = self.spec.names, self.body
        x = body[n.embed](input_ids)  # [B, S, C]
        rope = None
        if self.spec.layout.positions == "learned":
            x = x + body[n.pos_embed](positions)
        else:
            rope = body["rotary_emb"](positions, x.dtype)  # cos, sin: [B, S, rotary_dim]
        if blocks is None:
            for i, block in enumerate(body[n.layers]):
                x = block(x, rope, step.layer(i) if step is not None else None)
            return x
        first = 0
        for fn, count in blocks:
            layers = range(first, first + count)
            x = fn(x, rope, tuple(step.layer(i) if step is not None else None for i in layers))
            first += count
        return x

    def head(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states -> float32 logits."""
        return self.lm_head(hidden).float()


def _init_weights(module: nn.Module) -> None:
    """HF's initialisation (std 0.02, zero biases); the loader overwrites all of it."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
