"""Micro-benchmark of the suffix drafter: index speed and acceptance on the agent traces.

    python bench/suffix_index.py [--tokens 100000] [--traces DIR (default: traces_dir())]

Tokens for the traces are words/whitespace/punctuation mapped to ids (no model needed), so the
acceptance numbers show how repetitive the workload is, not what a real tokenizer would give.
Acceptance is a greedy chain walk: drafted tokens matching the actual next tokens, proposing
at every assistant token (one token committed per step, as in the worst case of an engine).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from lsrt.runtime.spec.suffix import SuffixConfig, SuffixDrafter, SuffixIndex
from lsrt.runtime.training.data import traces_dir


def bench_index(num_tokens: int) -> None:
    rng = random.Random(0)
    for name, seq in [("random vocab 32K", [rng.randrange(32000) for _ in range(num_tokens)]),
                      ("repeated 5K block", [rng.randrange(32000) for _ in range(5000)]
                       * (num_tokens // 5000)),
                      ("alphabet 4", [rng.randrange(4) for _ in range(num_tokens)])]:
        t0 = time.perf_counter()
        idx = SuffixIndex(seq)
        t1 = time.perf_counter()
        idx.truncate(len(seq) // 2)
        t2 = time.perf_counter()
        idx.extend(seq[len(seq) // 2:])
        drafter = SuffixDrafter()
        drafter.index = idx
        t3 = time.perf_counter()
        for _ in range(1000):
            drafter.propose(seq, 32)
        t4 = time.perf_counter()
        print(f"{name:18s} n={len(seq):7d}  extend {1e6 * (t1 - t0) / len(seq):5.2f} us/tok  "
              f"truncate half {t2 - t1:5.2f} s  propose {(t4 - t3) * 1e6 / 1000:7.1f} us/call")


def replay(messages: list[dict], cfg: SuffixConfig) -> tuple[int, int, int]:
    vocab: dict[str, int] = {}
    drafter = SuffixDrafter(cfg)
    history: list[int] = []
    drafted = accepted = steps = 0
    for m in messages:
        toks = [vocab.setdefault(w, len(vocab)) for w in
                re.findall(r"\w+|\s+|[^\w\s]", f"<{m['role']}>\n{m.get('content') or ''}\n")]
        for i, tok in enumerate(toks):
            if m["role"] == "assistant":
                tree = drafter.propose(history, 32)
                steps += 1
                if tree is not None:
                    drafted += len(tree) - 1
                    node = 0
                    for want in toks[i:]:
                        nxt = [c for c in tree.children[node] if tree.tokens[c] == want]
                        if not nxt:
                            break
                        node, accepted = nxt[0], accepted + 1
            history.append(tok)
            drafter.observe([tok])
    return steps, drafted, accepted


def bench_traces(folder: Path, max_traces: int) -> None:
    cfg = SuffixConfig()
    for path in sorted(folder.glob("*.jsonl")):
        steps = drafted = accepted = 0
        t0 = time.perf_counter()
        for line in path.read_text().splitlines()[:max_traces]:
            s, d, a = replay(json.loads(line)["messages"], cfg)
            steps, drafted, accepted = steps + s, drafted + d, accepted + a
        print(f"{path.name:34s} assistant tokens {steps:6d}  accepted/step "
              f"{accepted / max(steps, 1):4.2f}  accepted/drafted {accepted / max(drafted, 1):5.1%}"
              f"  ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--traces", type=Path, default=traces_dir())
    parser.add_argument("--max-traces", type=int, default=5)
    args = parser.parse_args()
    bench_index(args.tokens)
    if args.traces.is_dir():
        bench_traces(args.traces, args.max_traces)


if __name__ == "__main__":
    main()
