"""Benchmark: paged hybrid tree attention vs SDPA and the HBM floor, one Llama-3.1-8B layer.

    python bench/kernels_attention.py [--contexts 8192,32768,131072] [--ns 1,4,16,64,128] [--sweep]

Shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, block_size 16. For each context L and
tree size n it times (median of CUDA-graph replays with L2 flushed
between them; --no-graphs: eager triton.testing.do_bench):
  * triton   - lsrt's paged hybrid tree attention (prefix + tree mask + LSE merge);
  * flash    - SDPA flash with n queries over L + n keys and no mask (not a correct tree
               verification: the lower bound of what a mask-free library kernel costs);
  * dense    - SDPA with a dense [n, L + n] boolean mask (what naive verification does);
  * floor    - one layer's KV bytes / device-to-device copy bandwidth measured in this run.
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

HQ, HKV, D, BLOCK = 32, 8, 128, 16


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


def graph_time_us(fn, reps: int = 40) -> float:
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
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    del graph, flush
    return times[len(times) // 2] * 1e3


def make_timer(graphs: bool) -> Callable[[Callable[[], object]], float | None]:
    """fn -> median µs (None when a backend refuses the shapes)."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> float | None:
        try:
            fn()
            torch.cuda.synchronize()
            if graphs:
                return graph_time_us(fn)
            return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
        except Exception as err:  # noqa: BLE001 - a backend or config refusing the shapes
            print(f"  ({type(err).__name__}: {str(err).splitlines()[0][:100]})", file=sys.stderr)
            return None
    return timer


def sweep_configs():
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig

    for block_m, block_n, waves, stages, warps in itertools.product(
            [None], [32, 64, 128], [1, 2, 4], [2, 3], [4, 8]):
        yield TreeAttentionConfig(block_m=block_m, block_n=block_n, waves=waves,
                                  num_stages=stages, num_warps=warps)


def bench_context(length: int, ns: list[int], bw: float, sweep: bool, timer) -> list[str]:
    from lsrt.kernels.attention.testing import tree_mask
    from lsrt.kernels.attention.triton_tree import paged_hybrid_attention

    max_n = max(ns)
    slots = math.ceil((length + max_n) / BLOCK) * BLOCK
    gen = torch.Generator().manual_seed(length)
    k_layer = torch.randn(HKV, slots, D, device="cuda", dtype=torch.bfloat16)
    v_layer = torch.randn(HKV, slots, D, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(slots // BLOCK, device="cuda", dtype=torch.int32)
    floor_us = 2 * HKV * length * D * 2 / bw * 1e6
    rows = []
    for n in ns:
        q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
        # The tree's own K/V sit right after the prefix, as the runner writes them.
        k_new = k_layer[:, length:length + n].transpose(0, 1)
        v_new = v_layer[:, length:length + n].transpose(0, 1)
        mask = tree_mask(n, gen).cuda()
        args = (q, k_layer, v_layer, table, length, k_new, v_new, mask, D ** -0.5, BLOCK)
        t_tri = timer(lambda: paged_hybrid_attention(*args))
        best = ""
        if sweep:
            timed = [(timer(lambda c=c: paged_hybrid_attention(*args, config=c)),
                      c) for c in sweep_configs()]
            ok = [(t, c) for t, c in timed if t is not None]
            t_best, c_best = min(ok, key=lambda tc: tc[0]) if ok else (float("nan"), None)
            best = " n/a |" if c_best is None else (f" {t_best:.1f} (bm{c_best.block_m} bn{c_best.block_n} wv{c_best.waves} "
                    f"st{c_best.num_stages} nw{c_best.num_warps}) |")
        qs = q.transpose(0, 1)[None]  # [1, Hq, n, D]
        ks, vs = k_layer[None, :, :length + n], v_layer[None, :, :length + n]
        t_flash = timer(sdpa_flash(qs, ks, vs))
        full = torch.cat([torch.ones(n, length, dtype=torch.bool, device="cuda"), mask], 1)
        t_dense = timer(sdpa_dense(qs, ks, vs, full))
        fmt = lambda t: "n/a" if t is None else f"{t:.1f}"  # noqa: E731
        ratio = "n/a" if t_tri is None else f"{t_tri / floor_us:.2f}"
        rows.append(f"| {length} | {n} | {floor_us:.1f} | {fmt(t_tri)} | {ratio} |{best} "
                    f"{fmt(t_flash)} | {fmt(t_dense)} |")
        del full
    del k_layer, v_layer
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--ns", default="1,4,16,64,128")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of kernel configs")
    parser.add_argument("--no-graphs", action="store_true",
                        help="time eager calls (do_bench) instead of CUDA-graph replays")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels_attention.py: no CUDA device here; nothing to time "
              "(the kernels' correctness tests run on the CPU: pytest tests/unit/kernels).")
        return 0
    from triton.testing import do_bench

    bw = copy_bandwidth(do_bench)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    timer = make_timer(graphs=not args.no_graphs)
    how = "eager do_bench" if args.no_graphs else "CUDA-graph replay, L2 flushed"
    print(f"One layer, 32 q heads / 8 KV heads, d=128, bf16; µs, median of {how}.\n")
    head = "| context | n | HBM floor | triton tree | triton / floor |"
    head += " best of sweep |" if args.sweep else ""
    print(head + " SDPA flash, no mask | SDPA dense mask |")
    print("|" + " --- |" * (head.count("|") + 1))
    for length in (int(x) for x in args.contexts.split(",")):
        for row in bench_context(length, [int(x) for x in args.ns.split(",")], bw, args.sweep,
                                 timer):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
