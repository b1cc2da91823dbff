"""The runtime's exception hierarchy.

Every error a user can cause or must react to is an `LsrtError` subclass. The gRPC layer maps
these to status codes in one table (`lsrt.runtime.errors.GRPC_CODES`, by class name, so this
module stays free of grpc imports); the CLI prints `str(err)` on one line.
"""

from __future__ import annotations


class LsrtError(Exception):
    """Base class of every error lsrt raises on purpose."""


class InvalidRequest(LsrtError, ValueError):
    """Bad input: sampling values, malformed messages, unknown options."""


class ModelNotFound(LsrtError):
    """An unknown model name or a path with no model in it."""


class SessionNotFound(LsrtError):
    """No session of that name."""


class SessionExists(LsrtError):
    """A session of that name already exists."""


class VersionConflict(LsrtError):
    """The session moved on since the writer read it, or another writer holds it."""


class FingerprintMismatch(LsrtError):
    """The session was made with another model, tokenizer, template or dtype."""


class ContextTooLong(LsrtError):
    """The request does not fit in the model's context."""

    def __init__(self, needed: int, limit: int, what: str = "tokens") -> None:
        super().__init__(f"context too long: {needed} {what} needed, the model's limit is {limit}")
        self.needed = needed
        self.limit = limit


class ResourceExhausted(LsrtError):
    """Memory (KV blocks) or queue capacity is exhausted; retry later or free sessions."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(LsrtError):
    """The server is loading or draining."""


class Cancelled(LsrtError):
    """The request was cancelled; the session was rolled back."""


class StoreError(LsrtError):
    """The session store could not be reached or started."""


# gRPC status code names (grpc.StatusCode members) for each error class.
GRPC_CODES: dict[str, str] = {
    "InvalidRequest": "INVALID_ARGUMENT",
    "ModelNotFound": "NOT_FOUND",
    "SessionNotFound": "NOT_FOUND",
    "SessionExists": "ALREADY_EXISTS",
    "VersionConflict": "ABORTED",
    "FingerprintMismatch": "FAILED_PRECONDITION",
    "ContextTooLong": "OUT_OF_RANGE",
    "ResourceExhausted": "RESOURCE_EXHAUSTED",
    "Unavailable": "UNAVAILABLE",
    "Cancelled": "CANCELLED",
    "StoreError": "UNAVAILABLE",
}
