"""Drafter specs (`--draft`) -> drafter objects.

    none              plain decoding
    suffix            model-free suffix matching over the sequence's own history
    self              the target over a sink+window view of its own KV (MagicDec-style)
    model:NAME        a smaller model with the same tokenizer and a constant-size cache
    longspec[:PATH]   LongSpec's one-layer draft (sliding-window self-attention + cross-attention
                      into the target's last-layer KV); no PATH: initialised from the target
    auto              suffix when it matches (alone, or merged with the model drafter's tree),
                      else the model drafter, else plain decoding — chosen by measured
                      throughput. The model drafter: the shipped LongSpec draft when one was
                      trained for this target, else `self`; or explicitly auto:self,
                      auto:longspec[:PATH], auto:NAME (a draft model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.spec.drafter import Drafter

if TYPE_CHECKING:
    from lsrt.runtime.llm import LLM

DRAFT_KINDS = ("none", "suffix", "self", "model:NAME", "longspec[:PATH]", "auto", "auto:self",
               "auto:longspec[:PATH]", "auto:NAME")


@dataclass(frozen=True, kw_only=True)
class DraftOptions:
    sink: int = 4
    window: int = 1020
    depth: int = 4  # chain length of the self / model drafters
    widths: tuple[int, ...] = ()  # longspec tree: nodes per depth (empty: its default)
    merge: bool = True  # auto: may merge the model's tree into a suffix match

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1 or self.depth < 1:
            raise InvalidRequest("draft sink must be >= 0, window >= 1, depth >= 1")
        if any(w < 1 for w in self.widths):
            raise InvalidRequest(f"tree widths must be positive, got {list(self.widths)}")


def make_drafter(spec: str, llm: "LLM", options: DraftOptions | None = None) -> Drafter | None:
    """Build a fresh drafter for one sequence; `None` for plain decoding."""
    opts = options or DraftOptions()
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return None
    if kind == "suffix" and not arg:
        from lsrt.runtime.spec.suffix import SuffixDrafter

        return SuffixDrafter()
    if kind == "self" and not arg:
        from lsrt.runtime.spec.self_draft import SelfDrafter

        return SelfDrafter(llm.runner, sink=opts.sink, window=opts.window, depth=opts.depth)
    if kind == "model" and arg:
        return _model_drafter(arg, llm, opts)
    if kind == "longspec":
        return _longspec_drafter(arg, llm, opts)
    if kind == "auto":
        from lsrt.runtime.spec.auto import AutoDrafter
        from lsrt.runtime.spec.self_draft import SelfDrafter
        from lsrt.runtime.spec.suffix import SuffixDrafter

        inner, _, inner_arg = arg.partition(":")
        if not arg:  # the shipped LongSpec draft for this target if there is one, else self
            from lsrt.runtime.spec.longspec_ckpt import find_bundled_draft

            bundled = find_bundled_draft(llm.runner.model)  # looked up once, passed on
            inner, inner_arg = ("longspec", str(bundled)) if bundled else ("self", "")
        if inner == "longspec":
            model = _longspec_drafter(inner_arg, llm, opts)
        elif inner == "self" and not inner_arg:
            model = SelfDrafter(llm.runner, sink=opts.sink, window=opts.window, depth=opts.depth)
        else:
            model = _model_drafter(arg, llm, opts)
        # Uncounted warm-up steps per arm: on CUDA a drafter also captures its graphs then.
        warmup = 3 if llm.runner.model.device.type == "cuda" else 1
        return AutoDrafter(SuffixDrafter(), model, merge=opts.merge, warmup=warmup)
    raise InvalidRequest(f"unknown drafter {spec!r}; expected one of {', '.join(DRAFT_KINDS)}")


def _longspec_drafter(path: str, llm: "LLM", opts: DraftOptions) -> Drafter:
    from lsrt.runtime.spec.longspec import make_longspec_drafter

    extra = {"widths": opts.widths} if opts.widths else {}
    return make_longspec_drafter(llm.runner, path or None, workspaces=llm.longspec_workspaces,
                                 **extra)


def _model_drafter(name: str, llm: "LLM", opts: DraftOptions) -> Drafter:
    from lsrt.runtime.spec.model_draft import ModelDrafter

    model = llm.draft_model(name)
    if model.cfg.vocab_size > llm.runner.cfg.vocab_size + 1024 or \
            model.cfg.vocab_size < llm.runner.cfg.vocab_size - 1024:
        raise InvalidRequest(f"draft model {name} has another vocabulary "
                             f"({model.cfg.vocab_size} vs {llm.runner.cfg.vocab_size})")
    return ModelDrafter(model, name=name, sink=opts.sink, window=max(opts.window, 64),
                        depth=opts.depth)
