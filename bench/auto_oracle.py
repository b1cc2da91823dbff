"""What each of `auto`'s arms would emit at every step, by the suffix match at that step.

    python bench/auto_oracle.py [--model smollm2-135m] [--device cpu|cuda] [--traces FILE ...]
        [--skip-traces 13] [--max-traces 3] [--turns-per-trace 3] [--max-new 96]
        [--draft longspec[:DIR]]

Replays agent-trace turns as sessions (with `bench/spec_cpu.py`'s `LsrtRun`). Each turn is first decoded
plainly (the target's greedy tokens, the truth); then decoded again with speculation, and at
every step four trees are built from the same drafter state: the suffix tree, the model's tree
with the full node budget and with half of it, and the merged tree `auto` would propose
(suffix + the half-budget model tree). Tokens each would emit (accepted + the bonus) are read
off the truth; the step itself verifies the merged tree (the output is checked against the
truth, so it is lossless by construction of the check). Steps are grouped by the suffix
tree's depth (2 + the match length with the default suffix settings; 0: no match), and the
median proposal times are printed beside.

This is what `auto`'s situations are drawn from; it measures acceptance only, not speed
(`bench/spec_cpu.py` and `bench/gpu_e2e.py` do that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_cpu import LsrtRun, Tally  # noqa: E402
from traces import load_traces, replay_turns, traces_dir  # noqa: E402

BUCKETS = (("no match", 0, 1), ("depth 2-5", 2, 5), ("depth 6-9", 6, 9), ("depth 10+", 10, 99))
COLUMNS = ("suffix", "model", "model/2", "merged")


class Recorder:
    """A drafter that proposes `auto`'s merged tree and records what every arm would emit."""

    def __init__(self, auto) -> None:
        self.auto, self.suffix, self.model = auto, auto.suffix, auto.model
        self.rows: list[dict] = []
        self.truth: list[int] = []
        self.base = 0

    def bind(self, seq) -> None:
        self.auto.bind(seq)

    def observe(self, tokens: list[int]) -> None:
        self.auto.observe(tokens)

    def rollback(self, num_tokens: int) -> None:
        self.auto.rollback(num_tokens)

    def export_state(self):
        return None

    def propose(self, history: list[int], max_nodes: int):
        future = self.truth[len(history) - self.base:]
        t0 = time.perf_counter()
        s = self.suffix.propose(history, max_nodes)
        t1 = time.perf_counter()
        full = self.model.propose(history, max_nodes)
        t2 = time.perf_counter()
        half = self.model.propose(history, max(2, max_nodes // 2))
        t3 = time.perf_counter()
        matched = s is not None and len(s) > 1
        merged = self.auto._merged(s, history, max_nodes) if matched else half

        def emits(tree) -> int:
            return 1 + tree.accepted_length(future) if tree is not None else 1

        self.rows.append({"depth": max(s.depth) if matched else 0,
                          "suffix": emits(s if matched else None), "model": emits(full),
                          "model/2": emits(half), "merged": emits(merged),
                          "ms": (1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2))})
        return merged


def table(title: str, rows: list[dict]) -> str:
    lines = [f"#### {title}", "", "| suffix tree | steps | " + " | ".join(COLUMNS) + " |",
             "| --- | --- |" + " --- |" * len(COLUMNS)]
    for name, lo, hi in BUCKETS + (("all", 0, 99),):
        part = [r for r in rows if lo <= r["depth"] <= hi]
        if part:
            cells = " | ".join(f"{statistics.fmean(r[c] for r in part):.2f}" for c in COLUMNS)
            lines.append(f"| {name} | {len(part)} | {cells} |")
    ms = [statistics.median(r["ms"][i] for r in rows) for i in range(3)]
    lines += ["", f"median proposal ms: suffix {ms[0]:.2f}, model {ms[1]:.2f}, "
                  f"model/2 {ms[2]:.2f}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--traces", nargs="+", default=[
        str(traces_dir() / f) for f in ("swe_agent_demos.jsonl", "mini_swe_agent_gemini3pro.jsonl",
                                       "tau_bench_gpt4o_airline.jsonl")])
    ap.add_argument("--skip-traces", type=int, default=13)
    ap.add_argument("--max-traces", type=int, default=3)
    ap.add_argument("--turns-per-trace", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--draft", default="longspec", help="the model drafter (auto:DRAFT)")
    args = ap.parse_args()

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    llm = LLM.load(args.model, RunnerConfig(device=args.device, dtype=dtype), progress=False)
    llm.engine.eos_ids = ()  # a fixed number of tokens per turn, as the other benchmarks
    print("command: python bench/auto_oracle.py " + " ".join(sys.argv[1:]))
    for path in args.traces:
        rows: list[dict] = []
        traces = load_traces(path)[args.skip_traces:args.skip_traces + args.max_traces]
        for trace in traces:
            plain, spec = LsrtRun(llm, "none"), LsrtRun(llm, f"auto:{args.draft}")
            rec = spec.drafter = Recorder(spec.drafter)
            try:
                for turn in replay_turns(llm.tokenizer, trace, turns=args.turns_per_trace):
                    truth = plain.turn(turn, args.max_new, Tally(), None)
                    rec.truth, rec.base = truth, len(turn.prompt_ids)
                    if spec.turn(turn, args.max_new, Tally(), None) != truth:
                        raise SystemExit(f"MISMATCH on {trace.id} turn {turn.turn}")
            finally:
                plain.close()
                spec.close()
            rows += rec.rows
        print(table(f"{args.model} on {Path(path).name} (traces {args.skip_traces}.."
                    f"{args.skip_traces + len(traces) - 1}, {args.turns_per_trace} turns, "
                    f"{args.max_new} tokens; mean tokens emitted per step)", rows), flush=True)

if __name__ == "__main__":
    main()
