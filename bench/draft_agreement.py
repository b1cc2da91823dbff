"""How often each LongSpec draft's top token is the target's, by tree depth, teacher-forced.

    python bench/draft_agreement.py [--model smollm2-135m] [--device cpu] [--dtype float32]
        [--traces FILE ...] [--skip-traces 13] [--max-traces 3] [--seq-len 2048]
        [--windows 4] [--depth 6] --drafts longspec DIR ...

A quick reading of a draft between training and the acceptance benchmark (bench/spec_cpu.py):
no decoding, one target pass per window. Windows of the held-in traces' rendered text (the
evaluation block, traces 13-15 of each file, by default); the window is cut into segments of
`--depth` tokens as the tree levels of successive proposals: the query at depth d of a segment
sees the target's last-layer K/V and the feature (drafts that read it) up to the segment's
start, as at inference (`longspec_train.draft_hidden`). Printed per draft: the fraction of
positions whose draft argmax is the target's argmax at each depth, over all of them, and
KL(target || draft) in nats per token. `longspec` is the shipped draft for the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from lsrt.runtime.model import load_model
    from lsrt.runtime.models import resolve_model
    from lsrt.runtime.runner import DTYPES
    from lsrt.runtime.spec.longspec_ckpt import find_bundled_draft, load_draft
    from lsrt.runtime.tokenizer import Tokenizer
    from lsrt.runtime.training.data import render_trace, traces_dir
    from lsrt.runtime.training.longspec_train import draft_hidden

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--traces", nargs="*")
    p.add_argument("--skip-traces", type=int, default=13)
    p.add_argument("--max-traces", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4, help="windows per trace file")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--drafts", nargs="+", default=["longspec"])
    a = p.parse_args()

    md = resolve_model(a.model, progress=False)
    target = load_model(md, dtype=DTYPES[a.dtype], device=a.device)
    tok = Tokenizer(md)
    dev, dt = target.device, target.dtype
    drafts = {}
    for name in a.drafts:
        path = find_bundled_draft(target) if name == "longspec" else name
        if path is None:
            raise SystemExit(f"no shipped draft matches {a.model}")
        drafts[name] = load_draft(path, target.cfg).to(dev, dt).eval()
    files = a.traces or sorted(str(f) for f in Path(traces_dir()).glob("*.jsonl"))
    head = target.lm_head
    g = torch.Generator().manual_seed(0)
    print(f"{'file':<34} {'draft':<28} " + " ".join(f"d{d}" .rjust(6) for d in range(a.depth))
          + f" {'all':>6} {'KL':>6}")
    for f in files:
        rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        rows = rows[a.skip_traces:a.skip_traces + a.max_traces]
        stream = torch.tensor([t for r in rows for t in tok.encode(render_trace(r["messages"]))])
        hits = {n: torch.zeros(a.depth) for n in drafts}
        kls = {n: 0.0 for n in drafts}
        counts = torch.zeros(a.depth)
        for _ in range(a.windows):
            start = int(torch.randint(0, max(1, len(stream) - a.seq_len), (1,), generator=g))
            ids = stream[start:start + a.seq_len]
            n = ids.shape[0]
            pos = torch.arange(n)
            depth = pos % a.depth
            commit = pos - depth
            keep = torch.arange(n - 1)  # row t predicts token t + 1
            counts += torch.bincount(depth[keep], minlength=a.depth).float()
            with torch.inference_mode():
                for name, draft in drafts.items():
                    hidden, hid_t = draft_hidden(draft, target, ids, pos, commit, dev, dt)
                    lq = F.linear(hidden[:-1], head).float().log_softmax(-1)
                    lp = F.linear(hid_t[:-1].to(dt), head).float().log_softmax(-1)
                    same = (lq.argmax(-1) == lp.argmax(-1)).float().cpu()
                    hits[name] += torch.zeros(a.depth).index_add_(0, depth[keep], same)
                    kls[name] += float(F.kl_div(lq, lp, log_target=True,
                                                reduction="sum")) / (n - 1)
        for name in drafts:
            per = hits[name] / counts
            label = name if len(name) <= 28 else "…" + name[-27:]
            print(f"{Path(f).stem[:34]:<34} {label:<28} "
                  + " ".join(f"{x:6.3f}" for x in per.tolist())
                  + f" {float(hits[name].sum() / counts.sum()):6.3f}"
                  + f" {kls[name] / a.windows:6.3f}", flush=True)


if __name__ == "__main__":
    main()
