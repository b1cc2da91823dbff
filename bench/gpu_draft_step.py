"""A `longspec` draft step vs a target step, Llama-3.1-8B shape, random weights, on a GPU.

    python bench/gpu_draft_step.py [--contexts 32768 131072] [--repeats 20] [--device cuda]
        [--draft-vocab 0 32768] [--cross-kernel sdpa triton]

Target step: one CUDA-graphed decode step through lsrt's runner. Draft step: one LongSpec draft
level (widths=(1,): one token) — the draft layer over its sink+window cache plus query-only
cross-attention into the target's last-layer KV, and the frozen lm_head; eager, and replayed
from the drafter's CUDA graph (captured on its 3rd proposal of a shape, as in serving); on the
CPU only eager. Issue-7 target: draft step <= 8% of a target step. Medians of --repeats
wall-clock timings (synchronised).

--draft-vocab K [K ...]: one row per draft vocabulary size (0: the whole vocabulary). A draft
vocabulary of K ids (FR-Spec; the shipped SmolLM2 draft has 8,192) makes the head read K x H
instead of V x H: at Llama-3's 128,256 x 4,096 the full head is ~1 GB a level.

--cross-kernel K [K ...]: one row per cross-attention kernel (`LongSpecWorkspace`): sdpa (masked
SDPA over the cross buffer) or triton (the split-K graph kernel over the committed positions;
what a drafter of a Triton-attention runner uses). "graph replay alone": the captured proposal
replayed and synchronised, without the host work of `propose` around it.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from gpu_graphs import wall_ms
from gpu_step import build_runner


def kernel_profile(fn, steps: int, top: int = 30) -> str:
    """GPU time per kernel name over `steps` calls of fn (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top,
                                     max_name_column_width=70)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--draft-vocab", type=int, nargs="+", default=[0])
    ap.add_argument("--cross-kernel", nargs="+", default=["sdpa", "triton"],
                    choices=["sdpa", "triton"])
    ap.add_argument("--profile", action="store_true",
                    help="after each row, the GPU time per kernel of 10 eager proposals")
    args = ap.parse_args()

    from lsrt.runtime.spec.longspec import LongSpecDrafter
    from lsrt.runtime.spec.longspec_layer import LongSpecConfig, init_from_target
    from lsrt.runtime.spec.tree import DraftTree

    runner, cfg, _ = build_runner(args.shape, "triton" if args.device == "cuda" else "sdpa",
                                  max(args.contexts), args.device)
    if args.device == "cuda":
        from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner

        runner = GraphRunner(runner, GraphConfig(sizes=(1,)))
    draft = init_from_target(runner.model, LongSpecConfig())
    kernels = args.cross_kernel if args.device == "cuda" else ["sdpa"]
    print(f"{args.shape}, {args.device}, bf16, median of {args.repeats}")
    print("| context | draft vocabulary | cross kernel | target decode step ms | "
          "draft step ms, eager | draft/target, eager | draft step ms, graphed | "
          "draft/target, graphed | graph replay alone ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ctx, vocab, kernel in itertools.product(args.contexts, args.draft_vocab, kernels):
        draft.set_draft_vocab(torch.arange(vocab) if vocab else None)
        seq = runner.new_sequence()
        seq.reserve(ctx + 40)
        seq.num_tokens = ctx  # random KV stands in for a prefilled context
        history = [7] * (ctx + 1)
        target = wall_ms(lambda: runner.verify(seq, DraftTree.chain(7, [])), args.repeats)
        cells = []
        for graphs in (False, True) if args.device == "cuda" else (False,):
            drafter = LongSpecDrafter(runner, draft, widths=(1,), use_graphs=graphs,
                                      cross_kernel=kernel)
            drafter.bind(seq)
            drafter.observe(history)
            for _ in range(3):  # encodes its sink+window cache; captures the graph on the 3rd
                drafter.propose(history, 8)
            step = wall_ms(lambda: drafter.propose(history, 8), args.repeats)
            cells += [f"{step:.2f}", f"{100 * step / target:.1f}%"]
            if graphs:  # the graph alone: what is left of the step is host work around it
                (graph, _), = drafter._graphs.values()
                cells.append(f"{wall_ms(graph.replay, args.repeats):.2f}")
            elif args.profile and args.device == "cuda":
                profile = kernel_profile(lambda: drafter.propose(history, 8), 10)
        if len(cells) == 2:
            cells += ["-", "-", "-"]
        print(f"| {ctx} | {vocab or cfg.vocab_size} | {kernel} | {target:.2f} | "
              + " | ".join(cells) + " |", flush=True)
        if args.profile and args.device == "cuda":
            print(profile, flush=True)
        seq.release()


if __name__ == "__main__":
    main()
