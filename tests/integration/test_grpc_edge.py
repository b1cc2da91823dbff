"""The gRPC edge end to end: a real grpc.aio server on 127.0.0.1 over a tiny deterministic backend.

The backend's "model" echoes the last message one character per token (token id = code point),
so every expected value below is computed from the input, not taken from the code under test.
This tests the edge (status codes, streaming, cancellation, auth, health, reflection, SDKs);
the real model is tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lsrt.clients import AsyncClient, Client, Delta, Finished, Started, wire
from lsrt.clients.wire import DeadlineExceeded, Unauthenticated
from lsrt.proto import lsrt_pb2 as pb
from lsrt.proto import lsrt_pb2_grpc
from lsrt.runtime import errors
from lsrt.runtime.errors import (
    Cancelled,
    ContextTooLong,
    InvalidRequest,
    ResourceExhausted,
    SessionExists,
    SessionNotFound,
    Unavailable,
    VersionConflict,
)
from lsrt.runtime.server import start_in_thread
from lsrt.runtime.service_api import SessionInfo, TurnInfo
from lsrt.runtime.types import TurnDelta, TurnFinished, TurnRequest, TurnStarted, Usage, Timings

TOKEN = "s3cret"
LIMIT = 200  # the echo model's context limit, in characters (= tokens)
WAIT_S = 10.0
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def echo_reply(content: str) -> str:
    return f"echo: {content}"


@dataclasses.dataclass
class _State:
    info: SessionInfo
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class EchoBackend:
    """A `SessionBackend` whose model echoes; special contents trigger the edge's error paths."""

    def __init__(self) -> None:
        self._sessions: dict[str, _State] = {}
        self._guard = threading.Lock()
        self._committed: dict[str, TurnFinished] = {}
        self.rollbacks: list[str] = []  # session names, one per rolled-back turn
        self.run_calls = 0
        self.last_request: TurnRequest | None = None
        self.flaky = {"flaky": 1}  # get_session raises Unavailable this many times
        self.flaky_turns = 0  # run_turn raises Unavailable (before any event) this many times

    def info(self) -> dict:
        return {"model": "echo", "fingerprint": "echo-fp", "device": "cpu", "dtype": "float32",
                "context_limit": LIMIT, "block_size": 16}  # fmt: skip

    def stats(self) -> dict:
        n = len(self._sessions)
        return {"sessions_total": n, "sessions_resident": n, "kv_blocks_used": 3,
                "kv_blocks_total": 10, "acceptance_rate": 0.5, "tokens_per_s": 12.5,
                "custom": 7}  # fmt: skip

    def create_session(self, name, *, system, draft, ttl_s, metadata) -> SessionInfo:
        turns = (TurnInfo(role="system", text=system, start=0, end=len(system)),) if system else ()
        now = time.time()
        info = SessionInfo(name=name, version=0, num_tokens=len(system or ""), created=now,
                           updated=now, draft=draft, turns=turns, metadata=metadata)  # fmt: skip
        with self._guard:
            if name in self._sessions:
                raise SessionExists(f"session {name!r} exists")
            self._sessions[name] = _State(info)
        return info

    def _state(self, name: str) -> _State:
        with self._guard:
            if name not in self._sessions:
                raise SessionNotFound(f"no session {name!r}")
            return self._sessions[name]

    def get_session(self, name: str) -> SessionInfo:
        if self.flaky.get(name, 0) > 0:
            self.flaky[name] -= 1
            raise Unavailable("store hiccup")
        return self._state(name).info

    def list_sessions(self, prefix: str = "", limit: int = 1000) -> list[SessionInfo]:
        with self._guard:
            names = sorted(n for n in self._sessions if n.startswith(prefix))[:limit]
            return [self._sessions[n].info for n in names]

    def delete_session(self, name: str) -> bool:
        with self._guard:
            return self._sessions.pop(name, None) is not None

    def fork_session(self, name: str, new_name: str, at_turn: int | None) -> SessionInfo:
        src = self._state(name).info
        turns = tuple(src.turns if at_turn is None else src.turns[:at_turn + 1])
        if at_turn is not None and at_turn >= len(src.turns):
            raise InvalidRequest(f"at_turn {at_turn} > {len(src.turns)} turns")
        info = dataclasses.replace(src, name=new_name, parent=name, turns=turns,
                                   num_tokens=turns[-1].end if turns else 0)  # fmt: skip
        with self._guard:
            if new_name in self._sessions:
                raise SessionExists(f"session {new_name!r} exists")
            self._sessions[new_name] = _State(info)
        return info

    def run_turn(self, name, request: TurnRequest, emit, cancel: threading.Event) -> TurnFinished:
        self.run_calls += 1
        self.last_request = request
        if self.flaky_turns > 0:
            self.flaky_turns -= 1
            raise Unavailable("worker restarting")
        if request.request_id in self._committed:
            return dataclasses.replace(self._committed[request.request_id], replayed=True)
        state = self._state(name)
        if not state.lock.acquire(blocking=request.wait):
            raise VersionConflict(f"session {name!r} has a running turn")
        try:
            return self._locked_turn(state, request, emit, cancel)
        finally:
            state.lock.release()

    def _locked_turn(self, state: _State, request: TurnRequest, emit, cancel) -> TurnFinished:
        info = state.info
        if request.expected_version is not None and request.expected_version != info.version:
            raise VersionConflict(f"expected version {request.expected_version}, at {info.version}")
        content = request.messages[-1].content if request.messages else ""
        if content == "exhaust":
            raise ResourceExhausted("no free KV blocks", retry_after_s=2.5)
        new = sum(len(m.content) for m in request.messages)
        prompt = info.num_tokens + new
        if prompt > LIMIT:
            raise ContextTooLong(prompt, LIMIT)
        emit(TurnStarted(session=info.name, version=info.version + 1, prompt_tokens=prompt,
                         cached_tokens=info.num_tokens, recomputed_tokens=new))  # fmt: skip
        reply = echo_reply(content)[: request.sampling.max_tokens] if request.generate else ""
        for i, ch in enumerate(reply):
            if cancel.is_set() or content == "fail-mid" and i == 2:
                self.rollbacks.append(info.name)  # nothing was committed: rollback is free here
                if cancel.is_set():
                    raise Cancelled(f"turn on {info.name!r} cancelled")
                raise ResourceExhausted("KV pool ran dry mid-turn")
            emit(TurnDelta(text=ch, token_ids=[ord(ch)]))
            if content == "block" and i == 0:
                cancel.wait(WAIT_S * 3)  # until the client, a deadline or Cancel stops us
        return self._commit(state, request, reply, prompt, new)

    def _commit(self, state, request: TurnRequest, reply: str, prompt: int, new: int):
        info = state.info
        turns, pos = list(info.turns), info.num_tokens
        for m in request.messages:
            turns.append(TurnInfo(role=m.role, text=m.content, start=pos, end=pos + len(m.content)))
            pos += len(m.content)
        if request.generate:
            turns.append(TurnInfo(role="assistant", text=reply, start=pos, end=pos + len(reply)))
        state.info = dataclasses.replace(info, version=info.version + 1, turns=tuple(turns),
                                         num_tokens=pos + len(reply),
                                         updated=time.time())  # fmt: skip
        n = len(reply)
        full = not request.generate or n == len(echo_reply(request.messages[-1].content))
        finished = TurnFinished(
            session=info.name, version=info.version + 1,
            finish_reason="appended" if not request.generate else ("stop" if full else "length"),
            text=reply, token_ids=[ord(c) for c in reply],
            usage=Usage(prompt_tokens=prompt, cached_tokens=info.num_tokens, recomputed_tokens=new,
                        completion_tokens=n, drafted_tokens=2 * n, accepted_tokens=n, spec_steps=n),
            timings=Timings(prefill_s=0.25, decode_s=0.5, total_s=0.75),
            tool_calls=(TOOL_CALL,) if "tool" in reply else (),
        )  # fmt: skip
        if request.request_id:
            self._committed[request.request_id] = finished
        return finished


# ---- fixtures ----

_names = itertools.count()


def fresh(prefix: str = "s") -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture(scope="module")
def server(backend: EchoBackend) -> Iterator:
    handle = start_in_thread(backend, "127.0.0.1:0", auth_token=TOKEN)
    yield handle
    handle.stop(grace=1.0)


@pytest.fixture(scope="module")
def addr(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def client(addr: str) -> Iterator[Client]:
    with Client(addr, token=TOKEN, timeout=WAIT_S) as c:
        yield c


def test_grpc_code_tables_agree() -> None:
    """The SDK's code -> class table inverts the server's class -> code table (GRPC_CODES)."""
    for cls_name, code_name in errors.GRPC_CODES.items():
        cls = getattr(errors, cls_name)
        back = wire.ERRORS_BY_CODE[grpc.StatusCode[code_name]]
        assert errors.GRPC_CODES[back.__name__] == code_name, (cls, back)


# ---- health, reflection, auth ----


def test_health_serving_without_a_token(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lsrt.v1.Lsrt"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(addr: str, metadata: tuple, request: reflection_pb2.ServerReflectionRequest) -> list:
    with grpc.insecure_channel(addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=WAIT_S))


def test_reflection_lists_services(addr: str) -> None:
    md = (("authorization", f"Bearer {TOKEN}"),)
    replies = _reflect(addr, md, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for r in replies for s in r.list_services_response.service}
    expected = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert {"lsrt.v1.Lsrt"} | expected <= names
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="lsrt.v1.Lsrt")
    files = _reflect(addr, md, symbol)[0].file_descriptor_response.file_descriptor_proto
    assert any(b"lsrt.v1" in f for f in files)
    with pytest.raises(grpc.RpcError) as err:
        _reflect(addr, (), reflection_pb2.ServerReflectionRequest(list_services=""))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token", [None, "wrong"])
def test_unauthenticated(addr: str, backend: EchoBackend, token: str | None) -> None:
    calls = backend.run_calls
    with Client(addr, token=token, timeout=WAIT_S) as bad:
        with pytest.raises(Unauthenticated, match="missing" if token is None else "invalid"):
            bad.info()
        with pytest.raises(Unauthenticated):
            list(bad.session("x").send("hi", stream=True))
    assert backend.run_calls == calls  # rejected before the servicer


# ---- sessions ----


def test_session_lifecycle(client: Client) -> None:
    name = fresh("life")
    created = client.create_session(name, system="be brief", metadata={"team": "a"}, draft="suffix")
    assert (created.name, created.version, created.num_tokens) == (name, 0, len("be brief"))
    assert created.draft == "suffix" and created.metadata == {"team": "a"}
    client.session(name).send("hello")
    info = client.get_session(name)
    assert [(t.role, t.text) for t in info.turns] == [
        ("system", "be brief"), ("user", "hello"), ("assistant", echo_reply("hello"))
    ]  # fmt: skip
    assert info.version == 1 and info.num_tokens == info.turns[-1].end
    listed = client.list_sessions(prefix=name)
    assert [s.name for s in listed] == [name] and listed[0].turns == ()  # turns only via GetSession
    fork = client.session(name).fork(name + "-f", at_turn=1)  # right after turn 1
    finfo = fork.info()
    assert finfo.parent == name and [t.role for t in finfo.turns] == ["system", "user"]
    assert client.delete_session(name) is True
    assert client.delete_session(name) is False
    with pytest.raises(SessionNotFound):
        client.get_session(name)


def test_info_and_stats(client: Client) -> None:
    info = client.info()
    assert (info["model"], info["fingerprint"], info["context_limit"]) == ("echo", "echo-fp", LIMIT)
    assert info["block_size"] == "16"
    stats = client.stats()
    assert (stats["kv_blocks_used"], stats["kv_blocks_total"], stats["custom"]) == (3, 10, 7.0)
    assert stats["acceptance_rate"] == 0.5 and stats["tokens_per_s"] == 12.5


# ---- turns ----


def test_stream_event_order_and_content(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    events = list(client.session(name).send("abc", stream=True))
    expected = echo_reply("abc")
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    deltas = events[1:-1]
    assert all(isinstance(e, Delta) for e in deltas) and len(deltas) == len(expected)
    assert "".join(d.text for d in deltas) == expected == events[-1].text
    assert [t for d in deltas for t in d.token_ids] == [ord(c) for c in expected]
    started, fin = events[0], events[-1]
    assert (started.session, started.version, started.prompt_tokens) == (name, 1, 3)
    assert started.request_id and fin.request_id == started.request_id
    assert fin.finish_reason == "stop" and fin.version == 1 and not fin.replayed
    n = len(expected)
    assert fin.usage == wire.Usage(prompt_tokens=3, cached_tokens=0, recomputed_tokens=3,
                                   completion_tokens=n, drafted_tokens=2 * n, accepted_tokens=n,
                                   spec_steps=n)  # fmt: skip
    assert fin.timings.total_s == 0.75


def test_request_fields_reach_the_backend(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    call = {"id": "c9", "type": "function", "function": {"name": "ls", "arguments": '{"d": 1}'}}
    tool = {"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}
    msgs = [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "a.txt", "tool_call_id": "c9", "name": "ls"},
            {"role": "user", "content": "tool?"}]  # fmt: skip
    fin = client.session(name).send(
        msgs, tools=[tool], temperature=0.7, top_k=5, top_p=0.9, seed=11, max_tokens=10,
        stop=["\n"], stop_token_ids=[2], draft="suffix", expected_version=0, request_id="r-fields",
    )  # fmt: skip
    req = backend.last_request
    assert req.messages[0].tool_calls == (call,) and req.messages[1].tool_call_id == "c9"
    assert req.tools == (tool,) and req.draft == "suffix" and req.expected_version == 0
    s = req.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.max_tokens) == (0.7, 5, 0.9, 11, 10)
    assert (s.stop, s.stop_token_ids, req.request_id) == (("\n",), (2,), "r-fields")
    assert fin.text == echo_reply("tool?")[:10] and fin.finish_reason == "length"
    assert fin.tool_calls == (TOOL_CALL,)
    client.session(name).send("x")
    assert backend.last_request.sampling.temperature == 0.0  # unset -> the server's default
    assert backend.last_request.expected_version is None


def test_append_then_replay_by_request_id(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    appended = client.session(name).append({"role": "tool", "content": "out", "tool_call_id": "t"})
    assert (appended.finish_reason, appended.version, appended.text) == ("appended", 1, "")
    first = client.session(name).send("go", request_id="rid-1")
    again = client.session(name).send("go", request_id="rid-1")
    assert again.replayed and not first.replayed
    assert (again.text, again.version) == (first.text, first.version) == (echo_reply("go"), 2)
    assert client.get_session(name).version == 2  # the replay committed nothing


# ---- status codes ----


def test_not_found_and_already_exists(client: Client, backend: EchoBackend) -> None:
    with pytest.raises(SessionNotFound):
        client.session(fresh("missing")).send("hi")
    with pytest.raises(SessionNotFound):
        client.fork_session(fresh("missing"), fresh())
    name = fresh()
    client.create_session(name)
    with pytest.raises(SessionExists):
        client.create_session(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"session": "", "messages": "hi"}, "empty"),
        ({"session": "a b", "messages": "hi"}, "no spaces"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role"),
        ({"messages": "hi", "temperature": -1.0}, "temperature"),
        ({"messages": "hi", "top_p": 0.0}, "top_p"),
        ({"messages": "hi", "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "assistant", "tool_calls": ["{oops"]}]}, "not valid JSON"),
        ({"messages": "hi", "tools": ["[1]"]}, "JSON object"),
    ],
)
def test_invalid_argument(client: Client, backend: EchoBackend, kwargs: dict, match: str) -> None:
    session = kwargs.pop("session", "valid")
    calls = backend.run_calls
    with pytest.raises(InvalidRequest, match=match) as err:
        client.session(session).send(kwargs.pop("messages"), **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert backend.run_calls == calls  # refused at the edge


def test_aborted_on_version_conflict_and_concurrent_writer(client: Client) -> None:
    name = fresh()
    client.create_session(name)
    with pytest.raises(VersionConflict, match="expected version 5"):
        client.session(name).send("hi", expected_version=5)
    stream = client.session(name).send("block", stream=True)
    assert isinstance(next(stream), Started)
    with pytest.raises(VersionConflict, match="running turn"):
        client.session(name).send("hi")
    stream.close()


def test_out_of_range_carries_the_counts(client: Client) -> None:
    name = fresh()
    client.create_session(name)
    with pytest.raises(ContextTooLong) as err:
        client.session(name).send("x" * (LIMIT + 5))
    assert (err.value.needed, err.value.limit) == (LIMIT + 5, LIMIT)


def test_resource_exhausted_carries_retry_after(client: Client, addr: str) -> None:
    name = fresh()
    client.create_session(name)
    with pytest.raises(ResourceExhausted) as err:
        list(client.session(name).send("exhaust", stream=True))  # raised before any event
    assert err.value.retry_after_s == 2.5 and "KV blocks" in str(err.value)
    with grpc.insecure_channel(addr) as channel:  # the raw wire: status, trailer, no events
        stub = lsrt_pb2_grpc.LsrtStub(channel)
        message = pb.Message(role="user", content="exhaust")
        request = pb.GenerateRequest(session=name, messages=[message])
        call = stub.Generate(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
        with pytest.raises(grpc.RpcError):
            next(call)
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(call.trailing_metadata())
        assert (trailers["retry-after"], trailers["lsrt-error"]) == ("2.5", "ResourceExhausted")


def test_error_mid_stream_ends_with_its_code(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    seen = []
    with pytest.raises(ResourceExhausted, match="mid-turn"):
        for event in client.session(name).send("fail-mid", stream=True):
            seen.append(event)
    assert isinstance(seen[0], Started) and [type(e) for e in seen[1:]] == [Delta, Delta]
    assert client.get_session(name).version == 0


# ---- cancellation and deadlines ----


def test_client_cancel_mid_stream_rolls_back(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    stream = client.session(name).send("block", stream=True)
    assert isinstance(next(stream), Started) and next(stream).text == "e"
    stream.close()  # cancels the RPC
    wait_until(lambda: name in backend.rollbacks)
    assert client.get_session(name).version == 0
    assert client.session(name).send("ok").version == 1  # the lock was released


def test_cancel_rpc_by_request_id(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    stream = client.session(name).send("block", stream=True, request_id="to-cancel")
    started = next(stream)
    assert started.request_id == "to-cancel"
    assert client.cancel("to-cancel") is True
    with pytest.raises(Cancelled):
        list(stream)
    assert name in backend.rollbacks
    assert client.cancel("to-cancel") is False  # no longer running


def test_deadline_exceeded_cancels_the_turn(client: Client, backend: EchoBackend) -> None:
    name = fresh()
    client.create_session(name)
    with pytest.raises(DeadlineExceeded):
        client.session(name).send("block", timeout=0.5)
    wait_until(lambda: name in backend.rollbacks)


# ---- retries ----


def test_retries_only_where_safe(client: Client, backend: EchoBackend) -> None:
    name = "flaky"
    client.create_session(name)
    backend.flaky[name] = 1
    assert client.get_session(name).name == name  # a read: retried after UNAVAILABLE
    assert backend.flaky[name] == 0
    backend.flaky_turns, calls = 1, backend.run_calls
    with pytest.raises(Unavailable):
        client.session(name).send("hi")  # no request id: never retried
    assert backend.run_calls == calls + 1
    backend.flaky_turns = 1
    fin = client.session(name).send("hi", request_id="retry-me")  # idempotent: retried
    assert fin.text == echo_reply("hi") and backend.run_calls == calls + 3


def test_one_log_line_per_rpc(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lsrt.server")
    missing = fresh("nolog")
    with pytest.raises(SessionNotFound):
        client.get_session(missing)
    line = f"rpc=GetSession session='{missing}' status=NOT_FOUND"
    wait_until(lambda: any(line in r.getMessage() for r in caplog.records))
    assert sum(missing in r.getMessage() for r in caplog.records) == 1


# ---- asyncio SDK ----


def test_async_client(addr: str, backend: EchoBackend) -> None:
    async def scenario() -> None:
        async with AsyncClient(addr, token=TOKEN, timeout=WAIT_S) as client:
            name = fresh("async")
            created = await client.create_session(name, system="sys")
            assert created.num_tokens == 3
            session = client.session(name)
            events = [e async for e in session.send("hey", stream=True)]
            kinds = [Started] + [Delta] * len(echo_reply("hey")) + [Finished]
            assert [type(e) for e in events] == kinds
            assert events[-1].text == echo_reply("hey") and events[-1].version == 1
            fin = await session.send("two", max_tokens=3)
            assert (fin.text, fin.finish_reason) == (echo_reply("two")[:3], "length")
            assert fin.version == 2
            assert (await session.append("tool says hi")).version == 3
            info = await session.info()
            assert [t.role for t in info.turns] == ["system", "user", "assistant"] * 1 + [
                "user", "assistant", "user"]  # fmt: skip
            assert (await client.info())["model"] == "echo"
            assert (await client.stats())["kv_blocks_total"] == 10
            assert [s.name for s in await client.list_sessions(prefix=name)] == [name]
            with pytest.raises(SessionNotFound):
                await client.get_session(fresh("missing"))
            with pytest.raises(SessionExists):
                await client.create_session(name)
            with pytest.raises(InvalidRequest):
                await session.send("x", top_k=-1)
            with pytest.raises(DeadlineExceeded):
                await session.send("block", timeout=0.3)
            wait_until(lambda: name in backend.rollbacks)
            # cancel by aclose() mid-stream, then by request id
            stream = session.send("block", stream=True)
            assert isinstance(await anext(stream), Started)
            await stream.aclose()
            wait_until(lambda: backend.rollbacks.count(name) == 2)
            stream = session.send("block", stream=True, request_id="async-cancel")
            assert (await anext(stream)).request_id == "async-cancel"
            assert await client.cancel("async-cancel")
            with pytest.raises(Cancelled):
                async for _ in stream:
                    pass
            assert backend.rollbacks.count(name) == 3
            forked = await session.fork(name + "-f", at_turn=1)
            assert (await forked.info()).parent == name
            assert await forked.delete()

    asyncio.run(scenario())


def test_async_unauthenticated(addr: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(addr, token="nope", timeout=WAIT_S) as client:
            with pytest.raises(Unauthenticated):
                await client.stats()
            with pytest.raises(Unauthenticated):
                await client.session("x").send("hi")

    asyncio.run(scenario())


# ---- graceful shutdown ----


def _health(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        request = health_pb2.HealthCheckRequest(service="lsrt.v1.Lsrt")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=WAIT_S).status


def test_drain_then_cancel_running_turns() -> None:
    backend = EchoBackend()
    handle = start_in_thread(backend, "127.0.0.1:0")
    addr = f"127.0.0.1:{handle.port}"
    with Client(addr, timeout=WAIT_S) as client:
        client.create_session("d")
        client.create_session("e")
        stream = client.session("d").send("block", stream=True)
        assert isinstance(next(stream), Started)
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 0.5})
        stopper.start()
        wait_until(lambda: _health(addr) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(Unavailable, match="draining"):
            client.session("e").send("hi")
        with pytest.raises((Cancelled, Unavailable)):
            list(stream)  # cancelled once the grace ran out
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
        assert backend.rollbacks == ["d"]
        assert backend.get_session("d").version == 0
