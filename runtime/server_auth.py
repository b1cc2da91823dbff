"""Bearer-token authentication for the gRPC edge.

`BearerAuth` is a grpc.aio server interceptor that `Server` installs when an auth token is
configured: every RPC except the standard health checks must carry `authorization: Bearer
<token>`, compared in constant time. A denied call gets a handler of the same streaming kind that
fails with UNAUTHENTICATED, so clients see a proper status instead of a broken stream.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

log = logging.getLogger("lsrt.server")

_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self._expected):
            return handler
        reason = "invalid bearer token" if got else "missing bearer token"
        log.info("rpc=%s status=UNAUTHENTICATED reason=%r", details.method, reason)
        return _denied(handler, reason)


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    async def deny(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: Any) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    serde = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **serde)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **serde)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serde)
    return grpc.unary_unary_rpc_method_handler(deny, **serde)
