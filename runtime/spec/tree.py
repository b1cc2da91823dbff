"""Draft token trees.

A tree is stored in topological order: node 0 is the *root*, the last emitted token whose KV is
not yet in the cache; every other node's parent comes before it. A chain is a tree whose parents
are 0, 1, 2, ... Node i sits at position `prefix_len + depth[i]`.

`draft_probs[i]`, when present, is the draft distribution that node i was *sampled* from (the
distribution at its parent, `[vocab]`); `None` means node i was chosen deterministically (suffix
match, greedy or top-k expansion), which the sampling verifier treats as a one-hot draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [n] token id of each node; tokens[0] is the root
    parents: list[int]  # [n] parent index; parents[0] == -1
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # [n] of [vocab] | None
    source: str = ""  # which drafter proposed it (for stats)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a DraftTree needs a root (parent -1) and one parent per token")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")
        if not self.draft_probs:
            self.draft_probs = [None] * len(self.tokens)
        self._depth: list[int] | None = None
        self._children: list[list[int]] | None = None

    @classmethod
    def chain(cls, root: int, drafts: list[int], source: str = "") -> "DraftTree":
        return cls(tokens=[root, *drafts], parents=list(range(-1, len(drafts))), source=source)

    @classmethod
    def from_paths(cls, root: int, paths: list[list[int]], source: str = "") -> "DraftTree":
        """Merge token paths (continuations of the root) into a trie, first path first."""
        tokens, parents = [root], [-1]
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for tok in path:
                key = (node, tok)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                node = index[key]
        return cls(tokens=tokens, parents=parents, source=source)

    @classmethod
    def merged(cls, trees: list["DraftTree"], max_nodes: int, source: str = "") -> "DraftTree":
        """The union of deterministic trees with one root, as a trie: each tree's nodes in
        order (parents first), shared prefixes stored once, at most `max_nodes` nodes (a node
        whose parent did not fit is dropped). Trees with draft probabilities cannot merge."""
        if not trees or any(t.tokens[0] != trees[0].tokens[0] for t in trees):
            raise ValueError("merged trees need one common root")
        if any(p is not None for t in trees for p in t.draft_probs):
            raise ValueError("only deterministic trees (no draft_probs) can be merged")
        tokens, parents = [trees[0].tokens[0]], [-1]
        index: dict[tuple[int, int], int] = {}
        for tree in trees:
            where = {0: 0}  # node of this tree -> merged node
            for i in range(1, len(tree)):
                parent = where.get(tree.parents[i])
                if parent is None:
                    continue
                key = (parent, tree.tokens[i])
                if key not in index:
                    if len(tokens) >= max_nodes:
                        continue
                    index[key] = len(tokens)
                    tokens.append(tree.tokens[i])
                    parents.append(parent)
                where[i] = index[key]
        return cls(tokens=tokens, parents=parents, source=source)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> list[int]:
        if self._depth is None:
            d = [0] * len(self.tokens)
            for i in range(1, len(self.tokens)):
                d[i] = d[self.parents[i]] + 1
            self._depth = d
        return self._depth

    @property
    def children(self) -> list[list[int]]:
        if self._children is None:
            ch: list[list[int]] = [[] for _ in self.tokens]
            for i in range(1, len(self.tokens)):
                ch[self.parents[i]].append(i)
            self._children = ch
        return self._children

    def ancestor_mask(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """`[n, n]` bool: mask[i, j] is True when node j is node i or one of its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros((n, n), dtype=torch.bool)
        for i in range(n):
            mask[i, i] = True
            if i:
                mask[i] |= mask[self.parents[i]]
        return mask.to(device)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def pruned(self, max_depth: int) -> "DraftTree":
        """Only the nodes at depth <= `max_depth` (the root is depth 0)."""
        keep = [i for i, d in enumerate(self.depth) if d <= max_depth]
        return self if len(keep) == len(self.tokens) else self.subtree(keep)

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The nodes `keep` (ascending, the root first, closed under ancestors), renumbered."""
        new_index = {old: new for new, old in enumerate(keep)}
        if keep[0] != 0 or any(self.parents[i] not in new_index for i in keep[1:]):
            raise ValueError("a subtree keeps the root and every kept node's parent")
        return DraftTree(tokens=[self.tokens[i] for i in keep],
                         parents=[new_index.get(self.parents[i], -1) for i in keep],
                         draft_probs=[self.draft_probs[i] for i in keep], source=self.source)

    def accepted_length(self, tokens: list[int]) -> int:
        """How many of `tokens` (an emitted run, after the root) follow one path of the tree
        from its root."""
        node = n = 0
        for tok in tokens:
            node = next((c for c in self.children[node] if self.tokens[c] == tok), -1)
            if node < 0:
                break
            n += 1
        return n

    def truncated(self, max_nodes: int) -> "DraftTree":
        """The first `max_nodes` nodes (still a valid tree: parents precede children)."""
        if len(self.tokens) <= max_nodes:
            return self
        return DraftTree(tokens=self.tokens[:max_nodes], parents=self.parents[:max_nodes],
                         draft_probs=self.draft_probs[:max_nodes], source=self.source)
