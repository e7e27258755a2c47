"""The decode step on fixed shapes: padded to a batch bucket, compiled once per bucket.

One decode step feeds one token to every running sequence. The engine keeps its running
sequences on KV rows ``0..n-1`` (it moves a sequence down when a lower row frees up), so the
step's batch *is* the first rows of the cache and attention reads them as views. A
``DecodeStep`` pads that batch to a bucket (1, 2, 4, 8, ... up to ``max_batch``) and the adapter
rank to a rank bucket, fills preallocated buffers from host lists, and runs the model on those
fixed shapes, so a compiled or captured step serves every step of its bucket:

- padded rows ``n..bucket-1`` feed token 0 at position 0 on slot 0 (the base model), and write
  their k/v into the cache's scratch column (``KVCache.scratch``, one position past every real
  one): they never touch what a real sequence wrote or will read. Their logits are dropped. (A
  scratch *column* rather than a scratch row keeps the batch on rows ``0..bucket-1``, views,
  with no gather of the cache.)
- the LoRA layers get the static routing (``LoRAContext.set_static``): the per-row slots in a
  device buffer and the rank bucket as a host int (0 when no row uses an adapter: the LoRA path
  is skipped). Only the ``gather`` and ``triton`` backends run this way.
- rows that mix adapters (up to ``max_mixture`` weighted slots each) take a *width*: a step
  with a mixture routes every row through ``[bucket, max_mixture]`` slot and weight buffers (a
  plain row is its slot at weight 1, then padding on slot 0). With the native CPU op a padding
  member costs nothing, so on CPU every step runs mixed (one compiled graph); the gather path
  reads every member's blocks, so there a step without mixtures keeps the plain routing and
  the routing is one more bucket dimension.
- nothing in the forward reads a device value back (the routing and the KV read window are
  built here, on the host).

Modes (``MODES``), chosen once at start-up:

- ``"static"``: the padded step, eager. Tests the padding without a compiler.
- ``"inductor"`` (CPU): the transformer blocks compiled by inductor in groups of up to
  ``MAX_GROUP`` consecutive blocks (``torch.compile`` with dynamic shapes over the batch bucket,
  the KV window and the rank bucket: one compiled group serves every group of layers, bucket
  and rank; it compiles once more for the batch of one, and for steps without adapters);
  embeddings and head stay eager. On CPU the KV read window must
  follow the longest sequence (reading all ``max_seq`` positions would cost more than the
  step), hence dynamic shapes rather than one graph per window.
- ``"cuda-graphs"`` (CUDA): one CUDA graph per (batch bucket, rank bucket), captured at
  start-up with the KV window fixed at ``max_seq`` (the mask hides what is not yet written); a
  step copies its inputs into the graph's buffers and replays it. Loading an adapter copies
  into the slot tables in place, so a captured graph never goes stale.

``warm_up()`` runs every bucket once (compiling or capturing it) and returns the time it took;
the server does this before it reports SERVING.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..lora import plain_route, route_pairs
from .attention import KVCache

MODES = ("static", "inductor", "cuda-graphs")
MIN_RANK_BUCKET = 8


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


def rank_buckets(max_rank: int) -> list[int]:
    """0 (no adapter in the batch), then 8, 16, 32, ... below ``max_rank``, then ``max_rank``."""
    buckets, r = [0], MIN_RANK_BUCKET
    while r < max_rank:
        buckets.append(r)
        r *= 2
    return [*buckets, max_rank]


def _bucket(buckets: Sequence[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class DecodeStep:
    """One token for each sequence on KV rows ``0..n-1``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        lora=None,  # LoRASlotTable, or None for a model without LoRA layers
        *,
        max_batch: int,
        max_rank: int = 0,
        mode: str = "static",
        device: torch.device | str = "cpu",
        max_mixture: int = 1,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose from {MODES}")
        if max_batch > kv_cache.max_batch:
            raise ValueError(f"max_batch {max_batch} exceeds the cache's {kv_cache.max_batch} rows")
        self.device = torch.device(device)
        if mode == "cuda-graphs" and self.device.type != "cuda":
            raise ValueError("decode mode 'cuda-graphs' needs a CUDA device")
        if lora is not None:
            backends = {layer.backend for layer in lora.layers.values()}
            if not backends <= {"gather", "triton"}:
                raise ValueError(
                    f"a static decode step needs the gather or triton LoRA backend, not {backends}"
                )
        self.model, self.kv_cache, self.lora, self.mode = model, kv_cache, lora, mode
        self.buckets = batch_buckets(max_batch)
        has_slots = lora is not None and lora.num_slots > 0
        self.ranks = rank_buckets(max_rank) if has_slots and max_rank > 0 else [0]
        # per bucket: [4, b] long = token, position, write column, slot of every row; filled
        # on the host (pinned on CUDA, so the copy is asynchronous), copied in one transfer
        self._inputs = {
            b: torch.zeros(4, b, dtype=torch.long, device=self.device) for b in self.buckets
        }
        pin = self.device.type == "cuda"
        self._host = {b: torch.zeros(4, b, dtype=torch.long, pin_memory=pin) for b in self.buckets}
        # CUDA: when each bucket's last host -> device copy was done (its host buffer is free)
        self._copied: dict[int, torch.cuda.Event] = {}
        # rows that mix adapters: per bucket, [b, K] slots and weights (and their host twins)
        self.max_mixture = max(1, max_mixture) if has_slots else 1
        k = self.max_mixture
        self._mix = {
            b: (
                torch.zeros(b, k, dtype=torch.long, device=self.device),
                torch.zeros(b, k, dtype=torch.float32, device=self.device),
            )
            for b in (self.buckets if has_slots else ())
        }
        self._mix_host = {
            b: (
                torch.zeros(b, k, dtype=torch.long, pin_memory=pin),
                torch.zeros(b, k, dtype=torch.float32, pin_memory=pin),
            )
            for b in self._mix
        }
        # the rank bucket as a tensor's size (``LoRAContext.set_static``)
        self._rank_probes = {r: torch.zeros(r, device=self.device) for r in self.ranks}
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self._blocks = None
        if mode == "inductor":
            tables = (
                [t for layer in lora.layers.values() for t in (layer.A, layer.B)] if lora else []
            )
            self._blocks = compile_blocks(model, fixed=(*kv_cache.k, *kv_cache.v, *tables))

    # ------------------------------------------------------------------ the step

    def bucket(self, n: int) -> int:
        return _bucket(self.buckets, n)

    def rank_bucket(self, routes: Sequence) -> int:
        """The smallest rank bucket that holds every adapter the rows use (0: none)."""
        if self.lora is None:
            return 0
        ranks = self.lora.context.slot_rank
        used = [
            ranks.get(s, self.ranks[-1]) for route in routes for s, _ in route_pairs(route) if s
        ]
        return _bucket(self.ranks, max(used)) if used else 0

    @property
    def modes(self) -> list[bool]:
        """The routings steps run with: plain (one slot per row, False) and mixed (``[b,
        max_mixture]`` slots and weights, True); only mixed when the native CPU op computes
        the LoRA rows (padding is free there), only plain without slots."""
        if not self._mix:
            return [False]
        return [True] if self.lora.context.row_op is not None else [False, True]

    def mixed(self, routes: Sequence) -> bool:
        """Does a step over ``routes`` run mixed? (Always, for a weighted route.)"""
        plain = all(isinstance(route, int) for route in routes)
        return self.modes[0] if plain else True

    @torch.inference_mode()  # what warm_up compiled under: another grad mode would recompile
    def __call__(self, tokens: Sequence[int], positions: Sequence[int], routes: Sequence) -> Tensor:
        """Row ``i`` (KV row ``i``) feeds ``tokens[i]`` at ``positions[i]`` on adapter route
        ``routes[i]`` (a slot, or a mixture's ``(slot, weight)`` pairs); returns the next-token
        logits ``[n, V]`` (float32)."""
        n = len(tokens)
        if not 0 < n == len(positions) == len(routes):
            raise ValueError("tokens, positions and routes must be equally long and non-empty")
        routes = [plain_route(route) for route in routes]
        b, r, mixed = self.bucket(n), self.rank_bucket(routes), self.mixed(routes)
        pad = b - n
        host = self._host[b]
        if b in self._copied:  # never overwrite a pinned buffer a queued copy still reads
            self._copied[b].synchronize()
        host.copy_(
            torch.tensor(
                [
                    [*tokens, *[0] * pad],
                    [*positions, *[0] * pad],
                    [*positions, *[self.kv_cache.scratch] * pad],
                    [*(0 if mixed else route for route in routes), *[0] * pad],
                ],
                dtype=torch.long,
            )
        )
        if mixed:
            w = self.max_mixture
            padding = [(0, 0.0)] * w
            pairs = [(*route_pairs(route), *padding)[:w] for route in routes] + [padding] * pad
            slots, weights = self._mix_host[b]
            slots.copy_(torch.tensor([[s for s, _ in row] for row in pairs], dtype=torch.long))
            weights.copy_(torch.tensor([[x for _, x in row] for row in pairs]))
        graph = self._graph(b, r, mixed) if self.mode == "cuda-graphs" else None
        self._inputs[b].copy_(host, non_blocking=True)
        if mixed:
            for device_buffer, host_buffer in zip(self._mix[b], self._mix_host[b]):
                device_buffer.copy_(host_buffer, non_blocking=True)
        if self.device.type == "cuda":
            self._copied.setdefault(b, torch.cuda.Event()).record()
        if graph is not None:
            graph[0].replay()
            return graph[1][:n]
        return self._forward(b, r, max(positions) + 1, mixed)[:n]

    def _forward(self, b: int, r: int, kv_len: int, mixed: bool = False) -> Tensor:
        """The model on bucket ``b``'s buffers, LoRA at rank ``r``, plain or mixed routing:
        logits ``[b, V]``."""
        tokens, positions, write_at, slots = self._inputs[b]
        if self.lora is not None:
            if not mixed:
                self.lora.context.set_static(slots, r, self._rank_probes[r])
            else:
                mixed_slots, weights = self._mix[b]
                self.lora.context.set_static(mixed_slots, r, self._rank_probes[r], weights)
        step = self.kv_cache.step(positions[:, None], None, kv_len, write_at[:, None])
        return self.model.run(tokens[:, None], positions[:, None], step, blocks=self._blocks)[:, 0]

    # ------------------------------------------------------------------ warm-up and capture

    def _graph(self, b: int, r: int, mixed: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        if (b, r, mixed) not in self._graphs:
            self._graphs[(b, r, mixed)] = self._capture(b, r, mixed)
        return self._graphs[(b, r, mixed)]

    def _capture(self, b: int, r: int, mixed: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Capture bucket ``b`` at rank ``r``, plain or mixed, with the KV window at
        ``max_seq``. The inputs hold padding while it runs (scratch writes only), whatever the
        last real step left."""
        self._fill_padding(b, r)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # allocator, cuBLAS workspaces, Triton autotuning
            for _ in range(2):
                self._forward(b, r, self.kv_cache.max_seq, mixed)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(b, r, self.kv_cache.max_seq, mixed)
        return graph, logits

    def _fill_padding(self, b: int, r: int) -> None:
        """Every row of bucket ``b`` padding (scratch writes only); on slot 1 when ``r`` > 0,
        so the LoRA path runs (whatever slot 1 holds; the logits are dropped)."""
        inputs = self._inputs[b]
        inputs.zero_()
        inputs[2].fill_(self.kv_cache.scratch)
        if r:
            inputs[3].fill_(1)
        if b in self._mix:
            slots, weights = self._mix[b]
            slots.zero_()
            weights.zero_()
            if r:
                slots[:, 0].fill_(1)
                weights[:, 0].fill_(1.0)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run (compile, capture) every (batch bucket, rank bucket, routing) once; returns
        seconds."""
        start = time.perf_counter()
        for mixed in self.modes:
            for r in self.ranks:
                for b in self.buckets:
                    if self.mode == "cuda-graphs":
                        self._graph(b, r, mixed)
                    else:
                        self._fill_padding(b, r)
                        self._forward(b, r, self.kv_cache.max_seq, mixed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


MAX_GROUP = 8  # transformer blocks per compiled call


def group_size(layers: int, most: int = MAX_GROUP) -> int:
    """The largest divisor of ``layers`` up to ``most``: every group of blocks is as long as the
    others, so one compilation serves them all (30 layers: 6; 6: 6; 4: 4)."""
    return max(g for g in range(1, min(layers, most) + 1) if layers % g == 0)


def _run_group(blocks: tuple[nn.Module, ...], x: Tensor, rope, kvs: tuple) -> Tensor:
    for block, kv in zip(blocks, kvs):
        x = block(x, rope, kv)
    return x


def compile_blocks(model: nn.Module, fixed: Sequence[Tensor] = ()) -> list[tuple[Callable, int]]:
    """The transformer blocks of ``model`` in groups of ``group_size`` consecutive blocks, each
    group one call of a function compiled by inductor with dynamic shapes (``CausalLM.run``'s
    ``blocks``); the modules themselves stay as they are (prefill runs them eagerly).

    Every group runs the same code on blocks of the same structure (their weights are inputs of
    the graph, not constants), so one compilation serves all groups: the compile time of a
    group, not of the whole model. A call costs dynamo's guard check and graph entry (~0.17 ms
    on 2 cores), so a group of six blocks pays it once where six compiled blocks paid it six
    times: the SmolLM2-shaped decode step (30 layers, batch 32) went from 75-77 ms with one
    block per call to 69.5-72 ms in groups of six, and the hidden-512 one from 14.0-15.6 to
    13.7-14.2 ms (alternating runs). It compiles again for the batch of one
    (size 1 specialises) and for a step without adapters; the recompile limit is raised to
    hold them.

    ``fixed``: inputs whose shapes never change (the KV cache, the slot tables), marked static:
    fixed-shape inputs of the graph. Dynamic, they gave every layer's k, v, A and B symbols of
    their own, whose guards sympy simplified for most of the compile (a group of six SmolLM2
    blocks: 43 s with inductor's cache warm, 10.5 s static).
    """
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    # Process-wide settings (they apply to any other torch.compile of this process):
    # the recompile limit per code object (its name before torch 2.7: cache_size_limit) ...
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            break
    # ... and sizes that happen to be equal once (batch 32, 32 KV rows) are not assumed equal
    if hasattr(fx_config, "use_duck_shape"):
        fx_config.use_duck_shape = False
    for t in fixed:
        torch._dynamo.mark_static(t)
    layers = tuple(model.body[model.spec.names.layers])
    size = group_size(len(layers))
    run = torch.compile(_run_group, dynamic=True)
    return [
        (functools.partial(run, layers[first : first + size]), size)
        for first in range(0, len(layers), size)
    ]
