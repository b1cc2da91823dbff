"""Training text that needs no download, tokenised with the target's tokenizer.

Sources (`--data` is a comma-separated list of these):

    stdlib     the Python standard library's .py files (`sysconfig.get_paths()["stdlib"]`)
    packages   installed packages' .py files (`sysconfig.get_paths()["purelib"]`)
    traces     the agent traces in /work/shared/data/agent-traces/*.jsonl, minus the held-out
               ones: the first `holdout` traces of every file (the benchmarks replay those)
    PATH       a file or directory (.py, .txt, .md, .jsonl traces), or a `.pt` file holding a
               1-D token tensor already joined with EOS (e.g. `lsrt gen-data`'s output)

A source may carry a sampling weight, `SOURCE@W` (default 1): each training window is drawn
from one source, chosen with probability proportional to its weight, so a small but relevant
source (the traces, the model's own generations) is not drowned by the standard library.
Within a source, documents are shuffled with a fixed seed, tokenised and joined with EOS into
one stream; windows are drawn with the trainer's own generator.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

TRACES_ENV = "LSRT_TRACES"
_TRACES_CANDIDATES = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "agent-traces",  # ../shared
    Path("/work/shared/data/agent-traces"),
)
TEXT_SUFFIXES = (".py", ".txt", ".md")


def traces_dir() -> Path:
    """Where the agent traces live: $LSRT_TRACES if set, else the first of ../shared (beside the
    checkout) and /work/shared that exists, else the former (callers report it missing)."""
    if os.environ.get(TRACES_ENV):
        return Path(os.environ[TRACES_ENV])
    return next((d for d in _TRACES_CANDIDATES if d.is_dir()), _TRACES_CANDIDATES[0])


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: tuple[str, ...] = ("stdlib", "traces")
    max_tokens: int = 2_000_000
    holdout: int = 3  # first N traces of every trace file are held out
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources or self.max_tokens < 2 or self.holdout < 0:
            raise ValueError("data needs sources, max_tokens >= 2 and holdout >= 0")


@dataclass
class Corpus:
    tokens: torch.Tensor  # [T] int64, documents joined by EOS
    documents: int
    held_out: list[str] = field(default_factory=list)  # trace ids never trained on


@dataclass
class Mixture:
    """Per-source token streams and their sampling weights."""

    parts: list[Corpus]
    weights: list[float]
    names: list[str]

    @property
    def tokens(self) -> int:
        return sum(int(c.tokens.shape[0]) for c in self.parts)

    def describe(self) -> dict:
        return {name: {"tokens": int(c.tokens.shape[0]), "documents": c.documents, "weight": w}
                for name, c, w in zip(self.names, self.parts, self.weights)}

    def sample(self, length: int, gen: torch.Generator) -> torch.Tensor:
        """A window of `length` tokens from a source drawn by weight."""
        weights = torch.tensor(self.weights, dtype=torch.float64)
        i = int(torch.multinomial(weights, 1, generator=gen)) if len(self.parts) > 1 else 0
        return sample_window(self.parts[i].tokens, length, gen)


def frequent_tokens(mixture: Mixture, vocab_size: int, k: int) -> torch.Tensor:
    """The `k` most frequent token ids `[k]`, most frequent first, counting each source's
    frequencies in proportion to its sampling weight (a draft vocabulary, see
    `LongSpecDraft.set_draft_vocab`)."""
    if not 0 < k <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {k}")
    freq = torch.zeros(vocab_size, dtype=torch.float64)
    for part, w in zip(mixture.parts, mixture.weights):
        counts = torch.bincount(part.tokens.clamp(0, vocab_size - 1), minlength=vocab_size)
        freq += w * counts[:vocab_size].double() / max(1, int(counts.sum()))
    # By frequency, ties by id (a stable sort keeps ids ascending among equals).
    return torch.sort(-freq, stable=True).indices[:k]


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """`"stdlib,traces@4"` -> [("stdlib", 1.0), ("traces", 4.0)]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.rpartition("@") if "@" in item else (item, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"data source {item!r}: weight {weight!r} is not a number") from None
        if not name or not w > 0:
            raise ValueError(f"data source {item!r}: need NAME or NAME@W with W > 0")
        out.append((name, w))
    if not out:
        raise ValueError("no data sources given")
    return out


def build_mixture(spec: str, cfg: DataConfig, encode: Callable[[str], list[int]],
                  eos_id: int) -> Mixture:
    """One `Corpus` per source of `spec`, each capped at `cfg.max_tokens`."""
    parts, weights, names = [], [], []
    for name, w in parse_sources(spec):
        if name.endswith(".pt"):
            tokens = load_token_file(name)
            side = Path(name).with_suffix(".json")  # `lsrt gen-data` writes one beside it
            docs = json.loads(side.read_text()).get("documents") if side.is_file() else None
            part = Corpus(tokens=tokens[:cfg.max_tokens],
                          documents=int(docs if docs is not None else (tokens == eos_id).sum()))
        else:
            part = build_corpus(DataConfig(sources=(name,), max_tokens=cfg.max_tokens,
                                           holdout=cfg.holdout, seed=cfg.seed), encode, eos_id)
        if part.tokens.shape[0] < 2:
            raise ValueError(f"data source {name!r} holds no text")
        parts.append(part)
        weights.append(w)
        names.append(name)
    return Mixture(parts=parts, weights=weights, names=names)


def load_token_file(path: str | Path) -> torch.Tensor:
    """A `.pt` file of one 1-D integer tensor (documents joined by EOS)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data source {str(path)!r}: no such file")
    tokens = torch.load(path, weights_only=True)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise ValueError(f"{path}: expected a 1-D integer token tensor")
    return tokens.long()


def render_trace(messages: list[dict]) -> str:
    """A plain rendering (tool output as `user`): robust across chat templates."""
    return "".join(f"<|{'user' if m.get('role') == 'tool' else m.get('role')}|>\n"
                   f"{m.get('content') or ''}\n" for m in messages)


def _trace_docs(path: Path, holdout: int) -> tuple[list[str], list[str]]:
    docs, held = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if i < holdout:
            held.append(row["id"])
        else:
            docs.append(render_trace(row["messages"]))
    return docs, held


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl")
                  and p.is_file() and "test" not in p.parts)


def collect_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(documents, held-out trace ids). Order is deterministic for a given seed."""
    roots: list[Path] = []
    for src in cfg.sources:
        if src == "stdlib":
            roots.append(Path(sysconfig.get_paths()["stdlib"]))
        elif src == "packages":
            roots.append(Path(sysconfig.get_paths()["purelib"]))
        elif src == "traces":
            folder = traces_dir()
            found = sorted(folder.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"data source 'traces': no *.jsonl in {folder} "
                                        f"(set {TRACES_ENV} to the agent-traces folder)")
            roots.extend(found)
        else:
            if not Path(src).exists():
                raise FileNotFoundError(f"data source {src!r}: no such file or directory")
            roots.append(Path(src))
    docs, held = [], []
    for root in roots:
        for f in _files(root):
            if f.suffix == ".jsonl":
                d, h = _trace_docs(f, cfg.holdout)
                docs.extend(d)
                held.extend(h)
            elif "site-packages" not in f.parts or root.name == "site-packages":
                docs.append(f.read_text(encoding="utf-8", errors="replace"))
    random.Random(cfg.seed).shuffle(docs)
    return docs, held


def build_corpus(cfg: DataConfig, encode: Callable[[str], list[int]], eos_id: int) -> Corpus:
    """Tokenise documents until `max_tokens`; each document is followed by `eos_id`."""
    docs, held = collect_documents(cfg)
    ids: list[int] = []
    used = 0
    for doc in docs:
        if len(ids) >= cfg.max_tokens:
            break
        ids.extend(encode(doc)[:cfg.max_tokens])
        ids.append(eos_id)
        used += 1
    return Corpus(tokens=torch.tensor(ids[:cfg.max_tokens], dtype=torch.long),
                  documents=used, held_out=held)


def sample_window(tokens: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """`[length]` consecutive tokens starting at a random offset (drawn from `gen`)."""
    if tokens.shape[0] < length:
        raise ValueError(f"corpus of {tokens.shape[0]} tokens is shorter than {length}")
    start = int(torch.randint(0, tokens.shape[0] - length + 1, (1,), generator=gen))
    return tokens[start:start + length]
