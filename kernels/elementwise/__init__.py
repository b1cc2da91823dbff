"""The decoder's elementwise ops: RMSNorm (alone and after a residual add), RoPE on a fused q|k|v
projection with the K/V cache write, and SiLU-mul; backends chosen by name like the attention
kernels' ("torch" references, "triton", or "auto": Triton on a CUDA device, else torch).

On a GPU the decoder of a small model is bound by kernel launches: the references take 5-8
kernels per norm and per RoPE; each op here is one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from lsrt.runtime.errors import InvalidRequest


@dataclass(frozen=True, kw_only=True)
class ElementwiseOps:
    """One backend's entry points (signatures: `reference.py`)."""

    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope_qkv: Callable
    silu_mul: Callable


def get_elementwise_ops(name: str, device: str = "cpu") -> ElementwiseOps:
    """The ops called `name`: "torch", "triton" or "auto" (Triton for a CUDA `device` where
    Triton is installed; the CPU interpreter is for tests and never picked automatically)."""
    if name == "auto":
        on_gpu = str(device).startswith("cuda")
        name = "triton" if on_gpu and importlib.util.find_spec("triton") is not None else "torch"
    if name == "torch":
        from lsrt.kernels.elementwise import reference as mod
    elif name == "triton":
        from lsrt.kernels import triton_available

        if not triton_available():
            raise InvalidRequest("the triton elementwise ops need Triton and a CUDA device "
                                 "(or TRITON_INTERPRET=1)")
        from lsrt.kernels.elementwise import triton_ops as mod
    else:
        raise InvalidRequest(f"unknown elementwise ops {name!r}; expected torch, triton or auto")
    return ElementwiseOps(name=name, rms_norm=mod.rms_norm, add_rms_norm=mod.add_rms_norm,
                          rope_qkv=mod.rope_qkv, silu_mul=mod.silu_mul)


__all__ = ["ElementwiseOps", "get_elementwise_ops"]
