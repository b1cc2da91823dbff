"""Protobuf <-> domain conversion for the gRPC edge, and the validation done there.

The servicer in `server.py` calls only these helpers to turn requests into domain types
(`TurnRequest`, `SamplingParams`, create/fork/list arguments; bad input raises `InvalidRequest`
before anything reaches the backend), to turn backend results and turn events back into
protobuf, and to map an `LsrtError` to its gRPC status code and trailing metadata through the
one table in `errors.GRPC_CODES`. Nothing below the edge sees protobuf.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grpc

from lsrt.proto import lsrt_pb2 as pb
from lsrt.runtime.errors import GRPC_CODES, ContextTooLong, InvalidRequest, LsrtError
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.service_api import SessionInfo
from lsrt.runtime.types import Message, TurnDelta, TurnFinished, TurnRequest, TurnStarted

MAX_NAME_LEN = 256
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
