"""Which sessions keep their KV resident, and the turn counters behind `stats()`.

`ResidentSet` owns the resident sessions of one KV pool: the `Resident` record of each (its
KVSequence, token history, drafter, committed version and LRU timestamp), KV admission (how many
free blocks a turn needs, counting blocks a truncation frees and copy-on-write copies) and
least-recently-used eviction of idle sessions to make room. It takes no lock of its own: the
`SessionManager` calls it only under its model lock, and eviction merely try-acquires session
locks so it never waits on a running turn. `TurnCounters` keeps the running totals reported by
`SessionManager.stats()`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lsrt.runtime.errors import ResourceExhausted
from lsrt.runtime.kv_cache import KVSequence, PagedKVPool
from lsrt.runtime.spec.drafter import Drafter
from lsrt.runtime.types import Usage


@dataclass
class Resident:
    """A session's device-side cache: KV for `history[:seq.num_tokens]`, a drafter that has
    observed exactly `history`, and the store version `history` was committed at."""

    seq: KVSequence
    history: list[int]
    drafter: Drafter | None
    version: int
    last_used: float


class ResidentSet:
    """name -> `Resident` over one pool, with KV admission and LRU eviction (see module doc)."""

    def __init__(self, pool: PagedKVPool, *, reserve_tokens: int, clock: Callable[[], float],
                 lock_of: Callable[[str], threading.Lock | None]) -> None:
        self.pool = pool
        self.reserve_tokens = reserve_tokens  # spare slots an idle session may keep
        self.clock = clock
        self._lock_of = lock_of  # a session's lock if it has one (eviction try-acquires it)
        self._by_name: dict[str, Resident] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Resident | None:
        return self._by_name.get(name)

    def put(self, name: str, res: Resident) -> None:
        self._by_name[name] = res

    def drop(self, name: str) -> None:
        """Evicts `name` (if resident) and frees its KV blocks."""
        res = self._by_name.pop(name, None)
        if res is not None:
            res.seq.release()

    def drop_all(self) -> None:
        for name in list(self._by_name):
            self.drop(name)

    def forget(self, name: str, res: Resident) -> None:
        """Unregisters `name` if `res` is its entry; the caller releases `res`'s KV."""
        if self._by_name.get(name) is res:
            del self._by_name[name]

    def trim(self, res: Resident) -> None:
        """Idle sessions keep at most `reserve_tokens` spare slots."""
        res.last_used = self.clock()
        if res.seq.capacity - res.seq.num_tokens > self.reserve_tokens:
            res.seq.truncate(res.seq.num_tokens)

    def blocks_needed(self, res: Resident, keep: int, need_tokens: int) -> int:
        """Free blocks the pool must have to truncate `res` to `keep` tokens and reserve
        `need_tokens` slots (blocks freed by the truncation and copy-on-write included)."""
        pool, bs = self.pool, self.pool.block_size
        blocks = res.seq.blocks
        kept = min(len(blocks), -(-keep // bs))
        freed = sum(1 for b in blocks[kept:] if pool.refcount(b) == 1)
        cow = sum(1 for b in blocks[keep // bs:kept] if pool.refcount(b) > 1)
        return max(0, -(-need_tokens // bs) - kept) + cow - freed

    def make_room(self, name: str, res: Resident, keep: int, need_tokens: int) -> None:
        """Evict least-recently-used idle sessions until the turn fits; ResourceExhausted
        (before anything of this session changed) if it cannot."""
        pool = self.pool
        if -(-need_tokens // pool.block_size) > pool.num_blocks:
            raise ResourceExhausted(
                f"the turn needs {need_tokens} tokens of KV; the whole pool holds "
                f"{pool.num_blocks * pool.block_size}", retry_after_s=None)
        victims = sorted((r.last_used, n) for n, r in self._by_name.items() if n != name)
        for _, victim in victims:
            if self.blocks_needed(res, keep, need_tokens) <= pool.num_free_blocks:
                return
            lock = self._lock_of(victim)
            if lock is not None and not lock.acquire(blocking=False):
                continue  # a turn is running on it (or waiting for the model)
            try:
                self.drop(victim)
            finally:
                if lock is not None:
                    lock.release()
        needed = self.blocks_needed(res, keep, need_tokens)
        if needed > pool.num_free_blocks:
            raise ResourceExhausted(
                f"KV cache full: the turn needs {needed} more blocks, {pool.num_free_blocks} of "
                f"{pool.num_blocks} free and no idle session left to evict", retry_after_s=1.0)


class TurnCounters:
    """Running totals for `stats()`; decode speed over the last 32 generating turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals = {"turns": 0, "running_turns": 0, "tokens_generated": 0,
                       "drafted_tokens": 0, "accepted_tokens": 0, "spec_steps": 0}
        self._recent: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens, decode seconds)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.totals[key] += value

    def record_turn(self, usage: Usage, decode_s: float) -> None:
        self.add(turns=1, tokens_generated=usage.completion_tokens,
                 drafted_tokens=usage.drafted_tokens, accepted_tokens=usage.accepted_tokens,
                 spec_steps=usage.spec_steps)
        if usage.completion_tokens:
            with self._lock:
                self._recent.append((usage.completion_tokens, decode_s))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out = {k: float(v) for k, v in self.totals.items()}
            tokens = sum(n for n, _ in self._recent)
            secs = sum(s for _, s in self._recent)
        steps, drafted = out["spec_steps"], out["drafted_tokens"]
        out["acceptance_rate"] = out["accepted_tokens"] / drafted if drafted else 0.0
        out["mean_accepted_per_step"] = out["tokens_generated"] / steps if steps else 0.0
        out["tokens_per_s"] = out["decode_tokens_per_s"] = tokens / secs if secs else 0.0
        return out
