"""Where a speculative step's time goes, SmolLM2-135M shape with random weights, on a GPU.

    python bench/gpu_spec_profile.py [--tokenizer DIR] [--prompt 2000] [--new 192]
        [--drafts none suffix longspec] [--device cuda] [--elementwise torch triton] [--profile]

Builds a random-weight model of SmolLM2-135M's shape (bf16, CUDA graphs, as `lsrt` serves it)
with SmolLM2's tokenizer, prefills a repetitive prompt and decodes `--new` tokens with each
drafter (EOS ignored). Prints per drafter: ms per step, and the synchronised time spent in the
drafter's `propose` and in the runner's `verify` and `commit` (medians per step), once per
`--elementwise` choice (norms / RoPE / SiLU-mul: torch references or Triton kernels); with
`--profile`, the top CUDA-side and host-side operators of one more longspec decode. The weights
are random, so acceptance is meaningless here; the costs per step are what this measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_specs import split_nodes, split_spec  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


class Timed:
    """Wraps a method: synchronised wall time of every call, in ms."""

    def __init__(self, obj, name: str, device: str) -> None:
        self.obj, self.name, self.device, self.ms = obj, name, device, []
        self.fn = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ms.append(1e3 * (time.perf_counter() - t0))
        return out

    def restore(self) -> None:
        setattr(self.obj, self.name, self.fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a directory with SmolLM2's tokenizer")
    ap.add_argument("--work", default="/tmp/lsrt-profile")
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--new", type=int, default=192)
    ap.add_argument("--drafts", nargs="+", default=["none", "suffix", "longspec"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--elementwise", nargs="+", default=["triton"], choices=["torch", "triton"])
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler tables of one more decode per longspec draft")
    args = ap.parse_args()

    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    work = Path(args.work)
    if not (work / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2)).to(torch.bfloat16) \
            .save_pretrained(work)
        for f in Path(args.tokenizer).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
                shutil.copy(f, work / f.name)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    gen = torch.Generator().manual_seed(1)
    unit = torch.randint(100, 40000, (97,), generator=gen).tolist()
    prompt = (unit * (args.prompt // len(unit) + 1))[:args.prompt]
    print(f"SmolLM2-135M shape, random weights, {args.device} {dtype}, prompt {args.prompt}, "
          f"{args.new} new tokens")
    print("| elementwise | draft | steps | ms/step | propose ms | verify ms | commit ms | "
          "other ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ops in args.elementwise:
        llm = LLM(work, RunnerConfig(device=args.device, dtype=dtype, elementwise=ops))
        llm.engine.eos_ids = ()
        for name in args.drafts:
            profile_draft(llm, name, prompt, args, ops)


def profile_draft(llm, name: str, prompt: list[int], args, ops: str) -> None:
    """One table row for drafter spec `name`; with --profile, torch.profiler's top operators
    of one more longspec decode."""
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.spec.drafters import make_drafter

    params = SamplingParams(max_tokens=args.new)
    spec, nodes = split_nodes(name)
    draft, options = split_spec(spec)
    drafter = make_drafter(draft, llm, options) if draft != "none" else None
    for attempt in ("warm", "timed"):  # the first run fills caches and captures graphs
        seq = llm.runner.new_sequence()
        timers = [Timed(llm.runner, "verify", args.device),
                  Timed(llm.runner, "commit", args.device)]
        if drafter is not None:
            timers.append(Timed(drafter, "propose", args.device))
            drafter.rollback(0)
            drafter.observe(list(prompt))
        try:
            llm.runner.prefill(seq, prompt[:-1])
            t0 = time.perf_counter()
            out = llm.engine.generate(seq, list(prompt), params, drafter=drafter,
                                      tree_nodes=nodes)
            wall = 1e3 * (time.perf_counter() - t0)
        finally:
            for t in timers:
                t.restore()
            seq.release()
    steps = out.stats.steps
    med = [statistics.median(t.ms) if t.ms else 0.0 for t in timers]
    verify, commit = med[0], med[1]
    propose = med[2] if drafter is not None else 0.0
    per = wall / steps
    print(f"| {ops} | {name} | {steps} | {per:.2f} | {propose:.2f} | {verify:.2f} | "
          f"{commit:.2f} | {per - propose - verify - commit:.2f} |", flush=True)
    if args.profile and draft.startswith("longspec") and args.device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        seq = llm.runner.new_sequence()
        drafter.rollback(0)
        drafter.observe(list(prompt))
        try:
            llm.runner.prefill(seq, prompt[:-1])
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                llm.engine.generate(seq, list(prompt), params, drafter=drafter,
                                    tree_nodes=nodes)
        finally:
            seq.release()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=45))


if __name__ == "__main__":
    main()
