"""Prefill and decode throughput of lsrt vs transformers' `generate`, same prompt, same run.

    python bench/generate_cpu.py [--model smollm2-135m] [--contexts 512 4096] [--new 32]
                                 [--repeats 3] [--device cpu] [--dtype float32]
                                 [--linear auto | torch onednn] [--verify-sizes 1 2 4 8 16]

Prints a markdown table of medians over `--repeats` runs (after one warm-up each).
Decode tokens/s excludes prefill for both engines (transformers: time of generate with
`max_new_tokens=N` minus generate with `max_new_tokens=1`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def prompt_ids(llm, n: int) -> list[int]:
    text = open(__file__).read() * 40
    ids = llm.tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def time_lsrt(llm, ids, new, params_cls):
    t0 = time.perf_counter()
    seq = llm.runner.new_sequence()
    llm.runner.prefill(seq, ids[:-1])
    _sync(llm.config.device)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm.engine.generate(seq, list(ids), params_cls(max_tokens=new, stop_token_ids=()))
    _sync(llm.config.device)
    decode = time.perf_counter() - t1
    seq.release()
    return prefill, decode


def time_hf(hf, ids, new, device):
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync(device)
        t1 = time.perf_counter()
        hf.generate(x, max_new_tokens=new + 1, do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_verify(llm, ids, sizes: list[int], repeats: int) -> list[float]:
    """Median ms of one verification of a chain of `n` nodes after `ids`, for each n."""
    from lsrt.runtime.spec.tree import DraftTree

    seq = llm.runner.new_sequence()
    llm.runner.prefill(seq, ids[:-1])
    out = []
    for n in sizes:
        tree = DraftTree.chain(ids[-1], ids[:n - 1])
        llm.runner.verify(seq, tree)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.runner.verify(seq, tree)
            _sync(llm.config.device)
            times.append(time.perf_counter() - t0)
        out.append(1e3 * statistics.median(times))
    seq.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--linear", nargs="+", default=["auto"],
                    help="lsrt projection backends, each measured in this run (torch onednn)")
    ap.add_argument("--verify-sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                    help="also time one verification of this many tree nodes")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig
    from lsrt.runtime.sampling import SamplingParams

    llms = {lin: LLM.load(args.model, RunnerConfig(device=args.device, dtype=args.dtype,
                                                   kv_budget_mb=2048, linear=lin),
                          progress=False) for lin in args.linear}
    any_llm = next(iter(llms.values()))
    hf = AutoModelForCausalLM.from_pretrained(any_llm.model_dir, dtype=any_llm.config.torch_dtype,
                                              attn_implementation="sdpa").to(args.device).eval()
    print(f"model {args.model}, device {args.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, {args.new} new tokens, median of {args.repeats}")
    print("| context | lsrt linear | lsrt prefill tok/s | transformers prefill tok/s | ratio | "
          "lsrt decode tok/s | transformers decode tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    verify_rows = []
    for ctx in args.contexts:
        ids = prompt_ids(any_llm, ctx)
        time_hf(hf, ids[:64], 4, args.device)
        theirs = [time_hf(hf, ids, args.new, args.device) for _ in range(args.repeats)]
        tp = ctx / statistics.median(p for p, _ in theirs)
        td = args.new / statistics.median(d for _, d in theirs)
        for lin, llm in llms.items():
            time_lsrt(llm, ids[:64], 4, SamplingParams)
            ours = [time_lsrt(llm, ids, args.new, SamplingParams) for _ in range(args.repeats)]
            op = ctx / statistics.median(p for p, _ in ours)
            od = args.new / statistics.median(d for _, d in ours)
            print(f"| {ctx} | {lin} | {op:.0f} | {tp:.0f} | {op / tp:.2f}x | {od:.1f} | "
                  f"{td:.1f} | {od / td:.2f}x |", flush=True)
            if args.verify_sizes:
                ms = time_verify(llm, ids, args.verify_sizes, 2 * args.repeats + 1)
                verify_rows.append((ctx, lin, ms))
    if verify_rows:
        sizes = args.verify_sizes
        print("\nverify ms by tree nodes (chains; median of "
              f"{2 * args.repeats + 1}); x: over one node\n")
        print("| context | lsrt linear | " + " | ".join(f"n={n}" for n in sizes) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
        for ctx, lin, ms in verify_rows:
            cells = " | ".join(f"{m:.1f} ({m / ms[0]:.2f}x)" for m in ms)
            print(f"| {ctx} | {lin} | {cells} |")


if __name__ == "__main__":
    main()
