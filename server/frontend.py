"""What every API in front of the engine shares: gRPC (``servicer``) and HTTP (``openai_api``).

Prompts become token ids here, bounded before any work: text longer than ``max_seq_len`` tokens
could cover is refused unread, tokenization and template rendering run off the event loop, and
characters the vocabulary cannot represent are refused by name. Conversations are rendered with
the adapter's chat template when it carries one, else the base model's; a template's own error
(``raise_exception``, a budget it ran over) fails that request alone. ``events`` submits to the
engine and relays its events onto the caller's event loop; leaving the iteration early (the
client hung up, a deadline passed, an error) cancels the request, which frees its KV row at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from loraserve.adapters.chat_template import ChatTemplate, ChatTemplateError
from loraserve.adapters.format import NAME_RE
from loraserve.adapters.tokenizer import UnencodableText
from loraserve.server.engine import (
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
)
from loraserve.server.errors import InvalidRequest, NoChatTemplate, ShuttingDown
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams

MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_CONTINUATIONS = 64  # per Score call


@dataclass(frozen=True)
class Submitted:
    """A request the engine has queued, and the queue its events arrive on."""

    handle: RequestHandle
    events: asyncio.Queue


class Frontend:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.max_seq_len = runtime.config.max_seq_len

    # ---------------------------------------------------------------- checks

    @staticmethod
    def check_adapter_name(name: str, field: str = "adapter") -> None:
        if name and not NAME_RE.fullmatch(name):
            raise InvalidRequest(
                field, f"{name[:64]!r} is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]*)"
            )

    @property
    def max_chars(self) -> int:
        """The longest text that could tokenize into ``max_seq_len`` tokens."""
        return self.max_seq_len * self.tokenizer.max_token_chars

    # ---------------------------------------------------------------- prompts

    async def tokenize(self, text: str, field: str = "prompt", special: bool = True) -> list[int]:
        """``text`` as token ids (``special``: with the tokenizer's own BOS/EOS additions)."""
        if len(text) > self.max_chars:  # no tokenization of this text can fit: refuse it unread
            raise InvalidRequest(
                field,
                f"{len(text)} characters cannot fit max_seq_len {self.max_seq_len} tokens "
                f"(at most {self.max_chars} characters)",
            )
        try:
            return await asyncio.to_thread(self.tokenizer.encode_checked, text, special)
        except UnencodableText as err:
            raise InvalidRequest(field, str(err)) from None

    def chat_template(self, adapter: str | Sequence[str]) -> ChatTemplate:
        """The adapter's template if it carries one, else the base model's. For a mixture
        (several names), the first member's that carries one."""
        base = self.runtime.chat_template
        names = [adapter] if isinstance(adapter, str) else list(adapter)
        for name in filter(None, names):
            entry = self.runtime.registry.resolve(name)  # AdapterNotFound / Unavailable
            if entry.chat_template is not None:
                return ChatTemplate(
                    entry.chat_template,
                    bos_token=base.bos_token if base else None,
                    eos_token=base.eos_token if base else None,
                )
        if base is None:
            adapter = "+".join(names)
            what = f"adapter {adapter!r} carries none and the" if adapter else "the"
            raise NoChatTemplate(
                f"no chat template: {what} base model {self.runtime.config.model!r} has no "
                "chat_template.jinja and no chat_template in its tokenizer_config.json; send "
                "a rendered prompt to Generate (or /v1/completions) instead"
            )
        return base

    async def chat_ids(
        self,
        adapter: str | Sequence[str],
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        field: str = "messages",
    ) -> list[int]:
        """``messages`` (``{"role", "content"}`` dicts) rendered and tokenized as transformers'
        ``apply_chat_template(tokenize=True)`` does (no special tokens added: the template
        writes them)."""
        if not messages:
            raise InvalidRequest(field, "is empty")
        if len(messages) > MAX_MESSAGES:
            raise InvalidRequest(field, f"{len(messages)} messages; at most {MAX_MESSAGES}")
        total = 0
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise InvalidRequest(f"{field}[{i}].role", f"must be one of {ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise InvalidRequest(f"{field}[{i}].content", "must be a string")
            total += len(content)
        if total > self.max_chars:
            raise InvalidRequest(
                field,
                f"{total} characters cannot fit max_seq_len {self.max_seq_len} tokens",
            )
        template = self.chat_template(adapter)
        try:
            text = await asyncio.to_thread(
                template.render,
                [dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                max_chars=self.max_chars,
            )
        except ChatTemplateError as err:
            raise InvalidRequest(field, f"the chat template refused them: {err}") from None
        return await self.tokenize(text, field, special=False)

    async def sampling(self, params: SamplingParams) -> SamplingParams:
        """``params``, its constraint (if any) compiled off the event loop first: the engine's
        submit then finds it in the cache, so no compile runs on the loop or the engine."""
        if params.constraint is not None:
            grammars = self.runtime.grammars
            await asyncio.to_thread(grammars.compile, params.constraint)
        return params

    # ---------------------------------------------------------------- the engine

    def submit(self, request: GenerationRequest) -> Submitted:
        """Queue ``request`` now (``QueueFull`` and the like raise here, before any response
        has started); ``relay`` then yields its events."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = self.runtime.engine.submit(
            request, on_event=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e)
        )
        return Submitted(handle, queue)

    async def relay(self, submitted: Submitted, strict: bool = True) -> AsyncIterator[Event]:
        """A submitted request's events; the finish event's error is raised, and (``strict``)
        so is a cancellation the caller did not ask for (the server stopped it while draining;
        gRPC's Generate reports it as finish reason CANCELLED instead). Stopping early cancels
        the request."""
        finished = False
        try:
            while not finished:
                event = await submitted.events.get()
                finished = isinstance(event, FinishEvent)
                if finished and event.error is not None:
                    raise event.error
                if finished and strict and event.reason is FinishReason.CANCELLED:
                    raise ShuttingDown("the server stopped this request (it is shutting down)")
                yield event
        finally:
            if not finished:  # client cancel, deadline, or an error on our side
                submitted.handle.cancel()

    async def events(self, request: GenerationRequest, strict: bool = True) -> AsyncIterator[Event]:
        """``submit`` then ``relay``."""
        async for event in self.relay(self.submit(request), strict):
            yield event

    @staticmethod
    async def all_or_none(coroutines) -> list:
        """``asyncio.gather`` of ``coroutines`` that cancels the rest when one fails (a full
        queue, a bad adapter) or the caller is cancelled: no orphaned generation runs on."""
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @functools.cached_property
    def _token_text(self):
        @functools.lru_cache(maxsize=65536)
        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

        return text

    def token_text(self, token_id: int) -> str:
        """A token's text alone (a byte-level piece may be part of a UTF-8 character: U+FFFD)."""
        return self._token_text(token_id)
