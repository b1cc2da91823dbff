"""CUDA graphs for the target's decode and verify steps.

Eager PyTorch launches ~45 kernels per layer per step; at batch 1 the step is launch-bound
(SmolLM2-135M: 68 ms a token on an H100 VM for ~1,350 launches). `GraphRunner` captures, for
each tree size N in a small set, one graph of the whole target forward plus logits over STATIC
buffers, and a verify becomes: write the tree into a pinned host buffer, one async copy, one
replay. A tree of n nodes runs in the graph of the next size N >= n; padding nodes attend only
to themselves and write their K/V to scratch slots past the tree (reserved in the sequence), so
real nodes never see them and the next step overwrites them. Attention goes through
`triton_graph`, which reads the prefix length from device memory, so one graph serves every
context length. Prefill, commit and anything not covered (n > max size, pool too full to
reserve the padding) stay on the wrapped eager `ModelRunner`.

`GraphRunner` is a drop-in for `ModelRunner` (same surface, the rest delegated), so
`llm.runner = llm.engine.runner = GraphRunner(llm.runner)` switches a loaded LLM over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lsrt.kernels.attention.triton_graph import GraphAttentionConfig, paged_hybrid_attention_graph
from lsrt.runtime.attention import AttentionMeta
from lsrt.runtime.kv_cache import KVSequence
from lsrt.runtime.runner import ModelRunner
from lsrt.runtime.spec.tree import DraftTree


@dataclass(frozen=True, kw_only=True)
class GraphConfig:
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # captured tree sizes (nodes, root included)
    max_prefix: int | None = None  # sets the attention grid; None: min(context limit, pool)
    capture: bool = True  # False: run the same static-buffer step eagerly (CPU tests, debugging)
    warmup: int = 2  # eager runs before each capture (Triton compiles, cuBLAS picks kernels)
    attention: GraphAttentionConfig | None = None

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError("GraphConfig.sizes must be a non-empty tuple of positive sizes")
        if len(set(self.sizes)) != len(self.sizes):
            raise ValueError("GraphConfig.sizes must not repeat a size")
        if self.max_prefix is not None and self.max_prefix < 0:
            raise ValueError("GraphConfig.max_prefix must be >= 0")
        if self.warmup < 1:
            raise ValueError("GraphConfig.warmup must be >= 1")


class GraphAttention:
    """Attention backend of a static step: the graph-safe kernel over device-side lengths."""

    name = "triton-graph"

    def __init__(self, prefix_len: torch.Tensor, mask: torch.Tensor, max_prefix: int,
                 config: GraphAttentionConfig | None) -> None:
        self.prefix_len = prefix_len  # [1] int64, on the device
        self.mask = mask  # [N, N] int64, nonzero = may attend
        self.max_prefix = max_prefix
        self.config = config

    def attend(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        out, _lse = paged_hybrid_attention_graph(
            q, k_layer, v_layer, meta.block_table, self.prefix_len, k_new, v_new, self.mask,
            meta.scale, meta.block_size, self.max_prefix, self.config)
        return out


class StaticStep:
    """One tree size N: a pinned host buffer, its device twin (viewed as every static input),
    the graph and its static logits output.

    Device buffer layout (int64): ids [N] | positions [N] | write_slots [N] | prefix_len [1] |
    mask [N, N]. One host-to-device copy fills every input.
    """

    def __init__(self, size: int, device: torch.device, block_table: torch.Tensor,
                 max_prefix: int, scale: float, block_size: int,
                 attention: GraphAttentionConfig | None) -> None:
        n = self.size = size
        numel = 3 * n + 1 + n * n
        self.host = torch.zeros(numel, dtype=torch.long, pin_memory=device.type == "cuda")
        self.stage = torch.zeros(numel, dtype=torch.long, device=device)
        self.ids, self.positions, self.slots = (self.stage[i * n:(i + 1) * n] for i in range(3))
        self.prefix_len = self.stage[3 * n:3 * n + 1]
        self.mask = self.stage[3 * n + 1:].view(n, n)
        self.meta = AttentionMeta(write_slots=self.slots, prefix_len=max_prefix,
                                  prefix_slots=None, kv_span=None, new_mask=None, scale=scale,
                                  block_table=block_table, block_size=block_size)
        self.backend = GraphAttention(self.prefix_len, self.mask, max_prefix, attention)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [N, vocab] float32, written by each replay
        self.hidden: torch.Tensor | None = None  # [N, H] final hidden states, likewise
        self._copied: torch.cuda.Event | None = None

    def fill(self, tree: DraftTree, start: int, slots: list[int]) -> None:
        """Stage `tree` (n <= N nodes) at prefix length `start`; `slots` [N] real then padding.

        No host sync beyond waiting for this buffer's previous copy (long done in a step loop).
        """
        n, size = len(tree), self.size
        if self._copied is not None:
            self._copied.synchronize()
        h = self.host.numpy()
        h[:] = 0
        h[:n] = tree.tokens
        h[size:size + n] = tree.depth
        h[size:2 * size] += start  # padding nodes sit at `start`: any position is harmless
        h[2 * size:3 * size] = slots
        h[3 * size] = start
        mask = h[3 * size + 1:].reshape(size, size)
        np.fill_diagonal(mask, 1)  # padding rows stay this: themselves only
        for i, parent in enumerate(tree.parents):  # ancestor-or-self rows, parents first
            if parent >= 0:
                mask[i, :i] = mask[parent, :i]
        self.stage.copy_(self.host, non_blocking=True)
        if self.stage.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()


class GraphRunner:
    """A `ModelRunner` whose verify (decode = a one-node tree) replays captured CUDA graphs."""

    def __init__(self, runner: ModelRunner, config: GraphConfig | None = None) -> None:
        self.runner = runner
        self.graph_config = cfg = config or GraphConfig()
        device = torch.device(runner.config.device)
        if cfg.capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (GraphConfig(capture=False) runs "
                             "the static step eagerly)")
        pool = runner.pool
        self.max_prefix = (cfg.max_prefix if cfg.max_prefix is not None else
                           min(runner.cfg.context_limit, pool.num_blocks * pool.block_size))
        self._block_table = torch.zeros(pool.num_blocks, dtype=torch.int32, device=device)
        self._table_src: torch.Tensor | None = None  # the sequence table last copied in
        self._steps = {n: StaticStep(n, device, self._block_table, self.max_prefix,
                                     runner.scale, pool.block_size, cfg.attention)
                       for n in sorted(cfg.sizes)}
        self._taps: tuple[int, ...] | None = None  # the runner's feature_taps when captured
        if cfg.capture:
            self._capture_all()

    # -- the ModelRunner surface -------------------------------------------------------------
    model = property(lambda self: self.runner.model)
    cfg = property(lambda self: self.runner.cfg)
    config = property(lambda self: self.runner.config)
    pool = property(lambda self: self.runner.pool)
    scale = property(lambda self: self.runner.scale)
    backend = property(lambda self: self.runner.backend)

    def __getattr__(self, name: str):  # anything else (drafters' private helpers) as eager
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def new_sequence(self) -> KVSequence:
        return self.runner.new_sequence()

    def check_context(self, total: int) -> None:
        self.runner.check_context(total)

    def prefill(self, seq: KVSequence, tokens: list[int], **kwargs) -> torch.Tensor | None:
        return self.runner.prefill(seq, tokens, **kwargs)

    def commit(self, seq: KVSequence, path: list[int]) -> None:
        self.runner.commit(seq, path)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self._steps)

    def step_size(self, n: int) -> int | None:
        """The captured size a tree of `n` nodes runs at, or None (eager)."""
        return next((size for size in self._steps if size >= n), None)

    @torch.inference_mode()
    def verify(self, seq: KVSequence, tree: DraftTree) -> torch.Tensor:
        """Target logits `[n, vocab]` at every node of `tree`, as `ModelRunner.verify`."""
        if self.graph_config.capture and self._taps != self.runner.feature_taps:
            self._capture_all()  # a draft began reading more target layers (`tap_layers`)
        n, start = len(tree), seq.num_tokens
        size = self.step_size(n)
        self.runner.check_context(start + n)
        if size is None or not self._reserve(seq, start + size):
            return self.runner.verify(seq, tree)
        seq.make_writable(start)
        self._load_block_table(seq)
        bs, blocks = self.pool.block_size, seq.blocks
        slots = [blocks[p // bs] * bs + p % bs for p in range(start, start + size)]
        step = self._steps[size]
        step.fill(tree, start, slots)
        if step.graph is not None:
            step.graph.replay()
            hidden, logits = step.hidden, step.logits
        else:
            hidden, logits = self._forward(step)
        # Static outputs are overwritten by the next replay, which comes after `commit` has
        # read the accepted row of `tree_hidden` (copied there).
        seq.tree_hidden = hidden[:n]
        return logits[:n].clone()

    # -- internals ---------------------------------------------------------------------------
    def _reserve(self, seq: KVSequence, total: int) -> bool:
        """Reserve slots for the padded tree; False when the pool cannot (eager needs fewer)."""
        need = -(-total // self.pool.block_size) - len(seq.blocks)
        if need > 0 and not self.pool.can_allocate(need):
            return False
        seq.reserve(total)
        return True

    def _load_block_table(self, seq: KVSequence) -> None:
        table = seq.block_table_tensor()  # cached by the sequence until its blocks change
        if table is not self._table_src:
            self._block_table[:table.numel()].copy_(table)
            self._table_src = table

    def _forward(self, step: StaticStep) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole target forward plus logits over the step's static buffers -> final hidden
        states `[N, H]` and logits `[N, vocab]`."""
        model, pool = self.runner.model, self.runner.pool
        hidden = model(step.ids, step.positions, pool.k, pool.v, step.meta, step.backend,
                       taps=self.runner.feature_taps)
        return hidden, model.logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Warm up and capture every size into one shared memory pool, largest first (so the
        smaller graphs reuse its blocks). Warm-up K/V goes to a scratch sequence's slots."""
        self._taps = self.runner.feature_taps
        mempool = torch.cuda.graph_pool_handle()
        biggest = max(self._steps)
        scratch = self.runner.new_sequence()
        scratch.reserve(biggest)
        try:
            bs = self.pool.block_size
            slots = [scratch.blocks[p // bs] * bs + p % bs for p in range(biggest)]
            side = torch.cuda.Stream()
            for size in sorted(self._steps, reverse=True):
                step = self._steps[size]
                step.fill(DraftTree.chain(0, [0] * (size - 1)), 0, slots[:size])
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.graph_config.warmup):
                        self._forward(step)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    step.hidden, step.logits = self._forward(step)
                step.graph = graph
            torch.cuda.synchronize()
        finally:
            scratch.release()
