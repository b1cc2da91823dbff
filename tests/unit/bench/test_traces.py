"""The trace replay helper: turns split at assistant messages, and a resident token history
moved turn by turn (`advance`) equals a direct tokenisation of each turn's rendered history."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from agent_traces import agent_trace

BENCH = Path(__file__).resolve().parents[3] / "bench"


def _load_traces_module():
    spec = importlib.util.spec_from_file_location("lsrt_bench_traces", BENCH / "traces.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def traces():
    return _load_traces_module()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from lsrt.runtime.tokenizer import Tokenizer

    return Tokenizer(smollm2_dir)


def _raw_rows(name: str) -> list[dict]:
    path = agent_trace(name)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _direct_text(raw_messages: list[dict], upto: int) -> str:
    """Independent ChatML rendering (SmolLM2's template) with tool mapped to user, cut 6000."""
    parts = []
    for m in raw_messages[:upto]:
        role = "user" if m["role"] == "tool" else m["role"]
        parts.append(f"<|im_start|>{role}\n{(m.get('content') or '')[:6000]}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def test_turns_split_at_assistant_messages(traces, tokenizer):
    raw = _raw_rows("swe_agent_demos.jsonl")[0]
    trace = traces.load_traces(agent_trace("swe_agent_demos.jsonl"), limit=1)[0]
    assert trace.id == raw["id"]
    expected = [i for i, m in enumerate(raw["messages"]) if m["role"] == "assistant"][:4]
    turns = traces.replay_turns(tokenizer, trace, turns=4, max_prompt_tokens=100_000)
    assert [t.message_index for t in turns] == expected
    assert [t.turn for t in turns] == list(range(len(expected)))
    assert not traces.template_has_tool_role(tokenizer)  # SmolLM2: tool output goes as user
    for t in turns:
        # Nothing of the generated message itself, nor after it, is in the prompt.
        assert t.prompt_ids == tokenizer.encode(_direct_text(raw["messages"], t.message_index))
        assert "<|im_start|>tool" not in tokenizer.decode(t.prompt_ids)


def test_resident_history_equals_direct_tokenisation(traces, tokenizer):
    trace = traces.load_traces(agent_trace("swe_agent_demos.jsonl"), limit=1)[0]
    turns = traces.replay_turns(tokenizer, trace, turns=5, max_prompt_tokens=100_000)
    assert len(turns) == 5
    history: list[int] = []
    committed = 0
    fake_generation = tokenizer.encode("I will run ls now.")
    for t in turns:
        keep = traces.advance(history, t.prompt_ids, committed)
        assert history == tokenizer.encode(_direct_text(trace.messages, t.message_index))
        if t.turn:
            # Appending a turn must not re-prefill the shared history: only a few tokens at the
            # seam (the generated text that is replaced) may differ.
            assert keep >= turns[t.turn - 1].reuse
            assert t.reuse >= len(turns[t.turn - 1].prompt_ids) - 1
        committed = len(history) - 1 + len(fake_generation)  # KV after generating the turn
        history.extend(fake_generation)


def test_max_prompt_tokens_stops_the_trace(traces, tokenizer):
    trace = traces.load_traces(agent_trace("swe_agent_demos.jsonl"), limit=1)[0]
    full = traces.replay_turns(tokenizer, trace, turns=5, max_prompt_tokens=100_000)
    cap = len(full[2].prompt_ids) - 1
    cut = traces.replay_turns(tokenizer, trace, turns=5, max_prompt_tokens=cap)
    assert [t.prompt_ids for t in cut] == [t.prompt_ids for t in full[:2]]


def test_tool_calls_kept_as_text_without_tool_role(traces):
    trace = traces.Trace(id="x", messages=[
        {"role": "user", "content": "book"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}, "id": "c1"}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}])
    plain = traces.chat_messages(trace, tool_role=False, max_chars=100)
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    assert json.loads(plain[1]["content"]) == {"name": "f", "arguments": "{\"a\": 1}"}
    rich = traces.chat_messages(trace, tool_role=True, max_chars=100)
    assert rich[2]["role"] == "tool"
    assert rich[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
