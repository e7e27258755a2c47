"""An OpenAI-compatible HTTP API, served from the same process and engine as gRPC.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events ending with ``data: [DONE]``), and ``GET /health``. ``model`` names an
adapter, the base model by its served name, or a mixture of adapters spelled
``NAME:WEIGHT+NAME:WEIGHT`` (``short:0.7+json:0.3``; names cannot hold ``:`` or ``+``); the
official ``openai`` client works unchanged.

The stack is Starlette on uvicorn: both are small, widely used and maintained, run on the
asyncio loop the gRPC server already uses (one process, one engine, no second framework's
validation layer between OpenAI's JSON and our own checks), and let a streamed response notice
a client that hangs up. Fields are checked here by hand so that every refusal names its field
in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with 400 for a bad
field, 404 for an unknown model, 413 for a body over the cap, 429 when the queue is full, 503
while loading or draining.

A client that disconnects cancels its sequences at once: a streamed response stops when the
write fails (Starlette cancels the generator), a plain one races the generation against the
connection's ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from loraserve.adapters.format import InvalidAdapter
from loraserve.server.auth import Tenant
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
from loraserve.server.frontend import Frontend
from loraserve.server.grammar import Constraint
from loraserve.server.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob
from loraserve.server.servicer import MAX_LISTED, UNAUTHENTICATED_TENANT, status_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # as gRPC's message cap
MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts in one /v1/completions call
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions
OWNER = "loraserve"

_ERRORS: list[tuple[type, int, str, str]] = [  # class, HTTP status, type, code
    (AdapterNotFound, 404, "invalid_request_error", "model_not_found"),
    (InvalidRequest, 400, "invalid_request_error", "invalid_value"),
    (NoChatTemplate, 400, "invalid_request_error", "no_chat_template"),
    (AdapterUnavailable, 400, "invalid_request_error", "adapter_unavailable"),
    (InvalidAdapter, 400, "invalid_request_error", "adapter_unavailable"),
    (NonFiniteLogits, 500, "server_error", "non_finite_logits"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (ShuttingDown, 503, "service_unavailable", "unavailable"),
    (Unauthenticated, 401, "invalid_request_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", "permission_denied"),
]


class HTTPError(Exception):
    """A refusal the API layer itself makes (body size, JSON, method)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_body(err: Exception) -> tuple[int, dict]:
    """OpenAI's error shape and HTTP status for ``err``."""
    if isinstance(err, HTTPError):
        status, kind, code, param = err.status, "invalid_request_error", err.code, err.param
    else:
        status, kind, code, param = 500, "server_error", "internal_error", None
        for cls, s, k, c in _ERRORS:
            if isinstance(err, cls):
                status, kind, code = s, k, c
                break
        if isinstance(err, InvalidRequest):
            param = err.field
    if status == 500 and not isinstance(err, ServingError):
        message = f"internal error ({type(err).__name__}); the server log has the details"
    else:
        message = str(err)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: Exception) -> JSONResponse:
    status, body = error_body(err)
    return JSONResponse(body, status_code=status)


# ------------------------------------------------------------------------------------------
# request fields


class Fields:
    """A JSON request body, read field by field; a wrong field raises ``InvalidRequest`` naming
    it. Unknown fields are ignored, as OpenAI's own server does for clients newer than it."""

    def __init__(self, body: object):
        if not isinstance(body, dict):
            raise InvalidRequest("body", "must be a JSON object")
        self.body = body

    def get(self, name: str, kinds: tuple[type, ...], default=None, *, what: str = ""):
        value = self.body.get(name)
        if value is None:  # absent, or null: OpenAI's clients send null for "not set"
            return default
        # bool is an int in Python; JSON true is never a number here
        if isinstance(value, bool) and bool not in kinds:
            raise InvalidRequest(name, f"must be {what or _kinds(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise InvalidRequest(name, f"must be {what or _kinds(kinds)}, got {_short(value)}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        try:
            value = float(self.get(name, (int, float), default))
        except OverflowError:  # a 400-digit integer
            raise InvalidRequest(name, f"must be in [{low:g}, {high:g}]") from None
        if not low <= value <= high:
            raise InvalidRequest(name, f"must be in [{low:g}, {high:g}], got {value:g}")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.get(name, (int,), default)
        if value is not None and not low <= value <= high:
            raise InvalidRequest(name, f"must be in [{low}, {high}], got {value}")
        return value

    def unsupported(self, name: str, neutral: Callable[[object], bool]) -> None:
        """Refuse ``name`` unless absent or set to a value that changes nothing."""
        value = self.body.get(name)
        if value is not None and not neutral(value):
            raise InvalidRequest(name, "is not supported by this server")


def _kinds(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
    names.update({list: "an array", dict: "an object"})
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _short(value: object) -> str:
    text = json.dumps(value)[:40]
    return f"{type(value).__name__} {text}"


@dataclass(frozen=True)
class Choice:
    """One generation of a request: its prompt ids and sampling."""

    index: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    echo: tuple[int, ...] = ()  # prompt ids echoed before the completion (completions echo)
    prompt_index: int = 0  # which of the request's prompts (its n choices share it)


# ------------------------------------------------------------------------------------------
# the app


class OpenAIApp:
    """The HTTP side of one ``LoraServer``: reads its runtime once the model has loaded."""

    def __init__(self, server):
        self.server = server  # LoraServer: .servicer.front (None while loading), .draining
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # ---------------------------------------------------------------- plumbing

    @property
    def front(self) -> Frontend:
        if getattr(self.server, "draining", False):
            raise ShuttingDown("the server is draining; retry on another replica")
        front = self.server.servicer.front
        if front is None:
            raise ShuttingDown("the model is still loading")
        return front

    @property
    def base_name(self) -> str:
        return self.server.served_model_name

    async def _not_found(self, request: Request, exc) -> Response:
        return error_response(HTTPError(404, f"no route {request.url.path}", "not_found"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        return error_response(
            HTTPError(405, f"{request.method} is not allowed on {request.url.path}", "method")
        )

    async def read_json(self, request: Request) -> Fields:
        """The body, refused unread past ``MAX_BODY_BYTES`` (by its Content-Length, or as it
        streams in), and parsed as one JSON object."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise HTTPError(413, f"the body is over {MAX_BODY_BYTES} bytes", "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise HTTPError(413, f"the body is over {MAX_BODY_BYTES} bytes", "body_too_large")
            chunks.append(chunk)
        try:
            return Fields(json.loads(b"".join(chunks)))
        except (ValueError, RecursionError) as err:
            raise HTTPError(400, f"the body is not valid JSON ({err})", "invalid_json") from None

    def tenant_of(self, request: Request) -> Tenant | None:
        """The caller's tenant from its ``Authorization: Bearer`` header (None: auth off);
        raises ``Unauthenticated``. Checked before the body is read."""
        auth = self.server.auth
        return None if auth is None else auth.authorize(request.headers.get("authorization"))

    def target_of(self, model: str) -> Target:
        """What ``model`` names, from its spelling alone (nothing is looked up)."""
        if model == self.base_name:
            return Target()
        if ":" not in model and "+" not in model:
            return Target(adapter=model)
        parts = model.split("+", MAX_LISTED)
        if len(parts) > MAX_LISTED:
            raise InvalidRequest("model", f"a mixture of more than {MAX_LISTED} adapters")
        members = []
        for i, part in enumerate(parts):
            name, colon, weight = part.partition(":")
            if not colon:
                weight = "1"
            try:
                value = float(weight)
            except ValueError:
                raise InvalidRequest(
                    "model",
                    f"mixture member {i} ({part[:64]!r}): {weight[:32]!r} is not a number; "
                    "spell a mixture NAME:WEIGHT+NAME:WEIGHT",
                ) from None
            members.append(MixtureMember(name, value))
        return Target(mixture=tuple(members))

    def permit(self, tenant: Tenant | None, target: Target) -> None:
        """Raise ``PermissionDenied`` when anything ``target`` names is not the tenant's to
        use, before it is looked up (the answer does not say whether it exists)."""
        for name in target.names if tenant is not None else ():
            if not tenant.may_use(name):
                raise PermissionDenied(name, tenant.name)

    def resolve(self, front: Frontend, target: Target) -> None:
        """Check the names ``target`` holds and that they are deployed (``AdapterNotFound``)."""
        for i, name in enumerate(filter(None, target.names)):
            field = f"model (mixture member {i})" if target.mixture else "model"
            Frontend.check_adapter_name(name, field)
            front.runtime.registry.resolve(name)

    async def _serve(
        self,
        request: Request,
        method: str,
        build: Callable,
        respond: Callable,
        stream: Callable,
    ) -> Response:
        """The shared part of both generation endpoints: parse, build the choices, then answer
        in one response or as a stream; errors in OpenAI's shape; metrics and a log line."""
        t0, adapter, code, streaming, tenant = time.monotonic(), Target(), "OK", False, None
        try:
            tenant = self.tenant_of(request)
            front = self.front
            fields = await self.read_json(request)
            model = fields.get("model", (str,))
            if model is None:
                raise InvalidRequest("model", "is required")
            target = self.target_of(model)
            self.permit(tenant, target)
            self.resolve(front, target)
            adapter = target
            choices = await build(front, fields, adapter)
            if len(choices) > front.runtime.config.max_queue:
                raise InvalidRequest(
                    "n",
                    f"{len(choices)} choices (prompts x n) is more than this server queues at "
                    f"once ({front.runtime.config.max_queue})",
                )
            checked = set()
            for c in choices:  # a bad field fails the request before anything is queued
                if c.prompt_index in checked:
                    continue  # the n choices of a prompt differ only in their seed
                checked.add(c.prompt_index)
                try:
                    front.runtime.engine.validate(_request(c, adapter))
                except InvalidRequest as err:  # the engine's names for OpenAI's fields
                    if err.field.startswith("adapters"):  # a mixture spelled in `model`
                        raise InvalidRequest("model", f"the mixture's {err}") from None
                    field = _FIELD_NAMES.get(err.field, err.field)
                    raise InvalidRequest(field, str(err).split(": ", 1)[-1]) from None
            if fields.get("stream", (bool,), False):
                options = fields.get("stream_options", (dict,), {}) or {}
                usage = bool(options.get("include_usage", False))
                # queued before the 200 goes out: a full queue is still a 429
                submitted = _submit_all(front, choices, adapter)
                body = stream(front, model, adapter, submitted, usage)
                streaming = True
                return StreamingResponse(
                    self._sse(body, method, adapter, t0, tenant), media_type="text/event-stream"
                )
            result = await _until_disconnect(request, respond(front, model, adapter, choices))
            if result is None:  # the client left: its sequences were cancelled
                code = "CANCELLED"
                return Response(status_code=499)
            return JSONResponse(result)
        except Exception as err:
            code = _code_name(err)
            if code == "INTERNAL":
                log.error("%s failed unexpectedly", method, exc_info=err)
            if isinstance(err, PermissionDenied):
                tenant = err.tenant  # a refused tenant is still counted
            return error_response(err)
        finally:
            if not streaming:  # a stream records itself when it ends
                self._record(method, adapter, code, t0, tenant)

    def _record(
        self, method: str, adapter: Target, code: str, t0: float, tenant: Tenant | str | None
    ) -> None:
        name = tenant.name if isinstance(tenant, Tenant) else tenant
        if name is None and self.server.auth is not None:
            name = UNAUTHENTICATED_TENANT
        seconds = time.monotonic() - t0
        log.info(
            "%s adapter=%r%s: %s in %.3fs",
            method,
            str(adapter)[:256],
            "" if name is None else f" tenant={name!r}",
            code,
            seconds,
        )
        front = self.server.servicer.front
        if front is not None:
            for label in adapter.names:  # a mixture counts for each member
                front.runtime.metrics.observe_request(label, method, code, seconds, name)

    async def _sse(
        self,
        body: AsyncIterator[dict],
        method: str,
        adapter: Target,
        t0: float,
        tenant: Tenant | None,
    ):
        """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``. An error
        after the headers went out is sent as an ``{"error": ...}`` event, as OpenAI does."""
        code = "OK"
        try:
            async for chunk in body:
                yield f"data: {json.dumps(chunk, ensure_ascii=False, allow_nan=False)}\n\n"
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as err:
            code = _code_name(err)
            if code == "INTERNAL":
                log.error("%s failed unexpectedly", method, exc_info=err)
            yield f"data: {json.dumps(error_body(err)[1])}\n\n"
        finally:
            self._record(method, adapter, code, t0, tenant)
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> Response:
        try:
            _ = self.front
        except ShuttingDown as err:
            return error_response(err)
        return JSONResponse({"status": "ok"})

    def _model_card(self, name: str, parent: str | None) -> dict:
        card = {"id": name, "object": "model", "created": self.server.started, "owned_by": OWNER}
        card.update(root=parent or name, parent=parent)
        return card

    async def models(self, request: Request) -> Response:
        """The base model and every adapter; with ``--auth-file``, only what the caller may
        use."""
        try:
            tenant = self.tenant_of(request)
            front = self.front
        except (ShuttingDown, Unauthenticated) as err:
            return error_response(err)
        cards = []
        if tenant is None or tenant.may_use(""):
            cards.append(self._model_card(self.base_name, None))
        for entry in front.runtime.registry.entries():
            if tenant is None or tenant.may_use(entry.name):
                cards.append(self._model_card(entry.name, self.base_name))
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            target = self.target_of(name)
            self.permit(self.tenant_of(request), target)
            self.resolve(self.front, target)
        except Exception as err:
            return error_response(err)
        base = target == Target()
        return JSONResponse(self._model_card(name, None if base else self.base_name))

    async def completions(self, request: Request) -> Response:
        return await self._serve(
            request,
            "Completions",
            self._completion_choices,
            self._completion,
            self._completion_stream,
        )

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(
            request, "ChatCompletions", self._chat_choices, self._chat, self._chat_stream
        )

    # ---------------------------------------------------------------- /v1/completions

    async def _completion_choices(self, front: Frontend, f: Fields, adapter: Target):
        _refuse_unsupported(f)
        f.unsupported("suffix", lambda v: v == "")
        n = f.integer("n", 1, 1, MAX_N)
        f.unsupported("best_of", lambda v: v == n)
        echo = f.get("echo", (bool,), False)
        logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
        max_tokens = f.integer("max_tokens", DEFAULT_COMPLETION_TOKENS, 0, front.max_seq_len)
        if max_tokens == 0 and not (echo and logprobs is not None):
            raise InvalidRequest("max_tokens", "0 only with echo and logprobs (scoring a prompt)")
        prompts = await self._prompts(front, f.body.get("prompt"))
        params = await self._compiled(front, f, self._sampling(f, max_tokens, logprobs))
        streaming = f.get("stream", (bool,), False)
        choices = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                seeded = params if params.seed is None else replace(params, seed=params.seed + j)
                if echo and logprobs is not None and (j == 0 or streaming):
                    # the n choices of a prompt share its log-probabilities: computed once
                    # (a stream sends each choice's with its echo)
                    seeded = replace(seeded, prompt_logprobs=logprobs)
                echoed = tuple(ids) if echo else ()
                choices.append(Choice(p * n + j, tuple(ids), seeded, echoed, prompt_index=p))
        return choices

    async def _prompts(self, front: Frontend, prompt: object) -> list[list[int]]:
        """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids."""
        if isinstance(prompt, str):
            return [await front.tokenize(prompt)]
        if isinstance(prompt, list) and prompt:
            if len(prompt) > MAX_PROMPTS and not all(isinstance(t, int) for t in prompt):
                raise InvalidRequest("prompt", f"at most {MAX_PROMPTS} prompts per request")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [self._ids(front, prompt, "prompt")]
            if all(isinstance(t, str) for t in prompt):
                return [await front.tokenize(t, f"prompt[{i}]") for i, t in enumerate(prompt)]
            if all(isinstance(t, list) for t in prompt):
                return [self._ids(front, t, f"prompt[{i}]") for i, t in enumerate(prompt)]
        raise InvalidRequest(
            "prompt", "must be a non-empty string, array of strings, or array(s) of token ids"
        )

    @staticmethod
    def _ids(front: Frontend, ids: list, field: str) -> list[int]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequest(field, "must be a non-empty array of token ids")
        if len(ids) >= front.max_seq_len:
            raise InvalidRequest(
                field, f"{len(ids)} tokens does not fit max_seq_len {front.max_seq_len}"
            )
        return ids

    async def _completion(self, front, model, adapter, choices) -> dict:
        results = await front.all_or_none(self._run(front, c, adapter) for c in choices)
        shared = {c.prompt_index: r[3] for c, r in zip(choices, results) if r[3]}
        out, usage = [], _Usage()
        for c, (text, _, logprobs, _, finish) in zip(choices, results):
            usage.add(finish, c)
            echoed = front.tokenizer.decode(c.echo) if c.echo else ""
            entries = _echo_entries(c, shared.get(c.prompt_index, [])) + _entries(logprobs)
            out.append(
                {
                    "index": c.index,
                    "text": echoed + text,
                    "logprobs": self._completion_logprobs(front, c, entries)[0],
                    "finish_reason": _finish(finish),
                }
            )
        return {**_head("cmpl", "text_completion", model), "choices": out, "usage": usage.body()}

    def _completion_logprobs(
        self, front, c: Choice, entries: list[tuple[int, TokenLogprob | None]], at: int = 0
    ) -> tuple[dict | None, int]:
        """The legacy ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)
        for ``entries`` (token id, its log-probability or None), offsets counted from ``at``;
        and the offset after them (a stream continues from it)."""
        if c.params.logprobs is None:
            return None, at
        text = front.token_text
        tokens, values, tops, offsets = [], [], [], []
        for token_id, v in entries:
            tokens.append(text(token_id))
            offsets.append(at)
            at += len(front.tokenizer.decode([token_id]))  # as the text shows it
            values.append(None if v is None else v.logprob)
            tops.append(None if v is None else {text(i): lp for i, lp in v.top})
        body = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops}
        return {**body, "text_offset": offsets}, at

    async def _completion_stream(self, front, model, adapter, submitted, usage):
        base = _head("cmpl", "text_completion", model)
        tail = {"usage": None} if usage else {}
        total, offsets = _Usage(), {}

        def chunk(c: Choice, text: str, entries, finish=None) -> dict:
            logprobs, offsets[c.index] = self._completion_logprobs(
                front, c, entries, offsets.get(c.index, 0)
            )
            choice = {"index": c.index, "text": text, "logprobs": logprobs}
            return {**base, "choices": [{**choice, "finish_reason": finish}], **tail}

        for c, _ in submitted:  # an echo without log-probabilities goes first
            if c.echo and c.params.prompt_logprobs is None:
                yield chunk(c, front.tokenizer.decode(c.echo), [])
        async for c, event in _merged(front, submitted):
            if isinstance(event, TokenEvent):
                if event.prompt_logprobs is not None:  # the echo, with its log-probabilities
                    text = front.tokenizer.decode(c.echo)
                    yield chunk(c, text, _echo_entries(c, event.prompt_logprobs))
                    continue
                yield chunk(c, event.text, _entries(event.logprobs or []))
            else:
                total.add(event, c)
                yield chunk(c, "", [], _finish(event))
        if usage:
            yield {**base, "choices": [], "usage": total.body()}

    # ---------------------------------------------------------------- /v1/chat/completions

    async def _chat_choices(self, front: Frontend, f: Fields, adapter: Target):
        _refuse_unsupported(f)
        f.unsupported("tools", lambda v: v == [])
        f.unsupported("tool_choice", lambda v: v == "none")
        n = f.integer("n", 1, 1, MAX_N)
        want = f.get("logprobs", (bool,), False)
        top = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        messages = _messages(f.get("messages", (list,), None))
        add = f.get("add_generation_prompt", (bool,), True)
        ids = await front.chat_ids(adapter.names, messages, add)
        room = front.max_seq_len - len(ids)
        limit = f.integer("max_completion_tokens", None, 1, front.max_seq_len)
        if limit is None:
            limit = f.integer("max_tokens", None, 1, front.max_seq_len)
        max_tokens = limit if limit is not None else max(1, room)  # default: the rest of the row
        params = self._sampling(f, max_tokens, (top or 0) if want else None)
        params = await self._compiled(front, f, params)
        choices = [
            Choice(
                j,
                tuple(ids),
                replace(params, seed=None if params.seed is None else params.seed + j),
            )
            for j in range(n)
        ]
        return choices

    async def _chat(self, front, model, adapter, choices) -> dict:
        results = await front.all_or_none(self._run(front, c, adapter) for c in choices)
        out, usage = [], _Usage()
        for c, (text, _, logprobs, _, finish) in zip(choices, results):
            usage.add(finish, c)
            out.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self._chat_logprobs(front, c, logprobs),
                    "finish_reason": _finish(finish),
                }
            )
        return {
            **_head("chatcmpl", "chat.completion", model),
            "choices": out,
            "usage": usage.body(),
        }

    def _chat_logprobs(self, front, c: Choice, values: list[TokenLogprob]) -> dict | None:
        if c.params.logprobs is None:
            return None
        text = front.token_text

        def entry(token_id: int, logprob: float) -> dict:
            piece = text(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return {
            "content": [
                {**entry(v.token_id, v.logprob), "top_logprobs": [entry(i, lp) for i, lp in v.top]}
                for v in values
            ]
        }

    async def _chat_stream(self, front, model, adapter, submitted, usage):
        base = _head("chatcmpl", "chat.completion.chunk", model)
        tail = {"usage": None} if usage else {}
        for c, _ in submitted:  # the first chunk of every choice names the role
            delta = {"role": "assistant", "content": ""}
            choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield {**base, "choices": [choice], **tail}
        total = _Usage()
        async for c, event in _merged(front, submitted):
            if isinstance(event, TokenEvent):
                if not (event.text or event.token_ids):
                    continue
                choice = {
                    "index": c.index,
                    "delta": {"content": event.text},
                    "logprobs": self._chat_logprobs(front, c, event.logprobs or []),
                    "finish_reason": None,
                }
            else:
                total.add(event, c)
                choice = {"index": c.index, "delta": {}, "logprobs": None}
                choice["finish_reason"] = _finish(event)
            yield {**base, "choices": [choice], **tail}
        if usage:
            yield {**base, "choices": [], "usage": total.body()}

    # ---------------------------------------------------------------- shared

    def _sampling(self, f: Fields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = f.get("stop", (str, list), ())
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop", "must be a string or an array of strings")
        seed = f.get("seed", (int,), None)
        if seed is not None and not 0 <= seed < 1 << 63:
            raise InvalidRequest("seed", f"must be in [0, 2**63), got {seed}")
        return SamplingParams(
            max_new_tokens=max_tokens,
            # OpenAI's default is 1 (sampling); 0 is greedy here as everywhere
            temperature=f.number("temperature", 1.0, 0.0, 2.0),
            top_p=_top_p(f),
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            constraint=_constraint(f),
        )

    @staticmethod
    async def _compiled(front: Frontend, f: Fields, params: SamplingParams) -> SamplingParams:
        """``params`` with its constraint compiled (off the event loop); a constraint the
        engine refuses is reported under the field the caller used."""
        try:
            return await front.sampling(params)
        except InvalidRequest as err:
            if not err.field.startswith("params.constraint"):
                raise
            message = str(err).split(": ", 1)[-1]
            raise InvalidRequest(_constraint_field(f), message) from None

    async def _run(self, front: Frontend, c: Choice, adapter: Target):
        """One choice to the end: (text, token ids, logprobs, prompt logprobs, finish event)."""
        text, ids, logprobs, prompt, last = [], [], [], [], None
        async for event in front.events(_request(c, adapter)):
            if isinstance(event, TokenEvent):
                text.append(event.text)
                ids.extend(event.token_ids)
                logprobs.extend(event.logprobs or ())
                prompt.extend(event.prompt_logprobs or ())
            else:
                last = event
        return "".join(text), ids, logprobs, prompt, last

    # ---------------------------------------------------------------- serving

    async def serve(self, host: str, port: int, tls: dict | None = None) -> int:
        """Bind (now, so a taken port fails at start-up) and serve on this loop; returns the
        port bound."""
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise OSError(
                f"cannot listen on --http-port {port} ({host}): {err.strerror or err}"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=1,
            **(tls or {}),
        )
        self._uvicorn = uvicorn.Server(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        self._socket = sock
        while not self._uvicorn.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what stopped it
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if getattr(self, "_uvicorn", None) is not None:
            self._uvicorn.should_exit = True
            await self._task
            self._socket.close()


def tls_options(config) -> dict | None:
    """uvicorn's TLS settings from the server's (``--tls-cert`` and friends)."""
    if not config.tls_cert:
        return None
    options = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if config.tls_client_ca:
        options.update(ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


# ------------------------------------------------------------------------------------------
# helpers


_FIELD_NAMES = {
    "params.max_new_tokens": "max_tokens",
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.stop": "stop",
    "params.logprobs": "logprobs",
    "params.prompt_logprobs": "logprobs",
}


GUIDED = ("guided_json", "guided_regex", "guided_choice")  # vLLM's extension fields


def _constraint_field(f: Fields) -> str:
    """The field that carries the request's constraint."""
    return next((name for name in GUIDED if f.body.get(name) is not None), "response_format")


def _constraint(f: Fields) -> Constraint | None:
    """OpenAI's ``response_format`` (``json_schema``, ``json_object``; ``text`` = none), or one
    of vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice``: at most one of them."""
    given = [name for name in GUIDED if f.body.get(name) is not None]
    fmt = f.get("response_format", (dict,), None)
    if fmt is not None and fmt.get("type", "text") != "text":
        given.append("response_format")
    if len(given) > 1:
        raise InvalidRequest(given[1], f"give one of {given}, not several")
    if not given:
        return None
    name = given[0]
    if name == "guided_json":
        schema = f.get(name, (dict, str))
        return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema))
    if name == "guided_regex":
        return Constraint("regex", f.get(name, (str,)))
    if name == "guided_choice":
        choices = f.get(name, (list,))
        if not all(isinstance(c, str) for c in choices):
            raise InvalidRequest(name, "must be an array of strings")
        return Constraint("choice", tuple(choices))
    kind = fmt.get("type")
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise InvalidRequest(
            "response_format", f"type must be text, json_object or json_schema, got {kind!r}"
        )
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "response_format", "type json_schema needs json_schema.schema, a JSON object"
        )
    return Constraint("json_schema", json.dumps(schema))


def _top_p(f: Fields) -> float:
    value = f.number("top_p", 1.0, 0.0, 1.0)
    if value == 0:
        raise InvalidRequest("top_p", "must be in (0, 1], got 0")
    return value


def _refuse_unsupported(f: Fields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        f.unsupported(name, lambda v: v == 0)
    f.unsupported("logit_bias", lambda v: v == {})


def _messages(raw: list | None) -> list[dict]:
    """Chat messages with string content (text parts joined); other part types refused."""
    if not raw:
        raise InvalidRequest("messages", "is required and must be a non-empty array")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}]", "must be an object")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}]", "only text parts are supported"
                    )
                parts.append(part.get("text"))
            if not all(isinstance(p, str) for p in parts):
                raise InvalidRequest(f"messages[{i}].content", "text parts need a string text")
            content = "".join(parts)
        elif content is None and m.get("role") == "assistant":
            content = ""
        out.append({"role": m.get("role"), "content": content})
    return out


def _entries(values: list[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return [(v.token_id, v) for v in values]


def _echo_entries(c: Choice, prompt: list[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    """An echoed prompt's tokens: the first has no log-probability, the rest ``prompt``'s."""
    return [(c.echo[0], None), *_entries(prompt)] if c.echo else []


def _head(prefix: str, kind: str, model: str) -> dict:
    """The fields every response and chunk starts with: a fresh id, its object type, when."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` names: the base model, an adapter, or a mixture."""

    adapter: str = ""
    mixture: tuple[MixtureMember, ...] = ()

    @property
    def names(self) -> list[str]:
        """The adapters it uses ("" = the base model), each checked against permissions."""
        return list(dict.fromkeys(m.name for m in self.mixture)) or [self.adapter]

    def __str__(self) -> str:
        return mixture_name(self.mixture) if self.mixture else self.adapter


def _request(c: Choice, adapter: Target) -> GenerationRequest:
    return GenerationRequest(c.prompt_ids, c.params, adapter.adapter, mixture=adapter.mixture)


def _finish(event: FinishEvent) -> str:
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(event.reason, "stop")


def _code_name(err: Exception) -> str:
    """The status name the request metrics record (gRPC's, for both APIs)."""
    if isinstance(err, HTTPError):
        return "INVALID_ARGUMENT"
    return status_for(err).name


class _Usage:
    """Usage as OpenAI bills it: each prompt's tokens once, whatever ``n``; every choice's
    completion tokens."""

    def __init__(self):
        self.prompt = self.completion = 0
        self._prompts: set[int] = set()

    def add(self, event: FinishEvent, c: Choice) -> None:
        if c.prompt_index not in self._prompts:
            self._prompts.add(c.prompt_index)
            self.prompt += event.prompt_tokens
        self.completion += event.completion_tokens

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


def _submit_all(front: Frontend, choices: list[Choice], adapter: Target) -> list[tuple]:
    """Queue every choice now, or none: a refusal cancels those already queued."""
    submitted = []
    try:
        for c in choices:
            submitted.append((c, front.submit(_request(c, adapter))))
    except BaseException:
        for _, s in submitted:
            s.handle.cancel()
        raise
    return submitted


async def _merged(front: Frontend, submitted: list[tuple]):
    """Every submitted choice's events as they come, tagged with their choice; cancels every
    choice when the consumer stops early (the client disconnected) or one fails."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(c: Choice, s) -> None:
        try:
            async for event in front.relay(s):
                await queue.put((c, event))
        except Exception as err:
            await queue.put((c, err))
        finally:
            await queue.put((c, done))

    tasks = [asyncio.create_task(pump(c, s)) for c, s in submitted]
    try:
        left = len(tasks)
        while left:
            c, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield c, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, s in submitted:  # a pump cancelled before it began never cancels its request
            s.handle.cancel()


async def _until_disconnect(request: Request, work) -> dict | None:
    """``await work``, unless the client disconnects first: then cancel it, return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


__all__ = ["OpenAIApp", "error_body", "tls_options"]
