"""A suffix index shared across sessions: what earlier sessions generated, for suffix drafting.

`GlobalSuffixIndex` holds other sessions' generated turns as separate documents in one
`SuffixIndex`, separated by `_SEP` so no match or continuation crosses a document boundary. A
`SuffixDrafter` given one (`global_index=`) merges its continuations with those of the session's
own history. The caller creates and shares it (never a module global); it is thread-safe and
bounded, dropping the oldest documents when full.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from lsrt.runtime.spec.suffix import _SEP, SuffixIndex, _read


class GlobalSuffixIndex:
    """Append-only, bounded index of past outputs (other sessions' generated turns).

    Shared between drafters by the caller (never a module global); thread-safe. When the total
    exceeds `max_tokens`, the oldest documents are dropped down to half the bound and the index
    is rebuilt from the rest: amortised O(1) per added token.
    """

    def __init__(self, *, max_tokens: int = 1 << 20, max_match: int = 32,
                 scan_limit: int = 64) -> None:
        if max_tokens < 2:
            raise ValueError("max_tokens must be >= 2")
        self.max_tokens = max_tokens
        self._docs: deque[list[int]] = deque()
        self._size = 0
        self._index = SuffixIndex(max_match=max_match, scan_limit=scan_limit)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def add(self, tokens: list[int]) -> None:
        doc = [int(t) for t in tokens][-(self.max_tokens - 1):]
        if not doc:
            return
        with self._lock:
            if self._size + len(doc) + 1 > self.max_tokens:
                while self._docs and self._size + len(doc) + 1 > self.max_tokens // 2:
                    self._size -= len(self._docs.popleft()) + 1
                self._index = SuffixIndex(max_match=self._index.max_match,
                                          scan_limit=self._index.scan_limit)
                for old in self._docs:
                    self._index.extend(old + [_SEP])
            self._docs.append(doc)
            self._size += len(doc) + 1
            self._index.extend(doc + [_SEP])

    def continuations(self, history: list[int], depth_of: Callable[[int], int], limit: int
                      ) -> tuple[int, list[list[int]]]:
        """(match length, continuations newest first) of history's longest suffix seen here."""
        with self._lock:
            idx = self._index
            m, state = idx.match_query(history)
            if m == 0:
                return 0, []
            pattern = history[len(history) - m:]
            ends = idx.occurrences(pattern, state, len(idx.tokens), limit)
            return m, [_read(idx.tokens, e, depth_of(m)) for e in ends]
