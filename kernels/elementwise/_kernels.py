"""The Triton kernels behind `lsrt.kernels.elementwise.triton_ops` (imports Triton).

Each computes in float32 and rounds once per stored value; one program per row (norms), per
(token, head) (RoPE), or per (row, column block) (SiLU-mul).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = w * (s / rms(s)) with s = x (+ r, stored to s_ptr when HAS_RES), one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + cols, x, mask=ok)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    h = (h * inv).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * h).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rope_qkv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_t, stride_c, stride_kch, stride_kcs, stride_vch, stride_vcs, eps,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    QK_NORM: tl.constexpr, WRITE: tl.constexpr,
):
    """One (token, head) of a fused q|k|v row: q and k heads rotated in place (after a per-head
    RMSNorm with QK_NORM); with WRITE, k and v heads also stored at the token's cache slot."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    base = qkv_ptr + t * stride_t + h * (2 * HALF)
    dtype = qkv_ptr.dtype.element_ty
    if h >= NUM_Q + NUM_KV:  # a v head: only the cache write
        if WRITE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            dst = vc_ptr + (h - NUM_Q - NUM_KV) * stride_vch + slot * stride_vcs
            tl.store(dst + i, tl.load(base + i, mask=ok), mask=ok)
            tl.store(dst + HALF + i, tl.load(base + HALF + i, mask=ok), mask=ok)
    else:
        x1 = tl.load(base + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + i, mask=ok, other=0.0).to(tl.float32)
        if QK_NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0))
                           / (2 * HALF) + eps)
            if h < NUM_Q:
                w1 = tl.load(qn_ptr + i, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(qn_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(kn_ptr + i, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(kn_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        c1 = tl.load(cos_ptr + t * stride_c + i, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_c + HALF + i, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_c + i, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_c + HALF + i, mask=ok, other=0.0).to(tl.float32)
        o1 = (x1 * c1 - x2 * s1).to(dtype)
        o2 = (x2 * c2 + x1 * s2).to(dtype)
        tl.store(base + i, o1, mask=ok)
        tl.store(base + HALF + i, o2, mask=ok)
        if WRITE:
            if h >= NUM_Q:
                slot = tl.load(slot_ptr + t).to(tl.int64)
                dst = kc_ptr + (h - NUM_Q) * stride_kch + slot * stride_kcs
                tl.store(dst + i, o1, mask=ok)
                tl.store(dst + HALF + i, o2, mask=ok)


@triton.jit
def silu_mul_kernel(gu_ptr, y_ptr, n_inner, stride_gu, stride_y, BLOCK: tl.constexpr):
    """y = silu(gate) * up for one column block of one row of [gate | up]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_inner
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n_inner + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)
