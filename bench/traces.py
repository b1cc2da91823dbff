"""Agent-trace loading and turn-by-turn replay for the speculative-decoding benchmarks.

A trace (one JSON line of an agent-traces *.jsonl; see `traces_dir`) is a whole agent session.
Replaying it means: for each assistant turn, take the messages before it, render them with the
target's chat template plus the generation prompt, let the engine generate the turn, continue.

A session keeps one resident KV sequence that grows turn by turn, so each turn should cost only
the prefill of its new tokens. Chat templates do not promise that turn t+1's tokens start with
turn t's (see DESIGN.md, "chat templates break prefixes"), so the replay diffs at token level:
`ReplayTurn.reuse` is the longest common prefix with the previous prompt, and `advance` cuts a
token history back to what it shares with the new prompt. Token ids are the source of truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lsrt.runtime.training.data import traces_dir  # noqa: F401  (re-exported for the scripts)


class ChatTokenizer(Protocol):
    """The part of `lsrt.runtime.tokenizer.Tokenizer` the replay needs."""

    hf: Any

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None) -> str: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, kw_only=True)
class Trace:
    """One agent session as recorded: OpenAI-style messages and (tau-bench) tool schemas."""

    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ReplayTurn:
    """The prompt for one assistant turn of a trace.

    `message_index` is the index of the assistant message being generated; `prompt_ids` are
    the rendered messages before it plus the generation prompt; `reuse` is how many leading
    tokens it shares with the previous turn's prompt (0 for the first turn).
    """

    trace_id: str
    turn: int
    message_index: int
    prompt_ids: list[int]
    reuse: int


def load_traces(path: str | Path, *, limit: int | None = None) -> list[Trace]:
    """Traces of one jsonl file, in file order (the first `limit` of them)."""
    out: list[Trace] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(Trace(id=row["id"], messages=row["messages"], tools=row.get("tools") or []))
            if limit is not None and len(out) >= limit:
                break
    return out


def template_has_tool_role(tokenizer: ChatTokenizer) -> bool:
    """Whether the chat template knows tool messages (else they are sent as `user`)."""
    template = getattr(tokenizer.hf, "chat_template", None) or ""
    return "tool" in template


def chat_messages(trace: Trace, *, tool_role: bool, max_chars: int) -> list[dict[str, Any]]:
    """The trace's messages as the template gets them: contents cut at `max_chars`.

    With a tool-aware template, `tool` roles and assistant `tool_calls` pass through (tool-call
    arguments parsed from their JSON string, as templates expect a mapping). Without one, tool
    output becomes a `user` message (the SWE-style harnesses sent it that way) and tool calls
    are appended to the assistant text as JSON, so later turns can still quote them.
    """
    out: list[dict[str, Any]] = []
    for m in trace.messages:
        content = (m.get("content") or "")[:max_chars]
        role = m["role"]
        calls = m.get("tool_calls") or []
        if role == "tool" and not tool_role:
            role = "user"
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls and tool_role:
            msg["tool_calls"] = [_parsed_call(c) for c in calls]
        elif calls:
            text = "\n".join(json.dumps(c.get("function", c), ensure_ascii=False) for c in calls)
            msg["content"] = (content + "\n" + text if content else text)[:max_chars]
        out.append(msg)
    return out


def _parsed_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function", {}))
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": fn, **({"id": call["id"]} if "id" in call else {})}


def assistant_indices(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of assistant messages that have at least one message before them."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def replay_turns(tokenizer: ChatTokenizer, trace: Trace, *, turns: int, max_chars: int = 6000,
                 max_prompt_tokens: int = 6144) -> list[ReplayTurn]:
    """Prompts for the first `turns` assistant turns of `trace`.

    Stops early at the first turn whose prompt would exceed `max_prompt_tokens` (later turns
    only grow), so a long trace yields fewer turns rather than a cut history.
    """
    tool_role = template_has_tool_role(tokenizer)
    messages = chat_messages(trace, tool_role=tool_role, max_chars=max_chars)
    tools = trace.tools if tool_role else None
    out: list[ReplayTurn] = []
    prev: list[int] = []
    for turn, idx in enumerate(assistant_indices(messages)[:turns]):
        text = tokenizer.render(messages[:idx], add_generation_prompt=True, tools=tools)
        ids = tokenizer.encode(text)
        if len(ids) > max_prompt_tokens:
            break
        out.append(ReplayTurn(trace_id=trace.id, turn=turn, message_index=idx, prompt_ids=ids,
                              reuse=common_prefix(prev, ids)))
        prev = ids
    return out


def advance(history: list[int], prompt_ids: list[int], committed: int) -> int:
    """Move a resident token history to a new turn's prompt; return the tokens kept.

    `history` (the previous prompt plus what was generated) is edited in place to equal
    `prompt_ids`. KV at a position depends only on the tokens up to it, so any common prefix
    is reusable, even generated tokens that happen to match the recorded turn; `committed`
    (the KV length) caps it. The caller truncates its KV and drafters to the returned length
    and prefills the rest.
    """
    keep = min(common_prefix(history, prompt_ids), committed, len(prompt_ids) - 1)
    del history[keep:]
    history.extend(prompt_ids[keep:])
    return keep
