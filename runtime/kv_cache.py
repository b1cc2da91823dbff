"""The paged KV cache: one preallocated pool per device, fixed-size blocks, per-sequence tables.

Layout (the contract every attention backend and kernel reads):

    pool.k, pool.v : [num_layers, num_kv_heads, num_blocks * block_size, head_dim]

A token's *slot* is `block * block_size + offset`; slots index dimension 2. Keys are stored
*after* RoPE at the token's absolute position, so committed KV never needs re-rotation. Putting
heads before slots means a run of consecutive blocks is a strided view `[kv_heads, n, head_dim]`
that attention reads with no gather (the allocator hands out consecutive blocks when it can).

Blocks are reference-counted: `KVSequence.fork` shares every block, and a write into a shared
block first copies it (`make_writable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsrt.runtime.errors import InvalidRequest, ResourceExhausted


@dataclass(frozen=True, kw_only=True)
class KVPoolConfig:
    """Shape of a paged KV pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVPoolConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * elem

    @classmethod
    def from_budget(
        cls, *, budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
        block_size: int = 16, dtype: torch.dtype = torch.float32, device: str = "cpu",
    ) -> "KVPoolConfig":
        """The largest pool that fits in `budget_bytes`."""
        probe = cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    num_blocks=1, block_size=block_size, dtype=dtype, device=device)
        num_blocks = budget_bytes // probe.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget_bytes} bytes holds no block "
                             f"({probe.bytes_per_block} bytes each)")
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   num_blocks=int(num_blocks), block_size=block_size, dtype=dtype, device=device)


class PagedKVPool:
    """The preallocated K/V tensors and the block allocator (free list + refcounts)."""

    def __init__(self, config: KVPoolConfig) -> None:
        self.config = config
        shape = (config.num_layers, config.num_kv_heads, config.num_blocks * config.block_size,
                 config.head_dim)
        self.k = torch.zeros(shape, dtype=config.dtype, device=config.device)
        self.v = torch.zeros(shape, dtype=config.dtype, device=config.device)
        self.block_size = config.block_size
        self._refcount = [0] * config.num_blocks
        # Kept sorted descending so pop() yields the lowest free block: consecutive allocations
        # then get consecutive blocks, which attention reads as a view.
        self._free = list(range(config.num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.config.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (refcount 1), lowest first; `ResourceExhausted` if too few."""
        if n > len(self._free):
            raise ResourceExhausted(
                f"KV cache full: {n} blocks needed, {len(self._free)} of {self.num_blocks} free "
                f"(block = {self.block_size} tokens)")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refcount[b] > 0, f"incref of free block {b}"
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        released = False
        for b in blocks:
            assert self._refcount[b] > 0, f"double free of block {b}"
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)
                released = True
        if released:
            self._free.sort(reverse=True)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k[:, :, dst * bs:(dst + 1) * bs] = self.k[:, :, src * bs:(src + 1) * bs]
        self.v[:, :, dst * bs:(dst + 1) * bs] = self.v[:, :, src * bs:(src + 1) * bs]


class KVSequence:
    """One sequence's block table and its committed length in a `PagedKVPool`.

    `num_tokens` tokens have committed KV in slots `slots(0, num_tokens)`. Capacity beyond that
    (reserved with `reserve`) is scratch space: verification writes tree tokens there, and
    whatever is not committed is simply overwritten by the next step.
    """

    def __init__(self, pool: PagedKVPool, blocks: list[int] | None = None,
                 num_tokens: int = 0) -> None:
        self.pool = pool
        self.blocks: list[int] = list(blocks or [])
        self.num_tokens = num_tokens
        self._slot_cache: torch.Tensor | None = None
        self._table_cache: torch.Tensor | None = None
        # The target's final hidden state `[H]` at position `feature_pos` (the last committed
        # one when a runner last prefilled or committed here): what LongSpec drafts with
        # `feature` read. A truncation below it drops it.
        self.feature: torch.Tensor | None = None
        self.feature_pos = -1
        self.tree_hidden: torch.Tensor | None = None  # [n, H] of the last verified tree

    def set_feature(self, hidden: torch.Tensor | None, pos: int) -> None:
        self.feature, self.feature_pos = (None, -1) if hidden is None else (hidden, pos)

    def current_feature(self) -> torch.Tensor | None:
        """The final hidden state at the last committed position, if it is known."""
        return self.feature if self.feature_pos == self.num_tokens - 1 else None

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def reserve(self, total_tokens: int) -> None:
        """Grow the block table so that `total_tokens` slots exist."""
        bs = self.pool.block_size
        need = -(-total_tokens // bs) - len(self.blocks)
        if need > 0:
            self.blocks.extend(self.pool.allocate(need))
            self._slot_cache = self._table_cache = None

    def _all_slots(self) -> torch.Tensor:
        if self._slot_cache is None:
            bs = self.pool.block_size
            blocks = torch.tensor(self.blocks, dtype=torch.long)
            self._slot_cache = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1).to(
                self.pool.config.device)
        return self._slot_cache

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Slot indices of token positions [start, end): `[end - start]` int64."""
        if end > self.capacity:
            raise InvalidRequest(f"positions up to {end} exceed reserved capacity {self.capacity}")
        return self._all_slots()[start:end]

    def block_table_tensor(self) -> torch.Tensor:
        """`[num_blocks]` int32 block ids on the pool's device (for paged kernels)."""
        if self._table_cache is None:
            self._table_cache = torch.tensor(self.blocks, dtype=torch.int32,
                                             device=self.pool.config.device)
        return self._table_cache

    def contiguous_span(self, end: int) -> tuple[int, int] | None:
        """(first_slot, end_slot) when positions [0, end) lie in consecutive slots, else None."""
        bs = self.pool.block_size
        n = -(-end // bs)
        if n == 0:
            return None
        first = self.blocks[0]
        if self.blocks[:n] != list(range(first, first + n)):
            return None
        return first * bs, first * bs + end

    def make_writable(self, start: int) -> None:
        """Copy-on-write: unshare every block that holds positions >= `start`."""
        bs = self.pool.block_size
        for i in range(start // bs, len(self.blocks)):
            b = self.blocks[i]
            if self.pool.refcount(b) > 1:
                (new,) = self.pool.allocate(1)
                self.pool.copy_block(b, new)
                self.pool.free([b])
                self.blocks[i] = new
                self._slot_cache = self._table_cache = None

    def fork(self, num_tokens: int | None = None) -> "KVSequence":
        """A sequence sharing this one's blocks for its first `num_tokens` committed tokens."""
        n = self.num_tokens if num_tokens is None else num_tokens
        if not 0 <= n <= self.num_tokens:
            raise InvalidRequest(f"fork at {n} outside committed length {self.num_tokens}")
        keep = self.blocks[: -(-n // self.pool.block_size)]
        self.pool.incref(keep)
        child = KVSequence(self.pool, keep, n)
        if self.feature_pos == n - 1:
            child.set_feature(self.feature, self.feature_pos)
        return child

    def truncate(self, num_tokens: int) -> None:
        """Roll back to `num_tokens` committed tokens and free blocks no longer needed."""
        if num_tokens > self.num_tokens:
            raise InvalidRequest(f"truncate to {num_tokens} beyond committed {self.num_tokens}")
        self.num_tokens = num_tokens
        self.tree_hidden = None
        if self.feature_pos >= num_tokens:
            self.set_feature(None, -1)
        keep = -(-num_tokens // self.pool.block_size)
        if keep < len(self.blocks):
            self.pool.free(self.blocks[keep:])
            del self.blocks[keep:]
            self._slot_cache = self._table_cache = None

    def release(self) -> None:
        """Free every block; the sequence becomes empty."""
        if self.blocks:
            self.pool.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0
        self.set_feature(None, -1)
        self.tree_hidden = None
        self._slot_cache = self._table_cache = None
