"""KV commit (torch and Triton) against a slot-by-slot Python copy."""

from __future__ import annotations

import pytest
import torch

from lsrt.kernels import get_attention_backend, triton_available
from lsrt.runtime.errors import InvalidRequest

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _accepted_path(gen: torch.Generator, start: int, span: int, m: int) -> tuple[torch.Tensor,
                                                                                    torch.Tensor]:
    """Sorted sources within [start, start + span) moving to start, start + 1, ... (overlapping)."""
    src = torch.randperm(span, generator=gen)[:m].sort().values + start
    dst = torch.arange(start, start + m)
    return src, dst


def _oracle(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    want = cache.clone()
    for s, d in zip(src.tolist(), dst.tolist()):  # in order, as the contract allows
        want[:, :, d] = want[:, :, s]
    return want


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="Triton cannot run here"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,span", [(1, 1), (1, 9), (5, 12), (37, 80), (70, 70)])
def test_kv_commit_matches_sequential_copy(backend: str, m: int, span: int) -> None:
    gen = torch.Generator().manual_seed(m * 100 + span)
    k = torch.randn(3, 2, 200, 64, generator=gen).to(DEVICE)
    v = torch.randn(3, 2, 200, 64, generator=gen).to(DEVICE)
    src, dst = _accepted_path(gen, 23, span, m)
    want_k, want_v = _oracle(k, src, dst), _oracle(v, src, dst)
    get_attention_backend(backend).kv_commit(k, v, src.to(DEVICE), dst.to(DEVICE))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_commit_adjacent_overlap_chain(backend: str) -> None:
    """src = dst + 1 everywhere: each write lands on the previous source (the hazard case)."""
    k = torch.arange(2 * 1 * 50 * 16, dtype=torch.float32).view(2, 1, 50, 16).to(DEVICE)
    v = -k
    src = torch.arange(11, 45).to(DEVICE)
    dst = src - 1
    want_k, want_v = _oracle(k, src.cpu(), dst.cpu()), _oracle(v, src.cpu(), dst.cpu())
    get_attention_backend(backend).kv_commit(k, v, src, dst)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_kv_commit_rejects_mismatched_slots() -> None:
    k = torch.zeros(1, 1, 8, 16)
    with pytest.raises(InvalidRequest):
        get_attention_backend("torch").kv_commit(k, k.clone(), torch.arange(3), torch.arange(2))


def test_unknown_backend_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        get_attention_backend("cuda-magic")
