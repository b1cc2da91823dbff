"""Building the real session backend: load the model, open the store, wire the SessionManager.

`lsrt serve` and `lsrt chat` call `build_backend`; nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.session_manager import SessionManager
from lsrt.sessions.embedded import open_store


def default_draft(model: str) -> str:
    """The session drafter when none is asked for: suffix matching plus a drafter that keeps a
    constant-size cache — the 0.5B model for the Qwen 1.5B target, `self` otherwise."""
    if model == "qwen2.5-coder-1.5b":
        return "auto:qwen2.5-coder-0.5b"
    return "auto"


def build_backend(*, model: str = "smollm2-135m", device: str = "cpu", dtype: str | None = None,
                  draft: str | None = None, redis_url: str | None = None,
                  data_dir: str | Path | None = None, kv_budget_mb: int | None = None,
                  tree_budget: str | None = None, progress: bool = True
                  ) -> tuple[SessionManager, Callable[[], None]]:
    """(manager, closer): the model loaded on `device`, sessions in Redis at `redis_url` (else
    the embedded server under `data_dir`). Call closer() once to close the store."""
    fields: dict = {}
    if dtype is not None:
        fields["dtype"] = dtype
    if kv_budget_mb is not None:
        fields["kv_budget_mb"] = kv_budget_mb
    if tree_budget is not None:
        fields["tree_budget"] = tree_budget
    llm = LLM.load(model, RunnerConfig.for_device(device, **fields), progress=progress)
    store, closer = open_store(redis_url, Path(data_dir) if data_dir is not None else None)
    try:
        manager = SessionManager(llm, store, default_draft=draft or default_draft(model))
    except BaseException:
        closer()
        raise
    return manager, closer
