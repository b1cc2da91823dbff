"""Benchmark draft specs: a `--draft` spec optionally followed by `#W1,W2,...` (longspec tree
widths) or `#nomerge` (`auto` without its merged suffix + model arm)."""

from __future__ import annotations


def split_spec(spec: str):
    """`"longspec:DIR#2,2,2"` -> ("longspec:DIR", DraftOptions(widths=(2, 2, 2)))."""
    from lsrt.runtime.spec.drafters import DraftOptions

    draft, _, extra = spec.partition("#")
    merge = extra != "nomerge"
    widths = extra if merge else ""
    return draft, DraftOptions(widths=tuple(int(w) for w in widths.split(",")) if widths
                               else (), merge=merge)
