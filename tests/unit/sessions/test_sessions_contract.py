"""The SessionStore contract, run against RedisStore on a real redis-server and on the embedded
server. Expected states come from a plain-list reference model (`Ref`), not from the store."""

from __future__ import annotations

import random
import threading

import pytest

from lsrt.runtime.errors import (
    InvalidRequest,
    SessionExists,
    SessionNotFound,
    VersionConflict,
)
from lsrt.sessions.redis_store import RedisStore
from lsrt.sessions.store import SessionMeta, Turn

pytestmark = pytest.mark.redis


class Ref:
    """What a session must hold after a sequence of commits, computed with Python lists."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.turns: list[Turn] = []
        self.version = 0

    def commit(self, truncate_to: int, new_tokens: list[int], turns: list[Turn]) -> None:
        self.tokens = self.tokens[:truncate_to] + list(new_tokens)
        self.turns = [t for t in self.turns if t.end <= truncate_to] + list(turns)
        self.version += 1

    def find(self, request_id: str) -> Turn | None:
        hits = [t for t in self.turns if t.request_id == request_id]
        return hits[-1] if hits else None


def commit(store: RedisStore, name: str, ref: Ref, truncate_to: int, new: list[int],
           turns: list[Turn], **meta) -> int:  # fmt: skip
    version = store.commit_turn(name, expected_version=ref.version, truncate_to=truncate_to,
                                new_tokens=new, turns=turns, meta_updates=meta)  # fmt: skip
    ref.commit(truncate_to, new, turns)
    return version


def chat_turns(start: int, n_user: int, n_asst: int, rid: str) -> tuple[list[int], list[Turn]]:
    """A user turn and an assistant turn from one request, with made-up token ids."""
    tokens = [1000 + start + i for i in range(n_user + n_asst)]
    mid, end = start + n_user, start + n_user + n_asst
    return tokens, [
        Turn(role="user", start=start, end=mid, text=f"u{start}", request_id=rid),
        Turn(role="assistant", start=mid, end=end, text=f"a{start} é", request_id=rid,
             meta={"finish_reason": "stop", "usage": {"completion_tokens": n_asst}}),
    ]  # fmt: skip


def assert_matches(store: RedisStore, name: str, ref: Ref) -> None:
    rec = store.get(name)
    assert rec.tokens == ref.tokens
    assert rec.turns == ref.turns
    assert rec.meta.version == ref.version
    assert rec.meta.num_tokens == len(ref.tokens)


def test_create_get_exists_duplicate(store: RedisStore) -> None:
    assert not store.exists("s1")
    meta = SessionMeta.new("s1", fingerprint="fp", draft="suffix", ttl_s=None, extra={"k": [1]})
    store.create(meta)
    assert store.exists("s1")
    rec = store.get("s1")
    assert rec.meta == meta and rec.tokens == [] and rec.turns == []
    assert store.get_meta("s1") == meta
    with pytest.raises(SessionExists):
        store.create(SessionMeta.new("s1"))
    with pytest.raises(SessionNotFound):
        store.get("nope")
    with pytest.raises(SessionNotFound):
        store.get_meta("nope")
    with pytest.raises(InvalidRequest):
        store.create(SessionMeta.new("bad name*"))


def test_commit_right_and_stale_version(store: RedisStore) -> None:
    store.create(SessionMeta.new("s", fingerprint="fp"))
    ref = Ref()
    tokens, turns = chat_turns(0, 3, 4, "r1")
    assert commit(store, "s", ref, 0, tokens, turns, usage={"completion_tokens": 4}) == 1
    before = store.get("s")
    assert before.meta.usage == {"completion_tokens": 4} and before.meta.fingerprint == "fp"
    with pytest.raises(VersionConflict) as err:
        store.commit_turn("s", expected_version=0, truncate_to=0, new_tokens=[5], turns=[])
    assert "1" in str(err.value) and "0" in str(err.value)
    assert store.get("s") == before  # unchanged
    with pytest.raises(SessionNotFound):
        store.commit_turn("nope", expected_version=0, truncate_to=0, new_tokens=[], turns=[])
    with pytest.raises(InvalidRequest):  # past the end
        store.commit_turn("s", expected_version=1, truncate_to=8, new_tokens=[], turns=[])
    with pytest.raises(InvalidRequest):  # not an updatable field
        store.commit_turn("s", expected_version=1, truncate_to=7, new_tokens=[], turns=[],
                          meta_updates={"version": 9})  # fmt: skip
    assert store.get("s") == before


def test_truncate_append_and_turn_dropping(store: RedisStore) -> None:
    store.create(SessionMeta.new("s"))
    ref = Ref()
    for i, start in enumerate((0, 10, 20)):
        tokens, turns = chat_turns(start, 4, 6, f"r{i}")
        commit(store, "s", ref, start, tokens, turns)
    assert_matches(store, "s", ref)
    # cut inside the second request's assistant turn: that turn and everything after go
    new = [7, 8, 9]
    commit(store, "s", ref, 16, new, [Turn(role="assistant", start=14, end=19, request_id="r1")])
    assert_matches(store, "s", ref)
    assert [t.end for t in ref.turns] == [4, 10, 14, 19]
    commit(store, "s", ref, 0, [], [])  # roll back everything
    assert_matches(store, "s", ref)
    assert ref.tokens == [] and ref.turns == []


def test_random_commits_match_reference(store: RedisStore) -> None:
    rng = random.Random(1234)
    store.create(SessionMeta.new("rand"))
    ref = Ref()
    for step in range(40):
        cut = rng.randint(max(0, len(ref.tokens) - 15), len(ref.tokens))
        new = [rng.randrange(0, 2**31) for _ in range(rng.randint(0, 12))]
        turns, pos = [], cut
        while pos < cut + len(new) and rng.random() < 0.7:
            end = rng.randint(pos, cut + len(new))
            turns.append(Turn(role="user", start=pos, end=end, request_id=f"q{rng.randint(0, 9)}"))
            pos = end
        commit(store, "rand", ref, cut, new, turns)
        assert_matches(store, "rand", ref)
        for rid in ("q0", "q3", "q7", "none"):
            assert store.find_turn_by_request_id("rand", rid) == ref.find(rid), (step, rid)


def test_request_id_lookup(store: RedisStore) -> None:
    store.create(SessionMeta.new("s"))
    ref = Ref()
    tokens, turns = chat_turns(0, 2, 3, "req-a")
    commit(store, "s", ref, 0, tokens, turns)
    tokens, turns = chat_turns(5, 2, 3, "req-b")
    commit(store, "s", ref, 5, tokens, turns)
    assert store.find_turn_by_request_id("s", "req-a") == ref.turns[1]  # the last of the request
    assert store.find_turn_by_request_id("s", "req-b").role == "assistant"
    assert store.find_turn_by_request_id("s", "missing") is None
    assert store.find_turn_by_request_id("s", "") is None
    commit(store, "s", ref, 8, [], [])  # drops req-b's assistant turn only
    assert store.find_turn_by_request_id("s", "req-b") == ref.turns[2]  # back to its user turn
    commit(store, "s", ref, 5, [], [])
    assert store.find_turn_by_request_id("s", "req-b") is None
    with pytest.raises(SessionNotFound):
        store.find_turn_by_request_id("nope", "req-a")


def test_list_scans_with_prefix(store: RedisStore, raw) -> None:
    wanted = [f"agent-a-{i:03d}" for i in range(130)]
    others = [f"agent-b-{i}" for i in range(15)] + ["zeta"]
    for name in wanted + others:
        store.create(SessionMeta.new(name, draft="auto"))
    raw.set("lsrt:s:{not-a-session}:tokens", b"")  # only meta keys define sessions
    got = store.list(prefix="agent-a-", limit=1000)
    assert [m.name for m in got] == sorted(wanted)
    assert all(m.draft == "auto" and m.version == 0 for m in got)
    assert [m.name for m in store.list(prefix="agent-a-", limit=7)] == sorted(wanted)[:7]
    assert len(store.list(limit=10_000)) == len(wanted) + len(others)
    assert [m.name for m in store.list(prefix="agent-a-12")] == sorted(
        n for n in wanted if n.startswith("agent-a-12")
    )
    assert store.list(prefix="nothing") == []


def test_delete(store: RedisStore, raw) -> None:
    store.create(SessionMeta.new("s", ttl_s=100))
    ref = Ref()
    tokens, turns = chat_turns(0, 2, 2, "r")
    commit(store, "s", ref, 0, tokens, turns)
    assert store.put_draft("s", 1, b"blob")
    assert store.delete("s") is True
    assert not store.exists("s")
    assert raw.exists(*store.session_keys("s")) == 0
    assert store.delete("s") is False
    store.create(SessionMeta.new("s"))  # the name is free again, with no leftovers
    assert store.get("s").tokens == [] and store.get_draft("s") is None


def test_fork_at_turn(store: RedisStore) -> None:
    store.create(SessionMeta.new("src", fingerprint="fp", ttl_s=500, draft="suffix"))
    ref = Ref()
    for i, start in enumerate((0, 5, 10)):
        tokens, turns = chat_turns(start, 2, 3, f"r{i}")
        commit(store, "src", ref, start, tokens, turns)
    src_before = store.get("src")
    meta = store.fork("src", "dst", at_turn=2)  # the second request's user turn
    rec = store.get("dst")
    assert rec.meta == meta
    assert rec.turns == ref.turns[:3] and rec.tokens == ref.tokens[: ref.turns[2].end]
    assert (meta.parent, meta.parent_turn, meta.version) == ("src", 2, 0)
    assert (meta.fingerprint, meta.ttl_s, meta.draft, meta.num_tokens) == ("fp", 500, "suffix", 7)
    store.commit_turn("dst", expected_version=0, truncate_to=0, new_tokens=[1], turns=[])
    assert store.get("src") == src_before  # the fork is independent
    whole = store.fork("src", "all")
    assert store.get("all").tokens == ref.tokens and whole.parent_turn == len(ref.turns) - 1
    with pytest.raises(SessionExists):
        store.fork("src", "dst")
    with pytest.raises(SessionNotFound):
        store.fork("nope", "x")
    with pytest.raises(InvalidRequest):
        store.fork("src", "y", at_turn=len(ref.turns))
    assert not store.exists("x") and not store.exists("y")


def test_ttl_set_and_refreshed(store: RedisStore, raw) -> None:
    ttl_ms = 1000 * 1000
    store.create(SessionMeta.new("s", ttl_s=1000))
    meta_key, tokens_key, turns_key, reqs_key, draft_key = store.session_keys("s")
    assert 0 < raw.pttl(meta_key) <= ttl_ms
    ref = Ref()
    tokens, turns = chat_turns(0, 2, 2, "r")
    commit(store, "s", ref, 0, tokens, turns)
    assert store.put_draft("s", 1, b"blob")
    keys = (meta_key, tokens_key, turns_key, reqs_key, draft_key)
    assert all(0 < raw.pttl(k) <= ttl_ms for k in keys)
    for key in keys:
        raw.pexpire(key, 5000)
    commit(store, "s", ref, 4, [9], [])
    assert all(ttl_ms - 60_000 < raw.pttl(k) <= ttl_ms for k in keys)  # refreshed
    commit(store, "s", ref, 5, [], [], ttl_s=None)  # no expiry any more
    assert all(raw.pttl(k) == -1 for k in keys)
    store.create(SessionMeta.new("forever"))
    assert raw.pttl(store.session_keys("forever")[0]) == -1


def test_draft_version_mismatch_is_a_miss(store: RedisStore) -> None:
    assert store.get_draft("nope") is None
    assert store.put_draft("nope", 0, b"x") is False
    store.create(SessionMeta.new("s"))
    blob = bytes(range(256)) * 10
    assert store.put_draft("s", 0, blob)
    assert store.get_draft("s") == blob
    ref = Ref()
    commit(store, "s", ref, 0, [1, 2], [])
    assert store.get_draft("s") is None  # built at version 0, the session is at 1
    assert store.put_draft("s", 0, b"stale") is False
    assert store.get_draft("s") is None
    assert store.put_draft("s", 1, b"fresh")
    assert store.get_draft("s") == b"fresh"


def _race(stores: list[RedisStore], version: int) -> list[object]:
    """Each store commits token i at the same expected version at the same moment; returns the
    new version or the VersionConflict each one got."""
    barrier = threading.Barrier(len(stores))
    outcomes: list[object] = [None] * len(stores)

    def writer(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes[i] = stores[i].commit_turn(
                "race", expected_version=version, truncate_to=version, new_tokens=[i], turns=[]
            )
        except VersionConflict as err:
            outcomes[i] = err

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def test_concurrent_commits_exactly_one_wins(backend, store: RedisStore) -> None:
    store.create(SessionMeta.new("race"))
    other = RedisStore(backend.url)
    try:
        for version in range(15):
            outcomes = _race([store, other], version)
            wins = [i for i, o in enumerate(outcomes) if o == version + 1]
            assert len(wins) == 1, outcomes
            assert isinstance(outcomes[1 - wins[0]], VersionConflict)
            assert store.get("race").tokens[-1] == wins[0]
        assert store.get_meta("race").version == 15
        assert len(store.get("race").tokens) == 15
    finally:
        other.close()


def test_large_token_lists(store: RedisStore) -> None:
    rng = random.Random(7)
    store.create(SessionMeta.new("big"))
    ref = Ref()
    first = [rng.randrange(0, 200_000) for _ in range(100_000)]
    commit(store, "big", ref, 0, first, [Turn(role="tool", start=0, end=100_000)])
    second = [rng.randrange(0, 200_000) for _ in range(60_000)]
    commit(store, "big", ref, 50_000, second, [Turn(role="assistant", start=50_000, end=110_000)])
    assert_matches(store, "big", ref)


def test_committed_turns_survive_restart(backend, store: RedisStore) -> None:
    store.create(SessionMeta.new("durable", fingerprint="fp", ttl_s=3600))
    ref = Ref()
    for i, start in enumerate((0, 6)):
        tokens, turns = chat_turns(start, 3, 3, f"r{i}")
        commit(store, "durable", ref, start, tokens, turns)
    assert store.put_draft("durable", 2, b"draft")
    store.close()
    backend.restart()
    again = RedisStore(backend.url)
    try:
        assert_matches(again, "durable", ref)
        assert again.get_draft("durable") == b"draft"
        assert again.find_turn_by_request_id("durable", "r1") == ref.turns[-1]
    finally:
        again.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"new_tokens": [-1]},
        {"new_tokens": [2**31]},
        {"new_tokens": [1.5]},
        {"new_tokens": [1, 2], "turns": [Turn(role="user", start=0, end=3)]},  # past the end
        {"new_tokens": [1, 2], "turns": [Turn(role="a", start=0, end=2),
                                         Turn(role="b", start=0, end=1)]},  # fmt: skip
        {"meta_updates": {"extra": {"x": object()}}},
        {"meta_updates": {"ttl_s": 0}},
        {"turns": [Turn(role="user", start=0, end=0, meta={"x": object()})]},
    ],
)
def test_bad_commit_arguments_are_invalid_requests(store: RedisStore, kwargs) -> None:
    store.create(SessionMeta.new("s"))
    args = {"expected_version": 0, "truncate_to": 0, "new_tokens": [], "turns": []} | kwargs
    with pytest.raises(InvalidRequest):
        store.commit_turn("s", **args)
    assert store.get_meta("s").version == 0
