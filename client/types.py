"""The client's typed values. Protobuf stops here: each result is a frozen dataclass built by
``from_pb`` at the edge, and ``SamplingParams.to_pb`` is the only way parameters go out.

Enums are ``str`` enums ("stop", "on_disk", ...) so results print and serialise to JSON as
plain strings.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, fields

from loraserve.v1 import inference_pb2 as pb


class FinishReason(str, enum.Enum):
    """Why generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached, or the sequence filled max_seq_len
    CANCELLED = "cancelled"  # client cancel, deadline, or server shutdown


class AdapterState(str, enum.Enum):
    """Where an adapter's weights are on the server (the cache tier), or that it is broken."""

    ON_DISK = "on_disk"
    HOST = "host"
    DEVICE = "device"
    INVALID = "invalid"
    UNKNOWN = "unknown"  # the server sent none, or a state newer than this client


_FINISH_REASONS = {
    pb.STOP: FinishReason.STOP,
    pb.LENGTH: FinishReason.LENGTH,
    pb.CANCELLED: FinishReason.CANCELLED,
}
_ADAPTER_STATES = {
    pb.ON_DISK: AdapterState.ON_DISK,
    pb.HOST: AdapterState.HOST,
    pb.DEVICE: AdapterState.DEVICE,
    pb.INVALID: AdapterState.INVALID,
}


def _finish_reason(value: int) -> FinishReason | None:
    # FINISH_REASON_UNSPECIFIED (and any value newer than this client) -> None.
    return _FINISH_REASONS.get(value)


@dataclass(frozen=True)
class Constraint:
    """A format the output must follow (structured output): give exactly one of a JSON schema
    (a dict, or its JSON text), ``json_object=True`` (any JSON object), a regular expression the
    whole output matches, or the strings the output may be."""

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        given = [self.json_schema is not None, self.json_object, self.regex is not None]
        if sum(given) + bool(self.choices) != 1:
            raise ValueError(
                "a Constraint takes exactly one of json_schema, json_object, regex, choices"
            )

    def to_pb(self) -> pb.Constraint:
        if self.json_schema is not None:
            schema = self.json_schema
            text = schema if isinstance(schema, str) else json.dumps(schema)
            return pb.Constraint(json_schema=text)
        if self.json_object:
            return pb.Constraint(json_object=True)
        if self.regex is not None:
            return pb.Constraint(regex=self.regex)
        return pb.Constraint(choices=pb.Choices(choices=list(self.choices)))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``None`` leaves a field unset so the server applies its default
    (64 new tokens, greedy, top_p 1, top_k off, unseeded)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # set: each generated token's log-probability + k likeliest
    prompt_logprobs: int | None = None  # set: the same for the prompt's tokens
    constraint: Constraint | None = None  # set: structured output

    def __post_init__(self):
        # A lone string is one stop string, not a sequence of one-character ones.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)

    def to_pb(self) -> pb.SamplingParams:
        # The proto3 fields are `optional`: only what was given gets set (HasField is true).
        fields = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }
        given = {name: value for name, value in fields.items() if value is not None}
        if self.constraint is not None:
            given["constraint"] = self.constraint.to_pb()
        return pb.SamplingParams(stop=list(self.stop), **given)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the likeliest tokens at its position: ``top`` holds
    ``(token_id, token, logprob)``, likeliest first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()

    @classmethod
    def from_pb(cls, msg: pb.TokenLogprob) -> TokenLogprob:
        top = tuple((t.token_id, t.token, t.logprob) for t in msg.top)
        return cls(msg.token_id, msg.token, msg.logprob, top)


def _logprobs(values) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob.from_pb(v) for v in values)


@dataclass(frozen=True)
class Completion:
    """A whole completion (``LoraClient.generate``)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # end-of-sequence token included, so may be len(token_ids) + 1
    adapter: str  # "" = the base model
    adapter_version: str  # content hash of the adapter file that served it
    request_id: str
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 2..n, when asked for
    # a mixture's members -> the version of each that served it (adapter is then "")
    adapter_versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> Completion:
        return cls(
            text=msg.text,
            token_ids=tuple(msg.token_ids),
            finish_reason=_finish_reason(msg.finish_reason),
            prompt_tokens=msg.prompt_tokens,
            completion_tokens=msg.completion_tokens,
            adapter=msg.adapter,
            adapter_version=msg.adapter_version,
            request_id=msg.request_id,
            logprobs=_logprobs(msg.logprobs),
            prompt_logprobs=_logprobs(msg.prompt_logprobs),
            adapter_versions=_versions(msg.adapter_versions),
        )


def _versions(values) -> dict[str, str]:
    return {v.name: v.version for v in values}


@dataclass(frozen=True)
class Score:
    """One continuation's log-likelihood given the prompt (``LoraClient.score``)."""

    logprob: float
    token_logprobs: tuple[float, ...]
    token_ids: tuple[int, ...]
    greedy: bool  # every token was the model's argmax

    @classmethod
    def from_pb(cls, msg: pb.ContinuationScore) -> Score:
        return cls(msg.logprob, tuple(msg.token_logprobs), tuple(msg.token_ids), msg.greedy)


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece: new text and token ids since the previous chunk.

    Only the last chunk has ``finish_reason`` set; its usage fields (``prompt_tokens``,
    ``completion_tokens``) are ``None`` on every other chunk.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    adapter: str = ""
    adapter_version: str = ""
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    adapter_versions: dict[str, str] = field(default_factory=dict)  # on the last chunk

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_pb(cls, msg: pb.GenerateStreamResponse) -> StreamChunk:
        finish_reason = _finish_reason(msg.finish_reason)
        last = finish_reason is not None
        return cls(
            text=msg.text,
            token_ids=tuple(msg.token_ids),
            finish_reason=finish_reason,
            prompt_tokens=msg.prompt_tokens if last else None,
            completion_tokens=msg.completion_tokens if last else None,
            adapter=msg.adapter,
            adapter_version=msg.adapter_version,
            request_id=msg.request_id,
            logprobs=_logprobs(msg.logprobs),
            prompt_logprobs=_logprobs(msg.prompt_logprobs),
            adapter_versions=_versions(msg.adapter_versions),
        )


@dataclass(frozen=True)
class AdapterInfo:
    """One deployed adapter and its cache state (``LoraClient.list_adapters``)."""

    name: str
    version: str
    rank: int
    state: AdapterState
    size_bytes: int
    error: str  # why the newest file was refused; "" if it was not

    @classmethod
    def from_pb(cls, msg: pb.AdapterInfo) -> AdapterInfo:
        return cls(
            name=msg.name,
            version=msg.version,
            rank=msg.rank,
            state=_ADAPTER_STATES.get(msg.state, AdapterState.UNKNOWN),
            size_bytes=msg.size_bytes,
            error=msg.error,
        )


@dataclass(frozen=True)
class ServerInfo:
    """The server's base model, device, limits and current load (``LoraClient.server_info``)."""

    base_model: str
    architecture: str
    base_fingerprint: str
    dtype: str
    device: str
    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    max_queue: int
    max_active_adapters: int
    max_cached_adapters: int
    max_lora_rank: int
    running_requests: int
    waiting_requests: int
    server_version: str
    max_mixture: int = 1  # most adapters one request may mix

    @classmethod
    def from_pb(cls, msg: pb.ServerInfo) -> ServerInfo:
        # Every field is a scalar of the same name in the message.
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})
