"""The gRPC edge: a thin grpc.aio servicer over a `SessionBackend`.

Protobuf is converted to domain types here and nowhere below. Turns run in worker threads (the
backend blocks); their events cross into the event loop through an asyncio queue. Errors are
status codes from one table (`errors.GRPC_CODES`), raised before the first event for admission
and lock failures. A client cancel or deadline sets the turn's cancel event and waits for the
backend to roll back before the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lsrt.proto import lsrt_pb2 as pb
from lsrt.proto import lsrt_pb2_grpc
from lsrt.runtime.errors import GRPC_CODES, ContextTooLong, InvalidRequest, LsrtError, Unavailable
from lsrt.runtime.errors import VersionConflict
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.service_api import SessionBackend, SessionInfo
from lsrt.runtime.types import Message, TurnDelta, TurnFinished, TurnRequest, TurnStarted

log = logging.getLogger("lsrt.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lsrt"].full_name  # "lsrt.v1.Lsrt"
_DONE = object()  # queue sentinel: the worker returned or raised


MAX_NAME_LEN = 256
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_STATS_FIELDS = (
    "sessions_total", "sessions_resident", "kv_blocks_used", "kv_blocks_total",
    "acceptance_rate", "tokens_per_s", "running_turns",
)  # fmt: skip
_INFO_FIELDS = ("model", "fingerprint", "device", "dtype", "context_limit")


# ---- errors ----


def status_for(err: LsrtError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code for `err` (nearest class in `GRPC_CODES`) and its trailing metadata."""
    name = next((c.__name__ for c in type(err).__mro__ if c.__name__ in GRPC_CODES), None)
    code = grpc.StatusCode[GRPC_CODES[name]] if name else grpc.StatusCode.INTERNAL
    trailers = [("lsrt-error", type(err).__name__)]
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after is not None:
        trailers.append(("retry-after", f"{retry_after:g}"))
    if isinstance(err, ContextTooLong):
        trailers += [("lsrt-needed", str(err.needed)), ("lsrt-limit", str(err.limit))]
    return code, tuple(trailers)


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


# ---- protobuf -> domain (validation at the edge) ----


def check_name(name: str, what: str = "session name") -> str:
    if not name:
        raise InvalidRequest(f"{what} is empty")
    if len(name) > MAX_NAME_LEN or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidRequest(
            f"{what} {name[:40]!r} must be <= {MAX_NAME_LEN} printable chars, no spaces"
        )
    return name


def _json_objects(items: Any, what: str) -> tuple[dict[str, Any], ...]:
    out = []
    for item in items:
        try:
            value = json.loads(item)
        except ValueError as err:
            raise InvalidRequest(f"{what} is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
        out.append(value)
    return tuple(out)


def _message(m: pb.Message) -> Message:
    return Message(
        role=m.role,
        content=m.content,
        tool_calls=_json_objects(m.tool_calls, "a tool call"),
        tool_call_id=m.tool_call_id,
        name=m.name,
    )


def _sampling(req: pb.GenerateRequest) -> SamplingParams:
    s = req.sampling
    kwargs: dict[str, Any] = {
        key: getattr(s, key) for key in ("temperature", "top_k", "top_p", "seed") if s.HasField(key)
    }
    if req.HasField("max_tokens"):
        kwargs["max_tokens"] = req.max_tokens
    return SamplingParams(**kwargs, stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids))


def turn_request(req: pb.GenerateRequest | pb.AppendRequest, *, generate: bool) -> TurnRequest:
    """Validates a Generate/Append request into a `TurnRequest` (InvalidRequest on bad input)."""
    check_name(req.session)
    if not req.messages and not generate:
        raise InvalidRequest("Append needs at least one message")
    extra: dict[str, Any] = {}
    if generate:
        extra = {"sampling": _sampling(req), "draft": req.draft or None}
    version = req.expected_version if req.HasField("expected_version") else None
    return TurnRequest(
        messages=tuple(_message(m) for m in req.messages),
        full_history=req.full_history,
        generate=generate,
        tools=_json_objects(req.tools, "a tool schema"),
        expected_version=version,
        request_id=req.request_id,
        wait=req.wait,
        **extra,
    )


def create_kwargs(req: pb.CreateSessionRequest) -> dict[str, Any]:
    check_name(req.name)
    if req.HasField("ttl_s") and req.ttl_s <= 0:
        raise InvalidRequest(f"ttl_s must be > 0, got {req.ttl_s}")
    return {
        "system": req.system if req.HasField("system") else None,
        "draft": req.draft or None,
        "ttl_s": req.ttl_s if req.HasField("ttl_s") else None,
        "metadata": dict(req.metadata),
    }


def list_limit(limit: int) -> int:
    if limit < 0:
        raise InvalidRequest(f"limit must be >= 0, got {limit}")
    return limit or 1000


def fork_at_turn(req: pb.ForkSessionRequest) -> int | None:
    check_name(req.name)
    check_name(req.new_name, "new session name")
    if req.HasField("at_turn") and req.at_turn < 0:
        raise InvalidRequest(f"at_turn must be >= 0, got {req.at_turn}")
    return req.at_turn if req.HasField("at_turn") else None


# ---- domain -> protobuf ----


def _finished_pb(f: TurnFinished, request_id: str) -> pb.TurnFinished:
    return pb.TurnFinished(
        session=f.session,
        version=f.version,
        finish_reason=f.finish_reason,
        text=f.text,
        token_ids=f.token_ids,
        usage=pb.Usage(**dataclasses.asdict(f.usage)),
        timings=pb.Timings(**dataclasses.asdict(f.timings)),
        tool_calls=[json.dumps(call) for call in f.tool_calls],
        replayed=f.replayed,
        request_id=request_id,
    )


def event_pb(event: TurnStarted | TurnDelta | TurnFinished, request_id: str) -> pb.GenerateEvent:
    if isinstance(event, TurnStarted):
        started = pb.TurnStarted(**dataclasses.asdict(event), request_id=request_id)
        return pb.GenerateEvent(started=started)
    if isinstance(event, TurnDelta):
        return pb.GenerateEvent(delta=pb.TurnDelta(text=event.text, token_ids=event.token_ids))
    return pb.GenerateEvent(finished=_finished_pb(event, request_id))


def session_pb(info: SessionInfo, *, with_turns: bool = True) -> pb.SessionInfo:
    turns = [pb.TurnInfo(role=t.role, text=t.text, start=t.start, end=t.end) for t in info.turns]
    return pb.SessionInfo(
        name=info.name,
        version=info.version,
        num_tokens=info.num_tokens,
        created=info.created,
        updated=info.updated,
        parent=info.parent or "",
        draft=info.draft or "",
        turns=turns if with_turns else [],
        usage={k: float(v) for k, v in info.usage.items()},
        resident=info.resident,
        metadata={k: str(v) for k, v in info.metadata.items()},
    )


def server_info_pb(info: dict[str, Any]) -> pb.ServerInfo:
    extra = {k: str(v) for k, v in info.items() if k not in _INFO_FIELDS}
    known = {k: info[k] for k in _INFO_FIELDS if info.get(k) is not None}
    return pb.ServerInfo(**known, extra=extra)


def stats_pb(stats: dict[str, Any]) -> pb.Stats:
    known = {k: stats[k] for k in _STATS_FIELDS if stats.get(k) is not None}
    for key in _STATS_FIELDS:
        if key in known and key not in ("acceptance_rate", "tokens_per_s"):
            known[key] = int(known[key])
    extra = {
        k: float(v)
        for k, v in stats.items()
        if k not in _STATS_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return pb.Stats(**known, extra=extra)


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
