"""The draft-cache blob: a drafter's DraftState as bytes, stored beside the session in Redis.

A blob is a cache. Decoding returns None (a miss; the drafter rebuilds from tokens) for anything
that is not exactly right: other bytes, another format version, a blob built at another session
version or for another model, a flipped bit, a cut-off tail, a tensor whose bytes do not match
its shape. It never raises on bad data and never returns a partly valid state: a restored cache
that is subtly wrong would silently cost acceptance rate (or correctness, for positions).

Layout:  b"lsrt-draft" | <u4 crc32(body)> | body
body (msgpack map): magic "lsrt-draft", format 1, session_version, fingerprint, kind, num_tokens,
header (the state's dtype, positions convention, sink, window, ...), tensors {name: [dtype name,
shape, raw little-endian bytes]}. bf16 travels as its raw 2-byte patterns (viewed as int16).
msgpack has no tuples: header values come back as lists.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import msgpack
import numpy as np
import torch

from lsrt.runtime.spec.drafter import DraftState

MAGIC = b"lsrt-draft"
FORMAT_VERSION = 1
_CRC = struct.Struct("<I")

# dtype name -> (torch dtype, little-endian numpy dtype of the raw bytes)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),  # numpy has no bf16: move the bit patterns
    "int32": (torch.int32, "<i4"),
    "int64": (torch.int64, "<i8"),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}

Entry = tuple[str, list[int], bytes]  # (dtype name, shape, raw bytes)


def tensor_to_entry(t: torch.Tensor) -> Entry:
    """(dtype name, shape, raw little-endian bytes) of a CPU or GPU tensor of any shape."""
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise ValueError(f"unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    flat = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        flat = flat.view(torch.int16)
    data = flat.numpy().astype(DTYPES[name][1], copy=False).tobytes()
    return name, list(t.shape), data


def check_entry(entry: Any) -> Entry:
    """Return the entry normalised, or raise ValueError if dtype, shape and bytes disagree."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ValueError("a tensor entry is (dtype name, shape, bytes)")
    name, shape, data = entry
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"bad shape {shape!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError("tensor data must be bytes")
    itemsize = np.dtype(DTYPES[name][1]).itemsize
    if len(data) != math.prod(shape) * itemsize:
        raise ValueError(f"{len(data)} bytes do not fill a {name} tensor of shape {list(shape)}")
    return name, list(shape), bytes(data)


def entry_to_tensor(entry: Entry) -> torch.Tensor:
    """The CPU tensor an entry describes (a copy; the bytes are not aliased)."""
    name, shape, data = check_entry(entry)
    torch_dtype, np_dtype = DTYPES[name]
    arr = np.frombuffer(data, dtype=np_dtype).astype(np_dtype[1:], copy=True)  # native order
    t = torch.from_numpy(arr)
    if name == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


def encode_draft_blob(state: DraftState, *, session_version: int, fingerprint: str) -> bytes:
    """Serialise `state` for the session at `session_version` of model `fingerprint`.
    Raises ValueError on a malformed state (a bug in the drafter, not bad stored data)."""
    if session_version < 0 or state.num_tokens < 0:
        raise ValueError("session_version and num_tokens must be >= 0")
    tensors = {str(k): list(check_entry(v)) for k, v in state.tensors.items()}
    doc = {
        "magic": MAGIC.decode(),
        "format": FORMAT_VERSION,
        "session_version": session_version,
        "fingerprint": fingerprint,
        "kind": state.kind,
        "num_tokens": state.num_tokens,
        "header": state.header,
        "tensors": tensors,
    }
    try:
        body = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"draft state header is not msgpack-able: {err}") from err
    return MAGIC + _CRC.pack(zlib.crc32(body)) + body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_draft_blob(data: Any, *, expected_version: int, fingerprint: str) -> DraftState | None:
    """The stored state, or None if the blob is not valid for this session version and model."""
    try:
        return _decode(bytes(data), expected_version, fingerprint)
    except Exception:  # noqa: BLE001 - bad stored bytes are a cache miss, whatever the failure
        return None


def _decode(data: bytes, expected_version: int, fingerprint: str) -> DraftState | None:
    head = len(MAGIC) + _CRC.size
    if len(data) < head or not data.startswith(MAGIC):
        return None
    body = data[head:]
    if _CRC.unpack_from(data, len(MAGIC))[0] != zlib.crc32(body):
        return None  # truncated or corrupted
    doc = msgpack.unpackb(body, raw=False)
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC.decode():
        return None
    if doc.get("format") != FORMAT_VERSION or doc.get("fingerprint") != fingerprint:
        return None
    version, num_tokens = doc.get("session_version"), doc.get("num_tokens")
    if not (_is_int(version) and version == expected_version):
        return None
    kind, header, tensors = doc.get("kind"), doc.get("header"), doc.get("tensors")
    if not (_is_int(num_tokens) and num_tokens >= 0 and isinstance(kind, str)):
        return None
    if not (isinstance(header, dict) and isinstance(tensors, dict)):
        return None
    checked = {str(name): check_entry(entry) for name, entry in tensors.items()}
    return DraftState(kind=kind, num_tokens=num_tokens, header=header, tensors=checked)
