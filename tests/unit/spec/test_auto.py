"""AutoDrafter's arm choice by measured throughput: suffix vs merged (suffix + model) after a
short suffix match, suffix alone after a long one, model vs none when nothing matches, with
exploration that backs off when the loser keeps losing; and the merged tree itself."""

from __future__ import annotations

import pytest

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
        self.max_nodes = max_nodes
        return self.tree(self.calls) if callable(self.tree) else self.tree

    def export_state(self):
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(auto: AutoDrafter, clock: Clock, steps: int, cost, emitted) -> list[str]:
    """Run `steps` steps; each costs `cost[mode]` seconds and emits `emitted[mode]` tokens
    (a count of zeros, or a token list). `cost` and `emitted` may be functions of the mode."""
    modes = []
    for _ in range(steps):
        before = dict(auto.mode_counts)
        auto.propose([1, 2, 3], 16)
        mode = next(m for m in auto.mode_counts if auto.mode_counts[m] != before[m])
        modes.append(mode)
        clock.t += cost(mode) if callable(cost) else cost[mode]
        out = emitted(mode) if callable(emitted) else emitted[mode]
        auto.observe([0] * out if isinstance(out, int) else out)
    return modes


def test_without_a_model_the_choice_is_fixed():
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", DraftTree.chain(3, [4, 5])), None, clock=clock)
    assert drive(auto, clock, 5, {"suffix": 1}, {"suffix": 3}) == ["suffix"] * 5
    auto = AutoDrafter(Fixed("suffix", None), None, clock=clock)
    assert drive(auto, clock, 5, {"none": 1}, {"none": 1}) == ["none"] * 5


@pytest.mark.parametrize("merged_emits, merged_cost, winner", [
    ([4, 5, 6], 1.1, "suffix"),     # the model's part never helps: suffix alone emits as much
    ([9, 9, 9, 7], 1.1, "merged"),  # the model's path is accepted: 4 tokens vs suffix's 1
    ([9, 9, 9, 7], 5.0, "suffix"),  # ... but at 5x the cost it does not pay
])
def test_match_picks_suffix_or_merged_on_paired_steps(merged_emits, merged_cost, winner):
    """Suffix vs merged is judged on the same (merged) steps: what suffix alone would have
    emitted there is read off the accepted tokens, whatever suffix-only steps emitted."""
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", DraftTree.chain(3, [4, 5])),
                       Fixed("m", DraftTree.chain(3, [9, 9, 9])), explore_every=4, clock=clock)
    # Suffix-only steps emit 3 tokens (easy text happened to fall on them).
    modes = drive(auto, clock, 300, lambda m: merged_cost if m == "merged" else 1.0,
                  lambda m: merged_emits if m == "merged" else [4, 5, 6])
    assert set(modes) == {"suffix", "merged"}  # a match never falls back to model / none
    assert modes[100:].count(winner) > 0.85 * len(modes[100:]), auto.rate


def test_long_matches_keep_the_suffix_tree_whole():
    """Merging wins after short matches here, but a long match (a deep suffix tree) is never
    merged: the model's half of the budget would cut the deep path."""
    clock = Clock()
    short, long = DraftTree.chain(3, [4, 5]), DraftTree.chain(3, [4, 5, 6, 7, 8, 9, 10])
    suffix = Fixed("suffix", lambda call: long if call % 3 == 0 else short)
    model = Fixed("m", DraftTree.chain(3, [9, 9, 9]))
    auto = AutoDrafter(suffix, model, explore_every=4, clock=clock)
    seen: list[tuple[bool, str]] = []

    def cost(mode):
        seen.append((suffix.calls % 3 == 0, mode))
        return 1.1 if mode == "merged" else 1.0

    drive(auto, clock, 300, cost, lambda m: [9, 9, 9, 7] if m == "merged" else [4, 5, 6])
    assert {m for is_long, m in seen if is_long} == {"suffix"}
    late_short = [m for is_long, m in seen[100:] if not is_long]
    assert late_short.count("merged") > 0.85 * len(late_short), auto.rate
    assert model.max_nodes == 8  # the model drafts with half the budget
    assert set(auto.rate) == {"short/suffix", "short/merged"}


def test_slow_model_drafter_is_turned_off_and_explored_ever_less():
    clock = Clock()
    model = Fixed("m", DraftTree.chain(3, [4]))
    auto = AutoDrafter(Fixed("suffix", None), model, explore_every=4, clock=clock)
    # The model drafter emits 2 tokens per step but costs 10x a plain step.
    modes = drive(auto, clock, 400, {"model": 10.0, "none": 1.0, "suffix": 1.0},
                  {"model": 2, "none": 1, "suffix": 1})
    assert modes.count("none") > 0.9 * len(modes)
    assert auto.explore_every["miss"] > 4  # backed off
    late = modes[200:]
    assert late.count("model") <= 2


def test_fast_model_drafter_is_kept():
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", None), Fixed("m", DraftTree.chain(3, [4, 5])),
                       explore_every=4, clock=clock)
    modes = drive(auto, clock, 200, {"model": 1.2, "none": 1.0, "suffix": 1.0},
                  {"model": 3, "none": 1, "suffix": 1})
    assert modes[50:].count("model") > 0.85 * len(modes[50:])
    assert auto.model.max_nodes == 8  # half of the step's budget of 16


def test_merged_tree_proposal_shares_prefixes_within_budget():
    clock = Clock()
    suffix = Fixed("suffix", DraftTree.from_paths(3, [[4, 5, 6, 7], [8]]))
    model = Fixed("m", DraftTree.from_paths(3, [[4, 5, 9], [10]]))
    auto = AutoDrafter(suffix, model, clock=clock)
    tree = auto._merged(suffix.tree, [1, 2, 3], 16)
    assert tree.source == "merged"
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))
             if not tree.children[n]}
    assert paths == {(4, 5, 6, 7), (8,), (4, 5, 9), (10,)}
    assert len(tree) == 1 + 4 + 1 + 1 + 1  # 4 and 5 stored once


def test_draft_tree_merged_budget_and_errors():
    a = DraftTree.from_paths(1, [[2, 3, 4, 5]])
    b = DraftTree.from_paths(1, [[2, 6], [7]])
    m = DraftTree.merged([a, b], 6)
    assert m.tokens == [1, 2, 3, 4, 5, 6] and m.parents == [-1, 0, 1, 2, 3, 1]
    assert len(DraftTree.merged([a, b], 100)) == 7
    assert DraftTree.merged([a], 3).tokens == [1, 2, 3]
    with pytest.raises(ValueError):
        DraftTree.merged([a, DraftTree.chain(9, [2])], 8)


@pytest.mark.parametrize("warmup", [1, 3])
def test_an_arms_first_steps_are_not_measured(warmup):
    """Slow first steps (a drafter filling its cache, capturing its graphs) and a later
    outlier do not bench a fast arm."""
    clock = Clock()
    auto = AutoDrafter(Fixed("suffix", None), Fixed("m", DraftTree.chain(3, [4, 5])),
                       explore_every=1000, warmup=warmup, clock=clock)
    calls = {"model": 0}

    def cost_model():
        calls["model"] += 1
        return 50.0 if calls["model"] <= warmup or calls["model"] == 8 else 1.2

    modes = drive(auto, clock, 40, lambda m: cost_model() if m == "model" else 1.0,
                  {"model": 3, "none": 1})
    n = warmup + 1
    assert sorted(modes[:2 * n]) == ["model"] * n + ["none"] * n  # both warmed up and measured
    assert modes[2 * n:].count("model") == 40 - 2 * n  # the 8th model step's outlier is ignored


def test_short_matches_try_suffix_alone_even_after_many_long_ones():
    """Suffix steps after long matches do not rate suffix after short ones: the arm never
    measured in a situation is tried there first (choosing the least-run arm overall kept
    merging after every short match, 82 of 132 on the H100's SWE-agent set)."""
    clock = Clock()
    short, long = DraftTree.chain(3, [4, 5]), DraftTree.chain(3, [4, 5, 6, 7, 8, 9, 10])
    suffix = Fixed("suffix", lambda call: long if call % 3 else short)  # 2 long : 1 short
    auto = AutoDrafter(suffix, Fixed("m", DraftTree.chain(3, [9, 9, 9])), explore_every=8,
                       clock=clock)
    seen: list[tuple[bool, str]] = []

    def cost(mode):
        seen.append((suffix.calls % 3 != 0, mode))
        return 3.0 if mode == "merged" else 1.0

    drive(auto, clock, 300, cost, lambda m: [4, 5, 6])  # the model's part: never accepted
    late_short = [m for is_long, m in seen[100:] if not is_long]
    assert late_short.count("suffix") > 0.8 * len(late_short), auto.rate


def test_a_price_reaches_both_drafters_and_frees_the_models_budget():
    from lsrt.runtime.spec.budget import NodePrice

    suffix, model = Fixed("suffix", None), Fixed("model", DraftTree.chain(3, [4, 5]))
    suffix.price = model.price = None
    auto = AutoDrafter(suffix, model, warmup=0)
    auto.propose([1, 2, 3], 16)  # a miss, the model arm first (unrated)
    assert model.max_nodes == 8  # unpriced: half the budget
    price = NodePrice(node_s=0.01, token_s=0.05)
    auto.price = price
    assert model.price is price and auto.price is price
    assert suffix.price is price  # any drafter of auto's that takes a price gets it
    calls = model.calls
    while model.calls == calls:  # the next model step (the plain arm is tried in between)
        auto.observe([4, 9])
        auto.propose([1, 2, 3], 16)
    assert model.max_nodes == 16  # priced: the model's tree keeps what pays, from all 16
    auto.price = None
    assert suffix.price is None and model.price is None
