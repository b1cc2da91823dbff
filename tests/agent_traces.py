"""The agent traces (real transcripts) some tests replay: found by `traces_dir`, skipped with
the place looked at where a checkout has none beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsrt.runtime.training.data import TRACES_ENV, traces_dir


def agent_trace(name: str) -> Path:
    """The path of one trace file, or skip the calling test saying where it looked."""
    path = traces_dir() / name
    if not path.is_file():
        pytest.skip(f"agent trace {path} not present (set {TRACES_ENV} to the agent-traces folder)")
    return path
