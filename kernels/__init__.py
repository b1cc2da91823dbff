"""Kernels over the paged KV pool: hybrid (tree) attention, prefill attention and KV commit.

Backends are chosen by name: "torch" (plain-torch references; run anywhere), "triton" (the
Triton kernels; need a CUDA device, or TRITON_INTERPRET=1 for the slow CPU interpreter), or
"auto" (Triton where it can run, else torch). Nothing is imported from Triton until a Triton
backend is asked for.

Contract shared by every backend (layout of `lsrt.runtime.kv_cache`):

    paged_hybrid_attention(q [n, Hq, D], k_cache_layer [Hkv, slots, D], v_cache_layer,
        block_table [blocks], prefix_len, k_new [n, Hkv, D], v_new, mask [n, n] bool, scale,
        block_size) -> (out [n, Hq, D], lse [n, Hq] float32)
    paged_prefill_attention(same, without mask; causal over the new keys)
    kv_commit(k_cache [layers, Hkv, slots, D], v_cache, src_slots [m], dst_slots [m]) -> None
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """The kernel entry points of one backend (see the module docstring for the contract)."""

    name: str
    paged_hybrid_attention: Callable
    paged_prefill_attention: Callable
    kv_commit: Callable


def triton_available() -> bool:
    """Triton importable, and either a CUDA device or TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def _torch_backend() -> AttentionBackend:
    from lsrt.kernels.attention import reference
    from lsrt.kernels.kv_commit import kv_commit_reference

    return AttentionBackend(name="torch", paged_hybrid_attention=reference.paged_hybrid_attention,
                            paged_prefill_attention=reference.paged_prefill_attention,
                            kv_commit=kv_commit_reference)


def _triton_backend() -> AttentionBackend:
    from lsrt.runtime.errors import InvalidRequest

    if not triton_available():
        raise InvalidRequest("the triton attention backend needs Triton and a CUDA device "
                             "(or TRITON_INTERPRET=1)")
    from lsrt.kernels.attention import triton_prefill, triton_tree
    from lsrt.kernels.kv_commit import kv_commit_triton

    return AttentionBackend(name="triton",
                            paged_hybrid_attention=triton_tree.paged_hybrid_attention,
                            paged_prefill_attention=triton_prefill.paged_prefill_attention,
                            kv_commit=kv_commit_triton)


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend called `name`: "torch", "triton" or "auto"."""
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        return _triton_backend()
    if name == "auto":  # the CPU interpreter is for tests, never picked automatically
        import torch

        use_triton = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
        return _triton_backend() if use_triton else _torch_backend()
    from lsrt.runtime.errors import InvalidRequest

    raise InvalidRequest(f"unknown attention backend {name!r}; expected torch, triton or auto")


class _AbsentPackage(types.ModuleType):
    """What the top-level `kernels` is, from a checkout, where the PyPI package is not installed.

    transformers asks whether `kernels` is installed by finding it (the checkout's folder is
    found), then, with no distribution metadata, importing it: raising here broke every model
    import (transformers 5.17 on the GPU machine). This stub has no `__file__` and no
    `__version__`, which transformers reads as "not installed" (a namespace package / version
    "N/A"); any attribute asked of it says what the folder is.
    """

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"the PyPI package 'kernels' is not installed, so it has no {name!r} "
                             "(this checkout's kernels/ folder is lsrt.kernels)")


def _hand_over_to_the_pypi_package() -> None:
    """Replace this module in `sys.modules` by the PyPI package `kernels`, or by an
    `_AbsentPackage` stub where that package is not installed.

    This folder installs as `lsrt.kernels`. It is imported as the top-level `kernels` only when a
    checkout's root is on `sys.path` (`python -m ...` or `python -c` run from the checkout), and
    then it shadows the PyPI package `kernels`, which transformers (>= 5.25) imports. The import
    system returns whatever `sys.modules["kernels"]` holds once this file has run, so loading the
    real package there hands the import over.
    """
    root = Path(__file__).resolve().parents[1]
    path = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        stub = _AbsentPackage("kernels")
        stub.__file__ = None
        stub.__path__ = []
        stub.__spec__ = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        sys.modules["kernels"] = stub
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_to_the_pypi_package()

__all__ = ["AttentionBackend", "get_attention_backend", "triton_available"]
