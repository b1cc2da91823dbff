"""CPU linear over weights reordered once into oneDNN's blocked layout.

`PackedLinear` keeps one reordered copy per weight tensor, made on the weight's first use and
made again if the weight changes (its version counter moves) or is freed and its id reused.
The ops are torch's own oneDNN bindings (`torch.ops.mkldnn`), the ones torch.compile's CPU
backend uses for frozen linear layers.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch


@functools.cache
def works(dtype: torch.dtype) -> bool:
    """The reorder and the matmul exist in this torch build and agree with `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.linspace(-1, 1, 48, dtype=torch.float32).reshape(6, 8).to(dtype)
        x = torch.linspace(-2, 2, 24, dtype=torch.float32).reshape(3, 8).to(dtype)
        got = _matmul(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = torch.nn.functional.linear(x, w)
    return got.shape == want.shape and bool(torch.allclose(got.float(), want.float(),
                                                            atol=1e-2, rtol=1e-2))


def _matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear:
    """`linear(x, weight, bias)` with each weight reordered once (the copy is cached here)."""

    name = "onednn"

    def __init__(self) -> None:
        # id(weight) -> (weakref to it, its version when packed, the reordered copy)
        self._packed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x `[n, in]`, weight `[out, in]`, bias `[out]` -> `[n, out]`."""
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PackedLinear is for inference: its weights get no gradient")
        return _matmul(x.contiguous(), self._get(weight), bias)

    def _get(self, weight: torch.Tensor) -> torch.Tensor:
        key = id(weight)
        entry = self._packed.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        with self._lock:
            self._packed[key] = (weakref.ref(weight, functools.partial(self._forget, key)),
                                 weight._version, packed)
        return packed

    def _forget(self, key: int, dead: weakref.ref) -> None:
        """Drop a freed weight's copy (unless its id already holds a newer weight's)."""
        with self._lock:
            entry = self._packed.get(key)
            if entry is not None and entry[0] is dead:
                del self._packed[key]

    def prepare(self, weights: list[torch.Tensor]) -> None:
        """Reorder these weights now rather than on their first use."""
        for w in weights:
            self._get(w)

    @property
    def packed_bytes(self) -> int:
        """Memory held by the reordered copies."""
        return sum(p.numel() * p.element_size() for _, _, p in self._packed.values())
