"""Attention over the paged KV cache, behind one small interface.

Every forward pass has `n` new tokens that attend to a *prefix* of cached tokens with no mask and
to each other under `new_mask` (causal for a prefill chunk, the ancestor mask for a draft tree,
nothing for a single decode token). Backends, chosen by name:

- `sdpa`   : one SDPA call (its own GQA) over prefix+new keys, read as a view of the pool when
             the slots are consecutive, with an additive `[n, L+n]` mask. Fastest on CPU.
- `hybrid` : LongSpec's hybrid tree attention from `lsrt.kernels` (torch reference): prefix with
             no mask, new tokens with the mask, merged by log-sum-exp.
- `triton` : the same contract through the Triton kernels (GPU, or TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """What one forward pass reads and writes; identical for every layer."""

    write_slots: torch.Tensor  # [n] int64: where the new tokens' K/V are written
    prefix_len: int  # L: cached tokens every new token sees
    prefix_slots: torch.Tensor | None  # [L] int64 slots of the prefix (None when contiguous)
    kv_span: tuple[int, int] | None  # (start, end): prefix then new tokens in consecutive slots
    new_mask: torch.Tensor | None  # [n, n] bool, True = may attend; None = all-visible
    scale: float
    block_table: torch.Tensor | None = None  # [blocks] when the prefix is a sequence's [0, L)
    block_size: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.write_slots.shape[0])

    def key_slots(self) -> torch.Tensor:
        """`[L + n]` slots of every key, prefix first (used when not contiguous)."""
        if "key_slots" not in self._cache:
            parts = [self.prefix_slots] if self.prefix_slots is not None else []
            self._cache["key_slots"] = torch.cat([*parts, self.write_slots])
        return self._cache["key_slots"]

    def prefix_slot_tensor(self) -> torch.Tensor:
        """`[L]` slots of the prefix, contiguous or not."""
        if self.prefix_slots is not None:
            return self.prefix_slots
        start = self.kv_span[0] if self.kv_span else 0
        return torch.arange(start, start + self.prefix_len, device=self.write_slots.device)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`[n, L + n]` float mask (0 or -inf) for SDPA, or None when all keys are visible."""
        if self.new_mask is None:
            return None
        key = ("amask", dtype)
        if key not in self._cache:
            n = self.n
            full = torch.zeros((n, self.prefix_len + n), dtype=dtype, device=self.new_mask.device)
            full[:, self.prefix_len:].masked_fill_(~self.new_mask, float("-inf"))
            self._cache[key] = full
        return self._cache[key]


class AttentionBackend(Protocol):
    name: str

    def attend(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """q `[n, Hq, D]`, k/v_layer `[Hkv, slots, D]` (new K/V already written),
        k/v_new `[n, Hkv, D]` -> `[n, Hq, D]`."""
        ...


def _read_keys(layer: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """`[Hkv, L + n, D]`: a view when the slots are consecutive, else a gather."""
    if meta.kv_span is not None:
        return layer[:, meta.kv_span[0]:meta.kv_span[1]]
    return layer.index_select(1, meta.key_slots())


class SdpaAttention:
    name = "sdpa"

    def attend(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        # [1, Hq, n, D] queries against [1, Hkv, L+n, D] keys: SDPA's own GQA, an additive
        # float mask (measured several times faster on CPU than a bool mask or folding the
        # query heads of a group into rows).
        k, v = _read_keys(k_layer, meta), _read_keys(v_layer, meta)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=meta.additive_mask(q.dtype),
            scale=meta.scale, enable_gqa=True)
        return out[0].transpose(0, 1)


class KernelAttention:
    """Hybrid tree attention through `lsrt.kernels` (torch reference or Triton).

    A sequence's own prefix goes through the paged kernel by block table; a drafter's
    sink+window view (arbitrary slots) goes through the reference on the gathered keys.
    """

    def __init__(self, kind: str) -> None:
        from lsrt.kernels import get_attention_backend

        self.name = "hybrid" if kind == "torch" else kind
        self._ops = get_attention_backend(kind)

    def attend(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        n = q.shape[0]
        mask = meta.new_mask
        if mask is None:
            mask = torch.ones((n, n), dtype=torch.bool, device=q.device)
        if meta.block_table is not None:
            out, _lse = self._ops.paged_hybrid_attention(
                q, k_layer, v_layer, meta.block_table, meta.prefix_len, k_new, v_new, mask,
                meta.scale, meta.block_size)
            return out
        from lsrt.kernels.attention.reference import hybrid_attention

        slots = meta.prefix_slot_tensor()
        out, _lse = hybrid_attention(q, k_layer.index_select(1, slots),
                                     v_layer.index_select(1, slots), k_new, v_new, mask,
                                     meta.scale)
        return out


def make_backend(name: str) -> AttentionBackend:
    """`sdpa` | `hybrid` | `triton`."""
    if name == "sdpa":
        return SdpaAttention()
    if name == "hybrid":
        return KernelAttention("torch")
    if name == "triton":
        return KernelAttention("triton")
    raise ValueError(f"unknown attention backend {name!r}; expected sdpa, hybrid or triton")
