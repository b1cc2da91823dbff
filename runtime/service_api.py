"""The contract between the gRPC edge (`lsrt.runtime.server`) and whatever serves sessions.

The servicer converts protobuf <-> domain types and calls a `SessionBackend`; the real backend is
the SessionManager (sessions/), tests use small in-process ones. Nothing here imports grpc.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lsrt.runtime.types import TurnEvent, TurnFinished, TurnRequest


@dataclass(frozen=True, kw_only=True)
class TurnInfo:
    """One committed turn: its role, its text and its token span `[start, end)` in the session."""

    role: str
    text: str
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class SessionInfo:
    """What a backend reports about a session (metadata only; no tensors)."""

    name: str
    version: int  # committed turn counter (fencing token)
    num_tokens: int
    created: float  # unix seconds
    updated: float
    parent: str | None = None
    draft: str | None = None
    turns: tuple[TurnInfo, ...] | list[TurnInfo] = ()
    usage: dict[str, float] = field(default_factory=dict)  # cumulative counters
    resident: bool = False  # its KV is on the device now
    metadata: dict[str, str] = field(default_factory=dict)


class SessionBackend(Protocol):
    """What the server needs from a session backend.

    Every method may be called from any thread; each raises `LsrtError` subclasses (mapped to
    gRPC codes by `errors.GRPC_CODES`) and nothing else on purpose.
    """

    def info(self) -> dict[str, Any]:
        """Server facts: `model`, `fingerprint`, `device`, `dtype`, `context_limit` (+ any more)."""
        ...

    def create_session(
        self,
        name: str,
        *,
        system: str | None,
        draft: str | None,
        ttl_s: int | None,
        metadata: dict[str, str],
    ) -> SessionInfo: ...

    def get_session(self, name: str) -> SessionInfo: ...

    def list_sessions(self, prefix: str = "", limit: int = 1000) -> list[SessionInfo]: ...

    def delete_session(self, name: str) -> bool:
        """True when a session was deleted, False when there was none of that name."""
        ...

    def fork_session(self, name: str, new_name: str, at_turn: int | None) -> SessionInfo: ...

    def run_turn(
        self,
        name: str,
        request: TurnRequest,
        emit: Callable[[TurnEvent], None],
        cancel: threading.Event,
    ) -> TurnFinished:
        """Runs one turn to completion. BLOCKING: the server calls it in a worker thread.

        Admission, lock and validation errors must be raised before anything is emitted (so the
        client sees a status code and no events). Emit one `TurnStarted`, then `TurnDelta`s, and
        return the `TurnFinished` (emitting it too is allowed; the server sends it once). When
        `cancel` is set, stop at the next step, roll the session back to its last committed turn
        and raise `Cancelled`. A `request.request_id` that already committed is answered from
        the committed turn with `replayed=True`.
        """
        ...

    def stats(self) -> dict[str, float]:
        """Metrics: `sessions_total`, `sessions_resident`, `kv_blocks_used`, `kv_blocks_total`,
        `acceptance_rate`, `tokens_per_s`, `running_turns` (+ any more numeric ones)."""
        ...
