"""What Triton compiles the tree-attention kernel to, without a GPU: registers, spills, shared
memory and where the matrix-product operands live, for one launch shape on a chosen target.

    python bench/kernel_compile.py [--arch 90] [--block-m 128] [--num-warps 4] [--block-n N]
        [--num-stages N] [--prefetch-pages 0|1] [--tma 0|1] [--halves 0|1] [--page 16]
        [--group 4] [--head-dim 128] [--keep DIR]

It compiles `kernels/attention/triton_tree.py::_tree_partial_kernel` (bf16, a tree mask, 16-token
pages unless --page; --tma 1: whole key tiles through TMA descriptors, which needs a page that
holds a whole tile) with the divisibility hints the JIT would give it for 16-aligned pointers
and strides, then runs the Triton wheel's own `ptxas -v` on the PTX. The numbers are the installed Triton's
code generation, which may differ from the GPU machine's Triton version. `--keep DIR` writes
the TTGIR and PTX there.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

POINTERS = {"q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "bt_ptr": "*i32",
            "kn_ptr": "*bf16", "vn_ptr": "*bf16", "mask_ptr": "*u8", "po_ptr": "*fp32",
            "pl_ptr": "*fp32"}
# Integer arguments that are multiples of 16 at every benchmarked shape (the JIT marks those).
ALIGNED_INTS = ("prefix_len", "n_q", "n_new", "split_len", "num_prefix_splits")


def compile_kernel(args: argparse.Namespace):
    """The compiled kernel (Triton's CompiledKernel) for the requested shape."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lsrt.kernels.attention.triton_tree import _tree_partial_kernel as kernel

    names = list(inspect.signature(kernel.fn).parameters)
    const = dict(GROUP=args.group, HEAD_DIM=args.head_dim, BLOCK_M=args.block_m,
                 BLOCK_N=args.block_n, PAGE=args.page, CAUSAL=False, IS_FP32=False, ROWS_FIRST=True,
                 PDL=False, WS=False, PREFETCH=args.prefetch_pages, TMA=bool(args.tma),
                 HALVES=args.halves)
    desc = f"tensordesc<bf16[{args.block_n}, {args.head_dim}]>" if args.tma else "*bf16"
    signature = {}
    for name in names:
        if name in ("k_desc", "v_desc"):
            signature[name] = desc
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name in const:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    aligned = [i for i, name in enumerate(names)
               if name in POINTERS or name.startswith("stride") or name in ALIGNED_INTS]
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                          options=dict(num_warps=args.num_warps, num_stages=args.num_stages))


def ptxas_report(ptx: str, arch: int) -> str:
    """`ptxas -v` on the PTX with the first assembler in the Triton wheel that accepts it."""
    import triton.backends.nvidia as nvidia

    bin_dir = Path(nvidia.__file__).parent / "bin"
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for exe in sorted(bin_dir.glob("ptxas*")):
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the arch-specific ISA
            run = subprocess.run([str(exe), f"-arch={gpu}", "-v", str(src), "-o",
                                  os.devnull], capture_output=True, text=True)
            if run.returncode == 0:
                return run.stderr
            tried.append(f"{exe.name}: {run.stderr.strip().splitlines()[-1:]}")
    raise RuntimeError("no ptxas in the Triton wheel assembled the PTX: " + "; ".join(tried))


def summary(compiled, report: str) -> dict[str, str]:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    layouts = sorted(set(re.findall(r"warpsPerCTA = \[[\d, ]+\]", ttgir)))
    # "... warp_group_dot %a, %b, %c {...} : A_TYPE * B_TYPE -> C_TYPE": where A lives.
    dots = [line.split(" * ")[0].rsplit(" : ", 1)[-1] for line in ttgir.splitlines()
            if "warp_group_dot " in line]
    a_in_smem = sum(a_type.startswith("!ttg.memdesc") for a_type in dots)
    return {
        "registers per thread": regs.group(1) if regs else "?",
        "spill stores / loads (bytes per thread)":
            f"{spills.group(1)} / {spills.group(2)}" if spills else "?",
        "shared memory (bytes)": str(compiled.metadata.shared),
        "wgmma instructions in the PTX (Hopper)": str(ptx.count("wgmma.mma_async")),
        "matrix products with A in shared memory / registers":
            f"{a_in_smem} / {len(dots) - a_in_smem}",
        "16-byte async copies (cp.async.cg) in the PTX": str(ptx.count("cp.async.cg")),
        "TMA tile copies (cp.async.bulk.tensor) in the PTX":
            str(ptx.count("cp.async.bulk.tensor")),
        "mma layouts": ", ".join(layouts) or "none",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--block-n", type=int, default=None, help="default: the shipped choice")
    parser.add_argument("--num-stages", type=int, default=None, help="likewise")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prefetch-pages", type=int, choices=(0, 1), default=None,
                        help="TreeAttentionConfig.prefetch_pages (default: the shipped choice)")
    parser.add_argument("--tma", type=int, choices=(0, 1), default=0,
                        help="TreeAttentionConfig.tma (key tiles through TMA descriptors)")
    parser.add_argument("--halves", type=int, choices=(0, 1), default=None,
                        help="TreeAttentionConfig.halves (default: the shipped choice)")
    parser.add_argument("--page", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--keep", default=None, help="a folder for the TTGIR and PTX")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: an interpreted kernel cannot be compiled")
    from lsrt.kernels.attention.triton_tree import halves_for, tiles

    prefetch = None if args.prefetch_pages is None else bool(args.prefetch_pages)
    args.halves = halves_for(None if args.halves is None else bool(args.halves), args.block_m,
                             prefetch is True)
    args.block_n, args.num_stages, args.prefetch_pages = tiles(
        args.block_m, args.block_n, args.num_stages, prefetch)
    compiled = compile_kernel(args)
    report = ptxas_report(compiled.asm["ptx"], args.arch)
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            (keep / f"tree_partial.{kind}").write_text(compiled.asm[kind])
    import triton

    print(f"_tree_partial_kernel, sm_{args.arch}, Triton {triton.__version__}: block_m "
          f"{args.block_m}, {args.num_warps} warps, block_n {args.block_n}, "
          f"{args.num_stages} stages, page ids prefetched: {args.prefetch_pages}, TMA: "
          f"{bool(args.tma)}, halves: {args.halves}, {args.page}-token pages, group "
          f"{args.group}, head_dim {args.head_dim}, bf16")
    print("\n| what | value |\n| --- | --- |")
    for key, value in summary(compiled, report).items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
