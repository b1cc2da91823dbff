"""Benchmark: paged hybrid tree attention vs SDPA and the HBM floor, one Llama-3.1-8B layer.

    python bench/kernels_attention.py [--contexts 8192,32768,131072] [--ns 1,4,16,64,128]
        [--sweep] [--sweep-grid "block_m=None,256 block_n=64,128 pdl=0,1 warp_specialize=0,1 ..."]
        [--block-size 16] [--no-sdpa]

Shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, block_size (tokens per page) 16 unless
--block-size says otherwise (a page of 64 or more holds a whole key tile, so the tiles can come
through TMA descriptors: `tma=0,1` in the sweep grid). For each context L and
tree size n it times (median of CUDA-graph replays with L2 flushed
between them; --no-graphs: eager triton.testing.do_bench):
  * triton   - lsrt's paged hybrid tree attention (prefix + tree mask + LSE merge);
  * triton, heads first - the same kernel in the older grid order (KV head, split, row tile),
               in which the row tiles that read the same K/V run far apart (see triton_tree);
  * flash    - SDPA flash with n queries over L + n keys and no mask (not a correct tree
               verification: the lower bound of what a mask-free library kernel costs);
  * dense    - SDPA with a dense [n, L + n] boolean mask (what naive verification does);
  * floor    - one layer's KV bytes / device-to-device copy bandwidth measured in this run.

How L2 is flushed matters at these sizes. The flush used to *write* 256 MB (`zero_()`), which
leaves the 50 MB L2 full of dirty lines: the timed kernel then pays their write-back to HBM
(up to 50 MB, ~17 µs at 3 TB/s) before its own reads land. A kernel in a model step follows
kernels that mostly *read* (weights, KV), so its L2 holds clean lines. The default flush now
reads 256 MB (`amax`), which evicts everything and leaves L2 clean; `--flush write` gives the
old method, `both` prints a column of each.
Memory at 128K: K and V of one layer are 2 x 128K x 8 x 128 x 2 B = 512 MB (+ a 1 GB copy buffer).
On a machine without CUDA it prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def copy_bandwidth(do_bench) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3)


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """SDPA flash over n queries without a mask; GQA through enable_gqa (no K/V copies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """SDPA with an explicit boolean mask (the library picks the backend)."""
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def make_flush(kind: str) -> Callable[[], object]:
    """An L2 flush: read 256 MB (leaves L2 clean) or write it (leaves L2 dirty)."""
    buf = torch.ones(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB
    if kind == "read":
        return lambda: torch.amax(buf)
    if kind == "write":
        return buf.zero_
    raise ValueError(f"unknown flush {kind!r}")


def graph_time_us(fn, flush: Callable[[], object], reps: int = 40) -> float:
    """Median µs of one CUDA-graph replay of fn, L2 flushed before each replay.

    A graph removes Python and launch overhead (Triton's launcher costs ~10-20 µs a call), which
    the runtime also avoids by capturing its decode/verify step; the flush keeps an 8K context
    (32 MB of KV) from being served out of the 50 MB L2.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    del graph
    return times[len(times) // 2] * 1e3


def make_timer(graphs: bool, flush: str = "read"
               ) -> Callable[[Callable[[], object]], float | None]:
    """fn -> median µs (None when a backend refuses the shapes)."""
    from triton.testing import do_bench

    flush_fn = make_flush(flush) if graphs else None

    def timer(fn: Callable[[], object]) -> float | None:
        try:
            fn()
            torch.cuda.synchronize()
            if graphs:
                return graph_time_us(fn, flush_fn)
            return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
        except Exception as err:  # noqa: BLE001 - a backend or config refusing the shapes
            print(f"  ({type(err).__name__}: {str(err).splitlines()[0][:100]})", file=sys.stderr)
            return None
    return timer


DEFAULT_GRID = "block_n=32,64,128 waves=1,2,4 num_stages=2,3 num_warps=4,8"


def sweep_configs(grid: str):
    """TreeAttentionConfigs over a grid like "block_m=None,256 block_n=64,128" (the product)."""
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig

    flags = ("pdl", "warp_specialize", "rows_first", "prefetch_pages", "tma", "halves")
    axes = {}
    for item in grid.split():
        name, values = item.split("=")
        cast = (lambda v: bool(int(v))) if name in flags else int  # noqa: E731
        axes[name] = [None if v == "None" else cast(v) for v in values.split(",")]
    for combo in itertools.product(*axes.values()):
        yield TreeAttentionConfig(**dict(zip(axes, combo)))


def describe(cfg) -> str:
    flags = "".join(f" {name}" for name, value in
                    (("pdl", cfg.pdl), ("ws", cfg.warp_specialize), ("pf", cfg.prefetch_pages),
                     ("tma", cfg.tma), ("no-tma", cfg.tma is False), ("halves", cfg.halves),
                      ("no-halves", cfg.halves is False))
                    if value)
    return (f"bm{cfg.block_m} bn{cfg.block_n} wv{cfg.waves} st{cfg.num_stages} "
            f"nw{cfg.num_warps}{flags}")


def bench_context(length: int, ns: list[int], bw: float, grid: str | None, timers: dict,
                  block: int = 16, sdpa: bool = True):
    """Yields the table's rows for one context, one per n as it is timed. `timers` maps a flush
    name to its timer; the first is the main one (the sweep and SDPA use it)."""
    from lsrt.kernels.attention.testing import tree_mask
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    timer = next(iter(timers.values()))
    max_n = max(ns)
    slots = math.ceil((length + max_n) / block) * block
    gen = torch.Generator().manual_seed(length)
    k_layer = torch.randn(HKV, slots, D, device="cuda", dtype=torch.bfloat16)
    v_layer = torch.randn(HKV, slots, D, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(slots // block, device="cuda", dtype=torch.int32)
    floor_us = 2 * HKV * length * D * 2 / bw * 1e6
    fmt = lambda t: "n/a" if t is None else f"{t:.1f}"  # noqa: E731
    heads_first = TreeAttentionConfig(rows_first=False)
    for n in ns:
        q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        # The tree's own K/V sit right after the prefix, as the runner writes them.
        k_new = k_layer[:, length:length + n].transpose(0, 1)
        v_new = v_layer[:, length:length + n].transpose(0, 1)
        mask = tree_mask(n, gen).cuda()
        args = (q, k_layer, v_layer, table, length, k_new, v_new, mask, D ** -0.5, block)
        t_tri = [t(lambda: paged_hybrid_attention(*args)) for t in timers.values()]
        t_old = timer(lambda: paged_hybrid_attention(*args, config=heads_first))
        best = ""
        if grid:
            timed = []
            for c in sweep_configs(grid):
                timed.append((timer(lambda c=c: paged_hybrid_attention(*args, config=c)), c))
                print(f"  sweep n={n} {describe(c)}: {fmt(timed[-1][0])}", file=sys.stderr,
                      flush=True)
            ok = [(t, c) for t, c in timed if t is not None]
            best = " n/a |" if not ok else " {:.1f} ({}) |".format(
                *min(((t, describe(c)) for t, c in ok), key=lambda tc: tc[0]))
        qs = q.transpose(0, 1)[None]  # [1, Hq, n, D]
        ks, vs = k_layer[None, :, :length + n], v_layer[None, :, :length + n]
        t_flash = t_dense = None
        if sdpa:
            t_flash = timer(sdpa_flash(qs, ks, vs))
            full = torch.cat([torch.ones(n, length, dtype=torch.bool, device="cuda"), mask], 1)
            t_dense = timer(sdpa_dense(qs, ks, vs, full))
            del full
        ratio = "n/a" if t_tri[0] is None else f"{t_tri[0] / floor_us:.2f}"
        yield (f"| {length} | {n} | {floor_us:.1f} | " + " | ".join(fmt(t) for t in t_tri)
               + f" | {ratio} | {fmt(t_old)} |{best} {fmt(t_flash)} | {fmt(t_dense)} |")
    del k_layer, v_layer
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--ns", default="1,4,16,64,128")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel configs")
    parser.add_argument("--sweep-grid", default=None,
                        help=f"the grid to sweep (implies --sweep; default {DEFAULT_GRID!r})")
    parser.add_argument("--flush", choices=("read", "write", "both"), default="read",
                        help="how L2 is flushed between replays (see the module docstring)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="time eager calls (do_bench) instead of CUDA-graph replays")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the two SDPA columns")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels_attention.py: no CUDA device here; nothing to time "
              "(the kernels' correctness tests run on the CPU: pytest tests/unit/kernels).")
        return 0
    from triton.testing import do_bench

    grid = args.sweep_grid or (DEFAULT_GRID if args.sweep else None)
    bw = copy_bandwidth(do_bench)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    flushes = ["read", "write"] if args.flush == "both" else [args.flush]
    timers = {f: make_timer(graphs=not args.no_graphs, flush=f) for f in flushes}
    how = "eager do_bench" if args.no_graphs else "CUDA-graph replay, L2 flushed"
    print(f"One layer, 32 q heads / 8 KV heads, d=128, bf16, {args.block_size}-token pages; "
          f"µs, median of {how}"
          f" (flush: {', '.join(flushes)}; the first is used for every other column).\n")
    head = "| context | n | HBM floor | " + " | ".join(f"triton tree, {f} flush" for f in flushes)
    head += " | triton / floor | triton, heads first |"
    head += " best of sweep |" if grid else ""
    print(head + " SDPA flash, no mask | SDPA dense mask |")
    print("|" + " --- |" * (head.count("|") + 1))
    for length in (int(x) for x in args.contexts.split(",")):
        for row in bench_context(length, [int(x) for x in args.ns.split(",")], bw, grid,
                                 timers, args.block_size, not args.no_sdpa):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
