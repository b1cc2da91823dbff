"""What LongSpec drafters of one draft on one runner share: the draft weights, the device
buffers a proposal reads and writes, and the CUDA graphs captured over them.

A graph replays against fixed addresses, so a drafter with its own buffers captures its own
graphs: every session (or stateless request) paid the eager first proposals and the capture.
Drafters made through one `workspaces` dict (`make_longspec_drafter`; an `LLM` keeps one) share a
workspace instead. One drafter owns it at a time: taking it over saves the previous owner's own
cache (the sink + window ring, a few hundred KB) and loads the new owner's, and marks the cross
buffer (a copy of the target's last-layer K/V) stale, so that the next proposal re-copies it
from the new owner's sequence. Model work runs one sequence at a time (the session manager's
model lock); the workspace's own lock also covers exports and imports made outside it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from lsrt.runtime.runner import ModelRunner
from lsrt.runtime.spec.longspec_layer import LongSpecDraft

# The cross buffer (the target's last-layer K/V) starts this large, capped at the context limit:
# every growth re-captures the drafter's graphs, and SmolLM2's whole 8K context is 6 MB.
CROSS_START_BYTES = 64 << 20
# Up to this many newly accepted tokens are encoded into the draft's own ring inside the
# proposal (its graph on CUDA); a longer catch-up (the first proposal of a turn, or after a long
# stretch the drafter did not draft) runs eagerly first. `auto` drafts after suffix steps that
# accepted up to ~16 tokens at once.
ENCODE_PAD = 32
# Page size the Triton cross-attention reads the cross buffer with (any power of two works: the
# buffer is contiguous, its block table the identity).
CROSS_PAGE = 64


class LongSpecWorkspace:
    """The draft (on the target's device and dtype), its head rows, the own-cache ring, the cross
    buffer, the staged host inputs and the captured graphs; owned by one drafter at a time."""

    def __init__(self, runner: ModelRunner, draft: LongSpecDraft,
                 cross_start: int | None = None, cross_kernel: str | None = None) -> None:
        model, cfg = runner.model, runner.cfg
        dev, dtype = model.device, model.dtype
        self.draft = draft.to(device=dev, dtype=dtype).eval()
        self.draft.ops = model.ops  # Triton norms / RoPE / SiLU-mul where the target has them
        self.draft.linear = model.linear  # oneDNN's prepacked weights where the target has them
        self.draft.inv_freq = self.draft.inv_freq.to(dev)  # no host copies inside a graph
        ids = draft.vocab_ids
        # The head rows drafts are drawn from (all, or the draft vocabulary's), and their ids.
        self.head = (model.lm_head if ids is None
                     else model.lm_head[ids.to(dev)].contiguous())
        self.head_ids_t = None if ids is None else ids.to(dev)
        if hasattr(model.linear, "prepare"):
            model.linear.prepare([*self.draft.projection_weights(), self.head])
        self.sink, self.window = draft.lcfg.sink, draft.lcfg.window
        # The ring: sink + window slots, and one scratch slot (never visible) that padded rows
        # of an in-graph encode write to.
        self.scratch = self.sink + self.window
        shape = (cfg.num_kv_heads, self.scratch + 1, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        # The position each own-cache slot holds (-1: none); validity is computed from it on
        # the device, so a proposal reads the whole ring at a fixed shape.
        self.slot_pos = torch.full((self.scratch + 1,), -1, dtype=torch.long, device=dev)
        # The target's last-layer K/V of committed positions, copied as they commit into a
        # buffer of fixed capacity (doubling when outgrown): fixed shapes again.
        per_position = 2 * cfg.num_kv_heads * cfg.head_dim * self.k.element_size()
        self.cross_start = cross_start or max(1024, CROSS_START_BYTES // per_position)
        self.xk: torch.Tensor | None = None
        self.xv: torch.Tensor | None = None
        self.x_len = 0  # positions [0, x_len) of xk/xv are current (for the owner's sequence)
        # Cross-attention: "sdpa" (masked SDPA over the whole buffer) or "triton" (the graph-safe
        # split-K tree kernel over [0, committed), the buffer read as identity pages of
        # CROSS_PAGE positions, `x_table`); None: "triton" where the target's attention is.
        kernel = cross_kernel or ("triton" if runner.config.attention == "triton" else "sdpa")
        if kernel not in ("sdpa", "triton"):
            raise ValueError(f"longspec cross_kernel must be sdpa or triton, got {kernel!r}")
        self.cross_kernel = kernel
        self.x_table: torch.Tensor | None = None
        # What a proposal reads from the host, staged in one copy: root, lo, committed, the
        # root token, then ENCODE_PAD token ids and positions to encode (position -1: none).
        self._stage = torch.zeros(4 + 2 * ENCODE_PAD, dtype=torch.long, device=dev)
        self._stage_host = torch.zeros(self._stage.shape, dtype=torch.long,
                                       pin_memory=dev.type == "cuda")
        # Written through numpy (cheaper per proposal than building a tensor). Safe to reuse:
        # each proposal reads its tree back (a synchronisation) before the next one stages.
        self._stage_np = self._stage_host.numpy()
        self._scalars, self._root_token = self._stage[:3], self._stage[3:4]
        self._root_enc_ids = self._stage[3:4 + ENCODE_PAD]  # the root token, then staged ids
        self._enc_pos = self._stage[4 + ENCODE_PAD:]
        # The target's feature at the last committed position (drafts with `feature`: its final
        # hidden state, then its `feature_layers`' residual streams, which the runner is told
        # to tap), copied in before each proposal (`load_feature`).
        self.runner = runner
        self._feature = torch.zeros((1, cfg.hidden_size * max(1, draft.lcfg.feature_width)),
                                    dtype=dtype, device=dev)
        self._feature_index: dict[tuple[int, ...], torch.Tensor] = {}  # runner taps -> blocks
        if draft.lcfg.feature_layers:
            runner.tap_layers(draft.lcfg.feature_layers)
        self._graphs: dict[tuple, tuple] = {}  # (level sizes, capacity) -> graph, outputs
        self._uses: dict[tuple, int] = {}  # proposals per key (short runs stay eager)
        self._mempool = None
        self.lock = threading.Lock()
        self._owner: weakref.ref | None = None

    def load_feature(self, feature: torch.Tensor | None) -> None:
        """Copy the blocks the draft reads of a sequence's feature row (`[H * (1 + taps)]`:
        the final hidden state, then the runner's tapped layers) into `_feature`; zeros when
        the sequence does not know its feature (e.g. restored without its last forward pass)
        or computed it under fewer taps (before this draft was loaded)."""
        taps, h = self.runner.feature_taps, self.draft.cfg.hidden_size
        if feature is None or feature.numel() != h * (1 + len(taps)):
            self._feature.zero_()
            return
        index = self._feature_index.get(taps)
        if index is None:
            blocks = self.runner.feature_blocks(self.draft.lcfg.feature_layers)
            index = torch.tensor(blocks, device=self._feature.device)
            self._feature_index[taps] = index
        self._feature.copy_(feature.view(-1, h).index_select(0, index).view(1, -1))

    def owned_by(self, drafter) -> bool:
        return self._owner is not None and self._owner() is drafter

    def acquire(self, drafter) -> None:
        """Make `drafter` the owner (call with `lock` held): its own cache in the ring (saved
        from where it was left, or empty), the cross buffer marked stale."""
        owner = self._owner() if self._owner is not None else None
        if owner is drafter:
            return
        if owner is not None:
            owner.saved_ring = (self.k.clone(), self.v.clone(), self.slot_pos.clone())
        saved = drafter.saved_ring
        if saved is None:
            self.slot_pos.fill_(-1)
        else:
            self.k.copy_(saved[0])
            self.v.copy_(saved[1])
            self.slot_pos.copy_(saved[2])
            drafter.saved_ring = None
        self.x_len = 0
        self._owner = weakref.ref(drafter)
