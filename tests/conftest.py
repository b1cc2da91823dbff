"""Shared fixtures: the real bundled model (converted once per run) and its transformers twin."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    from lsrt.runtime.models import resolve_model

    return resolve_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    return LLM(smollm2_dir, RunnerConfig(kv_budget_mb=1024), name="smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
