"""Triton hybrid tree / prefill attention against the torch reference.

On the CPU this runs through TRITON_INTERPRET=1 (set in conftest.py): shapes stay small because
the interpreter is slow. The `gpu` tests use real long contexts in bf16.
"""

from __future__ import annotations

import pytest
import torch

from lsrt.kernels import get_attention_backend, triton_available
from lsrt.kernels.attention import reference as ref
from lsrt.kernels.attention.testing import causal_mask, paged_case, tree_mask

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (n, hkv, group, head_dim, prefix_len, block_size, block_n, split_len)
CASES = [
    (1, 1, 1, 64, 0, 16, 16, None),       # no prefix, single query
    (5, 2, 3, 64, 37, 16, 16, 32),        # odd prefix over two splits, GQA 3
    (16, 1, 4, 64, 300, 8, 32, 64),       # five splits, small pages
    (33, 2, 1, 128, 17, 16, 16, None),    # head_dim 128, n > 32
    (3, 1, 8, 64, 45, 4, 16, 16),         # GQA 8, many tiny splits
    (128, 1, 1, 64, 20, 16, 64, None),    # the largest tree
    (2, 1, 2, 16, 16 * 70 + 5, 16, 16, 16),  # 71 prefix splits + the tree: a two-pass reduce
]


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("case_args", CASES, ids=lambda c: "n{}-h{}x{}-d{}-L{}-bs{}".format(*c))
def test_tree_kernel_matches_reference_fp32(case_args: tuple) -> None:
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    n, hkv, group, d, length, bs, block_n, split_len = case_args
    gen = torch.Generator().manual_seed(n * 131 + length)
    case = paged_case(n=n, hkv=hkv, group=group, d=d, prefix_len=length, block_size=bs, gen=gen,
                      device=DEVICE)
    mask = tree_mask(n, gen).to(DEVICE)
    cfg = TreeAttentionConfig(block_n=block_n, split_len=split_len)
    out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case_args", [CASES[1], CASES[2], CASES[4]],
                         ids=lambda c: "n{}-h{}x{}-d{}-L{}-bs{}".format(*c))
def test_tree_kernel_prefetched_page_ids(case_args: tuple) -> None:
    """Page ids loaded one tile ahead (`prefetch_pages`) over shuffled blocks, splits ending in
    a partial tile, and pages smaller than a tile: the reference's result."""
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    n, hkv, group, d, length, bs, block_n, split_len = case_args
    gen = torch.Generator().manual_seed(n * 7 + length)
    case = paged_case(n=n, hkv=hkv, group=group, d=d, prefix_len=length, block_size=bs, gen=gen,
                      device=DEVICE)
    mask = tree_mask(n, gen).to(DEVICE)
    cfg = TreeAttentionConfig(block_n=block_n, split_len=split_len, prefetch_pages=True)
    out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


# Pages holding whole key tiles: (n, hkv, group, head_dim, prefix_len, block_size, block_n,
# split_len)
TMA_CASES = [
    (5, 2, 3, 64, 37, 16, 16, 32),      # one tile a page, two splits, a partial last tile
    (16, 1, 4, 64, 300, 64, 32, 64),    # two tiles a page, five splits
    (3, 2, 2, 32, 200, 32, 16, None),   # splits chosen from the shapes
]


@pytest.mark.parametrize("case_args", TMA_CASES, ids=lambda c: "n{}-h{}x{}-d{}-L{}-bs{}".format(*c))
def test_tree_kernel_tma_descriptors(case_args: tuple) -> None:
    """Whole key tiles through TMA descriptors over shuffled pages (the partial last tile of a
    split through the gather): the reference's result."""
    from lsrt.kernels.attention.triton_tree import (TreeAttentionConfig, paged_hybrid_attention,
                                                    tma_usable)

    n, hkv, group, d, length, bs, block_n, split_len = case_args
    gen = torch.Generator().manual_seed(n * 5 + length)
    case = paged_case(n=n, hkv=hkv, group=group, d=d, prefix_len=length, block_size=bs, gen=gen,
                      device=DEVICE)
    mask = tree_mask(n, gen).to(DEVICE)
    assert tma_usable(True, case["k_cache_layer"], case["v_cache_layer"], bs, block_n, 16)
    cfg = TreeAttentionConfig(block_n=block_n, split_len=split_len, tma=True)
    out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_tma_refused_where_it_cannot_work() -> None:
    """tma=True where a key tile spans pages, or where the K/V layer is not one matrix of rows,
    fails with the reason; tma=None falls back to the gather there, for short row tiles and on
    the interpreter."""
    from lsrt.kernels.attention.triton_tree import (TreeAttentionConfig, paged_hybrid_attention,
                                                    tma_usable)

    gen = torch.Generator().manual_seed(8)
    case = paged_case(n=4, hkv=2, group=2, d=32, prefix_len=50, block_size=16, gen=gen,
                      device=DEVICE)
    mask = tree_mask(4, gen).to(DEVICE)
    k, v = case["k_cache_layer"], case["v_cache_layer"]
    with pytest.raises(ValueError, match="block_size 16 is not a multiple of block_n 32"):
        paged_hybrid_attention(**case, mask=mask, config=TreeAttentionConfig(block_n=32, tma=True))
    strided = torch.cat([k, k], dim=1)[:, :k.shape[1]]  # heads twice apart: not one matrix
    with pytest.raises(ValueError, match="not \\[Hkv \\* num_slots, head_dim\\] matrices"):
        tma_usable(True, strided, v, 16, 16, 128)
    assert not tma_usable(None, strided, v, 16, 16, 128)
    assert not tma_usable(False, k, v, 16, 16, 128)
    assert not tma_usable(None, k, v, 16, 16, 64)  # short row tiles keep the gather
    assert tma_usable(None, k, v, 16, 16, 128) == (DEVICE == "cuda"
                                                  and torch.cuda.get_device_capability() >= (9, 0))
    out, _ = paged_hybrid_attention(**case, mask=mask, config=TreeAttentionConfig(block_n=32))
    torch.testing.assert_close(out, ref.paged_hybrid_attention(**case, mask=mask)[0], rtol=1e-4,
                               atol=1e-4)


# (n, hkv, group, head_dim, prefix_len, block_size, block_m, block_n, split_len, tma)
HALVES_CASES = [
    (10, 2, 4, 32, 185, 8, 32, 16, 64, False),   # 2 row tiles, the last half empty; partials
    (7, 1, 4, 64, 300, 32, 64, 16, None, True),  # TMA tiles, splits from the shapes
    (16, 2, 2, 32, 77, 16, 32, 16, 32, True),    # one row tile, 3 splits ending mid-tile
]


@pytest.mark.parametrize("case_args", HALVES_CASES,
                         ids=lambda c: "n{}-h{}x{}-d{}-L{}-bs{}-bm{}".format(*c))
def test_tree_kernel_halves(case_args: tuple) -> None:
    """Row tiles run as two halves sharing each K/V tile (gathered or through TMA), with a
    half of padding rows and splits ending in a partial tile: the reference's result."""
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    n, hkv, group, d, length, bs, block_m, block_n, split_len, tma = case_args
    gen = torch.Generator().manual_seed(n * 3 + length)
    case = paged_case(n=n, hkv=hkv, group=group, d=d, prefix_len=length, block_size=bs, gen=gen,
                      device=DEVICE)
    mask = tree_mask(n, gen).to(DEVICE)
    cfg = TreeAttentionConfig(block_m=block_m, block_n=block_n, split_len=split_len, tma=tma,
                              halves=True)
    out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_halves_follow_the_row_tile_unless_given() -> None:
    """halves=None: on for row tiles of HALVES_MIN_ROWS or more, unless warp specialisation or
    page-id prefetch (which only the whole-tile loop has) is asked for; given, it is kept, and
    a row tile too short to halve (a half must be a 16-row matrix product) is refused by name."""
    from lsrt.kernels.attention.triton_tree import (HALVES_MIN_ROWS, TreeAttentionConfig,
                                                    config_halves, halves_for,
                                                    paged_hybrid_attention)

    assert halves_for(None, HALVES_MIN_ROWS) and not halves_for(None, HALVES_MIN_ROWS // 2)
    assert not halves_for(None, HALVES_MIN_ROWS, whole_tile_loop=True)
    assert halves_for(True, 32) and halves_for(True, 128, whole_tile_loop=True)
    assert not halves_for(False, 128)
    # Both kernels' configs decide the same way (`config_halves`).
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig
    for config in (TreeAttentionConfig, GraphAttentionConfig):
        assert config_halves(config(), HALVES_MIN_ROWS)
        assert not config_halves(config(), HALVES_MIN_ROWS // 2)
        assert not config_halves(config(warp_specialize=True), HALVES_MIN_ROWS)
        assert not config_halves(config(prefetch_pages=True), HALVES_MIN_ROWS)
        assert config_halves(config(prefetch_pages=False), HALVES_MIN_ROWS)
        assert config_halves(config(halves=True, warp_specialize=True), 32)
    gen = torch.Generator().manual_seed(2)
    case = paged_case(n=4, hkv=1, group=2, d=16, prefix_len=40, block_size=16, gen=gen,
                      device=DEVICE)  # 8 rows: a 16-row tile
    with pytest.raises(ValueError, match="halves need row tiles of at least 32 rows, not 16"):
        paged_hybrid_attention(**case, mask=tree_mask(4, gen).to(DEVICE),
                               config=TreeAttentionConfig(halves=True))


def test_tiles_follow_the_row_tile_unless_given() -> None:
    """Short row tiles (<= 64 rows) get 32-key tiles 3 stages deep with page ids prefetched,
    128-row tiles 64 keys x 2 stages; anything given explicitly is kept; a split length that is
    not a multiple of the chosen key tile is refused with the two numbers."""
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention
    from lsrt.kernels.attention.triton_tree import tiles

    assert tiles(16, None, None, None) == (32, 3, True)
    assert tiles(64, None, None, None) == (32, 3, True)
    assert tiles(128, None, None, None) == (64, 2, False)
    assert tiles(64, 64, 2, False) == (64, 2, False)
    assert tiles(128, 32, 4, True) == (32, 4, True)
    gen = torch.Generator().manual_seed(3)
    case = paged_case(n=40, hkv=1, group=2, d=16, prefix_len=100, block_size=16, gen=gen,
                      device=DEVICE)  # 80 rows: a 128-row tile, so 64-key tiles
    with pytest.raises(ValueError, match="split_len 48 is not a multiple of block_n 64"):
        paged_hybrid_attention(**case, mask=tree_mask(40, gen).to(DEVICE),
                               config=TreeAttentionConfig(split_len=48))
    with pytest.raises(ValueError, match="multiple of 16"):
        TreeAttentionConfig(split_len=40)


@pytest.mark.parametrize("rows_first", [True, False], ids=["rows-first", "heads-first"])
def test_tree_kernel_several_row_tiles_either_grid_order(rows_first: bool) -> None:
    """rows = 10 queries x GQA 4 = 40 > block_m 16: three row tiles per KV head, each reading
    the same K/V tiles; a prefix of 3 whole tiles and a partial one per split."""
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    gen = torch.Generator().manual_seed(404)
    case = paged_case(n=10, hkv=2, group=4, d=32, prefix_len=2 * 64 + 57, block_size=8,
                      gen=gen, device=DEVICE)
    mask = tree_mask(10, gen).to(DEVICE)
    cfg = TreeAttentionConfig(block_m=16, block_n=16, split_len=64, rows_first=rows_first)
    out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


def test_prefill_kernel_chunks_queries_causally() -> None:
    gen = torch.Generator().manual_seed(11)
    case = paged_case(n=40, hkv=2, group=2, d=64, prefix_len=50, block_size=16, gen=gen,
                      device=DEVICE)
    triton_backend = get_attention_backend("triton")
    out, lse = triton_backend.paged_prefill_attention(**case)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=causal_mask(40).to(DEVICE))
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)
    from lsrt.kernels.attention.triton_prefill import paged_prefill_attention

    chunked, chunked_lse = paged_prefill_attention(**case, max_queries=16)
    torch.testing.assert_close(chunked, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked_lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("length", [8192, 32768 + 77, 131072 + 13])
@pytest.mark.parametrize("n", [1, 16, 64])
@pytest.mark.parametrize("block_size", [16, 64])
def test_tree_kernel_bf16_long_context(length: int, n: int, block_size: int) -> None:
    """The default launch at 8K-128K, 16-token pages (the gather) and 64-token pages (the GPU
    runtime's default: TMA and halves for the 128-row tile of n = 64)."""
    gen = torch.Generator().manual_seed(length + n)
    case = paged_case(n=n, hkv=8, group=4, d=128, prefix_len=length, block_size=block_size,
                      gen=gen, dtype=torch.bfloat16, device="cuda")
    mask = tree_mask(n, gen).cuda()
    out, lse = get_attention_backend("triton").paged_hybrid_attention(**case, mask=mask)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    assert torch.isfinite(out.float()).all()
    assert _relerr(out, want_out) < 1e-2
    assert _relerr(lse, want_lse) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["", "ws"])
@pytest.mark.parametrize("other", ["", "prefetch_pages", "tma", "halves"])
@pytest.mark.parametrize("n", [16, 64])
def test_tree_kernel_launch_variants_bf16(pdl: bool, warp_specialize: bool, other: str,
                                          n: int) -> None:
    """The reduce launched early (programmatic dependent launch), the warp-specialised prefix
    loop, page ids loaded a tile ahead, key tiles through TMA descriptors (64-token pages) and
    row tiles as two halves give the reference's result, like the plain launch (32K + 77: a
    partial last tile)."""
    from lsrt.kernels.attention.triton_tree import (TreeAttentionConfig, paged_hybrid_attention,
                                                    pdl_supported)

    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper GPU and Triton's gdc ops")
    gen = torch.Generator().manual_seed(n)
    if other == "tma" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper-or-newer GPU")
    case = paged_case(n=n, hkv=8, group=4, d=128, prefix_len=32768 + 77,
                      block_size=64 if other == "tma" else 16, gen=gen, dtype=torch.bfloat16,
                      device="cuda")
    mask = tree_mask(n, gen).cuda()
    cfg = TreeAttentionConfig(pdl=pdl, warp_specialize=warp_specialize,
                              **({other: True} if other else {}))
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    for _ in range(3):  # repeated launches: a reduce that ran ahead of its inputs would show
        out, lse = paged_hybrid_attention(**case, mask=mask, config=cfg)
        assert _relerr(out, want_out) < 1e-2
        assert _relerr(lse, want_lse) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_kernel_bf16_long_context() -> None:
    gen = torch.Generator().manual_seed(5)
    case = paged_case(n=700, hkv=8, group=4, d=128, prefix_len=8000, block_size=16, gen=gen,
                      dtype=torch.bfloat16, device="cuda")
    out, lse = get_attention_backend("triton").paged_prefill_attention(**case)
    want_out, want_lse = ref.paged_prefill_attention(**case)
    assert _relerr(out, want_out) < 1e-2
    assert _relerr(lse, want_lse) < 1e-3
