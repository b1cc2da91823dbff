"""Beam selection in a LongSpec draft level: one top-w over all m x V scores vs a per-row top-w
then one over the m x w survivors (what `LongSpecDrafter._levels` does).

    python bench/gpu_topk.py [--vocab 8192] [--repeats 200]

CUDA, float32 scores; wall-clock medians (synchronised) of each way, per (m, w).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_graphs import wall_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, vocab {args.vocab}, median of {args.repeats}")
    print("| m | w | flat top-w us | per-row then top-w us | same set |")
    print("| --- | --- | --- | --- | --- |")
    for m, w in [(1, 2), (2, 2), (4, 4), (6, 5), (2, 4), (4, 2)]:
        x = torch.randn(m, args.vocab, device="cuda")

        def flat():
            return x.flatten().topk(w)

        def two_stage():
            s, c = x.topk(w, dim=-1)
            best, pick = s.flatten().topk(w)
            return best, c.flatten()[pick] + args.vocab * (pick // w)

        same = sorted(flat()[1].tolist()) == sorted(two_stage()[1].tolist())
        print(f"| {m} | {w} | {1e3 * wall_ms(flat, args.repeats):.1f} | "
              f"{1e3 * wall_ms(two_stage, args.repeats):.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
