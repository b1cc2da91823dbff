"""Cost-aware trees (runtime/spec/budget.py): the verify-cost fit, its exploration, and the
engine handing prices to a drafter, with the output unchanged."""

from __future__ import annotations

import math

import pytest

from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.budget import NodePrice, VerifyCosts
from lsrt.runtime.spec.engine import Engine
from lsrt.runtime.spec.suffix import SuffixDrafter

from tiny_models import copy_tokenizer, make_tiny_model, repetitive_prompt


def test_fit_recovers_the_line_and_ignores_outliers_by_median() -> None:
    costs = VerifyCosts(window=5)
    for n in (1, 4, 13):
        for _ in range(4):
            costs.record(2500, n, 0.040 + 0.007 * n)
        costs.record(2500, n, 5.0)  # one slow step per size (a page-in, another process)
    a, b = costs.fit(2500)
    assert a == pytest.approx(0.040) and b == pytest.approx(0.007)
    assert costs.fit(4000) == costs.fit(2500)  # the same bucket (2048..4095)
    assert costs.fit(5000) is None  # another bucket: nothing measured there


def test_fit_never_prices_a_node_below_zero() -> None:
    costs = VerifyCosts()
    costs.record(100, 1, 0.02)
    costs.record(100, 16, 0.01)  # a GPU: larger trees can even time faster
    assert costs.fit(100)[1] == 0.0


def test_price_explores_both_ends_then_prices_from_the_fit() -> None:
    costs = VerifyCosts(explore_every=4)
    assert costs.price(300, 0.0, 0) is None  # nothing known: the full budget
    costs.record(300, 16, 0.16)
    assert costs.price(300, 0.0, 0) == NodePrice.plain()  # one size: time a plain step
    costs.record(300, 1, 0.01)
    assert costs.price(300, 0.0, 0) == NodePrice(node_s=0.01, token_s=0.01)  # a + b, plain
    assert costs.price(300, 0.0, 0) is None  # the 4th call of the bucket explores
    price = costs.price(300, 0.5, 25)  # 20 ms a token so far
    assert price.node_s == pytest.approx(0.01) and price.token_s == pytest.approx(0.02)
    assert price.floor() == pytest.approx(0.5)
    assert price.floor(0.01) == pytest.approx(1.0)
    assert NodePrice.plain().floor() == math.inf


def test_price_starts_with_plain_when_only_plain_steps_were_timed() -> None:
    costs = VerifyCosts()
    costs.record(50, 1, 0.01)
    assert costs.price(50, 0.0, 0) is None  # the other end: a full tree


class Recorder:
    """A suffix drafter that notes the prices it was handed."""

    name = "recorder"

    def __init__(self) -> None:
        self.inner, self.price, self.prices = SuffixDrafter(), None, []

    def observe(self, tokens):
        self.inner.observe(tokens)

    def rollback(self, n):
        self.inner.rollback(n)

    def propose(self, history, max_nodes):
        self.prices.append(self.price)
        return self.inner.propose(history, max_nodes)

    def export_state(self):
        return None

    def import_state(self, state):
        raise ValueError("none")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("budget")
    make_tiny_model("llama", path)
    copy_tokenizer(smollm2_dir, path)
    return LLM(path, RunnerConfig(kv_budget_mb=16, prefill_chunk=64, block_size=8))


@pytest.mark.parametrize("cost_aware", [True, False])
def test_engine_prices_drafters_only_when_cost_aware(tiny, cost_aware):
    engine = Engine(tiny.runner, tiny.tokenizer, tiny.eos_ids, cost_aware=cost_aware)
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 80, seed=5)
    seq = tiny.runner.new_sequence()
    try:
        tiny.runner.prefill(seq, ids[:-1])
        drafter = Recorder()
        drafter.price = NodePrice.plain()  # left by another, cost-aware engine
        drafter.observe(ids)
        engine.generate(seq, list(ids), SamplingParams(max_tokens=20), drafter=drafter)
    finally:
        seq.release()
    sizes = engine.verify_costs._times[(len(ids) - 1).bit_length()]
    assert sum(len(t) for t in sizes.values()) == len(drafter.prices)  # every verify timed
    if not cost_aware:
        assert drafter.prices == [None] * len(drafter.prices)
        return
    assert drafter.prices[0] is None and drafter.prices[1] == NodePrice.plain()
    priced = [p for p in drafter.prices[2:] if p is not None]
    assert priced and all(math.isfinite(p.node_s) and p.token_s > 0 for p in priced)


def test_config_resolves_the_tree_budget():
    assert RunnerConfig().cost_aware_trees  # the CPU
    assert not RunnerConfig(device="cuda").cost_aware_trees
    assert RunnerConfig(device="cuda", tree_budget="cost").cost_aware_trees
    assert not RunnerConfig(tree_budget="full").cost_aware_trees
    with pytest.raises(ValueError, match="tree_budget"):
        RunnerConfig(tree_budget="some")
