"""LongSpec's one-layer draft model, which reads the target's last-layer KV.

The draft layer (built from the target's config, fed the target's frozen token embeddings):

    x  = embed[token]
    x += SelfAttn(norm(x))      own K/V, sink + sliding window, RoPE at the draft position
    x += feat_w @ f             optional (`LongSpecConfig.feature`): f = the target's final
                                hidden state at the last committed position (EAGLE's feature),
                                then its residual stream after each of `feature_layers`
                                (normalised; EAGLE-3's low and middle layers)
    x += CrossAttn(norm(x))     query only; K/V = the target's LAST layer, committed positions
    x += MLP(norm(x))
    logits = lm_head(final_norm(x))   (final_norm absent in the published checkpoints)

The draft's own K/V depend only on (token, position) — they are projections of embeddings —
so keeping the cache up to date costs one matmul per history token, no attention.

Cross-attention lag: a draft query at position `N + d` (tree depth d, root at N =
seq.num_tokens) attends to the target's last-layer keys of positions `< N` only — the target
KV that is committed — never to the KV of uncommitted tree tokens. Training reproduces this
(`lsrt.runtime.training.longspec_train.lag_commit`). Keys are post-RoPE at absolute positions
in both caches ("post-rope-absolute"). The drafter that runs it is `longspec`; checkpoint
loading and saving live in `longspec_ckpt`; docs/LONGSPEC.md has the checkpoint key mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lsrt.runtime.config import ModelConfig, rope_inv_freq
from lsrt.kernels.elementwise import ElementwiseOps, get_elementwise_ops
from lsrt.kernels.linear import Linear
from lsrt.kernels.linear.reference import linear as torch_linear
from lsrt.runtime.model import DecoderModel

POSITIONS = "post-rope-absolute"


@dataclass(frozen=True, kw_only=True)
class LongSpecConfig:
    """How the draft layer attends to its own history (training and inference must agree)."""

    sink: int = 4
    window: int = 512
    final_norm: bool = True
    mlp_width: int | None = None  # the MLP's hidden units; None: the target's intermediate_size
    # Feed the target's final hidden state (normalised, what its lm_head reads) at the last
    # committed position into the residual after self-attention, through `feat_w` (EAGLE's
    # "feature"): the draft then starts from what all the target's layers computed, not only
    # from its last layer's K/V. The same vector serves every node of a tree.
    feature: bool = False
    # Target layers (0-based) whose residual stream after the layer, RMS-normalised without a
    # weight, is appended to the feature (EAGLE-3 reads a low, a middle and the top layer):
    # feat_w is then `[H, H * (1 + len(feature_layers))]`. Needs `feature`.
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"longspec needs sink >= 0 and window >= 1, got {self.sink}, "
                             f"{self.window}")
        if self.mlp_width is not None and self.mlp_width < 1:
            raise ValueError(f"longspec mlp_width must be >= 1, got {self.mlp_width}")
        layers = self.feature_layers
        if layers and (not self.feature or any(i < 0 for i in layers)
                       or list(layers) != sorted(set(layers))):
            raise ValueError("longspec feature_layers must be distinct increasing layer "
                             f"indices >= 0 of a draft with feature=True, got {layers}")

    @property
    def feature_width(self) -> int:
        """How many hidden-size blocks the feature has (0: the draft reads none)."""
        return (1 + len(self.feature_layers)) if self.feature else 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, check_empty: bool = True) -> torch.Tensor:
    """q `[n, Hq, D]`, k/v `[Hkv, S, D]`, mask `[n, S]` bool (True = visible) -> `[n, Hq, D]`.

    A query that sees no key gets a zero output (LongSpec pads those rows with zeros);
    `check_empty=False` promises there is none (every self-attention row sees its own key) and
    saves a host synchronisation.
    """
    if k.shape[1] == 0:
        return q.new_zeros(q.shape)
    empty = None
    if mask is not None and check_empty:
        empty = ~mask.any(-1)  # [n]
        if bool(empty.any()):
            mask = mask.clone()
            mask[empty, 0] = True
    # [1, Hq, n, D] against [1, Hkv, S, D] with SDPA's own GQA: the flash kernel then splits the
    # long cross-attention context across blocks (a per-KV-head 3-D layout did not, and cost
    # 50-70% of a target step at 32K-128K on an H100).
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    out = out[0].transpose(0, 1)
    if empty is not None:
        out = out * (~empty).to(out.dtype)[:, None, None]
    return out


class LongSpecDraft(torch.nn.Module):
    """The draft layer's own weights; embed and lm_head stay the target's (passed in)."""

    def __init__(self, cfg: ModelConfig, lcfg: LongSpecConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.lcfg = cfg, lcfg or LongSpecConfig()
        self.mlp_width = self.lcfg.mlp_width or cfg.intermediate_size
        h, i, d, hq, hkv = (cfg.hidden_size, self.mlp_width, cfg.head_dim, cfg.num_heads,
                            cfg.num_kv_heads)

        def p(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(*shape))

        self.in_norm, self.ca_norm, self.mlp_norm = p(h), p(h), p(h)
        self.sa_qkv_w, self.sa_qkv_b = p((hq + 2 * hkv) * d, h), p((hq + 2 * hkv) * d)
        self.sa_o_w = p(h, hq * d)
        self.ca_q_w, self.ca_q_b, self.ca_o_w = p(hq * d, h), p(hq * d), p(h, hq * d)
        self.gate_up_w, self.down_w = p(2 * i, h), p(h, i)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = p(d), p(d)
        self.final_norm = p(h) if self.lcfg.final_norm else None
        if any(i >= cfg.num_layers - 1 for i in self.lcfg.feature_layers):
            raise ValueError(f"longspec feature_layers {self.lcfg.feature_layers}: the target "
                             f"has layers 0..{cfg.num_layers - 1}, and the last one's output "
                             "is the final hidden state already in the feature")
        self.feat_w = p(h, h * self.lcfg.feature_width) if self.lcfg.feature else None
        self.register_buffer("vocab_ids", None)  # see set_draft_vocab
        self.inv_freq = rope_inv_freq(cfg)  # `[D/2]` float32, a plain attribute: never cast
        self.scale = d ** -0.5
        # Torch references (differentiable, for training); a drafter sets its target's ops.
        self.ops: ElementwiseOps = get_elementwise_ops("torch")
        self.linear: Linear = torch_linear

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Draft only these token ids (`[K]`, most useful first; None: the whole vocabulary).

        The lm_head read per tree level is then `K x H` instead of `V x H` (FR-Spec's idea): on
        SmolLM2 the head is a fifth of the model, so a full-vocabulary draft level costs a fifth
        of a target step. Tokens outside the set are never drafted; verification, and so the
        output, is unchanged. Saved with the weights (`vocab_ids`, int64).
        """
        if ids is not None:
            ids = ids.detach().to(torch.long).cpu()
            if ids.dim() != 1 or not len(ids) or int(ids.min()) < 0 or \
                    int(ids.max()) >= self.cfg.vocab_size or len(set(ids.tolist())) != len(ids):
                raise ValueError("draft vocabulary must be distinct ids within the vocabulary")
        self.vocab_ids = ids

    def projection_weights(self) -> list[torch.Tensor]:
        """Every own weight `self.linear` multiplies by (the head is the target's)."""
        own = [self.sa_qkv_w, self.sa_o_w, self.ca_q_w, self.ca_o_w, self.gate_up_w,
               self.down_w]
        return own if self.feat_w is None else [*own, self.feat_w]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[n]` -> cos, sin `[n, 1, D]` (the target's RoPE, same scaling)."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def project_self(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[n, H]` embeddings -> q `[n, Hq, D]`, k/v `[n, Hkv, D]` (q, k post-RoPE)."""
        cfg, ops = self.cfg, self.ops
        qkv = self.linear(ops.rms_norm(x, self.in_norm, cfg.rms_norm_eps), self.sa_qkv_w,
                          self.sa_qkv_b)
        norms = (self.q_norm, self.k_norm) if cfg.qk_norm else None
        return ops.rope_qkv(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            qk_norm=norms, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                past_k: torch.Tensor | None, past_v: torch.Tensor | None,
                self_mask: torch.Tensor | None, cross_k: torch.Tensor, cross_v: torch.Tensor,
                cross_mask: torch.Tensor | None, check_empty: bool = True,
                cross_attend: Callable[[torch.Tensor], torch.Tensor] | None = None,
                projected: tuple[torch.Tensor, ...] | None = None,
                feature: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of `n` tokens -> (hidden `[n, H]` ready for lm_head, new k, v `[n, Hkv, D]`).

        x `[n, H]` token embeddings; positions `[n]`; past_k/v `[Hkv, S, D]` (own cache, may be
        None); self_mask `[n, S + n]` over past then new keys (None = all visible); cross_k/v
        `[Hkv, M, D]` the target's last-layer K/V; cross_mask `[n, M]` (None = all visible).
        Every self-attention row must see its own new key (true of causal and tree masks);
        `check_empty=False` promises the same of the cross mask (no host synchronisation).
        cross_attend: computes the cross-attention output `[n, Hq, D]` from its queries instead
        (the drafter's split-K Triton kernel on CUDA; cross_k/v/mask are then not read).
        projected: x's (q, k, v, cos, sin), already computed by `rope` and `project_self` (the
        drafter projects its staged encode rows and the root in one pass).
        feature: `[n, F]` or `[1, F]` (one for every row), the target's feature at each row's
        last committed position (F = H * lcfg.feature_width: the final hidden state, then the
        tapped layers', `DecoderModel.forward(taps=...)`); read only by drafts with `feat_w`
        (None: zeros).
        """
        cfg, ops, lin, n, eps = self.cfg, self.ops, self.linear, x.shape[0], self.cfg.rms_norm_eps
        if projected is None:
            cos, sin = self.rope(positions, x.dtype)
            q, k, v = self.project_self(x, cos, sin)
        else:
            q, k, v, cos, sin = projected
        keys, vals = k.transpose(0, 1), v.transpose(0, 1)
        if past_k is not None:
            keys, vals = torch.cat([past_k, keys], 1), torch.cat([past_v, vals], 1)
        a = attend(q, keys, vals, self_mask, self.scale, check_empty=False)
        r = lin(a.reshape(n, -1), self.sa_o_w)
        if self.feat_w is not None and feature is not None:
            r = r + lin(feature, self.feat_w)
        x, h = ops.add_rms_norm(x, r, self.ca_norm, eps)
        q_norm = (self.q_norm, self.q_norm) if cfg.qk_norm else None
        cq, _, _ = ops.rope_qkv(lin(h, self.ca_q_w, self.ca_q_b), cos, sin, cfg.num_heads,
                                0, cfg.head_dim, qk_norm=q_norm, eps=eps)
        if cross_attend is not None:
            a = cross_attend(cq)
        else:
            a = attend(cq, cross_k, cross_v, cross_mask, self.scale, check_empty)
        x, h = ops.add_rms_norm(x, lin(a.reshape(n, -1), self.ca_o_w), self.mlp_norm, eps)
        m = lin(ops.silu_mul(lin(h, self.gate_up_w)), self.down_w)
        if self.final_norm is not None:
            return ops.add_rms_norm(x, m, self.final_norm, eps)[1], k, v
        return x + m, k, v


@torch.no_grad()
def init_from_target(target: DecoderModel, lcfg: LongSpecConfig | None = None) -> LongSpecDraft:
    """A draft initialised from the target's last layer (LongSpec's recipe), float32, CPU.

    Self- and cross-attention both start from the last layer's attention (the cross query is
    its q projection: at init it reads layer-N keys as the target's own last layer does). An
    `lcfg.mlp_width` above the target's widens the copied MLP (`widen_mlp`).
    """
    cfg, lcfg = target.cfg, lcfg or LongSpecConfig()
    width = None if lcfg.mlp_width in (None, cfg.intermediate_size) else lcfg.mlp_width
    draft = LongSpecDraft(cfg, replace(lcfg, mlp_width=None))
    last = target.layers[-1]
    qn = cfg.num_heads * cfg.head_dim
    src = {"in_norm": last.in_norm, "ca_norm": last.in_norm, "mlp_norm": last.post_norm,
           "sa_qkv_w": last.qkv_w, "sa_o_w": last.o_w, "ca_q_w": last.qkv_w[:qn],
           "ca_o_w": last.o_w, "gate_up_w": last.gate_up_w, "down_w": last.down_w}
    if last.qkv_b is not None:
        src |= {"sa_qkv_b": last.qkv_b, "ca_q_b": last.qkv_b[:qn]}
    if cfg.qk_norm:
        src |= {"q_norm": last.q_norm, "k_norm": last.k_norm}
    if draft.final_norm is not None:
        src["final_norm"] = target.norm
    params = dict(draft.named_parameters())
    for name, t in src.items():
        params[name].copy_(t.float().cpu())
    return draft if width is None else widen_mlp(draft, width)


@torch.no_grad()
def widen_mlp(draft: LongSpecDraft, width: int, seed: int = 0) -> LongSpecDraft:
    """A copy of `draft` whose MLP has `width` hidden units and computes the same function.

    The new units' gate and up rows are random (seeded; scaled like the existing rows), their
    down-projection columns zero: the wider draft starts exactly where `draft` is, and the
    first gradient step reaches the new columns (silu(gate) * up is not zero there).
    """
    old = draft.mlp_width
    if width < old:
        raise ValueError(f"widen_mlp: the MLP has {old} units; cannot narrow it to {width}")
    wide = _rebuilt(draft, replace(draft.lcfg, mlp_width=width), skip=("gate_up_w", "down_w"))
    g = torch.Generator().manual_seed(seed)
    gate, up = draft.gate_up_w.detach().float().cpu().chunk(2)  # [old, H] each
    fresh = [torch.randn(width - old, gate.shape[1], generator=g) * w.std() for w in (gate, up)]
    wide.gate_up_w.copy_(torch.cat([gate, fresh[0], up, fresh[1]]))
    wide.down_w[:, :old] = draft.down_w
    return wide.to(draft.gate_up_w.device, draft.gate_up_w.dtype)


@torch.no_grad()
def add_feature(draft: LongSpecDraft, layers: tuple[int, ...] = ()) -> LongSpecDraft:
    """A copy of `draft` that reads the target's feature (`LongSpecConfig.feature`), with the
    residual streams of `layers` appended (`feature_layers`), and computes the same function:
    the new columns of `feat_w` start at zero (a draft already reading the final hidden state
    keeps that block), so training moves them from there."""
    old = draft.lcfg.feature_layers
    if draft.feat_w is not None and (old or not layers):
        raise ValueError("add_feature: the draft already reads the target's feature"
                         + (f" (layers {old})" if old else ""))
    lcfg = replace(draft.lcfg, feature=True, mlp_width=draft.mlp_width,
                   feature_layers=tuple(layers))
    out = _rebuilt(draft, lcfg, skip=("feat_w",))
    if draft.feat_w is not None:
        out.feat_w[:, :draft.feat_w.shape[1]] = draft.feat_w
    return out.to(draft.gate_up_w.device, draft.gate_up_w.dtype)


def _rebuilt(draft: LongSpecDraft, lcfg: LongSpecConfig, skip: tuple[str, ...] = ()
             ) -> LongSpecDraft:
    """A new float32 CPU draft under `lcfg` with `draft`'s weights (all but `skip`, which stay
    zero) and draft vocabulary."""
    out = LongSpecDraft(draft.cfg, lcfg)
    params = dict(out.named_parameters())
    for name, t in draft.named_parameters():
        if name not in skip:
            params[name].copy_(t)
    out.set_draft_vocab(draft.vocab_ids)
    return out


# -- the drafter ------------------------------------------------------------------------
