"""Dense projections `x @ W.T + b`: the decoder's and the LongSpec draft's linear layers.

Backends by name, like the attention kernels and the elementwise ops: "torch" (`F.linear`, the
reference; differentiable; cuBLAS on a GPU), "onednn" (CPU: the weight reordered once into
oneDNN's blocked layout, then a oneDNN matmul per call), or "auto" (oneDNN for a CPU model in
float32 where torch ships it, else torch).

Why oneDNN on the CPU: `F.linear` re-lays out the weight on every call for small batches, so a
two-row product cost ~1.8x a one-row one, and a 16-node verification ~1.9x a decode step on
SmolLM2 (measured on a 2-core CPU; docs/BENCHMARKS.md). With the weight laid out once, a row
costs what it should. The price is memory: the reordered copy sits beside the weight, which
other readers (the LongSpec draft's initialisation, its head rows) still use.

Contract: `linear(x [n, in], weight [out, in], bias [out] | None) -> [n, out]` in x's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

Linear = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight.T + bias


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's prepacked matmul runs here for `dtype` (checked on a tiny product)."""
    from lsrt.kernels.linear import onednn

    return onednn.works(dtype)


def get_linear(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Linear:
    """The linear called `name` ("torch", "onednn" or "auto") for weights on `device`."""
    from lsrt.runtime.errors import InvalidRequest

    if name == "auto":
        on_cpu = str(device) == "cpu"
        name = "onednn" if on_cpu and dtype == torch.float32 and onednn_available(dtype) \
            else "torch"
    if name == "torch":
        from lsrt.kernels.linear.reference import linear

        return linear
    if name == "onednn":
        if str(device) != "cpu" or not onednn_available(dtype):
            raise InvalidRequest(f"the onednn linear needs a CPU model and a torch build with "
                                 f"oneDNN support for {dtype}")
        from lsrt.kernels.linear.onednn import PackedLinear

        return PackedLinear()
    raise InvalidRequest(f"unknown linear {name!r}; expected torch, onednn or auto")


def linear_name(linear: Linear) -> str:
    """"torch" or "onednn": which backend `linear` is (for reports)."""
    return getattr(linear, "name", "torch")


__all__ = ["Linear", "get_linear", "linear_name", "onednn_available"]
