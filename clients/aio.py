"""The asyncio SDK: `AsyncClient` and `AsyncSession`, the same calls as `Client` and `Session`.

Requests, responses, errors and retries come from `lsrt.clients.wire`, shared with `Client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from lsrt.clients import wire
from lsrt.proto import lsrt_pb2 as pb
from lsrt.proto import lsrt_pb2_grpc
from lsrt.runtime.service_api import SessionInfo


class AsyncClient:
    """An asyncio connection to an lsrt server; create it inside the event loop that uses it."""

    def __init__(self, addr: str, *, token: str | None = None, timeout: float | None = None):
        self.addr = addr
        self.timeout = timeout
        self._metadata = wire.call_metadata(token)
        self._channel = grpc.aio.insecure_channel(addr)
        self._stub = lsrt_pb2_grpc.LsrtStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(
        self, method: str, request: Any, timeout: float | None = None, rid: str = ""
    ) -> Any:
        """One unary call with the shared retry policy; raises typed `LsrtError`s."""
        call = getattr(self._stub, method)
        attempt = 0
        while True:
            try:
                return await call(request, metadata=self._metadata, timeout=timeout or self.timeout)
            except grpc.RpcError as err:
                if not wire.should_retry(method, err, attempt, request_id=rid):
                    raise wire.error_from(err) from None
            await asyncio.sleep(wire.backoff_s(attempt))
            attempt += 1

    # ---- server ----

    async def info(self) -> dict[str, Any]:
        return wire.info_from(await self._unary("GetServerInfo", pb.GetServerInfoRequest()))

    async def stats(self) -> dict[str, float]:
        return wire.stats_from(await self._unary("GetStats", pb.GetStatsRequest()))

    async def cancel(self, request_id: str) -> bool:
        return (await self._unary("Cancel", pb.CancelRequest(request_id=request_id))).cancelled

    # ---- sessions ----

    async def create_session(self, name: str, **options: Any) -> SessionInfo:
        request = wire.create_request(name, **options)
        return wire.session_from(await self._unary("CreateSession", request))

    async def get_session(self, name: str) -> SessionInfo:
        return wire.session_from(await self._unary("GetSession", pb.GetSessionRequest(name=name)))

    async def list_sessions(self, prefix: str = "", limit: int = 0) -> list[SessionInfo]:
        request = pb.ListSessionsRequest(prefix=prefix, limit=limit)
        reply = await self._unary("ListSessions", request)
        return [wire.session_from(s) for s in reply.sessions]

    async def delete_session(self, name: str) -> bool:
        return (await self._unary("DeleteSession", pb.DeleteSessionRequest(name=name))).deleted

    async def fork_session(
        self, name: str, new_name: str, at_turn: int | None = None
    ) -> SessionInfo:
        request = wire.fork_request(name, new_name, at_turn)
        return wire.session_from(await self._unary("ForkSession", request))

    def session(self, name: str) -> AsyncSession:
        return AsyncSession(self, name)

    # ---- turns ----

    async def _generate(
        self, request: pb.GenerateRequest, timeout: float | None, *, restartable: bool
    ) -> AsyncIterator[wire.Event]:
        """Streams one turn; closing the iterator early (aclose) cancels the call."""
        attempt = 0
        while True:
            call = self._stub.Generate(
                request, metadata=self._metadata, timeout=timeout or self.timeout
            )
            yielded = False
            try:
                async for event in call:
                    yielded = True
                    yield wire.event_from(event)
                return
            except grpc.RpcError as err:
                if not wire.should_retry_turn(err, attempt, request, restartable or not yielded):
                    raise wire.error_from(err) from None
            finally:
                call.cancel()
            await asyncio.sleep(wire.backoff_s(attempt))
            attempt += 1


class AsyncSession:
    """Turns on one session (asyncio)."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    def send(
        self, messages: Any, *, stream: bool = False, timeout: float | None = None, **options: Any
    ) -> Awaitable[wire.Finished] | AsyncIterator[wire.Event]:
        """`await send(...)` returns the `Finished` result; `async for e in send(..., stream=True)`
        yields `Started`, `Delta`s and `Finished`. Options: see `wire.generate_request`."""
        request = wire.generate_request(self.name, messages, **options)
        if stream:
            return self.client._generate(request, timeout, restartable=False)
        return self._complete(request, timeout)

    async def _complete(self, request: pb.GenerateRequest, timeout: float | None) -> wire.Finished:
        finished = None
        async for event in self.client._generate(request, timeout, restartable=True):
            if isinstance(event, wire.Finished):
                finished = event
        if finished is None:
            raise wire.missing_finished(self.name)
        return finished

    async def append(
        self, messages: Any, *, timeout: float | None = None, **options: Any
    ) -> wire.Finished:
        request = wire.append_request(self.name, messages, **options)
        reply = await self.client._unary("Append", request, timeout, rid=request.request_id)
        return wire.finished_from(reply)

    async def fork(self, new_name: str, at_turn: int | None = None) -> AsyncSession:
        await self.client.fork_session(self.name, new_name, at_turn)
        return AsyncSession(self.client, new_name)

    async def info(self) -> SessionInfo:
        return await self.client.get_session(self.name)

    async def delete(self) -> bool:
        return await self.client.delete_session(self.name)
