"""The LongSpec draft shipped for SmolLM2 (runtime/drafts/smollm2-135m/): found by the target's
weights, used by `--draft longspec` with no path and by `auto`, lossless, and better than the
untrained draft it started from on a held-in agent-trace turn (real model, CPU, fp32)."""

from __future__ import annotations

import json

from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.drafters import make_drafter
from lsrt.runtime.spec.longspec import LongSpecDrafter
from lsrt.runtime.spec.longspec_layer import init_from_target
from lsrt.runtime.spec.longspec_ckpt import BUNDLED_DIR, find_bundled_draft, target_digest
from lsrt.runtime.training.selfgen import trace_turn_prompts

from agent_traces import agent_trace


def held_in_prompt(llm) -> list[int]:
    """The first assistant turn of the first trace `lsrt train-draft` did not hold out."""
    meta = json.loads((BUNDLED_DIR / "smollm2-135m" / "config.json").read_text())
    return next(trace_turn_prompts(llm.tokenizer, agent_trace("swe_agent_demos.jsonl"), holdout=meta["data"]["holdout"],
                                   max_prompt=1500, min_prompt=0, min_messages=2))


def test_found_by_weights_and_used_by_default(smollm2):
    path = find_bundled_draft(smollm2.runner.model)
    assert path == BUNDLED_DIR / "smollm2-135m"
    meta = json.loads((path / "config.json").read_text())
    assert meta["target_digest"] == target_digest(smollm2.runner.model)
    drafter = make_drafter("longspec", smollm2)
    assert isinstance(drafter, LongSpecDrafter) and len(drafter.head_ids) == 8192
    assert drafter.draft.feat_w is not None  # round 15: it reads the target's feature
    assert isinstance(make_drafter("auto", smollm2).model, LongSpecDrafter)
    assert not isinstance(make_drafter("auto:self", smollm2).model, LongSpecDrafter)


def test_lossless_and_better_than_untrained(smollm2):
    prompt = held_in_prompt(smollm2)
    params = SamplingParams(max_tokens=40)
    saved = smollm2.engine.eos_ids, smollm2.engine.cost_aware
    smollm2.engine.eos_ids = ()  # compare a fixed number of tokens
    try:
        smollm2.engine.cost_aware = True  # the CPU default: trees cut to what pays
        priced = [smollm2.generate(prompt, params, draft=d).generation.token_ids
                  for d in ("longspec", "auto")]
        smollm2.engine.cost_aware = False  # the draft's quality: whole 16-node trees
        plain = smollm2.generate(prompt, params).generation
        trained = smollm2.generate(prompt, params, draft="longspec").generation
        auto = smollm2.generate(prompt, params, draft="auto").generation
        seq = smollm2.runner.new_sequence()
        try:
            smollm2.runner.prefill(seq, prompt[:-1])
            untrained = LongSpecDrafter(smollm2.runner, init_from_target(smollm2.runner.model))
            untrained.observe(list(prompt))
            base = smollm2.engine.generate(seq, list(prompt), params, drafter=untrained)
        finally:
            seq.release()
    finally:
        smollm2.engine.eos_ids, smollm2.engine.cost_aware = saved
    assert trained.token_ids == plain.token_ids == auto.token_ids == base.token_ids
    assert priced == [plain.token_ids] * 2
    got, was = trained.stats.mean_accepted_per_step, base.stats.mean_accepted_per_step
    print(f"accepted/step: trained {got:.2f}, untrained {was:.2f}")
    assert got >= 2.0 and got > was + 0.5
