"""The model runner through the Triton kernels equals the SDPA path (on CUDA where there is a
device, else on the CPU through Triton's interpreter; fp32 both ways)."""

from __future__ import annotations

import pytest
import torch

from lsrt.runtime.model import load_model
from lsrt.runtime.runner import ModelRunner, RunnerConfig
from lsrt.runtime.spec.tree import DraftTree

from tiny_models import make_tiny_model

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton launches need device tensors


def test_prefill_verify_commit_match_sdpa(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    ids = torch.randint(0, 96, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    tree = DraftTree.from_paths(ids[-1], [[3, 4, 5], [3, 6], [7]])
    outs = {}
    for attention in ("sdpa", "triton"):
        runner = ModelRunner(load_model(tmp_path, device=DEVICE), RunnerConfig(
            attention=attention, kv_budget_mb=4, block_size=4, prefill_chunk=8, device=DEVICE))
        seq = runner.new_sequence()
        first = runner.prefill(seq, ids[:-1], want_logits=True)
        logits = runner.verify(seq, tree)
        runner.commit(seq, tree.path_to(2))
        after = runner.verify(seq, DraftTree.chain(9, []))
        outs[attention] = (first, logits, after)
    for a, b in zip(outs["sdpa"], outs["triton"]):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_triton_elementwise_ops_match_torch(tmp_path, arch):
    """The whole runner with Triton norms / RoPE + KV write / SiLU-mul equals the torch ops
    (qkv bias: qwen2; per-head q/k norms: qwen3), and so does a LongSpec draft's proposal."""
    from lsrt.runtime.spec.longspec import LongSpecDrafter
    from lsrt.runtime.spec.longspec_layer import init_from_target

    make_tiny_model(arch, tmp_path)
    ids = torch.randint(0, 96, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    tree = DraftTree.from_paths(ids[-1], [[3, 4, 5], [3, 6], [7]])
    outs = {}
    for ops in ("torch", "triton"):
        model = load_model(tmp_path, device=DEVICE)
        runner = ModelRunner(model, RunnerConfig(elementwise=ops, kv_budget_mb=4, block_size=4,
                                                 prefill_chunk=8, device=DEVICE))
        assert model.ops.name == ops
        seq = runner.new_sequence()
        first = runner.prefill(seq, ids[:-1], want_logits=True)
        logits = runner.verify(seq, tree)
        runner.commit(seq, tree.path_to(2))
        drafter = LongSpecDrafter(runner, init_from_target(model), widths=(2, 2, 1),
                                  use_graphs=False)
        history = ids + [tree.tokens[1], tree.tokens[2], 9]  # the bonus token pending
        drafter.observe(history)
        drafter.bind(seq)
        proposal = drafter.propose(history, 8)
        outs[ops] = (first, logits, proposal.tokens, proposal.parents)
    for a, b in zip(outs["torch"][:2], outs["triton"][:2]):
        assert (a - b).abs().max() < 1e-4
    assert outs["torch"][2:] == outs["triton"][2:]


def test_longspec_triton_cross_attention_matches_sdpa(tmp_path):
    """A LongSpec draft's cross-attention through the split-K graph kernel (the target's
    committed positions, the last one as the tree part) equals masked SDPA over the cross
    buffer, and the proposals are the same, while the buffer grows (capacity 64 -> 256)."""
    from lsrt.runtime.spec.longspec import LongSpecDrafter
    from lsrt.runtime.spec.longspec_layer import LongSpecConfig, attend, init_from_target

    from tiny_models import perturb, repetitive_prompt

    make_tiny_model("llama", tmp_path)
    runner = ModelRunner(load_model(tmp_path, device=DEVICE),
                         RunnerConfig(kv_budget_mb=4, block_size=8, device=DEVICE))
    draft = init_from_target(runner.model, LongSpecConfig(sink=4, window=16))
    perturb(draft, 3)
    drafters = {kernel: LongSpecDrafter(runner, draft, widths=(4, 3, 2), use_graphs=False,
                                        cross_start=64, cross_kernel=kernel)
                for kernel in ("sdpa", "triton")}
    assert drafters["triton"].ws.cross_kernel == "triton"
    ids = repetitive_prompt(runner.cfg.vocab_size, 200, seed=5)
    seq = runner.new_sequence()
    gen = torch.Generator().manual_seed(0)
    try:
        done = 0
        for n in (2, 60, 61, 150, 200):
            runner.prefill(seq, ids[done:n - 1])
            done = n - 1
            trees = set()
            for d in drafters.values():
                d.bind(seq)
                d.observe(ids[len(d.history):n])
                t = d.propose(ids[:n], 16)
                trees.add((tuple(t.tokens), tuple(t.parents)))
            assert len(trees) == 1, n
            d = drafters["triton"]
            cap = d.xk.shape[1]
            assert d.x_len == n - 1 and d.x_table.numel() * 64 >= cap
            committed = torch.tensor(n - 1, device=DEVICE)
            for m in (1, 4):
                cq = torch.randn(m, runner.cfg.num_heads, runner.cfg.head_dim, generator=gen)
                cq = cq.to(DEVICE)
                mask = (torch.arange(cap, device=DEVICE) < n - 1)[None].expand(m, cap)
                want = attend(cq, d.xk, d.xv, mask, draft.scale)
                got = d._triton_cross(committed)(cq)
                assert (got - want).abs().max() < 1e-4, (n, m)
    finally:
        seq.release()
