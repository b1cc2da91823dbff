"""`lsrt gen-data`: the target's own continuations of held-in trace turns, written as a token
file that `lsrt train-draft --data FILE.pt@W` reads (tiny random target, real tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from lsrt.clients.cli import main as cli_main
from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.training.selfgen import generate_corpus, trace_turn_prompts

from tiny_models import copy_tokenizer, tiny_config


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, smollm2_dir):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("selfgen-target")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab=49152)).save_pretrained(path)
    copy_tokenizer(smollm2_dir, path)
    return path


@pytest.fixture
def traces(tmp_path):
    rows = [{"id": f"t{i}", "messages": [
        {"role": "user", "content": f"fix bug {i} " * 12},
        {"role": "assistant", "content": "looking"},
        {"role": "tool", "content": f"output {i} " * 12},
        {"role": "assistant", "content": "done"}]} for i in range(3)]
    path = tmp_path / "tr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompts_skip_held_out_traces_and_cover_each_turn(target_dir, traces):
    from lsrt.runtime.tokenizer import Tokenizer

    tok = Tokenizer(target_dir)
    prompts = list(trace_turn_prompts(tok, traces, holdout=1, max_prompt=4096, min_prompt=1))
    assert len(prompts) == 4  # traces t1, t2; two assistant turns each
    text = [tok.decode(p) for p in prompts]
    assert "bug 1" in text[0] and "output 1" not in text[0] and "output 1" in text[1]
    assert not any("bug 0" in t for t in text)
    short = list(trace_turn_prompts(tok, traces, holdout=1, max_prompt=8, min_prompt=1))
    assert [p for p in short] == [p[-8:] for p in prompts]


def test_excluded_traces_and_turn_cap(target_dir, tmp_path):
    """An evaluation block of held-in traces is skipped; a turn cap spreads over traces."""
    from lsrt.runtime.tokenizer import Tokenizer

    rows = [{"id": f"t{i}", "messages": [m for k in range(3) for m in (
        {"role": "user", "content": f"trace {i} step {k} " * 8},
        {"role": "assistant", "content": "ok"})]} for i in range(5)]
    path = tmp_path / "five.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = Tokenizer(target_dir)

    def traces_of(**kw) -> list[int]:
        got = [tok.decode(p) for p in trace_turn_prompts(tok, path, holdout=1, max_prompt=4096,
                                                          min_prompt=1, **kw)]
        return [next(i for i in range(5) if f"trace {i} " in t) for t in got]

    assert traces_of() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert traces_of(exclude=range(2, 4)) == [1, 1, 1, 4, 4, 4]
    assert traces_of(exclude=range(2, 4), turns_per_trace=1) == [1, 4]
    later = [tok.decode(p) for p in trace_turn_prompts(tok, path, holdout=4, max_prompt=4096,
                                                        min_prompt=1, skip_turns=1)]
    assert len(later) == 2 and "step 1 " in later[0] and "step 2 " not in later[0]


def test_generated_tokens_are_the_targets_greedy_output(target_dir, traces, tmp_path):
    llm = LLM(target_dir, RunnerConfig(kv_budget_mb=16))
    eos_ids = llm.engine.eos_ids
    tokens, summary = generate_corpus(llm, [traces], holdout=1, max_new=6, keep_context=5,
                                      max_docs=2, progress=False)
    assert summary["documents"] == 2 and summary["generated_tokens"] == 12
    assert eos_ids and llm.engine.eos_ids == eos_ids  # restored after generating
    eos = llm.tokenizer.eos_token_id
    prompts = list(trace_turn_prompts(llm.tokenizer, traces, holdout=1,
                                      max_prompt=llm.context_limit - 7))[:2]
    want: list[int] = []
    llm.engine.eos_ids = ()  # generate_corpus ignores EOS, as the benchmarks do
    for p in prompts:
        new = llm.generate(p, SamplingParams(max_tokens=6)).generation.token_ids
        want += p[-5:] + list(new) + [eos]
    assert tokens.tolist() == want


def test_cli_writes_a_token_file_train_draft_reads(target_dir, traces, tmp_path):
    out = tmp_path / "gen.pt"
    assert cli_main(["gen-data", "--target", str(target_dir), "--traces", str(traces),
                     "--out", str(out), "--holdout", "1", "--max-new", "4", "--max-docs", "3",
                     "--exclude-traces", "0:1", "--turns-per-trace", "2", "--no-progress"]) == 0
    tokens = torch.load(out, weights_only=True)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["documents"] == 3 and tokens.dim() == 1 and len(tokens) == meta["tokens"]
    assert meta["excluded_traces"] == [0, 1] and meta["turns_per_trace"] == 2
    run = tmp_path / "run"
    assert cli_main(["train-draft", "--target", str(target_dir), "--data", f"{out}@2",
                     "--out", str(run), "--steps", "1", "--seq-len", "16", "--window", "8",
                     "--draft-vocab", "64", "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["sources"][str(out)] == {"tokens": len(tokens), "documents": 3,
                                                "weight": 2.0}
    from safetensors.torch import load_file

    ids = load_file(str(run / "draft.safetensors"))["vocab_ids"]
    assert len(ids) == 64 and len(set(ids.tolist())) == 64
    assert int(ids[0]) == int(torch.bincount(tokens).argmax())
