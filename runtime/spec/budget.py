"""Cost-aware draft trees: a drafted node is verified only where it pays for itself.

A verify of an n-node tree costs about a + b·n seconds at a given context length: on a GPU b is
close to 0 up to a few dozen nodes (the step reads weights, not FLOPs), on a CPU it is not (a
13-node verify of SmolLM2-135M at 2.5K tokens of context costs 2.6 plain steps). One more node,
accepted with probability p, adds p tokens for b seconds; it raises the throughput E/T of a
step (E tokens in T seconds) when p / b > E / T, that is when

    p > b · (T / E) = node_s / token_s          (the node's *floor*)

`VerifyCosts` (one per engine) measures a and b per context-length bucket from the verifies the
engine times; the engine hands a drafter that has a `price` attribute a `NodePrice` before each
proposal, and the drafter keeps the nodes whose estimated acceptance probability clears the
floor (LongSpec: the product of draft probabilities along the node's path, corrected by how
often its trees were really accepted; see `longspec.py`). A drafter also stops drafting deeper
levels once no node of a level could clear the floor plus its own cost per level.

Learning b needs trees of different sizes: the first verify of a bucket uses the full budget,
the second is a plain step (`NodePrice.plain`), and every `explore_every`-th step of a bucket
after that uses the full budget again, so that the large sizes stay measured as the context
grows.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class NodePrice:
    """What a tree node must be worth to be verified."""

    node_s: float  # marginal verify seconds of one more node (inf: verify no draft at all)
    token_s: float  # seconds per emitted token so far (the throughput a node must beat)

    @classmethod
    def plain(cls) -> "NodePrice":
        """A price no node clears: the step verifies the root alone (a measurement of n = 1)."""
        return cls(node_s=math.inf, token_s=1.0)

    def floor(self, extra_s: float = 0.0) -> float:
        """The acceptance probability above which a node that costs `node_s + extra_s` more
        seconds raises the throughput."""
        return (self.node_s + extra_s) / self.token_s


def _bucket(context: int) -> int:
    """Context lengths within a factor of two share a cost model (attention grows with it)."""
    return max(0, context).bit_length()


class VerifyCosts:
    """Seconds of a target verify by tree size, per context-length bucket: for each size the
    median of its last `window` timings, and a line a + b·n through them weighted by how often
    each size was measured. Thread-safe (one per engine, shared by its sessions)."""

    def __init__(self, *, window: int = 8, explore_every: int = 64) -> None:
        self.window, self.explore_every = window, explore_every
        self._times: dict[int, dict[int, deque[float]]] = {}
        self._steps: dict[int, int] = {}
        self._lock = threading.Lock()

    def record(self, context: int, nodes: int, seconds: float) -> None:
        with self._lock:
            sizes = self._times.setdefault(_bucket(context), {})
            sizes.setdefault(nodes, deque(maxlen=self.window)).append(seconds)

    def _points(self, bucket: int) -> list[tuple[int, float, int]]:
        """(size, median seconds, timings) of every size timed in `bucket`; the lock held."""
        return [(n, statistics.median(t), len(t))
                for n, t in self._times.get(bucket, {}).items()]

    def fit(self, context: int) -> tuple[float, float] | None:
        """(a, b) of the bucket of `context`, or None until two tree sizes were timed."""
        with self._lock:
            points = self._points(_bucket(context))
        return _line(points) if len(points) >= 2 else None

    def price(self, context: int, spent_s: float, emitted: int) -> NodePrice | None:
        """The price for the next proposal at `context` tokens, after `emitted` tokens in
        `spent_s` seconds of this generation; None: draft with the full budget (nothing known
        yet, or an exploration step)."""
        bucket = _bucket(context)
        with self._lock:
            step = self._steps[bucket] = self._steps.get(bucket, 0) + 1
            points = self._points(bucket)
        if not points:
            return None
        if len(points) == 1:  # one size known: time the other end
            return NodePrice.plain() if points[0][0] > 1 else None
        if step % self.explore_every == 0:
            return None
        a, b = _line(points)
        token_s = spent_s / emitted if emitted else a + b  # before any step: plain decoding's
        return NodePrice(node_s=b, token_s=max(token_s, 1e-9))


def _line(points: list[tuple[int, float, int]]) -> tuple[float, float]:
    """(a, b) of the least-squares line a + b·n through (n, seconds) weighted by counts (two
    sizes or more); neither below 0."""
    w = sum(c for _, _, c in points)
    n_mean = sum(n * c for n, _, c in points) / w
    t_mean = sum(t * c for _, t, c in points) / w
    var = sum(c * (n - n_mean) ** 2 for n, _, c in points)
    b = max(0.0, sum(c * (n - n_mean) * (t - t_mean) for n, t, c in points) / var)
    return max(0.0, t_mean - b * n_mean), b
