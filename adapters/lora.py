"""LoRA: one math, two shapes.

For a frozen linear layer ``W: in -> out`` a LoRA adapter adds a low-rank path::

    y = x W^T + b  +  s * (x A) B          A: [in, r]   B: [r, out]   s: scalar

      x ──► W (frozen) ───────────────────┐
      │                                   + ──► y
      └──► A [in, r] ──► B [r, out] ──► s ┘

Why B starts at zero: a fresh adapter then leaves the model exactly as it was, and training moves
it away from the base smoothly. Why A is kaiming-uniform: it keeps ``x A`` at the scale of ``x``.

What ``s`` is depends on who made the adapter (the file records which, see
``loraserve.adapters.format``):

- the classic formulation (``LoRALayer(in, out, rank, alpha)``): ``s = alpha``;
- PEFT: ``s = lora_alpha / r``; with ``use_rslora``: ``s = lora_alpha / sqrt(r)`` (``peft_scale``).

Two shapes of the same math live here:

- Training shape: ``LoRALayer`` / ``LinearWithLoRA`` / ``replace_linear_with_lora``. One adapter,
  trainable ``A`` and ``B``, swapped into an already-built model by walking its module tree.
- Serving shape: ``BatchedLoRALinear``. One frozen linear plus a preallocated *slot table* of many
  adapters (``A`` stored transposed as ``[slots+1, r_max, in]``, ``B: [slots+1, r_max, out]``,
  slot 0 all zeros = base only, ranks zero-padded, ``s`` folded into ``B``). Every token of a
  batch names its slot (or a weighted mixture of slots), so one forward serves rows of
  different adapters. The per-step routing lives in a ``LoRAContext`` shared by all batched
  layers of a model; the engine sets it once per forward, so the model code knows nothing
  about LoRA.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence

import regex
import torch
from loraserve.adapters.kernels import Segments, make_kernels
from torch import Tensor, nn

Targets = str | Sequence[str] | None

# What PEFT's "all-linear" shortcut means for a causal LM: every Linear except the output head.
ALL_LINEAR = "all-linear"
_OUTPUT_HEADS = ("lm_head",)


def peft_scale(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALayer(nn.Module):
    """The low-rank path alone: ``s * (dropout(x) @ A @ B)``; ``s = alpha`` unless ``scale``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        scale: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scale = float(alpha if scale is None else scale)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # Same init as nn.Linear's weight (kaiming-uniform, a=sqrt(5)); A is stored transposed, so
        # init the [r, in] view to get fan_in = in_dim.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> Tensor:
        """``s * A @ B`` as a ``[in, out]`` matrix (what merging adds to ``W^T``)."""
        return self.scale * (self.A @ self.B)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (self.dropout(x) @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable ``LoRALayer``: ``linear(x) + lora(x)``.

    ``merge()`` folds the delta into the linear weight for inference and ``unmerge()`` takes it
    out again; both are idempotent.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        scale: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.linear = linear
        self.linear.requires_grad_(False)
        w = linear.weight
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, scale, dropout)
        self.lora.to(device=w.device, dtype=w.dtype)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.linear.weight += self.lora.delta_weight().T.to(self.linear.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.linear.weight -= self.lora.delta_weight().T.to(self.linear.weight.dtype)
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.linear(x)
        return self.linear(x) + self.lora(x)


# --------------------------------------------------------------------------------------------
# Module-name patterns: one bounded matcher
#
# PEFT's patterns (a target_modules / exclude_modules string, rank_pattern and alpha_pattern keys,
# layers_pattern) come from adapter files and command-line flags, so they are hostile: a pattern
# like (a|aa)+$ backtracks for minutes in Python's re, holding the GIL all along. They all run
# here, on the `regex` package instead: with VERSION0 it reads a pattern as re does (re is PEFT's
# engine), its matches take a timeout and release the GIL, so a costly pattern costs one loader
# thread a bounded time and stalls no other thread.

MATCH_BUDGET_S = 0.5  # matching time for all the patterns of one adapter file or one flag
# `regex` unrolls counted repeats when it compiles: (?:a{1000}){1000} takes 2 GB and seconds to
# compile, before any timeout applies. Bound on len(pattern) x the product of all minimum counts,
# which over-estimates the unrolled size; at the bound a compile costs under 10 MB and 20 ms.
MAX_UNROLLED = 1 << 16

_COUNTED_REPEAT = re.compile(r"\{(\d+)(?:,\d*)?\}")
# Where regex VERSION0 and re read the same text differently: regex takes "{e<=1}"-style braces
# as fuzzy matching and "[[:alpha:]]" as a POSIX class, re takes both literally. Refused, so a
# pattern always means what it means to PEFT.
_NOT_RE_SYNTAX = re.compile(r"\{(?!\d*(?:,\d*)?\})|\[:")


class PatternError(ValueError):
    """A module-name pattern we will not run: invalid, not re's syntax, or too costly."""


class MatchBudget:
    """The time left for matching the patterns of one file (or flag).

    One budget threaded through every match of a read bounds the read's total matching time,
    however many patterns and module names the file holds: at most ``seconds`` plus the
    overshoot of the one match that times out (`regex` looks at its clock every so many steps;
    a few tens of ms past a 0.5 s timeout).
    """

    def __init__(self, seconds: float = MATCH_BUDGET_S):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def compile_pattern(pattern: str, template: str = "{}", what: str = "pattern") -> regex.Pattern:
    """``template.format(pattern)`` compiled by `regex` to mean what it means to ``re``.

    ``template`` wraps a pattern the way PEFT uses it (``(.*\\.)?({})$`` for a pattern key);
    ``what`` names the pattern in errors. Raises ``PatternError``: not a string, syntax that
    regex and re read differently, counted repeats too large to compile, or invalid for re.
    """
    if not isinstance(pattern, str):
        raise PatternError(f"{what} {pattern!r} is not a string")
    try:
        return _compile(template.format(pattern))
    except PatternError as e:
        raise PatternError(f"{what} {pattern!r} {e}") from None


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> regex.Pattern:
    """Raises ``PatternError`` with the reason alone; ``compile_pattern`` names the pattern."""
    if _NOT_RE_SYNTAX.search(source):
        raise PatternError(
            "uses syntax that Python's re reads differently ('{' not starting a counted repeat "
            "such as {2} or {1,3}, or a '[:' POSIX class)"
        )
    if _unrolled_size(source) > MAX_UNROLLED:
        raise PatternError(
            f"has counted repeats too large to compile (over {MAX_UNROLLED} characters once "
            "unrolled)"
        )
    try:
        re.compile(source)  # PEFT's engine must accept it too
        return regex.compile(source, flags=regex.VERSION0)
    except (re.error, regex.error) as e:
        raise PatternError(f"is not a valid regex ({e})") from None


def _unrolled_size(source: str) -> int:
    """An over-estimate of ``source``'s size once `regex` has unrolled its counted repeats."""
    size = len(source)
    for count in _COUNTED_REPEAT.findall(source):
        size *= max(int(count), 1) if len(count) <= 6 else MAX_UNROLLED + 1
        if size > MAX_UNROLLED:
            break
    return size


def bounded_match(
    pattern: str,
    name: str,
    budget: MatchBudget | None = None,
    *,
    template: str = "{}",
    full: bool = False,
    what: str = "pattern",
) -> regex.Match | None:
    """``re.fullmatch`` (``full``) or ``re.match`` of ``template.format(pattern)`` on ``name``.

    Within what is left of ``budget`` (a fresh ``MatchBudget`` when None); ``PatternError`` when
    the pattern is refused (see ``compile_pattern``) or the budget runs out.
    """
    compiled = compile_pattern(pattern, template, what)
    budget = MatchBudget() if budget is None else budget
    left = budget.left()
    if left > 0:
        match = compiled.fullmatch if full else compiled.match
        try:
            return match(name, timeout=left, concurrent=True)
        except TimeoutError:
            pass
    raise PatternError(
        f"{what} {pattern!r} was too costly to match: matching it against {name!r} ran past "
        f"the {budget.seconds:g} s budget for one file's (or flag's) patterns"
    )


# --------------------------------------------------------------------------------------------
# Finding and swapping layers


def match_target(name: str, targets: Targets, *, budget: MatchBudget | None = None) -> bool:
    """Does module ``name`` match ``targets``, with PEFT's ``target_modules`` semantics?

    - a list of names: the module name equals one, or ends with ``"." + one``;
    - a string: a regular expression the whole module name must match (``bounded_match``: a
      pattern too costly to match raises ``PatternError``, a ``ValueError``);
    - ``"all-linear"``: every module (the caller restricts to Linear) except the output head;
    - ``None``: everything but the output head, like ``"all-linear"``.
    """
    if targets is None or targets == ALL_LINEAR:
        return name.rsplit(".", 1)[-1] not in _OUTPUT_HEADS
    if isinstance(targets, str):
        return bounded_match(targets, name, budget, full=True) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _base_linear(module: nn.Module) -> nn.Linear | None:
    """The frozen Linear inside ``module`` (itself, or the one a LoRA wrapper holds)."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, (LinearWithLoRA, BatchedLoRALinear)):
        return module.linear
    return None


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every adaptable linear layer of ``model``: name -> ``(in_features, out_features)``."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (LinearWithLoRA, BatchedLoRALinear)):
            shapes[name] = (module.linear.in_features, module.linear.out_features)
        elif isinstance(module, nn.Linear) and not _inside_wrapper(name, shapes):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def _inside_wrapper(name: str, seen: dict[str, tuple[int, int]]) -> bool:
    return name.endswith(".linear") and name[: -len(".linear")] in seen


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def target_names(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the plain Linear layers of ``model`` that ``targets`` selects, in module order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and match_target(name, targets)
    ]


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Targets = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Swap every targeted ``nn.Linear`` of ``model`` for a ``LinearWithLoRA``, in place.

    Returns the names swapped. Raises ``ValueError`` when ``targets`` selects nothing, since a
    LoRA that adapts no layer is always a mistake (a misspelt target name).
    """
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"no Linear layer matches target modules {targets!r}")
    for name in names:
        _swap(model, name, LinearWithLoRA(model.get_submodule(name), rank, alpha, scale, dropout))
    return names


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything in ``model`` but the LoRA ``A`` and ``B`` matrices."""
    model.requires_grad_(False)
    for _, param in lora_parameters(model):
        param.requires_grad_(True)


def lora_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """The trainable (A, B) parameters of every LoRALayer in ``model``."""
    for name, param in model.named_parameters():
        if ".lora." in f".{name}" and name.rsplit(".", 1)[-1] in ("A", "B"):
            yield name, param


# --------------------------------------------------------------------------------------------
# Serving: many adapters in one batch


Route = int | Sequence[tuple[int, float]]  # a row's slot, or its mixture: (slot, weight) pairs


class LoRAContext:
    """Which adapter slot every token of the current forward uses; shared by all batched layers.

    The engine routes once per model forward, on the host: it knows each row's route as Python
    values, so ``set_rows`` derives everything every layer would otherwise recompute from them
    and copies the few tensors it needs to the device. Nothing is read back from the device
    (a forward with routing built this way has no host sync, which CUDA graphs and compilation
    need). ``set_slots`` takes a per-token tensor instead (tests, and rows that mix slots); it
    reads it back once.

    A row's route is one slot, or a *mixture*: up to ``K`` ``(slot, weight)`` pairs whose
    deltas add up, ``y += sum_k w_k * (x A[s_k]) B[s_k]`` (``B`` holds each adapter's scale, so
    this is PEFT's ``add_weighted_adapter(combination_type="cat")`` computed at run time, with no
    merged weights). A forward with a mixture routes every row through ``width`` columns (a
    plain row is ``(s, 1)`` then padding ``(0, 0)``); the weight multiplies the rank-r
    intermediate, so weight 1 gives the plain result bit for bit, and a one-member mixture of
    weight 1 is routed as the plain slot. Derived:

    - ``single``: the one slot every token uses, when there is exactly one (no gather needed);
    - ``row_slots``: ``[B]`` on the device, when each row uses one slot (always so in the
      engine: a row is one sequence), so layers gather per row, not per token; ``[B, width]``
      with ``row_weights [B, width]`` (float32) when rows mix adapters;
    - ``slots``: ``[T]`` per-token slots on the device (the loop and per-token paths); ``[T,
      width]`` with ``weights [T, width]`` when rows mix adapters;
    - ``segments``: ``(slot, token indices, weights or None)`` per distinct non-zero slot, for
      ``"segment"``;
    - ``rank``: the largest adapter rank among the slots in use (layers read only those ranks).
    """

    def __init__(self) -> None:
        self.slots: Tensor | None = None  # [T] (or [T, width]) long, flattened [B, S] order
        self.weights: Tensor | None = None  # [T, width] float32 when rows mix adapters
        self.width = 1  # slots per token: 1, or the widest mixture of this forward
        self.single: int | None = None
        self.row_slots: Tensor | None = None  # [B] (or [B, width]) long
        self.row_weights: Tensor | None = None  # [B, width] float32 when rows mix adapters
        self._token_slots: list = []  # host copy of ``slots``: ints, or (slot, weight) pairs
        self._prefill_rows: tuple | None = None  # (row slots, seq_len, device) of a prefill
        self._kernel_segments: Segments | None = None
        self._segments: list[tuple[int, Tensor, Tensor | None]] | None = []
        self.active = False  # any token on a non-zero slot?
        self.rank = 0  # the largest adapter rank among this forward's slots
        self.slot_rank: dict[int, int] = {}  # filled slot -> its adapter's rank
        self.rank_probe: Tensor | None = None  # static steps: the rank as a tensor's size
        # one-token rows through a native op (``kernels.cpu.lora_rows``) instead of gather +
        # bmm; set by the runtime at start-up when it is available (CPU, float32)
        self.row_op: Callable[..., Tensor] | None = None

    def set_rows(
        self, row_slots: Sequence[Route], seq_len: int, device: torch.device | str = "cpu"
    ) -> None:
        """Row ``b``'s ``seq_len`` tokens all use route ``row_slots[b]``: a slot (0 = the base
        model), or a mixture's ``(slot, weight)`` pairs."""
        rows = [plain_route(r) for r in row_slots]
        if all(isinstance(r, int) for r in rows):
            self._route([s for s in rows for _ in range(seq_len)], rows, device)
            if seq_len > 1 and self.active:  # prefill rows: SGMV segments, built if asked
                self._prefill_rows = (rows, seq_len, device)
            return
        mixed = [route_pairs(r) for r in rows]
        width = max(len(m) for m in mixed)
        padded = [(*m, *[(0, 0.0)] * (width - len(m))) for m in mixed]
        self._reset()
        self._token_slots = [m for m in padded for _ in range(seq_len)]
        self.width = width
        ids = {s for m in mixed for s, _ in m} - {0}
        self.active = bool(ids) and seq_len > 0
        if not self.active:
            self.slots = torch.zeros(len(rows) * seq_len, dtype=torch.long).to(device)
            return
        self.rank = max(self.slot_rank.get(i, 1 << 30) for i in ids)

        def tensors(per: list) -> tuple[Tensor, Tensor]:
            slots = torch.tensor([[s for s, _ in m] for m in per], dtype=torch.long)
            weights = torch.tensor([[w for _, w in m] for m in per], dtype=torch.float32)
            return slots.to(device, non_blocking=True), weights.to(device, non_blocking=True)

        self.row_slots, self.row_weights = tensors(padded)
        self.slots, self.weights = tensors(self._token_slots)
        self._segments = None  # built on first use: only "segment" needs them

    def set_slots(self, slots: Tensor) -> None:
        """``slots``: one slot id per token, ``[B, S]`` or ``[T]``; 0 means the base model."""
        tokens = slots.reshape(-1).long().tolist()
        rows = None
        if slots.dim() == 2 and slots.shape[1] > 0:
            width = slots.shape[1]
            per_row = [tokens[i : i + width] for i in range(0, len(tokens), width)]
            if all(len(set(r)) == 1 for r in per_row):
                rows = [r[0] for r in per_row]
        self._route(tokens, rows, slots.device)

    def set_static(
        self,
        row_slots: Tensor,
        rank: int,
        rank_probe: Tensor | None = None,
        row_weights: Tensor | None = None,
    ) -> None:
        """A static decode step's routing: one token per row, row ``b`` on ``row_slots[b]`` (a
        preallocated device buffer the step fills; ``[b, K]`` with ``row_weights [b, K]`` for
        a step whose rows may mix adapters), every layer computing with ``rank`` (a rank
        bucket; 0 = no row uses an adapter, the LoRA path is skipped). Same shapes and same
        code path whatever the slots: no one-adapter shortcut, no host copy of the slots (only
        the ``gather`` and ``triton`` backends take this routing).

        ``rank_probe``: a tensor of shape ``[rank]`` whose *size* the gather path reads as the
        rank, so a block compiled with dynamic shapes serves every rank bucket with one graph
        (a Python int would be a constant of the graph, one compilation per bucket)."""
        self._reset()
        self.slots = self.row_slots = row_slots
        self.weights = self.row_weights = row_weights
        self.width = 1 if row_weights is None else row_slots.shape[1]
        self.active = rank > 0
        self.rank = rank
        self.rank_probe = rank_probe

    def _reset(self) -> None:
        self.single, self.row_slots, self.row_weights, self._segments = None, None, None, []
        self.weights, self.width, self.rank_probe = None, 1, None
        self._prefill_rows, self._kernel_segments = None, None
        self._token_slots = []

    def _route(self, tokens: list[int], rows: list[int] | None, device) -> None:
        self._reset()
        self._token_slots = tokens
        self.slots = torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True)
        ids = sorted(set(tokens)) or [0]
        self.active = ids != [0]
        if not self.active:
            return
        # slots filled without the table (tests) count as full rank
        self.rank = max(self.slot_rank.get(i, 1 << 30) for i in ids if i != 0)
        if len(ids) == 1:
            self.single = ids[0]
            return
        if rows is not None:
            self.row_slots = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        self._segments = None  # built on first use: only "segment" needs them

    @property
    def kernel_segments(self) -> Segments | None:
        """A prefill's rows as kernel ``Segments`` (SGMV), built on first use: only the
        ``triton`` backend asks, once per forward; None for a decode step."""
        if self._kernel_segments is None and self._prefill_rows is not None:
            rows, seq_len, device = self._prefill_rows
            self._kernel_segments = Segments.from_rows(rows, [seq_len] * len(rows), device)
        return self._kernel_segments

    @property
    def segments(self) -> list[tuple[int, Tensor, Tensor | None]]:
        """``(slot, token indices, weights)`` per distinct non-zero slot of this forward; the
        weights (one per index, float32) are None unless rows mix adapters."""
        if self._segments is None:
            device = self.slots.device
            by_slot: dict[int, tuple[list[int], list[float]]] = {}
            for t, route in enumerate(self._token_slots):
                for slot, weight in route_pairs(route):
                    if slot:
                        idx, weights = by_slot.setdefault(slot, ([], []))
                        idx.append(t)
                        weights.append(weight)

            def tensor(values, dtype):
                return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

            self._segments = [
                (
                    slot,
                    tensor(idx, torch.long),
                    tensor(weights, torch.float32) if self.weights is not None else None,
                )
                for slot, (idx, weights) in sorted(by_slot.items())
            ]
        return self._segments

    def clear(self) -> None:
        self.set_rows([], 0)


def route_pairs(route: Route) -> tuple[tuple[int, float], ...]:
    """``route`` as ``(slot, weight)`` pairs: a plain slot is itself at weight 1."""
    return ((route, 1.0),) if isinstance(route, int) else tuple(route)


def plain_route(route: Route) -> Route:
    """``route`` as a plain slot when it is one: an int, or a one-member mixture of weight 1
    (which therefore computes exactly what the plain adapter does)."""
    if isinstance(route, int):
        return route
    pairs = tuple((int(s), float(w)) for s, w in route)
    if not pairs:
        raise ValueError("a mixture route needs at least one (slot, weight) pair")
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return pairs


class BatchedLoRALinear(nn.Module):
    """A frozen linear plus a slot table of adapters; each token picks its slot.

    Semantics (the reference loop, ``backend="loop"``)::

        y = linear(x)
        for t in range(T):
            s = slots[t]
            y[t] += (x[t] @ A[s]) @ B[s]          # B[s] already holds the adapter's scale
            # a token of a mixture row: for (s, w) in its pairs: y[t] += w * (x[t] @ A[s]) @ B[s]

    Backends, chosen once at construction:

    - ``"loop"``: the loop above, one token at a time. The reference; slow.
    - ``"segment"``: group tokens by slot (grouping done once per step in ``LoRAContext``), one
      ``x_g @ A[s] @ B[s]`` per distinct adapter. One Python-level matmul pair per adapter: fine
      for a few adapters, slow for many.
    - ``"gather"`` (the server's default): gather each *row's* ``A``/``B`` (``[B, in, r]``) and
      run two batched matmuls over ``x: [B, S, in]``, for prefill and decode alike; when slots
      vary inside a row, gather per token instead (BGMV semantics). Two kernels whatever the
      number of adapters.

    - ``"triton"``: the shrink/expand kernels of ``loraserve.adapters.kernels`` (BGMV for
      decode, SGMV over the rows' segments for prefill), fp32 accumulation; on CUDA, or on CPU
      under ``TRITON_INTERPRET=1`` (tests). Off by default until it has run on a GPU.
    The fast paths take ``x @ A[s] @ B[s]`` directly when every token uses the same slot.

    Slot 0 is all zeros and means "base only", so a mixed batch needs no special case.

    ``dtype``: the tables' dtype, by default the Linear's. A narrower one (bfloat16 tables on a
    float32 model, ``--lora-dtype``) halves the bytes a step with many adapters reads: adapters
    are rounded to it when a slot is filled, and every path computes in the input's dtype (the
    native CPU op widens each value as it streams the tables). Not with ``"triton"``.
    """

    BACKENDS = ("loop", "segment", "gather", "triton")

    def __init__(
        self,
        linear: nn.Linear,
        max_slots: int,
        max_rank: int,
        context: LoRAContext,
        backend: str = "segment",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if backend not in self.BACKENDS:
            raise ValueError(f"unknown LoRA backend {backend!r}; choose from {self.BACKENDS}")
        self.linear = linear
        self.linear.requires_grad_(False)
        self.context = context
        self.backend = backend
        self.max_rank = max_rank
        w = linear.weight
        if backend == "triton" and dtype not in (None, w.dtype):
            raise ValueError(
                f"the triton LoRA backend keeps the slot tables in the layer's dtype ({w.dtype}), "
                f"not {dtype}"
            )
        kw = {"device": w.device, "dtype": dtype or w.dtype}
        # A: [slots+1, r_max, in] (stored transposed, so the first r ranks of a slot are one
        # contiguous block)   B: [slots+1, r_max, out]   slot 0 stays zero forever.
        self.register_buffer("A", torch.zeros(max_slots + 1, max_rank, linear.in_features, **kw))
        self.register_buffer("B", torch.zeros(max_slots + 1, max_rank, linear.out_features, **kw))
        self._forward_delta = {
            "loop": self._delta_loop,
            "segment": self._delta_segment,
            "gather": self._delta_gather,
            "triton": self._delta_kernels,
        }[backend]
        if backend == "triton":  # chosen once: raises KernelUnavailable here, not in a forward
            self.kernels = make_kernels("triton", w.device)

    @property
    def num_slots(self) -> int:
        return self.A.shape[0] - 1

    @torch.no_grad()
    def set_slot(self, slot: int, A: Tensor, B: Tensor, scale: float) -> None:
        """Fill ``slot`` (1..num_slots) with ``A: [in, r]``, ``B: [r, out]``; s folded into B."""
        if not 1 <= slot <= self.num_slots:
            raise IndexError(f"slot {slot} outside 1..{self.num_slots}")
        r = A.shape[1]
        if r > self.max_rank:
            raise ValueError(f"adapter rank {r} exceeds this layer's max rank {self.max_rank}")
        if A.shape[0] != self.A.shape[2] or B.shape != (r, self.B.shape[2]):
            raise ValueError(
                f"adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit "
                f"in={self.A.shape[2]} out={self.B.shape[2]}"
            )
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.T.to(self.A.dtype)
        # Scale in float32 before rounding to the table's dtype.
        self.B[slot, :r] = (B.float() * scale).to(self.B.dtype)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.num_slots:
            raise IndexError(f"slot {slot} outside 1..{self.num_slots}")
        self.A[slot].zero_()
        self.B[slot].zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.add_delta(x, self.linear(x))

    def add_delta(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` (the base output for ``x``: this call's own fresh tensor, or a slice of one,
        which it may write in place) plus every token's LoRA delta."""
        ctx = self.context
        if not ctx.active:
            return y  # every token on slot 0: the base model
        if ctx.single is not None and self.backend != "loop":
            s, r = ctx.single, ctx.rank
            h = x @ self.A[s, :r].T.to(x.dtype)
            # into y in place: a prefill's y is tens of MB, and y + delta would write a new
            # one and a delta the size of y besides
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.B[s, :r].to(x.dtype))
            return y
        return self._forward_delta(x, y)

    def _flat(self, x: Tensor, y: Tensor, delta) -> Tensor:
        """Run ``delta(x [T, in], y [T, out])`` on flattened tokens; restore y's shape."""
        shape = y.shape
        return delta(x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1])).reshape(shape)

    def _delta_loop(self, x: Tensor, y: Tensor) -> Tensor:
        return self._flat(x, y, self._loop)

    def _loop(self, x: Tensor, y: Tensor) -> Tensor:
        routes = self.context._token_slots  # the reference: one token at a time, host-driven
        out = y.clone()
        for t, route in enumerate(routes):
            if isinstance(route, int):
                out[t] += (x[t] @ self.A[route].T.to(x.dtype)) @ self.B[route].to(x.dtype)
                continue
            for s, w in route:  # a mixture: each member's delta, weighted
                out[t] += ((x[t] @ self.A[s].T.to(x.dtype)) * w) @ self.B[s].to(x.dtype)
        return out

    def _delta_segment(self, x: Tensor, y: Tensor) -> Tensor:
        return self._flat(x, y, self._segments)

    def _segments(self, x: Tensor, y: Tensor) -> Tensor:
        out, r = y.clone(), self.context.rank
        for s, idx, weights in self.context.segments:
            h = x.index_select(0, idx) @ self.A[s, :r].T.to(x.dtype)
            if weights is not None:  # mixture members: each token's own weight
                h = h * weights.to(h.dtype)[:, None]
            out.index_add_(0, idx, h @ self.B[s, :r].to(x.dtype))
        return out

    def _delta_gather(self, x: Tensor, y: Tensor) -> Tensor:
        rows = self.context.row_slots
        if rows is not None and x.dim() == 3 and x.shape[0] == rows.shape[0]:
            # read only the ranks in use, not max_rank of zero padding
            probe = self.context.rank_probe
            r = min(self.context.rank, self.max_rank) if probe is None else probe.shape[0]
            op, weights = self.context.row_op, self.context.row_weights
            if op is not None and x.shape[1] == 1 and x.dtype == torch.float32:
                # one token per row (decode): the tables read in place, no gathered copies
                return op(x[:, 0], y[:, 0], self.A, self.B, rows, r, weights)[:, None]
            if weights is not None:  # rows mix adapters: [B, width] slots
                return y + self._mixed(x, rows, weights, r)
            A, B = self._gathered(rows, r, x.dtype)
            h = torch.bmm(x, A.transpose(1, 2))  # [B, S, r]
            return y.baddbmm_(h, B)  # [B, S, out], into y in place as above
        return self._flat(x, y, self._per_token)

    def _gathered(self, slots: Tensor, r: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``A[slots, :r]`` ``[N, r, in]`` and ``B[slots, :r]`` ``[N, r, out]`` in ``dtype``
        (the tables may be narrower than the input: only the gathered blocks are cast)."""
        A = self.A[:, :r].index_select(0, slots).to(dtype)
        return A, self.B[:, :r].index_select(0, slots).to(dtype)

    def _mixed(self, x: Tensor, slots: Tensor, weights: Tensor, r: int) -> Tensor:
        """The delta of rows that mix adapters: ``x [N, S, in]``, ``slots`` / ``weights [N,
        K]`` -> ``[N, S, out]``. Each row's K members are one rank-``K*r`` adapter (their A
        blocks stacked, their B blocks stacked, the weights on the intermediate): PEFT's "cat"
        combination, gathered per row rather than built. Padding members (slot 0) add zeros."""
        n, k = slots.shape
        A, B = self._gathered(slots.reshape(-1), r, x.dtype)  # [N*K, r, in], [N*K, r, out]
        h = torch.bmm(x, A.reshape(n, k * r, -1).transpose(1, 2))  # [N, S, K*r]
        h = h * weights.to(h.dtype).repeat_interleave(r, dim=1)[:, None, :]
        return torch.bmm(h, B.reshape(n, k * r, -1))

    def _delta_kernels(self, x: Tensor, y: Tensor) -> Tensor:
        return self._flat(x, y, self._kernels)

    def _kernels(self, x: Tensor, y: Tensor) -> Tensor:
        ctx, r = self.context, self.context.rank
        if ctx.weights is not None:  # rows mix adapters: one kernel entry per (token, member)
            return self._kernels_mixed(x, y, ctx.slots, ctx.weights, r)
        h = self.kernels.shrink(x, self.A, ctx.slots, r, segments=ctx.kernel_segments)
        y = y.contiguous()
        self.kernels.expand(h, self.B, ctx.slots, r, y, segments=ctx.kernel_segments)
        return y

    def _kernels_mixed(self, x: Tensor, y: Tensor, slots: Tensor, weights: Tensor, r: int):
        """Tokens ``[T]`` with ``slots`` / ``weights [T, K]`` through the one-slot-per-token
        kernels: each (token, member) pair is a kernel row (BGMV; padding members on slot 0 are
        skipped by the kernels), the weight applied to the fp32 intermediate, and the K
        partial deltas summed per token."""
        t, k = slots.shape
        h = self.kernels.shrink(x.repeat_interleave(k, dim=0), self.A, slots.reshape(-1), r)
        h = h * weights.reshape(-1, 1)
        parts = torch.zeros(t * k, y.shape[1], dtype=y.dtype, device=y.device)
        self.kernels.expand(h, self.B, slots.reshape(-1), r, parts)
        return y + parts.reshape(t, k, -1).sum(dim=1)

    def _per_token(self, x: Tensor, y: Tensor) -> Tensor:
        slots, r = self.context.slots, self.context.rank
        if self.context.weights is not None:  # rows mix adapters: [T, width] slots
            return y + self._mixed(x.unsqueeze(1), slots, self.context.weights, r).squeeze(1)
        A, B = self._gathered(slots, r, x.dtype)  # [T, r, in], [T, r, out]
        h = torch.bmm(x.unsqueeze(1), A.transpose(1, 2))  # [T, 1, r]
        return y + torch.bmm(h, B).squeeze(1)  # [T, out]


class LoRASlotTable:
    """All batched layers of one model, filled and cleared together by slot.

    ``fill(slot, weights)`` takes ``{module name: (A [in, r], B [r, out], scale)}``; layers the
    adapter does not name get zeros in that slot, so a slot never leaks a previous adapter.
    """

    def __init__(self, context: LoRAContext, layers: dict[str, BatchedLoRALinear]):
        self.context = context
        self.layers = layers

    @property
    def num_slots(self) -> int:
        return next(iter(self.layers.values())).num_slots if self.layers else 0

    def fill(self, slot: int, weights: dict[str, tuple[Tensor, Tensor, float]]) -> None:
        unknown = set(weights) - set(self.layers)
        if unknown:
            raise ValueError(f"no LoRA-enabled layer named {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            if name in weights:
                A, B, scale = weights[name]
                layer.set_slot(slot, A, B, scale)
            else:
                layer.clear_slot(slot)
        self.context.slot_rank[slot] = max((w[0].shape[1] for w in weights.values()), default=0)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.context.slot_rank.pop(slot, None)

    def set_token_slots(self, slots: Tensor) -> None:
        self.context.set_slots(slots)

    def set_row_slots(self, row_slots: Sequence[Route], seq_len: int, device) -> None:
        self.context.set_rows(row_slots, seq_len, device)


def replace_linear_with_batched_lora(
    model: nn.Module,
    targets: Targets,
    max_slots: int,
    max_rank: int,
    backend: str = "segment",
    dtype: torch.dtype | None = None,
) -> LoRASlotTable:
    """Swap every targeted Linear for a ``BatchedLoRALinear``; all share one new ``LoRAContext``.
    ``dtype``: the slot tables' (default: each Linear's own)."""
    context = LoRAContext()
    layers = {}
    for name in target_names(model, targets):
        linear = model.get_submodule(name)
        layer = BatchedLoRALinear(linear, max_slots, max_rank, context, backend, dtype)
        _swap(model, name, layer)
        layers[name] = layer
    if not layers:
        raise ValueError(f"no Linear layer matches target modules {targets!r}")
    return LoRASlotTable(context, layers)
