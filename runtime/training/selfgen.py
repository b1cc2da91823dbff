"""Training text the target writes itself (`lsrt gen-data`): its greedy continuations of the
agent traces' assistant turns.

A draft is judged on how often it predicts the target's next token where the target is
generating, so the most useful text to distil from is the target's own output in the contexts
it will serve. For every assistant turn of the held-in traces (the first `holdout` traces of
each file are skipped, as `lsrt train-draft` holds them out), the conversation before the turn is
rendered with the chat template (tool output as `user`, contents cut at `max_chars`), its last
`max_prompt` tokens are the prompt, and the target continues it greedily for `max_new` tokens
(EOS ignored, as the benchmarks do). Each document is the last `keep_context` prompt tokens
plus the continuation; documents are joined with EOS into one 1-D tensor saved with
`torch.save` — a `.pt` source for `lsrt train-draft --data`.

Speculative decoding is lossless, so generation uses a drafter (`suffix` by default) for speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch


def trace_turn_prompts(tokenizer, path: str | Path, *, holdout: int, max_prompt: int,
                       max_chars: int = 6000, min_prompt: int = 64, min_messages: int = 1,
                       turns_per_trace: int | None = None, skip_turns: int = 0,
                       exclude: range = range(0)) -> Iterator[list[int]]:
    """Prompt ids (the last `max_prompt` tokens) for the assistant turns of held-in traces
    that follow at least `min_messages` messages and render to at least `min_prompt` tokens;
    at most `turns_per_trace` of them per trace, after its first `skip_turns` (so a second
    time-limited run can cover turns the first did not). Traces whose index is in `exclude` are
    skipped too (a held-in evaluation block: its text is trained on, the target's
    continuations of its turns are not)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if i < holdout or i in exclude:
            continue
        history: list[dict[str, Any]] = []
        taken = seen = 0
        for m in json.loads(line)["messages"]:
            if turns_per_trace is not None and taken >= turns_per_trace:
                break
            if m.get("role") == "assistant" and len(history) >= max(1, min_messages):
                ids = tokenizer.apply_chat(history, add_generation_prompt=True)
                if len(ids) >= min_prompt:
                    seen += 1
                    if seen > skip_turns:
                        taken += 1
                        yield ids[-max_prompt:]
            role = "user" if m.get("role") == "tool" else m.get("role")
            history.append({"role": role, "content": (m.get("content") or "")[:max_chars]})


def generate_corpus(llm, traces: list[str | Path], *, holdout: int = 3, max_new: int = 256,
                    max_prompt: int = 4096, keep_context: int = 1024, draft: str = "suffix",
                    max_seconds: float | None = None, max_docs: int | None = None,
                    turns_per_trace: int | None = None, skip_turns: int = 0,
                    exclude: range = range(0), progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(tokens `[T]`, summary). Round-robin over the trace files, so a time limit still covers
    every file."""
    from lsrt.runtime.sampling import SamplingParams

    eos = (llm.tokenizer.eos_token_id if llm.tokenizer.eos_token_id is not None
           else llm.runner.cfg.eos_token_ids[0])
    params = SamplingParams(max_tokens=max_new)
    saved_eos = llm.engine.eos_ids
    llm.engine.eos_ids = ()  # as the benchmarks: exactly max_new tokens
    iters = [trace_turn_prompts(llm.tokenizer, p, holdout=holdout, exclude=exclude,
                                turns_per_trace=turns_per_trace, skip_turns=skip_turns,
                                max_prompt=min(max_prompt, llm.context_limit - max_new - 1))
             for p in traces]
    out: list[int] = []
    docs = generated = 0
    t0 = time.perf_counter()
    try:
        while iters:
            for it in list(iters):
                prompt = next(it, None)
                if prompt is None:
                    iters.remove(it)
                    continue
                done = llm.generate(prompt, params, draft=draft)
                new = done.generation.token_ids
                out.extend(prompt[-keep_context:] + list(new) + [eos])
                docs += 1
                generated += len(new)
                elapsed = time.perf_counter() - t0
                if progress:
                    print(f"gen-data: {docs} turns, {generated} generated tokens, "
                          f"{generated / elapsed:.0f} tok/s", flush=True)
                if (max_docs is not None and docs >= max_docs) or \
                        (max_seconds is not None and elapsed >= max_seconds):
                    iters = []
                    break
    finally:
        llm.engine.eos_ids = saved_eos
    summary = {"documents": docs, "generated_tokens": generated, "tokens": len(out),
               "traces": [str(p) for p in traces], "holdout": holdout,
               "excluded_traces": [exclude.start, exclude.stop] if exclude else None,
               "turns_per_trace": turns_per_trace, "skip_turns": skip_turns, "max_new": max_new,
               "keep_context": keep_context, "draft": draft,
               "seconds": round(time.perf_counter() - t0, 1)}
    return torch.tensor(out, dtype=torch.long), summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsrt gen-data", description="write the target's own "
                                "greedy continuations of agent-trace turns as training tokens")
    p.add_argument("--target", default="smollm2-135m", help="registry name, directory or GGUF")
    p.add_argument("--traces", nargs="+", required=True, help="agent-trace .jsonl files")
    p.add_argument("--out", required=True, help="output .pt file (a 1-D token tensor)")
    p.add_argument("--holdout", type=int, default=3, help="skip the first N traces per file")
    p.add_argument("--exclude-traces", default=None, metavar="A:B",
                   help="also skip traces A..B-1 of each file (a held-in evaluation block)")
    p.add_argument("--turns-per-trace", type=int, default=None,
                   help="at most N turns per trace (spreads a time-limited run over more traces)")
    p.add_argument("--skip-turns", type=int, default=0,
                   help="skip each trace's first N turns (covered by an earlier run)")
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--max-prompt", type=int, default=4096)
    p.add_argument("--keep-context", type=int, default=1024)
    p.add_argument("--draft", default="suffix", help="drafter used for speed (lossless)")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--max-docs", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, else float32")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    a = build_parser().parse_args(argv)
    if not a.out.endswith(".pt"):
        raise SystemExit("lsrt gen-data: --out must end in .pt")
    for t in a.traces:
        if not Path(t).is_file():
            raise SystemExit(f"lsrt gen-data: no such trace file: {t}")
    exclude = range(0)
    if a.exclude_traces:
        try:
            lo, hi = (int(x) for x in a.exclude_traces.split(":"))
        except ValueError:
            raise SystemExit("lsrt gen-data: --exclude-traces takes A:B, e.g. 13:16") from None
        exclude = range(lo, hi)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    llm = LLM.load(a.target, RunnerConfig(device=a.device, dtype=dtype),
                   progress=not a.no_progress)
    tokens, summary = generate_corpus(
        llm, a.traces, holdout=a.holdout, max_new=a.max_new, max_prompt=a.max_prompt,
        keep_context=a.keep_context, draft=a.draft, progress=not a.no_progress,
        max_seconds=None if a.max_minutes is None else 60 * a.max_minutes, max_docs=a.max_docs,
        turns_per_trace=a.turns_per_trace, skip_turns=a.skip_turns, exclude=exclude)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, a.out)
    Path(a.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['documents']} turns, {summary['generated_tokens']} generated tokens, "
          f"{summary['tokens']} in all -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
