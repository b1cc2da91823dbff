"""`auto` drafter: suffix matching when the history repeats itself, a model drafter where that
pays, and no speculation at all when drafting does not.

Each step falls in one of three situations, told apart by the suffix tree's depth (which grows
with the length of the suffix match), and in each the drafter picks an arm by measured
throughput:

    a long match (depth >= long_depth):  "suffix"  its tree alone
    a short match:                       "suffix"  its tree alone (free to build)
                                         "merged"  the suffix tree and the model's tree in one
                                                   budget
    no match:                            "model"   the model drafter's tree
                                         "none"    plain decoding

A long match keeps its tree alone: merging would cut a deep suffix path that is accepted many
tokens at a time to make room for a model tree that is accepted 2-3 (on SmolLM2's agent traces
suffix alone emitted 9-13 tokens per step after matches of 8+ tokens, merged 7-8; after
matches of 2-3 tokens the merged tree emitted 2.8-3.5 where suffix alone emitted 2.0-2.2:
`bench/auto_oracle.py`).

An arm's rating is (tokens per step) / (seconds per step), per situation. Seconds: the median
of its recent steps, timed from `propose` to `observe` (one slow step, e.g. a cross-buffer
resize, does not sink an arm). Tokens: *paired*, so that a stretch of repetitive or novel text
does not favour whichever arm happened to run during it — on a merged step, `observe` knows
what the suffix tree alone would have emitted (its longest path along the accepted tokens,
plus the bonus), so suffix and merged are compared on the same steps; a plain step always
emits one token, so the model is compared with it directly. An arm's first `warmup` steps are
not counted: a model drafter's first proposals fill its own cache and, on CUDA, capture its
graphs. The slower arm of a situation is re-tried every `explore_every` steps of that
situation so a change in context length (and with it the balance of KV and weight reads) is
noticed; each exploration that confirms the loser doubles that interval (up to
`max_explore_every`), so an arm that never pays costs almost nothing. Without a model drafter
the choice is fixed: suffix or none.

The model drafts with half the node budget, alone or merged (on a miss its full budget
emitted ~5-10% more tokens per step for ~60% more proposal time on an H100), except alone under
a cost-aware engine (`budget.py`), where its tree keeps only the nodes that pay for their
verification and stops drafting levels that could not; merging needs deterministic
trees (no draft probabilities), and the suffix tree keeps the rest of the budget, shared
prefixes counted once.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

from lsrt.runtime.spec.drafter import Drafter, DraftState
from lsrt.runtime.spec.tree import DraftTree

SITUATIONS = {"long": ("suffix",), "short": ("suffix", "merged"), "miss": ("model", "none")}
ONLY_SUFFIX = {"long": ("suffix",), "short": ("suffix",), "miss": ("model", "none")}


class AutoDrafter:
    name = "auto"

    def __init__(self, suffix: Drafter, model: Drafter | None, *, explore_every: int = 16,
                 max_explore_every: int = 1024, window: int = 8, warmup: int = 3,
                 merge: bool = True, long_depth: int = 6, clock=time.perf_counter) -> None:
        self.suffix, self.model = suffix, model
        self.arms = SITUATIONS if merge else ONLY_SUFFIX
        self.window, self.warmup, self.clock = window, warmup, clock
        self.long_depth = long_depth
        self.max_explore_every = max_explore_every
        self.explore_every = {s: explore_every for s in SITUATIONS}
        self._steps = {s: 0 for s in SITUATIONS}
        self._explored: str | None = None  # the loser being re-tried this step
        # (situation, arm) -> recent seconds per step
        self._costs: dict[tuple[str, str], deque[float]] = {}
        # situation -> (merged, suffix alone) tokens on merged steps
        self._pairs: dict[str, deque[tuple[int, int]]] = {}
        self._model_emitted: deque[int] = deque(maxlen=4 * window)
        self._runs: dict[str, int] = {}  # steps each arm has run (the first `warmup` uncounted)
        self._last: tuple | None = None  # (situation, arm, propose time, suffix tree)
        self.mode_counts: dict[str, int] = {"suffix": 0, "merged": 0, "model": 0, "none": 0}
        # "situation/arm" -> [steps, tokens emitted, seconds], every step counted (for reports)
        self.situation_stats: dict[str, list[float]] = {}

    @property
    def price(self):
        """The node price of a cost-aware engine, handed to the drafters that take one (the
        model drafter; `budget.py`)."""
        return getattr(self.model, "price", None)

    @price.setter
    def price(self, value) -> None:
        for d in (self.suffix, self.model):
            if d is not None and hasattr(d, "price"):
                d.price = value

    def bind(self, seq) -> None:
        for d in (self.suffix, self.model):
            if d is not None and hasattr(d, "bind"):
                d.bind(seq)

    def observe(self, tokens: list[int]) -> None:
        self.suffix.observe(tokens)
        if self.model is not None:
            self.model.observe(tokens)
        if self._last is not None:
            situation, arm, t0, suffix_tree = self._last
            self._last = None
            seconds = self.clock() - t0
            row = self.situation_stats.setdefault(f"{situation}/{arm}", [0, 0, 0.0])
            row[0] += 1
            row[1] += len(tokens)
            row[2] += seconds
            self._runs[arm] = self._runs.get(arm, 0) + 1
            if self._runs[arm] > self.warmup:
                self._record(situation, arm, seconds, tokens, suffix_tree)
        self._explored = None

    def _record(self, situation: str, arm: str, seconds: float, tokens: list[int],
                suffix_tree: DraftTree | None) -> None:
        self._costs.setdefault((situation, arm), deque(maxlen=self.window)).append(
            max(seconds, 1e-9))
        if arm == "merged":  # what the suffix tree alone would have emitted on this very step
            self._pairs.setdefault(situation, deque(maxlen=4 * self.window)).append(
                (len(tokens), 1 + (suffix_tree.accepted_length(tokens[:-1])
                                   if suffix_tree is not None else 0)))
        elif arm == "model":
            self._model_emitted.append(len(tokens))
        if self._explored == arm and self._best(situation) != arm:
            self.explore_every[situation] = min(2 * self.explore_every[situation],
                                                self.max_explore_every)

    @property
    def rate(self) -> dict[str, float]:
        """Expected tokens/s of every measured choice, as "situation/arm" (for reports)."""
        rates = {f"{s}/{arm}": self._rate(s, arm) for s, arms in self.arms.items()
                 if len(arms) > 1 for arm in arms}
        return {k: r for k, r in rates.items() if r is not None}

    def _rate(self, situation: str, arm: str) -> float | None:
        """Expected tokens per second of `arm` in `situation`, or None until it has been
        measured. Tokens per step of suffix vs merged come from the same (merged) steps, model
        vs none likewise, so a stretch of easy or hard text does not favour whichever arm ran
        during it."""
        costs = self._costs.get((situation, arm))
        if not costs:
            return None
        cost = statistics.median(costs)
        if arm == "none":
            return 1.0 / cost
        if arm == "model":
            return statistics.fmean(self._model_emitted) / cost if self._model_emitted else None
        pairs = self._pairs.get(situation)
        if not pairs:
            return None
        col = 0 if arm == "merged" else 1
        return statistics.fmean(p[col] for p in pairs) / cost

    def rollback(self, num_tokens: int) -> None:
        self._last = None
        self.suffix.rollback(num_tokens)
        if self.model is not None:
            self.model.rollback(num_tokens)

    def _best(self, situation: str) -> str:
        return max(self.arms[situation], key=lambda arm: self._rate(situation, arm) or 0.0)

    def _choose(self, situation: str) -> str:
        arms = self.arms[situation]
        if self.model is None or len(arms) == 1:
            return arms[0] if situation != "miss" else "none"
        self._steps[situation] += 1
        unrated = [arm for arm in arms if self._rate(situation, arm) is None]
        if unrated:  # gather data: an arm not yet measured here (the least-run of them; an
            # arm's runs in other situations, e.g. suffix after long matches, rate nothing here)
            return min(unrated, key=lambda arm: self._runs.get(arm, 0))
        best = self._best(situation)
        if self._steps[situation] % self.explore_every[situation] == 0:
            self._explored = arms[1] if best == arms[0] else arms[0]
            return self._explored
        return best

    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        now = self.clock()
        tree = suffix_tree = self.suffix.propose(history, max_nodes)
        if tree is None or len(tree) < 2:
            situation = "miss"
        else:
            situation = "long" if max(tree.depth) >= self.long_depth else "short"
        arm = self._choose(situation)
        if arm == "merged":
            tree = self._merged(tree, history, max_nodes)
        elif arm == "model":
            # priced, the model's tree keeps what pays for itself: it may use the full budget
            tree = self.model.propose(history, max_nodes if self.price is not None
                                      else max(2, max_nodes // 2))
        elif arm == "none":
            tree = None
        self.mode_counts[arm] += 1
        self._last = (situation, arm, now, suffix_tree)
        return tree

    def _merged(self, suffix_tree: DraftTree, history: list[int], max_nodes: int
                ) -> DraftTree:
        model_tree = self.model.propose(history, max(2, max_nodes // 2))
        if model_tree is None or len(model_tree) < 2:
            return suffix_tree
        if any(p is not None for p in model_tree.draft_probs):
            return model_tree  # a sampling drafter's tree keeps its probabilities whole
        budget = max_nodes - len(model_tree) + 1  # suffix nodes first, the model's after
        head = suffix_tree.truncated(max(1, budget)) if len(suffix_tree) > budget else suffix_tree
        return DraftTree.merged([head, model_tree], max_nodes, source="merged")

    def export_state(self) -> DraftState | None:
        return self.model.export_state() if self.model is not None else None

    def import_state(self, state: DraftState) -> None:
        if self.model is None:
            raise ValueError("auto without a model drafter keeps no state")
        self.model.import_state(state)

