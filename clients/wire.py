"""What the SDK puts on and takes off the wire, shared by `Client` and `AsyncClient`.

Request building, response parsing, the status-code -> exception table and the retry policy
live here once, so the sync and asyncio clients cannot drift apart. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from lsrt.proto import lsrt_pb2 as pb
from lsrt.runtime import errors
from lsrt.runtime.service_api import SessionInfo, TurnInfo


class Unauthenticated(errors.LsrtError):
    """The server wants a (different) bearer token."""


class DeadlineExceeded(errors.LsrtError, TimeoutError):
    """The call's timeout passed; a turn in flight was cancelled and rolled back."""


class RpcFailed(errors.LsrtError):
    """Any other gRPC failure (INTERNAL, UNKNOWN, ...); `.code` says which."""


# The one table mapping status codes back to exceptions (the server's is errors.GRPC_CODES).
ERRORS_BY_CODE: dict[grpc.StatusCode, type[errors.LsrtError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.NOT_FOUND: errors.SessionNotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.SessionExists,
    grpc.StatusCode.ABORTED: errors.VersionConflict,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FingerprintMismatch,
    grpc.StatusCode.OUT_OF_RANGE: errors.ContextTooLong,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

READS = frozenset({"GetServerInfo", "GetStats", "GetSession", "ListSessions"})
MAX_ATTEMPTS = 3


# ---- SDK-side result types (torch-free; mirror the proto) ----


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    completion_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    spec_steps: int = 0
    rebuilt: bool = False


@dataclass(frozen=True, kw_only=True)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Started:
    session: str
    version: int
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    request_id: str  # pass to Client.cancel() to stop this turn


@dataclass(frozen=True, kw_only=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Finished:
    session: str
    version: int
    finish_reason: str
    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    timings: Timings
    tool_calls: tuple[dict[str, Any], ...]
    replayed: bool
    request_id: str


Event = Started | Delta | Finished


# ---- errors and retries ----


def error_from(err: grpc.RpcError) -> errors.LsrtError:
    """The typed exception for a failed call (its `.code` is the grpc.StatusCode)."""
    code = err.code()
    details = err.details() or code.name
    trailers = {key: value for key, value in (err.trailing_metadata() or ())}
    cls = ERRORS_BY_CODE.get(code, RpcFailed)
    exc: errors.LsrtError
    if cls is errors.ContextTooLong:
        needed, limit = (int(trailers.get(key, 0)) for key in ("lsrt-needed", "lsrt-limit"))
        exc = errors.ContextTooLong(needed, limit)
    elif cls is errors.ResourceExhausted:
        retry = trailers.get("retry-after")
        exc = errors.ResourceExhausted(details, float(retry) if retry is not None else None)
    else:
        exc = cls(details)
    exc.code = code  # type: ignore[attr-defined]
    return exc


def should_retry(method: str, err: grpc.RpcError, attempt: int, *, request_id: str = "") -> bool:
    """Retries only what is safe to repeat: UNAVAILABLE on reads, and on turns with a request id
    (the server answers a committed request id from the committed turn instead of re-running)."""
    if attempt + 1 >= MAX_ATTEMPTS or err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return method in READS or (method in ("Generate", "Append") and bool(request_id))


def should_retry_turn(
    err: grpc.RpcError, attempt: int, request: pb.GenerateRequest, restartable: bool
) -> bool:
    """A Generate retry: only with a request id, and only before any event reached the caller
    unless the caller discards partial events (`restartable`, i.e. stream=False)."""
    return restartable and should_retry("Generate", err, attempt, request_id=request.request_id)


def backoff_s(attempt: int) -> float:
    return min(0.1 * 2**attempt, 1.0)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---- requests ----


def _message_pb(m: Any) -> pb.Message:
    """A str (user message), an OpenAI-style dict or an object with `.role` (runtime Message)."""
    if isinstance(m, str):
        return pb.Message(role="user", content=m)
    get = m.get if isinstance(m, Mapping) else lambda key, default=None: getattr(m, key, default)
    calls = get("tool_calls") or ()
    return pb.Message(
        role=get("role", ""),
        content=get("content") or "",
        tool_calls=[c if isinstance(c, str) else json.dumps(c) for c in calls],
        tool_call_id=get("tool_call_id") or "",
        name=get("name") or "",
    )


def messages_pb(messages: Any) -> list[pb.Message]:
    if isinstance(messages, (str, Mapping)) or hasattr(messages, "role"):
        messages = [messages]
    return [_message_pb(m) for m in messages]


def _tools(tools: Iterable[Any]) -> list[str]:
    return [t if isinstance(t, str) else json.dumps(t) for t in tools]


def generate_request(
    session: str,
    messages: Any,
    *,
    full_history: bool = False,
    tools: Iterable[Any] = (),
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    stop: Iterable[str] = (),
    stop_token_ids: Iterable[int] = (),
    draft: str | None = None,
    expected_version: int | None = None,
    request_id: str = "",
    wait: bool = False,
) -> pb.GenerateRequest:
    """Builds a Generate request; options left as None take the server's defaults."""
    sampling = pb.Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return pb.GenerateRequest(
        session=session,
        messages=messages_pb(messages),
        full_history=full_history,
        tools=_tools(tools),
        sampling=sampling,
        max_tokens=max_tokens,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        draft=draft or "",
        expected_version=expected_version,
        request_id=request_id,
        wait=wait,
    )


def append_request(
    session: str,
    messages: Any,
    *,
    full_history: bool = False,
    tools: Iterable[Any] = (),
    expected_version: int | None = None,
    request_id: str = "",
    wait: bool = False,
) -> pb.AppendRequest:
    return pb.AppendRequest(
        session=session,
        messages=messages_pb(messages),
        full_history=full_history,
        tools=_tools(tools),
        expected_version=expected_version,
        request_id=request_id,
        wait=wait,
    )


def create_request(
    name: str,
    *,
    system: str | None = None,
    draft: str | None = None,
    ttl_s: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(
        name=name, system=system, draft=draft or "", ttl_s=ttl_s, metadata=dict(metadata or {})
    )


def fork_request(name: str, new_name: str, at_turn: int | None = None) -> pb.ForkSessionRequest:
    return pb.ForkSessionRequest(name=name, new_name=new_name, at_turn=at_turn)


# ---- responses ----


def _fields(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def finished_from(f: pb.TurnFinished) -> Finished:
    return Finished(
        session=f.session,
        version=f.version,
        finish_reason=f.finish_reason,
        text=f.text,
        token_ids=tuple(f.token_ids),
        usage=Usage(**_fields(f.usage)),
        timings=Timings(**_fields(f.timings)),
        tool_calls=tuple(json.loads(c) for c in f.tool_calls),
        replayed=f.replayed,
        request_id=f.request_id,
    )


def event_from(ev: pb.GenerateEvent) -> Event:
    kind = ev.WhichOneof("event")
    if kind == "started":
        return Started(**_fields(ev.started))
    if kind == "delta":
        return Delta(text=ev.delta.text, token_ids=tuple(ev.delta.token_ids))
    if kind == "finished":
        return finished_from(ev.finished)
    raise RpcFailed(f"unknown event {kind!r} in the Generate stream")


def missing_finished(session: str) -> RpcFailed:
    return RpcFailed(f"the Generate stream of session {session!r} ended without a finished event")


def session_from(s: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        name=s.name,
        version=s.version,
        num_tokens=s.num_tokens,
        created=s.created,
        updated=s.updated,
        parent=s.parent or None,
        draft=s.draft or None,
        turns=tuple(TurnInfo(role=t.role, text=t.text, start=t.start, end=t.end) for t in s.turns),
        usage=dict(s.usage),
        resident=s.resident,
        metadata=dict(s.metadata),
    )


def info_from(info: pb.ServerInfo) -> dict[str, Any]:
    out: dict[str, Any] = dict(info.extra)
    out.update({k: v for k, v in _fields(info).items() if k != "extra"})
    return out


def stats_from(stats: pb.Stats) -> dict[str, float]:
    out: dict[str, float] = dict(stats.extra)
    out.update({k: v for k, v in _fields(stats).items() if k != "extra"})
    return out
