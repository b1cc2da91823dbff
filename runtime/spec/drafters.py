"""Drafter specs (`--draft`) -> drafter objects.

    none            plain decoding
    suffix          model-free suffix matching over the sequence's own history
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.spec.drafter import Drafter

if TYPE_CHECKING:
    from lsrt.runtime.llm import LLM

DRAFT_KINDS = ("none", "suffix")


def make_drafter(spec: str, llm: "LLM") -> Drafter | None:
    """Build a fresh drafter for one sequence; `None` for plain decoding."""
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return None
    if kind == "suffix":
        from lsrt.runtime.spec.suffix import SuffixDrafter

        return SuffixDrafter()
    raise InvalidRequest(f"unknown drafter {spec!r}; expected one of {', '.join(DRAFT_KINDS)}")
