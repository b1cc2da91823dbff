"""Benchmark draft specs: a `--draft` spec optionally followed by `#W1,W2,...` (longspec tree
widths) or `#nomerge` (`auto` without its merged suffix + model arm), then optionally `@N`
(a draft-tree budget of N nodes instead of the engine's default)."""

from __future__ import annotations


def split_spec(spec: str):
    """`"longspec:DIR#2,2,2"` -> ("longspec:DIR", DraftOptions(widths=(2, 2, 2)))."""
    from lsrt.runtime.spec.drafters import DraftOptions

    draft, _, extra = spec.partition("#")
    merge = extra != "nomerge"
    widths = extra if merge else ""
    return draft, DraftOptions(widths=tuple(int(w) for w in widths.split(",")) if widths
                               else (), merge=merge)


def split_nodes(spec: str) -> tuple[str, int | None]:
    """`"auto#nomerge@32"` -> ("auto#nomerge", 32); no `@N`: (spec, None)."""
    head, at, nodes = spec.rpartition("@")
    if not at:
        return spec, None
    if not nodes.isdigit() or int(nodes) < 1:
        raise ValueError(f"bad node budget in draft spec {spec!r}")
    return head, int(nodes)
