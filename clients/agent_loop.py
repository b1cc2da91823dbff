"""A multi-turn tool-use agent loop against the lsrt service, with real tools.

    python -m lsrt.clients.agent_loop --task "How many files are in ." [--addr HOST:PORT]

Each step: `send` (generate) -> parse tool calls -> run each tool -> `append` its result as a
`tool` turn (prefill only, no generation) -> the next `send`. The session's KV stays resident, so
each step prefills only its new tokens: the per-turn line shows `cached` growing.

Tool calls come from `Finished.tool_calls` when the model's chat template defines a tool format.
Templates without one (SmolLM2's) get a plain text protocol described in the system prompt: a
line `CALL tool_name {"arg": ...}`, parsed here.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lsrt.clients.client import Client
from lsrt.clients.wire import Finished
from lsrt.runtime.errors import InvalidRequest, LsrtError
from lsrt.runtime.service_api import SessionInfo

MAX_RESULT_CHARS = 4000  # tool output beyond this is cut: it all becomes prefill
CALL_LINE = re.compile(r"^\s*CALL\s+([A-Za-z_]\w*)\s*(\{.*\})?\s*$", re.MULTILINE)
_RUN_PYTHON = (
    "import sys\nsrc = sys.argv[1]\n"
    "try:\n    code = compile(src, '<expr>', 'eval')\nexcept SyntaxError:\n"
    "    exec(compile(src, '<expr>', 'exec'), {})\n"
    "else:\n    print(repr(eval(code, {})))\n"
)


def _schema(name: str, doc: str, param: str, param_doc: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": doc,
        "parameters": {"type": "object", "required": [param],
                       "properties": {param: {"type": "string", "description": param_doc}}},
    }}  # fmt: skip


TOOL_SCHEMAS = (
    _schema("read_file", "Read a text file.", "path", "file path, relative to the work dir"),
    _schema("list_dir", "List a directory.", "path", "directory path, relative to the work dir"),
    _schema("run_python", "Evaluate Python; returns the repr or printed output.", "expr", "code"),
)

SYSTEM_PROMPT = """You are an agent that solves tasks with tools. Tools:
- read_file {"path": "..."}: read a text file
- list_dir {"path": "..."}: list a directory
- run_python {"expr": "..."}: evaluate Python code
To use a tool, answer with one line and nothing else:
CALL tool_name {"arg": "value"}
The result comes back as a tool message. When you know the answer, reply without CALL."""


class Tools:
    """The real tools, confined to `root` (paths may not escape it); errors come back as text."""

    def __init__(self, root: Path | str = ".", *, timeout_s: float = 5.0) -> None:
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s

    def _path(self, path: str) -> Path:
        resolved = (self.root / path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise InvalidRequest(f"{path!r} is outside the work dir")
        return resolved

    def read_file(self, path: str) -> str:
        return self._path(path).read_text(errors="replace")

    def list_dir(self, path: str = ".") -> str:
        entries = sorted(self._path(path).iterdir())
        return "\n".join(e.name + ("/" if e.is_dir() else "") for e in entries)

    def run_python(self, expr: str) -> str:
        """Runs `expr` in a fresh isolated interpreter (no shell), killed after `timeout_s`."""
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _RUN_PYTHON, expr], cwd=self.root,
                                  capture_output=True, text=True, timeout=self.timeout_s,
                                  stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"error: timed out after {self.timeout_s:g}s"
        if done.returncode:
            return "error: " + (done.stderr.strip().splitlines() or ["failed"])[-1]
        return done.stdout.rstrip("\n")

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        fn: Callable[..., str] | None = {"read_file": self.read_file, "list_dir": self.list_dir,
                                         "run_python": self.run_python}.get(name)  # fmt: skip
        if fn is None:
            return f"error: unknown tool {name!r}"
        try:
            result = fn(**arguments)
        except (OSError, TypeError, InvalidRequest) as err:
            return f"error: {err}"
        return result if len(result) <= MAX_RESULT_CHARS else result[:MAX_RESULT_CHARS] + "\n[cut]"


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(frozen=True, kw_only=True)
class TurnRecord:
    """One server turn of the loop: a generated reply (`send`) or an appended tool result."""

    kind: str  # "send" | "tool"
    version: int
    cached_tokens: int
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    text: str
    tool: str = ""


def parse_tool_calls(fin: Finished) -> list[ToolCall]:
    """Template-parsed calls (`fin.tool_calls`, OpenAI format) if any, else `CALL` lines."""
    calls = []
    for c in fin.tool_calls:
        fn = c.get("function", c)
        args = fn.get("arguments") or {}
        calls.append(ToolCall(name=fn.get("name", ""), id=c.get("id", ""),
                              arguments=_json_args(args) if isinstance(args, str) else args))
    if calls:
        return calls
    return [ToolCall(name=m.group(1), arguments=_json_args(m.group(2) or "{}"))
            for m in CALL_LINE.finditer(fin.text)]  # fmt: skip


def _json_args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"_unparsed": text}  # the tool reports the bad call back to the model
    return value if isinstance(value, dict) else {"_unparsed": text}


@dataclass
class AgentLoop:
    """Runs a task on session `session` of `client`; `records` holds every turn's usage."""

    client: Client
    session: str
    tools: Tools = field(default_factory=Tools)
    max_tokens: int = 128
    max_steps: int = 6
    out: Callable[[str], None] = print
    records: list[TurnRecord] = field(default_factory=list)

    def start(self, system: str = SYSTEM_PROMPT) -> SessionInfo:
        """Creates the session with the tool protocol as its system prompt."""
        return self.client.create_session(self.session, system=system)

    def _record(self, kind: str, fin: Finished, tool: str = "") -> None:
        u = fin.usage
        rec = TurnRecord(kind=kind, version=fin.version, cached_tokens=u.cached_tokens,
                         prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                         drafted_tokens=u.drafted_tokens, accepted_tokens=u.accepted_tokens,
                         text=fin.text, tool=tool)  # fmt: skip
        self.records.append(rec)
        label = f"tool:{tool}" if tool else "send"
        self.out(f"turn {len(self.records)} [{label}] cached={u.cached_tokens} "
                 f"prompt={u.prompt_tokens} completion={u.completion_tokens} "
                 f"drafted={u.drafted_tokens} accepted={u.accepted_tokens}")  # fmt: skip

    def send(self, message: str | None = None) -> Finished:
        """Generates the next assistant turn (after `message`, or after the appended tool turns)."""
        messages = [] if message is None else [{"role": "user", "content": message}]
        fin = self.client.session(self.session).send(messages, tools=TOOL_SCHEMAS,
                                                     max_tokens=self.max_tokens)  # fmt: skip
        self._record("send", fin)
        return fin

    def run_tool_call(self, call: ToolCall) -> str:
        """Runs one tool and appends its result as a `tool` turn (prefill only)."""
        result = self.tools.call(call.name, call.arguments)
        message = {"role": "tool", "content": result, "name": call.name,
                   "tool_call_id": call.id}  # fmt: skip
        fin = self.client.session(self.session).append(message, tools=TOOL_SCHEMAS)
        self._record("tool", fin, tool=call.name)
        return result

    def continue_(self, fin: Finished) -> Finished:
        """Steps until a reply has no tool call or `max_steps` replies were generated."""
        while (calls := parse_tool_calls(fin)) and self._sends() < self.max_steps:
            for call in calls:
                self.run_tool_call(call)
            fin = self.send()
        return fin

    def run(self, task: str) -> dict[str, Any]:
        """Sends `task` and loops; returns `summary()`."""
        return self.summary(self.continue_(self.send(task)))

    def _sends(self) -> int:
        return sum(r.kind == "send" for r in self.records)

    def summary(self, last: Finished) -> dict[str, Any]:
        return {
            "session": self.session,
            "answer": last.text,
            "stopped": "max_steps" if parse_tool_calls(last) else "answer",
            "steps": self._sends(),
            "tool_calls": [r.tool for r in self.records if r.kind == "tool"],
            "turns": [asdict(r) for r in self.records],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lsrt.clients.agent_loop", description=__doc__)
    p.add_argument("--task", required=True)
    p.add_argument("--addr", default=None, help="default: $LSRT_ADDR, else an embedded server")
    p.add_argument("--session", default=None, help="default: agent-<random>")
    p.add_argument("--root", default=".", help="the tools' work dir")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--token-file", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    args = p.parse_args(argv)
    from lsrt.clients.commands import connect

    try:
        summary = _run_main(args, connect)
    except LsrtError as err:
        print(f"agent_loop: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else f"answer ({summary['stopped']}): "
          f"{summary['answer']}")  # fmt: skip
    return 0


def _run_main(args: argparse.Namespace, connect: Callable) -> dict[str, Any]:
    with connect(args) as client:
        loop = AgentLoop(client, args.session or f"agent-{uuid.uuid4().hex[:8]}",
                         tools=Tools(args.root), max_steps=args.max_steps,
                         max_tokens=args.max_tokens)  # fmt: skip
        loop.start()
        return loop.run(args.task)


if __name__ == "__main__":
    sys.exit(main())
