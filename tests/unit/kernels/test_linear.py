"""The oneDNN prepacked linear against F.linear, its weight cache, and backend selection."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from lsrt.kernels.linear import get_linear, linear_name, onednn_available
from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.runner import RunnerConfig

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-5 * scale


@needs_onednn
@pytest.mark.parametrize("n,k,m", [(1, 576, 960), (2, 7, 3), (5, 100, 1), (16, 64, 97),
                                   (33, 1536, 576), (512, 96, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(n, k, m, bias):
    gen = torch.Generator().manual_seed(n * 7 + k + m)
    x, w = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    b = torch.randn(m, generator=gen) if bias else None
    lin = get_linear("onednn")
    _close(lin(x, w, b), F.linear(x, w, b))
    _close(lin(x, w, b), F.linear(x, w, b))  # the second call reads the cached copy


@needs_onednn
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=gen)
    x = torch.randn(4, 2, 32, generator=gen).transpose(0, 1)[0]  # rows 2 apart
    wide = torch.randn(6, 64, generator=gen)[:, :32]
    lin = get_linear("onednn")
    _close(lin(x, w), F.linear(x, w))
    _close(lin(wide, w), F.linear(wide, w))


@needs_onednn
def test_a_changed_weight_is_packed_again():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 16, generator=gen), torch.randn(8, 16, generator=gen)
    lin = get_linear("onednn")
    _close(lin(x, w), F.linear(x, w))
    w.mul_(-2.0)  # in place: same tensor object, new version
    _close(lin(x, w), F.linear(x, w))


@needs_onednn
def test_a_freed_weight_leaves_no_copy_behind():
    gen = torch.Generator().manual_seed(5)
    lin = get_linear("onednn")
    x = torch.randn(2, 16, generator=gen)
    for _ in range(3):
        w = torch.randn(8, 16, generator=gen)
        _close(lin(x, w), F.linear(x, w))  # a new weight, perhaps at a freed one's id
        del w
        gc.collect()
    assert lin.packed_bytes == 0


@needs_onednn
def test_refuses_to_train_through_packed_weights():
    w = torch.nn.Parameter(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="inference"):
        get_linear("onednn")(torch.randn(2, 8), w)
    with torch.no_grad():
        _close(get_linear("onednn")(torch.ones(2, 8), w), F.linear(torch.ones(2, 8), w))


def test_backend_selection():
    assert linear_name(get_linear("torch")) == "torch"
    assert linear_name(get_linear("auto", "cuda")) == "torch"
    assert linear_name(get_linear("auto", "cpu", torch.bfloat16)) == "torch"
    expected = "onednn" if onednn_available() else "torch"
    assert linear_name(get_linear("auto", "cpu", torch.float32)) == expected
    with pytest.raises(InvalidRequest, match="unknown linear"):
        get_linear("cublas")
    with pytest.raises(InvalidRequest, match="CPU"):
        get_linear("onednn", "cuda")
    with pytest.raises(ValueError, match="linear must be"):
        RunnerConfig(linear="mkl")
