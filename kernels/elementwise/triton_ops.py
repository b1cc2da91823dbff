"""Triton versions of `reference.py`'s ops (same signatures): one kernel each, where the
reference launches 2-8 (the decoder of a small model is bound by kernel launches, not bytes)."""

from __future__ import annotations

import torch

from lsrt.kernels.elementwise import _kernels

MAX_ROW = 16384  # widest row a norm keeps in one program


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x `[..., H]` as `[rows, H]` with a unit column stride (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor | None, torch.Tensor]:
    import triton

    h = x.shape[-1]
    if h > MAX_ROW:
        raise ValueError(f"rms_norm rows of {h} exceed {MAX_ROW}")
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else y
    block = triton.next_power_of_2(h)
    _kernels.rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, y, s, h, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    out = y.view(x.shape)
    return (s.view(x.shape) if residual is not None else None), out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., H]`, weight `[H]` -> `[..., H]`."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual `[n, H]` -> (x + residual, rms_norm(x + residual))."""
    s, y = _norm(x, residual, weight, eps)
    return s, y


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q: int, num_kv: int,
             head_dim: int, *, qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
             eps: float = 1e-6, k_cache: torch.Tensor | None = None,
             v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `reference.rope_qkv`, in one kernel; rotates q and k in place inside `qkv`."""
    import triton

    n, d = qkv.shape[0], head_dim
    if d % 2 or qkv.shape[1] != (num_q + 2 * num_kv) * d:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_q}+2x{num_kv} heads of {d}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos2, sin2 = cos.reshape(n, d), sin.reshape(n, d)
    write = k_cache is not None
    kc = k_cache if write else qkv
    vc = v_cache if write else qkv
    qn, kn = qk_norm if qk_norm is not None else (qkv, qkv)
    if n:
        _kernels.rope_qkv_kernel[(n, num_q + 2 * num_kv)](
            qkv, cos2, sin2, qn, kn, kc, vc, slots if write else qkv,
            qkv.stride(0), cos2.stride(0),
            kc.stride(0) if write else 0, kc.stride(1) if write else 0,
            vc.stride(0) if write else 0, vc.stride(1) if write else 0, eps,
            NUM_Q=num_q, NUM_KV=num_kv, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
            QK_NORM=qk_norm is not None, WRITE=write, num_warps=1)
    q, k, v = qkv.split([num_q * d, num_kv * d, num_kv * d], dim=-1)
    return q.view(n, num_q, d), k.view(n, num_kv, d), v.view(n, num_kv, d)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up `[n, 2I]` (gate first) -> silu(gate) * up `[n, I]`."""
    import triton

    gu = _rows(gate_up)
    n, inner = gu.shape[0], gu.shape[1] // 2
    y = torch.empty((n, inner), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inner))
    if n:
        _kernels.silu_mul_kernel[(n, triton.cdiv(inner, block))](
            gu, y, inner, gu.stride(0), y.stride(0), BLOCK=block, num_warps=4)
    return y
