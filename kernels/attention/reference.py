"""Plain-torch hybrid (tree) attention: the reference every attention kernel is tested against.

Hybrid attention (LongSpec) splits the keys of n new tokens into two parts:

* the cached prefix of L tokens, which every new query may see, so it needs NO mask and can be
  read once for all n queries and all query heads of a KV group;
* the n new tokens themselves (a prefill chunk or a draft tree), which need a small [n, n] mask.

The two partial softmaxes are merged by their log-sum-exp. Everything is computed in float32.
GQA: query head h reads KV head h // group where group = num_q_heads // num_kv_heads.
"""

from __future__ import annotations

import math

import torch

from lsrt.runtime.errors import InvalidRequest

# Upper bound on float32 score elements materialised at once (256 MiB).
_MAX_SCORE_ELEMS = 1 << 26


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax pieces of one key chunk.

    q: [Hkv, n, group, D] f32; k, v: [Hkv, Lc, D]; mask: [n, Lc] bool or None.
    Returns (acc [Hkv, n, group, D], m [Hkv, n, group], l [Hkv, n, group]) where m is the row max
    (-inf for a row with no allowed key) and acc, l are sums of exp(s - m).
    """
    s = torch.einsum("hngd,hld->hngl", q, k.float()) * scale  # [Hkv, n, group, Lc]
    if mask is not None:
        s = s.masked_fill(~mask[None, :, None, :], float("-inf"))
    m = s.amax(dim=-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe[..., None])
    l = p.sum(dim=-1)
    acc = torch.einsum("hngl,hld->hngd", p, v.float())
    return acc, m, l


def _merge(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
           part: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two (acc, m, l) triples."""
    if state is None:
        return part
    acc0, m0, l0 = state
    acc1, m1, l1 = part
    m = torch.maximum(m0, m1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    a0 = torch.exp(m0 - m_safe)
    a1 = torch.exp(m1 - m_safe)
    return acc0 * a0[..., None] + acc1 * a1[..., None], m, l0 * a0 + l1 * a1


def _check_shapes(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                  k_new: torch.Tensor, v_new: torch.Tensor, mask: torch.Tensor) -> None:
    n, hq, d = q.shape
    hkv = k_prefix.shape[0]
    if hq % hkv != 0:
        raise InvalidRequest(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_prefix.shape != v_prefix.shape or k_prefix.shape[0::2] != (hkv, d):
        raise InvalidRequest(f"prefix K/V shapes {tuple(k_prefix.shape)}, "
                             f"{tuple(v_prefix.shape)} do not fit q {tuple(q.shape)}")
    if k_new.shape != (n, hkv, d) or v_new.shape != (n, hkv, d):
        raise InvalidRequest(f"new K/V must be [{n}, {hkv}, {d}], got {tuple(k_new.shape)}, "
                             f"{tuple(v_new.shape)}")
    if mask.shape != (n, n) or mask.dtype != torch.bool:
        raise InvalidRequest(f"mask must be bool [{n}, {n}], got {mask.dtype} {tuple(mask.shape)}")


def hybrid_attention(
    q: torch.Tensor,         # [n, Hq, D]
    k_prefix: torch.Tensor,  # [Hkv, L, D] (may be a strided view; L may be 0)
    v_prefix: torch.Tensor,  # [Hkv, L, D]
    k_new: torch.Tensor,     # [n, Hkv, D]
    v_new: torch.Tensor,     # [n, Hkv, D]
    mask: torch.Tensor,      # [n, n] bool, True = query i may attend new key j
    scale: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of n new queries over an unmasked prefix plus their own masked keys.

    Returns (out [n, Hq, D] in q's dtype, lse [n, Hq] float32, natural log). A row that may see
    no key at all (L = 0 and an all-False mask row) gets out = 0 and lse = -inf.

    The prefix is processed `chunk_size` keys at a time (default: as many as keep the float32
    scores under 2^26 elements) with an online-softmax merge, so a 512-query prefill chunk over
    a 30K-token prefix never materialises n x L x Hq scores; queries are chunked the same way.
    """
    _check_shapes(q, k_prefix, v_prefix, k_new, v_new, mask)
    n, hq, d = q.shape
    hkv, length = k_prefix.shape[0], k_prefix.shape[1]
    group = hq // hkv
    q_rows = max(1, min(n, _MAX_SCORE_ELEMS // max(1, hq * n)))
    out = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    for q0 in range(0, n, q_rows):
        q1 = min(n, q0 + q_rows)
        qf = q[q0:q1].float().view(q1 - q0, hkv, group, d).permute(1, 0, 2, 3)  # [Hkv, nq, g, D]
        step = chunk_size or max(1, _MAX_SCORE_ELEMS // max(1, hq * (q1 - q0)))
        state = None
        for l0 in range(0, length, step):
            l1 = min(length, l0 + step)
            state = _merge(state, _partial(qf, k_prefix[:, l0:l1], v_prefix[:, l0:l1], None,
                                           scale))
        kn, vn = k_new.permute(1, 0, 2), v_new.permute(1, 0, 2)  # [Hkv, n, D]
        state = _merge(state, _partial(qf, kn, vn, mask[q0:q1], scale))
        acc, m, l = state
        safe_l = torch.where(l > 0, l, torch.ones_like(l))
        o = torch.where((l > 0)[..., None], acc / safe_l[..., None], torch.zeros_like(acc))
        row_lse = torch.where(l > 0, m + torch.log(safe_l), torch.full_like(l, float("-inf")))
        out[q0:q1] = o.permute(1, 0, 2, 3).reshape(q1 - q0, hq, d).to(q.dtype)
        lse[q0:q1] = row_lse.permute(1, 0, 2).reshape(q1 - q0, hq)
    return out, lse


def gather_prefix(
    cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,  # [num_blocks] int32/int64 block ids
    prefix_len: int,
    block_size: int,
) -> torch.Tensor:
    """The first `prefix_len` tokens of a sequence as a contiguous [Hkv, prefix_len, D] tensor."""
    needed = math.ceil(prefix_len / block_size)
    if block_table.numel() < needed:
        raise InvalidRequest(f"block table has {block_table.numel()} blocks, "
                             f"{needed} needed for {prefix_len} tokens")
    pos = torch.arange(prefix_len, device=cache_layer.device)
    slots = block_table.to(cache_layer.device).long()[pos // block_size] * block_size \
        + pos % block_size
    return cache_layer.index_select(1, slots)


def paged_hybrid_attention(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [num_blocks] int32/int64
    prefix_len: int,
    k_new: torch.Tensor,          # [n, Hkv, D]
    v_new: torch.Tensor,          # [n, Hkv, D]
    mask: torch.Tensor,           # [n, n] bool
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`hybrid_attention` with the prefix (positions [0, prefix_len)) read through a block table."""
    k_prefix = gather_prefix(k_cache_layer, block_table, prefix_len, block_size)
    v_prefix = gather_prefix(v_cache_layer, block_table, prefix_len, block_size)
    return hybrid_attention(q, k_prefix, v_prefix, k_new, v_new, mask, scale)


def paged_prefill_attention(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [num_blocks]
    prefix_len: int,
    k_new: torch.Tensor,          # [n, Hkv, D]
    v_new: torch.Tensor,          # [n, Hkv, D]
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a prefill chunk over its cached prefix plus itself."""
    n = q.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return paged_hybrid_attention(q, k_cache_layer, v_cache_layer, block_table, prefix_len,
                                  k_new, v_new, causal, scale, block_size)


def dense_masked_attention(
    q: torch.Tensor,     # [n, Hq, D]
    k: torch.Tensor,     # [Hkv, T, D] all keys (prefix then new)
    v: torch.Tensor,     # [Hkv, T, D]
    mask: torch.Tensor,  # [n, T] bool
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive oracle: one dense masked softmax, GQA by repeating KV heads. Tests only."""
    n, hq, d = q.shape
    group = hq // k.shape[0]
    kf = k.float().repeat_interleave(group, dim=0)  # [Hq, T, D]
    vf = v.float().repeat_interleave(group, dim=0)
    s = torch.einsum("nhd,htd->hnt", q.float(), kf) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hnt,htd->nhd", p, vf)
    return out.to(q.dtype), lse.transpose(0, 1).contiguous()
