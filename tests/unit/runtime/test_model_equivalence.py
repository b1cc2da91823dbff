"""The own decoder matches transformers (float32, CPU) for every supported family."""

from __future__ import annotations

import pytest
import torch

from lsrt.kernels.linear import linear_name, onednn_available
from lsrt.runtime.model import load_model
from lsrt.runtime.runner import ModelRunner, RunnerConfig
from lsrt.runtime.spec.tree import DraftTree

from tiny_models import FAMILIES, make_tiny_model

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(request.param, path)
    return hf, path


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def runner_for(path, attention="sdpa", chunk=4, budget_mb=8, block_size=4,
               linear="auto") -> ModelRunner:
    model = load_model(path)
    return ModelRunner(model, RunnerConfig(attention=attention, prefill_chunk=chunk,
                                           kv_budget_mb=budget_mb, block_size=block_size,
                                           linear=linear))


def decode(runner, seq, token) -> torch.Tensor:
    logits = runner.verify(seq, DraftTree.chain(token, []))
    runner.commit(seq, [0])
    return logits[0]


@pytest.mark.parametrize("attention,linear", [("sdpa", "torch"), ("sdpa", "onednn"),
                                              ("hybrid", "auto")])
def test_pieces_and_decode_match_transformers(pair, attention, linear):
    if linear == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    hf, path = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (40,), generator=g).tolist()
    ref = hf_logits(hf, ids)
    runner = runner_for(path, attention, linear=linear)
    assert linear == "auto" or linear_name(runner.model.linear) == linear
    seq = runner.new_sequence()
    # Three prefill pieces (multi-chunk each: chunk=4) with decode steps between them.
    pos = 0
    for piece, decodes in ((13, 2), (9, 3), (7, 0)):
        last = runner.prefill(seq, ids[pos:pos + piece], want_logits=True)
        pos += piece
        assert (last - ref[pos - 1]).abs().max() < TOL
        for _ in range(decodes):
            out = decode(runner, seq, ids[pos])
            assert (out - ref[pos]).abs().max() < TOL
            pos += 1
    for _ in range(40 - pos):
        out = decode(runner, seq, ids[pos])
        assert (out - ref[pos]).abs().max() < TOL
        pos += 1
    assert seq.num_tokens == 40


def test_incremental_prefill_equals_full_prefill(pair):
    _, path = pair
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    full_runner = runner_for(path, chunk=512)
    full = full_runner.prefill(full_runner.new_sequence(), ids, want_logits=True)
    runner = runner_for(path, chunk=5)
    seq = runner.new_sequence()
    runner.prefill(seq, ids[:20])
    decode(runner, seq, ids[20])
    runner.prefill(seq, ids[21:37])
    decode(runner, seq, ids[37])
    last = runner.prefill(seq, ids[38:], want_logits=True)
    assert (last - full).abs().max() < TOL


@pytest.mark.parametrize("attention", ["sdpa", "hybrid"])
def test_tree_verify_matches_sequential_paths(pair, attention):
    """Logits at every tree node equal decoding that node's path one token at a time."""
    hf, path = pair
    ids = torch.randint(0, 96, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    tree = DraftTree.from_paths(ids[-1], [[5, 6, 7], [5, 8], [9, 10, 11, 12], [13]])
    runner = runner_for(path, attention)
    seq = runner.new_sequence()
    runner.prefill(seq, ids[:-1])
    logits = runner.verify(seq, tree)
    for node in range(len(tree)):
        toks = ids[:-1] + [tree.tokens[i] for i in tree.path_to(node)]
        ref = hf_logits(hf, toks)[-1]
        assert (logits[node] - ref).abs().max() < TOL, node
    # Commit the path root -> 9 -> 10 and check the next step continues correctly.
    target = tree.path_to(tree.tokens.index(10))
    runner.commit(seq, target)
    nxt = decode(runner, seq, 99 - 3)
    ref = hf_logits(hf, ids[:-1] + [ids[-1], 9, 10, 96])[-1]
    assert (nxt - ref).abs().max() < TOL


def test_fragmented_blocks_gather_path(pair):
    """A sequence whose blocks are not consecutive reads its KV by gather, same logits."""
    hf, path = pair
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = runner_for(path)
    filler = runner.new_sequence()
    seq = runner.new_sequence()
    for i in range(0, 30, 4):  # interleave allocations so seq's blocks are fragmented
        filler.reserve(filler.capacity + 4)
        runner.prefill(seq, ids[i:i + 4])
    assert runner_for  # silence linters about unused helper
    assert seq.contiguous_span(seq.num_tokens) is None
    out = decode(runner, seq, 7)
    ref = hf_logits(hf, ids + [7])[-1]
    assert (out - ref).abs().max() < TOL


def test_tapped_layers_are_transformers_hidden_states(pair):
    """`forward(taps=...)`: the final hidden states first, unchanged, then each tapped layer's
    residual stream (transformers' `hidden_states[i + 1]`) RMS-normalised without a weight; the
    logits read the first block only. What a multi-layer LongSpec feature is built from."""
    from lsrt.runtime.training.longspec_train import target_last_kv

    hf, path = pair
    model = load_model(path)
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(24)
    h = model.cfg.hidden_size
    _, _, plain = target_last_kv(model, ids, pos)
    _, _, tapped = target_last_kv(model, ids, pos, taps=(0, 1))
    assert tapped.shape == (24, 3 * h)
    assert torch.equal(tapped[:, :h], plain)
    assert torch.equal(model.logits(tapped), model.logits(plain))
    with torch.no_grad():
        states = hf(ids[None], output_hidden_states=True).hidden_states
    # transformers' last hidden state is already normed: compare the first layer's tap
    x = states[1][0].float()
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.rms_norm_eps)
    assert (tapped[:, h:2 * h] - want).abs().max() < TOL
    for block in (1, 2):  # unit RMS
        assert tapped[:, block * h:(block + 1) * h].pow(2).mean(-1).sub(1).abs().max() < 1e-3
