"""Sampling parameters and the target distribution they define.

Plain sampling and the speculative verifier both draw from `target_probs(logits, params)`, so the
two see exactly the same distribution (temperature, then top-k, then top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsrt.runtime.errors import InvalidRequest


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh generator: seeded when `seed` is set, else from the global entropy source."""
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`[n, vocab]` logits -> `[n, vocab]` float32 probabilities after temperature/top-k/top-p.

    For greedy params this is the one-hot of the argmax, so greedy is a special case of sampling.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`[n, vocab]` probabilities -> `[n]` sampled ids (argmax when the rows are one-hot)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
