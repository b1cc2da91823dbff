"""Plain-torch references of the decoder's elementwise ops (what `runtime/model.py` always ran).

Rounding follows the model dtype step by step, as transformers does: the Triton versions
(`triton_ops.py`) compute in float32 and round once per output, so in bf16 they may differ by
an ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., H]`, weight `[H]` -> `[..., H]` (normalised in float32, scaled in x's dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual `[n, H]` -> (s = x + residual, rms_norm(s)), both `[n, H]`."""
    s = x + residual
    return s, rms_norm(s, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[n, heads, D]`, cos/sin `[n, 1, D]` (halves duplicated, the transformers layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q: int, num_kv: int,
             head_dim: int, *, qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
             eps: float = 1e-6, k_cache: torch.Tensor | None = None,
             v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection, rotate q and k (after a per-head RMSNorm with `qk_norm`'s
    (q, k) weights); with `k_cache`, write k and v to `slots` of the caches.

    qkv `[n, (num_q + 2 num_kv) D]` (num_kv may be 0: q only), cos/sin `[n, 1, D]`,
    k_cache/v_cache `[Hkv, slots, D]`, slots `[n]` -> q `[n, Hq, D]`, k/v `[n, Hkv, D]`.
    """
    n, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_q * d, num_kv * d, num_kv * d], dim=-1)
    q, k, v = q.view(n, num_q, d), k.view(n, num_kv, d), v.view(n, num_kv, d)
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm[0], eps), rms_norm(k, qk_norm[1], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if k_cache is not None:
        k_cache.index_copy_(1, slots, k.transpose(0, 1))
        v_cache.index_copy_(1, slots, v.transpose(0, 1))
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up `[n, 2I]` (gate first) -> silu(gate) * up `[n, I]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
