"""AutoDrafter's mode choice: suffix when it matches, else the faster of model / none by
measured throughput, with exploration that backs off when the loser keeps losing."""

from __future__ import annotations

from lsrt.runtime.spec.auto import AutoDrafter
from lsrt.runtime.spec.tree import DraftTree


class Fixed:
    """A drafter that proposes a fixed tree (or nothing) and counts calls."""

    def __init__(self, name: str, tree: DraftTree | None) -> None:
        self.name, self.tree, self.calls = name, tree, 0

    def observe(self, tokens):
        pass

    def rollback(self, n):
        pass

    def propose(self, history, max_nodes):
        self.calls += 1
        return self.tree

    def export_state(self):
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(auto: AutoDrafter, clock: Clock, steps: int, cost: dict[str, float],
          emitted: dict[str, int]) -> list[str]:
    modes = []
    for _ in range(steps):
        before = dict(auto.mode_counts)
        auto.propose([1, 2, 3], 16)
        mode = next(m for m in auto.mode_counts if auto.mode_counts[m] != before[m])
        modes.append(mode)
        clock.t += cost[mode]
        auto.observe([0] * emitted[mode])
    return modes


def test_suffix_match_wins_without_measurement():
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", DraftTree.chain(3, [4, 5])), Fixed("m", None),
                       clock=clock)
    assert drive(auto, clock, 5, {"suffix": 1, "model": 1, "none": 1},
                 {"suffix": 3, "model": 1, "none": 1}) == ["suffix"] * 5


def test_slow_model_drafter_is_turned_off_and_explored_ever_less():
    clock = Clock()
    model = Fixed("m", DraftTree.chain(3, [4]))
    auto = AutoDrafter(Fixed("suffix", None), model, explore_every=4, clock=clock)
    # The model drafter emits 2 tokens per step but costs 10x a plain step.
    modes = drive(auto, clock, 400, {"model": 10.0, "none": 1.0, "suffix": 1.0},
                  {"model": 2, "none": 1, "suffix": 1})
    assert modes.count("none") > 0.9 * len(modes)
    assert auto.explore_every > 4  # backed off
    late = modes[200:]
    assert late.count("model") <= 2


def test_fast_model_drafter_is_kept():
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", None), Fixed("m", DraftTree.chain(3, [4, 5])),
                       explore_every=4, clock=clock)
    modes = drive(auto, clock, 200, {"model": 1.2, "none": 1.0, "suffix": 1.0},
                  {"model": 3, "none": 1, "suffix": 1})
    assert modes[50:].count("model") > 0.85 * len(modes[50:])
