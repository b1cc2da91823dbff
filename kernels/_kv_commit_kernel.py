"""The Triton kernel behind `lsrt.kernels.kv_commit.kv_commit_triton` (imports Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_commit_kernel(
    k_ptr, v_ptr, src_ptr, dst_ptr, m, hkv,
    stride_kl, stride_kh, stride_ks, stride_vl, stride_vh, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Copy rows src -> dst of one (layer, KV head), tile by tile in slot order.

    Programs touch disjoint (layer, head) planes, so the only hazard is inside a program: a store
    to dst[i] that equals an earlier src[j] (j < i). Each tile's loads complete before its stores
    (barrier), and earlier tiles finished before later ones start, which the ordering contract
    makes sufficient (see kv_commit.py).
    """
    pid = tl.program_id(0)
    layer = pid // hkv
    head = pid % hkv
    k_base = k_ptr + layer.to(tl.int64) * stride_kl + head.to(tl.int64) * stride_kh
    v_base = v_ptr + layer.to(tl.int64) * stride_vl + head.to(tl.int64) * stride_vh
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for s0 in range(0, m, BLOCK_S):
        idx = s0 + tl.arange(0, BLOCK_S)
        ok = idx < m
        src = tl.load(src_ptr + idx, mask=ok, other=0).to(tl.int64)
        dst = tl.load(dst_ptr + idx, mask=ok, other=0).to(tl.int64)
        io = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + src[:, None] * stride_ks + d[None, :], mask=io)
        v = tl.load(v_base + src[:, None] * stride_vs + d[None, :], mask=io)
        tl.debug_barrier()
        tl.store(k_base + dst[:, None] * stride_ks + d[None, :], k, mask=io)
        tl.store(v_base + dst[:, None] * stride_vs + d[None, :], v, mask=io)
        tl.debug_barrier()
