"""SessionManager on the real SmolLM2 (float32, greedy) and a real redis-server.

The reference for every generated turn is a stateless run of the same model over the turn's
context as stored (`llm.generate(prompt ids)`, plain decoding, fresh KV): resident KV reuse,
eviction, forks, rollbacks and restarts must all be invisible in the output.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lsrt.runtime.errors import (
    Cancelled, ContextTooLong, FingerprintMismatch, InvalidRequest, ResourceExhausted,
    VersionConflict)
from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.session_manager import SessionManager
from lsrt.runtime.spec.drafter import DraftState
from lsrt.runtime.spec.drafters import make_drafter
from lsrt.runtime.spec.suffix import SuffixDrafter
from lsrt.runtime.types import Message, TurnDelta, TurnRequest, TurnStarted
from lsrt.sessions.blob import encode_draft_blob, entry_to_tensor, tensor_to_entry
from lsrt.sessions.store import SessionMeta

SP = SamplingParams(max_tokens=8)
SYSTEM = "You are a terse assistant. Answer in a few words."
WAIT_S = 120.0


def user(text: str) -> Message:
    return Message(role="user", content=text)


def run(manager, name, *messages, events=None, cancel=None, sampling=SP, **fields):
    events = [] if events is None else events
    request = TurnRequest(messages=tuple(messages), sampling=sampling, **fields)
    fin = manager.run_turn(name, request, events.append, cancel or threading.Event())
    return fin, events


def context_of(store, name, fin) -> list[int]:
    """The turn's prompt as stored: the session's tokens minus what the turn generated."""
    tokens = store.get(name).tokens
    assert tokens[len(tokens) - len(fin.token_ids):] == fin.token_ids
    return tokens[:len(tokens) - len(fin.token_ids)]


def reference(llm, store, name, fin, sampling=SP) -> list[int]:
    return llm.generate(context_of(store, name, fin), sampling).generation.token_ids


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def create(manager, name, system=SYSTEM, **fields):
    return manager.create_session(name, system=system, draft=fields.get("draft"),
                                  ttl_s=None, metadata=fields.get("metadata", {}))


QUESTIONS = ["What is 2+2?", "Name a color.", "What is the capital of France?",
             "Say hello.", None, "Summarise the tool output.", "Name a fruit.",
             "What is 3+3?", "Name an animal.", "Say goodbye."]


def test_ten_turns_prefill_only_new_tokens_and_match_stateless(manager, smollm2, session_store):
    tok = smollm2.tokenizer
    info = create(manager, "conv", metadata={"agent": "t"})
    assert (info.version, info.metadata, info.resident) == (1, {"agent": "t"}, True)
    convo = [{"role": "system", "content": SYSTEM}]
    completions = 0
    for q in QUESTIONS:
        before = session_store.get("conv")
        msg = Message(role="tool", content="a.txt b.txt") if q is None else user(q)
        fin, events = run(manager, "conv", msg, generate=q is not None)
        convo.append(msg.to_template())
        after = session_store.get("conv")
        started = events[0]
        assert isinstance(started, TurnStarted) and started.version == fin.version
        assert fin.version == after.meta.version == before.meta.version + 1
        assert after.tokens[:len(before.tokens)] == before.tokens  # append only
        prompt = after.tokens[:len(after.tokens) - len(fin.token_ids)]
        # The new tokens render the conversation exactly as the chat template does.
        assert tok.decode(prompt) == tok.render(convo, add_generation_prompt=q is not None)
        new = len(prompt) - len(before.tokens)
        assert (started.prompt_tokens, started.cached_tokens, started.recomputed_tokens) == (
            len(prompt), len(before.tokens) - 1, new)
        assert not fin.usage.rebuilt
        if q is None:
            assert (fin.finish_reason, fin.token_ids, len(events)) == ("appended", [], 1)
            assert after.turns[-1].role == "tool"
            continue
        deltas = [e for e in events if isinstance(e, TurnDelta)]
        assert sum((d.token_ids for d in deltas), []) == fin.token_ids
        assert "".join(d.text for d in deltas) == fin.text
        assert fin.token_ids == reference(smollm2, session_store, "conv", fin)
        completions += len(fin.token_ids)
        assert [t.role for t in after.turns[-2:]] == ["user", "assistant"]
        convo.append({"role": "assistant", "content": fin.text})
    info = manager.get_session("conv")
    assert info.version == 11 and info.usage["turns"] == 10 and info.resident
    assert info.usage["completion_tokens"] == completions


def test_new_manager_rebuilds_from_the_store(manager, smollm2, session_store):
    create(manager, "x")
    run(manager, "x", user("Name a fruit."))
    session_store.fork("x", "y")  # the same committed state under another name
    a, _ = run(manager, "x", user("And a vegetable?"))
    other = SessionManager(smollm2, session_store)  # a restarted server: nothing resident
    try:
        assert not other.get_session("y").resident
        b, _ = run(other, "y", user("And a vegetable?"))
    finally:
        other.close()
    assert not a.usage.rebuilt and b.usage.rebuilt
    assert (b.usage.cached_tokens, b.usage.recomputed_tokens) == (0, b.usage.prompt_tokens - 1)
    assert a.token_ids == b.token_ids == reference(smollm2, session_store, "y", b)
    assert session_store.get("x").tokens == session_store.get("y").tokens


def test_concurrent_turns_one_wins_or_waits(manager, session_store):
    create(manager, "c")
    gate, started, results = threading.Event(), threading.Event(), {}

    def held(event):  # the first turn stops inside emit() until the gate opens
        started.set()
        assert gate.wait(WAIT_S)

    def first():
        results["a"] = manager.run_turn("c", TurnRequest(messages=(user("Hi"),), sampling=SP),
                                        held, threading.Event())

    def second():
        results["b"], _ = run(manager, "c", user("Bye"), wait=True)

    t1 = threading.Thread(target=first)
    t1.start()
    assert started.wait(WAIT_S)
    events: list = []
    with pytest.raises(VersionConflict, match="busy"):
        run(manager, "c", user("Hello"), events=events)
    assert events == []
    t2 = threading.Thread(target=second)
    t2.start()
    gate.set()
    t1.join(WAIT_S)
    t2.join(WAIT_S)
    assert (results["a"].version, results["b"].version) == (2, 3)
    record = session_store.get("c")
    assert [(t.role, t.text) for t in record.turns[1:]] == [
        ("user", "Hi"), ("assistant", results["a"].text), ("user", "Bye"),
        ("assistant", results["b"].text)]


def test_cancel_rolls_back_to_the_last_commit(manager, smollm2, session_store):
    create(manager, "k")
    run(manager, "k", user("Say hello."))
    session_store.fork("k", "k2")  # the twin that never sees the cancelled turn
    before = session_store.get("k")
    used = smollm2.runner.pool.num_used_blocks
    cancel, deltas = threading.Event(), []

    def emit(event):
        if isinstance(event, TurnDelta):
            deltas.append(event)
            if len(deltas) >= 2:
                cancel.set()

    with pytest.raises(Cancelled):
        manager.run_turn("k", TurnRequest(messages=(user("Count from 1 to 100."),),
                                          sampling=SamplingParams(max_tokens=64)), emit, cancel)
    assert len(deltas) == 2
    after = session_store.get("k")
    assert (after.meta.version, after.tokens) == (before.meta.version, before.tokens)
    assert smollm2.runner.pool.num_used_blocks <= used
    a, _ = run(manager, "k", user("Name a color."))
    b, _ = run(manager, "k2", user("Name a color."))
    assert a.usage.cached_tokens == len(before.tokens) - 1 and not a.usage.rebuilt  # KV kept
    assert a.token_ids == b.token_ids
    assert session_store.get("k").tokens == session_store.get("k2").tokens


@pytest.fixture(scope="module")
def small_llm(smollm2_dir):
    """11 KV blocks (176 tokens): two short sessions do not fit at once."""
    return LLM(smollm2_dir, RunnerConfig(kv_budget_mb=8), name="smollm2-135m")


def test_eviction_under_a_small_kv_pool(small_llm, smollm2, session_store):
    assert small_llm.runner.pool.num_blocks == 11
    small = SessionManager(small_llm, session_store)
    try:
        for name in "abc":
            create(small, name)
        rebuilt, sp4 = [], SamplingParams(max_tokens=4)
        for q in ("Name a fruit.", "Name a color."):
            for name in "abc":
                fin, _ = run(small, name, user(q), sampling=sp4)
                rebuilt.append(fin.usage.rebuilt)
                assert fin.token_ids == reference(smollm2, session_store, name, fin, sp4)
        assert any(rebuilt)  # sessions were evicted and rebuilt from their tokens
        before = session_store.get("a")
        events: list = []
        with pytest.raises(ResourceExhausted):
            run(small, "a", user("word " * 300), events=events)
        assert events == [] and session_store.get("a").tokens == before.tokens
        assert session_store.get("a").meta.version == before.meta.version
        fin, _ = run(small, "a", user("Thanks."), sampling=sp4)  # still works afterwards
        assert fin.token_ids == reference(smollm2, session_store, "a", fin, sp4)
    finally:
        small.close()
    assert small_llm.runner.pool.num_used_blocks == 0


def test_fork_at_a_turn_shares_kv(smollm2, session_store):
    pool = smollm2.runner.pool
    manager = SessionManager(smollm2, session_store, kv_reserve_tokens=0)
    try:
        create(manager, "p", system=SYSTEM + " You like numbers and short answers.")
        run(manager, "p", user("Pick a number."))
        run(manager, "p", user("Double it."))
        parent = session_store.get("p")
        used = pool.num_used_blocks
        info = manager.fork_session("p", "ch", at_turn=2)  # system, user, assistant
        assert info.resident and info.parent == "p"
        assert info.num_tokens == parent.turns[2].end
        assert pool.num_used_blocks == used  # shared, not copied
        child, _ = run(manager, "ch", user("Triple it."))
        assert child.usage.cached_tokens == info.num_tokens - 1 and not child.usage.rebuilt
        child_len = len(session_store.get("ch").tokens)
        assert pool.num_used_blocks - used < -(-child_len // pool.block_size)
        assert child.token_ids == reference(smollm2, session_store, "ch", child)
        assert session_store.get("p").tokens == parent.tokens
        again, _ = run(manager, "p", user("Halve it."))
        assert again.usage.cached_tokens == len(parent.tokens) - 1
        assert again.token_ids == reference(smollm2, session_store, "p", again)
    finally:
        manager.close()


class StatefulDrafter(SuffixDrafter):
    """A suffix drafter that also persists its token history as a draft blob (the plain suffix
    drafter persists nothing), to exercise the blob restore path."""

    name = "stateful"

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log, self.history = log, []

    def observe(self, tokens):
        super().observe(tokens)
        self.history += tokens

    def rollback(self, num_tokens):
        super().rollback(num_tokens)
        del self.history[num_tokens:]

    def export_state(self):
        ids = torch.tensor(self.history, dtype=torch.int32)
        return DraftState(kind="stateful", num_tokens=len(self.history),
                          tensors={"tokens": tensor_to_entry(ids)})

    def import_state(self, state):
        if state.kind != "stateful":
            raise ValueError("not mine")
        self.observe(entry_to_tensor(state.tensors["tokens"]).tolist())
        self.log.append("import")


def test_draft_blob_restore_and_bad_blobs(smollm2, session_store):
    log: list[str] = []

    def factory(spec, llm):
        return StatefulDrafter(log) if spec == "stateful" else make_drafter(spec, llm)

    def fresh_manager():
        return SessionManager(smollm2, session_store, default_draft="stateful",
                              drafter_factory=factory)

    m = fresh_manager()
    create(m, "d")
    run(m, "d", user("Name a fruit."))
    m.close()
    fp = m.fingerprint
    assert session_store.get_draft("d") is not None  # put by the turn, for its version
    tokens = session_store.get("d").tokens
    state = DraftState(kind="stateful", num_tokens=len(tokens),
                       tensors={"tokens": tensor_to_entry(torch.tensor(tokens, dtype=torch.int32))})
    bad_blobs = [b"garbage bytes",
                 encode_draft_blob(state, session_version=5, fingerprint=fp),  # forks are at 0
                 encode_draft_blob(state, session_version=0, fingerprint="other:float32")]
    for i, blob in enumerate(bad_blobs):
        session_store.fork("d", f"d{i}")
        assert session_store.put_draft(f"d{i}", 0, blob)
    sp6 = SamplingParams(max_tokens=6)
    outputs = []
    for name in ["d", "d0", "d1", "d2"]:
        log.clear()
        m = fresh_manager()  # nothing resident: the drafter comes from the blob or the tokens
        try:
            fin, _ = run(m, name, user("And a color?"), sampling=sp6)
        finally:
            m.close()
        outputs.append(fin.token_ids)
        assert log == (["import"] if name == "d" else [])
    assert all(o == outputs[0] for o in outputs)
    assert outputs[0] == reference(smollm2, session_store, "d2", fin, sp6)


def test_context_limit_is_refused_with_counts(manager, smollm2, session_store):
    create(manager, "long")
    before = session_store.get("long")
    text = "hello " * smollm2.context_limit
    events: list = []
    with pytest.raises(ContextTooLong) as err:
        run(manager, "long", user(text), events=events)
    prompt = smollm2.tokenizer.apply_chat([{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": text}])
    assert (err.value.needed, err.value.limit) == (len(prompt) + SP.max_tokens,
                                                   smollm2.context_limit)
    assert events == [] and session_store.get("long") == before


def test_request_id_retry_is_replayed(manager, session_store):
    create(manager, "r")
    first, _ = run(manager, "r", user("Name a fruit."), request_id="req-1")
    generated = manager.stats()["tokens_generated"]
    events: list = []
    again, _ = run(manager, "r", user("Name a fruit."), request_id="req-1", events=events,
                   expected_version=first.version - 1)
    assert again.replayed and not first.replayed and events == []
    assert (again.text, again.token_ids, again.version, again.finish_reason) == (
        first.text, first.token_ids, first.version, first.finish_reason)
    assert again.usage == first.usage
    assert session_store.get_meta("r").version == first.version
    assert manager.stats()["tokens_generated"] == generated
    tool = Message(role="tool", content="ok", tool_call_id="t1")
    app, _ = run(manager, "r", tool, generate=False, request_id="req-2")
    rep, _ = run(manager, "r", tool, generate=False, request_id="req-2")
    assert rep.replayed and (rep.version, rep.finish_reason) == (app.version, "appended")
    assert session_store.get("r").turns[-1].meta["message"] == {"tool_call_id": "t1"}


def test_full_history_diffs_at_token_level(manager, smollm2, session_store):
    tok = smollm2.tokenizer
    create(manager, "h")
    a, _ = run(manager, "h", user("Name a fruit."))
    system = Message(role="system", content=SYSTEM)
    history = [system, user("Name a fruit."), Message(role="assistant", content=a.text),
               user("And a vegetable?")]
    for msgs in (history, [system, user("Name a tree.")]):  # extends, then edits turn 1
        before = session_store.get("h").tokens
        fin, events = run(manager, "h", *msgs, full_history=True)
        prompt = context_of(session_store, "h", fin)
        assert prompt == tok.apply_chat([m.to_template() for m in msgs])
        common = lcp(before, prompt)
        cached = min(common, len(before) - 1)
        assert (events[0].cached_tokens, events[0].recomputed_tokens) == (
            cached, len(prompt) - 1 - cached)
        assert fin.token_ids == reference(smollm2, session_store, "h", fin)
        turns = session_store.get("h").turns
        assert [t.text for t in turns] == [m.content for m in msgs] + [fin.text]
    assert cached < len(before) - 1  # the edit recomputed part of the stored tokens


def test_admission_errors(manager, session_store):
    for bad in ("", "has space", "x" * 201, "tab\there"):
        with pytest.raises(InvalidRequest):
            create(manager, bad)
    with pytest.raises(InvalidRequest):
        create(manager, "dr", draft="nonsense")
    assert not session_store.exists("dr")
    create(manager, "v", system=None)
    with pytest.raises(VersionConflict):
        run(manager, "v", user("hi"), expected_version=3)
    with pytest.raises(InvalidRequest):
        run(manager, "v", generate=False)
    session_store.create(SessionMeta.new("alien", fingerprint="0123456789abcdef:bfloat16"))
    with pytest.raises(FingerprintMismatch):
        run(manager, "alien", user("hi"))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run(manager, "v", user("hi"), cancel=cancel)
    assert session_store.get_meta("v").version == 0
    assert manager.delete_session("v") and not manager.delete_session("v")
    info = manager.info()
    assert info["fingerprint"] == manager.fingerprint and info["context_limit"] == 8192


def test_tool_call_parsing_and_names():
    from lsrt.runtime.session_render import check_session_name, parse_tool_calls

    text = ('ok <tool_call>\n{"name": "ls", "arguments": {"d": 1}}\n</tool_call> '
            '<tool_call>not json</tool_call><tool_call>{"name": "cat", "arguments": "x"}'
            '</tool_call>')
    calls = parse_tool_calls(text, "... <tool_call> ...")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("ls", '{"d": 1}'), ("cat", "x")]
    assert parse_tool_calls(text, "{{ messages }}") == ()  # the template defines no format
    assert check_session_name("a" * 200) == "a" * 200
    for bad in ("", "a" * 201, "a b", "a\x00", "line\n"):
        with pytest.raises(InvalidRequest):
            check_session_name(bad)
