"""SmolLM2 end to end on a GPU (real weights, bf16): lsrt plain and speculative decoding vs
transformers' `generate`, on agent-trace prompts, in one run.

    python bench/gpu_e2e.py [--model PATH|NAME] [--traces FILE] [--prompts 4] [--new 96]
        [--skip 0] [--drafts none suffix longspec:DIR#2,2,2 ...] [--no-hf]

`--skip N` starts at the trace N+1 (`lsrt train-draft` holds out the first 3 traces of each
file, so `--skip 3` replays held-in traces). A draft spec may end in `#W1,W2,...`: the longspec
tree widths for that row.

Decode tokens/s exclude prefill (lsrt: timed from the end of prefill; transformers: generate(N)
minus generate(1)). Speedups are against lsrt plain decoding measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_specs import split_spec  # noqa: E402
from traces import traces_dir  # noqa: E402


def trace_prompts(llm, path: Path, count: int, max_tokens: int, skip: int = 0
                  ) -> list[list[int]]:
    """The first assistant turn (after at least two messages, prompt over 256 tokens) of each
    trace after the first `skip`, its last `max_tokens` tokens, for `count` traces."""
    from lsrt.runtime.training.selfgen import trace_turn_prompts

    return list(islice(trace_turn_prompts(llm.tokenizer, path, holdout=skip,
                                          max_prompt=max_tokens, min_prompt=257,
                                          min_messages=2, turns_per_trace=1), count))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--traces", default=str(traces_dir() / "swe_agent_demos.jsonl"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--max-prompt", type=int, default=6000)
    ap.add_argument("--drafts", nargs="+", default=["none", "suffix", "self", "auto"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", type=int, default=0, help="start after this many traces")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig
    from lsrt.runtime.sampling import SamplingParams

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    llm = LLM.load(args.model, RunnerConfig(device=args.device, dtype=dtype, kv_budget_mb=4096),
                   progress=False)
    llm.engine.eos_ids = ()  # generate exactly --new tokens with every engine
    prompts = trace_prompts(llm, Path(args.traces), args.prompts, args.max_prompt, args.skip)
    params = SamplingParams(max_tokens=args.new)
    llm.generate(prompts[0][:64], SamplingParams(max_tokens=8))  # warm-up
    rows = {}
    for spec in args.drafts:
        draft, opts = split_spec(spec)
        tps, acc = [], []
        for ids in prompts:
            llm.generate(ids[:64], SamplingParams(max_tokens=4), draft=draft, draft_options=opts)
            sync()
            done = llm.generate(ids, params, draft=draft, draft_options=opts)
            sync()
            g = done.generation
            tps.append(len(g.token_ids) / g.decode_s)
            acc.append(g.stats.mean_accepted_per_step)
        rows[spec] = (statistics.median(tps), statistics.median(acc))
    hf_tps = {}
    if args.no_hf:
        return print_table(args, llm, dtype, prompts, rows, hf_tps)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=llm.config.torch_dtype
                                              ).to(args.device).eval()
    for name, extra in (("plain", {}), ("prompt lookup 10", {"prompt_lookup_num_tokens": 10})):
        vals = []
        for ids in prompts:
            x = torch.tensor([ids], device=args.device)
            with torch.no_grad():
                kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
                hf.generate(x[:, :64], max_new_tokens=4, **kw)
                sync(); t0 = time.perf_counter()
                hf.generate(x, max_new_tokens=1, **kw)
                sync(); t1 = time.perf_counter()
                hf.generate(x, max_new_tokens=args.new + 1, **kw)
                sync(); t2 = time.perf_counter()
            vals.append(args.new / ((t2 - t1) - (t1 - t0)))
        hf_tps[name] = statistics.median(vals)
    print_table(args, llm, dtype, prompts, rows, hf_tps)


def print_table(args, llm, dtype, prompts, rows, hf_tps) -> None:
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lens = [len(p) for p in prompts]
    print(f"{name}, {args.model} {dtype}, {len(prompts)} prompts from {Path(args.traces).name} "
          f"after {args.skip} skipped ({min(lens)}-{max(lens)} tokens), {args.new} new tokens, "
          "medians over prompts")
    print("| engine | decode tok/s | mean accepted/step | vs lsrt none | vs transformers plain |")
    print("| --- | --- | --- | --- | --- |")
    base = rows["none"][0]
    for draft, (tps, acc) in rows.items():
        vs_hf = f"{tps / hf_tps['plain']:.2f}x" if hf_tps else "-"
        print(f"| lsrt {draft} | {tps:.1f} | {acc:.2f} | {tps / base:.2f}x | {vs_hf} |")
    for hname, tps in hf_tps.items():
        print(f"| transformers {hname} | {tps:.1f} | | {tps / base:.2f}x | "
              f"{tps / hf_tps['plain']:.2f}x |")


if __name__ == "__main__":
    main()
