"""The session store contract: what a session is on disk and the operations on it.

Tokens are the source of truth: a session is its exact token ids plus turn boundaries. The GPU KV
and the draft blob are caches that can always be rebuilt from them. `version` is both the turn
counter and a fencing token: every write names the version it read (`expected_version`), and a
writer that lost a race gets `VersionConflict` instead of silently overwriting.

Implementations (RedisStore, on an external or the embedded Redis) must pass the one contract
suite in tests/unit/sessions/test_sessions_contract.py.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from lsrt.runtime.errors import InvalidRequest

# Session names end up inside Redis keys and SCAN patterns: no glob characters, no braces
# (hash tags), no whitespace.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@/+=-]{0,255}$")

# Meta fields a commit may change; the rest are owned by the store.
UPDATABLE_META = frozenset({"fingerprint", "ttl_s", "draft", "usage", "extra"})


def check_name(name: str) -> str:
    """Return `name` if it is a valid session name, else raise InvalidRequest."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid session name {name!r}: 1-256 characters of letters, digits and _.:@/+=- "
            "(not starting with punctuation other than _)"
        )
    return name


def check_ttl(ttl_s: int | None) -> int | None:
    if ttl_s is not None and (not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or ttl_s <= 0):
        raise InvalidRequest(f"ttl_s must be a positive int or None, got {ttl_s!r}")
    return ttl_s


@dataclass(frozen=True, kw_only=True)
class SessionMeta:
    """A session's metadata. `version` counts committed turns and fences writers (0 = new)."""

    name: str
    version: int = 0
    fingerprint: str = ""  # model + tokenizer + template + dtype; a mismatch refuses the session
    created: float = 0.0  # unix time
    updated: float = 0.0  # unix time
    ttl_s: int | None = None  # idle expiry, refreshed on every commit; None = never expires
    parent: str = ""  # session this one was forked from
    parent_turn: int | None = None  # index of the parent's last copied turn (None = all)
    draft: str = ""  # drafter config, e.g. "auto", "suffix", "model:qwen2.5-coder-0.5b"
    num_tokens: int = 0
    usage: dict[str, int] = field(default_factory=dict)  # running totals, e.g. completion_tokens
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able

    def __post_init__(self) -> None:
        check_name(self.name)
        check_ttl(self.ttl_s)
        if self.version < 0 or self.num_tokens < 0:
            raise InvalidRequest("version and num_tokens must be >= 0")
        if self.parent_turn is not None and self.parent_turn < 0:
            raise InvalidRequest(f"parent_turn must be >= 0 or None, got {self.parent_turn}")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in self.usage.items()):
            raise InvalidRequest(f"usage must map str to int, got {self.usage!r}")

    @classmethod
    def new(cls, name: str, **fields: Any) -> SessionMeta:
        """A version-0 meta stamped with the current time."""
        now = time.time()
        fields.setdefault("created", now)
        fields.setdefault("updated", now)
        return cls(name=name, **fields)


@dataclass(frozen=True, kw_only=True)
class Turn:
    """One turn: tokens[start:end] of the session (end exclusive), as rendered by the template."""

    role: str
    start: int
    end: int
    text: str = ""
    request_id: str = ""  # the request that produced it, for idempotent retries
    meta: dict[str, Any] = field(default_factory=dict)  # finish_reason, usage, ... (msgpack-able)

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise InvalidRequest(f"turn needs 0 <= start <= end, got {self.start}..{self.end}")


@dataclass(frozen=True, kw_only=True)
class SessionRecord:
    """A consistent snapshot of one session."""

    meta: SessionMeta
    tokens: list[int]
    turns: list[Turn]


def check_commit(
    truncate_to: int, new_tokens: list[int], turns: list[Turn], meta_updates: dict[str, Any]
) -> None:
    """Validate commit arguments that do not depend on the stored state."""
    if truncate_to < 0:
        raise InvalidRequest(f"truncate_to must be >= 0, got {truncate_to}")
    unknown = set(meta_updates) - UPDATABLE_META
    if unknown:
        raise InvalidRequest(
            f"meta fields {sorted(unknown)} cannot be updated; allowed: {sorted(UPDATABLE_META)}"
        )
    if "ttl_s" in meta_updates:
        check_ttl(meta_updates["ttl_s"])
    new_len = truncate_to + len(new_tokens)
    last_end = truncate_to
    # Turn ends stay sorted across the whole list (surviving turns end <= truncate_to), which
    # lets a truncation drop turns from the tail only.
    for turn in turns:
        if turn.end < last_end or turn.end > new_len:
            raise InvalidRequest(
                f"turn {turn.start}..{turn.end} out of order or outside the session's "
                f"{new_len} tokens (ends must be non-decreasing and >= truncate_to={truncate_to})"
            )
        last_end = turn.end


class SessionStore(ABC):
    """Sessions keyed by name. Every method is safe to call from several threads."""

    @abstractmethod
    def create(self, meta: SessionMeta) -> None:
        """Create an empty session (meta.num_tokens must be 0). SessionExists if present."""

    @abstractmethod
    def get(self, name: str) -> SessionRecord:
        """Meta, tokens and turns as one consistent snapshot. SessionNotFound."""

    @abstractmethod
    def get_meta(self, name: str) -> SessionMeta:
        """SessionNotFound."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def commit_turn(
        self,
        name: str,
        *,
        expected_version: int,
        truncate_to: int,
        new_tokens: list[int],
        turns: list[Turn],
        meta_updates: dict[str, Any] | None = None,
    ) -> int:
        """Atomically, only if the stored version == expected_version (else VersionConflict):
        cut tokens back to `truncate_to` and drop turns ending after it, append `new_tokens` and
        `turns`, apply `meta_updates` (keys in UPDATABLE_META; values replace, so `usage` is the
        new running total), bump the version, set updated/num_tokens and refresh the TTL.
        Returns the new version. SessionNotFound; InvalidRequest if truncate_to > num_tokens."""

    @abstractmethod
    def find_turn_by_request_id(self, name: str, request_id: str) -> Turn | None:
        """The last stored turn with that request id, or None. SessionNotFound."""

    @abstractmethod
    def list(self, prefix: str = "", limit: int = 1000) -> list[SessionMeta]:
        """Metas of sessions whose name starts with `prefix`, sorted by name, at most `limit`."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Delete a session and everything under it; False if it did not exist."""

    @abstractmethod
    def fork(self, src: str, dst: str, *, at_turn: int | None = None) -> SessionMeta:
        """Copy `src` into a new session `dst` (version 0, parent=src), keeping tokens and turns
        up to the end of turn `at_turn` (0-based; None = everything). The draft blob is not
        copied. SessionNotFound (src), SessionExists (dst), InvalidRequest (bad at_turn)."""

    @abstractmethod
    def put_draft(self, name: str, version: int, blob: bytes) -> bool:
        """Store a draft-cache blob built at session version `version`. False (nothing stored)
        if the session is gone or has moved past that version."""

    @abstractmethod
    def get_draft(self, name: str) -> bytes | None:
        """The draft blob if it belongs to the session's current version, else None (a miss)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
