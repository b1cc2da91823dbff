"""Suffix drafter: index vs a brute-force scan, rollback, proposals, global index, real traces."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from lsrt.runtime.spec.suffix import SuffixConfig, SuffixDrafter, SuffixIndex
from lsrt.runtime.spec.suffix_global import GlobalSuffixIndex
from lsrt.runtime.spec.tree import DraftTree

from agent_traces import agent_trace

BIG = 10**9  # a scan limit that makes the index report every occurrence


def brute_match(seq: list[int], max_match: int) -> tuple[int, list[int]]:
    """Longest suffix (<= max_match) ending earlier than the last token; its ends, newest first."""
    n = len(seq)
    for length in range(min(max_match, n - 1), 0, -1):
        suffix = seq[n - length:]
        ends = [e for e in range(n - 2, length - 2, -1) if seq[e - length + 1:e + 1] == suffix]
        if ends:
            return length, ends
    return 0, []


def index_match(idx: SuffixIndex) -> tuple[int, list[int]]:
    m, state = idx.longest_match()
    if m == 0:
        return 0, []
    n = len(idx.tokens)
    return m, idx.occurrences(idx.tokens[n - m:], state, n - 1, BIG)


def random_seq(rng: random.Random, n: int, alphabet: int) -> list[int]:
    return [rng.randrange(alphabet) for _ in range(n)]


def sam_state(idx: SuffixIndex) -> tuple:
    return (idx.tokens, idx._len, idx._link, idx._next, idx._first, idx._last, idx._grams)


@pytest.mark.parametrize("alphabet", [2, 3, 5])
def test_longest_match_and_occurrences_agree_with_brute_force(alphabet: int) -> None:
    rng = random.Random(alphabet)
    for trial in range(20):
        seq = random_seq(rng, rng.randrange(1, 120), alphabet)
        max_match = rng.choice([1, 3, 8, 32])
        idx = SuffixIndex(max_match=max_match, scan_limit=BIG)
        for i, tok in enumerate(seq):
            idx.extend([tok])
            assert index_match(idx) == brute_match(seq[:i + 1], max_match), (trial, i)


def test_truncate_then_reextend_equals_fresh_index() -> None:
    rng = random.Random(7)
    for _ in range(30):
        seq = random_seq(rng, 200, rng.choice([2, 4]))
        idx = SuffixIndex(seq, max_match=16, scan_limit=BIG)
        cut = rng.randrange(0, 200)
        idx.truncate(cut)
        fresh = SuffixIndex(seq[:cut], max_match=16, scan_limit=BIG)
        assert sam_state(idx) == sam_state(fresh)
        if cut:
            assert index_match(idx) == brute_match(seq[:cut], 16)
        tail = random_seq(rng, 50, 3)
        idx.extend(tail)
        fresh = SuffixIndex(seq[:cut] + tail, max_match=16, scan_limit=BIG)
        assert sam_state(idx) == sam_state(fresh)
        assert index_match(idx) == brute_match(seq[:cut] + tail, 16)
    with pytest.raises(ValueError):
        idx.truncate(len(idx) + 1)


def test_token_by_token_equals_all_at_once() -> None:
    seq = random_seq(random.Random(3), 500, 4)
    one = SuffixIndex(max_match=8)
    for tok in seq:
        one.extend([tok])
    chunks = SuffixIndex(max_match=8)
    for i in range(0, 500, 37):
        chunks.extend(seq[i:i + 37])
    assert sam_state(one) == sam_state(chunks) == sam_state(SuffixIndex(seq, max_match=8))


def test_small_scan_limit_still_returns_true_occurrences() -> None:
    rng = random.Random(11)
    seq = random_seq(rng, 3000, 2)
    idx = SuffixIndex(seq, max_match=6, scan_limit=2)
    m, state = idx.longest_match()
    ref_m, ref_ends = brute_match(seq, 6)
    ends = idx.occurrences(seq[-m:], state, len(seq) - 1, 8)
    assert m == ref_m and ends and set(ends) <= set(ref_ends)


def leaf_paths(tree: DraftTree) -> list[list[int]]:
    leaves = [i for i in range(1, len(tree)) if not tree.children[i]]
    return [[tree.tokens[j] for j in tree.path_to(leaf)[1:]] for leaf in leaves]


def test_proposals_come_from_the_past_only() -> None:
    """Every branch continues a real earlier occurrence and stops before the current position."""
    rng = random.Random(5)
    cfg = SuffixConfig(min_match=1, max_candidates=3, max_depth=6, max_nodes=12)
    for _ in range(200):
        seq = random_seq(rng, rng.randrange(2, 60), 3)
        drafter = SuffixDrafter(cfg)
        drafter.observe(seq)
        tree = drafter.propose(seq, max_nodes=rng.choice([2, 5, 40]))
        m, ends = brute_match(seq, cfg.max_match)
        if m < cfg.min_match:
            assert tree is None
            continue
        assert tree is not None and tree.tokens[0] == seq[-1]
        assert len(tree) <= 40 and len(tree) <= cfg.max_nodes and max(tree.depth) <= 6
        for path in leaf_paths(tree):
            assert any(seq[e + 1:e + 1 + len(path)] == path and e + len(path) <= len(seq) - 1
                       for e in ends), (seq, path)


def test_overlapping_repeat_stops_at_the_end_of_history() -> None:
    drafter = SuffixDrafter(SuffixConfig(min_match=1))
    tree = drafter.propose([7, 7, 7, 7], max_nodes=32)
    assert tree is not None and tree.tokens == [7, 7]  # only history[3] follows the match at 2


def test_tokens_observed_beyond_the_history_are_not_drafted() -> None:
    """The engine may propose from a shorter history than it observed (a cancelled tail)."""
    seq = [5, 6, 7, 5, 6, 7, 8, 7]  # the stale tail ends in the same token as the history
    drafter = SuffixDrafter(SuffixConfig(min_match=1))
    drafter.observe(seq)
    tree = drafter.propose(seq[:6], max_nodes=32)  # [5, 6, 7] at 0..2; 8, 7 are the future
    assert tree is not None and tree.tokens == [7, 5, 6, 7]
    assert drafter.propose(seq[:7], max_nodes=32) is None  # token 8 never occurred before


def test_repeated_block_is_proposed() -> None:
    block = list(range(100, 140))
    history = [1, 2, 3] + block + list(range(500, 520)) + block[:10]
    drafter = SuffixDrafter(SuffixConfig(max_depth=16))
    drafter.observe(history)
    tree = drafter.propose(history, max_nodes=32)
    depth = 2 + 10  # the default adaptive rule after a 10-token match (the filler breaks it)
    assert tree is not None and tree.tokens == [block[9]] + block[10:10 + depth]
    assert drafter.stats.matches == 1 and drafter.stats.mean_match_len == 10


def test_different_continuations_become_siblings() -> None:
    prefix = [10, 11, 12]
    history = prefix + [30, 31] + [90] + prefix + [30, 32] + [91] + prefix + [20, 21] + [92] + prefix
    drafter = SuffixDrafter(SuffixConfig(min_match=2, depth_base=2, depth_per_match=0))
    tree = drafter.propose(history, max_nodes=32)
    assert tree is not None
    first = sorted(tree.tokens[c] for c in tree.children[0])
    assert first == [20, 30]
    assert tree.tokens[tree.children[0][0]] == 30  # two votes for 30 beat the newest, 20
    node30 = tree.children[0][0]
    assert sorted(tree.tokens[c] for c in tree.children[node30]) == [31, 32]


def test_no_match_gives_none_and_config_is_checked() -> None:
    drafter = SuffixDrafter()
    assert drafter.propose(list(range(50)), max_nodes=32) is None
    assert drafter.propose([1, 2, 1, 2], max_nodes=1) is None
    assert drafter.export_state() is None
    with pytest.raises(ValueError):
        SuffixConfig(min_match=0)
    with pytest.raises(ValueError):
        SuffixConfig(max_match=4, min_match=5)
    with pytest.raises(ValueError):
        SuffixConfig(max_nodes=1)
    assert SuffixConfig(max_depth=16, depth_base=2, depth_per_match=1.0).depth(8) == 10


def test_rollback_matches_a_fresh_drafter_and_sync_follows_history() -> None:
    rng = random.Random(9)
    seq = random_seq(rng, 400, 4)
    drafter = SuffixDrafter()
    drafter.observe(seq)
    drafter.rollback(250)
    fresh = SuffixDrafter()
    fresh.observe(seq[:250])
    a, b = drafter.propose(seq[:250], 32), fresh.propose(seq[:250], 32)
    assert a is not None and (a.tokens, a.parents) == (b.tokens, b.parents)
    lazy = SuffixDrafter()  # never observed: propose catches up from the history argument
    c = lazy.propose(seq[:250], 32)
    assert (c.tokens, c.parents) == (a.tokens, a.parents)


def test_global_index_supplies_unseen_continuations() -> None:
    shared = GlobalSuffixIndex(max_tokens=1000)
    shared.add([1, 5, 6, 7, 8, 9, 10])
    shared.add([40, 41])
    drafter = SuffixDrafter(SuffixConfig(min_match=2), global_index=shared)
    history = [100, 101, 5, 6, 7]
    tree = drafter.propose(history, max_nodes=32)
    assert tree is not None and tree.tokens == [7, 8, 9, 10]  # stops at the document's end
    assert SuffixDrafter(SuffixConfig(min_match=2)).propose(history, 32) is None


def test_global_index_is_bounded_and_keeps_the_newest() -> None:
    shared = GlobalSuffixIndex(max_tokens=100)
    for d in range(50):
        shared.add([1000 + d, 2000 + d, 3000 + d, 4000 + d])
    assert len(shared) <= 100
    newest = shared.continuations([1049, 2049], lambda m: 4, 4)
    oldest = shared.continuations([1000, 2000], lambda m: 4, 4)
    assert newest == (2, [[3049, 4049]]) and oldest == (0, [])


def test_performance_smoke_100k_tokens() -> None:
    rng = random.Random(1)
    base = random_seq(rng, 20_000, 5000)
    history = [t for _ in range(5) for t in base]  # 100K tokens, heavily repeated
    start = time.process_time()  # CPU time: the machine is shared, wall time is noisy
    drafter = SuffixDrafter()
    drafter.observe(history)
    for i in range(1000):
        drafter.propose(history[:len(history) - i], max_nodes=32)  # rolls back one each time
    elapsed = time.process_time() - start
    print(f"100K extend + 1000 proposes: {elapsed:.2f} s CPU, stats {drafter.stats}")
    assert elapsed < 10 and drafter.stats.matches == 1000


def word_ids(text: str, vocab: dict[str, int]) -> list[int]:
    return [vocab.setdefault(w, len(vocab)) for w in re.findall(r"\w+|\s+|[^\w\s]", text)]


def test_real_agent_trace_acceptance() -> None:
    """Replay an agent trace, drafting at every assistant token; greedy chain-walk acceptance."""
    line = agent_trace("mini_swe_agent_gemini3pro.jsonl").read_text().splitlines()[0]
    vocab: dict[str, int] = {}
    turns = [(m["role"], word_ids(f"<{m['role']}>\n{m['content']}\n", vocab))
             for m in json.loads(line)["messages"]]
    drafter, history = SuffixDrafter(), []
    drafted = accepted = steps = 0
    for role, toks in turns:
        if role != "assistant":
            history += toks
            drafter.observe(toks)
            continue
        for tok_i, tok in enumerate(toks):
            tree = drafter.propose(history, max_nodes=32) if steps < 4000 else None
            if tree is not None:
                drafted += len(tree) - 1
                node, future = 0, toks[tok_i:]
                for want in future:
                    nxt = [c for c in tree.children[node] if tree.tokens[c] == want]
                    if not nxt:
                        break
                    node, accepted = nxt[0], accepted + 1
            steps += 1
            history.append(tok)
            drafter.observe([tok])
    rate = accepted / max(drafted, 1)
    print(f"trace: {steps} assistant tokens, drafted {drafted}, accepted {accepted} "
          f"({rate:.1%} of drafted, {accepted / steps:.2f} per step), stats {drafter.stats}")
    assert drafted > 0 and rate > 0
