"""ModelRunner: the target model, its paged KV pool and the attention backend.

Three operations on a `KVSequence` (whose committed KV covers its first `num_tokens` tokens):

    prefill(seq, tokens)      compute and commit KV for `tokens` in chunks (causal)
    verify(seq, tree) -> logits of every tree node; KV written to scratch slots, not committed
    commit(seq, path)         keep the KV of the accepted root-to-node path, in place

Rejected tree nodes leave no trace: their slots lie past `num_tokens` and are overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsrt.kernels.elementwise import get_elementwise_ops
from lsrt.kernels.linear import get_linear, linear_name
from lsrt.runtime.attention import AttentionBackend, AttentionMeta, make_backend
from lsrt.runtime.config import ModelConfig
from lsrt.runtime.errors import ContextTooLong
from lsrt.runtime.kv_cache import KVPoolConfig, KVSequence, PagedKVPool
from lsrt.runtime.model import DecoderModel
from lsrt.runtime.spec.tree import DraftTree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_BLOCK_SIZE = 64  # tokens per KV page on a GPU (`RunnerConfig.for_device`)


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    device: str = "cpu"
    dtype: str = "float32"
    kv_budget_mb: int = 2048
    block_size: int = 16
    attention: str = "sdpa"  # sdpa | hybrid | triton
    elementwise: str = "auto"  # norms, RoPE + KV write, SiLU-mul: torch | triton | auto (GPU)
    linear: str = "auto"  # projections: torch | onednn (CPU, prepacked weights) | auto (CPU fp32)
    prefill_chunk: int = 512
    cuda_graphs: bool = True  # CUDA only: decode/verify replay captured graphs (cuda_graphs.py)
    graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    # Draft trees: "cost" keeps the nodes that pay for their verification at the measured cost
    # of a node (runtime/spec/budget.py), "full" the whole node budget; "auto": cost on the
    # CPU, full on a GPU (where a node costs almost nothing: on the H100 cost-aware trees made
    # `auto` 10–13% and `longspec` 0–6% slower, docs/BENCHMARKS.md round 18).
    tree_budget: str = "auto"

    def __post_init__(self) -> None:
        if not self.graph_sizes or min(self.graph_sizes) <= 0:
            raise ValueError("graph_sizes must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_budget_mb <= 0 or self.block_size <= 0 or self.prefill_chunk <= 0:
            raise ValueError("kv_budget_mb, block_size and prefill_chunk must be positive")
        if self.attention not in ("sdpa", "hybrid", "triton"):
            raise ValueError(f"attention must be sdpa, hybrid or triton, got {self.attention!r}")
        if self.elementwise not in ("torch", "triton", "auto"):
            raise ValueError("elementwise must be torch, triton or auto, got "
                             f"{self.elementwise!r}")
        if self.tree_budget not in ("cost", "full", "auto"):
            raise ValueError(f"tree_budget must be cost, full or auto, got {self.tree_budget!r}")
        if self.linear not in ("torch", "onednn", "auto"):
            raise ValueError(f"linear must be torch, onednn or auto, got {self.linear!r}")

    @property
    def cost_aware_trees(self) -> bool:
        return self.tree_budget == "cost" or (self.tree_budget == "auto" and self.device == "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def for_device(cls, device: str, **fields) -> RunnerConfig:
        """The config for `device` with that device's defaults where `fields` leaves them open:
        float32 (CPU exactness) and 16-token pages on the CPU; bf16 and 64-token pages on a GPU,
        where pages that hold whole key tiles let large trees' attention read them by TMA
        (6% faster at 64 tree tokens on an H100) and cost nothing on small ones
        (docs/BENCHMARKS.md, round 10)."""
        if device != "cpu":
            fields.setdefault("dtype", "bfloat16")
            fields.setdefault("block_size", GPU_BLOCK_SIZE)
        return cls(device=device, **fields)


class ModelRunner:
    def __init__(self, model: DecoderModel, config: RunnerConfig) -> None:
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.pool = PagedKVPool(KVPoolConfig.from_budget(
            budget_bytes=config.kv_budget_mb << 20, num_layers=self.cfg.num_layers,
            num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
            block_size=config.block_size, dtype=model.dtype, device=config.device))
        self.backend: AttentionBackend = make_backend(config.attention)
        model.ops = get_elementwise_ops(config.elementwise, config.device)
        linear = get_linear(config.linear, config.device, model.dtype)
        if linear_name(linear) != linear_name(model.linear):  # keep a shared model's copies
            if hasattr(linear, "prepare"):  # reorder now: the first request should not pay it
                linear.prepare(model.projection_weights())
            model.linear = linear
        self.scale = self.cfg.head_dim ** -0.5
        # Target layers whose residual streams every forward appends to its hidden rows, after
        # the final hidden state (`DecoderModel.forward(taps=...)`): the multi-layer feature
        # of LongSpec drafts with `feature_layers`. Only grows (`tap_layers`).
        self.feature_taps: tuple[int, ...] = ()

    def tap_layers(self, layers: tuple[int, ...]) -> None:
        """From the next forward on, also append `layers`' residual streams to the feature
        (the union with the layers already tapped, in increasing order). A feature computed
        before the change is narrower than the taps say: readers then treat it as unknown."""
        taps = tuple(sorted(set(self.feature_taps) | set(layers)))
        if any(not 0 <= i < self.cfg.num_layers for i in taps):
            raise ValueError(f"tap_layers {layers}: the target has layers "
                             f"0..{self.cfg.num_layers - 1}")
        self.feature_taps = taps

    def feature_blocks(self, layers: tuple[int, ...]) -> list[int]:
        """Which `[H]` blocks of a feature row under the current taps hold the final hidden
        state and then `layers`' (tapped already: `tap_layers`)."""
        return [0, *(1 + self.feature_taps.index(i) for i in layers)]

    def new_sequence(self) -> KVSequence:
        return KVSequence(self.pool)

    def check_context(self, total: int) -> None:
        if total > self.cfg.context_limit:
            raise ContextTooLong(total, self.cfg.context_limit)

    def _meta(self, seq: KVSequence, n: int, new_mask: torch.Tensor | None) -> AttentionMeta:
        start = seq.num_tokens
        self.check_context(start + n)
        seq.reserve(start + n)
        seq.make_writable(start)
        span = seq.contiguous_span(start + n)
        return AttentionMeta(
            write_slots=seq.slots(start, start + n), prefix_len=start,
            prefix_slots=None if span else seq.slots(0, start), kv_span=span,
            new_mask=new_mask, scale=self.scale, block_table=seq.block_table_tensor(),
            block_size=seq.pool.block_size)

    @torch.inference_mode()
    def _forward(self, tokens: list[int], positions: torch.Tensor, meta: AttentionMeta,
                 logit_rows: slice | torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (final hidden states `[n, H]`, then `feature_taps`' blocks; logits of
        `logit_rows` or None)."""
        dev = self.config.device
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        hidden = self.model(ids, positions.to(dev), self.pool.k, self.pool.v, meta, self.backend,
                            taps=self.feature_taps)
        return hidden, None if logit_rows is None else self.model.logits(hidden[logit_rows])

    def prefill(self, seq: KVSequence, tokens: list[int], *, want_logits: bool = False,
                progress: "callable | None" = None) -> torch.Tensor | None:
        """Compute and commit KV for `tokens`; optionally the last token's logits `[vocab]`."""
        self.check_context(seq.num_tokens + len(tokens))
        logits = None
        chunk = self.config.prefill_chunk
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            n = len(part)
            mask = None if n == 1 else torch.ones(
                (n, n), dtype=torch.bool, device=self.config.device).tril_()
            meta = self._meta(seq, n, mask)
            positions = torch.arange(seq.num_tokens, seq.num_tokens + n)
            final = i + chunk >= len(tokens)
            hidden, out = self._forward(part, positions, meta,
                                        slice(n - 1, n) if want_logits and final else None)
            seq.num_tokens += n
            if final:  # the last chunk: its last row is the new feature
                seq.set_feature(hidden[-1].clone(), seq.num_tokens - 1)
            if out is not None:
                logits = out[0]
            if progress is not None:
                progress(min(i + chunk, len(tokens)), len(tokens))
        return logits

    def verify(self, seq: KVSequence, tree: DraftTree) -> torch.Tensor:
        """Target logits `[n, vocab]` at every node of `tree` (node 0 = the pending root)."""
        n = len(tree)
        mask = None if n == 1 else tree.ancestor_mask(self.config.device)
        meta = self._meta(seq, n, mask)
        positions = seq.num_tokens + torch.tensor(tree.depth, dtype=torch.long)
        seq.tree_hidden, logits = self._forward(tree.tokens, positions, meta, slice(None))
        return logits

    def commit(self, seq: KVSequence, path: list[int]) -> None:
        """Keep the KV of tree nodes `path` (root first, increasing) as the next positions;
        the last node's final hidden state becomes the sequence's feature."""
        start = seq.num_tokens
        if seq.tree_hidden is not None:
            seq.set_feature(seq.tree_hidden[path[-1]].clone(), start + len(path) - 1)
            seq.tree_hidden = None
        moved = [(start + node, start + i) for i, node in enumerate(path) if node != i]
        if moved:
            src = seq.slots(0, seq.capacity)[[s for s, _ in moved]]
            dst = seq.slots(0, seq.capacity)[[d for _, d in moved]]
            # Sources lie at or after destinations and both increase: in-order copy is safe.
            self.pool.k[:, :, dst] = self.pool.k[:, :, src]
            self.pool.v[:, :, dst] = self.pool.v[:, :, src]
        seq.num_tokens += len(path)
