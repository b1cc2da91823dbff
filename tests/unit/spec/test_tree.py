"""DraftTree against hand-built trees: structure, masks, paths, truncation."""

from __future__ import annotations

import pytest
import torch

from lsrt.runtime.spec.tree import DraftTree


def _tree() -> DraftTree:
    #        0(r=9)
    #       /      \
    #    1(5)      2(7)
    #    /  \        \
    #  3(1) 4(2)     5(3)
    #   |
    #  6(4)
    return DraftTree(tokens=[9, 5, 7, 1, 2, 3, 4], parents=[-1, 0, 0, 1, 1, 2, 3])


def test_chain_structure() -> None:
    t = DraftTree.chain(11, [3, 4, 5], source="suffix")
    assert t.tokens == [11, 3, 4, 5]
    assert t.parents == [-1, 0, 1, 2]
    assert t.depth == [0, 1, 2, 3]
    assert t.children == [[1], [2], [3], []]
    assert t.draft_probs == [None] * 4
    assert t.source == "suffix"
    assert len(t) == 4


def test_chain_of_nothing_is_root_only() -> None:
    t = DraftTree.chain(7, [])
    assert t.tokens == [7] and t.parents == [-1] and t.depth == [0]
    assert t.ancestor_mask().tolist() == [[True]]


def test_from_paths_merges_shared_prefixes_first_path_first() -> None:
    t = DraftTree.from_paths(0, [[1, 2, 3], [1, 2, 4], [5], [1, 6]])
    # Expected trie, built by hand: 0 -> 1 -> 2 -> {3, 4}; 0 -> 5; 1 -> 6.
    assert t.tokens == [0, 1, 2, 3, 4, 5, 6]
    assert t.parents == [-1, 0, 1, 2, 2, 0, 1]
    assert t.depth == [0, 1, 2, 3, 3, 1, 2]
    assert t.children == [[1, 5], [2, 6], [3, 4], [], [], [], []]


def test_from_paths_duplicate_paths_and_empty_path() -> None:
    t = DraftTree.from_paths(3, [[1, 1], [1, 1], []])
    assert t.tokens == [3, 1, 1]
    assert t.parents == [-1, 0, 1]


def test_depth_and_children() -> None:
    t = _tree()
    assert t.depth == [0, 1, 1, 2, 2, 2, 3]
    assert t.children == [[1, 2], [3, 4], [5], [6], [], [], []]


def test_ancestor_mask_matches_paths() -> None:
    t = _tree()
    mask = t.ancestor_mask()
    assert mask.dtype == torch.bool and mask.shape == (7, 7)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    ancestors = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4], 5: [0, 2, 5],
                 6: [0, 1, 3, 6]}
    for i, js in ancestors.items():
        expected[i, js] = True
    assert torch.equal(mask, expected)
    # A chain's mask is the causal (lower-triangular) mask.
    chain = DraftTree.chain(0, [1, 2, 3, 4])
    assert torch.equal(chain.ancestor_mask(), torch.tril(torch.ones(5, 5, dtype=torch.bool)))


def test_path_to() -> None:
    t = _tree()
    assert t.path_to(0) == [0]
    assert t.path_to(6) == [0, 1, 3, 6]
    assert t.path_to(5) == [0, 2, 5]
    assert [t.tokens[i] for i in t.path_to(4)] == [9, 5, 2]


def test_truncated_keeps_prefix_and_probs() -> None:
    q = [None, torch.full((4,), 0.25), None, torch.tensor([1.0, 0, 0, 0]), None, None, None]
    t = DraftTree(tokens=[9, 5, 7, 1, 2, 3, 4], parents=[-1, 0, 0, 1, 1, 2, 3], draft_probs=q,
                  source="x")
    s = t.truncated(4)
    assert s.tokens == [9, 5, 7, 1] and s.parents == [-1, 0, 0, 1]
    assert s.draft_probs[0] is None and s.draft_probs[1] is q[1] and s.draft_probs[3] is q[3]
    assert s.source == "x"
    assert s.children == [[1, 2], [3], [], []]
    assert t.truncated(7) is t and t.truncated(100) is t


@pytest.mark.parametrize("tokens,parents", [
    ([1, 2], [0, 0]),          # root must have parent -1
    ([1, 2, 3], [-1, 0]),      # one parent per token
    ([1, 2, 3], [-1, 2, 0]),   # parent after child
    ([1, 2], [-1, 1]),         # self-parent
    ([], []),                  # empty
])
def test_invalid_trees_raise(tokens: list[int], parents: list[int]) -> None:
    with pytest.raises(ValueError):
        DraftTree(tokens=tokens, parents=parents)


def test_subtree_renumbers_and_refuses_orphans() -> None:
    t = _tree()
    sub = t.subtree([0, 1, 3, 6])
    assert sub.tokens == [9, 5, 1, 4] and sub.parents == [-1, 0, 1, 2]
    assert t.subtree(list(range(len(t)))).tokens == t.tokens
    with pytest.raises(ValueError, match="parent"):
        t.subtree([0, 3])  # node 3 without its parent 1
    with pytest.raises(ValueError, match="root"):
        t.subtree([1, 3])


def test_accepted_length_follows_one_path() -> None:
    t = _tree()
    assert t.accepted_length([5, 1, 4, 8]) == 3  # 1 -> 3 -> 6, then off the tree
    assert t.accepted_length([7, 3]) == 2
    assert t.accepted_length([5, 3]) == 1  # 3 hangs under 2, not under 1
    assert t.accepted_length([8]) == 0
    assert t.accepted_length([]) == 0
