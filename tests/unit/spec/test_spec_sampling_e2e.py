"""End-to-end sampling with speculation draws from the target's distribution.

A tiny model, temperature 1 with top-k 6: the exact distribution of the first two generated
tokens is computed from the model's own logits; samples from plain decoding and from
speculative decoding (the `self` drafter proposes 2-token chains, so token 2 is decided by the
rejection sampler) must both fit it (chi-square, p = 0.001), and a biased sampler must not.
"""

from __future__ import annotations

import math

import pytest
import torch

from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams, target_probs
from lsrt.runtime.spec.drafters import DraftOptions, make_drafter

from tiny_models import copy_tokenizer, make_tiny_model

N = 1500
PARAMS = dict(temperature=1.0, top_k=6, max_tokens=3)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict[int, int], probs: dict[int, float], n: int) -> tuple[float, int]:
    keys = [k for k, p in probs.items() if p * n >= 5]  # pool rare cells
    rare_p = 1 - sum(probs[k] for k in keys)
    rare_c = n - sum(counts.get(k, 0) for k in keys)
    stat = sum((counts.get(k, 0) - n * probs[k]) ** 2 / (n * probs[k]) for k in keys)
    df = len(keys) - 1
    if rare_p * n >= 5:
        stat += (rare_c - n * rare_p) ** 2 / (n * rare_p)
        df += 1
    return stat, df


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("sampling")
    make_tiny_model("llama", path, seed=3)
    copy_tokenizer(smollm2_dir, path)
    llm = LLM(path, RunnerConfig(kv_budget_mb=8, block_size=8, tree_budget="full"))
    llm.engine.eos_ids = ()  # sample freely over the whole tiny vocabulary
    return llm


def exact(llm: LLM, prompt: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    params = SamplingParams(**PARAMS)
    p1 = target_probs(llm.logits(prompt)[-1:], params)[0]
    first = {int(t): float(p1[t]) for t in torch.nonzero(p1).flatten()}
    second: dict[int, float] = {}
    for t1, w in first.items():
        p2 = target_probs(llm.logits(prompt + [t1])[-1:], params)[0]
        for t2 in torch.nonzero(p2).flatten().tolist():
            second[t2] = second.get(t2, 0.0) + w * float(p2[t2])
    return first, second


def sample(llm: LLM, prompt: list[int], draft: str) -> tuple[dict, dict, int]:
    c1: dict[int, int] = {}
    c2: dict[int, int] = {}
    drafted = 0
    for seed in range(N):
        seq = llm.runner.new_sequence()
        llm.runner.prefill(seq, prompt[:-1])
        drafter = make_drafter(draft, llm, DraftOptions(depth=2))
        gen = llm.engine.generate(seq, list(prompt), SamplingParams(**PARAMS, seed=seed),
                                  drafter=drafter)
        seq.release()
        drafted += gen.stats.drafted_tokens
        c1[gen.token_ids[0]] = c1.get(gen.token_ids[0], 0) + 1
        c2[gen.token_ids[1]] = c2.get(gen.token_ids[1], 0) + 1
    return c1, c2, drafted


@pytest.mark.slow
def test_speculative_sampling_matches_target(tiny):
    prompt = [5, 17, 33, 8, 41, 12, 5, 17]
    p1, p2 = exact(tiny, prompt)
    for draft in ("none", "self"):
        c1, c2, drafted = sample(tiny, prompt, draft)
        if draft == "self":
            assert drafted >= N  # token 2 really went through draft verification
        for counts, probs in ((c1, p1), (c2, p2)):
            stat, df = chi2(counts, probs, N)
            assert stat < chi2_critical(df), (draft, stat, df)
    # Power check: the same statistic rejects a sampler that is biased toward the argmax.
    top = max(p2, key=p2.get)
    biased = {k: v * (1.6 if k == top else 1.0) for k, v in p2.items()}
    norm = sum(biased.values())
    biased_counts = {k: round(N * v / norm) for k, v in biased.items()}
    stat, df = chi2(biased_counts, p2, N)
    assert stat > chi2_critical(df)
