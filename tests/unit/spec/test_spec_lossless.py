"""Greedy speculative output is token-identical to plain decoding, for every drafter.

Tiny random-weight models cover every family fast; SmolLM2-135M covers a real model over a long
agent-trace prompt, multi-turn continuation and stop conditions.
"""

from __future__ import annotations

import json

import pytest

from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.drafters import DraftOptions, make_drafter

from agent_traces import agent_trace
from tiny_models import copy_tokenizer, make_tiny_model, repetitive_prompt

DRAFTS = ["suffix", "self", "auto", "model:self-test"]


def run(llm: LLM, ids: list[int], draft: str, params: SamplingParams, opts=None):
    seq = llm.runner.new_sequence()
    try:
        llm.runner.prefill(seq, ids[:-1])
        drafter = None if draft == "none" else _drafter(llm, draft, opts)
        history = list(ids)
        if drafter is not None:
            drafter.observe(history)
        return llm.engine.generate(seq, history, params, drafter=drafter)
    finally:
        seq.release()


def _drafter(llm, draft, opts):
    if draft == "model:self-test":  # the target's own weights as a separate draft model
        from lsrt.runtime.spec.model_draft import ModelDrafter

        return ModelDrafter(llm.runner.model, name="self-test", sink=4,
                            window=(opts or DraftOptions()).window)
    return make_drafter(draft, llm, opts)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def tiny(request, tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp(f"spec-{request.param}")
    make_tiny_model(request.param, path)
    copy_tokenizer(smollm2_dir, path)
    return LLM(path, RunnerConfig(kv_budget_mb=16, prefill_chunk=64, block_size=8,
                                   tree_budget="full"))


@pytest.mark.parametrize("draft", DRAFTS)
def test_tiny_greedy_identical(tiny, draft):
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 300, seed=5)
    params = SamplingParams(max_tokens=40)
    plain = run(tiny, ids, "none", params)
    spec = run(tiny, ids, draft, params, DraftOptions(window=64, depth=3))
    assert spec.token_ids == plain.token_ids
    assert spec.finish_reason == plain.finish_reason
    assert spec.stats.steps <= plain.stats.steps


def test_self_oracle_accepts_everything(tiny):
    """A self-draft whose window covers the whole context is the target: all accepted."""
    ids = repetitive_prompt(tiny.runner.cfg.vocab_size, 200, seed=9)
    gen = run(tiny, ids, "self", SamplingParams(max_tokens=41),
              DraftOptions(window=4096, depth=4))
    assert gen.stats.drafted_tokens > 0
    assert gen.stats.accepted_tokens == gen.stats.drafted_tokens - _cut(gen)
    assert gen.stats.mean_accepted_per_step > 4.0


def _cut(gen) -> int:
    """Drafts of the last step that ran past max_tokens are pruned before verify."""
    return 0


def trace_prompt(llm: LLM, max_tokens: int) -> list[int]:
    line = agent_trace("swe_agent_demos.jsonl").read_text().splitlines()[0]
    msgs = json.loads(line)["messages"]
    ids: list[int] = []
    for m in msgs:
        ids += llm.tokenizer.encode(f"<|im_start|>{m['role'] if m['role'] != 'tool' else 'user'}"
                                    f"\n{m['content']}<|im_end|>\n")
        if len(ids) > max_tokens:
            break
    return ids[:max_tokens]


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["suffix", "auto", "self", "model:self-test", "longspec"])
def test_smollm2_long_prompt_multi_turn(smollm2, draft):
    ids = trace_prompt(smollm2, 3000)
    params = SamplingParams(max_tokens=24)
    for turn in range(2):
        plain = run(smollm2, ids, "none", params)
        # Narrow longspec trees keep this CPU test short; losslessness does not depend on width.
        spec = run(smollm2, ids, draft, params, DraftOptions(window=256, widths=(2, 2, 2)))
        assert spec.token_ids == plain.token_ids, (draft, turn)
        ids = ids + plain.token_ids + smollm2.tokenizer.encode("\n<|im_start|>user\nok<|im_end|>\n")


@pytest.mark.slow
def test_smollm2_stop_inside_accepted_run(smollm2):
    ids = trace_prompt(smollm2, 1500)
    base = run(smollm2, ids, "none", SamplingParams(max_tokens=30))
    stop_tok = base.token_ids[len(base.token_ids) // 2]
    for draft in ("none", "suffix"):
        got = run(smollm2, ids, draft, SamplingParams(max_tokens=30, stop_token_ids=(stop_tok,)))
        assert got.token_ids == base.token_ids[:base.token_ids.index(stop_tok) + 1]
    text_stop = base.text[len(base.text) // 2:][:4]
    if text_stop.strip():
        a = run(smollm2, ids, "none", SamplingParams(max_tokens=30, stop=(text_stop,)))
        b = run(smollm2, ids, "suffix", SamplingParams(max_tokens=30, stop=(text_stop,)))
        assert a.text == b.text and a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def short_ctx(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("short-ctx")
    make_tiny_model("qwen2", path, max_position=256)
    copy_tokenizer(smollm2_dir, path)
    return LLM(path, RunnerConfig(kv_budget_mb=4, prefill_chunk=64, block_size=8,
                                   tree_budget="full"))


@pytest.mark.parametrize("draft", ["none", "suffix", "self", "model:self-test"])
def test_generation_stops_at_the_context_limit(short_ctx, draft):
    """Drafting near the limit never overflows it; output ends with `length` at the limit."""
    limit = short_ctx.runner.cfg.context_limit
    ids = repetitive_prompt(short_ctx.runner.cfg.vocab_size, limit - 6, seed=11)
    plain = run(short_ctx, ids, "none", SamplingParams(max_tokens=50))
    got = run(short_ctx, ids, draft, SamplingParams(max_tokens=50),
              DraftOptions(window=64, depth=4))
    assert got.token_ids == plain.token_ids
    assert got.finish_reason == plain.finish_reason == "length"
    assert len(ids) - 1 + len(got.token_ids) == limit
