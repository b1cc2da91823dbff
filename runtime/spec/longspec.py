"""`longspec[:PATH]` drafter: proposes a beam tree with LongSpec's one-layer draft
(`longspec_layer`), keeping the draft's own sink + window cache and a copy of the target's
committed last-layer K/V; on CUDA a whole proposal replays one captured graph
(docs/LONGSPEC.md, "Drafting on CUDA"). The draft, those buffers and the graphs live in a
`LongSpecWorkspace` that the drafters of one `LLM` share.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import torch

from lsrt.runtime.kv_cache import KVSequence
from lsrt.runtime.runner import ModelRunner
from lsrt.runtime.spec.budget import NodePrice
from lsrt.runtime.spec.drafter import DraftState
from lsrt.runtime.spec.longspec_ckpt import (find_bundled_draft, is_own_checkpoint, load_draft,
                                             load_longspec_checkpoint)
from lsrt.runtime.spec.longspec_layer import POSITIONS, LongSpecDraft, init_from_target
from lsrt.runtime.spec.longspec_workspace import CROSS_PAGE, ENCODE_PAD, LongSpecWorkspace
from lsrt.runtime.spec.tree import DraftTree

# On CUDA a proposal shape is captured in a graph on its 3rd use: a drafter that lives for a
# few steps only (a short stateless request) does not pay the capture.
EAGER_BEFORE_CAPTURE = 2
# Tree shape (nodes added per depth) by node budget, when none is given: wide first levels. On
# an H100 with SmolLM2 and the shipped draft, at 16 nodes (4, 3, 2, 2, 2, 2) accepted 3.60 /
# 2.50 / 2.96 tokens per step (SWE-agent / mini-swe-agent / tau-bench) against 3.39 / 2.37 /
# 2.73 for (2, 2, 2, 2, 2, 2), and at 32 nodes (6, 5, 4, 4, 4, 4, 3) 3.95 / 2.70 / 3.24, at
# about the same cost per step (docs/BENCHMARKS.md, "Issue 8, round 4").
DEFAULT_WIDTHS = {8: (4, 3), 16: (4, 3, 2, 2, 2, 2), 32: (6, 5, 4, 4, 4, 4, 3)}


def default_widths(max_nodes: int) -> tuple[int, ...]:
    """The default shape for a budget of `max_nodes` nodes (that of the largest tabled budget
    within it; the smallest one, cut to fit, below that)."""
    fits = [b for b in DEFAULT_WIDTHS if b <= max_nodes]
    return DEFAULT_WIDTHS[max(fits) if fits else min(DEFAULT_WIDTHS)]


def _pruned(tokens: torch.Tensor, parents: torch.Tensor, cum: torch.Tensor, keep: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens; parents) `[2, keep]` and the cumulative log-probabilities `[keep]` of the
    `keep` nodes with the highest cumulative draft log-probability (the root included), in
    their drafted order and with parents renumbered.

    The kept set is closed under ancestors: a child's log-probability is its parent's plus a
    log-probability <= 0, and a penalty of 1e-4 per node index (children come after their
    parents) breaks the ties of a child drafted with probability 1. Device ops only."""
    total = tokens.shape[0]
    order = torch.arange(total, device=tokens.device)
    kept = (cum - 1e-4 * order).topk(keep).indices.sort().values
    renumber = torch.full((total,), -1, dtype=torch.long, device=tokens.device)
    renumber[kept] = order[:keep]
    par = parents[kept]
    return (torch.stack((tokens[kept], torch.where(par >= 0, renumber[par.clamp(min=0)], -1))),
            cum[kept])


def _shared(name: str) -> property:
    return property(lambda self: getattr(self.ws, name),
                    lambda self, value: setattr(self.ws, name, value))


class LongSpecDrafter:
    """Drafter protocol over a LongSpecDraft: a top-k tree, `widths[d]` nodes at depth d + 1
    (None: `default_widths` of each proposal's node budget). A drafted tree larger than the
    proposal's node budget keeps its likeliest nodes by cumulative draft log-probability
    (`_pruned`; EAGLE-2's re-ranking), not its first levels.

    With a `price` (set by a cost-aware engine before each proposal, `budget.py`) it keeps only
    the nodes whose estimated acceptance probability clears the price's floor: the draft's
    probability of the node's path, times how many of its verified nodes were really accepted
    per node predicted over its recent proposals (`calibration`). Drafting eagerly (the CPU),
    it also stops before a level no node of which could clear the floor plus the measured cost
    of drafting a level. A proposal of no node that clears it is None (a plain step).

    Deterministic (draft_probs None), so the sampling verifier stays exact. Its own cache keeps
    `sink` positions plus a ring of the last `window` (slot of p >= sink: sink + (p - sink) %
    window); `bind(seq)` gives it the target sequence whose committed last-layer KV it reads.
    """

    name = "longspec"

    def __init__(self, runner: ModelRunner, draft: LongSpecDraft | None = None, *,
                 widths: tuple[int, ...] | None = None, use_graphs: bool | None = None,
                 cross_start: int | None = None, cross_kernel: str | None = None,
                 workspace: LongSpecWorkspace | None = None) -> None:
        if widths is not None and (not widths or any(w < 1 for w in widths)):
            raise ValueError(f"longspec widths must be positive, got {widths}")
        if workspace is None:
            if draft is None:
                raise ValueError("LongSpecDrafter needs a draft or a workspace")
            if draft.cfg.hidden_size != runner.cfg.hidden_size or \
                    draft.cfg.head_dim != runner.cfg.head_dim:
                raise ValueError("longspec draft was built for another target")
            workspace = LongSpecWorkspace(runner, draft, cross_start, cross_kernel)
        self.ws = workspace  # draft weights, device buffers and graphs (maybe shared)
        self.runner, self.target = runner, runner.model
        self.widths = tuple(widths) if widths is not None else None
        self.sink, self.window, self.scratch = workspace.sink, workspace.window, workspace.scratch
        self.history: list[int] = []
        self.done = 0  # positions [0, done) encoded: sinks and ring [max(sink, floor), done)
        self.floor = 0
        self.seq: KVSequence | None = None
        self.saved_ring: tuple | None = None  # own cache while another drafter owns `ws`
        self.price: NodePrice | None = None  # set by a cost-aware engine before a proposal
        self._level_s = 0.0  # measured seconds per drafted level (eager drafting)
        self._proposed: tuple[DraftTree, list[float]] | None = None  # last tree, path probs
        self._outcomes: deque[tuple[float, int]] = deque(maxlen=32)  # (predicted, accepted)
        dev = runner.model.device
        self.use_graphs = dev.type == "cuda" if use_graphs is None else use_graphs

    # The workspace's state, read and written as the drafter's own (it owns `ws` while it runs).
    draft = _shared("draft")
    head = _shared("head")
    head_ids_t = _shared("head_ids_t")
    k = _shared("k")
    v = _shared("v")
    slot_pos = _shared("slot_pos")
    cross_start = _shared("cross_start")
    xk = _shared("xk")
    xv = _shared("xv")
    x_len = _shared("x_len")
    x_table = _shared("x_table")
    _stage = _shared("_stage")
    _stage_host = _shared("_stage_host")
    _stage_np = _shared("_stage_np")
    _scalars = _shared("_scalars")
    _root_token = _shared("_root_token")
    _feature = _shared("_feature")
    _root_enc_ids = _shared("_root_enc_ids")
    _enc_pos = _shared("_enc_pos")
    _graphs = _shared("_graphs")
    _uses = _shared("_uses")
    _mempool = _shared("_mempool")

    @property
    def head_ids(self) -> list[int] | None:
        """The draft vocabulary's token ids (None: the whole vocabulary)."""
        return None if self.head_ids_t is None else self.head_ids_t.tolist()

    def bind(self, seq: KVSequence) -> None:
        self.seq = seq

    # -- the own cache ------------------------------------------------------------------
    def slot(self, pos: int) -> int:
        return pos if pos < self.sink else self.sink + (pos - self.sink) % self.window

    def visible(self, end: int) -> list[int]:
        """Positions a query at `end` sees in the own cache (sinks, then the window)."""
        head = list(range(min(self.sink, end)))
        return head + list(range(max(self.sink, self.floor, end - self.window), end))

    def _encode(self, start: int, end: int) -> None:
        """Own K/V of history[start:end]: projections of embeddings, no attention needed."""
        dev = self.target.device
        for a in range(start, end, 256):
            b = min(end, a + 256)
            x = self.target.embed[torch.tensor(self.history[a:b], device=dev)]
            cos, sin = self.draft.rope(torch.arange(a, b, device=dev), x.dtype)
            _, k, v = self.draft.project_self(x, cos, sin)
            slots = torch.tensor([self.slot(p) for p in range(a, b)], device=dev)
            self.k[:, slots] = k.transpose(0, 1)
            self.v[:, slots] = v.transpose(0, 1)
            self.slot_pos[slots] = torch.arange(a, b, device=dev)

    def _staged_catch_up(self, end: int) -> list[int] | None:
        """Positions [done, end) when they can be encoded inside the proposal (at most
        ENCODE_PAD of them, sinks done, nothing to skip or re-encode: what `catch_up` would
        do is exactly "encode [done, end)"); None when `catch_up` must run eagerly."""
        if end <= self.sink or self.done < self.sink or end - self.done > ENCODE_PAD:
            return None
        lo = max(self.sink, end - self.window)
        if self.done < lo or max(self.sink, self.floor) > lo or self.done > end:
            return None
        return list(range(self.done, end))

    def _encode_staged(self, root_pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode the staged tokens into the ring (device state only; padded rows, position
        -1, go to the scratch slot), projecting the root in the same pass (one read of the
        projection weights, not two): returns the root's (x, (q, k, v, cos, sin))."""
        pos = self._enc_pos
        valid = pos >= 0
        p = torch.cat((root_pos, pos.clamp(min=0)))  # row 0: the root, then the staged rows
        x = self.target.embed[self._root_enc_ids]
        cos, sin = self.draft.rope(p, x.dtype)
        q, k, v = self.draft.project_self(x, cos, sin)
        p = p[1:]
        ring = torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.window)
        slots = torch.where(valid, ring, self.scratch)
        self.k[:, slots] = k[1:].transpose(0, 1)
        self.v[:, slots] = v[1:].transpose(0, 1)
        self.slot_pos[slots] = torch.where(valid, pos, -1)
        return x[:1], (q[:1], k[:1], v[:1], cos[:1], sin[:1])

    def catch_up(self, end: int) -> None:
        if self.done < min(self.sink, end):
            self._encode(self.done, min(self.sink, end))
            self.done = self.floor = min(self.sink, end)
        if end <= self.sink:
            return
        lo = max(self.sink, end - self.window)
        if self.done < lo or max(self.sink, self.floor) > lo:
            self.done = self.floor = lo  # skip what the window no longer needs / re-encode
        self._encode(self.done, end)
        self.done = end

    # -- the drafter protocol -----------------------------------------------------------
    def observe(self, tokens: list[int]) -> None:
        self.history.extend(tokens)
        if self._proposed is not None:
            tree, probs = self._proposed
            self._outcomes.append((sum(probs[1:]), tree.accepted_length(tokens[:-1])))
            self._proposed = None

    @property
    def calibration(self) -> float:
        """Accepted nodes per node the draft's path probabilities predicted, over the recent
        priced proposals (1 until they predicted a few tokens; clamped to [0.25, 4])."""
        predicted = sum(p for p, _ in self._outcomes)
        if predicted < 4.0:
            return 1.0
        return min(4.0, max(0.25, sum(a for _, a in self._outcomes) / predicted))

    def rollback(self, num_tokens: int) -> None:
        with self.ws.lock:
            self._rollback(num_tokens)

    def _rollback(self, num_tokens: int) -> None:
        """`rollback` with the workspace lock held (as `_propose` holds it)."""
        del self.history[num_tokens:]
        self._proposed = None
        # History [0, num_tokens) stays; its last token may be pending (not committed), so
        # its target K/V may be rewritten: copy from num_tokens - 1 on. (A drafter that does not
        # own the workspace leaves it alone: taking it over marks the cross buffer stale.)
        if self.ws.owned_by(self):
            self.x_len = min(self.x_len, max(0, num_tokens - 1))
        if self.done > num_tokens:
            # Ring slots of [num_tokens - window, done - window) were overwritten.
            self.floor = min(max(self.floor, self.done - self.window), num_tokens)
            self.done = num_tokens

    def _sync_cross(self, n: int) -> None:
        """Bring xk/xv up to the target's committed positions [0, n) (only new ones copy)."""
        seq, pool = self.seq, self.runner.pool
        if self.xk is None or self.xk.shape[1] < n:
            want = max(n, self.cross_start if self.xk is None else 2 * self.xk.shape[1])
            cap = max(n, min(self.runner.cfg.context_limit, 1 << (want - 1).bit_length()))
            xk = torch.zeros((pool.k.shape[1], cap, pool.k.shape[3]), dtype=pool.k.dtype,
                             device=pool.k.device)
            xv = torch.zeros_like(xk)
            if self.xk is not None:
                xk[:, :self.x_len] = self.xk[:, :self.x_len]
                xv[:, :self.x_len] = self.xv[:, :self.x_len]
            self.xk, self.xv = xk, xv
            if self.ws.cross_kernel == "triton":
                pages = -(-cap // CROSS_PAGE)
                self.x_table = torch.arange(pages, dtype=torch.int32, device=xk.device)
            # Graphs captured against the old buffers go, and so does their memory pool: a
            # pool all of whose graphs were released must not be captured into again (the
            # CUDA caching allocator asserts `use_count > 0` when it is re-opened).
            self._graphs.clear()
            self._mempool = None
        self.x_len = min(self.x_len, n)
        if self.x_len < n:
            slots = seq.slots(self.x_len, n)
            self.xk[:, self.x_len:n] = pool.k[-1].index_select(1, slots)
            self.xv[:, self.x_len:n] = pool.v[-1].index_select(1, slots)
        self.x_len = n

    def _shape(self, root: int, max_nodes: int) -> list[int]:
        """The drafted shape (nodes per depth) for a proposal at `root`: the widths, as deep
        as the context limit allows. Trees larger than the budget are pruned after drafting."""
        if max_nodes < 2:
            return []
        widths = self.widths or default_widths(max_nodes)
        return list(widths[:max(0, self.runner.cfg.context_limit - root - 1)])

    @torch.inference_mode()
    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        if self.seq is None:
            raise RuntimeError("LongSpecDrafter.propose before bind(seq)")
        with self.ws.lock:
            self.ws.acquire(self)
            return self._propose(history, max_nodes)

    def _propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        if len(history) != len(self.history):  # the engine did not tell us: follow the history
            self._rollback(min(len(history), len(self.history)))  # (the lock is held)
            self.history = list(history)
        root = len(history) - 1
        widths = self._shape(root, max_nodes)
        self._proposed = None
        floor = level_floor = 0.0
        if self.price is not None:
            calib = self.calibration
            floor = self.price.floor() / calib
            level_floor = self.price.floor(self._level_s) / calib
        if not widths or floor >= 1.0:  # no node could pay for its verification
            return None
        committed = self.seq.num_tokens
        if committed == 0:  # nothing for the cross-attention to read yet
            return None
        staged = self._staged_catch_up(root)
        if staged is None:
            self.catch_up(root)
            staged = []
        else:
            self.done = root
        self._sync_cross(committed)
        lo = max(self.sink, self.floor, root - self.window)
        host, k = self._stage_np, len(staged)  # numpy view of the pinned staging buffer
        host[:4] = (root, lo, committed, history[-1])
        host[4:4 + k] = [history[q] for q in staged]
        host[4 + k:4 + ENCODE_PAD] = 0
        host[4 + ENCODE_PAD:4 + ENCODE_PAD + k] = staged
        host[4 + ENCODE_PAD + k:] = -1
        self._stage.copy_(self._stage_host, non_blocking=True)
        if self.draft.feat_w is not None:
            self.ws.load_feature(self.seq.current_feature())
        vocab = self.head.shape[0]
        sizes = [1]  # nodes per level, known before drafting: no host sync inside the loop
        for w in widths:
            sizes.append(min(w, sizes[-1] * vocab))
        keep = min(max_nodes, sum(sizes))
        key = (tuple(sizes), keep, self.xk.shape[1])
        self._uses[key] = self._uses.get(key, 0) + 1
        t0 = time.perf_counter()
        stop = None
        if self.use_graphs and self._uses[key] > EAGER_BEFORE_CAPTURE:
            out, cum = self._replay(key)
        else:
            stop = math.log(level_floor) if level_floor > 0 else None
            # Never graphed (the CPU): cross-attend to the committed positions only, not the
            # whole masked buffer (its capacity is the context limit there).
            out, cum = self._levels(sizes, keep, stop,
                                    committed=None if self.use_graphs else committed)
        tokens, parents = out.tolist()  # the one read-back
        tree = DraftTree(tokens=tokens, parents=parents, source=self.name)
        if self.price is None:
            return tree
        if stop is not None:  # eager and priced (the CPU): what drafting a level costs
            level_s = (time.perf_counter() - t0) / max(1, max(tree.depth))
            self._level_s = 0.8 * self._level_s + 0.2 * level_s if self._level_s else level_s
        probs = cum.exp().tolist()
        kept = [i for i, p in enumerate(probs) if i == 0 or p >= floor]
        if len(kept) < len(tree):  # closed under ancestors: a path's probability only falls
            tree = tree.subtree(kept)
            probs = [probs[i] for i in kept]
        if len(tree) < 2:
            return None
        self._proposed = (tree, probs)
        return tree

    def _levels(self, sizes: list[int], keep: int, stop: float | None = None,
                committed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged encode, then the beam tree, from device state alone (own ring, slot
        positions, cross buffer, the staged scalars and tokens): fixed shapes, no host
        synchronisation, so it can be captured in a CUDA graph. Returns (tokens; parents)
        `[2, keep]` and their cumulative log-probabilities `[keep]`: the `keep` likeliest
        drafted nodes (`_pruned`).

        `stop` (eager only: it reads a score back per level): no deeper level is drafted once
        the best cumulative log-probability of a level is below it. `committed` (eager only):
        the committed length as a host int, so that the cross-attention reads that many
        positions of the buffer instead of all of it under a mask."""
        dev = self.target.device
        root, lo, n_cross = self._scalars[0], self._scalars[1], self._scalars[2]
        root_x, root_projected = self._encode_staged(root.view(1))
        sp = self.slot_pos
        own = (sp >= 0) & (sp < root) & ((sp < self.sink) | (sp >= lo))  # [S] visible slots
        xk, xv = self.xk, self.xv
        if committed is not None:  # the lag as a slice: no mask, no padding read
            xk, xv = xk[:, :committed], xv[:, :committed]
        cap = xk.shape[1]
        cross = self._triton_cross(n_cross) if self.ws.cross_kernel == "triton" else None
        # SDPA's mask [cap]: the lag, committed positions only (the Triton kernel reads the length)
        cross_mask = None if cross or committed is not None else \
            torch.arange(cap, device=dev) < n_cross
        past_k, past_v, s = self.k, self.v, self.k.shape[1]
        vocab, total = self.head.shape[0], sum(sizes)
        # Tree state: token, parent, cumulative log-prob and ancestor-or-self rows of every
        # node. Levels are contiguous node ranges, so only indices move.
        tokens = torch.zeros(total, dtype=torch.long, device=dev)
        parents = torch.full((total,), -1, dtype=torch.long, device=dev)
        cum = torch.zeros(total, device=dev)
        anc = torch.eye(total, dtype=torch.bool, device=dev)
        tokens[:1] = self._root_token
        ids = self.head_ids_t
        t = 0  # first node of the current level; nodes [0, t) are in past_k after the s slots
        end = 1  # nodes drafted so far
        for depth in range(len(sizes) - 1):
            m = sizes[depth]
            mask = torch.cat([own[None, :].expand(m, s), anc[t:t + m, :t + m]], 1)
            x = root_x if depth == 0 else self.target.embed[tokens[t:t + m]]
            pos = (root + depth).expand(m)
            rows = None if cross_mask is None else cross_mask[None, :].expand(m, cap)
            hidden, k, v = self.draft(x, pos, past_k, past_v, mask, xk, xv, rows,
                                      check_empty=False,
                                      cross_attend=cross,
                                      projected=root_projected if depth == 0 else None,
                                      feature=self._feature)
            if depth + 2 < len(sizes):  # a next level attends to these keys
                past_k = torch.cat([past_k, k.transpose(0, 1)], 1)
                past_v = torch.cat([past_v, v.transpose(0, 1)], 1)
            logp = self.draft.linear(hidden, self.head).float().log_softmax(-1)  # [m, V|K]
            scores, idx = (cum[t:t + m, None] + logp).flatten().topk(sizes[depth + 1])
            new = slice(t + m, t + m + sizes[depth + 1])
            par = t + torch.div(idx, vocab, rounding_mode="floor")
            col = idx.remainder(vocab)
            tokens[new] = col if ids is None else ids[col]
            parents[new] = par
            cum[new] = scores
            anc[new] |= anc[par]
            t += m
            end = t + sizes[depth + 1]
            if stop is not None and depth + 2 < len(sizes) and scores[0].item() < stop:
                break  # no node of a deeper level could pay for itself
        tokens, parents, cum = tokens[:end], parents[:end], cum[:end]
        if keep < end:
            return _pruned(tokens, parents, cum, keep)
        return torch.stack((tokens, parents)), cum

    def _triton_cross(self, committed: torch.Tensor):
        """Cross-attention over the committed positions [0, committed) through the graph-safe
        split-K Triton kernel (`kernels.attention.triton_graph`; length read on the device):
        positions [0, committed - 1) as its paged prefix, the last one as every query's single
        visible "new" key (the kernel's tree part, an identity mask). Returns q -> output."""
        from lsrt.kernels.attention.triton_graph import paged_hybrid_attention_graph

        last = (committed - 1).view(1)
        k_last = self.xk.index_select(1, last).transpose(0, 1)  # [1, Hkv, D]
        v_last = self.xv.index_select(1, last).transpose(0, 1)
        xk, xv, table, cap, scale = self.xk, self.xv, self.x_table, self.xk.shape[1], \
            self.draft.scale

        def attend(cq: torch.Tensor) -> torch.Tensor:
            m = cq.shape[0]
            eye = torch.eye(m, dtype=torch.bool, device=cq.device)
            out, _ = paged_hybrid_attention_graph(
                cq, xk, xv, table, last, k_last.expand(m, -1, -1), v_last.expand(m, -1, -1),
                eye, scale, CROSS_PAGE, cap)
            return out
        return attend

    def _replay(self, key: tuple) -> torch.Tensor:
        """Run `_levels` through a CUDA graph captured once per (level sizes, kept nodes,
        capacity)."""
        if key not in self._graphs:
            sizes, keep = list(key[0]), key[1]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuBLAS / SDPA pick their kernels
                    self._levels(sizes, keep)
            torch.cuda.current_stream().wait_stream(side)
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self._levels(sizes, keep)
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    # -- persistence --------------------------------------------------------------------
    def export_state(self) -> DraftState | None:
        if self.done == 0:
            return None
        with self.ws.lock:
            self.ws.acquire(self)
            return self._export_state()

    def _export_state(self) -> DraftState:
        from lsrt.sessions.blob import tensor_to_entry

        positions = self.visible(self.done)
        idx = torch.tensor([self.slot(p) for p in positions], device=self.k.device)
        return DraftState(
            kind=self.name, num_tokens=self.done,
            header={"positions": POSITIONS, "sink": self.sink, "window": self.window,
                    "dtype": str(self.k.dtype).removeprefix("torch."),
                    "layout": "[kv_heads, cached_positions, head_dim]",
                    "cached_positions": positions},
            tensors={"k": tensor_to_entry(self.k[:, idx].cpu()),
                     "v": tensor_to_entry(self.v[:, idx].cpu())})

    def import_state(self, state: DraftState) -> None:
        """Load an exported cache; `ValueError` when it was made under another convention."""
        with self.ws.lock:
            self.ws.acquire(self)
            self._import_state(state)

    def _import_state(self, state: DraftState) -> None:
        from lsrt.sessions.blob import entry_to_tensor

        h = state.header
        if (state.kind != self.name or h.get("positions") != POSITIONS
                or h.get("sink") != self.sink or h.get("window") != self.window
                or h.get("dtype") != str(self.k.dtype).removeprefix("torch.")):
            raise ValueError(f"draft state of {state.kind} {h} does not fit {self.name}")
        positions = list(h["cached_positions"])
        floor = positions[self.sink] if len(positions) > self.sink else state.num_tokens
        old = self.floor
        self.floor = floor
        if positions != self.visible(state.num_tokens):
            self.floor = old
            raise ValueError("draft state positions do not match its length")
        k, v = entry_to_tensor(state.tensors["k"]), entry_to_tensor(state.tensors["v"])
        want = (self.k.shape[0], len(positions), self.k.shape[2])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            self.floor = old
            raise ValueError(f"draft state shape {tuple(k.shape)} != {want}")
        idx = torch.tensor([self.slot(p) for p in positions], device=self.k.device)
        self.k[:, idx] = k.to(self.k)
        self.v[:, idx] = v.to(self.v)
        self.slot_pos.fill_(-1)
        self.slot_pos[idx] = torch.tensor(positions, device=self.slot_pos.device)
        self.done = state.num_tokens


def make_longspec_drafter(runner: ModelRunner, path: str | Path | None = None, *,
                          widths: tuple[int, ...] | None = None,
                          workspaces: dict | None = None) -> LongSpecDrafter:
    """`longspec`: the shipped draft trained for this target (`runtime/drafts/`, matched by
    weights), else a draft initialised from the target's last layer (untrained, still lossless);
    `longspec:DIR` (a `save_draft` directory) or `longspec:PATH` (a published checkpoint).
    Drafters made with the same `workspaces` dict (one per runner) share the loaded draft and
    its graphs (`longspec_workspace`)."""
    if path is None:
        path = find_bundled_draft(runner.model)
    key = str(Path(path).resolve()) if path is not None else "untrained"
    if workspaces is not None and key in workspaces:
        return LongSpecDrafter(runner, widths=widths, workspace=workspaces[key])
    if path is None:
        draft = init_from_target(runner.model)
    elif is_own_checkpoint(path):
        draft = load_draft(path, runner.cfg)
    else:
        draft = load_longspec_checkpoint(path, runner.cfg)
    drafter = LongSpecDrafter(runner, draft, widths=widths)
    if workspaces is not None:
        workspaces[key] = drafter.ws
    return drafter
