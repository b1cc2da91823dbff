"""KV commit: move accepted draft-tree nodes' K/V to their final, contiguous slots.

After verification the accepted nodes of a token tree sit at scattered slots; their K/V move to
the slots of positions prefix_len, prefix_len + 1, ... in every layer and KV head:
`cache[:, :, dst[i]] = cache[:, :, src[i]]`.

Ordering contract: the accepted path is taken in tree order, so `src` is sorted strictly
increasing and `src[i] >= dst[i]`. Then copying i = 0, 1, ... in order is safe even where ranges
overlap: a write to dst[i] could only clobber a source src[j] == dst[i] with j < i (since
src[j] > src[i] >= dst[i] for every j > i), and that source was already read. The torch reference
gathers all sources before scattering, so it is correct for any src with distinct dst; the Triton
kernel relies on the ordering contract (it copies tile by tile in order, with a barrier between a
tile's loads and its stores).
"""

from __future__ import annotations

import torch

from lsrt.runtime.errors import InvalidRequest


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
           dst_slots: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise InvalidRequest("K/V caches must both be [num_layers, num_kv_heads, slots, head_dim]")
    if src_slots.dim() != 1 or src_slots.shape != dst_slots.shape:
        raise InvalidRequest("src_slots and dst_slots must be 1-D of equal length")


def kv_commit_reference(
    k_cache: torch.Tensor,    # [num_layers, Hkv, num_slots, D]
    v_cache: torch.Tensor,    # [num_layers, Hkv, num_slots, D]
    src_slots: torch.Tensor,  # [m] int, sorted increasing, src >= dst
    dst_slots: torch.Tensor,  # [m] int
) -> None:
    """In place, all layers: cache[:, :, dst] = cache[:, :, src] (gather, then scatter)."""
    _check(k_cache, v_cache, src_slots, dst_slots)
    if src_slots.numel() == 0:
        return
    src = src_slots.to(k_cache.device).long()
    dst = dst_slots.to(k_cache.device).long()
    for cache in (k_cache, v_cache):
        cache.index_copy_(2, dst, cache.index_select(2, src))


def kv_commit_triton(
    k_cache: torch.Tensor,    # [num_layers, Hkv, num_slots, D]
    v_cache: torch.Tensor,    # [num_layers, Hkv, num_slots, D]
    src_slots: torch.Tensor,  # [m] int, sorted increasing, src >= dst
    dst_slots: torch.Tensor,  # [m] int
    block_s: int = 32,
) -> None:
    """Same contract as `kv_commit_reference`; one program per (layer, KV head), K and V."""
    _check(k_cache, v_cache, src_slots, dst_slots)
    m = src_slots.numel()
    if m == 0:
        return
    from lsrt.kernels._kv_commit_kernel import kv_commit_kernel  # imports Triton

    num_layers, hkv, _, d = k_cache.shape
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise InvalidRequest("K/V caches need a contiguous head_dim")
    src = src_slots.to(k_cache.device)
    dst = dst_slots.to(k_cache.device)
    import triton

    kv_commit_kernel[(num_layers * hkv,)](
        k_cache, v_cache, src, dst, m, hkv,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s, num_warps=4,
    )
