"""`lsrt chat`: one session, through the SDK only.

stdin a TTY: a prompt loop with streamed replies and slash commands (`ChatState.dispatch`);
Ctrl-C during a reply cancels that turn (the server rolls the session back), Ctrl-D exits.
stdin not a TTY: all of stdin is one user message and only the reply goes to stdout, so
`echo hi | lsrt chat --session s` run twice continues one conversation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from lsrt.clients.client import Client
from lsrt.clients.wire import Delta, Finished
from lsrt.runtime.errors import InvalidRequest, LsrtError, SessionExists, SessionNotFound

PROMPT = "you> "
HELP = """commands:
  /help        this text
  /fork NEW    fork the session as NEW and continue on NEW
  /stats       server stats and the last turn's usage
  /reset       delete the session and start it again (same system prompt)
  /quit        leave (Ctrl-D too); Ctrl-C during a reply cancels that turn"""


def ensure_session(client: Client, name: str, *, system: str | None, draft: str | None) -> bool:
    """Creates session `name` unless it exists; True when it was created."""
    try:
        client.get_session(name)
        return False
    except SessionNotFound:
        pass
    try:
        client.create_session(name, system=system, draft=draft)
        return True
    except SessionExists:  # another client created it meanwhile: continue it
        return False


def format_usage(fin: Finished) -> str:
    u = fin.usage
    rate = f"{u.accepted_tokens / u.drafted_tokens:.0%}" if u.drafted_tokens else "-"
    return (f"cached {u.cached_tokens} / prompt {u.prompt_tokens} tokens, "
            f"completion {u.completion_tokens}, drafted {u.drafted_tokens}, "
            f"accepted {u.accepted_tokens} ({rate}), {fin.timings.total_s:.2f}s")  # fmt: skip


@dataclass
class ChatState:
    """The interactive chat's state: which session, the turn options and the last result."""

    client: Client
    session: str
    system: str | None = None
    draft: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # send() options (max_tokens, ...)
    last: Finished | None = None

    def dispatch(self, line: str, out: TextIO) -> bool:
        """Runs one slash command; False means quit. Errors are printed, not raised."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            return self._command(cmd, arg, out)
        except LsrtError as err:
            print(f"error: {err}", file=out)
            return True

    def _command(self, cmd: str, arg: str, out: TextIO) -> bool:
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            print(HELP, file=out)
        elif cmd == "/fork":
            if not arg or " " in arg:
                raise InvalidRequest("usage: /fork NEW")
            self.client.fork_session(self.session, arg)
            print(f"forked {self.session} -> {arg}; now on {arg}", file=out)
            self.session = arg
        elif cmd == "/stats":
            self._stats(out)
        elif cmd == "/reset":
            self.client.delete_session(self.session)
            self.client.create_session(self.session, system=self.system, draft=self.draft)
            self.last = None
            print(f"session {self.session} reset", file=out)
        else:
            print(f"unknown command {cmd!r}; /help lists them", file=out)
        return True

    def _stats(self, out: TextIO) -> None:
        stats = self.client.stats()
        info = self.client.get_session(self.session)
        print(f"session {info.name}: version {info.version}, {info.num_tokens} tokens, "
              f"{len(info.turns)} turns", file=out)  # fmt: skip
        print("server: " + ", ".join(f"{k} {v:g}" for k, v in sorted(stats.items())), file=out)
        print("last turn: " + (format_usage(self.last) if self.last else "-"), file=out)

    def turn(self, text: str, out: TextIO) -> Finished | None:
        """Streams one reply to `out`; Ctrl-C cancels it (None), the session rolls back."""
        # wait=True: a turn cancelled a moment ago may still be rolling back on the server.
        stream = self.client.session(self.session).send(text, stream=True, wait=True,
                                                        **self.options)  # fmt: skip
        try:
            for event in stream:
                if isinstance(event, Delta):
                    out.write(event.text)
                    out.flush()
                elif isinstance(event, Finished):
                    self.last = event
                    out.write("\n")
                    return event
        except KeyboardInterrupt:
            out.write("\n[cancelled; the turn was rolled back]\n")
            return None
        finally:
            stream.close()  # cancels the RPC if it is still running
        return None


def turn_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        opts["temperature"] = args.temperature
    if args.draft:
        opts["draft"] = args.draft
    return opts


def run_piped(state: ChatState, stdin: TextIO, stdout: TextIO) -> int:
    message = stdin.read().strip()
    if not message:
        raise InvalidRequest("stdin is empty: nothing to send")
    fin = state.client.session(state.session).send(message, **state.options)
    stdout.write(fin.text + "\n")
    stdout.flush()
    return 0


def run_interactive(state: ChatState, out: TextIO) -> int:
    print(f"session {state.session} - /help for commands, Ctrl-D to leave", file=out)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not state.dispatch(line, out):
                return 0
            continue
        try:
            state.turn(line, out)
        except LsrtError as err:
            print(f"error: {err}", file=out)


def run(client: Client, args: argparse.Namespace) -> int:
    """The `lsrt chat` command on a connected client."""
    ensure_session(client, args.session, system=args.system, draft=args.draft)
    state = ChatState(client=client, session=args.session, system=args.system, draft=args.draft,
                      options=turn_options(args))  # fmt: skip
    if not sys.stdin.isatty():
        return run_piped(state, sys.stdin, sys.stdout)
    return run_interactive(state, sys.stdout)
