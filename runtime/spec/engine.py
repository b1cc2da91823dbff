"""The engine: one step = draft -> verify -> accept -> commit.

A sequence's committed KV covers `history[:-1]`; `history[-1]` is the *pending* token (the last
one emitted, or the last prompt token), which roots the next draft tree. Plain decoding is the
same loop with no drafter (a one-node tree), so speculative and plain output share every line
of stop handling and sampling.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lsrt.runtime.errors import Cancelled
from lsrt.runtime.kv_cache import KVSequence
from lsrt.runtime.runner import ModelRunner
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.budget import VerifyCosts
from lsrt.runtime.spec.drafter import Drafter
from lsrt.runtime.spec.tree import DraftTree
from lsrt.runtime.spec.verifier import verify
from lsrt.runtime.stopping import Stopper
from lsrt.runtime.tokenizer import Tokenizer


@dataclass
class SpecStats:
    steps: int = 0
    drafted_tokens: int = 0  # draft nodes sent to verification (root excluded)
    accepted_tokens: int = 0  # draft tokens accepted (bonus tokens excluded)
    emitted_tokens: int = 0  # accepted + bonus, after stop/length cuts

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens emitted per target forward, bonus included (1.0 for plain decoding)."""
        return self.emitted_tokens / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens,
                "mean_accepted_per_step": round(self.mean_accepted_per_step, 4)}


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length
    stats: SpecStats = field(default_factory=SpecStats)
    decode_s: float = 0.0


class Engine:
    """`cost_aware`: hand drafters that take one (`price` attribute) the price of a tree node
    from the verifies timed so far, so that they verify only nodes that pay for themselves
    (`budget.py`); off, every proposal gets the full node budget."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, eos_ids: tuple[int, ...],
                 max_tree_nodes: int = 16, *, cost_aware: bool = False) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_tree_nodes = max_tree_nodes
        self.cost_aware = cost_aware
        self.verify_costs = VerifyCosts()

    def step(self, seq: KVSequence, history: list[int], drafter: Drafter | None,
             params: SamplingParams, gen: torch.Generator | None, max_depth: int,
             tree_nodes: int | None = None) -> tuple[list[int], int]:
        """One speculative step; returns (emitted tokens, number of drafted nodes)."""
        nodes = tree_nodes or self.max_tree_nodes
        tree = drafter.propose(history, nodes) if drafter else None
        if tree is None or len(tree) == 1:
            tree = DraftTree.chain(history[-1], [])
        # Never verify past the context limit: the tree needs one slot per node.
        room = self.runner.cfg.context_limit - seq.num_tokens
        tree = tree.pruned(max_depth).truncated(room)
        t0 = time.perf_counter()
        logits = self.runner.verify(seq, tree)  # [n, vocab]: the target at every node
        acc = verify(tree, logits, params, gen)  # reads the result back: timed to completion
        self.verify_costs.record(seq.num_tokens, len(tree), time.perf_counter() - t0)
        self.runner.commit(seq, acc.path)
        return [*acc.tokens, acc.bonus], len(tree) - 1

    def generate(self, seq: KVSequence, history: list[int], params: SamplingParams, *,
                 drafter: Drafter | None = None,
                 on_text: Callable[[str, list[int]], None] | None = None,
                 cancel: threading.Event | None = None,
                 tree_nodes: int | None = None) -> Generation:
        """Generate after `history` (extended in place with what is emitted); draft trees
        have at most `tree_nodes` nodes (default: the engine's `max_tree_nodes`).

        Precondition: `seq.num_tokens == len(history) - 1`. On return the same holds for the
        extended history. Raises `Cancelled` when `cancel` is set (the caller rolls back).
        """
        assert seq.num_tokens == len(history) - 1, "KV must cover all but the pending token"
        if drafter is not None and hasattr(drafter, "bind"):
            drafter.bind(seq)  # drafters that read the target's KV (self, longspec)
        gen = None if params.greedy else params.generator(self.runner.config.device)
        stopper = Stopper(params, self.tokenizer, self.eos_ids, context=history)
        stats = SpecStats()
        priced = self.cost_aware and drafter is not None and hasattr(drafter, "price")
        if not priced and hasattr(drafter, "price"):
            drafter.price = None  # not one left by another (cost-aware) engine
        t0 = time.perf_counter()
        while stopper.finish_reason is None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
            remaining = params.max_tokens - len(stopper.token_ids)
            if seq.num_tokens >= self.runner.cfg.context_limit:
                stopper.finish_reason = "length"  # the context is full: stop, don't fail
                break
            if priced:
                drafter.price = self.verify_costs.price(
                    seq.num_tokens, time.perf_counter() - t0, stats.emitted_tokens)
            emitted, drafted = self.step(seq, history, drafter, params, gen, remaining - 1,
                                         tree_nodes)
            stats.steps += 1
            stats.drafted_tokens += drafted
            stats.accepted_tokens += len(emitted) - 1
            kept: list[int] = []
            text = ""
            for tok in emitted:
                kept.append(tok)
                text += stopper.push(tok)
                if stopper.finish_reason:
                    break
            history.extend(kept)
            stats.emitted_tokens += len(kept)
            if seq.num_tokens > len(history) - 1:  # a stop inside the accepted run
                seq.truncate(len(history) - 1)
            if drafter is not None:
                drafter.observe(kept)
            if on_text is not None and (text or kept):
                on_text(text, kept)
        return Generation(token_ids=stopper.token_ids, text=stopper.text,
                          finish_reason=stopper.finish_reason, stats=stats,
                          decode_s=time.perf_counter() - t0)
