"""The client's exceptions: one class per gRPC status code the server uses on purpose.

Every failed call raises a ``LoraServeError`` (never a bare ``grpc.RpcError``), so callers can
write ``except AdapterNotFoundError`` instead of comparing status codes. ``error_from_rpc`` is
the one place that translates; codes without a class of their own (CANCELLED, INTERNAL,
UNKNOWN, ...) come back as the base class, still carrying their ``code``.
"""

from __future__ import annotations

import grpc


class LoraServeError(Exception):
    """A call failed. ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class AdapterNotFoundError(LoraServeError):
    """NOT_FOUND: no adapter of that name is deployed on the server."""


class InvalidArgumentError(LoraServeError):
    """INVALID_ARGUMENT: a request field is out of range; ``details`` starts with its name."""


class AdapterInvalidError(LoraServeError):
    """FAILED_PRECONDITION: the adapter's file is invalid and no working version is loaded."""


class OverloadedError(LoraServeError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later."""


class UnavailableError(LoraServeError):
    """UNAVAILABLE: the server is draining or unreachable (raised once retries are spent)."""


class DeadlineExceededError(LoraServeError):
    """DEADLINE_EXCEEDED: the call's timeout passed; the server stopped generating."""


_CLASS_FOR_CODE: dict[grpc.StatusCode, type[LoraServeError]] = {
    grpc.StatusCode.NOT_FOUND: AdapterNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: AdapterInvalidError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def status_code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call. A bare ``RpcError`` (no ``code()``) counts as UNKNOWN."""
    code = getattr(exc, "code", None)
    return code() if callable(code) else grpc.StatusCode.UNKNOWN


def error_from_rpc(exc: grpc.RpcError) -> LoraServeError:
    """The ``LoraServeError`` subclass for a failed sync or ``grpc.aio`` call."""
    code = status_code_of(exc)
    details = getattr(exc, "details", None)
    message = (details() if callable(details) else None) or ""
    return _CLASS_FOR_CODE.get(code, LoraServeError)(code, message)
