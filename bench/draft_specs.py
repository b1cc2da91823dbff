"""Benchmark draft specs: a `--draft` spec optionally followed by `#W1,W2,...` (longspec tree
widths) or `#nomerge` (`auto` without its merged suffix + model arm), then optionally `@N`
(a draft-tree budget of N nodes instead of the engine's default), then optionally `!cost` or
`!full` (cost-aware trees on or off, `RunnerConfig.tree_budget`, instead of the device's
default)."""

from __future__ import annotations


def split_spec(spec: str):
    """`"longspec:DIR#2,2,2"` -> ("longspec:DIR", DraftOptions(widths=(2, 2, 2)))."""
    from lsrt.runtime.spec.drafters import DraftOptions

    draft, _, extra = spec.partition("#")
    merge = extra != "nomerge"
    widths = extra if merge else ""
    return draft, DraftOptions(widths=tuple(int(w) for w in widths.split(",")) if widths
                               else (), merge=merge)


def split_budget(spec: str) -> tuple[str, str | None]:
    """`"longspec@8!full"` -> ("longspec@8", "full"); no `!`: (spec, None)."""
    head, bang, budget = spec.rpartition("!")
    if not bang:
        return spec, None
    if budget not in ("cost", "full"):
        raise ValueError(f"bad tree budget in draft spec {spec!r}: expected !cost or !full")
    return head, budget


def split_nodes(spec: str) -> tuple[str, int | None]:
    """`"auto#nomerge@32"` -> ("auto#nomerge", 32); no `@N`: (spec, None)."""
    head, at, nodes = spec.rpartition("@")
    if not at:
        return spec, None
    if not nodes.isdigit() or int(nodes) < 1:
        raise ValueError(f"bad node budget in draft spec {spec!r}")
    return head, int(nodes)
