"""`auto` drafter: suffix matching when the history repeats itself, a model drafter otherwise,
and no speculation at all when drafting does not pay.

Per step: if the suffix index has a match, its tree is used (it costs nothing to build).
Otherwise the choice between the model drafter and plain decoding is made by measured
throughput: the wall time from one `propose` to the next is one whole step, and `observe` says
how many tokens it emitted, so each mode keeps an exponential average of tokens per second. The
slower mode is re-tried every `explore_every` steps so a change in context length (and with it
the balance of KV and weight reads) is noticed; each exploration that confirms the loser doubles
that interval (up to `max_explore_every`), so a drafter that never pays costs almost nothing.
"""

from __future__ import annotations

import time

from lsrt.runtime.spec.drafter import Drafter, DraftState
from lsrt.runtime.spec.tree import DraftTree


class AutoDrafter:
    name = "auto"

    def __init__(self, suffix: Drafter, model: Drafter | None, *, explore_every: int = 16,
                 max_explore_every: int = 1024, decay: float = 0.8,
                 clock=time.perf_counter) -> None:
        self.suffix, self.model = suffix, model
        self.explore_every, self.decay, self.clock = explore_every, decay, clock
        self.max_explore_every = max_explore_every
        self._explored: str | None = None  # the loser being re-tried this step
        self.rate: dict[str, float] = {}  # mode -> EMA tokens/s
        self.mode_counts: dict[str, int] = {"suffix": 0, "model": 0, "none": 0}
        self._last: tuple[str, float] | None = None  # (mode, propose time) of the open step
        self._steps = 0

    def bind(self, seq) -> None:
        for d in (self.suffix, self.model):
            if d is not None and hasattr(d, "bind"):
                d.bind(seq)

    def observe(self, tokens: list[int]) -> None:
        self.suffix.observe(tokens)
        if self.model is not None:
            self.model.observe(tokens)
        if self._last is not None:
            mode, t0 = self._last
            self._last = None
            if mode != "suffix":
                tps = len(tokens) / max(self.clock() - t0, 1e-9)
                old = self.rate.get(mode)
                self.rate[mode] = tps if old is None else self.decay * old + (1 - self.decay) * tps
                if self._explored == mode and self._best() != mode:
                    self.explore_every = min(2 * self.explore_every, self.max_explore_every)
            self._explored = None

    def rollback(self, num_tokens: int) -> None:
        self._last = None
        self.suffix.rollback(num_tokens)
        if self.model is not None:
            self.model.rollback(num_tokens)

    def _pick_model_or_none(self) -> str:
        if self.model is None:
            return "none"
        for mode in ("model", "none"):
            if mode not in self.rate:
                return mode
        best = self._best()
        if self._steps % self.explore_every == 0:
            self._explored = "none" if best == "model" else "model"
            return self._explored
        return best

    def _best(self) -> str:
        return max(("model", "none"), key=lambda m: self.rate.get(m, 0.0))

    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        self._steps += 1
        now = self.clock()
        tree = self.suffix.propose(history, max_nodes)
        if tree is not None and len(tree) > 1:
            mode = "suffix"
        else:
            mode = self._pick_model_or_none()
            tree = self.model.propose(history, max_nodes) if mode == "model" else None
        self.mode_counts[mode] += 1
        self._last = (mode, now)
        return tree

    def export_state(self) -> DraftState | None:
        return self.model.export_state() if self.model is not None else None

    def import_state(self, state: DraftState) -> None:
        if self.model is None:
            raise ValueError("auto without a model drafter keeps no state")
        self.model.import_state(state)
