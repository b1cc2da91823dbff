"""LongSpec draft training: index forms, training mirrors inference, loss goes down, save/load
and resume are exact, and the `lsrt train-draft` entry point runs end to end (tiny models)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from lsrt.runtime.model import load_model
from lsrt.runtime.runner import ModelRunner, RunnerConfig
from lsrt.runtime.spec.longspec import LongSpecDrafter, make_longspec_drafter
from lsrt.runtime.spec.longspec_layer import (LongSpecConfig, add_feature, init_from_target,
                                              widen_mlp)
from lsrt.runtime.spec.longspec_ckpt import load_draft
from lsrt.runtime.training.data import (DataConfig, Mixture, build_corpus, build_mixture,
                                        parse_sources)
from lsrt.runtime.training.longspec_train import (
    LongSpecTrainer, TrainConfig, anchor_offset_positions, draft_loss, lag_commit, main,
    resume, self_window_mask, train)

from tiny_models import copy_tokenizer, make_tiny_model, tiny_config


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ls-train-llama")
    make_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def target(target_dir):
    return load_model(target_dir)


def perturbed_draft(target, seed=1, **lcfg):
    draft = init_from_target(target, LongSpecConfig(**lcfg) if lcfg else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return draft


def stream(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def test_anchor_offset_positions_form():
    g = torch.Generator().manual_seed(0)
    offsets = set()
    for length, sinks, max_pos in [(64, 4, 4096), (64, 0, 100), (10, 4, 10), (3, 4, 50)]:
        for _ in range(50):
            pos = anchor_offset_positions(length, sinks, max_pos, g)
            s = min(sinks, length)
            assert pos[:s].tolist() == list(range(s))
            rest = pos[s:]
            if rest.numel():
                offset = int(rest[0]) - s
                assert 0 <= offset <= max_pos - length
                assert rest.tolist() == list(range(s + offset, s + offset + rest.numel()))
                offsets.add(offset)
            assert int(pos.max()) < max_pos
    assert len(offsets) > 20  # offsets really vary


def test_lag_commit_and_self_mask():
    g = torch.Generator().manual_seed(1)
    commit = lag_commit(200, 4, g)
    t = torch.arange(200)
    lag = t - commit + 1
    assert int(lag.min()) == 1 and int(lag.max()) == 4
    assert set(lag.tolist()) == {1, 2, 3, 4}
    starts = commit.unique()
    assert (commit[starts] == starts).all()  # each segment starts at its own commit point
    assert (commit[1:] >= commit[:-1]).all()
    mask = self_window_mask(commit, 2, 5)
    for q in range(200):
        want = [j for j in range(q + 1) if j < 2 or j >= int(commit[q]) - 5]
        assert mask[q].nonzero().flatten().tolist() == want


def mirror_draft(target, feature=False):
    """A perturbed draft whose cross-attention output is amplified, so that reading one
    target key more or less shows in the top-k (with `feature`: a large random `feat_w`, so
    that reading another position's hidden state does too; a tuple: those target layers too)."""
    layers = feature if isinstance(feature, tuple) else ()
    draft = perturbed_draft(target, sink=2, window=8, feature=bool(feature),
                            feature_layers=layers)
    with torch.no_grad():
        draft.ca_o_w.mul_(10)
        if feature:
            draft.feat_w.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    return draft


@pytest.mark.parametrize("n", [50, 7])
@pytest.mark.parametrize("feature", [False, True, (0,)], ids=["kv", "feature", "layers"])
def test_training_mirrors_inference(target, n, feature):
    """The drafter's top-k at the root and its depth-2 choice equal the training forward's
    (same own-cache window, same target KV, same lag, same feature: the target's final hidden
    state at the last committed position, and there its tapped layers') on the same tokens."""
    from lsrt.runtime.training.longspec_train import draft_hidden

    runner = ModelRunner(target, RunnerConfig(kv_budget_mb=8, block_size=8))
    ids = stream(target.cfg.vocab_size, n, seed=3).tolist()
    seq = runner.new_sequence()
    try:
        # the drafters first: a draft reading layers has the runner tap them from then on
        top5 = LongSpecDrafter(runner, mirror_draft(target, feature), widths=(5,))
        chain = LongSpecDrafter(runner, mirror_draft(target, feature), widths=(1, 1))
        runner.prefill(seq, ids[:-1])
        assert runner.feature_taps == (feature if isinstance(feature, tuple) else ())
        for d in (top5, chain):
            d.observe(ids)
            d.bind(seq)
        tree, path = top5.propose(ids, 16), chain.propose(ids, 16)
    finally:
        seq.release()
    full = torch.tensor(ids + [path.tokens[1]])
    pos = torch.arange(n + 1)
    commit = torch.arange(n + 1)
    commit[n] = n - 1  # the depth-2 query sees the same committed target KV as the root
    with torch.no_grad():
        hidden, _ = draft_hidden(mirror_draft(target, feature), target, full, pos, commit,
                                 torch.device("cpu"), torch.float32)
    logits = hidden @ target.lm_head.float().T
    assert tree.tokens[1:] == logits[n - 1].topk(5).indices.tolist()
    assert path.tokens[1] == tree.tokens[1]
    assert path.tokens[2] == int(logits[n].argmax())


def test_training_steps_decrease_loss_on_fixed_batch(target):
    cfg = TrainConfig(seq_len=48, lr=3e-3, warmup=1, total_steps=10, max_position=4096,
                      kl_weight=0.5)
    tr = LongSpecTrainer(target, perturbed_draft(target), cfg, stream(target.cfg.vocab_size,
                                                                      500))
    ids, pos, commit = tr.sample()
    losses = [tr.step_on([(ids, pos, commit)]) for _ in range(8)]
    with torch.no_grad():
        final = float(draft_loss(tr.draft, target, tr.head, ids, pos, commit, 0.5))
    assert final < losses[0] - 0.1, losses
    # Only the draft's own weights train: the target is untouched.
    assert all(not p.requires_grad for p in target.parameters())


def test_save_load_and_resume_exact(target, tmp_path):
    cfg = TrainConfig(seq_len=32, lr=1e-3, warmup=2, total_steps=6, max_position=1024)
    tokens = stream(target.cfg.vocab_size, 400, seed=2)
    ref = LongSpecTrainer(target, init_from_target(target), cfg, tokens)
    want = train(ref, 6, progress=False)
    first = LongSpecTrainer(target, init_from_target(target), cfg, tokens)
    train(first, 3, tmp_path, save_every=100, progress=False)
    again = LongSpecTrainer(target, init_from_target(target), cfg, tokens)
    resume(again, tmp_path)
    assert again.step == 3
    got = train(again, 6, tmp_path, save_every=100, progress=False)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    # The saved draft loads (by name and through make_longspec_drafter) with equal weights.
    loaded = load_draft(tmp_path, target.cfg)
    for name, p in again.draft.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p.detach())
    runner = ModelRunner(target, RunnerConfig(kv_budget_mb=8, block_size=8))
    ids = tokens[:40].tolist()
    seq = runner.new_sequence()
    try:
        runner.prefill(seq, ids[:-1])
        trees = []
        for d in (make_longspec_drafter(runner, tmp_path, widths=(3, 3)),
                  LongSpecDrafter(runner, again.draft, widths=(3, 3))):
            d.observe(ids)
            d.bind(seq)
            trees.append((d.propose(ids, 8).tokens, d.propose(ids, 8).parents))
        assert trees[0] == trees[1]
    finally:
        seq.release()


def test_cli_end_to_end(tmp_path, smollm2_dir):
    """A tiny target with the real tokenizer's vocabulary, data from files, held-out traces."""
    from transformers import AutoModelForCausalLM

    tdir = tmp_path / "target"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab=49152)).save_pretrained(tdir)
    copy_tokenizer(smollm2_dir, tdir)
    data = tmp_path / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (data / "a.py").write_text((stdlib / "textwrap.py").read_text())
    rows = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"task {i}"},
                                         {"role": "tool", "content": "out " * 20}]}
            for i in range(3)]
    (data / "traces.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    args = ["--target", str(tdir), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--max-tokens", "3000", "--holdout", "1", "--window", "16", "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 2 and meta["data"]["held_out_traces"] == ["t0"]
    assert meta["window"] == 16 and meta["positions"] == "post-rope-absolute"
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == 3
    wide = [*args[:5], str(tmp_path / "wide"), *args[6:], "--init", str(out), "--mlp-width", "160"]
    assert main([*wide, "--steps", "1"]) == 0 and main([*wide, "--steps", "2", "--resume"]) == 0
    meta = json.loads((tmp_path / "wide" / "config.json").read_text())
    assert meta["mlp_width"] == 160 and meta["step"] == 2
    feat = [*args[:5], str(tmp_path / "feat"), *args[6:], "--init", str(out), "--feature"]
    assert main([*feat, "--steps", "1"]) == 0 and main([*feat, "--steps", "2", "--resume"]) == 0
    meta = json.loads((tmp_path / "feat" / "config.json").read_text())
    assert meta["feature"] is True and meta["step"] == 2
    assert load_draft(tmp_path / "feat", load_model(tdir).cfg).feat_w.abs().sum() > 0
    # the feature draft gains a tapped layer (0 of the tiny target's 2), and resumes with it
    layers = [*args[:5], str(tmp_path / "lay"), *args[6:], "--init", str(tmp_path / "feat"),
              "--feature", "--feature-layers", "0"]
    assert main([*layers, "--steps", "1"]) == 0
    assert main([*layers, "--steps", "2", "--resume"]) == 0
    meta = json.loads((tmp_path / "lay" / "config.json").read_text())
    assert meta["feature_layers"] == [0] and meta["step"] == 2
    with pytest.raises(SystemExit, match="feature-layers"):
        main([*layers[:-1], "0,x", "--steps", "1"])


def test_corpus_tokens_and_holdout(tmp_path, smollm2_dir):
    from lsrt.runtime.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    (tmp_path / "x.py").write_text("def f(x):\n    return x + 1\n")
    rows = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"hi {i}"}]}
            for i in range(4)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = build_corpus(DataConfig(sources=(str(tmp_path / "x.py"),)), tok.encode, 2)
    assert corpus.tokens.tolist() == tok.encode("def f(x):\n    return x + 1\n") + [2]
    corpus = build_corpus(DataConfig(sources=(str(tmp_path / "t.jsonl"),), holdout=2),
                          tok.encode, 2)
    assert corpus.held_out == ["t0", "t1"] and corpus.documents == 2
    text = tok.decode(corpus.tokens.tolist())
    assert "hi 2" in text and "hi 3" in text and "hi 0" not in text and "hi 1" not in text


def test_widened_mlp_keeps_the_output_then_trains(target, tmp_path):
    """`widen_mlp` grows a trained draft without changing its loss; training then moves the
    new units (their down columns start at zero); the wider draft saves, loads and drafts."""
    cfg = TrainConfig(seq_len=48, lr=3e-3, warmup=1, total_steps=10, max_position=4096,
                      kl_weight=0.5)
    narrow = perturbed_draft(target)
    width = narrow.mlp_width * 2 + 3
    wide = widen_mlp(narrow, width, seed=5)
    assert wide.mlp_width == width and wide.gate_up_w.shape == (2 * width, target.cfg.hidden_size)
    tr = LongSpecTrainer(target, wide, cfg, stream(target.cfg.vocab_size, 500))
    ids, pos, commit = tr.sample()
    with torch.no_grad():
        before = [float(draft_loss(d, target, tr.head, ids, pos, commit, 0.5))
                  for d in (narrow, wide)]
    assert before[1] == pytest.approx(before[0], rel=1e-6, abs=1e-6)
    assert not wide.down_w[:, narrow.mlp_width:].any()
    losses = [tr.step_on([(ids, pos, commit)]) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert wide.down_w[:, narrow.mlp_width:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot narrow"):
        widen_mlp(wide, narrow.mlp_width)
    train(tr, tr.step + 1, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["mlp_width"] == width
    loaded = load_draft(tmp_path, target.cfg)
    assert loaded.mlp_width == width
    for name, p in wide.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p.detach())
    # From the target directly: its last layer's MLP, widened.
    grown = init_from_target(target, LongSpecConfig(mlp_width=width))
    last = target.layers[-1]
    i = target.cfg.intermediate_size
    assert torch.equal(grown.down_w[:, :i], last.down_w.float())
    assert torch.equal(grown.gate_up_w[:i], last.gate_up_w[:i].float())
    assert torch.equal(grown.gate_up_w[width:width + i], last.gate_up_w[i:].float())


def test_pure_distillation_and_accumulated_batch(target):
    """ce 0 + kl 1 trains toward the target; a batch of 2 equals the mean of two single-sample
    gradients (gradient accumulation), so the optimizer step is the same."""
    cfg = TrainConfig(seq_len=40, lr=3e-3, warmup=1, total_steps=10, max_position=4096,
                      kl_weight=1.0, ce_weight=0.0)
    tr = LongSpecTrainer(target, perturbed_draft(target), cfg,
                         stream(target.cfg.vocab_size, 500))
    batch = [tr.sample(), tr.sample()]
    first = tr.step_on(batch)
    for _ in range(6):
        last = tr.step_on(batch)
    assert 0 < last < first - 0.05  # a one-layer draft cannot match the target exactly
    # Accumulation: one step on [a, b] == gradients averaged over a and b.
    a, b = batch
    grads = []
    for samples in ([a, b], None):
        draft = perturbed_draft(target, seed=3)
        if samples is not None:
            for ids, pos, commit in samples:
                (draft_loss(draft, target, tr.head, ids, pos, commit, 1.0, 0.0) / 2).backward()
        else:
            t2 = LongSpecTrainer(target, draft, cfg, stream(target.cfg.vocab_size, 500))
            for group in t2.opt.param_groups:
                group["lr"] = 0.0
            t2.opt.step = lambda: None  # keep the gradients for comparison
            t2.opt.zero_grad = lambda set_to_none=True: None
            t2.step_on([a, b])
        grads.append([p.grad.clone() for p in draft.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_greedy_term_is_cross_entropy_to_the_target_argmax(target):
    """--greedy: the loss is the draft's cross-entropy against the token the target itself would
    pick at each position (computed here from a plain causal pass of the target, independently
    of the training code's scratch pool), and training on it raises the draft's top-1 agreement."""
    from lsrt.runtime.spec.tree import DraftTree
    from lsrt.runtime.training.longspec_train import self_window_mask, target_last_kv

    cfg = TrainConfig(seq_len=40, stage="long", lr=3e-3, warmup=1, total_steps=10,
                      max_position=4096, kl_weight=0.0, ce_weight=0.0, greedy_weight=1.0)
    tr = LongSpecTrainer(target, perturbed_draft(target), cfg,
                         stream(target.cfg.vocab_size, 500))
    ids, pos, commit = tr.sample()
    runner = ModelRunner(target, RunnerConfig(kv_budget_mb=8))
    chain = DraftTree(tokens=ids.tolist(), parents=[-1, *range(len(ids) - 1)])
    greedy = runner.verify(runner.new_sequence(), chain).argmax(-1)[:-1]  # positions 0..L-1
    k_t, v_t, _ = target_last_kv(target, ids, pos)

    def draft_logits():
        with torch.no_grad():
            x = target.embed[ids]
            mask = self_window_mask(commit, tr.draft.lcfg.sink, tr.draft.lcfg.window)
            cross = torch.arange(len(ids))[None, :] < commit[:, None]
            hidden, _, _ = tr.draft(x, pos, None, None, mask, k_t, v_t, cross)
            return torch.nn.functional.linear(hidden[:-1], tr.head)

    with torch.no_grad():
        got = float(draft_loss(tr.draft, target, tr.head, ids, pos, commit, 0.0, 0.0, 1.0))
    want = float(torch.nn.functional.cross_entropy(draft_logits(), greedy))
    assert got == pytest.approx(want, rel=1e-4)
    before = float((draft_logits().argmax(-1) == greedy).float().mean())
    losses = [tr.step_on([(ids, pos, commit)]) for _ in range(10)]
    after = float((draft_logits().argmax(-1) == greedy).float().mean())
    assert losses[-1] < losses[0] - 0.1, losses
    assert after > before, (before, after)


def test_config_rejects_no_loss():
    with pytest.raises(ValueError):
        TrainConfig(ce_weight=0.0, kl_weight=0.0)
    with pytest.raises(ValueError):
        TrainConfig(ce_weight=0.0, greedy_weight=-1.0)
    TrainConfig(ce_weight=0.0, greedy_weight=1.0)
    with pytest.raises(ValueError):
        TrainConfig(batch=0)


def test_time_limit_stops_with_checkpoint(target, tmp_path):
    cfg = TrainConfig(seq_len=16, lr=1e-3, warmup=1, total_steps=1000, max_position=1024)
    tr = LongSpecTrainer(target, init_from_target(target), cfg,
                         stream(target.cfg.vocab_size, 300))
    train(tr, 1000, tmp_path, save_every=10_000, progress=False, max_seconds=0.0)
    assert tr.step == 1
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 1


def test_mixture_sources_weights_and_token_files(tmp_path):
    assert parse_sources("stdlib, traces@4,x.pt@0.5") == [("stdlib", 1.0), ("traces", 4.0),
                                                          ("x.pt", 0.5)]
    for bad in ("", "a@0", "a@x", "@3"):
        with pytest.raises(ValueError):
            parse_sources(bad)
    torch.save(torch.arange(100, 200), tmp_path / "gen.pt")
    (tmp_path / "a.txt").write_text("zzz")
    mix = build_mixture(f"{tmp_path / 'gen.pt'}@3,{tmp_path / 'a.txt'}@1", DataConfig(),
                        lambda text: [7] * 50, 2)
    assert isinstance(mix, Mixture) and mix.tokens == 100 + 51
    assert mix.describe()[str(tmp_path / "gen.pt")] == {"tokens": 100, "documents": 0,
                                                        "weight": 3.0}
    g = torch.Generator().manual_seed(0)
    draws = [mix.sample(8, g) for _ in range(400)]
    from_gen = sum(int(w[0]) >= 100 for w in draws)
    assert 250 < from_gen < 350  # weight 3 : 1
    for w in draws:
        assert w.tolist() == list(range(int(w[0]), int(w[0]) + 8)) or set(w.tolist()) <= {7, 2}
    torch.save(torch.zeros(3, 3), tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        build_mixture(str(tmp_path / "bad.pt"), DataConfig(), lambda t: [1], 2)


def test_frequent_tokens_weighted_by_source():
    from lsrt.runtime.training.data import frequent_tokens

    a = Mixture(parts=[], weights=[], names=[])
    from lsrt.runtime.training.data import Corpus

    # Source 1: token 5 dominates; source 2 (weight 3): token 7 dominates, 5 absent.
    a.parts = [Corpus(tokens=torch.tensor([5] * 8 + [1, 2]), documents=1),
               Corpus(tokens=torch.tensor([7] * 6 + [2] * 4), documents=1)]
    a.weights, a.names = [1.0, 3.0], ["x", "y"]
    assert frequent_tokens(a, 10, 4).tolist() == [7, 2, 5, 1]
    assert frequent_tokens(a, 10, 10).tolist()[4:] == [0, 3, 4, 6, 8, 9]
    with pytest.raises(ValueError):
        frequent_tokens(a, 10, 0)


def same_loss_then_trains(target, cfg, old, grown):
    """`grown` (made from `old`) has `old`'s loss on a sample, and 12 steps on that sample
    lower it. -> the trainer and the sample."""
    tr = LongSpecTrainer(target, grown, cfg, stream(target.cfg.vocab_size, 500))
    ids, pos, commit = tr.sample()
    with torch.no_grad():
        before = [float(draft_loss(d, target, tr.head, ids, pos, commit, 1.0, 0.0))
                  for d in (old, grown)]
    assert before[1] == pytest.approx(before[0], rel=1e-6, abs=1e-6)
    losses = [tr.step_on([(ids, pos, commit)]) for _ in range(12)]
    assert losses[-1] < losses[0] - 0.1, losses
    return tr, (ids, pos, commit)


def test_feature_keeps_the_output_then_trains(target, tmp_path):
    """`add_feature` gives a trained draft the target's feature without changing its loss
    (`feat_w` starts at zero); training moves `feat_w`, and the feature is what lowers the
    loss: the same draft fed zeros instead does worse. Saves, loads and drafts."""
    cfg = TrainConfig(seq_len=48, lr=3e-3, warmup=1, total_steps=20, max_position=4096,
                      kl_weight=1.0, ce_weight=0.0, max_lag=6)
    plain = perturbed_draft(target)
    feat = add_feature(plain)
    assert feat.lcfg.feature and not feat.feat_w.any()
    with pytest.raises(ValueError, match="already"):
        add_feature(feat)
    tr, (ids, pos, commit) = same_loss_then_trains(target, cfg, plain, feat)
    assert feat.feat_w.abs().sum() > 0
    blind = add_feature(plain)  # the trained weights, but the feature zeroed
    with torch.no_grad():
        for name, p in blind.named_parameters():
            p.copy_(dict(feat.named_parameters())[name])
        blind.feat_w.zero_()
        seen = float(draft_loss(feat, target, tr.head, ids, pos, commit, 1.0, 0.0))
        unseen = float(draft_loss(blind, target, tr.head, ids, pos, commit, 1.0, 0.0))
    assert seen < unseen, (seen, unseen)
    train(tr, tr.step + 1, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["feature"] is True
    loaded = load_draft(tmp_path, target.cfg)
    for name, p in feat.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p.detach())
    assert init_from_target(target, LongSpecConfig(feature=True)).feat_w.shape == \
        (target.cfg.hidden_size, target.cfg.hidden_size)


def test_feature_layers_keep_the_output_then_train(target, tmp_path):
    """`add_feature(draft, layers)` appends the tapped layers' blocks to a feature draft's
    `feat_w` at zero (the same loss), training moves them, and the layers round-trip through
    save/load. Bad layer lists are refused."""
    cfg = TrainConfig(seq_len=48, lr=3e-3, warmup=1, total_steps=20, max_position=4096,
                      kl_weight=1.0, ce_weight=0.0, max_lag=6)
    h = target.cfg.hidden_size
    feat = add_feature(perturbed_draft(target))
    with torch.no_grad():
        feat.feat_w.normal_(0, 0.05)
    layered = add_feature(feat, (0,))
    assert layered.lcfg.feature_layers == (0,) and layered.feat_w.shape == (h, 2 * h)
    assert torch.equal(layered.feat_w[:, :h], feat.feat_w) and not layered.feat_w[:, h:].any()
    with pytest.raises(ValueError, match="already"):
        add_feature(layered, (0,))
    tr, _ = same_loss_then_trains(target, cfg, feat, layered)
    assert layered.feat_w[:, h:].abs().sum() > 0
    train(tr, tr.step + 1, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["feature_layers"] == [0]
    loaded = load_draft(tmp_path, target.cfg)
    assert loaded.lcfg.feature_layers == (0,)
    for name, p in layered.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], p.detach())
    for bad in ((1, 0), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="feature_layers"):
            LongSpecConfig(feature=True, feature_layers=bad)
    with pytest.raises(ValueError, match="feature_layers"):
        LongSpecConfig(feature_layers=(0,))  # without the feature
    with pytest.raises(ValueError, match="final hidden state"):
        init_from_target(target, LongSpecConfig(feature=True, feature_layers=(1,)))  # the last
