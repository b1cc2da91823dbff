"""Model-free suffix drafting (SuffixDecoding-style) over a session's token history.

Agents repeat themselves: tool output is quoted back, code is re-emitted with small edits. The
longest suffix of the history that occurred before predicts what follows it, at near-zero cost.

`SuffixIndex` is an online suffix automaton (SAM) over the token sequence: exact longest earlier
match in O(max_match) per lookup, O(1) amortised per appended token, and an undo log so that
`truncate` (cancelled turns, rejected drafts) costs O(removed tokens), never a rebuild. The SAM
only knows each state's *first* end position; the most recent occurrences come from small
per-n-gram position lists (newest last), scanned newest first and verified token by token.
Memory is a few hundred bytes per token (a transition dict per state): ~50 MB at 100K tokens.
The index shared across sessions, `GlobalSuffixIndex`, lives in `suffix_global`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lsrt.runtime.spec.drafter import DraftState
from lsrt.runtime.spec.tree import DraftTree

if TYPE_CHECKING:  # suffix_global builds on SuffixIndex, so it imports this module
    from lsrt.runtime.spec.suffix_global import GlobalSuffixIndex

_GRAM_LENS = (1, 4, 16)  # n-gram lengths with position lists; a lookup uses the longest <= match
_SEP = -1  # document separator in the global index; never a real token id, so never matched


@dataclass(frozen=True, kw_only=True)
class SuffixConfig:
    """Suffix drafter knobs.

    Adaptive length: a longer match is stronger evidence that the old continuation repeats, so
    a path drafted after a match of `m` tokens is
        depth(m) = min(max_depth, depth_base + int(depth_per_match * m)).
    With the defaults a 1-token match drafts 3 tokens, an 8-token match 10, and 14+ tokens 16.
    """

    max_match: int = 32  # longest suffix looked up (tokens)
    min_match: int = 2  # shorter matches propose nothing
    max_depth: int = 16  # draft length cap (tokens below the root)
    max_nodes: int = 32  # tree size cap, root included
    max_candidates: int = 4  # distinct continuations merged into the tree
    depth_base: int = 2
    depth_per_match: float = 1.0
    scan_limit: int = 64  # n-gram positions examined per lookup, newest first

    def __post_init__(self) -> None:
        if self.max_match < 1 or not 1 <= self.min_match <= self.max_match:
            raise ValueError("need 1 <= min_match <= max_match")
        if self.max_depth < 1 or self.max_nodes < 2 or self.max_candidates < 1:
            raise ValueError("need max_depth >= 1, max_nodes >= 2, max_candidates >= 1")
        if self.depth_base < 0 or self.depth_per_match < 0 or self.scan_limit < 1:
            raise ValueError("need depth_base >= 0, depth_per_match >= 0, scan_limit >= 1")

    def depth(self, match_len: int) -> int:
        return max(1, min(self.max_depth, self.depth_base + int(self.depth_per_match * match_len)))


class SuffixIndex:
    """Incremental index of a token sequence: longest earlier suffix match and its occurrences.

    Tokens must be ints in [-2**31, 2**31). `extend` appends, `truncate` rolls back exactly (the
    index after truncate(n) answers like a fresh index built on the first n tokens).
    """

    def __init__(self, tokens: list[int] | None = None, *, max_match: int = 32,
                 scan_limit: int = 64) -> None:
        self.max_match = max_match
        self.scan_limit = scan_limit
        self.tokens: list[int] = []
        # SAM states: longest length, suffix link, transitions, first end position
        self._len, self._link, self._next, self._first = [0], [-1], [{}], [-1]
        self._last = 0
        self._undo: list[tuple[int, list[int], tuple[int, list[int]] | None]] = []
        self._grams: list[dict[int, list[int]]] = [{} for _ in _GRAM_LENS]
        if tokens:
            self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        for tok in tokens:
            self._add(int(tok))

    def truncate(self, num_tokens: int) -> None:
        """Cut back to the first `num_tokens` tokens by undoing the newest additions."""
        if not 0 <= num_tokens <= len(self.tokens):
            raise ValueError(f"cannot truncate {len(self.tokens)} tokens to {num_tokens}")
        while len(self.tokens) > num_tokens:
            self._pop()

    def _add(self, c: int) -> None:
        lens, link, nxt = self._len, self._link, self._next
        pos = len(self.tokens)
        self.tokens.append(c)
        cur = len(lens)
        lens.append(lens[self._last] + 1)
        link.append(0)
        nxt.append({})
        self._first.append(pos)
        p, added, clone_rec = self._last, [], None
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            added.append(p)
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if lens[p] + 1 == lens[q]:
                link[cur] = q
            else:  # split q: the clone takes the shorter strings that now end at pos too
                clone = len(lens)
                lens.append(lens[p] + 1)
                link.append(link[q])
                nxt.append(dict(nxt[q]))
                self._first.append(self._first[q])
                redirected = []
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    redirected.append(p)
                    p = link[p]
                link[q] = link[cur] = clone
                clone_rec = (q, redirected)
        self._undo.append((self._last, added, clone_rec))
        self._last = cur
        for k, grams in zip(_GRAM_LENS, self._grams):
            if pos + 1 >= k:
                grams.setdefault(self._gram_key(self.tokens, pos + 1, k), []).append(pos)

    def _pop(self) -> None:
        pos = len(self.tokens) - 1
        for k, grams in zip(_GRAM_LENS, self._grams):
            if pos + 1 >= k:
                key = self._gram_key(self.tokens, pos + 1, k)
                lst = grams[key]
                lst.pop()
                if not lst:
                    del grams[key]
        c = self.tokens.pop()
        prev_last, added, clone_rec = self._undo.pop()
        nxt, link = self._next, self._link
        if clone_rec is not None:
            q, redirected = clone_rec
            clone = len(self._len) - 1
            for p in redirected:
                nxt[p][c] = q
            link[q] = link[clone]
            self._drop_state()
        for p in added:
            del nxt[p][c]
        self._drop_state()
        self._last = prev_last

    def _drop_state(self) -> None:
        self._len.pop()
        self._link.pop()
        self._next.pop()
        self._first.pop()

    @staticmethod
    def _gram_key(seq: list[int], end: int, k: int) -> int:
        """Key of the k tokens ending just before `end`; collisions are caught by verification."""
        return seq[end - 1] if k == 1 else hash(tuple(seq[end - k:end]))

    def longest_match(self) -> tuple[int, int]:
        """(m, state): the longest suffix (<= max_match) that also ends before the last token."""
        n = len(self.tokens)
        want = min(self.max_match, n - 1)
        if want <= 0:
            return 0, 0
        v = 0
        for tok in self.tokens[n - want:]:
            v = self._next[v][tok]  # the suffix occurs (at the end), so the walk never fails
        m = want
        while v > 0 and self._first[v] >= n - 1:  # only the current occurrence: go shorter
            v = self._link[v]
            m = self._len[v]
        return (m, v) if v > 0 else (0, 0)

    def match_query(self, query: list[int]) -> tuple[int, int]:
        """(m, state): the longest suffix of `query` (<= max_match) occurring anywhere here."""
        v = m = 0
        for tok in query[-self.max_match:]:
            while v and tok not in self._next[v]:
                v = self._link[v]
                m = self._len[v]
            if tok in self._next[v]:
                v = self._next[v][tok]
                m += 1
        return m, v

    def occurrences(self, pattern: list[int], state: int, end_before: int, limit: int) -> list[int]:
        """End positions (< end_before) of `pattern`, newest first, at most `limit`.

        Scans at most `scan_limit` n-gram positions; the automaton's first occurrence of `state`
        (the class of `pattern`) is appended when not found by the scan, so a match always has
        at least one position.
        """
        m, seq = len(pattern), self.tokens
        i = max(j for j, k in enumerate(_GRAM_LENS) if k <= m)
        lst = self._grams[i].get(self._gram_key(pattern, m, _GRAM_LENS[i]), [])
        found: list[int] = []
        for e in reversed(lst[-self.scan_limit - 1:]):
            if e < end_before and e + 1 >= m and seq[e - m + 1:e + 1] == pattern:
                found.append(e)
                if len(found) >= limit:
                    return found
        first = self._first[state]
        if first not in found and 0 <= first < end_before:
            found.append(first)
        return found


def _read(seq: list[int], end: int, depth: int) -> list[int]:
    """Up to `depth` tokens after position `end`, cut at a separator.

    `seq` is the indexed history itself, so a read can never run past its end (the current
    position): there is no future in it to leak.
    """
    out = seq[end + 1:end + 1 + depth]
    return out[:out.index(_SEP)] if _SEP in out else out


def _rank(paths: list[list[int]], limit: int) -> list[list[int]]:
    """Distinct non-empty paths, the most frequent first token first, then the newest."""
    paths = [p for p in paths if p]
    votes = Counter(p[0] for p in paths)
    ranked = sorted(range(len(paths)), key=lambda i: -votes[paths[i][0]])  # stable: newest wins
    out: list[list[int]] = []
    for i in ranked:
        if paths[i] not in out:
            out.append(paths[i])
            if len(out) == limit:
                break
    return out


@dataclass
class SuffixStats:
    lookups: int = 0
    matches: int = 0
    match_tokens: int = 0  # sum of match lengths over matched lookups
    drafted_tokens: int = 0  # non-root nodes proposed

    @property
    def mean_match_len(self) -> float:
        return self.match_tokens / self.matches if self.matches else 0.0


class SuffixDrafter:
    """Drafter proposing what followed earlier occurrences of the history's longest suffix.

    `export_state()` returns None: the index is rebuilt from the session's tokens (well under a
    second per 100K tokens), which are the source of truth anyway.
    """

    name = "suffix"

    def __init__(self, config: SuffixConfig | None = None, *,
                 global_index: GlobalSuffixIndex | None = None) -> None:
        self.config = config or SuffixConfig()
        self.global_index = global_index
        self.index = SuffixIndex(max_match=self.config.max_match,
                                 scan_limit=self.config.scan_limit)
        self.stats = SuffixStats()

    def observe(self, tokens: list[int]) -> None:
        self.index.extend(tokens)

    def rollback(self, num_tokens: int) -> None:
        self.index.truncate(num_tokens)

    def export_state(self) -> DraftState | None:
        return None

    def import_state(self, state: DraftState) -> None:
        raise ValueError("the suffix drafter keeps no persisted state; rebuild it from tokens")

    def _sync(self, history: list[int]) -> None:
        """Follow `history` if the engine has not told us (cheap when it has)."""
        n = len(self.index)
        if n > len(history):
            self.index.truncate(len(history))
        elif n < len(history):
            self.index.extend(history[n:])
        if history and self.index.tokens[-1] != history[-1]:  # diverged: rebuild
            self.index.truncate(0)
            self.index.extend(history)

    def session_continuations(self) -> tuple[int, list[list[int]]]:
        """(match length, continuations newest first) from the session's own history."""
        idx, cfg = self.index, self.config
        m, state = idx.longest_match()
        if m == 0:
            return 0, []
        n = len(idx.tokens)
        ends = idx.occurrences(idx.tokens[n - m:], state, n - 1, 2 * cfg.max_candidates)
        return m, [_read(idx.tokens, e, cfg.depth(m)) for e in ends]

    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        cfg = self.config
        budget = min(max_nodes, cfg.max_nodes)
        self.stats.lookups += 1
        if budget < 2 or not history:
            return None
        self._sync(history)
        sources = [self.session_continuations()]
        if self.global_index is not None:
            sources.append(self.global_index.continuations(history, cfg.depth,
                                                           2 * cfg.max_candidates))
        sources = [(m, paths) for m, paths in sources if m >= cfg.min_match]
        sources.sort(key=lambda s: -s[0])  # stable: the session wins ties
        paths: list[list[int]] = []  # the longer match's paths first
        for _, ps in sources:
            paths += [p for p in _rank(ps, cfg.max_candidates) if p not in paths]
        paths = paths[:cfg.max_candidates]
        if not paths:
            return None
        tree = DraftTree.from_paths(history[-1], paths, source=self.name).truncated(budget)
        self.stats.matches += 1
        self.stats.match_tokens += sources[0][0]
        self.stats.drafted_tokens += len(tree) - 1
        return tree
