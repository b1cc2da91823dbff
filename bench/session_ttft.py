"""Time to first token of a new turn: resident session vs re-prefilling the full history, and
the time to restore a session after a restart — same model, same history, same run.

    python bench/session_ttft.py [--model smollm2-135m] [--history 2048 8192] [--repeats 3]

History is real agent-trace text (mini-swe-agent). "resident": the session already holds the
history; the new turn (a short user message) prefills only its own tokens. "re-prefill": a
stateless run over the full token history (what a server without sessions does each turn).
"restore": a fresh SessionManager on the same Redis store answers its first turn: tokens are
read from Redis and the KV is rebuilt. Sessions live in an embedded redis-server in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from lsrt.runtime.training.data import traces_dir


def history_text(tokenizer, n_tokens: int) -> str:
    text = ""
    for line in (traces_dir() / "mini_swe_agent_gemini3pro.jsonl").read_text().splitlines():
        for m in json.loads(line)["messages"]:
            text += (m.get("content") or "") + "\n"
        if len(text) > n_tokens * 6:
            break
    ids = tokenizer.encode(text)[: n_tokens - 64]
    return tokenizer.decode(ids)


def first_token_s(manager, name: str, text: str) -> float:
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.types import Message, TurnRequest

    req = TurnRequest(messages=(Message(role="user", content=text),),
                      sampling=SamplingParams(max_tokens=1), draft="none")
    t0 = time.perf_counter()
    manager.run_turn(name, req, lambda e: None, threading.Event())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--history", type=int, nargs="+", default=[2048, 8000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from lsrt.runtime.llm import LLM
    from lsrt.runtime.runner import RunnerConfig
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.session_manager import SessionManager
    from lsrt.sessions.embedded import open_store

    llm = LLM.load(args.model, RunnerConfig(kv_budget_mb=3072), progress=False)
    print(f"model {args.model}, cpu float32, median of {args.repeats}; TTFT = prefill of the new "
          "tokens + one decode step")
    print("| history tokens | resident TTFT s | full re-prefill TTFT s | ratio | restore TTFT s |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        store, close = open_store(None, Path(tmp))
        try:
            for i, size in enumerate(args.history):
                if size > llm.context_limit - 256:
                    print(f"| {size} | skipped: context limit {llm.context_limit} | | | |")
                    continue
                manager = SessionManager(llm, store, default_draft="none")
                name = f"bench-{i}"
                manager.create_session(name, system=None, draft="none", ttl_s=None, metadata={})
                first_token_s(manager, name, history_text(llm.tokenizer, size))
                resident = [first_token_s(manager, name, f"Next step {k}: what now?")
                            for k in range(args.repeats)]
                tokens = store.get(name).tokens
                full = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    llm.generate(tokens + llm.tokenizer.encode("\nwhat now?"),
                                 SamplingParams(max_tokens=1))
                    full.append(time.perf_counter() - t0)
                manager.close()
                restored = SessionManager(llm, store, default_draft="none")
                restore_s = first_token_s(restored, name, "And after a restart?")
                restored.close()
                r, f = statistics.median(resident), statistics.median(full)
                print(f"| {len(tokens)} | {r:.3f} | {f:.3f} | {f / r:.1f}x | {restore_s:.3f} |",
                      flush=True)
        finally:
            close()


if __name__ == "__main__":
    main()
