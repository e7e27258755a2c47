"""Typed clients for the loraserve gRPC API: ``LoraClient`` (blocking) and ``AsyncLoraClient``
(``grpc.aio``). Both take and return the dataclasses of ``loraserve.client.types`` and raise the
exceptions of ``loraserve.client.errors``; protobuf and ``grpc.RpcError`` never reach the caller.

Contract shared by both:

- Adapter routing. Each generate call sends gRPC metadata ``x-lora-adapter: NAME`` so an L7
  balancer that hashes the header sends each adapter to the replicas whose caches hold it. For
  the base model (``adapter=""``) the header is *omitted*, not sent empty: the base model has
  no cache to keep warm, and an absent header lets Envoy / HAProxy spread those calls over all
  replicas instead of hashing every one of them to the replica that owns "".
- Prompts. A ``str`` goes in ``prompt`` (the server tokenizes); a sequence of ints goes in
  ``prompt_token_ids``.
- Mixtures. ``adapter`` is a name, or a mapping of names to weights (``{"short": 0.7,
  "json": 0.3}``): the server adds the adapters' deltas, weighted, at run time. The routing
  header then names the first member.
- Auth. ``token=`` sends ``authorization: Bearer TOKEN`` with every call, for a server started
  with ``--auth-file``; its errors are ``UNAUTHENTICATED`` and ``PERMISSION_DENIED``.
- Sampling. Arguments left ``None`` stay unset in the request and the server applies its
  defaults.
- Timeouts. ``timeout`` (per call, else the client's) bounds the whole call, retries
  included; ``None`` means no deadline.
- Retries. A call that fails with UNAVAILABLE (a replica draining or gone) is retried up to
  ``retries`` times after a short jittered backoff (50 ms, 100 ms, ... at most 1 s), so a
  client behind a balancer sees no error when one replica leaves. A stream is retried only if
  it failed before its first chunk: after that, text has been handed out and a retry would
  repeat it. No other code is retried; RESOURCE_EXHAUSTED is left to the caller.
- Readiness. ``wait_ready(timeout)`` polls the standard health service until the server says
  SERVING (its port opens seconds before the model is loaded), or raises ``UnavailableError``.
- One core. What each method sends and how its answer is read is written once (``Calls``);
  the two clients differ only in how they run a call: blocking, or awaited.
- Streams. Closing the iterator early (``break`` out of the loop, ``close()`` / ``aclose()``,
  or dropping it) cancels the RPC, and the server frees the sequence at once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loraserve.client.auth import auth_metadata
from loraserve.client.errors import UnavailableError, error_from_rpc, status_code_of
from loraserve.client.types import (
    AdapterInfo,
    Completion,
    Constraint,
    SamplingParams,
    Score,
    ServerInfo,
    StreamChunk,
)
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc

ADAPTER_METADATA_KEY = "x-lora-adapter"
SERVICE_NAME = "loraserve.v1.LoraInference"

Prompt = str | Sequence[int]
ChannelOptions = Sequence[tuple[str, Any]]
# an adapter's name ("" = the base model), or a mixture: names -> weights
Adapter = str | Mapping[str, float]


def adapter_metadata(adapter: Adapter) -> tuple[tuple[str, str], ...]:
    """The routing metadata for a call to ``adapter`` (none for the base model, see above; a
    mixture's first member)."""
    name = adapter if isinstance(adapter, str) else next(iter(adapter), "")
    return ((ADAPTER_METADATA_KEY, name),) if name else ()


def adapter_fields(adapter: Adapter) -> dict:
    """``adapter`` as the request fields that carry it: ``adapter``, or ``adapters``."""
    if isinstance(adapter, str):
        return {"adapter": adapter}
    if not adapter:
        raise ValueError("a mixture needs at least one adapter")
    return {"adapters": [pb.AdapterWeight(name=n, weight=float(w)) for n, w in adapter.items()]}


def generate_request(
    prompt: Prompt, adapter: Adapter, params: SamplingParams, request_id: str
) -> pb.GenerateRequest:
    """The GenerateRequest for a text prompt or a prompt of token ids."""
    if isinstance(prompt, str):
        text, token_ids = prompt, []
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt must be str or a sequence of token ids, not bytes")
    else:
        text, token_ids = "", list(prompt)
    return pb.GenerateRequest(
        **adapter_fields(adapter),
        prompt=text,
        prompt_token_ids=token_ids,
        params=params.to_pb(),
        request_id=request_id,
    )


def chat_request(
    messages: Sequence[dict[str, str]],
    adapter: Adapter,
    params: SamplingParams,
    request_id: str,
    add_generation_prompt: bool,
) -> pb.ChatRequest:
    return pb.ChatRequest(
        **adapter_fields(adapter),
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        params=params.to_pb(),
        request_id=request_id,
        add_generation_prompt=add_generation_prompt,
    )


def channel_credentials(
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel. Certificates without ``tls`` are an
    error rather than a silent plaintext connection."""
    if not tls:
        if root_certificates or private_key or certificate_chain:
            raise ValueError("certificates given but tls=False; pass tls=True")
        return None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE up to ``retries`` times with jittered exponential backoff."""

    retries: int = 1
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self):
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")

    def delay(self, exc: grpc.RpcError, attempt: int, remaining: float | None) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None to give up."""
        if status_code_of(exc) != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        # Jitter so that the clients of a replica that went away do not return in lockstep.
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        if remaining is not None and delay >= remaining:
            return None
        return delay


class Deadline:
    """One call's time budget, shared by its attempts."""

    def __init__(self, timeout: float | None):
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


@dataclass(frozen=True)
class Call:
    """One RPC as both clients make it: the stub method, the request, the routing metadata,
    how the response becomes the caller's type, and the call's own timeout (None: the
    client's)."""

    rpc: str
    request: Any
    metadata: tuple[tuple[str, str], ...] = ()
    decode: Callable[[Any], Any] = lambda response: response
    timeout: float | None = None


class Calls:
    """The public methods, written once: arguments -> the ``Call`` to make. ``LoraClient`` and
    ``AsyncLoraClient`` turn each into a method that runs it (``_method``), blocking or awaited.
    The return annotations are those of the methods, which is what readers of the docs see."""

    @staticmethod
    def generate(
        prompt: Prompt,
        adapter: Adapter = "",
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Completion:
        """Generate a whole completion with ``adapter`` ("" = the base model; a mapping of
        names to weights = a mixture)."""
        params = SamplingParams(
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            logprobs,
            prompt_logprobs,
            constraint,
        )
        request = generate_request(prompt, adapter, params, request_id)
        return Call("Generate", request, adapter_metadata(adapter), Completion.from_pb, timeout)

    @staticmethod
    def stream(
        prompt: Prompt,
        adapter: Adapter = "",
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Generator[StreamChunk, None, None] | AsyncGenerator[StreamChunk, None]:
        """Generate a completion chunk by chunk (``for``, or ``async for`` on the async client);
        the RPC starts with the first chunk asked for. Leaving the loop early, ``close()`` or
        ``aclose()`` cancels the RPC."""
        params = SamplingParams(
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            logprobs,
            prompt_logprobs,
            constraint,
        )
        request = generate_request(prompt, adapter, params, request_id)
        metadata = adapter_metadata(adapter)
        return Call("GenerateStream", request, metadata, StreamChunk.from_pb, timeout)

    @staticmethod
    def chat(
        messages: Sequence[dict[str, str]],
        adapter: Adapter = "",
        *,
        add_generation_prompt: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Completion:
        """Answer a conversation (``[{"role": "user", "content": "..."}]``), rendered with the
        adapter's chat template (or the base model's) on the server."""
        request = chat_request(
            messages,
            adapter,
            SamplingParams(
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                logprobs,
                prompt_logprobs,
                constraint,
            ),
            request_id,
            add_generation_prompt,
        )
        return Call("Chat", request, adapter_metadata(adapter), Completion.from_pb, timeout)

    @staticmethod
    def chat_stream(
        messages: Sequence[dict[str, str]],
        adapter: Adapter = "",
        *,
        add_generation_prompt: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Generator[StreamChunk, None, None] | AsyncGenerator[StreamChunk, None]:
        """``chat``, chunk by chunk, as ``stream`` does."""
        request = chat_request(
            messages,
            adapter,
            SamplingParams(
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                logprobs,
                prompt_logprobs,
                constraint,
            ),
            request_id,
            add_generation_prompt,
        )
        metadata = adapter_metadata(adapter)
        return Call("ChatStream", request, metadata, StreamChunk.from_pb, timeout)

    @staticmethod
    def score(
        prompt: str,
        continuations: Sequence[str],
        adapter: Adapter = "",
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> list[Score]:
        """log P(continuation | prompt) under ``adapter`` for each continuation."""
        request = pb.ScoreRequest(
            **adapter_fields(adapter),
            prompt=prompt,
            continuations=list(continuations),
            request_id=request_id,
        )

        def decode(response) -> list[Score]:
            return [Score.from_pb(s) for s in response.scores]

        return Call("Score", request, adapter_metadata(adapter), decode, timeout)

    @staticmethod
    def list_adapters(*, timeout: float | None = None) -> list[AdapterInfo]:
        """The adapters the server can serve, with their cache state."""

        def decode(response) -> list[AdapterInfo]:
            return [AdapterInfo.from_pb(info) for info in response.adapters]

        return Call("ListAdapters", pb.ListAdaptersRequest(), (), decode, timeout)

    @staticmethod
    def server_info(*, timeout: float | None = None) -> ServerInfo:
        """The server's base model, device, limits and current load."""
        return Call("GetServerInfo", pb.GetServerInfoRequest(), (), ServerInfo.from_pb, timeout)


def _method(build, run_name: str):
    """A client method from a ``Calls`` builder: same signature and docs, runs its ``Call``
    with the client's ``run_name`` method."""

    @functools.wraps(build)
    def method(self, *args, **kwargs):
        return getattr(self, run_name)(build(*args, **kwargs))

    params = list(inspect.signature(build).parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = inspect.signature(build).replace(parameters=[self_param, *params])
    return method


class _ClientCore:
    """The channel, stub, default timeout and retry policy both clients hold. ``_channels`` is
    where channels come from: the ``grpc`` module (blocking) or ``grpc.aio``."""

    _channels: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = None,
        retries: int = 1,
        options: ChannelOptions = (),
        token: str | None = None,
    ):
        credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
        self._auth = auth_metadata(token)
        channels = self._channels
        if credentials is None:
            self._channel = channels.insecure_channel(target, options=list(options))
        else:
            self._channel = channels.secure_channel(target, credentials, options=list(options))
        self._stub = inference_pb2_grpc.LoraInferenceStub(self._channel)
        self._timeout = timeout
        self._retry = RetryPolicy(retries=retries)

    def _metadata(self, call: Call) -> tuple[tuple[str, str], ...]:
        return call.metadata + self._auth

    def _deadline(self, call: Call) -> Deadline:
        return Deadline(self._timeout if call.timeout is None else call.timeout)

    def _health_check(self, timeout: float):
        return health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
        )


def _not_ready(timeout: float, last: str) -> UnavailableError:
    return UnavailableError(
        grpc.StatusCode.UNAVAILABLE,
        f"server not ready after {timeout:g}s (last health answer: {last})",
    )


def _health_answer(reply) -> str | None:
    """None when SERVING, else the status name."""
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class LoraClient(_ClientCore):
    """Blocking client. Use as a context manager, or call ``close()``.

    >>> with LoraClient("localhost:50051") as client:
    ...     print(client.generate("Translate to SQL: all users", adapter="sql").text)
    """

    _channels = grpc

    generate = _method(Calls.generate, "_unary")
    stream = _method(Calls.stream, "_stream")
    chat = _method(Calls.chat, "_unary")
    chat_stream = _method(Calls.chat_stream, "_stream")
    score = _method(Calls.score, "_unary")
    list_adapters = _method(Calls.list_adapters, "_unary")
    server_info = _method(Calls.server_info, "_unary")

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Block until the server's health service says SERVING; ``UnavailableError`` after
        ``timeout`` seconds (the last answer is in its details)."""
        end, last = time.monotonic() + timeout, "no answer"
        while True:
            try:
                last = _health_answer(self._health_check(max(0.05, end - time.monotonic())))
                if last is None:
                    return
            except grpc.RpcError as exc:
                last = status_code_of(exc).name
            if time.monotonic() + interval > end:
                raise _not_ready(timeout, last)
            time.sleep(interval)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unary(self, call: Call):
        deadline, attempt = self._deadline(call), 0
        method = getattr(self._stub, call.rpc)
        while True:
            try:
                response = method(
                    call.request, timeout=deadline.remaining(), metadata=self._metadata(call)
                )
                return call.decode(response)
            except grpc.RpcError as exc:
                delay = self._retry.delay(exc, attempt, deadline.remaining())
                if delay is None:
                    raise error_from_rpc(exc) from exc
            time.sleep(delay)
            attempt += 1

    def _stream(self, call: Call) -> Generator[StreamChunk, None, None]:
        deadline, attempt = self._deadline(call), 0
        while True:
            rpc = getattr(self._stub, call.rpc)(
                call.request, timeout=deadline.remaining(), metadata=self._metadata(call)
            )
            received = False
            try:
                for response in rpc:
                    received = True
                    yield call.decode(response)
                return
            except grpc.RpcError as exc:
                delay = None if received else self._retry.delay(exc, attempt, deadline.remaining())
                if delay is None:
                    raise error_from_rpc(exc) from exc
            finally:
                # A no-op once the call has ended; otherwise the caller closed us early
                # (GeneratorExit at the yield) and the server must stop generating.
                rpc.cancel()
            time.sleep(delay)
            attempt += 1


class AsyncLoraClient(_ClientCore):
    """``grpc.aio`` client with the methods of ``LoraClient`` as coroutines; ``stream`` returns
    an async iterator. Create it inside the running event loop; ``async with`` or
    ``await close()``.

    >>> async with AsyncLoraClient("localhost:50051") as client:
    ...     async for chunk in client.stream("Once upon a time", adapter="story"):
    ...         print(chunk.text, end="", flush=True)
    """

    _channels = grpc.aio

    generate = _method(Calls.generate, "_unary")
    stream = _method(Calls.stream, "_stream")
    chat = _method(Calls.chat, "_unary")
    chat_stream = _method(Calls.chat_stream, "_stream")
    score = _method(Calls.score, "_unary")
    list_adapters = _method(Calls.list_adapters, "_unary")
    server_info = _method(Calls.server_info, "_unary")

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """``LoraClient.wait_ready``, awaited."""
        end, last = time.monotonic() + timeout, "no answer"
        while True:
            try:
                last = _health_answer(await self._health_check(max(0.05, end - time.monotonic())))
                if last is None:
                    return
            except grpc.RpcError as exc:
                last = status_code_of(exc).name
            if time.monotonic() + interval > end:
                raise _not_ready(timeout, last)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoraClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _unary(self, call: Call):
        deadline, attempt = self._deadline(call), 0
        method = getattr(self._stub, call.rpc)
        while True:
            try:
                response = await method(
                    call.request, timeout=deadline.remaining(), metadata=self._metadata(call)
                )
                return call.decode(response)
            except grpc.RpcError as exc:
                delay = self._retry.delay(exc, attempt, deadline.remaining())
                if delay is None:
                    raise error_from_rpc(exc) from exc
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(self, call: Call) -> AsyncGenerator[StreamChunk, None]:
        deadline, attempt = self._deadline(call), 0
        while True:
            rpc = getattr(self._stub, call.rpc)(
                call.request, timeout=deadline.remaining(), metadata=self._metadata(call)
            )
            received = False
            try:
                async for response in rpc:
                    received = True
                    yield call.decode(response)
                return
            except grpc.RpcError as exc:
                delay = None if received else self._retry.delay(exc, attempt, deadline.remaining())
                if delay is None:
                    raise error_from_rpc(exc) from exc
            finally:
                rpc.cancel()  # see LoraClient._stream
            await asyncio.sleep(delay)
            attempt += 1
