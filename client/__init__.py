"""loraserve client: typed sync and async gRPC clients and the ``loraserve`` CLI.

    from loraserve.client import LoraClient

    with LoraClient("localhost:50051") as c:
        print(c.generate("Hello", adapter="sql", max_new_tokens=32).text)

``adapter=""`` is the base model alone. Errors are raised as ``LoraServeError`` subclasses.
"""

from loraserve.client.client import ADAPTER_METADATA_KEY, AsyncLoraClient, LoraClient
from loraserve.client.errors import (
    AdapterInvalidError,
    AdapterNotFoundError,
    DeadlineExceededError,
    InvalidArgumentError,
    LoraServeError,
    OverloadedError,
    UnavailableError,
    error_from_rpc,
)
from loraserve.client.types import (
    AdapterInfo,
    AdapterState,
    Completion,
    Constraint,
    FinishReason,
    SamplingParams,
    Score,
    ServerInfo,
    StreamChunk,
    TokenLogprob,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "AdapterInfo",
    "AdapterInvalidError",
    "AdapterNotFoundError",
    "AdapterState",
    "AsyncLoraClient",
    "Completion",
    "Constraint",
    "DeadlineExceededError",
    "FinishReason",
    "InvalidArgumentError",
    "LoraClient",
    "LoraServeError",
    "OverloadedError",
    "SamplingParams",
    "Score",
    "ServerInfo",
    "StreamChunk",
    "TokenLogprob",
    "UnavailableError",
    "error_from_rpc",
]
