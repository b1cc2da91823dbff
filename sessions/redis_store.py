"""SessionStore on Redis (an external server, or the embedded one from embedded.py).

Key layout, with P = key_prefix (default "lsrt"). The name sits in braces, a Redis Cluster hash
tag, so all keys of one session live on one shard and one Lua script can touch them all:

    P:s:{name}:meta    HASH    version, fingerprint, created, updated, ttl_s ("" = none), parent,
                               parent_turn ("" = none), draft, num_tokens, usage (JSON),
                               extra (JSON)
    P:s:{name}:tokens  STRING  token ids as little-endian int32; truncate = SET of a GETRANGE
                               prefix, append = APPEND, so a turn costs O(new tokens) when it
                               does not roll back
    P:s:{name}:turns   LIST    one item per turn, sorted by end offset (format in
                               redis_scripts.py)
    P:s:{name}:reqs    HASH    request_id -> index of the last turn with that id (retries)
    P:s:{name}:draft   HASH    version (session version the blob was built at), blob (blob.py)

Every write is one Lua script (redis_scripts.py), so a reader never sees half a commit, and a
commit checks the fencing version in the same step. A session's TTL is applied to all five keys
on every commit. Listing uses SCAN on the meta keys, never KEYS.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from lsrt.runtime.errors import (
    InvalidRequest,
    SessionExists,
    SessionNotFound,
    StoreError,
    VersionConflict,
)
from lsrt.sessions import redis_scripts
from lsrt.sessions.redis_codec import (
    decode_meta,
    decode_tokens,
    decode_turn,
    encode_meta,
    encode_meta_updates,
    encode_tokens,
    encode_turn,
)
from lsrt.sessions.store import (
    SessionMeta,
    SessionRecord,
    SessionStore,
    Turn,
    check_commit,
    check_name,
)

_KINDS = ("meta", "tokens", "turns", "reqs", "draft")


def describe_client(client: redis.Redis) -> str:
    """A URL-like name for error messages, without credentials."""
    kw = client.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore(SessionStore):
    """Sessions in Redis. Pass a URL (`redis://host:port/db`, `unix:///path.sock`) or a client."""

    def __init__(self, url_or_client: str | redis.Redis, key_prefix: str = "lsrt") -> None:
        if isinstance(url_or_client, str):
            self.url = re.sub(r"//[^/@]*@", "//***@", url_or_client)  # no passwords in errors
            try:
                self.client = redis.Redis.from_url(
                    url_or_client, socket_connect_timeout=5, socket_timeout=30
                )
            except ValueError as err:
                raise StoreError(f"bad Redis URL {self.url}: {err}") from err
            self._owns_client = True
        else:
            self.client = url_or_client
            self.url = describe_client(url_or_client)
            self._owns_client = False
        self.key_prefix = key_prefix
        self._create = self.client.register_script(redis_scripts.CREATE)
        self._commit = self.client.register_script(redis_scripts.COMMIT)
        self._put_draft = self.client.register_script(redis_scripts.PUT_DRAFT)

    # -- plumbing -------------------------------------------------------------------------

    def session_keys(self, name: str) -> list[str]:
        """The session's keys in the order the Lua scripts expect (meta, tokens, turns, reqs,
        draft)."""
        check_name(name)
        return [f"{self.key_prefix}:s:{{{name}}}:{kind}" for kind in _KINDS]

    @contextmanager
    def _io(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreError(f"cannot reach Redis at {self.url}: {err}") from err
        except redis.RedisError as err:
            raise StoreError(f"Redis at {self.url} failed: {err}") from err

    def ping(self) -> None:
        """Raise StoreError unless the server answers."""
        with self._io():
            self.client.ping()

    # -- reads ----------------------------------------------------------------------------

    def get(self, name: str) -> SessionRecord:
        meta_key, tokens_key, turns_key, _, _ = self.session_keys(name)
        with self._io():
            pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: one snapshot
            pipe.hgetall(meta_key).get(tokens_key).lrange(turns_key, 0, -1)
            raw_meta, raw_tokens, raw_turns = pipe.execute()
        if not raw_meta:
            raise SessionNotFound(f"no session named {name!r}")
        return SessionRecord(
            meta=decode_meta(name, raw_meta),
            tokens=decode_tokens(raw_tokens),
            turns=[decode_turn(item) for item in raw_turns],
        )

    def get_meta(self, name: str) -> SessionMeta:
        with self._io():
            raw = self.client.hgetall(self.session_keys(name)[0])
        if not raw:
            raise SessionNotFound(f"no session named {name!r}")
        return decode_meta(name, raw)

    def exists(self, name: str) -> bool:
        with self._io():
            return bool(self.client.exists(self.session_keys(name)[0]))

    def find_turn_by_request_id(self, name: str, request_id: str) -> Turn | None:
        meta_key, _, turns_key, reqs_key, _ = self.session_keys(name)
        if not request_id:
            return None
        with self._io():
            pipe = self.client.pipeline(transaction=True)
            pipe.exists(meta_key).hget(reqs_key, request_id)
            found, idx = pipe.execute()
            if not found:
                raise SessionNotFound(f"no session named {name!r}")
            item = self.client.lindex(turns_key, int(idx)) if idx is not None else None
        if item is None:
            return None
        turn = decode_turn(item)
        # a commit between the two reads may have moved the list: trust only a matching turn
        return turn if turn.request_id == request_id else None

    def list(self, prefix: str = "", limit: int = 1000) -> list[SessionMeta]:
        if limit < 0:
            raise InvalidRequest(f"limit must be >= 0, got {limit}")
        head, tail = f"{self.key_prefix}:s:{{", "}:meta"
        pattern = _glob_escape(head) + _glob_escape(prefix) + "*" + _glob_escape(tail)
        with self._io():
            keys = self.client.scan_iter(match=pattern, count=1000)
            names = sorted({k.decode()[len(head) : -len(tail)] for k in keys})[:limit]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.session_keys(name)[0])
            raws = pipe.execute()
        # a session deleted between SCAN and HGETALL reads back empty: skip it
        return [decode_meta(n, raw) for n, raw in zip(names, raws) if raw]

    def get_draft(self, name: str) -> bytes | None:
        meta_key, _, _, _, draft_key = self.session_keys(name)
        with self._io():
            pipe = self.client.pipeline(transaction=True)
            pipe.hget(meta_key, "version").hmget(draft_key, "version", "blob")
            version, (blob_version, blob) = pipe.execute()
        if version is None or blob is None or blob_version != version:
            return None
        return blob

    # -- writes ---------------------------------------------------------------------------

    def create(self, meta: SessionMeta) -> None:
        if meta.num_tokens != 0:
            raise InvalidRequest("create() makes an empty session: num_tokens must be 0")
        self._create_with(meta, [], [])

    def _create_with(self, meta: SessionMeta, tokens: list[int], turns: list[Turn]) -> None:
        fields = encode_meta(meta)
        args: list[Any] = [encode_tokens(tokens), len(turns), *map(encode_turn, turns)]
        for key, value in fields.items():
            args += [key, value]
        with self._io():
            code, _ = self._create(keys=self.session_keys(meta.name), args=args)
        if code != 1:
            raise SessionExists(f"session {meta.name!r} already exists")

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
        meta_updates = meta_updates or {}
        check_commit(truncate_to, new_tokens, turns, meta_updates)
        args: list[Any] = [expected_version, truncate_to, encode_tokens(new_tokens)]
        args += [repr(time.time()), len(turns), *map(encode_turn, turns)]
        for key, value in encode_meta_updates(meta_updates).items():
            args += [key, value]
        with self._io():
            code, value = self._commit(keys=self.session_keys(name), args=args)
        if code == -1:
            raise SessionNotFound(f"no session named {name!r}")
        if code == -2:
            raise VersionConflict(
                f"session {name!r} is at version {value}, the writer expected {expected_version}"
            )
        if code == -3:
            raise InvalidRequest(
                f"truncate_to={truncate_to} is past the end of session {name!r} ({value} tokens)"
            )
        return int(value)

    def delete(self, name: str) -> bool:
        keys = self.session_keys(name)
        with self._io():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(keys[0]).delete(*keys[1:])
            deleted_meta, _ = pipe.execute()
        return bool(deleted_meta)

    def fork(self, src: str, dst: str, *, at_turn: int | None = None) -> SessionMeta:
        check_name(dst)
        record = self.get(src)
        turns = record.turns
        if at_turn is not None:
            if not 0 <= at_turn < len(turns):
                raise InvalidRequest(
                    f"at_turn={at_turn} but session {src!r} has {len(turns)} turns"
                )
            turns = turns[: at_turn + 1]
        end = turns[-1].end if at_turn is not None else len(record.tokens)
        m = record.meta
        meta = SessionMeta.new(
            dst,
            fingerprint=m.fingerprint,
            ttl_s=m.ttl_s,
            parent=src,
            parent_turn=at_turn if at_turn is not None else (len(turns) - 1 if turns else None),
            draft=m.draft,
            num_tokens=end,
            extra=dict(m.extra),
        )
        self._create_with(meta, record.tokens[:end], turns)
        return meta

    def put_draft(self, name: str, version: int, blob: bytes) -> bool:
        with self._io():
            return bool(self._put_draft(keys=self.session_keys(name), args=[version, blob]))

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _glob_escape(text: str) -> str:
    """Escape Redis MATCH glob characters."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
