"""The gRPC edge: protobuf <-> engine dataclasses, and domain errors -> status codes.

Nothing else happens here: requests become ``GenerationRequest``s, engine events become
responses, and ``status_for`` is the one place that decides which status code an error gets.
An unexpected exception fails its own request with INTERNAL (and a log line); the server runs on.

Cancellation: when a client cancels or its deadline passes, grpc.aio cancels the handler task;
the handler cancels the engine request, which frees the sequence's KV row at the next step. The
deadline is also handed to the engine, so a request queued past its deadline never starts.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from adapters.format import NAME_RE, InvalidAdapter
from protos.loraserve.v1 import inference_pb2 as pb
from protos.loraserve.v1 import inference_pb2_grpc
from server.engine import FinishEvent, FinishReason, GenerationRequest, TokenEvent
from server.errors import (
    AdapterNotFound,
    AdapterUnavailable,
    InvalidRequest,
    QueueFull,
    ServingError,
    ShuttingDown,
)
from server.runtime import Runtime
from server.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64
MAX_PROMPT_CHARS = 1 << 20
SERVER_VERSION = "0.1.0"

_STATUS = [
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidAdapter, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
]

_FINISH = {
    FinishReason.STOP: pb.STOP,
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.CANCELLED: pb.CANCELLED,
}


def status_for(err: Exception) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def sampling_from_pb(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
    )


class LoraInferenceServicer(inference_pb2_grpc.LoraInferenceServicer):
    def __init__(self, runtime: Runtime | None = None, model_name: str = ""):
        self.runtime = runtime  # None while the model loads: calls get UNAVAILABLE
        self.model_name = model_name

    # ------------------------------------------------------------------ conversions

    def request_from_pb(self, req: pb.GenerateRequest, context) -> GenerationRequest:
        if req.adapter and not NAME_RE.fullmatch(req.adapter):
            raise InvalidRequest(
                "adapter", f"{req.adapter[:64]!r} is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]*)"
            )
        if req.prompt and req.prompt_token_ids:
            raise InvalidRequest("prompt", "give prompt or prompt_token_ids, not both")
        if len(req.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        if req.prompt:
            ids = tuple(self.runtime.tokenizer.encode(req.prompt))
        else:
            ids = tuple(req.prompt_token_ids)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return GenerationRequest(
            ids, sampling_from_pb(req.params), req.adapter, req.request_id, deadline
        )

    def _engine(self):
        if self.runtime is None:
            raise ShuttingDown("the model is still loading")
        return self.runtime.engine

    # ------------------------------------------------------------------ handlers

    async def _events(self, request: pb.GenerateRequest, context):
        """Submit to the engine and yield its events; cancels the request if we stop early."""
        engine = self._engine()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(
            self.request_from_pb(request, context),
            on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
        )
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = isinstance(event, FinishEvent)
                if finished and event.error is not None:
                    raise event.error
                yield event
        finally:
            if not finished:  # client cancel, deadline, or an error on our side
                handle.cancel()

    async def Generate(self, request, context):
        t0, code = time.monotonic(), grpc.StatusCode.OK
        try:
            text, ids, last = [], [], None
            async for event in self._events(request, context):
                if isinstance(event, TokenEvent):
                    text.append(event.text)
                    ids.extend(event.token_ids)
                else:
                    last = event
            return pb.GenerateResponse(
                text="".join(text), token_ids=ids, **self._finish_fields(request, last)
            )
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = status_for(err)
            await self._abort(context, err, code)
        finally:
            self._record(request.adapter, code, t0)

    async def GenerateStream(self, request, context):
        t0, code = time.monotonic(), grpc.StatusCode.OK
        try:
            async for event in self._events(request, context):
                if isinstance(event, TokenEvent):
                    yield pb.GenerateStreamResponse(text=event.text, token_ids=event.token_ids)
                else:
                    yield pb.GenerateStreamResponse(**self._finish_fields(request, event))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = status_for(err)
            await self._abort(context, err, code)
        finally:
            self._record(request.adapter, code, t0)

    def _finish_fields(self, request: pb.GenerateRequest, event: FinishEvent) -> dict:
        return dict(
            finish_reason=_FINISH[event.reason],
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            adapter=request.adapter,
            adapter_version=event.adapter_version,
            request_id=request.request_id,
        )

    async def _abort(self, context, err: Exception, code: grpc.StatusCode) -> None:
        if code is grpc.StatusCode.INTERNAL:
            log.error("request failed unexpectedly", exc_info=err)
            details = f"internal error: {type(err).__name__}: {err}"
        else:
            details = str(err)
        await context.abort(code, details)  # raises

    def _record(self, adapter: str, code: grpc.StatusCode, t0: float) -> None:
        if self.runtime is not None:
            self.runtime.metrics.observe_request(adapter, code.name, time.monotonic() - t0)

    async def ListAdapters(self, request, context):
        runtime = self.runtime
        if runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        device = runtime.cache.device_versions()
        host = runtime.host.versions()
        infos = []
        errors = runtime.registry.errors()
        for e in runtime.registry.entries():
            state = pb.ON_DISK
            if e.version in device:
                state = pb.DEVICE
            elif e.version in host:
                state = pb.HOST
            infos.append(
                pb.AdapterInfo(
                    name=e.name,
                    version=e.version,
                    rank=e.rank,
                    state=state,
                    size_bytes=e.nbytes,
                    error=errors.pop(e.name, ""),
                )
            )
        for name, reason in errors.items():  # refused, with no working version
            infos.append(pb.AdapterInfo(name=name, state=pb.INVALID, error=reason))
        infos.sort(key=lambda i: i.name)
        return pb.ListAdaptersResponse(adapters=infos)

    async def GetServerInfo(self, request, context):
        runtime = self.runtime
        if runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
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
        )


__all__ = ["LoraInferenceServicer", "ServingError", "status_for"]
