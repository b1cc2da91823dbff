"""The lsrt Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) over the gRPC service.

    from lsrt.clients import Client
    with Client("127.0.0.1:7777", token="...") as client:
        client.create_session("agent-1", system="You are terse.")
        result = client.session("agent-1").send("hello")
        print(result.text, result.usage.accepted_tokens)

Failures raise `lsrt.runtime.errors` classes (SessionNotFound, VersionConflict, ...) mapped back
from gRPC status codes in one table (`lsrt.clients.wire.ERRORS_BY_CODE`).
"""

from lsrt.clients.aio import AsyncClient, AsyncSession
from lsrt.clients.client import Client, Session
from lsrt.clients.wire import (
    DeadlineExceeded,
    Delta,
    Event,
    Finished,
    RpcFailed,
    Started,
    Timings,
    Unauthenticated,
    Usage,
)

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "DeadlineExceeded",
    "Delta",
    "Event",
    "Finished",
    "RpcFailed",
    "Session",
    "Started",
    "Timings",
    "Unauthenticated",
    "Usage",
]
