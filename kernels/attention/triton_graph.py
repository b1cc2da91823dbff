"""Graph-safe Triton paged hybrid (tree) attention: the prefix length is read from device memory.

A CUDA graph freezes every kernel's grid and scalar arguments at capture time, so the kernels of
`triton_tree` (grid and split length computed on the host from `prefix_len`) cannot be replayed
for a sequence that has grown. Here the grid is sized once from `max_prefix` (a number of prefix
splits fixed at capture), and each program reads the live `prefix_len` from a 1-element device
tensor: the split length is derived on the device (the same formula `triton_tree._plan` uses on
the host, so partitions and results match the eager kernel), and programs whose split starts at
or past `prefix_len` run no iterations and write an empty partial (lse = -inf), which the reduce
ignores. `max_prefix` only sets the parallelism: any prefix the block table holds is correct.

Same math and layout as `triton_tree`, whose prefix and tree programs and reduce kernel are
reused: all n queries x `group` query heads of a KV head share each K/V tile load.
This module imports Triton: import it only where `lsrt.kernels.triton_available()` is true.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lsrt.kernels.attention.triton_tree import (
    _LOG2E, _new_program, _num_sms, _prefix_program, _program_ids, gdc_launch_dependents,
    config_halves, grid_of, launch_reduce, pdl_supported, tiles, tma_descriptors, tma_usable)
from lsrt.runtime.errors import InvalidRequest


@dataclass(frozen=True, kw_only=True)
class GraphAttentionConfig:
    """Launch parameters; None means chosen from the shapes (see `plan`)."""

    block_m: int | None = None      # rows (queries x group) per program; power of two >= 16
    block_n: int | None = None      # keys per tile; power of two >= 16 (None: `tiles`)
    min_split_tiles: int = 4        # a split covers at least this many key tiles
    num_splits: int | None = None   # prefix splits in the grid (None: waves x SMs worth)
    waves: int = 2
    num_warps: int = 4
    num_stages: int | None = None   # None: `triton_tree.tiles`
    rows_first: bool = True         # grid order, see `triton_tree`
    pdl: bool = False               # early reduce launch where supported, see there
    warp_specialize: bool = False   # see `triton_tree.TreeAttentionConfig`
    prefetch_pages: bool | None = None  # likewise (None: `tiles`)
    tma: bool | None = None         # likewise (None: `triton_tree.tma_usable`)
    halves: bool | None = None      # likewise (None: `triton_tree.halves_for`)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val is not None and (val < 16 or val & (val - 1)):
                raise ValueError(f"GraphAttentionConfig.{name} must be a power of two >= 16")
        if self.num_splits is not None and self.num_splits <= 0:
            raise ValueError("GraphAttentionConfig.num_splits must be positive")
        if min(self.min_split_tiles, self.waves, self.num_warps, self.num_stages or 1) <= 0:
            raise ValueError("GraphAttentionConfig counts must be positive")


@triton.jit
def _graph_partial_kernel(
    q_ptr, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr, plen_ptr, kn_ptr, vn_ptr,
    mask_ptr, po_ptr, pl_ptr, n_q, num_prefix_splits, qk_scale,
    stride_qn, stride_qh, stride_kch, stride_kcs, stride_vch, stride_vcs,
    stride_knn, stride_knh, stride_vnn, stride_vnh, stride_mask,
    stride_po_s, stride_po_h, stride_pl_s, stride_pl_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_SPLIT: tl.constexpr, PAGE: tl.constexpr, IS_FP32: tl.constexpr,
    ROWS_FIRST: tl.constexpr, PDL: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr,
    TMA: tl.constexpr, HALVES: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    kvh, split, row_tile = _program_ids(ROWS_FIRST)
    if split < num_prefix_splits:
        prefix_len = tl.load(plen_ptr).to(tl.int32)
        per_split = tl.cdiv(tl.cdiv(prefix_len, num_prefix_splits), BLOCK_N) * BLOCK_N
        split_len = tl.maximum(per_split, MIN_SPLIT)
        start = split * split_len
        # end <= start: an empty partial
        _prefix_program(q_ptr, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr, po_ptr,
                        pl_ptr, kvh, split, row_tile, n_q, start,
                        tl.minimum(start + split_len, prefix_len), qk_scale, stride_qn,
                        stride_qh, stride_kch, stride_kcs, stride_vch, stride_vcs, stride_po_s,
                        stride_po_h, stride_pl_s, stride_pl_h, GROUP, HEAD_DIM, BLOCK_M,
                        BLOCK_N, PAGE, IS_FP32, WS, PREFETCH, TMA, HALVES)
    else:  # the tree: n_q new keys under the mask
        _new_program(q_ptr, kn_ptr, vn_ptr, mask_ptr, po_ptr, pl_ptr, kvh, split, row_tile, n_q,
                     n_q, 0, qk_scale, stride_qn, stride_qh, stride_knn, stride_knh, stride_vnn,
                     stride_vnh, stride_mask, stride_po_s, stride_po_h, stride_pl_s,
                     stride_pl_h, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, False, IS_FP32)


def plan(cfg: GraphAttentionConfig, n_q: int, group: int, hkv: int, max_prefix: int,
         device: torch.device) -> tuple[int, int, int, tuple[int, int, bool]]:
    """(block_m, row_tiles, num_prefix_splits, (block_n, num_stages, prefetch_pages)), fixed for
    every prefix length up to max_prefix.

    With enough splits this gives the partition `triton_tree._plan` picks at each length.
    """
    rows = n_q * group
    block_m = cfg.block_m or min(128, max(16, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    tile = tiles(block_m, cfg.block_n, cfg.num_stages, cfg.prefetch_pages)
    if max_prefix <= 0:
        return block_m, row_tiles, 0, tile
    want = cfg.num_splits or max(1, cfg.waves * _num_sms(device) // (hkv * row_tiles))
    min_split = cfg.min_split_tiles * tile[0]
    return block_m, row_tiles, max(1, min(want, triton.cdiv(max_prefix, min_split))), tile


def _check(q: torch.Tensor, k_cache_layer: torch.Tensor, v_cache_layer: torch.Tensor,
           block_table: torch.Tensor, prefix_len: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, mask: torch.Tensor) -> None:
    n, hq, d = q.shape
    hkv = k_cache_layer.shape[0]
    if d not in (16, 32, 64, 128, 256):
        raise InvalidRequest(f"head_dim must be a power of two in [16, 256], got {d}")
    if hq % hkv:
        raise InvalidRequest(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache_layer.shape[2] != d or v_cache_layer.shape != k_cache_layer.shape:
        raise InvalidRequest("K/V cache layers must both be [Hkv, num_slots, head_dim]")
    if k_new.shape != (n, hkv, d) or v_new.shape != k_new.shape:
        raise InvalidRequest(f"new K/V must be [{n}, {hkv}, {d}]")
    if mask.shape != (n, n) or mask.stride(1) != 1:
        raise InvalidRequest(f"mask must be [{n}, {n}] with contiguous rows")
    if prefix_len.numel() != 1 or prefix_len.dtype not in (torch.int32, torch.int64):
        raise InvalidRequest("prefix_len must be a 1-element int32/int64 device tensor")
    if prefix_len.device != q.device or block_table.device != q.device:
        raise InvalidRequest("prefix_len and block_table must live on the queries' device")
    for t in (q, k_cache_layer, v_cache_layer, k_new, v_new):
        if t.stride(-1) != 1:
            raise InvalidRequest("attention inputs need a contiguous last (head_dim) dimension")


def paged_hybrid_attention_graph(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [max_blocks] int32/int64; must hold prefix_len tokens
    prefix_len: torch.Tensor,     # [1] int32/int64 on the device: read by the kernel, not host
    k_new: torch.Tensor,          # [n, Hkv, D]
    v_new: torch.Tensor,          # [n, Hkv, D]
    mask: torch.Tensor,           # [n, n] bool or integer (nonzero = may attend)
    scale: float,
    block_size: int,
    max_prefix: int,
    config: GraphAttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.paged_hybrid_attention` with no host read of `prefix_len` (graph-capturable).

    Returns (out [n, Hq, D], lse [n, Hq] float32). The launch depends only on shapes and
    `max_prefix`, never on the value in `prefix_len`.
    """
    cfg = config or GraphAttentionConfig()
    _check(q, k_cache_layer, v_cache_layer, block_table, prefix_len, k_new, v_new, mask)
    n, hq, d = q.shape
    hkv = k_cache_layer.shape[0]
    group = hq // hkv
    block_m, row_tiles, num_prefix, (block_n, stages, prefetch) = plan(cfg, n, group, hkv,
                                                                        max_prefix, q.device)
    rows = n * group
    part_out = torch.empty(num_prefix + 1, hkv, rows, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_prefix + 1, hkv, rows, dtype=torch.float32, device=q.device)
    mask_t = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    pdl = cfg.pdl and pdl_supported(q.device)
    tma = tma_usable(cfg.tma, k_cache_layer, v_cache_layer, block_size, block_n, block_m)
    k_desc, v_desc = (tma_descriptors(k_cache_layer, v_cache_layer, block_n) if tma
                      else (k_cache_layer, v_cache_layer))
    _graph_partial_kernel[grid_of(row_tiles, hkv, num_prefix + 1, cfg.rows_first)](
        q, k_cache_layer, v_cache_layer, k_desc, v_desc, k_cache_layer.shape[1], block_table,
        prefix_len, k_new, v_new, mask_t, part_out, part_lse, n, num_prefix, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache_layer.stride(0), k_cache_layer.stride(1),
        v_cache_layer.stride(0), v_cache_layer.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), mask_t.stride(0),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        MIN_SPLIT=cfg.min_split_tiles * block_n, PAGE=block_size,
        IS_FP32=q.dtype == torch.float32, ROWS_FIRST=cfg.rows_first, PDL=pdl,
        WS=cfg.warp_specialize, PREFETCH=prefetch, TMA=tma,
        HALVES=config_halves(cfg, block_m),
        num_warps=cfg.num_warps,
        num_stages=stages,
    )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    launch_reduce(part_out, part_lse, out, lse, group, pdl)
    return out, lse
