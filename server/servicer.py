"""The gRPC edge: protobuf <-> engine dataclasses, and domain errors -> status codes.

Nothing else happens here: requests become ``GenerationRequest``s, engine events become
responses, and ``status_for`` is the one place that decides which status code an error gets.
An unexpected exception fails its own request with INTERNAL (and a log line); the server runs on.

Hostile input is refused before it costs anything: a request that does not parse gets
INVALID_ARGUMENT (one log line, no traceback); text is bounded by what could fit
``max_seq_len`` tokens before it is tokenized, and tokenized off the event loop, so one huge
prompt cannot stall every other client; characters the vocabulary cannot represent are refused by
name instead of being silently dropped.

Cancellation: when a client cancels or its deadline passes, grpc.aio cancels the handler task;
the handler cancels the engine request, which frees the sequence's KV row at the next step. The
deadline is also handed to the engine, so a request queued past its deadline never starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from loraserve.adapters.format import InvalidAdapter
from loraserve.server.auth import AuthState, Tenant
from loraserve.server.engine import (
    FinishEvent,
    FinishReason,
    GenerationRequest,
    MixtureMember,
    TokenEvent,
    mixture_name,
)
from loraserve.server.errors import (
    AdapterNotFound,
    AdapterUnavailable,
    InvalidRequest,
    NoChatTemplate,
    NonFiniteLogits,
    PermissionDenied,
    QueueFull,
    ServingError,
    ShuttingDown,
    Unauthenticated,
)
from loraserve.server.frontend import MAX_CONTINUATIONS, Frontend
from loraserve.server.grammar import Constraint
from loraserve.server.runtime import SERVER_VERSION, Runtime
from loraserve.server.sampling import SamplingParams, TokenLogprob
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64
MAX_REQUEST_ID_CHARS = 256
UNAUTHENTICATED_TENANT = "-"  # the tenant label of a request no token vouched for
MAX_LISTED = 16  # mixture members a request is checked, logged and counted for

_STATUS = [
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (NoChatTemplate, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidAdapter, grpc.StatusCode.FAILED_PRECONDITION),
    (NonFiniteLogits, grpc.StatusCode.FAILED_PRECONDITION),  # a broken adapter, not our bug
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]

_FINISH = {
    FinishReason.STOP: pb.STOP,
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.CANCELLED: pb.CANCELLED,
}


_STATE = {"device": pb.DEVICE, "host": pb.HOST}  # Runtime.resident_adapters' tiers


def status_for(err: Exception) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def mixture_from_pb(members) -> tuple[MixtureMember, ...]:
    """A request's ``adapters`` field; member names are checked like ``adapter``."""
    for i, m in enumerate(members):
        Frontend.check_adapter_name(m.name, f"adapters[{i}].name")
    return tuple(MixtureMember(m.name, _weight(m)) for m in members)


def _weight(member: pb.AdapterWeight) -> float:
    return member.weight if member.HasField("weight") else 1.0


def adapter_names(request) -> list[str]:
    """The adapters a request names: its mixture's members, else its adapter ("" = the base
    model), each checked against the caller's permissions (and counted in metrics) once: at
    most ``MAX_LISTED`` distinct names, whatever the message holds (the engine refuses a
    mixture over ``--max-mixture`` or with a name twice)."""
    names = dict.fromkeys(m.name for m in request.adapters[: 2 * MAX_LISTED])
    return list(names)[:MAX_LISTED] or [request.adapter]


def target(request) -> str:
    """What a request runs on, for logs: the adapter, or the spelled mixture."""
    if request.adapters:
        members = request.adapters[:MAX_LISTED]
        return mixture_name(tuple(MixtureMember(m.name, _weight(m)) for m in members))
    return request.adapter


def sampling_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        constraint=constraint_from_pb(p.constraint) if p.HasField("constraint") else None,
    )


def constraint_from_pb(c: pb.Constraint) -> Constraint:
    kind = c.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("params.constraint", "is set but empty: give one of its fields")
    if kind == "json_object":
        if not c.json_object:
            raise InvalidRequest("params.constraint.json_object", "must be true when set")
        return Constraint("json_object")
    if kind == "choices":
        return Constraint("choice", tuple(c.choices.choices))
    return Constraint(kind, getattr(c, kind))


class LoraInferenceServicer(inference_pb2_grpc.LoraInferenceServicer):
    def __init__(
        self, runtime: Runtime | None = None, model_name: str = "", auth: AuthState | None = None
    ):
        self._runtime = runtime  # None while the model loads: calls get UNAVAILABLE
        self.front = Frontend(runtime) if runtime is not None else None
        self.model_name = model_name
        self.auth = auth  # None: no --auth-file, every caller may use everything

    def authorize(self, context, adapters: list[str] | None) -> Tenant | None:
        """The caller's tenant (None with auth off); raises ``Unauthenticated``, or
        ``PermissionDenied`` for the first of ``adapters`` it may not use (see
        ``AuthState.authorize``)."""
        if self.auth is None:
            return None
        header = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        tenant = self.auth.authorize(header if isinstance(header, str) else None)
        for name in adapters or ():
            if not tenant.may_use(name):
                raise PermissionDenied(name, tenant.name)
        return tenant

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: Runtime | None) -> None:
        self._runtime = runtime
        self.front = Frontend(runtime) if runtime is not None else None

    # ------------------------------------------------------------------ conversions

    def _common(self, request) -> tuple[MixtureMember, ...]:
        """The cheap checks every generation request gets before any work; its mixture."""
        Frontend.check_adapter_name(request.adapter)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(
                "request_id",
                f"{len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}",
            )
        if request.adapter and request.adapters:
            raise InvalidRequest("adapters", "give adapter or adapters (a mixture), not both")
        if len(request.adapters) > MAX_LISTED:
            raise InvalidRequest(
                "adapters", f"{len(request.adapters)} adapters; at most {MAX_LISTED} are read"
            )
        return mixture_from_pb(request.adapters)

    def _prompt_ids_fit(self, ids, field: str) -> None:
        if len(ids) >= self.front.max_seq_len:
            raise InvalidRequest(
                field, f"{len(ids)} tokens does not fit max_seq_len {self.front.max_seq_len}"
            )

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None else None

    async def request_from_pb(self, req: pb.GenerateRequest, context) -> GenerationRequest:
        """Check the cheap things first (names, sizes), then tokenize off the event loop."""
        mixture = self._common(req)
        if req.prompt and req.prompt_token_ids:
            raise InvalidRequest("prompt", "give prompt or prompt_token_ids, not both")
        self._prompt_ids_fit(req.prompt_token_ids, "prompt_token_ids")
        params = await self.front.sampling(sampling_from_pb(req.params))
        if req.prompt:
            ids = tuple(await self.front.tokenize(req.prompt))
        else:
            ids = tuple(req.prompt_token_ids)
        return GenerationRequest(
            ids,
            params,
            req.adapter,
            req.request_id,
            self._deadline(context),
            mixture,
        )

    async def chat_request_from_pb(self, req: pb.ChatRequest, context) -> GenerationRequest:
        mixture = self._common(req)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        add = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
        names = [m.name for m in mixture] or [req.adapter]
        params = await self.front.sampling(sampling_from_pb(req.params))
        ids = await self.front.chat_ids(names, messages, add)
        return GenerationRequest(
            tuple(ids),
            params,
            req.adapter,
            req.request_id,
            self._deadline(context),
            mixture,
        )

    def logprobs_pb(self, values: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
        text = self.front.token_text
        return [
            pb.TokenLogprob(
                token_id=v.token_id,
                token=text(v.token_id),
                logprob=v.logprob,
                top=[pb.TopLogprob(token_id=i, token=text(i), logprob=lp) for i, lp in v.top],
            )
            for v in values or ()
        ]

    # ------------------------------------------------------------------ handlers
    #
    # Each handler converts and nothing else: ``add_to_server`` wraps every one of them with
    # the shared parts (refusing bad bytes, UNAVAILABLE while the model loads, mapping errors to
    # status codes, metrics and the request log line), so a new RPC is one method.

    async def _complete(self, request, generation: GenerationRequest) -> pb.GenerateResponse:
        text, ids, logprobs, prompt, last = [], [], [], [], None
        async for event in self.front.events(generation, strict=False):
            if isinstance(event, TokenEvent):
                text.append(event.text)
                ids.extend(event.token_ids)
                logprobs.extend(event.logprobs or ())
                prompt.extend(event.prompt_logprobs or ())
            else:
                last = event
        return pb.GenerateResponse(
            text="".join(text),
            token_ids=ids,
            logprobs=self.logprobs_pb(logprobs),
            prompt_logprobs=self.logprobs_pb(prompt),
            **self._finish_fields(request, last),
        )

    async def _stream(self, request, generation: GenerationRequest):
        async for event in self.front.events(generation, strict=False):
            if isinstance(event, TokenEvent):
                yield pb.GenerateStreamResponse(
                    text=event.text,
                    token_ids=event.token_ids,
                    logprobs=self.logprobs_pb(event.logprobs),
                    prompt_logprobs=self.logprobs_pb(event.prompt_logprobs),
                )
            else:
                yield pb.GenerateStreamResponse(**self._finish_fields(request, event))

    async def Generate(self, request, context):
        return await self._complete(request, await self.request_from_pb(request, context))

    async def GenerateStream(self, request, context):
        async for response in self._stream(request, await self.request_from_pb(request, context)):
            yield response

    async def Chat(self, request, context):
        return await self._complete(request, await self.chat_request_from_pb(request, context))

    async def ChatStream(self, request, context):
        generation = await self.chat_request_from_pb(request, context)
        async for response in self._stream(request, generation):
            yield response

    async def Score(self, request, context):
        mixture = self._common(request)
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("prompt", "give prompt or prompt_token_ids, not both")
        if request.continuations and request.continuation_token_ids:
            raise InvalidRequest(
                "continuations", "give continuations or continuation_token_ids, not both"
            )
        n = len(request.continuations) or len(request.continuation_token_ids)
        if not 1 <= n <= MAX_CONTINUATIONS:
            raise InvalidRequest("continuations", f"give 1 to {MAX_CONTINUATIONS}, got {n}")
        self._prompt_ids_fit(request.prompt_token_ids, "prompt_token_ids")
        if request.prompt:
            prompt = await self.front.tokenize(request.prompt)
        else:
            prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidRequest("prompt", "is empty: the first token has no log-probability")
        if request.continuations:
            conts = []
            for i, text in enumerate(request.continuations):
                conts.append(await self.front.tokenize(text, f"continuations[{i}]", special=False))
        else:
            conts = [list(c.ids) for c in request.continuation_token_ids]
        for i, c in enumerate(conts):
            if not c:
                raise InvalidRequest(f"continuations[{i}]", "is empty")
            self._prompt_ids_fit(prompt + c, f"continuations[{i}]")
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
        deadline = self._deadline(context)
        generations = [
            GenerationRequest(
                tuple(prompt + c), params, request.adapter, request.request_id, deadline, mixture
            )
            for c in conts
        ]
        # all submitted before any is awaited: they prefill together, with everything else
        results = await self.front.all_or_none(self._prompt_logprobs(g) for g in generations)
        versions = {version for _, version in results}
        if len(versions) > 1:  # an upgrade landed between two continuations' prefills
            raise AdapterUnavailable(
                target(request), "it was upgraded while the continuations were scored; retry"
            )
        scores, (version, members) = [], versions.pop()
        for c, (values, _) in zip(conts, results):
            tail = values[len(prompt) - 1 :]  # values[j] is token j + 1's
            scores.append(
                pb.ContinuationScore(
                    logprob=sum(v.logprob for v in tail),
                    token_logprobs=[v.logprob for v in tail],
                    token_ids=c,
                    greedy=all(v.top and v.top[0][0] == v.token_id for v in tail),
                )
            )
        return pb.ScoreResponse(
            scores=scores,
            prompt_tokens=len(prompt),
            adapter=request.adapter,
            adapter_version=version,
            request_id=request.request_id,
            adapter_versions=versions_pb(members),
        )

    async def _prompt_logprobs(self, generation: GenerationRequest):
        values, version = [], ("", ())
        async for event in self.front.events(generation):
            if isinstance(event, TokenEvent):
                values.extend(event.prompt_logprobs or ())
            else:
                version = (event.adapter_version, event.adapter_versions)
        return values, version

    def _finish_fields(self, request, event: FinishEvent) -> dict:
        return dict(
            finish_reason=_FINISH[event.reason],
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            adapter=request.adapter,
            adapter_version=event.adapter_version,
            request_id=request.request_id,
            adapter_versions=versions_pb(event.adapter_versions),
        )

    def for_tenants(self, message: str) -> str:
        """``message`` without the server's own paths (adapter errors name their file)."""
        if self.runtime is not None:
            message = message.replace(f"{self.runtime.adapters_dir.resolve()}/", "")
            message = message.replace(f"{self.runtime.adapters_dir}/", "")
        return message

    def record(
        self, method: str, request, code: grpc.StatusCode, seconds: float, tenant: str | None
    ) -> None:
        """Metrics and one log line for a finished generation call."""
        # the id is the caller's (the proto promises it is logged); %r keeps it on one line
        log.info(
            "%s request_id=%r adapter=%r%s: %s in %.3fs",
            method,
            request.request_id[:MAX_REQUEST_ID_CHARS],
            target(request)[:256],
            "" if tenant is None else f" tenant={tenant!r}",
            code.name,
            seconds,
        )
        if self.runtime is not None:
            for name in adapter_names(request):  # a mixture counts for each member
                self.runtime.metrics.observe_request(name, method, code.name, seconds, tenant)

    async def ListAdapters(self, request, context):
        tenant = self.authorize(context, None)
        runtime = self.runtime
        tiers = runtime.resident_adapters()
        infos = []
        errors = runtime.registry.errors()
        if tenant is not None:  # only what the caller may use
            errors = {name: why for name, why in errors.items() if tenant.may_use(name)}
        for e in runtime.registry.entries():
            if tenant is not None and not tenant.may_use(e.name):
                continue
            infos.append(
                pb.AdapterInfo(
                    name=e.name,
                    version=e.version,
                    rank=e.rank,
                    state=_STATE.get(tiers.get(e.name), pb.ON_DISK),
                    size_bytes=e.nbytes,
                    error=errors.pop(e.name, ""),
                )
            )
        for name, reason in errors.items():  # refused, with no working version
            infos.append(pb.AdapterInfo(name=name, state=pb.INVALID, error=reason))
        infos.sort(key=lambda i: i.name)
        return pb.ListAdaptersResponse(adapters=infos)

    async def GetServerInfo(self, request, context):
        self.authorize(context, None)
        runtime = self.runtime
        cfg, stats = runtime.config, runtime.engine.stats()
        return pb.ServerInfo(
            base_model=self.model_name or cfg.model,
            architecture=runtime.loaded.config.arch,
            base_fingerprint=runtime.loaded.fingerprint,
            dtype=str(runtime.dtype).removeprefix("torch."),
            device=str(runtime.device),
            vocab_size=runtime.tokenizer.vocab_size,
            max_seq_len=cfg.max_seq_len,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            max_active_adapters=cfg.max_active_adapters,
            max_cached_adapters=cfg.max_cached_adapters,
            max_lora_rank=cfg.max_lora_rank,
            running_requests=stats["running"],
            waiting_requests=stats["waiting"],
            server_version=SERVER_VERSION,
            max_mixture=cfg.engine_config().max_mixture,
        )


# ---------------------------------------------------------------------- registration


def versions_pb(members: tuple[tuple[str, str], ...]) -> list[pb.AdapterVersion]:
    return [pb.AdapterVersion(name=name, version=version) for name, version in members]


class Malformed:
    """A request whose bytes do not parse as its message type (the handler refuses it)."""

    def __init__(self, type_name: str, error: Exception):
        self.message = f"the request is not a valid {type_name} message ({error})"


def _lenient(message_cls):
    """A deserializer that hands bad bytes to the handler instead of raising: grpc answers a
    raising deserializer with UNKNOWN and logs a traceback for every such request."""

    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as err:
            return Malformed(message_cls.DESCRIPTOR.full_name, err)

    return parse


class MalformedRequest(InvalidRequest):
    def __init__(self, request: Malformed):
        ServingError.__init__(self, request.message)
        self.field = ""


def _wrap(servicer: LoraInferenceServicer, name: str, streaming: bool):
    """The shared part of every handler: bad bytes, loading, status codes, metrics, logs."""
    fn = getattr(servicer, name)
    # requests that name an adapter: metered
    generation = name.startswith(("Generate", "Chat")) or name == "Score"

    def check(request, context) -> str | None:
        """Refuse what must not cost anything; the caller's tenant name (None: auth off)."""
        tenant = None  # the others authorize themselves (a listing is filtered, not refused)
        if generation:  # the token first: a caller without one learns nothing, parse errors too
            names = None if isinstance(request, Malformed) else adapter_names(request)
            tenant = servicer.authorize(context, names)
        if isinstance(request, Malformed):
            log.warning("refused a request that does not parse: %s", request.message)
            raise MalformedRequest(request)
        if servicer.runtime is None:
            raise ShuttingDown("the model is still loading")
        return tenant.name if tenant is not None else None

    async def fail(context, err: Exception, code: grpc.StatusCode) -> None:
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed unexpectedly", name, exc_info=err)
            details = f"internal error ({type(err).__name__}); the server log has the details"
        else:
            details = servicer.for_tenants(str(err))
        await context.abort(code, details)  # raises

    def done(request, code: grpc.StatusCode, t0: float, tenant: str | None) -> None:
        if generation and not isinstance(request, Malformed):
            if tenant is None and code is grpc.StatusCode.UNAUTHENTICATED:
                tenant = UNAUTHENTICATED_TENANT
            servicer.record(name, request, code, time.monotonic() - t0, tenant)

    @contextlib.asynccontextmanager
    async def shared(request, context):
        """Around one call: refuse it early, map what it raised, record how it ended."""
        t0, code, tenant = time.monotonic(), grpc.StatusCode.OK, None
        try:
            tenant = check(request, context)
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = status_for(err)
            tenant = tenant or getattr(err, "tenant", None)  # a refused tenant is still counted
            await fail(context, err, code)
        finally:
            done(request, code, t0, tenant)

    if streaming:

        async def stream_handler(request, context):
            async with shared(request, context):
                async for response in fn(request, context):
                    yield response

        return stream_handler

    async def unary_handler(request, context):
        async with shared(request, context):
            return await fn(request, context)

    return unary_handler


def add_to_server(servicer: LoraInferenceServicer, server) -> None:
    """Register ``servicer`` on ``server`` as the generated ``add_LoraInferenceServicer_to_server``
    does, with every handler wrapped by ``_wrap`` and every request parsed leniently (bad bytes
    get INVALID_ARGUMENT, not UNKNOWN and a traceback)."""
    service = pb.DESCRIPTOR.services_by_name["LoraInference"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _wrap(servicer, method.name, method.server_streaming),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


__all__ = ["LoraInferenceServicer", "ServingError", "add_to_server", "status_for"]
