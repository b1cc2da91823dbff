"""The tool-use agent loop (clients/agent_loop.py) end to end on the real SmolLM2 backend behind a
real gRPC server on 127.0.0.1, sessions in a real redis-server.

A 135M model does not call tools reliably, so the end-to-end test injects tool calls through the
loop's API (`run_tool_call`) and asserts on the protocol: the turns the server recorded, the tool
results appended as `tool` turns, the cached-token count growing. The tools themselves are
checked against the file system and Python directly.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lsrt.clients import Client, Finished, Timings, Usage
from lsrt.clients.agent_loop import AgentLoop, ToolCall, Tools, parse_tool_calls

_spec = importlib.util.spec_from_file_location(
    "lsrt_test_redis_server", Path(__file__).parents[1] / "redis_server.py"
)
redis_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(redis_server)

TIMEOUT_S = 120.0
_names = itertools.count()


def fresh(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="module")
def addr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from lsrt.runtime.server import serving

    redis = redis_server.RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        with serving(model="smollm2-135m", redis_url=redis.url, progress=False) as address:
            yield address
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def client(addr: str) -> Iterator[Client]:
    with Client(addr, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("the answer is 42\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    return tmp_path


# ---- tools and parsing (no server) ----


def test_tools_are_real(workdir: Path) -> None:
    tools = Tools(workdir, timeout_s=2.0)
    assert tools.call("read_file", {"path": "notes.txt"}) == (workdir / "notes.txt").read_text()
    expected = sorted(p.name + ("/" if p.is_dir() else "") for p in workdir.iterdir())
    assert tools.call("list_dir", {"path": "."}).splitlines() == expected
    assert tools.call("run_python", {"expr": "sum(range(10)) * 3"}) == repr(sum(range(10)) * 3)
    assert tools.call("run_python", {"expr": "print('hi')\nprint(2)"}) == "hi\n2"
    assert tools.call("run_python", {"expr": "1/0"}).startswith("error: ZeroDivisionError")
    assert tools.call("run_python", {"expr": "while True: pass"}) == "error: timed out after 2s"
    assert "outside the work dir" in tools.call("read_file", {"path": "../../etc/passwd"})
    assert tools.call("read_file", {"path": "missing.txt"}).startswith("error:")
    assert tools.call("nope", {}) == "error: unknown tool 'nope'"
    assert tools.call("read_file", {"wrong": "x"}).startswith("error:")


def _finished(text: str, tool_calls: tuple = ()) -> Finished:
    return Finished(session="s", version=1, finish_reason="stop", text=text, token_ids=(),
                    usage=Usage(), timings=Timings(), tool_calls=tool_calls, replayed=False,
                    request_id="r")  # fmt: skip


def test_parse_tool_calls_both_formats() -> None:
    text = 'Let me look.\nCALL list_dir {"path": "src"}\nCALL run_python {"expr": "1+1"}\n'
    assert parse_tool_calls(_finished(text)) == [
        ToolCall(name="list_dir", arguments={"path": "src"}),
        ToolCall(name="run_python", arguments={"expr": "1+1"}),
    ]
    assert parse_tool_calls(_finished("CALL read_file {not json}"))[0].arguments == {
        "_unparsed": "{not json}"}  # fmt: skip
    assert parse_tool_calls(_finished("No tools needed. I CALL it done.")) == []
    openai = {"id": "c7", "type": "function",
              "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}
    # Template-parsed calls win over text lines.
    assert parse_tool_calls(_finished("CALL list_dir {}", (openai,))) == [
        ToolCall(name="read_file", arguments={"path": "notes.txt"}, id="c7")]  # fmt: skip


# ---- end to end through the server ----


def test_loop_with_injected_tool_calls(client: Client, workdir: Path) -> None:
    lines: list[str] = []
    loop = AgentLoop(client, fresh("agent"), tools=Tools(workdir), max_tokens=6, out=lines.append)
    created = loop.start()
    first = loop.send("What does notes.txt say?")
    listing = loop.run_tool_call(ToolCall(name="list_dir", arguments={"path": "."}, id="c1"))
    content = loop.run_tool_call(ToolCall(name="read_file", arguments={"path": "notes.txt"}))
    last = loop.send()  # generates after the two tool turns, with no new user message
    assert content == (workdir / "notes.txt").read_text()
    assert listing.splitlines() == sorted(["notes.txt", "src/"])

    info = client.get_session(loop.session)
    roles = [t.role for t in info.turns]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [t.text for t in info.turns if t.role == "tool"] == [listing, content]
    assert info.turns[2].text == first.text and info.turns[-1].text == last.text
    assert info.version == last.version == created.version + 4

    kinds = [(r.kind, r.tool) for r in loop.records]
    assert kinds == [("send", ""), ("tool", "list_dir"), ("tool", "read_file"), ("send", "")]
    cached = [r.cached_tokens for r in loop.records]
    assert cached == sorted(cached) and len(set(cached)) == len(cached)  # strictly growing
    for prev, cur in zip(loop.records, loop.records[1:]):
        # The earlier context stayed resident, up to the last token or two of a turn boundary
        # that the chat template renders differently once the next turn follows it.
        assert cur.cached_tokens >= prev.prompt_tokens - 2, loop.records
        assert cur.prompt_tokens > prev.prompt_tokens
    assert [r.completion_tokens for r in loop.records if r.kind == "tool"] == [0, 0]
    assert all(0 < r.completion_tokens <= 6 for r in loop.records if r.kind == "send")
    assert len(lines) == 4 and all("cached=" in ln and "accepted=" in ln for ln in lines)

    summary = loop.summary(last)
    assert summary["steps"] == 2 and summary["tool_calls"] == ["list_dir", "read_file"]
    assert [t["cached_tokens"] for t in summary["turns"]] == cached


def test_run_stops_within_max_steps(client: Client, workdir: Path) -> None:
    loop = AgentLoop(client, fresh("agent-run"), tools=Tools(workdir), max_tokens=8, max_steps=2,
                     out=lambda _: None)  # fmt: skip
    loop.start()
    summary = loop.run("List the files, then stop.")
    assert 1 <= summary["steps"] <= 2
    info = client.get_session(loop.session)
    assert sum(t.role == "assistant" for t in info.turns) == summary["steps"]
    assert sum(t.role == "tool" for t in info.turns) == len(summary["tool_calls"])
    has_call = bool(parse_tool_calls(_finished(summary["answer"])))
    assert summary["stopped"] == ("max_steps" if has_call else "answer")


def test_module_entry_point(addr: str, workdir: Path) -> None:
    cmd = [sys.executable, "-m", "lsrt.clients.agent_loop", "--task", "Say hi.", "--addr", addr,
           "--root", str(workdir), "--max-steps", "1", "--max-tokens", "4", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["steps"] == 1 and out[0].startswith("turn 1 [send] cached=")
    assert summary["turns"][0]["completion_tokens"] <= 4
