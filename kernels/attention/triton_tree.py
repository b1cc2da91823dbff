"""Triton paged hybrid (tree) attention, flash-decoding style.

Grid of the partial kernel: (row tile, KV head, split), row tiles fastest, so the programs that
read the same K/V tiles (one per row tile) are scheduled together and all but the first find
them in L2 (`rows_first=False` gives the older (KV head, split, row tile) order, in which
they run far apart and each reads the KV from HBM). Splits 0..S-1 each cover a contiguous run of
prefix positions read through the block table; the last split covers the n new keys (a draft
tree or a prefill chunk) under their mask. Every program packs the rows of all n queries x all
`group` query heads of its KV head into the M dimension of `tl.dot`, so each K/V tile is loaded
once per KV head (per row tile) instead of once per query head and query. A 128-row prefix
program holds its rows as two 64-row halves (`halves`) so that one half's softmax runs while the
tensor cores work on the other's products. Each split writes a normalised partial output and its
log2-sum-exp; the reduce kernel merges the splits.

Row r of a KV head's M dimension is query r // group, query head kv_head * group + r % group.
Scores are kept in log2 units (scale * log2(e) folded into one multiplier, exp2 throughout).
This module imports Triton: import it only where `lsrt.kernels.triton_available()` is true.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lsrt.runtime.errors import InvalidRequest

try:  # griddepcontrol (programmatic dependent launch); absent from older Triton releases
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gdc_launch_dependents = gdc_wait = None
try:  # host-side TMA descriptors; absent from older Triton releases
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

_LOG2E = 1.4426950408889634
# The reduce merges up to this many splits per loop iteration: one pass for every default plan
# (2 waves x 132 SMs / 8 KV heads = 33 prefix splits + the tree on an H100).
REDUCE_SPLITS = 64
# Row tiles at least this tall read their key tiles through TMA where the pages allow it
# (`tma_usable`).
TMA_MIN_ROWS = 128
# Row tiles at least this tall run as two halves by default (`halves_for`): each half is one
# warpgroup's 64-row wgmma.
HALVES_MIN_ROWS = 128


@dataclass(frozen=True, kw_only=True)
class TreeAttentionConfig:
    """Launch parameters; None means chosen from the shapes (see `_plan`)."""

    block_m: int | None = None   # rows (queries x group) per program; power of two >= 16
    block_n: int | None = None   # keys per tile; power of two >= 16 (None: see `tiles`)
    split_len: int | None = None  # prefix keys per program; multiple of block_n
    waves: int = 2               # aim for waves x SM-count programs when splitting the prefix
    num_warps: int | None = None
    num_stages: int | None = None  # software-pipeline depth of the K/V loads (None: `tiles`)
    rows_first: bool = True      # grid order: row tiles sharing a K/V tile run side by side
    # Launch the reduce early (programmatic dependent launch), where the GPU and Triton support
    # it (`pdl_supported`). Off by default: no gain measured on an H100 (docs/BENCHMARKS.md).
    pdl: bool = False
    warp_specialize: bool = False  # Triton's warp-specialised pipelining of the prefix loop
    #                                (also no gain measured there)
    # Load the next tile's page ids one iteration ahead instead of just before its K/V copies
    # (None: by the row tile, see `tiles`).
    prefetch_pages: bool | None = None
    # Whole prefix tiles copied by the tensor memory accelerator (TMA: one descriptor load per
    # K/V tile, no per-element addresses) where a tile lies inside one page (block_size a
    # multiple of block_n). None: for 128-row tiles where possible on a Hopper-or-newer GPU
    # (see `tma_usable`).
    tma: bool | None = None
    # Split each prefix program's row tile into two halves that share every K/V tile, so one
    # half's softmax overlaps the other half's matrix products (see `_attend_prefix_halves`).
    # None: for row tiles of at least `HALVES_MIN_ROWS` unless warp_specialize or
    # prefetch_pages is asked for (the halves loop has neither; see `halves_for`).
    halves: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val is not None and (val < 16 or val & (val - 1)):
                raise ValueError(f"TreeAttentionConfig.{name} must be a power of two >= 16")
        if self.split_len is not None and (self.split_len <= 0 or self.split_len % 16):
            raise ValueError("TreeAttentionConfig.split_len must be a positive multiple of 16 "
                             "(and of block_n)")
        if self.waves <= 0 or (self.num_stages is not None and self.num_stages <= 0):
            raise ValueError("TreeAttentionConfig.waves and num_stages must be positive")


def halves_for(want: bool | None, block_m: int, whole_tile_loop: bool = False) -> bool:
    """Whether a launch with `block_m`-row tiles runs its prefix programs as two halves.

    The halves loop has neither warp specialisation nor page ids loaded ahead: None turns it
    on for tall row tiles unless one of those was asked for (`whole_tile_loop`); True runs it
    regardless.
    """
    if want is None:
        return block_m >= HALVES_MIN_ROWS and not whole_tile_loop
    if want and block_m < 32:
        raise ValueError(f"halves need row tiles of at least 32 rows, not {block_m}")
    return want


def config_halves(cfg, block_m: int) -> bool:
    """`halves_for` of a launch config (`TreeAttentionConfig` or the graph kernel's
    `GraphAttentionConfig`): its `halves`, and whether it asks for the whole-tile loop (warp
    specialisation, or page ids prefetched)."""
    return halves_for(cfg.halves, block_m, cfg.warp_specialize or cfg.prefetch_pages is True)


def tiles(block_m: int, block_n: int | None, num_stages: int | None,
          prefetch_pages: bool | None) -> tuple[int, int, bool]:
    """(block_n, num_stages, prefetch_pages), each None chosen by the row tile. Row tiles of at
    most 64 rows (n x group <= 64: decode and trees of up to 16 tokens with GQA 4) take 32-key
    tiles three stages deep, page ids loaded a tile ahead: the deeper pipeline only pays once
    the copies no longer wait on a page-table read, and then it is 1-3% faster at every n <= 16
    at 32K and 128K on an H100 (docs/BENCHMARKS.md, round 9). 128-row tiles keep 64 keys and 2
    stages: their accumulator leaves no registers for more (with prefetch they were slower)."""
    short = block_m <= 64
    return (block_n or (32 if short else 64), num_stages or (3 if short else 2),
            short if prefetch_pages is None else prefetch_pages)


@triton.jit
def _online_update(s, v, m_i, l_i, acc, qk_scale, IS_FP32: tl.constexpr):
    """One online-softmax step over a [BLOCK_M, BLOCK_N] tile of raw scores q.k (-inf where
    masked); m_i is in scaled log2 units. The scale goes into the exponent's FMA
    (exp2(s * scale - m)) rather than a pass of its own over the tile."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IS_FP32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _qk(q, k, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _program_ids(ROWS_FIRST: tl.constexpr):
    """(KV head, split, row tile) of this program under either grid order."""
    if ROWS_FIRST:
        return tl.program_id(1), tl.program_id(2), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1), tl.program_id(2)


def grid_of(row_tiles: int, hkv: int, splits: int, rows_first: bool) -> tuple[int, int, int]:
    """The partial kernel's launch grid for `_program_ids(rows_first)`."""
    return (row_tiles, hkv, splits) if rows_first else (hkv, splits, row_tiles)


@triton.jit
def _load_rows(q_ptr, kvh, row_tile, n_q, stride_qn, stride_qh, GROUP: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query rows (query x head of its KV head): (rows, query index, row valid,
    queries [BLOCK_M, HEAD_DIM])."""
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = qi < n_q
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + qi[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    return rows, qi, row_ok, q


@triton.jit
def _prefix_tile(q, m_i, l_i, acc, kc_base, vc_base, bt_ptr, n0, end, qk_scale, stride_kcs,
                 stride_vcs, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                 MASKED: tl.constexpr, IS_FP32: tl.constexpr):
    """One key tile at prefix positions [n0, n0 + BLOCK_N); MASKED: some may be >= end."""
    d = tl.arange(0, HEAD_DIM)
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        ok = pos < end
        blk = tl.load(bt_ptr + pos // PAGE, mask=ok, other=0).to(tl.int64)
        slot = blk * PAGE + pos % PAGE
        k = tl.load(kc_base + slot[:, None] * stride_kcs + d[None, :], mask=ok[:, None],
                    other=0.0)
        v = tl.load(vc_base + slot[:, None] * stride_vcs + d[None, :], mask=ok[:, None],
                    other=0.0)
        s = tl.where(ok[None, :], _qk(q, k, IS_FP32), float("-inf"))
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, qk_scale, IS_FP32)
    else:
        m_i, l_i, acc = _whole_tile(q, m_i, l_i, acc, kc_base, vc_base,
                                    tl.load(bt_ptr + pos // PAGE), n0, qk_scale, stride_kcs,
                                    stride_vcs, HEAD_DIM, BLOCK_N, PAGE, IS_FP32)
    return m_i, l_i, acc


@triton.jit
def _gather_tile(kc_base, vc_base, blk, n0, stride_kcs, stride_vcs, HEAD_DIM: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """(K, V) of prefix positions [n0, n0 + BLOCK_N), all < end, by per-row addresses given
    each position's page id `blk` [BLOCK_N]."""
    d = tl.arange(0, HEAD_DIM)
    slot = blk.to(tl.int64) * PAGE + (n0 + tl.arange(0, BLOCK_N)) % PAGE
    return (tl.load(kc_base + slot[:, None] * stride_kcs + d[None, :]),
            tl.load(vc_base + slot[:, None] * stride_vcs + d[None, :]))


@triton.jit
def _tma_tile(k_desc, v_desc, head_row, bt_ptr, n0, PAGE: tl.constexpr):
    """(K, V) of prefix positions [n0, n0 + BLOCK_N), a whole tile inside one page, by one
    TMA copy each (rows of the layer's [Hkv * head_rows, HEAD_DIM] matrix)."""
    row = head_row + tl.load(bt_ptr + n0 // PAGE).to(tl.int32) * PAGE + n0 % PAGE
    return k_desc.load([row, 0]), v_desc.load([row, 0])


@triton.jit
def _whole_tile(q, m_i, l_i, acc, kc_base, vc_base, blk, n0, qk_scale, stride_kcs, stride_vcs,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                IS_FP32: tl.constexpr):
    """The key tile at prefix positions [n0, n0 + BLOCK_N), all < end, given each position's
    page id `blk` [BLOCK_N]."""
    k, v = _gather_tile(kc_base, vc_base, blk, n0, stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N,
                        PAGE)
    return _online_update(_qk(q, k, IS_FP32), v, m_i, l_i, acc, qk_scale, IS_FP32)


@triton.jit
def _attend_prefix(q, m_i, l_i, acc, kvh, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr,
                   start, end, qk_scale, stride_kch, stride_kcs, stride_vch, stride_vcs,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                   IS_FP32: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr,
                   TMA: tl.constexpr):
    """Online softmax over prefix positions [start, end) of this KV head, read through the
    block table (every query sees the whole prefix). Whole tiles load and score without
    bounds masks; only a partial last tile is masked. WS: Triton warp-specialises the loop
    (producer warps load K/V while consumer warps compute). PREFETCH: each iteration loads the
    next tile's page ids, so its K/V copies need not wait for a table read. TMA: whole tiles
    (each inside one page) come through the descriptors k_desc / v_desc over the layer's
    [Hkv * head_rows, HEAD_DIM] rows."""
    kc_base = kc_ptr + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + kvh.to(tl.int64) * stride_vch
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    if TMA:
        head_row = kvh * head_rows
        for n0 in tl.range(start, full_end, BLOCK_N, warp_specialize=WS):
            k, v = _tma_tile(k_desc, v_desc, head_row, bt_ptr, n0, PAGE)
            m_i, l_i, acc = _online_update(_qk(q, k, IS_FP32), v, m_i, l_i, acc, qk_scale,
                                           IS_FP32)
    elif PREFETCH:
        offs = tl.arange(0, BLOCK_N)
        blk = tl.load(bt_ptr + (start + offs) // PAGE, mask=start + offs < end, other=0)
        for n0 in tl.range(start, full_end, BLOCK_N, warp_specialize=WS):
            nxt = n0 + BLOCK_N + offs
            blk_next = tl.load(bt_ptr + nxt // PAGE, mask=nxt < end, other=0)
            m_i, l_i, acc = _whole_tile(q, m_i, l_i, acc, kc_base, vc_base, blk, n0, qk_scale,
                                        stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N, PAGE,
                                        IS_FP32)
            blk = blk_next
    else:
        for n0 in tl.range(start, full_end, BLOCK_N, warp_specialize=WS):
            m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, kc_base, vc_base, bt_ptr, n0, end,
                                         qk_scale, stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N,
                                         PAGE, False, IS_FP32)
    if full_end < end:
        m_i, l_i, acc = _prefix_tile(q, m_i, l_i, acc, kc_base, vc_base, bt_ptr, full_end,
                                     end, qk_scale, stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N,
                                     PAGE, True, IS_FP32)
    return m_i, l_i, acc


@triton.jit
def _attend_prefix_halves(q_a, q_b, m_a, l_a, acc_a, m_b, l_b, acc_b, kvh, kc_ptr, vc_ptr,
                          k_desc, v_desc, head_rows, bt_ptr, start, end, qk_scale, stride_kch,
                          stride_kcs, stride_vch, stride_vcs, HEAD_DIM: tl.constexpr,
                          BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IS_FP32: tl.constexpr,
                          TMA: tl.constexpr):
    """`_attend_prefix` for a row tile held as two halves (a, b) that share each K/V tile.

    Both halves' score products are issued before either softmax, so the tensor cores work
    on b's scores while a's softmax runs, and on a's P @ V while b's runs (FlashAttention-3's
    overlap of softmax and wgmma within one warpgroup, here left to the compiler's schedule
    of two independent chains). Registers stay those of one full-height tile.
    """
    kc_base = kc_ptr + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + kvh.to(tl.int64) * stride_vch
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    head_row = kvh * head_rows
    for n0 in tl.range(start, full_end, BLOCK_N):
        if TMA:
            k, v = _tma_tile(k_desc, v_desc, head_row, bt_ptr, n0, PAGE)
        else:
            k, v = _gather_tile(kc_base, vc_base, tl.load(bt_ptr + (n0 + tl.arange(0, BLOCK_N))
                                                          // PAGE), n0, stride_kcs, stride_vcs,
                                HEAD_DIM, BLOCK_N, PAGE)
        s_a = _qk(q_a, k, IS_FP32)
        s_b = _qk(q_b, k, IS_FP32)
        m_a, l_a, acc_a = _online_update(s_a, v, m_a, l_a, acc_a, qk_scale, IS_FP32)
        m_b, l_b, acc_b = _online_update(s_b, v, m_b, l_b, acc_b, qk_scale, IS_FP32)
    if full_end < end:
        m_a, l_a, acc_a = _prefix_tile(q_a, m_a, l_a, acc_a, kc_base, vc_base, bt_ptr, full_end,
                                       end, qk_scale, stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N,
                                       PAGE, True, IS_FP32)
        m_b, l_b, acc_b = _prefix_tile(q_b, m_b, l_b, acc_b, kc_base, vc_base, bt_ptr, full_end,
                                       end, qk_scale, stride_kcs, stride_vcs, HEAD_DIM, BLOCK_N,
                                       PAGE, True, IS_FP32)
    return m_a, l_a, acc_a, m_b, l_b, acc_b


@triton.jit
def _init_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """An empty online-softmax state (m, l, acc) for BLOCK_M rows."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, HEAD_DIM], tl.float32))


@triton.jit
def _prefix_program(q_ptr, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr, po_ptr, pl_ptr,
                    kvh, split, row_tile, n_q, start, end, qk_scale, stride_qn, stride_qh,
                    stride_kch, stride_kcs, stride_vch, stride_vcs, stride_po_s, stride_po_h,
                    stride_pl_s, stride_pl_h, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                    IS_FP32: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr,
                    TMA: tl.constexpr, HALVES: tl.constexpr):
    """A prefix split's program: its rows over prefix positions [start, end), then its
    partial. HALVES: the row tile as two halves (`_attend_prefix_halves`)."""
    if HALVES:
        HALF: tl.constexpr = BLOCK_M // 2
        rows_a, qi_a, ok_a, q_a = _load_rows(q_ptr, kvh, 2 * row_tile, n_q, stride_qn,
                                             stride_qh, GROUP, HEAD_DIM, HALF)
        rows_b, qi_b, ok_b, q_b = _load_rows(q_ptr, kvh, 2 * row_tile + 1, n_q, stride_qn,
                                             stride_qh, GROUP, HEAD_DIM, HALF)
        m_a, l_a, acc_a = _init_state(HALF, HEAD_DIM)
        m_b, l_b, acc_b = _init_state(HALF, HEAD_DIM)
        m_a, l_a, acc_a, m_b, l_b, acc_b = _attend_prefix_halves(
            q_a, q_b, m_a, l_a, acc_a, m_b, l_b, acc_b, kvh, kc_ptr, vc_ptr, k_desc, v_desc,
            head_rows, bt_ptr, start, end, qk_scale, stride_kch, stride_kcs, stride_vch,
            stride_vcs, HEAD_DIM, BLOCK_N, PAGE, IS_FP32, TMA)
        _store_partial(po_ptr, pl_ptr, kvh, split, rows_a, ok_a, m_a, l_a, acc_a, stride_po_s,
                       stride_po_h, stride_pl_s, stride_pl_h, HEAD_DIM)
        _store_partial(po_ptr, pl_ptr, kvh, split, rows_b, ok_b, m_b, l_b, acc_b, stride_po_s,
                       stride_po_h, stride_pl_s, stride_pl_h, HEAD_DIM)
    else:
        rows, qi, row_ok, q = _load_rows(q_ptr, kvh, row_tile, n_q, stride_qn, stride_qh,
                                         GROUP, HEAD_DIM, BLOCK_M)
        m_i, l_i, acc = _init_state(BLOCK_M, HEAD_DIM)
        m_i, l_i, acc = _attend_prefix(q, m_i, l_i, acc, kvh, kc_ptr, vc_ptr, k_desc, v_desc,
                                       head_rows, bt_ptr, start, end, qk_scale, stride_kch,
                                       stride_kcs, stride_vch, stride_vcs, HEAD_DIM, BLOCK_N,
                                       PAGE, IS_FP32, WS, PREFETCH, TMA)
        _store_partial(po_ptr, pl_ptr, kvh, split, rows, row_ok, m_i, l_i, acc, stride_po_s,
                       stride_po_h, stride_pl_s, stride_pl_h, HEAD_DIM)


@triton.jit
def _attend_new(q, m_i, l_i, acc, kvh, qi, row_ok, kn_ptr, vn_ptr, mask_ptr, n_new, hi,
                q_offset, qk_scale, stride_knn, stride_knh, stride_vnn, stride_vnh, stride_mask,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                IS_FP32: tl.constexpr):
    """Online softmax over the first `hi` of the n_new new keys: causal (query i sees keys up
    to q_offset + i) or under the [n_q, n_new] mask."""
    d = tl.arange(0, HEAD_DIM)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < n_new
        k = tl.load(kn_ptr + cols[:, None] * stride_knn + kvh * stride_knh + d[None, :],
                    mask=ok[:, None], other=0.0)
        v = tl.load(vn_ptr + cols[:, None] * stride_vnn + kvh * stride_vnh + d[None, :],
                    mask=ok[:, None], other=0.0)
        s = _qk(q, k, IS_FP32)
        if CAUSAL:
            allowed = cols[None, :] <= (qi + q_offset)[:, None]
        else:
            allowed = tl.load(mask_ptr + qi[:, None] * stride_mask + cols[None, :],
                              mask=row_ok[:, None] & ok[None, :], other=0) != 0
        s = tl.where(allowed & ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, qk_scale, IS_FP32)
    return m_i, l_i, acc


@triton.jit
def _new_program(q_ptr, kn_ptr, vn_ptr, mask_ptr, po_ptr, pl_ptr, kvh, split, row_tile, n_q,
                 n_new, q_offset, qk_scale, stride_qn, stride_qh, stride_knn, stride_knh,
                 stride_vnn, stride_vnh, stride_mask, stride_po_s, stride_po_h, stride_pl_s,
                 stride_pl_h, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 IS_FP32: tl.constexpr):
    """The last split's program: its rows over the new keys (`_attend_new`), then its
    partial."""
    rows, qi, row_ok, q = _load_rows(q_ptr, kvh, row_tile, n_q, stride_qn, stride_qh, GROUP,
                                     HEAD_DIM, BLOCK_M)
    m_i, l_i, acc = _init_state(BLOCK_M, HEAD_DIM)
    hi = n_new
    if CAUSAL:
        last_q = (row_tile * BLOCK_M + BLOCK_M - 1) // GROUP
        hi = tl.minimum(n_new, q_offset + last_q + 1)
    m_i, l_i, acc = _attend_new(q, m_i, l_i, acc, kvh, qi, row_ok, kn_ptr, vn_ptr, mask_ptr,
                                n_new, hi, q_offset, qk_scale, stride_knn, stride_knh,
                                stride_vnn, stride_vnh, stride_mask, HEAD_DIM, BLOCK_N, CAUSAL,
                                IS_FP32)
    _store_partial(po_ptr, pl_ptr, kvh, split, rows, row_ok, m_i, l_i, acc, stride_po_s,
                   stride_po_h, stride_pl_s, stride_pl_h, HEAD_DIM)


@triton.jit
def _store_partial(po_ptr, pl_ptr, kvh, split, rows, row_ok, m_i, l_i, acc, stride_po_s,
                   stride_po_h, stride_pl_s, stride_pl_h, HEAD_DIM: tl.constexpr):
    """This split's normalised partial output and its log2-sum-exp (-inf where it saw no key)."""
    d = tl.arange(0, HEAD_DIM)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    po = po_ptr + split * stride_po_s + kvh * stride_po_h
    tl.store(po + rows[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None])
    tl.store(pl_ptr + split * stride_pl_s + kvh * stride_pl_h + rows, lse2, mask=row_ok)


@triton.jit
def _tree_partial_kernel(
    q_ptr, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr, kn_ptr, vn_ptr, mask_ptr, po_ptr,
    pl_ptr,
    prefix_len, n_q, n_new, q_offset, split_len, num_prefix_splits, qk_scale,
    stride_qn, stride_qh, stride_kch, stride_kcs, stride_vch, stride_vcs,
    stride_knn, stride_knh, stride_vnn, stride_vnh, stride_mask,
    stride_po_s, stride_po_h, stride_pl_s, stride_pl_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, CAUSAL: tl.constexpr, IS_FP32: tl.constexpr, ROWS_FIRST: tl.constexpr,
    PDL: tl.constexpr, WS: tl.constexpr, PREFETCH: tl.constexpr, TMA: tl.constexpr,
    HALVES: tl.constexpr,
):
    if PDL:  # the reduce may launch now; its gdc_wait still waits for this whole grid
        gdc_launch_dependents()
    kvh, split, row_tile = _program_ids(ROWS_FIRST)
    if split < num_prefix_splits:
        start = split * split_len
        _prefix_program(q_ptr, kc_ptr, vc_ptr, k_desc, v_desc, head_rows, bt_ptr, po_ptr,
                        pl_ptr, kvh, split, row_tile, n_q, start,
                        tl.minimum(start + split_len, prefix_len), qk_scale, stride_qn,
                        stride_qh, stride_kch, stride_kcs, stride_vch, stride_vcs, stride_po_s,
                        stride_po_h, stride_pl_s, stride_pl_h, GROUP, HEAD_DIM, BLOCK_M,
                        BLOCK_N, PAGE, IS_FP32, WS, PREFETCH, TMA, HALVES)
    else:
        _new_program(q_ptr, kn_ptr, vn_ptr, mask_ptr, po_ptr, pl_ptr, kvh, split, row_tile, n_q,
                     n_new, q_offset, qk_scale, stride_qn, stride_qh, stride_knn, stride_knh,
                     stride_vnn, stride_vnh, stride_mask, stride_po_s, stride_po_h,
                     stride_pl_s, stride_pl_h, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL,
                     IS_FP32)


@triton.jit
def _tree_reduce_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr, num_splits,
    stride_po_s, stride_po_h, stride_pl_s, stride_pl_h, stride_on, stride_oh, stride_ln,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """One program per (row, KV head): merge the splits' (out, lse2), BLOCK_S splits at a time.

    A program per row (not per row tile) keeps this latency-bound loop short and the grid wide.
    PDL: launched before the partial kernel ends; waits here until its writes are visible.
    """
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    qi = row // GROUP
    head = kvh * GROUP + row % GROUP
    d = tl.arange(0, HEAD_DIM)
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = sp < num_splits
        lse_s = tl.load(pl_ptr + sp * stride_pl_s + kvh * stride_pl_h + row, mask=ok,
                        other=float("-inf"))
        o_s = tl.load(po_ptr + sp[:, None] * stride_po_s + kvh * stride_po_h + row * HEAD_DIM
                      + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse_s - m_safe)  # [BLOCK_S]
        acc = acc * alpha + tl.sum(o_s * w[:, None], axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe
    lse = tl.where(l > 0, (m + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(out_ptr + qi * stride_on + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + qi * stride_ln + head + tl.arange(0, 1), lse)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _num_sms(device: torch.device) -> int:
    """Multiprocessors to fill (cached: the property query costs microseconds per call)."""
    if device.type == "cuda":
        return _sm_count(_cuda_index(device))
    return 1  # the interpreter runs programs one by one: fewer is faster


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _hopper_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(_cuda_index(device)) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper-or-newer GPU and a Triton with griddepcontrol
    (never under the CPU interpreter)."""
    return gdc_wait is not None and _hopper_or_newer(device)


def tma_usable(want: bool | None, k_cache_layer: torch.Tensor, v_cache_layer: torch.Tensor,
                block_size: int, block_n: int, block_m: int) -> bool:
    """Whether the prefix tiles go through TMA descriptors. A tile must lie inside one page
    (block_size a multiple of block_n), and each layer must read as one [Hkv * num_slots,
    head_dim] matrix with 16-byte-aligned rows. `want` True: they must (also under the CPU
    interpreter, for tests), else ValueError with the reason. None: where they can on a
    Hopper-or-newer GPU, for row tiles of TMA_MIN_ROWS rows or more. On an H100 with 64-token
    pages, TMA made the 128-row tile 6% faster (n = 64: 349 -> 329 µs at 128K, 108 -> 102 at
    32K) and the short tiles 9-13% slower (32K n = 1: 54 -> 61 µs), so short tiles keep the
    gather (docs/BENCHMARKS.md, round 10)."""
    device = k_cache_layer.device
    if want is False or (want is None and (block_m < TMA_MIN_ROWS or device.type != "cuda")):
        return False  # on the interpreter only when asked (tests)
    reasons = []
    if TensorDescriptor is None:
        reasons.append("this Triton has no tensor descriptors")
    if block_size % block_n:
        reasons.append(f"block_size {block_size} is not a multiple of block_n {block_n}")
    for t in (k_cache_layer, v_cache_layer):
        if (t.stride(0) != t.shape[1] * t.stride(1)
                or (t.stride(1) * t.element_size()) % 16 or t.data_ptr() % 16):
            reasons.append("the K/V layers are not [Hkv * num_slots, head_dim] matrices with "
                           "16-byte-aligned rows")
            break
    if device.type == "cuda" and not _hopper_or_newer(device):
        reasons.append("TMA needs a Hopper-or-newer GPU")
    if not reasons:
        return True
    if want is None:
        return False
    raise ValueError("TreeAttentionConfig.tma: " + "; ".join(reasons))


def tma_descriptors(k_cache_layer: torch.Tensor, v_cache_layer: torch.Tensor, block_n: int
                    ) -> tuple[object, object]:
    """Descriptors of [block_n, head_dim] tiles over each layer's [Hkv * num_slots, head_dim]
    rows (only valid where `tma_usable`)."""
    hkv, slots, d = k_cache_layer.shape
    return tuple(TensorDescriptor(t, [hkv * slots, d], [t.stride(1), 1], [block_n, d])
                 for t in (k_cache_layer, v_cache_layer))


def launch_reduce(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, group: int, pdl: bool) -> None:
    """Merge the partial kernel's splits into out [n, Hq, D] and lse [n, Hq] (natural log).
    pdl: launch it as a programmatic dependent of the partial kernel (which must have been
    launched with PDL=True, so that it signals its dependents)."""
    splits, hkv, rows, _ = part_out.shape
    extra = {"launch_pdl": True} if pdl else {}
    _tree_reduce_kernel[(rows, hkv)](
        part_out, part_lse, out, lse, splits,
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, HEAD_DIM=part_out.shape[3],
        BLOCK_S=min(REDUCE_SPLITS, triton.next_power_of_2(splits)), PDL=pdl, num_warps=4,
        **extra,
    )


@dataclass(frozen=True)
class _Plan:
    block_m: int
    row_tiles: int
    block_n: int
    num_stages: int
    prefetch: bool
    split_len: int
    num_splits: int  # prefix splits (the tree's program comes after them)
    num_warps: int


def _plan(cfg: TreeAttentionConfig, n_q: int, group: int, hkv: int, prefix_len: int,
          device: torch.device) -> _Plan:
    """The launch for these shapes."""
    rows = n_q * group
    block_m = cfg.block_m or min(128, max(16, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    block_n, stages, prefetch = tiles(block_m, cfg.block_n, cfg.num_stages, cfg.prefetch_pages)
    split_len = cfg.split_len
    if split_len is None:
        want = max(1, cfg.waves * _num_sms(device) // (hkv * row_tiles))
        split_len = max(4 * block_n, triton.cdiv(prefix_len, want))
        split_len = triton.cdiv(split_len, block_n) * block_n
    elif split_len % block_n:
        raise ValueError(f"TreeAttentionConfig.split_len {split_len} is not a multiple of "
                         f"block_n {block_n}")
    num_splits = triton.cdiv(prefix_len, split_len) if prefix_len > 0 else 0
    num_warps = cfg.num_warps or 4  # 4 beat 8 at block_m 128 on an H100 (bench --sweep)
    return _Plan(block_m, row_tiles, block_n, stages, prefetch, split_len, num_splits, num_warps)


def _check(q: torch.Tensor, k_cache_layer: torch.Tensor, v_cache_layer: torch.Tensor,
           block_table: torch.Tensor, prefix_len: int, k_new: torch.Tensor,
           v_new: torch.Tensor, block_size: int) -> None:
    n, hq, d = q.shape
    hkv = k_cache_layer.shape[0]
    if d not in (16, 32, 64, 128, 256):
        raise InvalidRequest(f"head_dim must be a power of two in [16, 256], got {d}")
    if hq % hkv:
        raise InvalidRequest(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache_layer.shape[2] != d or v_cache_layer.shape != k_cache_layer.shape:
        raise InvalidRequest("K/V cache layers must both be [Hkv, num_slots, head_dim]")
    if k_new.shape[1:] != (hkv, d) or v_new.shape != k_new.shape:
        raise InvalidRequest(f"new K/V must be [*, {hkv}, {d}]")
    if prefix_len < 0 or block_table.numel() * block_size < prefix_len:
        raise InvalidRequest(f"block table of {block_table.numel()} blocks cannot hold "
                             f"{prefix_len} tokens")
    for t in (q, k_cache_layer, v_cache_layer, k_new, v_new):
        if t.stride(-1) != 1:
            raise InvalidRequest("attention inputs need a contiguous last (head_dim) dimension")


def launch_hybrid(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [num_blocks] int32/int64
    prefix_len: int,
    k_new: torch.Tensor,          # [n_new, Hkv, D]
    v_new: torch.Tensor,          # [n_new, Hkv, D]
    mask: torch.Tensor | None,    # [n, n_new] bool, or None for causal
    scale: float,
    block_size: int,
    q_offset: int = 0,
    config: TreeAttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both kernels. mask None means causal: query i sees new key j iff j <= q_offset + i."""
    cfg = config or TreeAttentionConfig()
    _check(q, k_cache_layer, v_cache_layer, block_table, prefix_len, k_new, v_new, block_size)
    n, hq, d = q.shape
    hkv = k_cache_layer.shape[0]
    group = hq // hkv
    plan = _plan(cfg, n, group, hkv, prefix_len, q.device)
    num_prefix = plan.num_splits
    rows = n * group
    part_out = torch.empty(num_prefix + 1, hkv, rows, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_prefix + 1, hkv, rows, dtype=torch.float32, device=q.device)
    if mask is not None:
        if mask.shape != (n, k_new.shape[0]) or mask.dtype != torch.bool:
            raise InvalidRequest(f"mask must be bool [{n}, {k_new.shape[0]}]")
        mask_u8 = mask.contiguous().view(torch.uint8)
    else:
        mask_u8 = part_lse  # never read when CAUSAL
    is_fp32 = q.dtype == torch.float32
    pdl = cfg.pdl and pdl_supported(q.device)
    tma = tma_usable(cfg.tma, k_cache_layer, v_cache_layer, block_size, plan.block_n,
                     plan.block_m)
    k_desc, v_desc = (tma_descriptors(k_cache_layer, v_cache_layer, plan.block_n) if tma
                      else (k_cache_layer, v_cache_layer))
    _tree_partial_kernel[grid_of(plan.row_tiles, hkv, num_prefix + 1, cfg.rows_first)](
        q, k_cache_layer, v_cache_layer, k_desc, v_desc, k_cache_layer.shape[1], block_table,
        k_new, v_new, mask_u8, part_out, part_lse,
        prefix_len, n, k_new.shape[0], q_offset, plan.split_len, num_prefix, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache_layer.stride(0), k_cache_layer.stride(1),
        v_cache_layer.stride(0), v_cache_layer.stride(1), k_new.stride(0), k_new.stride(1),
        v_new.stride(0), v_new.stride(1), mask_u8.stride(0),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, PAGE=block_size,
        CAUSAL=mask is None, IS_FP32=is_fp32, ROWS_FIRST=cfg.rows_first, PDL=pdl,
        WS=cfg.warp_specialize, PREFETCH=plan.prefetch, TMA=tma,
        HALVES=config_halves(cfg, plan.block_m),
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    launch_reduce(part_out, part_lse, out, lse, group, pdl)
    return out, lse


def paged_hybrid_attention(
    q: torch.Tensor,              # [n, Hq, D]
    k_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    v_cache_layer: torch.Tensor,  # [Hkv, num_slots, D]
    block_table: torch.Tensor,    # [num_blocks] int32/int64
    prefix_len: int,
    k_new: torch.Tensor,          # [n, Hkv, D]
    v_new: torch.Tensor,          # [n, Hkv, D]
    mask: torch.Tensor,           # [n, n] bool, True = may attend
    scale: float,
    block_size: int,
    config: TreeAttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.paged_hybrid_attention`: (out [n, Hq, D], lse [n, Hq] f32)."""
    if k_new.shape[0] != q.shape[0]:
        raise InvalidRequest(f"{q.shape[0]} queries but {k_new.shape[0]} new keys")
    return launch_hybrid(q, k_cache_layer, v_cache_layer, block_table, prefix_len, k_new, v_new,
                         mask, scale, block_size, config=config)
