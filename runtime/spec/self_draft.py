"""`self` drafter (MagicDec-style): the target drafts for itself over a sink+window KV view.

No extra weights. Each draft token is one target forward that attends only to the first `sink`
and the last `window` committed positions plus the tokens drafted so far, so it reads a constant
amount of KV — it pays off only where KV reads dominate the step (long context, GPU). Draft
tokens' K/V go to the sequence's scratch slots past `num_tokens`, which verification overwrites.
With a window covering the whole context the drafts are exactly the target's greedy tokens (the
oracle test: every draft must be accepted).
"""

from __future__ import annotations

import torch

from lsrt.runtime.attention import AttentionMeta
from lsrt.runtime.kv_cache import KVSequence
from lsrt.runtime.runner import ModelRunner
from lsrt.runtime.spec.drafter import DraftState
from lsrt.runtime.spec.tree import DraftTree


class SelfDrafter:
    name = "self"

    def __init__(self, runner: ModelRunner, *, sink: int = 4, window: int = 1020,
                 depth: int = 4) -> None:
        if sink < 0 or window < 1 or depth < 1:
            raise ValueError("self drafter needs sink >= 0, window >= 1, depth >= 1")
        self.runner = runner
        self.sink, self.window, self.depth = sink, window, depth
        self.seq: KVSequence | None = None

    def bind(self, seq: KVSequence) -> None:
        """The sequence whose committed KV the drafts read."""
        self.seq = seq

    def observe(self, tokens: list[int]) -> None:
        pass  # the state is the target's own KV

    def rollback(self, num_tokens: int) -> None:
        pass

    def export_state(self) -> DraftState | None:
        return None  # the target's KV is rebuilt from tokens; nothing of its own to save

    def import_state(self, state: DraftState) -> None:
        raise ValueError("the self drafter keeps no state of its own")

    def view_slots(self, seq: KVSequence, length: int) -> torch.Tensor:
        """`[<= sink + window]` slots of positions [0, sink) and [length - window, length)."""
        head = min(self.sink, length)
        tail_start = max(head, length - self.window)
        return torch.cat([seq.slots(0, head), seq.slots(tail_start, length)])

    @torch.inference_mode()
    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        seq, runner = self.seq, self.runner
        if seq is None:
            raise RuntimeError("SelfDrafter.propose before bind(seq)")
        start = seq.num_tokens
        depth = min(self.depth, max_nodes - 1, runner.cfg.context_limit - start - 1)
        if depth < 1:
            return None
        seq.reserve(start + depth)
        seq.make_writable(start)
        view = self.view_slots(seq, start)
        model, dev = runner.model, runner.config.device
        token, drafts = history[-1], []
        for i in range(depth):
            prefix = torch.cat([view, seq.slots(start, start + i)])
            meta = AttentionMeta(write_slots=seq.slots(start + i, start + i + 1),
                                 prefix_len=int(prefix.shape[0]), prefix_slots=prefix,
                                 kv_span=None, new_mask=None, scale=runner.scale)
            hidden = model(torch.tensor([token], device=dev), torch.tensor([start + i], device=dev),
                           runner.pool.k, runner.pool.v, meta, runner.backend)
            token = int(model.logits(hidden).argmax(-1))
            drafts.append(token)
        return DraftTree.chain(history[-1], drafts, source=self.name)
