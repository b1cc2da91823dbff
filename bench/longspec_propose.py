"""What a LongSpec proposal costs beside the target's own steps, on a real trace prompt.

    python bench/longspec_propose.py [--model smollm2-135m] [--device cpu|cuda] [--repeats 30]
        [--drafts longspec longspec#1,1,1,1,1,1 longspec:DIR ...]

Prefills one agent-trace prompt, then times (median of --repeats after 3 warm-up calls,
synchronised on CUDA: `gpu_graphs.wall_ms`): a plain decode step (a 1-node verify), a 13-node
verify (the default tree's size), and one `propose` of each LongSpec drafter spec
(`#W1,W2,...` sets the tree widths) at a fixed position. On CUDA the target steps and the
proposal replay CUDA graphs (the drafter captures on its third proposal of a shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_specs import split_spec  # noqa: E402
from traces import traces_dir  # noqa: E402
from gpu_e2e import trace_prompts  # noqa: E402
from gpu_graphs import wall_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--traces", default=str(traces_dir() / "swe_agent_demos.jsonl"))
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--drafts", nargs="+", default=["longspec", "longspec#1,1,1,1,1,1"])
    args = ap.parse_args()

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig
    from lsrt.runtime.spec.drafters import make_drafter
    from lsrt.runtime.spec.tree import DraftTree

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    llm = LLM.load(args.model, RunnerConfig(device=args.device, dtype=dtype), progress=False)
    (ids,) = trace_prompts(llm, Path(args.traces), 1, 6000, args.skip)
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:-1])
        one = DraftTree.chain(ids[-1], [])
        tree = DraftTree(tokens=[ids[-1]] * 13, parents=[-1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        rows = [("target decode step (1 node)",
                 wall_ms(lambda: llm.runner.verify(seq, one), args.repeats)),
                ("target verify (13 nodes)",
                 wall_ms(lambda: llm.runner.verify(seq, tree), args.repeats))]
        for spec in args.drafts:
            draft, opts = split_spec(spec)
            drafter = make_drafter(draft, llm, opts)
            drafter.observe(ids)
            drafter.bind(seq)
            drafter.propose(ids, 16)  # encodes the window once
            rows.append((f"propose {spec}",
                         wall_ms(lambda: drafter.propose(ids, 16), args.repeats)))
    finally:
        seq.release()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}, {args.model} {dtype}, prompt {len(ids)} tokens, median of {args.repeats}")
    print("| step | ms | vs decode step |\n| --- | --- | --- |")
    base = rows[0][1]
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
