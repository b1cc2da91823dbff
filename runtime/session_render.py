"""Chat-template rendering of a session turn as a token delta onto the stored tokens.

Tokens are the source of truth, but clients send messages. A turn's new tokens are found by
rendering the conversation (previous turns + new messages) with the model's chat template and
comparing it with the stored tokens:

  * fast path (append): the decoded stored tokens are a text prefix of every rendering, so the
    delta is the encoded remainder, message by message. Nothing stored is recomputed.
  * fallback (templates that re-render past turns differently, `full_history` requests): encode
    the whole rendering and keep the longest common token prefix with the stored tokens; the
    rest is re-prefilled (the caller reports it as recomputed).

Also here: session-name validation and best-effort tool-call parsing of generated text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.tokenizer import Tokenizer
from lsrt.runtime.types import Message
from lsrt.sessions.store import Turn

MAX_NAME_LEN = 200
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def check_session_name(name: str) -> str:
    """Non-empty, at most 200 characters, no whitespace or control characters."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise InvalidRequest(f"session name must be 1-{MAX_NAME_LEN} characters, got {name!r}")
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in name):
        raise InvalidRequest(f"session name {name!r} contains whitespace or control characters")
    return name


@dataclass(frozen=True, kw_only=True)
class RenderPlan:
    """What a turn does to the stored tokens: keep `stored[:common]`, then `prompt[common:]`."""

    prompt: list[int]  # the whole context after the new messages (+ generation prompt)
    common: int  # tokens shared with the stored tokens (the store's truncate_to)
    new_messages: tuple[Message, ...]  # messages that become new turns
    spans: tuple[tuple[int, int], ...]  # token span [start, end) of each new message
    messages_end: int  # where the new messages end (the generation prompt follows)


def turn_message(turn: Turn) -> dict[str, Any]:
    """A stored turn as a template message (tool_calls, name, ... kept in `turn.meta`)."""
    msg: dict[str, Any] = {"role": turn.role, "content": turn.text}
    msg.update(turn.meta.get("message", {}))
    return msg


def message_meta(message: Message) -> dict[str, Any]:
    """The parts of a message beyond role and text, stored in `Turn.meta["message"]`."""
    extra = message.to_template()
    extra.pop("role")
    extra.pop("content")
    return {"message": extra} if extra else {}


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_turn(tok: Tokenizer, stored: list[int], turns: Sequence[Turn],
              messages: Sequence[Message], *, generate: bool, full_history: bool,
              tools: Sequence[dict[str, Any]] = ()) -> RenderPlan:
    """Render a turn's messages onto a session's stored tokens and turns."""
    tools_list = list(tools) or None
    new = [m.to_template() for m in messages]
    if full_history:
        final = tok.render(new, add_generation_prompt=generate, tools=tools_list)
        return _token_diff(tok, stored, final, [], list(messages), turns, tools_list)
    prev = [turn_message(t) for t in turns]
    texts = [tok.render(prev + new[:j + 1], add_generation_prompt=False, tools=tools_list)
             for j in range(len(new))]
    texts.append(tok.render(prev + new, add_generation_prompt=generate, tools=tools_list))
    plan = _text_append(tok, stored, texts, messages)
    if plan is not None:
        return plan
    return _token_diff(tok, stored, texts[-1], prev, list(messages), None, tools_list)


def _text_append(tok: Tokenizer, stored: list[int], texts: list[str],
                 messages: Sequence[Message]) -> RenderPlan | None:
    """The fast path: each rendering extends the previous one as text; None if one does not."""
    done = tok.decode(stored)
    ids = list(stored)
    spans: list[tuple[int, int]] = []
    for j, text in enumerate(texts):
        if not text.startswith(done):
            return None
        start = len(ids)
        ids += tok.encode(text[len(done):])
        if j < len(messages):
            spans.append((start, len(ids)))
        done = text
    end = spans[-1][1] if spans else len(stored)
    return RenderPlan(prompt=ids, common=len(stored), new_messages=tuple(messages),
                      spans=tuple(spans), messages_end=end)


def _token_diff(tok: Tokenizer, stored: list[int], final: str, prev: list[dict[str, Any]],
                messages: list[Message], turns: Sequence[Turn] | None,
                tools: list[dict[str, Any]] | None) -> RenderPlan:
    """The fallback: longest common token prefix of the full rendering and the stored tokens.

    With `turns` given (full-history requests), `messages` is the whole conversation and the
    stored turns that end inside the common prefix stand for its first messages.
    """
    prompt = tok.encode(final)
    common = _lcp(stored, prompt)
    first = 0
    if turns is not None:
        first = min(sum(1 for t in turns if t.end <= common), len(messages))
    new_msgs = messages[first:]
    base = [m.to_template() for m in messages[:first]] if turns is not None else prev
    spans: list[tuple[int, int]] = []
    last = common
    for j in range(len(new_msgs)):
        upto = [m.to_template() for m in new_msgs[:j + 1]]
        text = tok.render(base + upto, add_generation_prompt=False, tools=tools)
        end = min(max(len(tok.encode(text)), last), len(prompt))
        spans.append((last, end))
        last = end
    end = spans[-1][1] if spans else min(common, len(prompt))
    return RenderPlan(prompt=prompt, common=common, new_messages=tuple(new_msgs),
                      spans=tuple(spans), messages_end=end)


def parse_tool_calls(text: str, template: str | None) -> tuple[dict[str, Any], ...]:
    """OpenAI-style tool calls from `<tool_call>{json}</tool_call>` blocks (Qwen/Hermes format),
    only when the model's template uses that format; malformed blocks are skipped."""
    if not template or "<tool_call>" not in template:
        return ()
    calls = []
    for i, match in enumerate(_TOOL_CALL_RE.finditer(text)):
        try:
            obj = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        args = args if isinstance(args, str) else json.dumps(args)
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": obj["name"], "arguments": args}})
    return tuple(calls)
