"""Domain types shared by the runtime, the session layer and the gRPC edge.

The servicer converts protobuf <-> these types and nothing below it sees protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, kw_only=True)
class Message:
    """One chat message. `tool_calls` follow the OpenAI format and reach the chat template as-is."""

    role: str
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequest(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")

    def to_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = list(self.tool_calls)
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True, kw_only=True)
class TurnRequest:
    """One turn on a session.

    `messages` are new messages appended to the session, unless `full_history` is set: then they
    are the whole conversation and are diffed against the stored tokens (re-prefill from the
    longest common prefix). With `generate=False` the turn only appends and prefills (tool output).
    """

    messages: tuple[Message, ...] = ()
    full_history: bool = False
    generate: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    draft: str | None = None  # None: the session's configured drafter
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI-style function schemas for the template
    expected_version: int | None = None
    request_id: str = ""
    wait: bool = False  # wait for a running turn instead of failing with VersionConflict


@dataclass(kw_only=True)
class Usage:
    prompt_tokens: int = 0  # tokens of the session's context this turn (after the new messages)
    cached_tokens: int = 0  # of those, tokens whose KV was already resident
    recomputed_tokens: int = 0  # tokens prefilled this turn (new + rebuilt)
    completion_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    spec_steps: int = 0
    rebuilt: bool = False  # the resident KV had been evicted or lost and was rebuilt


@dataclass(kw_only=True)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass(kw_only=True)
class TurnStarted:
    session: str
    version: int  # the version this turn will commit as, if it completes
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int


@dataclass(kw_only=True)
class TurnDelta:
    text: str
    token_ids: list[int]


@dataclass(kw_only=True)
class TurnFinished:
    session: str
    version: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "appended"
    text: str
    token_ids: list[int]
    usage: Usage
    timings: Timings
    tool_calls: tuple[dict[str, Any], ...] = ()
    replayed: bool = False  # an idempotent retry answered from the committed turn


TurnEvent = TurnStarted | TurnDelta | TurnFinished
