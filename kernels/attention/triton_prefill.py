"""Paged causal attention for a prefill chunk: the tree kernel with a causal mask, chunked.

The new keys' mask is computed in the kernel (key j visible to query i iff j <= i), so no [n, n]
tensor is built, and the queries are launched `max_queries` at a time to bound the float32
partial-result workspace (splits x Hkv x queries x group x head_dim). Each launch sees only the
new keys up to its last query.
"""

from __future__ import annotations

import torch

from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, launch_hybrid
from lsrt.runtime.errors import InvalidRequest


def paged_prefill_attention(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [num_blocks] int32/int64
    prefix_len: int,
    k_new: torch.Tensor,          # [n, Hkv, D]
    v_new: torch.Tensor,          # [n, Hkv, D]
    scale: float,
    block_size: int,
    max_queries: int = 512,
    config: TreeAttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal chunk attention over a paged prefix: (out [n, Hq, D], lse [n, Hq] float32)."""
    n = q.shape[0]
    if k_new.shape[0] != n:
        raise InvalidRequest(f"{n} queries but {k_new.shape[0]} new keys")
    if max_queries <= 0:
        raise InvalidRequest("max_queries must be positive")
    if n <= max_queries:
        return launch_hybrid(q, k_cache_layer, v_cache_layer, block_table, prefix_len, k_new,
                             v_new, None, scale, block_size, config=config)
    outs, lses = [], []
    for q0 in range(0, n, max_queries):
        q1 = min(n, q0 + max_queries)
        o, l = launch_hybrid(q[q0:q1], k_cache_layer, v_cache_layer, block_table, prefix_len,
                             k_new[:q1], v_new[:q1], None, scale, block_size, q_offset=q0,
                             config=config)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
