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
