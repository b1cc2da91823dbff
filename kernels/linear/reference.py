"""The reference linear: `torch.nn.functional.linear` (differentiable; cuBLAS on a GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x `[n, in]`, weight `[out, in]`, bias `[out]` -> `[n, out]`."""
    return F.linear(x, weight, bias)
