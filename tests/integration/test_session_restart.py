"""Crash safety: a server process killed mid-generation loses only its uncommitted turn.

A child Python process runs a SessionManager against a real redis-server, commits one turn,
starts a long one and is SIGKILLed once it has streamed tokens (it prints a marker; the test
waits for it, never sleeps). A new manager then finds exactly the committed turns and continues
as a stateless run would; a redis-server restart (AOF) keeps them too.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading

import pytest

from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.session_manager import SessionManager
from lsrt.runtime.types import Message, TurnRequest
from lsrt.sessions.redis_store import RedisStore

MARKER_TIMEOUT_S = 300.0  # the child loads torch and the model on a busy machine

CHILD = r"""
import sys, threading
from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.session_manager import SessionManager
from lsrt.runtime.types import Message, TurnDelta, TurnRequest
from lsrt.sessions.redis_store import RedisStore

model_dir, url, name = sys.argv[1:4]
manager = SessionManager(LLM(model_dir, RunnerConfig(kv_budget_mb=64)), RedisStore(url))
manager.create_session(name, system="You are terse.", draft=None, ttl_s=None, metadata={})

def turn(text, max_tokens, emit):
    request = TurnRequest(messages=(Message(role="user", content=text),),
                          sampling=SamplingParams(max_tokens=max_tokens))
    return manager.run_turn(name, request, emit, threading.Event())

fin = turn("Name a fruit.", 4, lambda event: None)
print("COMMITTED", fin.version, flush=True)

def emit(event):
    if isinstance(event, TurnDelta):
        print("DELTA", flush=True)

turn("Count from 1 to 500, one number per line.", 400, emit)
print("FINISHED", flush=True)
"""


def read_lines(stream, out: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        out.put(line.strip())
    out.put(None)


def wait_for_line(lines: queue.Queue, prefix: str) -> str:
    while True:
        line = lines.get(timeout=MARKER_TIMEOUT_S)
        if line is None:
            raise AssertionError(f"the child exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line


@pytest.fixture
def crash_redis(redis_helper, tmp_path):
    server = redis_helper.RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_sigkill_mid_generation_keeps_committed_turns(crash_redis, smollm2, smollm2_dir):
    name = "crashy"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(smollm2_dir), crash_redis.url,
                              name], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(child.stdout, lines), daemon=True).start()
    try:
        committed = int(wait_for_line(lines, "COMMITTED").split()[1])
        wait_for_line(lines, "DELTA")  # mid-generation of the long turn
    finally:
        child.kill()  # SIGKILL: no cleanup, no rollback, the turn never commits
        child.wait(timeout=60)
    assert child.returncode == -9

    store = RedisStore(crash_redis.url)
    try:
        record = store.get(name)
        assert record.meta.version == committed == 2
        assert [t.role for t in record.turns] == ["system", "user", "assistant"]
        assert record.turns[1].text == "Name a fruit." and record.turns[-1].end == len(
            record.tokens)
        manager = SessionManager(smollm2, store)
        try:
            sp = SamplingParams(max_tokens=8)
            request = TurnRequest(messages=(Message(role="user", content="And a color?"),),
                                  sampling=sp)
            fin = manager.run_turn(name, request, lambda event: None, threading.Event())
        finally:
            manager.close()
        assert fin.usage.rebuilt and fin.version == 3
        after = store.get(name)
        assert after.tokens[:len(record.tokens)] == record.tokens
        prompt = after.tokens[:len(after.tokens) - len(fin.token_ids)]
        assert fin.token_ids == smollm2.generate(prompt, sp).generation.token_ids
    finally:
        store.close()

    crash_redis.restart()  # AOF: every acknowledged commit survives
    with RedisStore(crash_redis.url) as store:
        again = store.get(name)
    assert (again.meta.version, again.tokens, again.turns) == (3, after.tokens, after.turns)
