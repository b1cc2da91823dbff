"""The plain-torch hybrid attention against the naive dense-mask oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from lsrt.kernels.attention import reference as ref
from lsrt.kernels.attention.testing import causal_mask, dense_oracle, paged_case, tree_mask
from lsrt.runtime.errors import InvalidRequest

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("group,n,prefix_len",
                         list(itertools.product([1, 3, 4], [1, 5, 16, 33], [0, 1, 17, 300])))
def test_reference_matches_dense_oracle(group: int, n: int, prefix_len: int) -> None:
    gen = torch.Generator().manual_seed(1000 * group + 10 * n + prefix_len)
    case = paged_case(n=n, hkv=2, group=group, d=16, prefix_len=prefix_len, block_size=8,
                      gen=gen)
    for mask in (tree_mask(n, gen), causal_mask(n)):
        out, lse = ref.paged_hybrid_attention(**case, mask=mask)
        want_out, want_lse = dense_oracle(case, mask)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_prefix_chunking_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(7)
    n, hkv, group, d, length = 9, 2, 2, 16, 301
    q = torch.randn(n, hkv * group, d, generator=gen)
    kp, vp = torch.randn(2, hkv, length, d, generator=gen)
    kn, vn = torch.randn(2, n, hkv, d, generator=gen)
    mask = tree_mask(n, gen)
    whole = ref.hybrid_attention(q, kp, vp, kn, vn, mask, 0.3, chunk_size=10_000)
    chunked = ref.hybrid_attention(q, kp, vp, kn, vn, mask, 0.3, chunk_size=7)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_strided_prefix_view_and_paged_vs_contiguous() -> None:
    """A paged prefix in shuffled blocks gives what the same keys laid out contiguously give."""
    gen = torch.Generator().manual_seed(3)
    case = paged_case(n=6, hkv=2, group=3, d=16, prefix_len=45, block_size=4, gen=gen)
    mask = tree_mask(6, gen)
    paged = ref.paged_hybrid_attention(**case, mask=mask)
    kp = ref.gather_prefix(case["k_cache_layer"], case["block_table"], 45, 4)
    vp = ref.gather_prefix(case["v_cache_layer"], case["block_table"], 45, 4)
    # Contiguous prefix as a strided view into a bigger "pool" (heads before slots).
    pool_k = torch.zeros(3, 2, 64, 16)
    pool_v = torch.zeros(3, 2, 64, 16)
    pool_k[1, :, 10:55] = kp
    pool_v[1, :, 10:55] = vp
    contiguous = ref.hybrid_attention(case["q"], pool_k[1, :, 10:55], pool_v[1, :, 10:55],
                                      case["k_new"], case["v_new"], mask, case["scale"])
    torch.testing.assert_close(paged, contiguous, rtol=1e-6, atol=1e-6)


def test_bf16_inputs_close_to_fp32() -> None:
    gen = torch.Generator().manual_seed(5)
    case = paged_case(n=8, hkv=2, group=4, d=32, prefix_len=100, block_size=16, gen=gen)
    mask = tree_mask(8, gen)
    want, _ = ref.paged_hybrid_attention(**case, mask=mask)
    low = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in case.items()}
    out, lse = ref.paged_hybrid_attention(**low, mask=mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, rtol=3e-2, atol=3e-2)


def test_row_with_no_visible_key_is_zero_with_minus_inf_lse() -> None:
    gen = torch.Generator().manual_seed(9)
    case = paged_case(n=3, hkv=1, group=2, d=16, prefix_len=0, block_size=4, gen=gen)
    mask = torch.eye(3, dtype=torch.bool)
    mask[1, 1] = False
    out, lse = ref.paged_hybrid_attention(**case, mask=mask)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.isfinite(lse[[0, 2]]).all()


def test_bad_shapes_raise_invalid_request() -> None:
    gen = torch.Generator().manual_seed(1)
    case = paged_case(n=4, hkv=2, group=2, d=16, prefix_len=10, block_size=4, gen=gen)
    with pytest.raises(InvalidRequest):
        ref.paged_hybrid_attention(**case, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(InvalidRequest):
        ref.paged_hybrid_attention(**{**case, "prefix_len": 1000}, mask=causal_mask(4))
