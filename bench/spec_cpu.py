"""Replay real agent traces with every drafter; print speedups over plain decoding and over
transformers' `generate` (plain, prompt lookup, assistant model), same turns, same run.

    python bench/spec_cpu.py [--model smollm2-135m] [--traces FILE ...] [--max-traces 3]
        [--turns-per-trace 3] [--max-new 48] [--max-context 6144] [--max-chars 6000]
        [--configs none suffix self auto] [--hf plain lookup assisted] [--draft-model NAME]
        [--profile CONFIG] [--skip-traces N] [--device cuda] [--dtype float32]

A config may end in `#W1,W2,...`: the longspec tree widths for that config (e.g.
`longspec#2,2,2,2,2,2`), or `#nomerge` (`auto` without its merged suffix + model arm). `--skip-traces 3` replays held-in traces only (`lsrt train-draft`
holds out the first 3 of every file).

Each trace is one session: lsrt keeps one KV sequence per (trace, config) that grows turn by
turn (only the new tokens of a turn are prefilled, as the session manager does); the history
is the recorded conversation, not what the model generated. Per turn: `--max-new` tokens,
greedy, float32, EOS disabled for every engine so all generate the same number of tokens.
Turns are interleaved across configurations so load drift on a shared machine hits all alike.

Decode tokens/s excludes prefill for every engine and is a *total* (sum of tokens / sum of
decode seconds over all turns). lsrt: `Generation.decode_s` (from the step on the pending prompt
token). transformers: from the first streamed token to the end (the first step is its prefill).
Exit status 1 if any speculative configuration's tokens differ from lsrt `none` (MISMATCH).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_specs import split_budget, split_nodes, split_spec  # noqa: E402
from traces import ReplayTurn, advance, load_traces, replay_turns, traces_dir  # noqa: E402

HF_KINDS = ("plain", "lookup", "assisted")


@dataclass
class Tally:
    """Totals of one configuration over all replayed turns."""

    turns: int = 0
    new_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    emitted: int = 0
    drafted: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    modes: dict[str, int] = field(default_factory=dict)
    situations: dict[str, list[float]] = field(default_factory=dict)  # auto: steps, tokens, s

    @property
    def tps(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    def add(self, other: Tally) -> None:
        """Add another tally's totals (counts, times, modes and situations) to this one."""
        for name in ("turns", "new_tokens", "decode_s", "steps", "emitted", "drafted",
                     "prefill_tokens", "prefill_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mode, n in other.modes.items():
            self.modes[mode] = self.modes.get(mode, 0) + n
        for key, row in other.situations.items():
            acc = self.situations.setdefault(key, [0, 0, 0.0])
            for i, x in enumerate(row):
                acc[i] += x


class LsrtRun:
    """One lsrt configuration replaying one trace: a resident sequence and its drafter."""

    def __init__(self, llm, spec: str, engines: dict) -> None:
        from lsrt.runtime.spec.drafters import make_drafter

        self.llm, self.spec = llm, spec
        self.seq = llm.runner.new_sequence()
        spec, budget = split_budget(spec)
        self.engine = llm.engine
        if budget is not None:  # its own engine, cost-aware or not (and its own cost model),
            # kept across traces like the default engine (`engines`: budget -> engine)
            from lsrt.runtime.spec.engine import Engine

            if budget not in engines:
                engines[budget] = Engine(llm.runner, llm.tokenizer, llm.engine.eos_ids,
                                         cost_aware=budget == "cost")
            self.engine = engines[budget]
        spec, self.tree_nodes = split_nodes(spec)
        draft, options = split_spec(spec)
        self.drafter = make_drafter(draft, llm, options)
        self.history: list[int] = []

    def turn(self, turn: ReplayTurn, max_new: int, tally: Tally, prof: cProfile.Profile | None
             ) -> list[int]:
        from lsrt.runtime.sampling import SamplingParams

        keep = advance(self.history, turn.prompt_ids, self.seq.num_tokens)
        self.seq.truncate(keep)
        if self.drafter is not None:
            self.drafter.rollback(keep)
            self.drafter.observe(self.history[keep:])
        t0 = time.perf_counter()
        self.llm.runner.prefill(self.seq, self.history[keep:-1])
        tally.prefill_s += time.perf_counter() - t0
        tally.prefill_tokens += len(self.history) - 1 - keep
        params = SamplingParams(max_tokens=max_new)
        if prof is not None:
            prof.enable()
        gen = self.engine.generate(self.seq, self.history, params, drafter=self.drafter,
                                       tree_nodes=self.tree_nodes)
        if prof is not None:
            prof.disable()
        tally.turns += 1
        tally.new_tokens += len(gen.token_ids)
        tally.decode_s += gen.decode_s
        tally.steps += gen.stats.steps
        tally.emitted += gen.stats.emitted_tokens
        tally.drafted += gen.stats.drafted_tokens
        for mode, n in getattr(self.drafter, "mode_counts", {}).items():
            tally.modes[mode] = tally.modes.get(mode, 0) + n
        if hasattr(self.drafter, "mode_counts"):
            self.drafter.mode_counts = {k: 0 for k in self.drafter.mode_counts}
        for key, row in getattr(self.drafter, "situation_stats", {}).items():
            acc = tally.situations.setdefault(key, [0, 0, 0.0])
            for i, x in enumerate(row):
                acc[i] += x
        if hasattr(self.drafter, "situation_stats"):
            self.drafter.situation_stats = {}
        return list(gen.token_ids)

    def close(self) -> None:
        self.seq.release()


class FirstTokenTimer:
    """A transformers streamer that notes when the first generated tokens arrive."""

    def __init__(self) -> None:
        self.puts = 0
        self.t_first: float | None = None
        self.first_count = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.t_first = time.perf_counter()
            self.first_count = int(value.numel())

    def end(self) -> None:
        pass


def hf_turn(hf, kind: str, ids: list[int], max_new: int, tally: Tally, draft=None) -> list[int]:
    """One transformers `generate`; decode time counted from the first generated token."""
    extra = {"plain": {}, "lookup": {"prompt_lookup_num_tokens": 10},
             "assisted": {"assistant_model": draft}}[kind]
    timer = FirstTokenTimer()
    x = torch.tensor([ids], device=hf.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                          min_new_tokens=0, do_sample=False, streamer=timer, **extra)
        t1 = time.perf_counter()
    new = out[0, len(ids):].tolist()
    if len(new) != max_new:
        raise RuntimeError(f"transformers {kind} generated {len(new)} tokens, not {max_new}")
    tally.turns += 1
    tally.new_tokens += len(new) - timer.first_count
    tally.decode_s += t1 - timer.t_first
    tally.prefill_tokens += len(ids)
    tally.prefill_s += timer.t_first - t0
    return new


def load_hf(model_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """transformers' model on the device and in the dtype lsrt runs in (a fair baseline)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                              attn_implementation="sdpa").eval().to(device)
    hf.generation_config.eos_token_id = None  # same token count for every engine
    hf.generation_config.pad_token_id = 0
    return hf


def table(title: str, tallies: dict[str, Tally]) -> str:
    base = tallies.get("lsrt none")
    hf_base = tallies.get("hf plain")
    lines = [f"#### {title}", "",
             "| config | turns | new tokens | mean accepted/step | drafted/step | decode tok/s | speedup vs "
             "lsrt none | speedup vs transformers plain | prefill tokens | prefill s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in tallies.items():
        acc = f"{t.emitted / t.steps:.2f}" if t.steps else "-"
        drafted = f"{t.drafted / t.steps:.1f}" if t.steps else "-"
        vs = f"{t.tps / base.tps:.2f}x" if base and base.tps else "-"
        vs_hf = f"{t.tps / hf_base.tps:.2f}x" if hf_base and hf_base.tps else "-"
        lines.append(f"| {name} | {t.turns} | {t.new_tokens} | {acc} | {drafted} | {t.tps:.2f} | {vs} | "
                     f"{vs_hf} | {t.prefill_tokens} | {t.prefill_s:.1f} |")
    modes = [f"{n}: {t.modes}" for n, t in tallies.items() if t.modes]
    if modes:
        lines += ["", "auto mode counts (steps): " + "; ".join(modes)]
    for name, t in tallies.items():
        if t.situations:
            lines += ["", f"{name} by situation/arm (steps, tokens/step, ms/step from propose "
                          "to observe):"]
            lines += [f"  {key}: {int(n)} steps, {tok / n:.2f} tok/step, {1e3 * s / n:.2f} ms"
                      for key, (n, tok, s) in sorted(t.situations.items())]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--traces", nargs="+", default=[str(traces_dir() / "swe_agent_demos.jsonl")])
    ap.add_argument("--max-traces", type=int, default=3)
    ap.add_argument("--skip-traces", type=int, default=0,
                    help="start after this many traces of each file")
    ap.add_argument("--turns-per-trace", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--max-context", type=int, default=6144, help="prompt token cap per turn")
    ap.add_argument("--max-chars", type=int, default=6000, help="cap per message")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="lsrt drafter specs (default: none suffix self auto, plus "
                         "model:/auto:<draft-model> when --draft-model is given)")
    ap.add_argument("--hf", nargs="*", default=None, choices=HF_KINDS,
                    help="transformers variants, run on the same device in the same dtype "
                         "(default on the CPU: plain lookup, plus assisted with --draft-model; "
                         "on CUDA: none)")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--profile", default=None, help="cProfile this lsrt config's decoding")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu",
                    help="cpu (float32) or cuda (bfloat16, CUDA graphs)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="the model's dtype (default: float32 on cpu, bfloat16 on cuda). "
                         "float32 on cuda keeps every configuration's output identical to "
                         "plain decoding (bf16 near-ties flip between a decode and a verify, "
                         "after which the configurations generate different text): compare "
                         "acceptance there, not speed (its tree verify is slow)")
    args = ap.parse_args(argv)
    if args.configs is None:
        args.configs = ["none", "suffix", "self", "auto"]
        if args.draft_model:
            args.configs += [f"model:{args.draft_model}", f"auto:{args.draft_model}"]
    if "none" not in args.configs:
        args.configs.insert(0, "none")
    if args.hf is None:  # on CUDA transformers' loops take most of a run's time: ask for them
        args.hf = [] if args.device.startswith("cuda") else (
            ["plain", "lookup"] + (["assisted"] if args.draft_model else []))
    if "assisted" in args.hf and not args.draft_model:
        ap.error("--hf assisted needs --draft-model")
    return args


def warm_up(llm, hf_models: dict, args) -> None:
    """Generations per engine before anything is timed, so first-call costs (Triton compiles,
    CUDA graph captures: drafters of one LLM share their graphs) are not measured: a repetitive
    prompt (long suffix matches) and a non-repetitive one (misses, where `auto` drafts)."""
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.spec.drafters import make_drafter

    prompts = [llm.tokenizer.encode("def f(x):\n    return x + 1\n\ndef f(x):\n"),
               llm.tokenizer.encode("The user asked about their flight. Reply politely and "
                                    "list the next steps:")]
    for spec in args.configs:
        spec, _ = split_budget(spec)
        spec, nodes = split_nodes(spec)
        draft, options = split_spec(spec)
        drafter = make_drafter(draft, llm, options)
        for ids in prompts:
            seq = llm.runner.new_sequence()
            llm.runner.prefill(seq, ids[:-1])
            if drafter is not None:
                drafter.rollback(0)
                drafter.observe(ids)
            llm.engine.generate(seq, list(ids), SamplingParams(max_tokens=24),
                                drafter=drafter, tree_nodes=nodes)
            seq.release()
    for kind in args.hf:
        hf_turn(hf_models["target"], kind, prompts[0], 4, Tally(), hf_models.get("draft"))


def run_file(path: str, llm, hf_models: dict, args, prof) -> tuple[str, bool]:
    traces = load_traces(path, limit=args.skip_traces + args.max_traces)[args.skip_traces:]
    names = [f"lsrt {c}" for c in args.configs] + [f"hf {k}" for k in args.hf]
    tallies = {n: Tally() for n in names}
    # The same, over the turns where every lsrt config's output equals lsrt none's (in bf16,
    # near-ties flip between a decode and a verify and the texts then differ, so whole-run
    # speeds compare different texts; these compare the same ones).
    same_text = {f"lsrt {c}": Tally() for c in args.configs}
    ok = True
    same_hf = compared_hf = 0
    engines: dict = {}  # tree budget -> its engine, for the `!cost` / `!full` configs
    for trace in traces:
        turns = replay_turns(llm.tokenizer, trace, turns=args.turns_per_trace,
                             max_chars=args.max_chars,
                             max_prompt_tokens=args.max_context - args.max_new - 1)
        runs = {c: LsrtRun(llm, c, engines) for c in args.configs}
        try:
            for turn in turns:
                out: dict[str, list[int]] = {}
                this_turn = {name: Tally() for name in same_text}
                for c, run in runs.items():
                    out[f"lsrt {c}"] = run.turn(turn, args.max_new, this_turn[f"lsrt {c}"],
                                                prof if c == args.profile else None)
                    tallies[f"lsrt {c}"].add(this_turn[f"lsrt {c}"])
                for k in args.hf:
                    out[f"hf {k}"] = hf_turn(hf_models["target"], k, turn.prompt_ids,
                                             args.max_new, tallies[f"hf {k}"],
                                             hf_models.get("draft"))
                ref = out["lsrt none"]
                turn_ok = True
                for c in args.configs:
                    got = out[f"lsrt {c}"]
                    if got != ref:
                        ok = turn_ok = False
                        at = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b),
                                  min(len(got), len(ref)))
                        print(f"MISMATCH {Path(path).name} {trace.id} turn {turn.turn} lsrt {c}: "
                              f"differs from lsrt none at token {at} of {len(ref)} "
                              f"({got[at:at + 4]} vs {ref[at:at + 4]})", flush=True)
                if turn_ok:
                    for name, t in this_turn.items():
                        same_text[name].add(t)
                if "hf plain" in out:
                    compared_hf += 1
                    same_hf += out["hf plain"] == ref
                accepted = " ".join(f"{c} {t.emitted / t.steps:.2f}"
                                    for c, t in ((c, this_turn[f"lsrt {c}"])
                                                 for c in args.configs) if t.steps)
                print(f"  {trace.id} turn {turn.turn}: prompt {len(turn.prompt_ids)} tokens "
                      f"(reuse {turn.reuse}); accepted/step: {accepted or '-'}", flush=True)
        finally:
            for run in runs.values():
                run.close()
    title = f"{llm.name} on {Path(path).name} ({len(traces)} traces)"
    text = table(title, tallies)
    if not ok:
        matched = same_text["lsrt none"].turns
        text += "\n\n" + table(f"the same, on the {matched} of {tallies['lsrt none'].turns} turns "
                                f"where every lsrt config's output equals lsrt none's", same_text)
    if compared_hf:
        text += (f"\n\nlsrt none == transformers plain greedy on {same_hf}/{compared_hf} turns; "
                 f"all lsrt configs == lsrt none: {'yes' if ok else 'NO (MISMATCH)'}")
    return text, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    print("command: python " + shlex.join(sys.argv))
    print(f"load average at start: {os.getloadavg()}; torch threads {torch.get_num_threads()}; "
          f"device {args.device}, {dtype}")
    llm = LLM.load(args.model, RunnerConfig(kv_budget_mb=3072, device=args.device, dtype=dtype),
                   progress=False)
    llm.engine.eos_ids = ()  # benchmark only: every engine generates exactly --max-new tokens
    hf_models = {}
    if args.hf:
        hf_models["target"] = load_hf(llm.model_dir, args.device, dtype)
        if args.draft_model:
            from lsrt.runtime.models import resolve_model

            hf_models["draft"] = load_hf(resolve_model(args.draft_model, progress=False),
                                         args.device, dtype)
    warm_up(llm, hf_models, args)
    prof = cProfile.Profile() if args.profile else None
    all_ok = True
    t0 = time.perf_counter()
    for path in args.traces:
        text, ok = run_file(path, llm, hf_models, args, prof)
        all_ok &= ok
        print("\n" + text + "\n", flush=True)
    print(f"wall {time.perf_counter() - t0:.0f} s; load average at end: {os.getloadavg()}")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(f"\ncProfile of lsrt {args.profile} decoding (by tottime):\n{s.getvalue()}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
