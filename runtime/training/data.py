"""Training text that needs no download, tokenised with the target's tokenizer.

Sources (`--data` is a comma-separated list of these):

    stdlib     the Python standard library's .py files (`sysconfig.get_paths()["stdlib"]`)
    packages   installed packages' .py files (`sysconfig.get_paths()["purelib"]`)
    traces     the agent traces in /work/shared/data/agent-traces/*.jsonl, minus the held-out
               ones: the first `holdout` traces of every file (the benchmarks replay those)
    PATH       a file or directory (.py, .txt, .md, .jsonl traces)

Documents are shuffled with a fixed seed, tokenised, joined with EOS into one stream, and
training samples are windows of that stream drawn with the trainer's own generator.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

TRACES_DIR = Path("/work/shared/data/agent-traces")
TEXT_SUFFIXES = (".py", ".txt", ".md")


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
            roots.extend(sorted(TRACES_DIR.glob("*.jsonl")))
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
