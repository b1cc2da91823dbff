"""LongSpec proposals replayed from CUDA graphs equal the same proposals run eagerly, for a tree
within the node budget and for one pruned to it, with either cross-attention kernel, while the
cross buffer grows, and for a draft reading the target's feature (tiny random-weight target, fp32; the real
model's graphed proposals: tests/gpu/test_gpu_smollm2.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("cross", ["sdpa", "triton"])
@pytest.mark.parametrize("widths,mlp_width,feature",
                         [((4, 3, 2, 2, 2, 2), None, False), ((4, 8, 8, 8), None, False),
                          ((4, 3, 2, 2, 2, 2), 250, False), ((4, 3, 2, 2, 2, 2), None, True)],
                         ids=["fits", "pruned", "wide-mlp", "feature"])
def test_graphed_proposals_equal_eager(tmp_path, widths, mlp_width, feature, cross):
    from lsrt.runtime.model import load_model
    from lsrt.runtime.runner import ModelRunner, RunnerConfig
    from lsrt.runtime.spec.longspec import LongSpecDrafter
    from lsrt.runtime.spec.longspec_layer import LongSpecConfig, init_from_target

    from tiny_models import make_tiny_model, perturb, repetitive_prompt

    make_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model(tmp_path, device="cuda"),
                         RunnerConfig(device="cuda", kv_budget_mb=16, block_size=8))
    draft = init_from_target(runner.model, LongSpecConfig(sink=4, window=16, mlp_width=mlp_width,
                                                          feature=feature))
    perturb(draft, 3)  # a draft that is not a copy of the last layer
    if feature:  # reads the target's feature, refreshed before every replay
        with torch.no_grad():
            draft.feat_w.normal_(generator=torch.Generator().manual_seed(4))
    graphed = LongSpecDrafter(runner, draft, widths=widths, cross_kernel=cross, cross_start=64)
    eager = LongSpecDrafter(runner, draft, widths=widths, use_graphs=False, cross_kernel=cross,
                            cross_start=64)
    assert graphed.use_graphs
    ids = repetitive_prompt(runner.cfg.vocab_size, 200, seed=5)
    seq = runner.new_sequence()
    try:
        done = 0
        for n in (60, 61, 150, 200):
            runner.prefill(seq, ids[done:n - 1])
            done = n - 1
            trees = set()
            for d in (graphed, eager):
                d.bind(seq)
                d.observe(ids[len(d.history):n])
                for _ in range(4):  # the 3rd use of a shape captures it, the 4th replays
                    t = d.propose(ids[:n], 16)
                    assert len(t) == min(16, 1 + sum(widths))
                    trees.add((tuple(t.tokens), tuple(t.parents)))
            assert len(trees) == 1, n
        assert graphed._graphs
    finally:
        seq.release()


def test_graph_runner_recaptures_for_tapped_layers(tmp_path):
    """A draft reading target layers (`feature_layers`) makes the runner tap them; the CUDA
    graph runner, captured before, recaptures at its next verify, and its graphed verify then
    returns the same wider rows (final hidden state, then the tapped layer) as the eager runner,
    which `commit` leaves on the sequence for the draft to read."""
    from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner
    from lsrt.runtime.model import load_model
    from lsrt.runtime.runner import ModelRunner, RunnerConfig
    from lsrt.runtime.spec.longspec import LongSpecDrafter
    from lsrt.runtime.spec.longspec_layer import LongSpecConfig, init_from_target

    from tiny_models import make_tiny_model, perturb, repetitive_prompt

    make_tiny_model("llama", tmp_path)
    eager = ModelRunner(load_model(tmp_path, device="cuda"),
                        RunnerConfig(device="cuda", kv_budget_mb=16, block_size=8))
    graphs = GraphRunner(eager, GraphConfig(sizes=(1, 2, 4, 8, 16)))
    h = eager.cfg.hidden_size
    draft = init_from_target(eager.model, LongSpecConfig(sink=4, window=16, feature=True,
                                                         feature_layers=(0,)))
    perturb(draft, 3)
    drafter = LongSpecDrafter(graphs, draft, widths=(4, 3, 2, 2, 2, 2))
    assert eager.feature_taps == (0,)
    ids = repetitive_prompt(eager.cfg.vocab_size, 120, seed=5)
    seq = graphs.new_sequence()
    try:
        graphs.prefill(seq, ids[:-1])
        drafter.bind(seq)
        drafter.observe(ids)
        history = list(ids)
        for _ in range(4):
            tree = drafter.propose(history, 16)
            want_logits = eager.verify(seq, tree)
            want = seq.tree_hidden.clone()
            got_logits = graphs.verify(seq, tree)
            assert seq.tree_hidden.shape == (len(tree), 2 * h)
            torch.testing.assert_close(seq.tree_hidden, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
            token = int(got_logits[0].argmax())
            graphs.commit(seq, [0])
            assert seq.current_feature().shape == (2 * h,)
            history.append(token)
            drafter.observe([token])
        assert graphs._taps == (0,)
    finally:
        seq.release()
