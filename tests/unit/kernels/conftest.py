"""Kernel tests: run Triton through its CPU interpreter where no CUDA device exists.

TRITON_INTERPRET must be set before Triton is first imported, hence here, at collection time.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
