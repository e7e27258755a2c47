"""Domain errors raised inside the server. The gRPC layer maps each to one status code.

Nothing here knows about gRPC; ``loraserve.server.servicer.status_for`` is the one place that
translates.
"""

from loraserve.adapters.format import InvalidAdapter


class ServingError(Exception):
    """Base class: an error that fails one request, never the server."""


class AdapterNotFound(ServingError):
    def __init__(self, name: str):
        super().__init__(
            f"adapter {name!r} is not deployed (no such file or folder in the adapters directory)"
        )
        self.name = name


class AdapterUnavailable(ServingError):
    """The adapter exists but its current file is invalid and no working version is loaded."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r} cannot be served: {reason}")
        self.name = name
        self.reason = reason


class InvalidRequest(ServingError):
    """A request argument is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NonFiniteLogits(ServingError):
    """The model produced NaN or infinite logits for one sequence (in practice: a broken adapter
    slipped past the file checks). That sequence is stopped; the rest of its batch goes on."""

    def __init__(self, detail: str = ""):
        super().__init__(
            "the model produced non-finite logits for this request; it was stopped" + detail
        )


class NoChatTemplate(ServingError):
    """A chat request for a model (and adapter) that carries no chat template."""


class QueueFull(ServingError):
    pass


class Unauthenticated(ServingError):
    """No bearer token, or one that no tenant of ``--auth-file`` holds."""

    def __init__(self):
        super().__init__(
            "a valid bearer token is required (metadata or header 'authorization: Bearer TOKEN')"
        )


class PermissionDenied(ServingError):
    """A known token asking for an adapter (or the base model) its tenant may not use. The
    message is the same whether or not the adapter exists, so a tenant cannot probe for
    another's adapters."""

    def __init__(self, adapter: str, tenant: str | None = None):
        what = f"adapter {adapter!r}" if adapter else "the base model"
        super().__init__(f"this token may not use {what}")
        self.adapter = adapter
        self.tenant = tenant  # for metrics and the log, never for the caller


class ShuttingDown(ServingError):
    pass


__all__ = [
    "AdapterNotFound",
    "AdapterUnavailable",
    "InvalidAdapter",
    "InvalidRequest",
    "NoChatTemplate",
    "NonFiniteLogits",
    "PermissionDenied",
    "QueueFull",
    "ServingError",
    "ShuttingDown",
    "Unauthenticated",
]
