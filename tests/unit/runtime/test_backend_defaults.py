"""The server's default drafter per device and model (the choice measured best on each)."""

from __future__ import annotations

from lsrt.runtime.backend import default_draft


def test_default_draft_by_device_and_model() -> None:
    assert default_draft("smollm2-135m") == "auto"
    assert default_draft("smollm2-135m", "cpu") == "auto"
    assert default_draft("qwen2.5-coder-1.5b", "cpu") == "auto:qwen2.5-coder-0.5b"
    assert default_draft("smollm2-135m", "cuda") == "suffix"
    assert default_draft("qwen2.5-coder-1.5b", "cuda:0") == "suffix"
