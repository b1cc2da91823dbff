"""How RedisStore writes session metadata, tokens and turns as Redis values.

Kept apart from the store so the byte formats (which the Lua scripts depend on) are in one place:
tokens are little-endian int32, a turn item is a `<i4 start, <i4 end, <u2 len(request_id)>`
header, the request id, then msgpack [role, text, meta]; meta is a HASH of strings.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack
import numpy as np

from lsrt.runtime.errors import InvalidRequest
from lsrt.sessions.store import SessionMeta, Turn

_TURN_HEAD = struct.Struct("<iiH")  # start, end, len(request_id)
_MAX_REQUEST_ID = 1024  # bytes
_INT32_MAX = 2**31 - 1


def encode_tokens(tokens: list[int]) -> bytes:
    try:
        arr = np.asarray(tokens)  # [num_tokens]
    except (OverflowError, ValueError) as err:
        raise InvalidRequest(f"token ids must be ints in [0, 2**31): {err}") from err
    if arr.size == 0:
        return b""
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > _INT32_MAX:
        raise InvalidRequest("token ids must be a flat list of ints in [0, 2**31)")
    return arr.astype("<i4").tobytes()


def decode_tokens(data: bytes | None) -> list[int]:
    return np.frombuffer(data or b"", dtype="<i4").tolist()


def encode_turn(turn: Turn) -> bytes:
    rid = turn.request_id.encode()
    if len(rid) > _MAX_REQUEST_ID or turn.end > _INT32_MAX:
        raise InvalidRequest(f"request_id over {_MAX_REQUEST_ID} bytes or turn end too large")
    try:
        body = msgpack.packb([turn.role, turn.text, turn.meta], use_bin_type=True)
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"turn meta must be msgpack-able: {err}") from err
    return _TURN_HEAD.pack(turn.start, turn.end, len(rid)) + rid + body


def decode_turn(item: bytes) -> Turn:
    start, end, rid_len = _TURN_HEAD.unpack_from(item)
    head = _TURN_HEAD.size
    rid = item[head : head + rid_len].decode()
    role, text, meta = msgpack.unpackb(item[head + rid_len :], raw=False)
    return Turn(role=role, start=start, end=end, text=text, request_id=rid, meta=meta)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"usage and extra must be JSON-able: {err}") from err


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


def encode_meta(meta: SessionMeta) -> dict[str, str]:
    return {
        "version": str(meta.version),
        "fingerprint": meta.fingerprint,
        "created": repr(meta.created),
        "updated": repr(meta.updated),
        "ttl_s": _opt(meta.ttl_s),
        "parent": meta.parent,
        "parent_turn": _opt(meta.parent_turn),
        "draft": meta.draft,
        "num_tokens": str(meta.num_tokens),
        "usage": _json(meta.usage),
        "extra": _json(meta.extra),
    }


def encode_meta_updates(updates: dict[str, Any]) -> dict[str, str]:
    """Encode the UPDATABLE_META subset the same way encode_meta does."""
    out: dict[str, str] = {}
    for key, value in updates.items():
        if key in ("usage", "extra"):
            out[key] = _json(value)
        elif key == "ttl_s":
            out[key] = _opt(value)
        else:
            out[key] = str(value)
    return out


def decode_meta(name: str, raw: dict[bytes, bytes]) -> SessionMeta:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return SessionMeta(
        name=name,
        version=int(f["version"]),
        fingerprint=f.get("fingerprint", ""),
        created=float(f.get("created") or 0.0),
        updated=float(f.get("updated") or 0.0),
        ttl_s=int(f["ttl_s"]) if f.get("ttl_s") else None,
        parent=f.get("parent", ""),
        parent_turn=int(f["parent_turn"]) if f.get("parent_turn") else None,
        draft=f.get("draft", ""),
        num_tokens=int(f.get("num_tokens") or 0),
        usage=json.loads(f.get("usage") or "{}"),
        extra=json.loads(f.get("extra") or "{}"),
    )
