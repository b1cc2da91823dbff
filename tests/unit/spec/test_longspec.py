"""The LongSpec drafter: lossless with random weights, tree shape, cache persistence, and the
published checkpoint's key mapping checked against an independent re-implementation of the
published layer (no download)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.longspec import (ENCODE_PAD, LongSpecDrafter, _pruned, default_widths,
                                        make_longspec_drafter)
from lsrt.runtime.spec.longspec_layer import LongSpecConfig, init_from_target
from lsrt.runtime.spec.tree import DraftTree
from lsrt.runtime.spec.longspec_ckpt import load_longspec_checkpoint
from lsrt.sessions.blob import decode_draft_blob, encode_draft_blob

from tiny_models import copy_tokenizer, make_tiny_model, perturb, repetitive_prompt


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp(f"longspec-{request.param}")
    make_tiny_model(request.param, path)
    copy_tokenizer(smollm2_dir, path)
    return LLM(path, RunnerConfig(kv_budget_mb=16, prefill_chunk=64, block_size=8,
                                   tree_budget="full"))


def drafter_for(llm: LLM, widths, *, sink=4, window=16, seed=None, cross_start=None,
                mlp_width=None, feature=False) -> LongSpecDrafter:
    draft = init_from_target(llm.runner.model, LongSpecConfig(sink=sink, window=window,
                                                              mlp_width=mlp_width,
                                                              feature=feature))
    if seed is not None:  # a draft that is not a copy of the last layer
        perturb(draft, seed)
    if feature:  # a feature large enough to move the drafts
        with torch.no_grad():
            draft.feat_w.normal_(generator=torch.Generator().manual_seed(7))
    return LongSpecDrafter(llm.runner, draft, widths=widths, cross_start=cross_start)


@contextlib.contextmanager
def bound_drafter(llm: LLM, ids: list[int], widths, seed: int):
    """(drafter, seq): `ids[:-1]` prefilled, a seeded drafter bound to it; the seq released."""
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:-1])
        d = drafter_for(llm, widths, seed=seed)
        d.observe(ids)
        d.bind(seq)
        yield d, seq
    finally:
        seq.release()


def run(llm: LLM, ids: list[int], drafter, params: SamplingParams):
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:-1])
        history = list(ids)
        if drafter is not None:
            drafter.observe(history)
        return llm.engine.generate(seq, history, params, drafter=drafter)
    finally:
        seq.release()


@pytest.mark.parametrize("widths,mlp_width,feature",
                         [((1, 1, 1), None, False), ((2, 3, 3), None, False),
                          ((4, 8, 8, 8), None, False), ((2, 3, 3), 250, False),
                          ((2, 3, 3), None, True)],
                         ids=["chain", "tree", "pruned", "wide-mlp", "feature"])
def test_greedy_identical(tiny, widths, mlp_width, feature):
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 120, seed=3)
    params = SamplingParams(max_tokens=24)
    plain = run(tiny, ids, None, params)
    spec = run(tiny, ids, drafter_for(tiny, widths, seed=1, mlp_width=mlp_width,
                                      feature=feature), params)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.drafted_tokens > 0


def test_tree_shape_and_pruning(tiny):
    """A drafted tree larger than the node budget keeps its likeliest nodes: at every depth a
    prefix of that depth's nodes (drafted best first), every kept path a drafted path."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 40, seed=4)
    with bound_drafter(tiny, ids, (4, 16, 16, 16), seed=2) as (d, seq):
        full = d.propose(ids, 128)  # 53 drafted nodes, all within budget
        assert len(full) == 53 and full.tokens[0] == ids[-1]
        assert [full.depth.count(k) for k in range(1, 5)] == [4, 16, 16, 16]
        assert all(p is None for p in full.draft_probs)
        assert len(set(zip(full.parents, full.tokens))) == len(full)  # no duplicate children
        # Depth 1 = the draft's top-4 at the root, best first.
        chain = drafter_for(tiny, (1,), seed=2)
        chain.observe(ids)
        chain.bind(seq)
        assert chain.propose(ids, 8).tokens[1] == full.tokens[1]

        def paths(tree):
            out = []
            for i in range(len(tree)):
                path, j = [], i
                while j > 0:
                    path.append(tree.tokens[j])
                    j = tree.parents[j]
                out.append((tree.depth[i], tuple(reversed(path))))
            return out

        full_paths = paths(full)
        for budget in (32, 16, 5, 2):
            pruned = d.propose(ids, budget)
            assert len(pruned) == budget and pruned.tokens[0] == ids[-1]
            kept = paths(pruned)
            assert set(kept) <= set(full_paths)
            for depth in range(1, 5):  # kept nodes of a depth: that depth's first ones
                at = [p for p in full_paths if p[0] == depth]
                got = [p for p in kept if p[0] == depth]
                assert got == at[:len(got)], (budget, depth)
            assert kept[1] == full_paths[1]  # the likeliest first token survives any budget
        assert d.propose(ids, 1) is None


def test_pruning_keeps_the_likeliest_nodes_and_their_ancestors():
    # 0 -> 1 -> 3 -> 5, 0 -> 2, 1 -> 4; node 3 was drafted with probability 1 (cum ties node 1).
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, 0, 0, 1, 1, 3])
    cum = torch.tensor([0.0, -0.1, -2.0, -0.1, -0.5, -0.3])
    kept, kept_cum = _pruned(tokens, parents, cum, 4)
    assert kept.tolist() == [[10, 11, 13, 15], [-1, 0, 1, 2]]
    assert kept_cum.tolist() == pytest.approx([0.0, -0.1, -0.1, -0.3])
    assert _pruned(tokens, parents, cum, 2)[0].tolist() == [[10, 11], [-1, 0]]  # the tie: parent
    assert _pruned(tokens, parents, cum, 5)[0].tolist() == [[10, 11, 13, 14, 15],
                                                           [-1, 0, 1, 1, 2]]


def test_default_shape_follows_the_budget(tiny):
    """Without widths, each proposal takes the tabled shape of its node budget (auto's model arm
    drafts with half of the engine's budget); below the smallest, that shape pruned to fit."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 40, seed=4)
    seq = tiny.runner.new_sequence()
    try:
        tiny.runner.prefill(seq, ids[:-1])
        d = drafter_for(tiny, None)
        d.observe(ids)
        d.bind(seq)
        for budget in (32, 16, 8, 12):
            tree = d.propose(ids, budget)
            widths = [tree.depth.count(k) for k in range(1, max(tree.depth) + 1)]
            assert widths == list(default_widths(budget)), budget
        assert default_widths(32) == (6, 5, 4, 4, 4, 4, 3)
        assert default_widths(12) == default_widths(8) == (4, 3)
        assert default_widths(5) == (4, 3)
        assert len(d.propose(ids, 5)) == 5  # (4, 3) drafted, its 4 likeliest nodes kept
    finally:
        seq.release()


def test_rollback_and_export_import(tiny):
    """After rollback, and after export -> blob -> import, proposals equal a fresh drafter's."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 90, seed=6)
    seq = tiny.runner.new_sequence()
    try:
        tiny.runner.prefill(seq, ids[:-1])
        a = drafter_for(tiny, (2, 2), seed=2)
        a.bind(seq)
        a.observe(ids[:30])
        a.propose(ids[:30], 8)
        a.observe(ids[30:])
        first = a.propose(ids, 8)  # catches up past a full window
        a.rollback(75)  # ring entries of [59, 73) are gone: they must be re-encoded
        a.observe(ids[75:80])
        fresh = drafter_for(tiny, (2, 2), seed=2)
        fresh.bind(seq)
        fresh.observe(ids[:80])
        seq.truncate(79)
        assert a.propose(ids[:80], 8).tokens == fresh.propose(ids[:80], 8).tokens
        tiny.runner.prefill(seq, ids[79:-1])
        a.observe(ids[80:])
        assert a.propose(ids, 8).tokens == first.tokens
        blob = encode_draft_blob(a.export_state(), session_version=3, fingerprint="f")
        state = decode_draft_blob(blob, expected_version=3, fingerprint="f")
        assert state.header["positions"] == "post-rope-absolute"
        assert state.header["cached_positions"] == [0, 1, 2, 3, *range(73, 89)]
        b = drafter_for(tiny, (2, 2), seed=2)
        b.import_state(state)
        b.bind(seq)
        b.observe(ids)
        assert b.done == 89 and b.propose(ids, 8).tokens == first.tokens
        other = drafter_for(tiny, (2, 2), window=32)
        with pytest.raises(ValueError):
            other.import_state(state)
    finally:
        seq.release()


def published_state_dict(cfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of `sail/longspec-*` (GlideDecoderLayer)."""
    h, i, qn, kvn = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
                     cfg.num_kv_heads * cfg.head_dim)
    shapes = {"input_layernorm.weight": (h,), "post_self_attention_layernorm.weight": (h,),
              "post_cross_attention_layernorm.weight": (h,),
              "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i)}
    for att in ("self_attn", "cross_attn"):
        for n, out in (("q", qn), ("k", kvn), ("v", kvn)):
            shapes[f"{att}.{n}_proj.weight"] = (out, h)
            shapes[f"{att}.{n}_proj.bias"] = (out,)
        shapes[f"{att}.o_proj.weight"] = (h, qn)
    return {f"draft_model.{k}": 0.1 * torch.randn(s, generator=g) + (1.0 if len(s) == 1 and
            "norm" in k else 0.0) for k, s in shapes.items()}


def reference_published_layer(sd, cfg, x, pos, ck, cv):
    """The published layer's forward written from its module layout (plain ops, no masks
    but causal self-attention; all target keys visible)."""
    sd = {k.removeprefix("draft_model."): v for k, v in sd.items()}
    n, hq, hkv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name, t):
        return F.linear(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def norm(name, t):
        return sd[f"{name}.weight"] * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True)
                                                       + cfg.rms_norm_eps))

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([pos.float()[:, None] * inv] * 2, -1)[:, None]

    def rope(t):
        return t * ang.cos() + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * ang.sin()

    def mha(q, k, v, causal):
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, -1)

    h = norm("input_layernorm", x)
    q = rope(lin("self_attn.q_proj", h).view(n, hq, d))
    k = rope(lin("self_attn.k_proj", h).view(n, hkv, d))
    x = x + lin("self_attn.o_proj", mha(q, k, lin("self_attn.v_proj", h).view(n, hkv, d), True))
    q = rope(lin("cross_attn.q_proj", norm("post_self_attention_layernorm", x)).view(n, hq, d))
    x = x + lin("cross_attn.o_proj", mha(q, ck.transpose(0, 1), cv.transpose(0, 1), False))
    h = norm("post_cross_attention_layernorm", x)
    return x + lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))


def test_published_checkpoint_key_mapping(tmp_path):
    from lsrt.runtime.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                      rope_theta=10000.0)
    g = torch.Generator().manual_seed(0)
    sd = published_state_dict(cfg, g)
    draft = load_longspec_checkpoint(sd, cfg)
    assert draft.final_norm is None and draft.lcfg.sink == 0 and draft.lcfg.window == 512
    n, m = 7, 11
    x, pos = torch.randn(n, 32, generator=g), torch.arange(100, 100 + n)
    ck, cv = torch.randn(2, m, 8, generator=g), torch.randn(2, m, 8, generator=g)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    got, _, _ = draft(x, pos, None, None, causal, ck, cv, None)
    want = reference_published_layer(sd, cfg, x, pos, ck, cv)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The same tensors from a file on disk (torch.save, as the LongSpec trainer writes them).
    torch.save(sd, tmp_path / "draft_model_weights.pth")
    again = load_longspec_checkpoint(tmp_path, cfg)
    torch.testing.assert_close(again(x, pos, None, None, causal, ck, cv, None)[0], want,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown"):
        load_longspec_checkpoint({**sd, "draft_model.extra.weight": torch.zeros(1)}, cfg)
    bad = dict(sd)
    bad["draft_model.mlp.down_proj.weight"] = torch.zeros(32, 47)
    with pytest.raises(ValueError, match="shape"):
        load_longspec_checkpoint(bad, cfg)
    del bad["draft_model.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_longspec_checkpoint(bad, cfg)


def test_make_longspec_drafter_default_is_lossless(tiny):
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 60, seed=8)
    params = SamplingParams(max_tokens=12)
    d = make_longspec_drafter(tiny.runner, widths=(2, 2))
    assert run(tiny, ids, d, params).token_ids == run(tiny, ids, None, params).token_ids


def _vocab_drafter(llm: LLM, widths, ids: torch.Tensor | None, seed=1) -> LongSpecDrafter:
    draft = init_from_target(llm.runner.model, LongSpecConfig(sink=4, window=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    draft.set_draft_vocab(ids)
    return LongSpecDrafter(llm.runner, draft, widths=widths)


def _propose(llm: LLM, ids: list[int], drafter: LongSpecDrafter, budget: int):
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:-1])
        drafter.observe(ids)
        drafter.bind(seq)
        return drafter.propose(ids, budget)
    finally:
        seq.release()


def test_draft_vocabulary(tiny, tmp_path):
    """A draft vocabulary maps head rows back to token ids (a permuted full vocabulary drafts
    the same tree), restricts drafts to its ids, survives save/load, and stays lossless."""
    from lsrt.runtime.spec.longspec_ckpt import save_draft

    vocab = tiny.runner.cfg.vocab_size
    ids = repetitive_prompt(vocab, 90, seed=5)
    full = _propose(tiny, ids, _vocab_drafter(tiny, (2, 3, 3), None), 9)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    permuted = _propose(tiny, ids, _vocab_drafter(tiny, (2, 3, 3), perm), 9)
    assert (permuted.tokens, permuted.parents) == (full.tokens, full.parents)
    keep = sorted(set(ids))[::2]
    part = _vocab_drafter(tiny, (2, 3, 3), torch.tensor(keep))
    assert set(_propose(tiny, ids, part, 9).tokens[1:]) <= set(keep)
    params = SamplingParams(max_tokens=24)
    spec = run(tiny, ids, _vocab_drafter(tiny, (2, 3, 3), torch.tensor(keep)), params)
    assert spec.token_ids == run(tiny, ids, None, params).token_ids
    save_draft(part.draft, tmp_path)
    loaded = make_longspec_drafter(tiny.runner, tmp_path, widths=(2, 3, 3))
    assert loaded.head_ids == keep
    with pytest.raises(ValueError):
        part.draft.set_draft_vocab(torch.tensor([0, 0]))
    with pytest.raises(ValueError):
        part.draft.set_draft_vocab(torch.tensor([vocab]))


def test_export_casts_weights_and_keeps_vocab_ids(tiny, tmp_path):
    """`export_draft` (how a trained draft is shipped) casts the weights to bf16 and copies the
    integer `vocab_ids` unchanged; the exported draft loads and proposes from the same ids. A
    state dict cast whole (ids turned into bf16, the bug this guards) is refused on load."""
    from safetensors.torch import load_file, save_file

    from lsrt.runtime.spec.longspec_ckpt import export_draft, load_draft, save_draft

    vocab = tiny.runner.cfg.vocab_size
    keep = torch.arange(3, vocab, 7)  # ids above bf16's exact-integer range where vocab > 256
    draft = _vocab_drafter(tiny, (2, 3), keep).draft
    save_draft(draft, tmp_path / "run")
    written = export_draft(tmp_path / "run", tmp_path / "out", extra={"note": "x"})
    state = load_file(str(tmp_path / "out" / "draft.safetensors"))
    assert state["vocab_ids"].dtype == torch.int64 and torch.equal(state["vocab_ids"], keep)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "vocab_ids")
    assert written == sum(v.numel() for k, v in state.items() if k != "vocab_ids")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["note"] == "x"
    loaded = load_draft(tmp_path / "out", tiny.runner.cfg)
    assert torch.equal(loaded.vocab_ids, keep)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
              str(tmp_path / "out" / "draft.safetensors"))
    with pytest.raises(ValueError, match="not integer"):
        load_draft(tmp_path / "out", tiny.runner.cfg)


def test_cross_buffer_grows_and_follows_rollback(smollm2_dir, tmp_path):
    """The committed target K/V are copied into a fixed-capacity buffer that doubles when
    outgrown (1024 -> 2048 here) and shrinks its valid length on rollback; proposals equal a
    fresh drafter's at every point, and decoding stays lossless across the growth."""
    make_tiny_model("llama", tmp_path, max_position=4096)
    copy_tokenizer(smollm2_dir, tmp_path)
    llm = LLM(tmp_path, RunnerConfig(kv_budget_mb=64, prefill_chunk=256, block_size=16,
                                       tree_budget="full"))
    ids = repetitive_prompt(llm.runner.cfg.vocab_size, 1200, seed=11)
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:1000])
        assert drafter_for(llm, (2,)).cross_start >= 4096  # by default: the whole context here
        live = drafter_for(llm, (2, 2, 2), seed=2, cross_start=1024)
        live.bind(seq)
        live.observe(ids[:1001])
        live.propose(ids[:1001], 16)
        assert live.xk.shape[1] == 1024 and live.x_len == 1000
        llm.runner.prefill(seq, ids[1000:1150])
        live.observe(ids[1001:1151])

        def fresh_tree(n):
            d = drafter_for(llm, (2, 2, 2), seed=2)
            d.bind(seq)
            d.observe(ids[:n])
            t = d.propose(ids[:n], 16)
            return t.tokens, t.parents

        got = live.propose(ids[:1151], 16)
        assert live.xk.shape[1] == 2048 and live.x_len == 1150
        assert (got.tokens, got.parents) == fresh_tree(1151)
        seq.truncate(1100)
        live.rollback(1101)
        assert live.x_len == 1100  # position 1100 is pending again: its K/V may change
        got = live.propose(ids[:1101], 16)
        assert (got.tokens, got.parents) == fresh_tree(1101)
    finally:
        seq.release()
    params = SamplingParams(max_tokens=16)
    assert run(llm, ids[:1030], drafter_for(llm, (2, 2, 2), seed=2, cross_start=1024),
               params).token_ids == \
        run(llm, ids[:1030], None, params).token_ids


def test_eager_proposals_read_only_the_committed_cross_positions(tiny, monkeypatch):
    """Never graphed (the CPU), a proposal cross-attends to the committed slice of the cross
    buffer rather than to the whole buffer under a mask (what a CUDA graph replays); both give
    the same tree."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 200, seed=3)
    with bound_drafter(tiny, ids, (2, 3, 3), seed=4) as (d, seq):
        assert not d.use_graphs
        sliced = d.propose(ids, 16)
        assert d.xk.shape[1] > seq.num_tokens  # the buffer has room the mask would hide
        levels, seen = d._levels, []

        def masked(*args, committed=None, **kwargs):
            seen.append(committed)
            return levels(*args, **kwargs)  # committed=None: the masked whole buffer

        monkeypatch.setattr(d, "_levels", masked)
        full = d.propose(ids, 16)
    assert seen == [len(ids) - 1]
    assert (sliced.tokens, sliced.parents) == (full.tokens, full.parents)


def test_staged_encode_equals_eager_catch_up(smollm2_dir, tmp_path):
    """Up to ENCODE_PAD newly accepted tokens are encoded inside the proposal (its CUDA graph
    on a GPU); more run the eager catch-up first. Either way the tree and the ring's visible
    K/V equal those of a fresh drafter that encoded everything eagerly."""
    make_tiny_model("llama", tmp_path, max_position=4096)
    copy_tokenizer(smollm2_dir, tmp_path)
    llm = LLM(tmp_path, RunnerConfig(kv_budget_mb=64, block_size=16, tree_budget="full"))
    ids = repetitive_prompt(llm.runner.cfg.vocab_size, 300, seed=5)
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:200])
        live = drafter_for(llm, (2, 2, 2), seed=2, window=64)  # window > ENCODE_PAD
        live.bind(seq)
        live.observe(ids[:201])
        live.propose(ids[:201], 16)  # the first catch-up is eager
        n = 201
        for step in (1, 3, ENCODE_PAD, 2, ENCODE_PAD + 1, 5):
            llm.runner.prefill(seq, ids[n - 1:n - 1 + step])
            live.observe(ids[n:n + step])
            n += step
            staged = live._staged_catch_up(n - 1)
            assert (staged is not None) == (step <= ENCODE_PAD)
            got = live.propose(ids[:n], 16)
            fresh = drafter_for(llm, (2, 2, 2), seed=2, window=64)
            fresh.bind(seq)
            fresh.observe(ids[:n])
            want = fresh.propose(ids[:n], 16)
            assert (got.tokens, got.parents) == (want.tokens, want.parents), step
            slots = [live.slot(p) for p in live.visible(n - 1)]
            assert slots == [fresh.slot(p) for p in fresh.visible(n - 1)]
            torch.testing.assert_close(live.k[:, slots], fresh.k[:, slots])
            torch.testing.assert_close(live.v[:, slots], fresh.v[:, slots])
            assert live.slot_pos[slots].tolist() == fresh.slot_pos[slots].tolist()
            assert int(live.slot_pos[live.scratch]) == -1  # the scratch slot is never visible
    finally:
        seq.release()


def test_drafters_sharing_a_workspace_match_private_ones(tiny):
    """Two sessions' drafters made through one `workspaces` dict share the draft, buffers and
    graphs; taking turns (proposals, catch-ups short and long, a rollback, exports) each one
    proposes exactly what a drafter with a private workspace proposes on its sequence."""
    vocab = tiny.runner.cfg.vocab_size
    shared_ws: dict = {}
    runs = []
    for seed, length in ((1, 60), (2, 45)):
        ids = repetitive_prompt(vocab, length, seed=seed)
        seq = tiny.runner.new_sequence()
        tiny.runner.prefill(seq, ids[:-1])
        pair = (make_longspec_drafter(tiny.runner, workspaces=shared_ws),
                make_longspec_drafter(tiny.runner))
        for d in pair:
            d.bind(seq)
            d.observe(ids)
        runs.append((seq, list(ids), pair))
    (_, _, (a, a_private)), (_, _, (b, b_private)) = runs
    assert a.ws is b.ws and len(shared_ws) == 1 and a_private.ws is not a.ws
    gen = torch.Generator().manual_seed(0)
    try:
        for grow in (0, 3, 1, 40, 2):  # 40 > ENCODE_PAD: an eager catch-up
            for seq, history, (shared, private) in runs:
                if grow:
                    new = torch.randint(0, vocab, (grow,), generator=gen).tolist()
                    tiny.runner.prefill(seq, [history[-1]] + new[:-1])
                    history += new
                    shared.observe(new)
                    private.observe(new)
                got, want = shared.propose(history, 16), private.propose(history, 16)
                assert (got.tokens, got.parents) == (want.tokens, want.parents), grow
        seq, history, (shared, private) = runs[0]
        seq.truncate(len(history) - 3)  # a rolled-back turn
        del history[len(history) - 2:]
        for d in (shared, private):
            d.rollback(len(history))
        got, want = shared.propose(history, 16), private.propose(history, 16)
        assert (got.tokens, got.parents) == (want.tokens, want.parents)
        b.propose(runs[1][1], 16)  # b owns the workspace: a's export reads a's saved ring
        ea, eb = a.export_state(), a_private.export_state()
        assert ea.header == eb.header
        for key in ("k", "v"):
            assert ea.tensors[key] == eb.tensors[key]
    finally:
        for seq, _, _ in runs:
            seq.release()


def test_sequence_feature_is_the_final_hidden_state(tiny):
    """After a prefill and after every committed step, the sequence's feature is the target's
    final hidden state at its last committed position (what a fresh prefill of the same tokens
    computes); a truncation below it drops it, and a feature draft then reads zeros."""
    runner = tiny.runner
    ids = repetitive_prompt(runner.cfg.vocab_size, 90, seed=4)

    def fresh(tokens):
        seq = runner.new_sequence()
        try:
            runner.prefill(seq, tokens)
            return seq.current_feature().clone()
        finally:
            seq.release()

    future = run(tiny, ids, None, SamplingParams(max_tokens=40)).token_ids

    class Oracle:  # a wrong first child, then the target's next 3 tokens: path [0, 2, 3, 4]
        def propose(self, history, max_nodes):
            nxt = future[len(history) - len(ids):][:3]
            return DraftTree(tokens=[history[-1], (nxt[0] + 1) % runner.cfg.vocab_size, *nxt],
                             parents=[-1, 0, 0, 2, 3])

    seq = runner.new_sequence()
    try:
        runner.prefill(seq, ids[:-1])
        assert seq.feature_pos == len(ids) - 2
        torch.testing.assert_close(seq.current_feature(), fresh(ids[:-1]))
        history = list(ids)
        for _ in range(4):
            emitted, _ = tiny.engine.step(seq, history, Oracle(), SamplingParams(), None, 64)
            assert len(emitted) == 4  # three accepted (moved in the KV) and the bonus
            history.extend(emitted)
            assert seq.feature_pos == seq.num_tokens - 1 == len(history) - 2
            torch.testing.assert_close(seq.current_feature(), fresh(history[:-1]),
                                       rtol=1e-4, atol=1e-4)
        drafter = drafter_for(tiny, (2, 3, 3), seed=1, feature=True)
        drafter.observe(history)
        drafter.bind(seq)
        drafter.propose(history, 16)
        torch.testing.assert_close(drafter._feature[0], seq.current_feature())
        fork = seq.fork()
        torch.testing.assert_close(fork.current_feature(), seq.current_feature())
        fork.release()
        seq.truncate(seq.num_tokens - 2)
        assert seq.current_feature() is None and seq.feature_pos == -1
        del history[seq.num_tokens + 1:]
        drafter.rollback(len(history))
        drafter.propose(history, 16)
        assert not drafter._feature.any()  # no stale feature: zeros
    finally:
        seq.release()


def test_feature_layers_are_tapped_and_stay_lossless(tiny):
    """A draft reading target layers (`feature_layers`) has the runner append them to every
    forward's feature from then on; it reads its blocks, a final-hidden-state draft on the same
    runner reads the first block only, and a feature computed before the taps reads as zeros.
    Greedy output equals plain decoding throughout. (Its own LLM: taps only grow.)"""
    llm = LLM(tiny.model_dir, RunnerConfig(kv_budget_mb=16, prefill_chunk=64, block_size=8,
                                           tree_budget="full"))
    runner, h = llm.runner, llm.runner.cfg.hidden_size
    ids = repetitive_prompt(runner.cfg.vocab_size, 120, seed=3)
    params = SamplingParams(max_tokens=24)
    plain = run(llm, ids, None, params)
    early = runner.new_sequence()  # prefilled before any layer is tapped
    try:
        runner.prefill(early, ids[:-1])
        assert early.current_feature().shape == (h,)
        draft = init_from_target(runner.model, LongSpecConfig(sink=4, window=16, feature=True,
                                                              feature_layers=(0,)))
        perturb(draft, 1)
        with torch.no_grad():
            draft.feat_w.normal_(generator=torch.Generator().manual_seed(7))
        layered = LongSpecDrafter(runner, draft, widths=(2, 3, 3))
        assert runner.feature_taps == (0,)
        layered.observe(ids)
        layered.bind(early)
        layered.propose(ids, 16)
        assert not layered._feature.any()  # narrower than the taps: unknown, zeros
    finally:
        early.release()
    spec = run(llm, ids, layered, params)
    assert spec.token_ids == plain.token_ids and spec.stats.drafted_tokens > 0
    seq = runner.new_sequence()
    try:
        runner.prefill(seq, ids[:-1])
        feature = seq.current_feature()
        assert feature.shape == (2 * h,)
        torch.testing.assert_close(feature[:h], plain_feature(tiny, ids[:-1]))
        layered.observe(ids)
        layered.bind(seq)
        layered.propose(ids, 16)
        torch.testing.assert_close(layered._feature[0], feature)
        final_only = drafter_for(llm, (2, 3, 3), seed=1, feature=True)
        final_only.observe(ids)
        final_only.bind(seq)
        final_only.propose(ids, 16)
        torch.testing.assert_close(final_only._feature[0], feature[:h])
    finally:
        seq.release()
    assert run(llm, ids, final_only, params).token_ids == plain.token_ids


def plain_feature(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """The final hidden state after prefilling `tokens` on a runner that taps no layer."""
    assert llm.runner.feature_taps == ()
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, tokens)
        return seq.current_feature().clone()
    finally:
        seq.release()


def test_propose_follows_a_history_it_was_not_told_about(tiny):
    """`propose` with a history other than the drafter's own rolls back to the common length
    and follows it (under the workspace lock it holds: this deadlocked once), proposing what a
    drafter told the history from the start proposes."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 60, seed=6)
    seq = tiny.runner.new_sequence()
    try:
        tiny.runner.prefill(seq, ids[:-1])
        told, untold = drafter_for(tiny, (2, 3), seed=1), drafter_for(tiny, (2, 3), seed=1)
        told.observe(ids)
        untold.observe(ids + ids[:7])  # longer than the engine's history
        trees = []
        for d in (told, untold):
            d.bind(seq)
            trees.append(d.propose(ids, 16))
        assert untold.history == ids
        assert trees[0].tokens == trees[1].tokens and trees[0].parents == trees[1].parents
    finally:
        seq.release()


def test_a_price_keeps_the_nodes_that_clear_its_floor(tiny):
    """Priced, a proposal is the unpriced tree cut to the nodes whose path probability clears
    `price.floor() / calibration`; nothing clears 1; the outcome of a priced tree is noted."""
    from lsrt.runtime.spec.budget import NodePrice

    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 40, seed=4)
    with bound_drafter(tiny, ids, (4, 3, 2, 2), seed=2) as (d, _):
        full = d.propose(ids, 16)
        d.price = NodePrice(node_s=0.0, token_s=1.0)  # a free node: the same tree
        free = d.propose(ids, 16)
        assert (free.tokens, free.parents) == (full.tokens, full.parents)
        probs = d._proposed[1]
        assert probs[0] == pytest.approx(1.0)
        assert all(probs[i] <= probs[full.parents[i]] + 1e-6 for i in range(1, len(full)))
        floor = sorted(probs)[len(probs) // 2]
        d.price = NodePrice(node_s=floor, token_s=1.0)
        cut = d.propose(ids, 16)
        kept = [i for i, p in enumerate(probs) if p >= floor]
        want = full.subtree(kept)
        assert 1 < len(cut) < len(full)
        assert (cut.tokens, cut.parents) == (want.tokens, want.parents)
        d.observe([want.tokens[1], -1])  # the first drafted token accepted, then the bonus
        predicted, accepted = d._outcomes[-1]
        assert accepted == 1 and predicted == pytest.approx(sum(p for p in probs if p >= floor)
                                                            - 1.0, rel=1e-5)
        del d.history[-2:]
        d.price = NodePrice(node_s=1.0, token_s=1.0)  # floor 1: no node can pay
        assert d.propose(ids, 16) is None
        d.price = NodePrice.plain()
        assert d.propose(ids, 16) is None


def test_calibration_scales_the_floor_by_what_was_accepted(tiny):
    d = drafter_for(tiny, (2,), seed=2)
    assert d.calibration == 1.0
    d._outcomes.extend([(1.0, 0)] * 8)  # predicted 8 tokens, none accepted
    assert d.calibration == 0.25
    d._outcomes.clear()
    d._outcomes.extend([(0.5, 1)] * 8)
    assert d.calibration == 2.0


@pytest.mark.parametrize("spec", ["longspec", "auto"])
def test_cost_aware_engine_stays_lossless_and_drafts_less(tiny, spec):
    """A cost-aware engine whose measured node cost is high: the same greedy output as plain
    decoding, from fewer drafted nodes than the full budget."""
    from lsrt.runtime.spec.auto import AutoDrafter
    from lsrt.runtime.spec.engine import Engine
    from lsrt.runtime.spec.suffix import SuffixDrafter

    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 120, seed=3)
    params = SamplingParams(max_tokens=32)
    plain = run(tiny, ids, None, params)
    drafted = {}
    for cost_aware in (False, True):
        engine = Engine(tiny.runner, tiny.tokenizer, tiny.eos_ids, cost_aware=cost_aware)
        engine.verify_costs.record(len(ids), 1, 0.001)  # 6.6 ms a node, as on a slow CPU
        engine.verify_costs.record(len(ids), 16, 0.100)
        model = drafter_for(tiny, (4, 3, 2, 2), seed=1)
        drafter = model if spec == "longspec" else AutoDrafter(SuffixDrafter(), model)
        seq = tiny.runner.new_sequence()
        try:
            tiny.runner.prefill(seq, ids[:-1])
            drafter.observe(list(ids))
            out = engine.generate(seq, list(ids), params, drafter=drafter)
        finally:
            seq.release()
        assert out.token_ids == plain.token_ids
        drafted[cost_aware] = out.stats.drafted_tokens
        assert (model.price is not None) == cost_aware
    assert drafted[True] < drafted[False]
