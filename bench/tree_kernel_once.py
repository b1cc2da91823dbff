"""Launch the tree-attention kernel twice per config (compile, then the launch to profile) at
one shape, for a kernel profiler such as Nsight Compute:

    ncu --kernel-name regex:_tree_partial --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python bench/tree_kernel_once.py --context 131072 --n 64 --num-warps 4

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d=128), bf16, 16-token pages; needs CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--n", type=int, default=64, help="tree tokens (queries)")
    parser.add_argument("--num-warps", type=int, nargs="+", default=[None])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    from lsrt.kernels.attention.testing import tree_mask
    from lsrt.kernels.attention.triton_tree import TreeAttentionConfig, paged_hybrid_attention

    length, n, hkv, d, page = args.context, args.n, 8, 128, 16
    slots = (length + n + page) // page * page
    k = torch.randn(hkv, slots, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.arange(slots // page, device="cuda", dtype=torch.int32)
    q = torch.randn(n, 4 * hkv, d, device="cuda", dtype=torch.bfloat16)
    mask = tree_mask(n, torch.Generator().manual_seed(0)).cuda()
    call = (q, k, v, table, length, k[:, length:length + n].transpose(0, 1),
            v[:, length:length + n].transpose(0, 1), mask, d ** -0.5, page)
    for warps in args.num_warps:
        cfg = TreeAttentionConfig(num_warps=warps)
        for _ in range(2):  # the first compiles; profile the second (--launch-skip 1)
            paged_hybrid_attention(*call, config=cfg)
            torch.cuda.synchronize()
    print(f"launched {len(args.num_warps)} config(s) twice at context {length}, n {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
