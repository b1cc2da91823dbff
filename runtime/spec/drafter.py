"""The interface every drafter implements.

The engine owns the token history of a sequence and tells the drafter about it:

    observe(tokens)       tokens were appended to the history (prompt, tool output, accepted
                          tokens, the bonus token); called in order, never with a gap
    rollback(num_tokens)  the history was cut back to its first `num_tokens` tokens
    propose(history, max_nodes) -> DraftTree | None
                          a tree rooted at history[-1] (the last emitted token, whose KV is not
                          committed yet); None when the drafter has nothing worth verifying

Drafters that keep a constant-size state (a sink+window KV cache) export it for persistence with
`export_state()` -> `DraftState | None` and take it back with `import_state(state)`; a state
whose header does not match is refused with `ValueError`, and the drafter rebuilds from tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lsrt.runtime.spec.tree import DraftTree


@dataclass
class DraftState:
    """A drafter's persistable state: header fields plus named tensors as raw bytes."""

    kind: str  # drafter kind, e.g. "self", "model:qwen2.5-coder-0.5b"
    num_tokens: int  # history length the state corresponds to
    header: dict = field(default_factory=dict)  # dtype, positions convention, sink, window, ...
    tensors: dict[str, tuple[str, list[int], bytes]] = field(default_factory=dict)
    # name -> (dtype name, shape, raw bytes)


class Drafter(Protocol):
    name: str

    def observe(self, tokens: list[int]) -> None: ...

    def rollback(self, num_tokens: int) -> None: ...

    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None: ...

    def export_state(self) -> DraftState | None: ...

    def import_state(self, state: DraftState) -> None: ...
