"""The gRPC edge: a thin grpc.aio servicer over a `SessionBackend`.

Protobuf is converted to domain types at the edge only (`server_convert`); bearer-token auth is
an interceptor (`server_auth`). Turns run in worker threads (the backend blocks); their events
cross into the event loop through an asyncio queue. Errors are status codes from one table
(`errors.GRPC_CODES`), raised before the first event for admission and lock failures. A client
cancel or deadline sets the turn's cancel event and waits for the backend to roll back before the
handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lsrt.proto import lsrt_pb2 as pb
from lsrt.proto import lsrt_pb2_grpc
from lsrt.runtime.errors import LsrtError, Unavailable, VersionConflict
from lsrt.runtime.server_auth import BearerAuth
from lsrt.runtime.server_convert import (
    check_name,
    create_kwargs,
    event_pb,
    fork_at_turn,
    list_limit,
    server_info_pb,
    session_pb,
    stats_pb,
    status_for,
    turn_request,
)
from lsrt.runtime.service_api import SessionBackend
from lsrt.runtime.types import TurnFinished, TurnRequest

log = logging.getLogger("lsrt.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lsrt"].full_name  # "lsrt.v1.Lsrt"
_DONE = object()  # queue sentinel: the worker returned or raised


@dataclasses.dataclass
class _RunningTurn:
    cancel: threading.Event
    future: asyncio.Future


class LsrtServicer(lsrt_pb2_grpc.LsrtServicer):
    """Implements `lsrt.v1.Lsrt` by calling the backend; owns the table of running turns."""

    def __init__(self, backend: SessionBackend, executor: ThreadPoolExecutor) -> None:
        self._backend = backend
        self._executor = executor
        self._turns: dict[str, _RunningTurn] = {}  # request id -> turn; touched on the loop only
        self.draining = False

    # ---- plumbing ----

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs a (possibly blocking: Redis, locks) backend call off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, session: str, context: Any) -> AsyncIterator[dict]:
        """Maps errors to status codes and logs one line per RPC (the yielded dict adds fields)."""
        fields: dict[str, Any] = {}
        status = "OK"
        start = time.monotonic()
        try:
            yield fields
        except grpc.aio.AbortError:  # the body aborted on its own; its status is already set
            status = "ABORTED_BY_HANDLER"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            status = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            raise
        except LsrtError as err:
            code, trailers = status_for(err)
            status = code.name
            await context.abort(code, str(err), trailing_metadata=trailers)
        except Exception as err:  # a bug below the edge; never leak a traceback to clients
            status = "INTERNAL"
            log.exception("%s session=%s failed", method, session)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__})")
        finally:
            extra = "".join(f" {k}={v}" for k, v in fields.items() if k != "status")
            ms = (time.monotonic() - start) * 1e3
            log.info("rpc=%s session=%r status=%s ms=%.1f%s", method, session, status, ms, extra)

    def running_turns(self) -> list[_RunningTurn]:
        return list(self._turns.values())

    # ---- server and sessions ----

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Any) -> pb.ServerInfo:
        async with self._rpc("GetServerInfo", "", context):
            return server_info_pb(await self._call(self._backend.info))

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        async with self._rpc("GetStats", "", context):
            stats = dict(await self._call(self._backend.stats))
            stats.setdefault("running_turns", len(self._turns))
            return stats_pb(stats)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.SessionInfo:
        async with self._rpc("CreateSession", request.name, context):
            kwargs = create_kwargs(request)
            info = await self._call(self._backend.create_session, request.name, **kwargs)
            return session_pb(info)

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.SessionInfo:
        async with self._rpc("GetSession", request.name, context):
            check_name(request.name)
            return session_pb(await self._call(self._backend.get_session, request.name))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Any
    ) -> pb.ListSessionsResponse:
        async with self._rpc("ListSessions", request.prefix + "*", context) as fields:
            limit = list_limit(request.limit)
            infos = await self._call(self._backend.list_sessions, request.prefix, limit)
            fields["count"] = len(infos)
            sessions = [session_pb(i, with_turns=False) for i in infos]
            return pb.ListSessionsResponse(sessions=sessions)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Any
    ) -> pb.DeleteSessionResponse:
        async with self._rpc("DeleteSession", request.name, context):
            check_name(request.name)
            deleted = await self._call(self._backend.delete_session, request.name)
            return pb.DeleteSessionResponse(deleted=bool(deleted))

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Any) -> pb.SessionInfo:
        async with self._rpc("ForkSession", request.name, context):
            at_turn = fork_at_turn(request)
            info = await self._call(
                self._backend.fork_session, request.name, request.new_name, at_turn
            )
            return session_pb(info)

    # ---- turns ----

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator:
        async with self._rpc("Generate", request.session, context) as fields:
            turn = turn_request(request, generate=True)
            async for event in self._run_turn(request.session, turn, fields):
                yield event

    async def Append(self, request: pb.AppendRequest, context: Any) -> pb.TurnFinished:
        async with self._rpc("Append", request.session, context) as fields:
            turn = turn_request(request, generate=False)
            finished = None
            async for event in self._run_turn(request.session, turn, fields):
                if event.HasField("finished"):
                    finished = event.finished
            assert finished is not None  # _run_turn always ends with one or raises
            return finished

    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        async with self._rpc("Cancel", "", context) as fields:
            fields["request_id"] = request.request_id
            running = self._turns.get(request.request_id)
            if running is not None:
                running.cancel.set()
            return pb.CancelResponse(cancelled=running is not None)

    async def _run_turn(
        self, name: str, turn: TurnRequest, fields: dict
    ) -> AsyncIterator[pb.GenerateEvent]:
        """Runs `backend.run_turn` in a worker; yields its events as protobuf, finished last."""
        if self.draining:
            raise Unavailable("the server is draining; retry on another server")
        rid = turn.request_id or uuid.uuid4().hex
        if rid in self._turns:
            raise VersionConflict(f"request {rid!r} is already running")
        fields["request_id"] = rid
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        future = loop.run_in_executor(
            self._executor, self._backend.run_turn, name, turn, emit, cancel
        )
        # Scheduled after every emit() of the worker, so the sentinel comes last in the queue.
        future.add_done_callback(lambda _: queue.put_nowait(_DONE))
        self._turns[rid] = _RunningTurn(cancel, future)
        try:
            sent_finished = False
            while (event := await queue.get()) is not _DONE:
                sent_finished |= isinstance(event, TurnFinished)
                yield event_pb(event, rid)
            finished: TurnFinished = future.result()  # raises the backend's error
            fields["tokens"] = finished.usage.completion_tokens
            if not sent_finished:
                yield event_pb(finished, rid)
        finally:
            if not future.done():
                # Client cancel, deadline or shutdown: stop the worker and wait for its rollback.
                cancel.set()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(future)
            del self._turns[rid]


class Server:
    """A running lsrt gRPC server (see `serve`)."""

    def __init__(self, backend: SessionBackend, *, auth_token: str | None, max_workers: int):
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="lsrt-turn")
        self.servicer = LsrtServicer(backend, self._executor)
        self.health = health.aio.HealthServicer()
        interceptors = [BearerAuth(auth_token)] if auth_token else []
        options = [("grpc.so_reuseport", 0)]
        self._grpc = grpc.aio.server(interceptors=interceptors, options=options)
        lsrt_pb2_grpc.add_LsrtServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._grpc)
        self.port = 0

    async def start(self, addr: str, *, ready: bool = True) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._grpc.add_insecure_port(addr)
        await self._grpc.start()
        if ready:
            await self.set_ready()
        log.info("serving lsrt.v1 on %s (port %d)", addr, self.port)

    async def set_ready(self) -> None:
        """Health SERVING: call once the backend can take turns (serve(ready=True) does)."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0, rollback_timeout: float = 30.0) -> None:
        """Drains: health NOT_SERVING, new turns UNAVAILABLE, running turns get `grace` seconds,
        then are cancelled and their rollback awaited; then the gRPC server stops."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        running = self.servicer.running_turns()
        pending = {t.future for t in running}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for turn in running:
            if turn.future in pending:
                turn.cancel.set()
        if pending:
            await asyncio.wait(pending, timeout=rollback_timeout)
        await self._grpc.stop(grace=1.0)  # lets the handlers send their final status
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("server on port %d stopped", self.port)

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


async def serve(
    backend: SessionBackend,
    *,
    addr: str = "127.0.0.1:0",
    auth_token: str | None = None,
    max_workers: int = 32,
    ready: bool = True,
) -> Server:
    """Starts a gRPC server for `backend` on `addr` (port 0: any free port, see `.port`)."""
    server = Server(backend, auth_token=auth_token, max_workers=max_workers)
    await server.start(addr, ready=ready)
    return server


class ThreadedServer:
    """A server running on its own event-loop thread, for in-process use (`lsrt chat`, tests)."""

    def __init__(self, backend: SessionBackend, addr: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lsrt-grpc", daemon=True
        )
        self._thread.start()
        make = serve(backend, addr=addr, **kwargs)
        try:
            self.server: Server = asyncio.run_coroutine_threadsafe(make, self._loop).result()
        except BaseException:
            self._close_loop()
            raise
        self.port = self.server.port

    def stop(self, grace: float = 5.0) -> None:
        """Drains and stops the server (see `Server.stop`), then ends the loop thread."""
        if self._loop.is_closed():
            return
        stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
        try:
            stopping.result()
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def start_in_thread(
    backend: SessionBackend, addr: str = "127.0.0.1:0", **kwargs: Any
) -> ThreadedServer:
    """Starts a server on a background event-loop thread; `.port`, `.stop(grace)`."""
    return ThreadedServer(backend, addr, **kwargs)


@contextlib.contextmanager
def serving(addr: str = "127.0.0.1:0", **backend_kwargs: Any) -> Iterator[str]:
    """Builds a backend (`build_backend(**backend_kwargs)`), serves it on a background thread
    and yields `host:port`; on exit stops the server, then closes the backend and its store."""
    from lsrt.runtime.backend import build_backend

    manager, closer = build_backend(**backend_kwargs)
    try:
        handle = start_in_thread(manager, addr)
        try:
            yield f"{addr.rsplit(':', 1)[0]}:{handle.port}"
        finally:
            handle.stop(grace=1.0)
    finally:
        closer()
