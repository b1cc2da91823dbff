"""Overhead of the gRPC service: the same turns in-process (SessionManager.run_turn) and through
a real server on loopback (SDK, streaming), alternated, in one run.

    python bench/service_overhead.py [--model smollm2-135m] [--turns 4] [--new 48] [--draft auto]

Decode tokens/s are timed from the first streamed token to the end of the turn on both paths;
TTFT from sending the turn to its first token. Each path gets its own sessions with identical
content, so both generate the same tokens (greedy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a Python function that parses a CSV line with quoted fields.",
    "Now add type hints and a docstring to it.",
    "Write three unit tests for that function.",
    "Explain one edge case the tests do not cover.",
    "Rewrite the function to stream from a file object.",
    "Summarise what we built in two sentences.",
]


def in_process_turn(manager, name: str, text: str, new: int, draft: str):
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.types import Message, TurnDelta, TurnRequest

    first: list[float] = []

    def emit(event) -> None:
        if isinstance(event, TurnDelta) and event.token_ids and not first:
            first.append(time.perf_counter())

    req = TurnRequest(messages=(Message(role="user", content=text),),
                      sampling=SamplingParams(max_tokens=new), draft=draft)
    t0 = time.perf_counter()
    fin = manager.run_turn(name, req, emit, threading.Event())
    t1 = time.perf_counter()
    return first[0] - t0, len(fin.token_ids), t1 - first[0], fin.token_ids


def grpc_turn(client, name: str, text: str, new: int, draft: str):
    from lsrt.clients.wire import Delta, Finished

    first: list[float] = []
    fin = None
    t0 = time.perf_counter()
    for event in client.session(name).send(text, stream=True, max_tokens=new, draft=draft):
        if isinstance(event, Delta) and event.token_ids and not first:
            first.append(time.perf_counter())
        if isinstance(event, Finished):
            fin = event
    t1 = time.perf_counter()
    return first[0] - t0, len(fin.token_ids), t1 - first[0], list(fin.token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--draft", default="auto")
    args = ap.parse_args()

    from lsrt.clients import Client
    from lsrt.runtime.llm import LLM
    from lsrt.runtime.server import start_in_thread
    from lsrt.runtime.session_manager import SessionManager
    from lsrt.sessions.embedded import open_store

    llm = LLM.load(args.model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        store, close = open_store(None, Path(tmp))
        manager = SessionManager(llm, store, default_draft=args.draft)
        server = start_in_thread(manager, "127.0.0.1:0")
        client = Client(f"127.0.0.1:{server.port}")
        try:
            for name in ("inproc", "grpc"):
                manager.create_session(name, system=None, draft=args.draft, ttl_s=None,
                                       metadata={})
            in_process_turn(manager, "inproc", "Hello.", 8, args.draft)  # warm-up, not recorded
            grpc_turn(client, "grpc", "Hello.", 8, args.draft)
            rows = {"in-process": [], "gRPC streaming": []}
            mismatches = 0
            for k in range(args.turns):
                text = PROMPTS[k % len(PROMPTS)]
                a = in_process_turn(manager, "inproc", text, args.new, args.draft)
                b = grpc_turn(client, "grpc", text, args.new, args.draft)
                mismatches += a[3] != b[3]
                rows["in-process"].append(a[:3])
                rows["gRPC streaming"].append(b[:3])
        finally:
            client.close() if hasattr(client, "close") else None
            server.stop(1.0)
            close()
    print(f"model {args.model}, cpu float32, draft {args.draft}, {args.turns} turns of "
          f"{args.new} tokens, medians over turns; token mismatches between paths: {mismatches}")
    print("| path | TTFT s | decode tok/s | vs in-process |")
    print("| --- | --- | --- | --- |")
    base = None
    for path, vals in rows.items():
        ttft = statistics.median(v[0] for v in vals)
        tps = statistics.median((v[1] - 1) / v[2] for v in vals if v[2] > 0)
        base = base or tps
        print(f"| {path} | {ttft:.3f} | {tps:.1f} | {tps / base:.3f}x |")


if __name__ == "__main__":
    main()
