"""Training the LongSpec draft layer against a frozen lsrt target (`lsrt train-draft`).

One sample = a window of the token stream. The target runs over it (frozen, no grad) with the
sample's positions; its last layer's post-RoPE K/V are kept (they are simply the last layer of
a scratch KV pool the size of the sample: no hook in model.py). The draft then runs over the
same tokens and positions:

- self-attention: causal over sinks + the `window` positions before the segment start, plus
  the segment itself (as the inference cache plus the tree);
- cross-attention lag, as at inference: the sample is cut into random segments of 1..max_lag
  tokens; a query in a segment starting at index c sees the target's keys at indices < c (a
  draft query at depth d of a tree sees committed target KV only: lag d + 1);
- feature (drafts with `LongSpecConfig.feature`): a query in a segment starting at c reads the
  target's final hidden state at index c - 1, the last committed position (zeros when c = 0),
  and the residual streams of its `feature_layers` there;
- positions: `short` stage = Anchor-Offset indices (the first `anchor_sinks` tokens keep
  0..s-1, the rest shift by a random offset so short samples see long-context positions);
  `long` stage = plain 0..L-1.

Loss: `ce_weight` x next-token cross-entropy of the data through the frozen lm_head, plus
`kl_weight` x KL(target || draft) (distillation on the target's own logits), plus
`greedy_weight` x cross-entropy against the target's own argmax token at each position (what a
greedy verifier accepts: the draft's top choice should be the target's, whatever the rest of the
target's distribution looks like). One optimizer step
averages `batch` samples (gradient accumulation). On CUDA the forward passes run under bf16
autocast (the draft's weights and optimizer stay float32). Checkpoint: `draft.safetensors` + `config.json`
(`lsrt.runtime.spec.longspec_ckpt.save_draft`) and `trainer_state.pt` (optimizer, step, RNG).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lsrt.runtime.attention import AttentionMeta, SdpaAttention
from lsrt.runtime.model import DecoderModel
from lsrt.runtime.spec.longspec_layer import LongSpecDraft
from lsrt.runtime.training.data import Mixture, sample_window


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seq_len: int = 1024
    stage: str = "short"  # short: Anchor-Offset positions | long: plain positions
    lr: float = 1e-4
    warmup: int = 20
    total_steps: int = 1000  # for the cosine schedule
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 0.0
    ce_weight: float = 1.0
    greedy_weight: float = 0.0
    batch: int = 1  # samples per optimizer step (gradient accumulation)
    anchor_sinks: int = 4
    max_position: int = 4096  # Anchor-Offset positions stay below this
    max_lag: int = 4  # = the deepest tree the drafter builds
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in ("short", "long"):
            raise ValueError(f"stage must be short or long, got {self.stage!r}")
        if self.seq_len < 2 or self.max_lag < 1 or self.anchor_sinks < 0 or self.lr <= 0:
            raise ValueError("seq_len >= 2, max_lag >= 1, anchor_sinks >= 0, lr > 0 required")
        weights = (self.ce_weight, self.kl_weight, self.greedy_weight)
        if self.batch < 1 or min(weights) < 0 or not any(weights):
            raise ValueError("batch >= 1 and non-negative loss weights, not all zero, required")
        if self.max_position < self.seq_len:
            raise ValueError(f"max_position {self.max_position} < seq_len {self.seq_len}")


def anchor_offset_positions(length: int, sinks: int, max_position: int,
                            gen: torch.Generator) -> torch.Tensor:
    """`[length]`: 0..s-1 for the first `sinks` tokens, then s + offset, s + offset + 1, ...
    with offset uniform in [0, max_position - length] (so every position < max_position)."""
    offset = int(torch.randint(0, max_position - length + 1, (1,), generator=gen))
    pos = torch.arange(length)
    pos[min(sinks, length):] += offset
    return pos


def lag_commit(length: int, max_lag: int, gen: torch.Generator) -> torch.Tensor:
    """`[length]`: query t sees target indices < commit[t]; segments of 1..max_lag tokens
    (commit = the segment's start), so the lag t - commit[t] + 1 lies in [1, max_lag]."""
    commit = torch.empty(length, dtype=torch.long)
    t = 0
    while t < length:
        n = int(torch.randint(1, max_lag + 1, (1,), generator=gen))
        commit[t:t + n] = t
        t += n
    return commit


def self_window_mask(commit: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """`[L, L]` bool from commit `[L]`: key j visible to query t iff j <= t and (j < sink or
    j >= commit[t] - window). As at inference: the own cache holds the sinks and the `window`
    positions before the root (= commit[t]); the tree tokens root..t are all visible."""
    n = commit.shape[0]
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= t) & ((j < sink) | (j >= commit[:, None] - window))


@torch.no_grad()
def target_last_kv(target: DecoderModel, ids: torch.Tensor, positions: torch.Tensor,
                   taps: tuple[int, ...] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids/positions `[L]` -> last-layer k, v `[Hkv, L, D]` (post-RoPE) and the target's final
    hidden states `[L, H]` (with the `taps` layers' appended: `DecoderModel.forward`), from one
    causal pass into a scratch pool of L slots."""
    cfg, n = target.cfg, ids.shape[0]
    shape = (cfg.num_layers, cfg.num_kv_heads, n, cfg.head_dim)
    kp = torch.empty(shape, dtype=target.dtype, device=target.device)
    vp = torch.empty_like(kp)
    dev = target.device
    meta = AttentionMeta(write_slots=torch.arange(n, device=dev), prefix_len=0,
                         prefix_slots=None, kv_span=(0, n),
                         new_mask=torch.ones((n, n), dtype=torch.bool, device=dev).tril_(),
                         scale=cfg.head_dim ** -0.5)
    hidden = target(ids.to(dev), positions.to(dev), kp, vp, meta, SdpaAttention(), taps=taps)
    return kp[-1].clone(), vp[-1].clone(), hidden


def draft_hidden(draft: LongSpecDraft, target: DecoderModel, ids: torch.Tensor,
                 positions: torch.Tensor, commit: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's hidden states `[L, H]` (ready for lm_head) over one sample, with the lag
    and own-window masks inference has, and the target's final hidden states `[L, H]`."""
    n = ids.shape[0]
    k_t, v_t, feat_t = target_last_kv(target, ids, positions, draft.lcfg.feature_layers)
    hid_t = feat_t[:, :target.cfg.hidden_size]
    x = target.embed[ids.to(target.device)].to(device, dtype)
    lc = draft.lcfg
    self_mask = self_window_mask(commit, lc.sink, lc.window).to(device)
    cross_mask = (torch.arange(n)[None, :] < commit[:, None]).to(device)
    feature = None
    if draft.feat_w is not None:  # the target's feature at each query's last committed
        last = (commit - 1).clamp(min=0).to(feat_t.device)  # position (none before the first)
        feature = (feat_t[last] * (commit > 0).to(feat_t)[:, None]).to(device, dtype)
    hidden, _, _ = draft(x, positions.to(device), None, None, self_mask, k_t.to(device, dtype),
                         v_t.to(device, dtype), cross_mask, feature=feature)
    return hidden, hid_t


def draft_loss(draft: LongSpecDraft, target: DecoderModel, head: torch.Tensor,
               ids: torch.Tensor, positions: torch.Tensor, commit: torch.Tensor,
               kl_weight: float = 0.0, ce_weight: float = 1.0, greedy_weight: float = 0.0
               ) -> torch.Tensor:
    """Mean next-token loss of the draft on one sample (ids/positions/commit `[L]`).

    head `[V, H]`: the target's lm_head in the draft's dtype (frozen). The weights are
    TrainConfig's (data cross-entropy, KL to the target, cross-entropy to the target's argmax).
    """
    dev, dt = head.device, head.dtype
    hidden, hid_t = draft_hidden(draft, target, ids, positions, commit, dev, dt)
    logits = F.linear(hidden[:-1], head).float()  # [L-1, V]
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits, ids[1:].to(dev))
    if kl_weight or greedy_weight:
        with torch.no_grad():
            p_log = F.linear(hid_t[:-1].to(dev, dt), head).float().log_softmax(-1)
    if kl_weight:
        kl = F.kl_div(logits.log_softmax(-1), p_log, log_target=True, reduction="batchmean")
        loss = loss + kl_weight * kl
    if greedy_weight:
        loss = loss + greedy_weight * F.cross_entropy(logits, p_log.argmax(-1))
    return loss


class LongSpecTrainer:
    """Owns the optimizer, the step counter and the sampling generator (all resumable)."""

    def __init__(self, target: DecoderModel, draft: LongSpecDraft, cfg: TrainConfig,
                 data: torch.Tensor | Mixture, *, device: str = "cpu") -> None:
        """`data`: one token stream, or a weighted `Mixture` of streams."""
        self.target, self.cfg, self.data = target, cfg, data
        self.autocast = torch.device(device).type == "cuda"
        self.draft = draft.to(device=device, dtype=torch.float32).train()
        self.head = target.lm_head.detach().to(device, torch.float32)
        self.opt = torch.optim.AdamW(self.draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.losses: list[float] = []

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine down to 10% over `total_steps`."""
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        frac = min(1.0, (step - c.warmup) / max(1, c.total_steps - c.warmup))
        return c.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        ids = (self.data.sample(c.seq_len, self.gen) if isinstance(self.data, Mixture)
               else sample_window(self.data, c.seq_len, self.gen))
        pos = (anchor_offset_positions(c.seq_len, c.anchor_sinks, c.max_position, self.gen)
               if c.stage == "short" else torch.arange(c.seq_len))
        return ids, pos, lag_commit(c.seq_len, c.max_lag, self.gen)

    def train_step(self) -> float:
        """One optimizer step over `batch` freshly drawn samples; returns their mean loss."""
        return self.step_on([self.sample() for _ in range(self.cfg.batch)])

    def step_on(self, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                ) -> float:
        """One optimizer step on (ids, positions, commit) samples (gradients averaged)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        total = 0.0
        for ids, pos, commit in samples:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = draft_loss(self.draft, self.target, self.head, ids, pos, commit,
                                  self.cfg.kl_weight, self.cfg.ce_weight,
                                  self.cfg.greedy_weight)
            (loss / len(samples)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total / len(samples))
        return self.losses[-1]

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "losses": list(self.losses),
                "train_config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.losses = list(state["losses"])


def save_checkpoint(trainer: LongSpecTrainer, out_dir: str | Path, extra: dict | None = None
                    ) -> None:
    """Draft weights + JSON config (loadable by `longspec:DIR`) and the trainer state."""
    from lsrt.runtime.spec.longspec_ckpt import save_draft, target_digest

    out = Path(out_dir)
    save_draft(trainer.draft, out, {"train": asdict(trainer.cfg), "step": trainer.step,
                                    "target_digest": target_digest(trainer.target),
                                    **(extra or {})})
    torch.save(trainer.state_dict(), out / "trainer_state.pt.tmp")
    (out / "trainer_state.pt.tmp").replace(out / "trainer_state.pt")


def resume(trainer: LongSpecTrainer, out_dir: str | Path) -> None:
    """Restore draft weights, optimizer, step and sampling RNG saved by `save_checkpoint`."""
    from lsrt.runtime.spec.longspec_ckpt import load_draft

    out = Path(out_dir)
    draft = load_draft(out, trainer.target.cfg)
    with torch.no_grad():
        for name, p in trainer.draft.named_parameters():
            p.copy_(dict(draft.named_parameters())[name])
    trainer.load_state_dict(torch.load(out / "trainer_state.pt", weights_only=True))


def train(trainer: LongSpecTrainer, steps: int, out_dir: str | Path | None = None, *,
          save_every: int = 100, progress: bool = True, extra: dict | None = None,
          max_seconds: float | None = None) -> list[float]:
    """Run until `trainer.step == steps` (or `max_seconds` have passed: the run then stops
    with a checkpoint, to be continued with `--resume`), saving every `save_every` steps."""
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=trainer.step, disable=not progress, desc="train-draft")
    t0, done = time.perf_counter(), 0
    while trainer.step < steps:
        loss = trainer.train_step()
        done += trainer.cfg.seq_len * trainer.cfg.batch
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{done / elapsed:.0f}")
        out_of_time = max_seconds is not None and elapsed >= max_seconds
        if out_dir is not None and (trainer.step % save_every == 0 or trainer.step == steps
                                    or out_of_time):
            save_checkpoint(trainer, out_dir, extra)
        if out_of_time:
            break
    bar.close()
    return trainer.losses


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsrt train-draft",
                                description="train a LongSpec draft layer for a target model")
    p.add_argument("--target", required=True, help="registry name or HF model directory")
    p.add_argument("--data", default="stdlib,traces",
                   help="comma list of stdlib, packages, traces, paths or token .pt files, "
                   "each optionally SOURCE@WEIGHT (sampling weight; default stdlib,traces)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stage", choices=("short", "long"), default="short")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", help="start from these draft weights (e.g. the short stage's "
                   "checkpoint, or a published sail/longspec-* file) instead of the target")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the frozen target's dtype (the draft trains in float32)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl", type=float, default=0.0, help="weight of KL(target || draft)")
    p.add_argument("--ce", type=float, default=1.0,
                   help="weight of the next-token cross-entropy on the data")
    p.add_argument("--greedy", type=float, default=0.0,
                   help="weight of the cross-entropy against the target's own argmax token "
                   "(greedy distillation: what a greedy verifier accepts)")
    p.add_argument("--batch", type=int, default=1, help="samples per optimizer step")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="draft only the K most frequent tokens of the data (0: all)")
    p.add_argument("--max-minutes", type=float,
                   help="stop (with a checkpoint) after this long; continue with --resume")
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--holdout", type=int, default=3, help="first N traces per file held out")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--mlp-width", type=int,
                   help="the draft MLP's hidden units (default: the --init draft's, else the "
                   "target's); a wider width grows the starting draft without changing its "
                   "output (new units' down-projection columns start at zero)")
    p.add_argument("--feature", action="store_true",
                   help="the draft reads the target's final hidden state at the last committed "
                   "position (EAGLE's feature; added to an --init draft without changing its "
                   "output: the new projection starts at zero)")
    p.add_argument("--feature-layers", default="",
                   help="comma-separated target layers (0-based) whose residual stream is "
                   "appended to the feature (EAGLE-3's low and middle layers; implies "
                   "--feature; added to an --init draft reading the final hidden state alone "
                   "without changing its output)")
    p.add_argument("--max-lag", type=int, default=4)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """`lsrt train-draft ...`: returns a process exit status."""
    from lsrt.runtime.model import load_model
    from lsrt.runtime.models import resolve_model
    from lsrt.runtime.runner import DTYPES
    from lsrt.runtime.spec.longspec_layer import (LongSpecConfig, add_feature, init_from_target,
                                                  widen_mlp)
    from lsrt.runtime.spec.longspec_ckpt import (is_own_checkpoint, load_draft,
                                                 load_longspec_checkpoint)
    from lsrt.runtime.tokenizer import Tokenizer
    from lsrt.runtime.training.data import (DataConfig, build_mixture, frequent_tokens,
                                            parse_sources)

    a = build_parser().parse_args(argv)
    try:
        layers = tuple(int(x) for x in a.feature_layers.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--feature-layers: comma-separated layer indices, got "
                         f"{a.feature_layers!r}") from None
    a.feature = a.feature or bool(layers)
    sources = parse_sources(a.data)
    model_dir = resolve_model(a.target, progress=not a.no_progress)
    target = load_model(model_dir, dtype=DTYPES[a.dtype], device=a.device)
    tok = Tokenizer(model_dir)
    eos = tok.eos_token_id if tok.eos_token_id is not None else target.cfg.eos_token_ids[0]
    dcfg = DataConfig(sources=tuple(name for name, _ in sources),
                      max_tokens=a.max_tokens, holdout=a.holdout, seed=a.seed)
    mixture = build_mixture(a.data, dcfg, tok.encode, eos)
    if not a.no_progress:
        print(f"data: {mixture.tokens} tokens: {json.dumps(mixture.describe())}", flush=True)
    tcfg = TrainConfig(seq_len=a.seq_len, stage=a.stage, lr=a.lr, total_steps=a.steps,
                       kl_weight=a.kl, ce_weight=a.ce, greedy_weight=a.greedy, batch=a.batch,
                       max_lag=a.max_lag,
                       seed=a.seed,
                       max_position=max(a.seq_len, target.cfg.context_limit))
    if a.init:
        draft = (load_draft(a.init, target.cfg) if is_own_checkpoint(a.init)
                 else load_longspec_checkpoint(a.init, target.cfg))
    else:
        draft = init_from_target(target, LongSpecConfig(sink=a.sink, window=a.window,
                                                        feature=a.feature,
                                                        feature_layers=layers))
    if (a.feature and draft.feat_w is None) or (layers and not draft.lcfg.feature_layers):
        draft = add_feature(draft, layers)
    elif layers and draft.lcfg.feature_layers != layers:
        raise SystemExit(f"--feature-layers {a.feature_layers}: the --init draft reads layers "
                         f"{list(draft.lcfg.feature_layers)}")
    if a.mlp_width is not None and a.mlp_width != draft.mlp_width:
        draft = widen_mlp(draft, a.mlp_width, seed=a.seed)
    if a.draft_vocab:
        draft.set_draft_vocab(frequent_tokens(mixture, target.cfg.vocab_size, a.draft_vocab))
    trainer = LongSpecTrainer(target, draft, tcfg, mixture, device=a.device)
    if a.resume and is_own_checkpoint(a.out) and (Path(a.out) / "trainer_state.pt").is_file():
        resume(trainer, a.out)
    held = sorted({h for part in mixture.parts for h in part.held_out})
    extra = {"data": {**asdict(dcfg), "spec": a.data, "tokens": mixture.tokens,
                      "sources": mixture.describe(), "held_out_traces": held},
             "target_name": a.target}
    losses = train(trainer, a.steps, a.out, save_every=a.save_every,
                   progress=not a.no_progress, extra=extra,
                   max_seconds=None if a.max_minutes is None else 60 * a.max_minutes)
    if losses:
        print(f"step {trainer.step}: loss {losses[-1]:.4f} -> {Path(a.out) / 'draft.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
