"""The engine: one thread owns the model and turns requests into streams of tokens.

Contract. The engine works on token ids, adapter names and ``SamplingParams``; it knows nothing
of gRPC or protobuf. ``submit`` is thread-safe and returns a ``RequestHandle`` whose events
(``TokenEvent``s, then one ``FinishEvent``) are delivered through a callback, so a thread can
iterate them and an asyncio server can forward them with ``call_soon_threadsafe``.

Continuous batching. Every ``step``:

1. drops cancelled and timed-out sequences (their KV row and adapter slot are freed at once);
2. admits waiting requests in arrival order while KV rows are free and the prefill token budget
   lasts (at least one per step, so a long prompt is never starved). A request whose adapter is
   not in a device slot yet asks the adapter cache to load it and stays queued *without*
   blocking requests behind it whose adapters are ready;
3. prefills the admitted prompts in one forward (right-padded) and samples their first token;
4. decodes one token for every sequence that was already running, in one forward.

Rows of different adapters share each forward: every token carries its adapter's slot in the
batched LoRA layers (``loraserve.adapters.lora.BatchedLoRALinear``), slot 0 being the base model.
A request may mix adapters (``GenerationRequest.mixture``): its rows carry every member's slot
and weight, and it is admitted once all its members are pinned in slots at the same time.

Structured output (``params.constraint``): the constraint is compiled when the request is
submitted (on the caller's thread; ``loraserve.server.grammar``), each admitted request gets its
own matcher, and every step fills the constrained rows' token masks on a helper thread while
the forward runs, then sets their disallowed logits to -inf before sampling. A row ends (STOP)
when its format is complete. Unconstrained rows are never touched.

KV cache: static per-sequence rows. ``max_batch_size`` rows of ``max_seq_len`` positions are
allocated once at start-up; a sequence takes a free row when admitted and gives it back the step
it finishes. We chose this over a paged cache because with plain PyTorch attention a paged cache
needs a gather of each row's blocks on every step, which costs more than it saves at the batch
sizes a LoRA server runs on one device, and because the memory bound is fixed and known at
start-up (a server never runs out of cache mid-request). The price is that a short sequence
reserves a full row; ``max_seq_len`` is the knob.

Batch invariance: each row's logits depend only on its own tokens (padding and stale cache
entries are masked by position), and sampling uses the row's own generator, so a request's
greedy output is the same alone or in any batch.

Isolation: one request can only fail itself. A sequence clears the KV positions it wrote when it
gives its row back, so a later sequence on that row cannot read what a broken adapter left there
(a masked NaN still poisons attention); a row whose logits are not finite, or whose draw fails,
finishes with an error while the rest of the batch goes on.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from loraserve.adapters.tokenizer import IncrementalDetokenizer
from loraserve.server.errors import (
    InvalidRequest,
    NonFiniteLogits,
    QueueFull,
    ServingError,
    ShuttingDown,
)
from loraserve.server.grammar import check as grammar_check
from loraserve.server.resources import available_cpus
from loraserve.server.sampling import (
    MAX_LOGPROBS,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MIN_TEMPERATURE,
    SamplingParams,
    TokenLogprob,
    make_generator,
    prompt_logprobs,
    sample,
    torch_row_max,
)

log = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_new_tokens or the end of the KV row
    CANCELLED = "cancelled"  # client cancel, deadline, or shutdown
    ERROR = "error"  # the request failed; FinishEvent.error says why


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    max_seq_len: int = 512
    max_queue: int = 256
    # prompt tokens admitted per step; bounds how long running decodes wait for a prefill
    prefill_token_budget: int = 2048
    max_mixture: int = 4  # most adapters one request may mix


MAX_MIXTURE_WEIGHT = 100.0  # |weight| of a mixture member


@dataclass(frozen=True)
class MixtureMember:
    """One adapter of a mixture and its weight: the request's rows get
    ``sum_i weight_i * s_i * (x A_i) B_i`` (PEFT's ``add_weighted_adapter(...,
    combination_type="cat")``, computed at run time)."""

    name: str
    weight: float


def mixture_name(members: tuple[MixtureMember, ...]) -> str:
    """How a mixture is spelled in logs and in the OpenAI API's ``model``: ``a:0.7+b:0.3``."""
    return "+".join(f"{m.name}:{m.weight:g}" for m in members)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str = ""  # "" = the base model
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    # several adapters at once, weighted (``adapter`` is then ""); () = not a mixture
    mixture: tuple[MixtureMember, ...] = ()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters the request uses: its mixture's members, its adapter, or none."""
        if self.mixture:
            return tuple(m.name for m in self.mixture)
        return (self.adapter,) if self.adapter else ()

    @property
    def target(self) -> str:
        """What the request runs on, for logs and errors: the adapter, the spelled mixture,
        or "" for the base model."""
        return mixture_name(self.mixture) if self.mixture else self.adapter


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]
    text: str
    # one per token id, when the request asked for logprobs
    logprobs: list[TokenLogprob] | None = None
    # the prompt's (params.prompt_logprobs), in one event of no tokens right after the prefill
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str = ""
    error: ServingError | None = None
    # a mixture's members as (name, version), in the request's order; () otherwise
    adapter_versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    adapter_versions: tuple[tuple[str, str], ...] = ()


Event = TokenEvent | FinishEvent


class RequestHandle:
    """The caller's side of one request: events arrive through ``on_event`` (default: a queue)."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None):
        self.request = request
        self._queue: queue.SimpleQueue[Event] | None = None
        if on_event is None:
            self._queue = queue.SimpleQueue()
            on_event = self._queue.put
        self.on_event = on_event
        self.cancelled = threading.Event()
        self._outcome: Completion | ServingError | None = None
        self.grammar = None  # the compiled constraint's template, when the request has one

    def cancel(self) -> None:
        """Stop generating; the engine frees the sequence at its next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this handle delivers events to a callback")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self) -> Completion:
        """Block until the request finishes; raise its error if it failed. Idempotent."""
        if self._outcome is None:
            text, ids = [], []
            logprobs: list[TokenLogprob] | None = None
            prompt: list[TokenLogprob] | None = None
            for event in self:
                if isinstance(event, TokenEvent):
                    text.append(event.text)
                    ids.extend(event.token_ids)
                    if event.logprobs is not None:
                        logprobs = (logprobs or []) + event.logprobs
                    if event.prompt_logprobs is not None:
                        prompt = event.prompt_logprobs
            if logprobs is None and self.request.params.logprobs is not None:
                logprobs = []
            self._outcome = event.error or Completion(
                "".join(text),
                ids,
                event.reason,
                event.prompt_tokens,
                event.completion_tokens,
                event.adapter_version,
                logprobs,
                prompt,
                event.adapter_versions,
            )
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome


class BaseOnlyAdapters:
    """The adapter side of an engine that serves the base model alone (mock-model tests)."""

    def resolve(self, name: str):
        from loraserve.server.errors import AdapterNotFound

        raise AdapterNotFound(name)

    def acquire(self, name: str):
        raise AssertionError("unreachable")

    def release(self, slot: int) -> None:
        pass

    def set_row_slots(self, row_slots: list[int], seq_len: int, device) -> None:
        pass


@dataclass(frozen=True)
class Placement:
    """Where a request's adapters sit while it runs: its route for the LoRA layers (a slot, 0 =
    the base model, or a mixture's ``(slot, weight)`` pairs), the slots it pins, and the
    versions it runs (one per mixture member)."""

    route: int | tuple[tuple[int, float], ...]
    slots: tuple[int, ...]
    versions: tuple[str, ...]


BASE_PLACEMENT = Placement(0, (), ())


class _Sequence:
    """One admitted request: its KV row, adapter slots, generated tokens and text state."""

    def __init__(
        self, handle: RequestHandle, row: int, placement: Placement, detok, t_arrival: float
    ):
        self.handle = handle
        self.request = handle.request
        self.params = handle.request.params
        self.row = row
        self.placement = placement
        self.route = placement.route
        # the plain adapter's version ("" for the base model and for mixtures, whose members'
        # versions are reported one by one)
        plain = placement.versions and not handle.request.mixture
        self.version = placement.versions[0] if plain else ""
        self.generator = make_generator(self.params)
        # structured output: this request's own matcher (a copy of the compiled template)
        self.matcher = handle.grammar.deep_copy() if handle.grammar is not None else None
        self.prompt_len = len(self.request.prompt_ids)
        self.position = self.prompt_len  # where last_token's k/v go on the next decode
        self.kv_written = 0  # KV positions [0, kv_written) of its row this sequence wrote
        self.last_token = self.request.prompt_ids[-1]
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # per generated token, when params.logprobs
        self.detok = detok
        self.stop_tail = StopTail(self.params.stop)
        self.held_back = 0  # trailing chars of text that may begin a stop string
        self.text = ""  # detokenized so far (held-back part included)
        self.emitted = 0  # chars of self.text already sent
        self.reported_ids = 0  # token ids already sent
        self.t_arrival = t_arrival
        self.t_last = t_arrival


class Engine:
    """Owns the model; ``start()`` runs ``step()`` on a thread of its own."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache,
        tokenizer,
        config: EngineConfig,
        adapters=None,
        metrics=None,
        device: torch.device | str = "cpu",
        decoder=None,
        grammars=None,
        row_max=torch_row_max,
    ):
        self.model = model
        self.row_max = row_max  # each row's largest logit and its index (``sampling.sample``)
        self.decoder = decoder  # a DecodeStep (static shapes, compiled), or None: eager
        self.grammars = grammars  # structured output (``loraserve.server.grammar.Grammars``)
        self._masks: ThreadPoolExecutor | None = None  # fills token masks during a forward
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.config = config
        self.adapters = adapters if adapters is not None else BaseOnlyAdapters()
        self._begin_admission = getattr(self.adapters, "begin_admission", lambda: None)
        self.metrics = metrics
        self.device = torch.device(device)
        # a CPU the forward leaves free (a GPU's forward leaves them all): overlap the masks
        self._spare_cpu = self.device.type != "cpu" or available_cpus() > torch.get_num_threads()
        self.eos_ids = frozenset(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.vocab_size = tokenizer.vocab_size

        self._lock = threading.Condition()
        self._waiting: deque[tuple[RequestHandle, float]] = deque()
        self._running: list[_Sequence] = []
        self._free_rows = list(range(config.max_batch_size))  # a heap: the lowest row first
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the caller's side

    def submit(
        self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None
    ) -> RequestHandle:
        """Validate and enqueue; raises ``InvalidRequest``, ``QueueFull``, ``ShuttingDown``,
        ``AdapterNotFound`` / ``AdapterUnavailable`` synchronously so callers get them at once."""
        self.validate(request)
        for name in request.adapter_names:
            self.adapters.resolve(name)
        handle = RequestHandle(request, on_event)
        if request.params.constraint is not None:  # compiled here, never on the engine thread
            handle.grammar = self.grammars.compile(request.params.constraint)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("server is shutting down; not accepting new requests")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"request queue is full ({self.config.max_queue} waiting)")
            self._waiting.append((handle, time.monotonic()))
            self._lock.notify()
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        return self.submit(request).result()

    def validate(self, request: GenerationRequest) -> None:
        ids, p, cfg = request.prompt_ids, request.params, self.config
        if request.mixture:
            self._validate_mixture(request)
        if not ids:
            raise InvalidRequest("prompt", "is empty (give prompt text or prompt_token_ids)")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                "prompt_token_ids",
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
            )
        if len(ids) >= cfg.max_seq_len:
            raise InvalidRequest(
                "prompt",
                f"{len(ids)} tokens does not fit max_seq_len {cfg.max_seq_len} "
                "(the prompt plus at least one generated token must fit)",
            )
        least = 0 if p.prompt_logprobs is not None else 1  # 0: score the prompt only
        if not least <= p.max_new_tokens <= cfg.max_seq_len:
            raise InvalidRequest(
                "params.max_new_tokens",
                f"must be in [{least}, {cfg.max_seq_len}], got {p.max_new_tokens}"
                + (" (0 only with prompt_logprobs)" if least else ""),
            )
        for name, k in (("logprobs", p.logprobs), ("prompt_logprobs", p.prompt_logprobs)):
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidRequest(f"params.{name}", f"must be in [0, {MAX_LOGPROBS}], got {k}")
        if not (p.temperature == 0 or MIN_TEMPERATURE <= p.temperature < math.inf):
            raise InvalidRequest(  # also refuses NaN
                "params.temperature",
                f"must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, got {p.temperature}",
            )
        if not 0 < p.top_p <= 1:
            raise InvalidRequest("params.top_p", f"must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise InvalidRequest("params.top_k", f"must be >= 0 (0 = off), got {p.top_k}")
        if len(p.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in p.stop):
            raise InvalidRequest(
                "params.stop",
                f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} chars",
            )
        if p.constraint is not None:
            if self.grammars is None:
                raise InvalidRequest("params.constraint", "this server has no grammar engine")
            grammar_check(p.constraint)

    def _validate_mixture(self, request: GenerationRequest) -> None:
        members, most = request.mixture, self.config.max_mixture
        if request.adapter:
            raise InvalidRequest("adapters", "give adapter or adapters (a mixture), not both")
        if len(members) > most:
            raise InvalidRequest(
                "adapters", f"{len(members)} adapters; this server mixes at most {most}"
            )
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise InvalidRequest("adapters", f"names {twice!r} more than once")
        for i, m in enumerate(members):
            if not m.name:
                raise InvalidRequest(f"adapters[{i}].name", "is empty")
            if not abs(m.weight) <= MAX_MIXTURE_WEIGHT:  # also refuses NaN
                raise InvalidRequest(
                    f"adapters[{i}].weight",
                    f"must be a finite number in [-{MAX_MIXTURE_WEIGHT:g}, "
                    f"{MAX_MIXTURE_WEIGHT:g}], got {m.weight}",
                )

    def stats(self) -> dict[str, int]:
        with self._lock:
            running, waiting = len(self._running), len(self._waiting)
            tokens = sum(s.position for s in self._running)
        return {
            "running": running,
            "waiting": waiting,
            "kv_rows_used": running,
            "kv_rows_total": self.config.max_batch_size,
            "kv_tokens_used": tokens,
            "kv_tokens_total": self.config.max_batch_size * self.config.max_seq_len,
        }

    def adapters_in_flight(self) -> tuple[frozenset[str], frozenset[str]]:
        """Names of the adapters with requests running, and waiting (any thread)."""
        with self._lock:
            running = frozenset(n for s in self._running for n in s.request.adapter_names)
            waiting = frozenset(n for h, _ in self._waiting for n in h.request.adapter_names)
        return running, waiting

    # ---------------------------------------------------------------- thread control

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """From now on ``submit`` raises ``ShuttingDown``; queued and running requests go on."""
        with self._lock:
            self._accepting = False
            self._lock.notify()

    def shutdown(self, grace: float = 10.0) -> None:
        """Drain: refuse new requests, let running and queued ones finish for ``grace`` seconds,
        cancel what is left, stop the thread."""
        self.stop_accepting()
        end = time.monotonic() + grace
        while time.monotonic() < end and self.busy():
            time.sleep(0.01)
        with self._lock:
            for handle, _ in self._waiting:
                handle.cancel()
            for seq in self._running:
                seq.handle.cancel()
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._masks is not None:
            self._masks.shutdown(wait=False, cancel_futures=True)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def wake(self) -> None:
        """Called by the adapter cache when a load finishes: a waiting request may be admissible."""
        with self._lock:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._waiting or self._running):
                    self._lock.wait()
                if self._stop and not (self._waiting or self._running):
                    return
            try:
                worked = self.step()
            except Exception:  # a bug must not kill the thread every request depends on
                log.exception("engine step failed")
                worked = False
            if not worked:
                # only waiting requests whose adapters are loading: sleep until a load lands
                with self._lock:
                    self._lock.wait(timeout=0.05)

    # ---------------------------------------------------------------- one step

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling iteration; returns whether any forward ran or anything finished."""
        reaped = self._reap()
        self._compact()
        admitted = self._admit()
        # in KV-row order: a batch on rows 0..B-1 reads the cache as views instead of a gather
        decoding = sorted((s for s in self._running if s not in admitted), key=lambda s: s.row)
        if admitted:
            self._run_batch(admitted, prefill=True)
        if decoding:
            self._run_batch(decoding, prefill=False)
        if self.metrics is not None and (admitted or decoding):
            self.metrics.observe_step(len(admitted) + len(decoding))
        return bool(admitted or decoding or reaped)

    def _reap(self) -> bool:
        now = time.monotonic()

        def gone(h: RequestHandle) -> bool:
            return h.cancelled.is_set() or (
                h.request.deadline is not None and now > h.request.deadline
            )

        reaped = False
        for seq in [s for s in self._running if gone(s.handle)]:
            self._finish(seq, FinishReason.CANCELLED)
            reaped = True
        with self._lock:
            dropped = [(h, t) for h, t in self._waiting if gone(h)]
            for item in dropped:
                self._waiting.remove(item)
        for handle, _ in dropped:
            _deliver(handle, FinishEvent(FinishReason.CANCELLED, len(handle.request.prompt_ids), 0))
            reaped = True
        return reaped

    def _compact(self) -> None:
        """Keep the running sequences on KV rows ``0..n-1``: move the one on the highest row
        down into the lowest free row while that is lower. A decode batch is then the first
        rows of the cache (views, no gather; the static step's buckets), and prefills take the
        rows right after. A move copies the positions the sequence wrote and clears them."""
        while self._free_rows and self._running:
            top = max(self._running, key=lambda s: s.row)
            if self._free_rows[0] > top.row:
                return
            row = heapq.heappop(self._free_rows)
            if self.kv_cache is not None:
                self.kv_cache.move_row(top.row, row, top.kv_written)
            heapq.heappush(self._free_rows, top.row)
            top.row = row

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.config.prefill_token_budget
        with self._lock:
            candidates = list(self._waiting)
        self._begin_admission()
        for handle, t_arrival in candidates:
            if not self._free_rows:
                break
            n = len(handle.request.prompt_ids)
            if admitted and n > budget:
                break  # keep arrival order: the next step starts with this one
            try:
                placed = self._place(handle.request)
            except Exception as err:  # retired or broken while it waited, or a slot fill failed
                if not isinstance(err, ServingError):
                    log.exception("placing adapter %r failed", handle.request.target)
                    err = ServingError(f"internal error: {err}")
                self._dequeue(handle)
                _deliver(handle, FinishEvent(FinishReason.ERROR, n, 0, error=err))
                continue
            if placed is None:
                continue  # adapter loading; requests behind it may go ahead
            self._dequeue(handle)
            try:
                detok = IncrementalDetokenizer(self.tokenizer, handle.request.prompt_ids)
                seq = _Sequence(handle, self._free_rows[0], placed, detok, t_arrival)
            except Exception as err:  # the slots are pinned and the request dequeued: undo both
                log.exception("starting request %r failed", handle.request.request_id)
                self._unpin(placed.slots)
                error = ServingError(f"internal error: {err}")
                _deliver(handle, FinishEvent(FinishReason.ERROR, n, 0, error=error))
                continue
            heapq.heappop(self._free_rows)
            with self._lock:
                self._running.append(seq)
            if self.metrics is not None:
                for name in _metric_names(handle.request):
                    self.metrics.observe_queue_time(name, time.monotonic() - t_arrival)
            admitted.append(seq)
            budget -= n
        return admitted

    def _place(self, request: GenerationRequest) -> Placement | None:
        """Pin a device slot for each adapter ``request`` uses; None while any is loading or
        waiting for a slot (then none stays pinned: a mixture holds its members all at once
        or not at all, so two mixtures can never each hold half of what the other needs)."""
        if not request.adapter_names:
            return BASE_PLACEMENT
        pinned: list[tuple[int, str]] = []
        waiting = False
        try:
            for name in request.adapter_names:  # every member asked: their loads overlap
                placed = self.adapters.acquire(name)
                if placed is None:
                    waiting = True
                else:
                    pinned.append(placed)
        except BaseException:
            self._unpin([slot for slot, _ in pinned])
            raise
        if waiting:
            self._unpin([slot for slot, _ in pinned])
            return None
        slots = tuple(slot for slot, _ in pinned)
        versions = tuple(version for _, version in pinned)
        if not request.mixture:
            return Placement(slots[0], slots, versions)
        route = tuple((slot, m.weight) for slot, m in zip(slots, request.mixture))
        return Placement(route, slots, versions)

    def _unpin(self, slots) -> None:
        for slot in slots:
            self.adapters.release(slot)

    def _dequeue(self, handle: RequestHandle) -> None:
        with self._lock:
            for item in self._waiting:
                if item[0] is handle:
                    self._waiting.remove(item)
                    return

    def _run_batch(self, seqs: list[_Sequence], prefill: bool) -> None:
        scoring = prefill and any(s.params.prompt_logprobs is not None for s in seqs)
        masking = self._start_masks(seqs)  # filled on a helper thread while the forward runs
        try:
            out = self._forward(seqs, prefill, return_hidden=scoring)
            logits, hidden = out if scoring else (out, None)
            if masking is not None:
                self._apply_masks(seqs, logits, *masking)
            params, gens = [s.params for s in seqs], [s.generator for s in seqs]
            tokens, logprobs = sample(logits, params, gens, self.row_max)
        except Exception as err:  # one bad batch fails its requests, never the engine
            log.exception("forward failed for %d sequence(s)", len(seqs))
            for seq in seqs:
                if seq in self._running:  # a row whose constraint failed has finished already
                    error = ServingError(f"internal error: {err}")
                    self._finish(seq, FinishReason.ERROR, error=error)
            return
        if hidden is not None:
            self._score_prompts(seqs, hidden)
        now = time.monotonic()
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if seq not in self._running:
                continue  # a prompt scored and nothing to generate (or its scoring failed)
            if isinstance(token, ServingError):
                self._fail_row(seq, token)
                continue
            try:
                self._accept_token(seq, token, now, logprob)
            except Exception as err:  # a bug in this row's text handling: that row only
                log.exception("accepting a token of request %r failed", seq.request.request_id)
                if seq in self._running:
                    self._fail_row(seq, ServingError(f"internal error: {err}"))

    def _start_masks(self, seqs: list[_Sequence]) -> tuple[list[int], Future | None] | None:
        """The constrained rows, and (when a CPU is spare) their token masks already being
        filled on a helper thread while the forward runs (the matchers' states are final until
        this step's tokens are accepted). On a CPU whose cores all run the forward, a helper
        thread would slow every parallel op of it by more than the mask costs: the masks are
        filled after the forward instead (bench/structured.py measured both)."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        if not self._spare_cpu:
            return rows, None
        if self._masks is None:
            self._masks = ThreadPoolExecutor(1, thread_name_prefix="loraserve-mask")
        return rows, self._masks.submit(self.grammars.fill, [seqs[i].matcher for i in rows])

    def _apply_masks(
        self, seqs: list[_Sequence], logits: torch.Tensor, rows: list[int], masks: Future | None
    ) -> None:
        """Disallowed tokens of the constrained rows to -inf; a row whose constraint failed
        (a grammar past its per-step budget) finishes with the reason, alone."""
        try:
            if masks is None:
                mask = self.grammars.fill([seqs[i].matcher for i in rows])
            else:
                mask = masks.result()
        except Exception as err:  # the mask thread failed: those rows only
            log.exception("token masks failed for %d row(s)", len(rows))
            for i in rows:
                self._fail_row(seqs[i], ServingError(f"internal error: {err}"))
            return
        for i in rows:
            if seqs[i].matcher.is_error():
                self._fail_row(seqs[i], self._constraint_failed(seqs[i]))
        self.grammars.apply(logits, rows, mask)

    @staticmethod
    def _constraint_failed(seq: _Sequence) -> InvalidRequest:
        reason = " ".join(seq.matcher.get_error().split())[:500]
        return InvalidRequest(
            seq.params.constraint.field,
            f"could not be followed after {len(seq.generated)} tokens: {reason}",
        )

    def _score_prompts(self, seqs: list[_Sequence], hidden: torch.Tensor) -> None:
        """Prompt log-probabilities for the prefilled rows that asked, from the hidden states of
        their positions (the head runs on one row's chunk at a time, routed to its adapter in
        case the head itself is adapted). A row with nothing to generate finishes here."""
        for i, seq in enumerate(seqs):
            k = seq.params.prompt_logprobs
            if k is None:
                continue

            def logits_at(start: int, stop: int, i: int = i, route=seq.route):
                self.adapters.set_row_slots([route], stop - start, self.device)
                return self.model.head(hidden[i : i + 1, start:stop])[0]

            try:
                values = prompt_logprobs(logits_at, seq.request.prompt_ids, k)
            except Exception as err:
                log.exception("prompt logprobs of request %r failed", seq.request.request_id)
                self._fail_row(seq, ServingError(f"internal error: {err}"))
                continue
            if any(v.logprob != v.logprob for v in values):  # NaN: a broken adapter
                self._fail_row(seq, NonFiniteLogits())
                continue
            _deliver(seq.handle, TokenEvent([], "", prompt_logprobs=values))
            if seq.params.max_new_tokens == 0:
                self._finish(seq, FinishReason.LENGTH)

    def _fail_row(self, seq: _Sequence, error: ServingError) -> None:
        """One row of a batch failed (non-finite logits, a failed draw): it finishes alone."""
        adapter = seq.request.target or "(base model)"
        if isinstance(error, NonFiniteLogits):
            error = NonFiniteLogits(
                f" (adapter {adapter}, version {seq.version or '-'}, "
                f"after {len(seq.generated)} generated tokens)"
            )
        log.warning("request %r on adapter %s failed: %s", seq.request.request_id, adapter, error)
        self._finish(seq, FinishReason.ERROR, error=error)

    def _forward(
        self, seqs: list[_Sequence], prefill: bool, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Build the batch tensors and run the model; returns next-token logits ``[B, V]``
        (and, with ``return_hidden``, a prefill's final hidden states ``[B, S, C]``).

        Routing (each row's adapter slot) and the KV read window are computed here on the host
        and handed to the model, so the forward itself never reads a device value back."""
        if prefill:
            lengths = [s.prompt_len for s in seqs]
            width = max(lengths)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : s.prompt_len] = torch.tensor(s.request.prompt_ids)
            # pads sit after each prompt at positions < width <= max_seq_len; they write k/v the
            # row's later decode steps overwrite before ever attending to them
            positions = torch.arange(width).expand(len(seqs), width)
            last = torch.tensor(lengths) - 1
            for s in seqs:
                s.kv_written = width  # pads write k/v too
            kv_len = width
        else:
            for s in seqs:
                s.kv_written = max(s.kv_written, s.position + 1)
            if self.decoder is not None:  # decoding rows are 0..n-1: see _compact
                tokens, positions = [s.last_token for s in seqs], [s.position for s in seqs]
                return self.decoder(tokens, positions, [s.route for s in seqs])
            ids = torch.tensor([[s.last_token] for s in seqs])
            positions = torch.tensor([[s.position] for s in seqs])
            last = torch.zeros(len(seqs), dtype=torch.long)
            kv_len = max(s.position for s in seqs) + 1
        row_ids = [s.row for s in seqs]
        rows = None if row_ids == list(range(len(seqs))) else torch.tensor(row_ids)
        dev = self.device
        self.adapters.set_row_slots([s.route for s in seqs], ids.shape[1], dev)
        return self.model(
            ids.to(dev),
            positions=positions.to(dev),
            kv_cache=self.kv_cache,
            cache_rows=None if rows is None else rows.to(dev),
            logits_at=last.to(dev),
            kv_len=kv_len,
            **({"return_hidden": True} if return_hidden else {}),
        )

    def _accept_token(
        self, seq: _Sequence, token: int, now: float, logprob: TokenLogprob | None = None
    ) -> None:
        if self.metrics is not None:
            if seq.generated:
                self.metrics.observe_inter_token(now - seq.t_last)
            else:
                for name in _metric_names(seq.request):
                    self.metrics.observe_first_token(name, now - seq.t_arrival)
        seq.t_last = now
        seq.generated.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if token in self.eos_ids:
            self._finish(seq, FinishReason.STOP, flush=True)
            return
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # the token came from the row's mask: the grammar ran past its limits (a pattern
            # too costly to follow), which is the request's problem and fails it alone
            self._fail_row(seq, self._constraint_failed(seq))
            return
        seq.last_token = token
        seq.position = seq.prompt_len + len(seq.generated) - 1  # where `token` goes next step
        delta = seq.detok.push(token)
        seq.text += delta
        if seq.params.stop:
            seq.held_back = seq.stop_tail.feed(delta)
        if self._check_stop(seq):
            return
        if seq.matcher is not None and seq.matcher.is_stopped():  # the format is complete
            self._finish(seq, FinishReason.STOP, flush=True)
            return
        total = seq.prompt_len + len(seq.generated)  # prompt + output never exceed max_seq_len
        if len(seq.generated) >= seq.params.max_new_tokens or total >= self.config.max_seq_len:
            self._finish(seq, FinishReason.LENGTH, flush=True)
            return
        self._emit(seq, len(seq.text) - seq.held_back)

    def _check_stop(self, seq: _Sequence) -> bool:
        """Finish at the first stop string; the stop string itself is not emitted."""
        if not seq.params.stop:
            return False
        # a stop string can only begin in text that was never emitted, or end inside it
        start = max(0, seq.emitted - max(len(s) for s in seq.params.stop))
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        if not hits:
            return False
        self._emit(seq, min(hits))
        self._finish(seq, FinishReason.STOP)
        return True

    def _emit(self, seq: _Sequence, upto: int) -> None:
        new_ids = seq.generated[seq.reported_ids :]
        if seq.generated and new_ids and new_ids[-1] in self.eos_ids:
            new_ids = new_ids[:-1]
        text = seq.text[seq.emitted : upto] if upto > seq.emitted else ""
        if text or new_ids:
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = seq.logprobs[seq.reported_ids : seq.reported_ids + len(new_ids)]
            _deliver(seq.handle, TokenEvent(new_ids, text, logprobs))
            seq.reported_ids = len(seq.generated)
            seq.emitted = max(seq.emitted, upto)

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        error: ServingError | None = None,
        flush: bool = False,
    ) -> None:
        """Release the sequence's KV row and adapter slot and send its last event. ``flush``
        sends the text still held back (an unfinished UTF-8 char or stop-string prefix)."""
        if flush:
            seq.text += seq.detok.flush()
            self._emit(seq, len(seq.text))
        with self._lock:
            self._running.remove(seq)
        if self.kv_cache is not None:  # the next owner of the row must find nothing of ours
            self.kv_cache.clear_row(seq.row, seq.kv_written)
        heapq.heappush(self._free_rows, seq.row)
        self._unpin(seq.placement.slots)
        members = seq.request.adapter_names if seq.request.mixture else ()
        event = FinishEvent(
            reason,
            seq.prompt_len,
            len(seq.generated),
            seq.version,
            error,
            tuple(zip(members, seq.placement.versions)),
        )
        if self.metrics is not None:
            for name in _metric_names(seq.request):
                self.metrics.observe_finish(name, event)
        _deliver(seq.handle, event)


def _metric_names(request: GenerationRequest) -> tuple[str, ...]:
    """The adapter labels a request is counted under: each mixture member, its adapter, or ""
    (the base model)."""
    return request.adapter_names or ("",)


def _deliver(handle: RequestHandle, event: Event) -> None:
    """Hand ``event`` to the caller. A callback that raises (its event loop is gone, say) is the
    caller's problem: it is logged and the request cancelled, so the next step frees it; the
    batch it shares goes on."""
    try:
        handle.on_event(event)
    except Exception:
        log.exception("delivering an event of request %r failed", handle.request.request_id)
        handle.cancel()


class StopTail:
    """How many trailing chars of the text generated so far could still begin a stop string,
    kept up to date as text arrives: per stop string a KMP automaton whose state is the longest
    prefix of the stop string the text ends with. Each new char costs O(1) amortized per stop
    string, whatever their lengths (re-checking every prefix of 16 stop strings of 256 chars
    cost ~1 ms a token)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.failure = [_failure(s) for s in stops]
        self.state = [0] * len(stops)

    def feed(self, text: str) -> int:
        """Append ``text``; return the chars to hold back now."""
        held = 0
        for i, stop in enumerate(self.stops):
            k, failure = self.state[i], self.failure[i]
            for c in text:
                while k and (k == len(stop) or stop[k] != c):
                    k = failure[k - 1]
                if stop[k] == c:
                    k += 1
            self.state[i] = k
            held = max(held, k if k < len(stop) else failure[k - 1])
        return held


def _failure(s: str) -> list[int]:
    """KMP: ``f[i]`` = the longest proper prefix of ``s[: i + 1]`` that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f
