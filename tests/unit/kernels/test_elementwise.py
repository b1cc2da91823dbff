"""The Triton elementwise ops against their torch references, over odd shapes (on CUDA where
there is a device, else through Triton's CPU interpreter; fp32, and bf16 on CUDA)."""

from __future__ import annotations

import pytest
import torch

from lsrt.kernels import triton_available
from lsrt.kernels.elementwise import get_elementwise_ops
from lsrt.runtime.errors import InvalidRequest

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def ops():
    return get_elementwise_ops("torch"), get_elementwise_ops("triton")


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if not b.numel():
        return
    scale = max(1.0, b.float().abs().max().item())
    assert (a.float() - b.float()).abs().max().item() <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (3, 4, 8), (7, 100)])
def test_rms_norms_match_reference(ops, dtype, shape) -> None:
    ref, tri = ops
    gen = torch.Generator().manual_seed(sum(shape))
    x, r = _rand(gen, *shape, dtype=dtype), _rand(gen, *shape, dtype=dtype)
    w = _rand(gen, shape[-1], dtype=dtype)
    _close(tri.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    (s_t, y_t), (s_r, y_r) = tri.add_rms_norm(x, r, w, 1e-6), ref.add_rms_norm(x, r, w, 1e-6)
    _close(s_t, s_r, dtype)
    _close(y_t, y_r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,num_q,num_kv,d", [(1, 4, 2, 8), (5, 9, 3, 64), (3, 3, 0, 16),
                                              (2, 2, 2, 6)])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_rope_qkv_matches_reference(ops, dtype, n, num_q, num_kv, d, qk_norm, write) -> None:
    if write and num_kv == 0:
        pytest.skip("nothing to write")
    ref, tri = ops
    gen = torch.Generator().manual_seed(n * 100 + num_q * 10 + d)
    qkv = _rand(gen, n, (num_q + 2 * num_kv) * d, dtype=dtype)
    angles = torch.rand(n, 1, d // 2, generator=gen) * 6.0
    cos = torch.cat([angles.cos()] * 2, -1).to(device=DEVICE, dtype=dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(device=DEVICE, dtype=dtype)
    norms = (_rand(gen, d, dtype=dtype), _rand(gen, d, dtype=dtype)) if qk_norm else None
    slots = torch.randperm(11, generator=gen)[:n].to(DEVICE)
    outs = []
    for impl in (ref, tri):
        kw = {}
        if write:
            kw = dict(k_cache=torch.zeros(num_kv, 11, d, dtype=dtype, device=DEVICE),
                      v_cache=torch.zeros(num_kv, 11, d, dtype=dtype, device=DEVICE),
                      slots=slots)
        q, k, v = impl.rope_qkv(qkv.clone(), cos, sin, num_q, num_kv, d, qk_norm=norms,
                                eps=1e-6, **kw)
        outs.append((q, k, v, kw.get("k_cache"), kw.get("v_cache")))
    for a, b in zip(*outs):
        if a is not None:
            _close(a, b, dtype)
    if write:  # the caches changed at the slots, and only there
        for cache in outs[1][3:]:
            written = cache.abs().sum(dim=(0, 2)).nonzero().flatten()
            assert sorted(written.tolist()) == sorted(slots.tolist())


def test_rope_rotates_by_position(ops) -> None:
    """A wrong sign or half swap in the kernel fails: rotating by +a then by -a is identity."""
    _, tri = ops
    gen = torch.Generator().manual_seed(3)
    qkv = _rand(gen, 2, 3 * 8, dtype=torch.float32)
    a = torch.rand(2, 1, 4, generator=gen) * 3
    there = tri.rope_qkv(qkv.clone(), torch.cat([a.cos()] * 2, -1).to(DEVICE),
                         torch.cat([a.sin()] * 2, -1).to(DEVICE), 1, 1, 8)
    qkv2 = torch.cat([there[0].reshape(2, 8), there[1].reshape(2, 8), there[2].reshape(2, 8)], 1)
    back = tri.rope_qkv(qkv2.clone(), torch.cat([a.cos()] * 2, -1).to(DEVICE),
                        torch.cat([(-a).sin()] * 2, -1).to(DEVICE), 1, 1, 8)
    assert torch.allclose(torch.cat([t.reshape(2, 8) for t in back], 1), qkv, atol=1e-5)
    assert not torch.allclose(qkv2, qkv, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,inner", [(1, 1536), (3, 100), (4, 7)])
def test_silu_mul_matches_reference(ops, dtype, n, inner) -> None:
    ref, tri = ops
    gu = _rand(torch.Generator().manual_seed(inner), n, 2 * inner, dtype=dtype)
    _close(tri.silu_mul(gu), ref.silu_mul(gu), dtype)


def test_unknown_ops_name_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="expected torch, triton or auto"):
        get_elementwise_ops("cuda")
    assert get_elementwise_ops("auto", "cpu").name == "torch"  # never the interpreter
    assert get_elementwise_ops("auto", "cuda").name == "triton"
