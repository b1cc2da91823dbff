"""Draft-cache blob codec: exact round trips, and every kind of bad blob is a miss (None)."""

from __future__ import annotations

import random
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch

from lsrt.runtime.spec.drafter import DraftState
from lsrt.sessions.blob import (
    MAGIC,
    decode_draft_blob,
    encode_draft_blob,
    entry_to_tensor,
    tensor_to_entry,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN payloads and -0.0 compare exactly."""
    by_size = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(by_size[t.element_size()]) if t.dtype.is_floating_point else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5), (7,), (), (0, 4)])
def test_tensor_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _random_tensor(dtype, shape, seed=len(shape))
    name, got_shape, data = tensor_to_entry(t)
    assert got_shape == list(shape) and name == str(dtype).removeprefix("torch.")
    assert len(data) == t.numel() * t.element_size()
    back = entry_to_tensor((name, got_shape, data))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(_bits(back), _bits(t))


def test_known_byte_patterns() -> None:
    # independent references: IEEE/bf16 bit patterns, little-endian
    assert tensor_to_entry(torch.tensor([1.0], dtype=torch.bfloat16))[2] == b"\x80\x3f"
    assert tensor_to_entry(torch.tensor([-2.0], dtype=torch.float16))[2] == b"\x00\xc0"
    assert tensor_to_entry(torch.tensor([1.5]))[2] == struct.pack("<f", 1.5)
    assert tensor_to_entry(torch.tensor([-3], dtype=torch.int64))[2] == struct.pack("<q", -3)
    t = entry_to_tensor(("bfloat16", [2], b"\x80\x3f\x00\xc0"))
    assert t.tolist() == [1.0, -2.0]


def test_non_contiguous_tensor() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3], strided
    assert torch.equal(entry_to_tensor(tensor_to_entry(t)), t)


def test_bad_entries_raise() -> None:
    with pytest.raises(ValueError):
        entry_to_tensor(("float32", [3], b"\x00" * 8))
    with pytest.raises(ValueError):
        entry_to_tensor(("complex64", [1], b"\x00" * 8))
    with pytest.raises(ValueError):
        tensor_to_entry(torch.zeros(2, dtype=torch.uint8))


def _state() -> DraftState:
    k = _random_tensor(torch.bfloat16, (2, 4, 6, 8), seed=1)  # [layers, kv_heads, tokens, dim]
    v = _random_tensor(torch.bfloat16, (2, 4, 6, 8), seed=2)
    pos = torch.arange(6, dtype=torch.int64)
    header = {"dtype": "bfloat16", "positions": "post-rope", "sink": 4, "window": 2, "l": [1, 2]}
    return DraftState(
        kind="self", num_tokens=1234, header=header,
        tensors={"k": tensor_to_entry(k), "v": tensor_to_entry(v), "pos": tensor_to_entry(pos)},
    )  # fmt: skip


def test_state_round_trip() -> None:
    state = _state()
    blob = encode_draft_blob(state, session_version=7, fingerprint="qwen:abc")
    back = decode_draft_blob(blob, expected_version=7, fingerprint="qwen:abc")
    assert back is not None
    assert (back.kind, back.num_tokens, back.header) == (state.kind, 1234, state.header)
    assert set(back.tensors) == {"k", "v", "pos"}
    for name, entry in state.tensors.items():
        assert tuple(back.tensors[name]) == tuple(entry)
        restored, original = entry_to_tensor(back.tensors[name]), entry_to_tensor(entry)
        assert torch.equal(_bits(restored), _bits(original))
    assert decode_draft_blob(memoryview(blob), expected_version=7, fingerprint="qwen:abc")


def _rebuild(blob: bytes, **changes) -> bytes:
    """Re-encode the body with fields changed and a *valid* checksum: only the semantic checks
    can reject it."""
    doc = msgpack.unpackb(blob[len(MAGIC) + 4 :], raw=False)
    doc.update(changes)
    body = msgpack.packb(doc, use_bin_type=True)
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def test_bad_blobs_are_misses() -> None:
    blob = encode_draft_blob(_state(), session_version=7, fingerprint="fp")

    def miss(data: object, version: int = 7, fp: str = "fp") -> bool:
        return decode_draft_blob(data, expected_version=version, fingerprint=fp) is None

    assert not miss(blob)
    assert not miss(_rebuild(blob))  # the rebuild helper itself keeps a valid blob valid
    assert miss(blob, version=8) and miss(blob, version=6)
    assert miss(blob, fp="other-model")
    assert miss(_rebuild(blob, format=2))
    assert miss(_rebuild(blob, magic="other"))
    assert miss(_rebuild(blob, session_version=True), version=1)
    assert miss(_rebuild(blob, num_tokens=-1))
    assert miss(_rebuild(blob, header=[1]))
    bad_shape = _rebuild(blob, tensors={"k": ["bfloat16", [2, 4, 6, 9], b"\x00" * 768]})
    assert miss(bad_shape)
    assert miss(_rebuild(blob, tensors={"k": ["float8", [1], b"\x00"]}))
    for cut in (0, 5, len(MAGIC) + 4, len(blob) // 2, len(blob) - 1):
        assert miss(blob[:cut])
    rng = random.Random(0)
    for _ in range(20):  # flip one random bit anywhere
        i = rng.randrange(len(blob))
        flipped = bytearray(blob)
        flipped[i] ^= 1 << rng.randrange(8)
        assert miss(bytes(flipped))
    assert miss(blob + b"\x00")
    assert miss(np.random.default_rng(1).bytes(500))
    assert miss(None) and miss(12345) and miss("text")


def test_encode_rejects_malformed_state() -> None:
    state = DraftState(kind="self", num_tokens=1, tensors={"k": ("float32", [2], b"\x00" * 4)})
    with pytest.raises(ValueError):
        encode_draft_blob(state, session_version=0, fingerprint="fp")
