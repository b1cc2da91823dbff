"""The paged KV pool: allocation, fork by refcount, copy-on-write, free, exhaustion."""

from __future__ import annotations

import pytest
import torch

from lsrt.runtime.errors import InvalidRequest, ResourceExhausted
from lsrt.runtime.kv_cache import KVPoolConfig, KVSequence, PagedKVPool


def pool(blocks: int = 8, block_size: int = 4) -> PagedKVPool:
    return PagedKVPool(KVPoolConfig(num_layers=2, num_kv_heads=2, head_dim=4,
                                    num_blocks=blocks, block_size=block_size))


def test_config_validates_and_sizes_from_budget():
    with pytest.raises(ValueError):
        KVPoolConfig(num_layers=0, num_kv_heads=1, head_dim=4, num_blocks=1)
    cfg = KVPoolConfig.from_budget(budget_bytes=10_000, num_layers=2, num_kv_heads=2, head_dim=4,
                                   block_size=4)
    assert cfg.bytes_per_block == 2 * 2 * 2 * 4 * 4 * 4
    assert cfg.num_blocks == 10_000 // cfg.bytes_per_block
    with pytest.raises(ValueError):
        KVPoolConfig.from_budget(budget_bytes=10, num_layers=2, num_kv_heads=2, head_dim=4)


def test_reserve_allocates_consecutive_blocks_and_slots():
    p = pool()
    seq = KVSequence(p)
    seq.reserve(9)  # 3 blocks of 4
    assert seq.blocks == [0, 1, 2] and p.num_free_blocks == 5
    assert seq.slots(0, 9).tolist() == list(range(9))
    assert seq.contiguous_span(9) == (0, 9)
    with pytest.raises(InvalidRequest):
        seq.slots(0, 13)


def test_fork_shares_blocks_and_free_returns_them():
    p = pool()
    a = KVSequence(p)
    a.reserve(10)
    a.num_tokens = 10
    b = a.fork()
    assert b.blocks == a.blocks and all(p.refcount(x) == 2 for x in a.blocks)
    assert p.num_free_blocks == 5  # nothing copied
    a.release()
    assert all(p.refcount(x) == 1 for x in b.blocks) and p.num_free_blocks == 5
    b.release()
    assert p.num_free_blocks == 8 and p.num_used_blocks == 0


def test_fork_at_earlier_point_and_copy_on_write():
    p = pool()
    a = KVSequence(p)
    a.reserve(12)
    a.num_tokens = 12
    p.k[:, :, :12] = torch.arange(12, dtype=torch.float32)[None, None, :, None]
    b = a.fork(num_tokens=6)  # blocks 0 and 1 shared (positions 0..7)
    assert b.blocks == a.blocks[:2] and b.num_tokens == 6
    b.reserve(8)
    b.make_writable(6)  # position 6 lies in shared block 1: it is copied first
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert p.refcount(a.blocks[1]) == 1
    new_slots = b.slots(4, 8)
    assert torch.equal(p.k[:, :, new_slots], p.k[:, :, a.slots(4, 8)])  # contents copied
    p.k[:, :, b.slots(6, 7)] = -1.0
    assert float(p.k[0, 0, a.slots(6, 7)][0, 0]) == 6.0  # parent untouched
    with pytest.raises(InvalidRequest):
        a.fork(num_tokens=13)


def test_truncate_frees_tail_blocks():
    p = pool()
    seq = KVSequence(p)
    seq.reserve(16)
    seq.num_tokens = 16
    seq.truncate(5)
    assert seq.num_tokens == 5 and len(seq.blocks) == 2 and p.num_free_blocks == 6
    with pytest.raises(InvalidRequest):
        seq.truncate(9)


def test_exhausting_the_pool_raises_typed_error_and_changes_nothing():
    p = pool(blocks=4)
    a = KVSequence(p)
    a.reserve(12)
    b = KVSequence(p)
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        b.reserve(8)
    assert b.blocks == [] and p.num_free_blocks == 1
    a.release()
    b.reserve(8)
    assert len(b.blocks) == 2


def test_freed_blocks_are_reused_lowest_first():
    p = pool()
    a, b = KVSequence(p), KVSequence(p)
    a.reserve(8)
    b.reserve(8)
    a.release()
    c = KVSequence(p)
    c.reserve(4)
    assert c.blocks == [0]
    assert c.block_table_tensor().dtype == torch.int32
