"""Client-side `lsrt` subcommands: `serve`, `chat` and `sessions` (registered by clients/cli.py).

`chat` and `sessions` talk to a server only through the SDK. With no `--addr` (and no
`$LSRT_ADDR`) they start an embedded server in-process on 127.0.0.1 over the embedded session
store, so `lsrt chat --session demo` works with nothing set up. Environment variables are read
when a command runs, never at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lsrt.clients.cli import add_tree_budget_arg
from lsrt.clients.client import Client
from lsrt.runtime.errors import InvalidRequest, SessionNotFound, Unavailable

DEFAULT_MODEL = "smollm2-135m"
DRAIN_GRACE_S = 10.0


# ---- shared plumbing ----


def read_token(path: str | None) -> str | None:
    """The bearer token in `path` (whitespace stripped), else `$LSRT_TOKEN`, else None."""
    if not path:
        return os.environ.get("LSRT_TOKEN") or None
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise InvalidRequest(f"cannot read the token file {path}: {err.strerror}") from None
    if not token:
        raise InvalidRequest(f"the token file {path} is empty")
    return token


def backend_kwargs(args: argparse.Namespace, *, progress: bool = True) -> dict[str, Any]:
    """`build_backend` keyword arguments from the runtime options of a subcommand."""
    return {
        "model": args.model,
        "device": getattr(args, "device", "cpu"),
        "dtype": getattr(args, "dtype", None),
        "draft": getattr(args, "draft", None),
        "redis_url": getattr(args, "redis_url", None),
        "data_dir": Path(args.data_dir).expanduser() if getattr(args, "data_dir", None) else None,
        "kv_budget_mb": getattr(args, "kv_budget_mb", None),
        "tree_budget": getattr(args, "tree_budget", None),
        "progress": progress,
    }


@contextlib.contextmanager
def embedded_server(args: argparse.Namespace) -> Iterator[str]:
    """Builds the backend and serves it on 127.0.0.1:<free port> in this process; yields the
    address and stops the server (then the store) on exit."""
    from lsrt.runtime.server import serving

    print(f"lsrt: loading {args.model} (embedded server) ...", file=sys.stderr, flush=True)
    with serving("127.0.0.1:0", **backend_kwargs(args)) as addr:
        yield addr


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    """A `Client` on `--addr` / `$LSRT_ADDR`, else on an embedded server (see above)."""
    addr = args.addr or os.environ.get("LSRT_ADDR")
    token = read_token(getattr(args, "token_file", None))
    if addr:
        with Client(addr, token=token) as client:
            yield client
        return
    with embedded_server(args) as local, Client(local) as client:
        yield client


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="external Redis (default: embedded store)")
    p.add_argument("--data-dir", default=None,
                   help="embedded store directory (default: $LSRT_HOME/data or "
                        "~/.local/share/lsrt)")  # fmt: skip


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--kv-budget-mb", type=int, default=None)
    add_tree_budget_arg(p)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default=None,
                   help="server HOST:PORT (default: $LSRT_ADDR, else an embedded server)")
    p.add_argument("--token-file", default=None, help="bearer token file (default: $LSRT_TOKEN)")
    _add_model_args(p)
    _add_store_args(p)


# ---- serve ----


class LoadingBackend:
    """Answers UNAVAILABLE until the real backend is set, so the port and health are up (with
    NOT_SERVING) while the model loads."""

    def __init__(self) -> None:
        self.target: Any = None

    def __getattr__(self, name: str) -> Any:
        target = self.__dict__.get("target")
        if target is None:
            def loading(*args: Any, **kwargs: Any) -> Any:
                raise Unavailable("the server is loading its model")

            return loading
        return getattr(target, name)


async def serve_main(args: argparse.Namespace) -> int:
    """Serves until SIGTERM/SIGINT, then drains (running turns get DRAIN_GRACE_S) and returns 0."""
    from lsrt.runtime.backend import build_backend
    from lsrt.runtime.server import serve

    token = read_token(args.auth_token_file) if args.auth_token_file else None
    lazy = LoadingBackend()
    server = await serve(lazy, addr=args.addr, auth_token=token, ready=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closer = None
    try:
        built = loop.run_in_executor(None, lambda: build_backend(**backend_kwargs(args)))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({built, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not built.done():  # a signal while loading: stop once the load returns
            lazy.target, closer = await built
            return 0
        lazy.target, closer = built.result()
        await server.set_ready()
        host = args.addr.rsplit(":", 1)[0]
        print(f"lsrt: serving {args.model} on {host}:{server.port}", flush=True)
        await stopped
        return 0
    finally:
        await server.stop(grace=DRAIN_GRACE_S)
        if closer is not None:
            closer()


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    return asyncio.run(serve_main(args))


def register_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC service")
    p.add_argument("--addr", default="127.0.0.1:7777", help="HOST:PORT (default: %(default)s)")
    _add_model_args(p)
    p.add_argument("--draft", default=None, help="default drafter of new sessions")
    _add_store_args(p)
    p.add_argument("--auth-token-file", default=None, help="require this bearer token")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


# ---- chat ----


def cmd_chat(args: argparse.Namespace) -> int:
    from lsrt.clients import chat

    with connect(args) as client:
        return chat.run(client, args)


def register_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat on a session (stdin not a TTY: one message, one reply)")
    p.add_argument("--session", required=True)
    p.add_argument("--system", default=None, help="system prompt of a new session")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--draft", default=None, help="drafter for these turns")
    _add_client_args(p)
    p.set_defaults(func=cmd_chat)


# ---- sessions ----


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def session_dict(info: Any, *, turns: bool) -> dict[str, Any]:
    out = {
        "name": info.name, "version": info.version, "num_tokens": info.num_tokens,
        "num_turns": len(info.turns), "created": info.created, "updated": info.updated,
        "parent": info.parent, "draft": info.draft, "resident": info.resident,
        "usage": dict(info.usage), "metadata": dict(info.metadata),
    }  # fmt: skip
    if turns:
        out["turns"] = [{"role": t.role, "text": t.text, "start": t.start, "end": t.end}
                        for t in info.turns]  # fmt: skip
    return out


def print_table(infos: list[Any]) -> None:
    rows = [("NAME", "VERSION", "TOKENS", "TURNS", "UPDATED", "RESIDENT")]
    for i in infos:
        rows.append((i.name, str(i.version), str(i.num_tokens), str(len(i.turns)),
                     _fmt_time(i.updated),
                     "yes" if i.resident else "no"))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def print_session(info: Any) -> None:
    print(f"session {info.name}: version {info.version}, {info.num_tokens} tokens, "
          f"{len(info.turns)} turns, resident {'yes' if info.resident else 'no'}")  # fmt: skip
    if info.parent:
        print(f"forked from {info.parent}")
    for t in info.turns:
        print(f"[{t.role}] ({t.start}-{t.end})\n{t.text}")


def cmd_sessions(args: argparse.Namespace) -> int:
    with connect(args) as client:
        return sessions_action(client, args)


def _with_turns(client: Client, infos: list[Any]) -> list[Any]:
    """ListSessions omits turns (to stay small); fetch each session for its turn count."""
    out = []
    for info in infos:
        try:
            out.append(client.get_session(info.name))
        except SessionNotFound:  # deleted meanwhile
            continue
    return out


def sessions_action(client: Client, args: argparse.Namespace) -> int:
    """One `lsrt sessions` action on a connected client."""
    action = args.sessions_cmd
    if action == "list":
        infos = _with_turns(client, client.list_sessions(prefix=args.prefix))
        if args.json:
            print(json.dumps([session_dict(i, turns=False) for i in infos]))
        else:
            print_table(infos)
    elif action == "rm":
        if not client.delete_session(args.name):
            raise SessionNotFound(f"no session {args.name!r}")
        print(json.dumps({"deleted": args.name}) if args.json else f"deleted {args.name}")
    else:
        if action == "fork":
            client.fork_session(args.name, args.new_name, args.at_turn)
        info = client.get_session(args.new_name if action == "fork" else args.name)
        if args.json:
            print(json.dumps(session_dict(info, turns=True)))
        else:
            print_session(info)
    return 0


def register_sessions(sub: Any) -> None:
    p = sub.add_parser("sessions", help="list, show, delete or fork sessions")
    ssub = p.add_subparsers(dest="sessions_cmd", required=True)
    parsers = [ssub.add_parser("list")]
    parsers[0].add_argument("--prefix", default="")
    show = ssub.add_parser("show")
    show.add_argument("name")
    rm = ssub.add_parser("rm")
    rm.add_argument("name")
    fork = ssub.add_parser("fork")
    fork.add_argument("name")
    fork.add_argument("new_name", metavar="NEW")
    fork.add_argument("--at-turn", type=int, default=None, help="fork as the session was right after turn K (0-based)")
    for q in (*parsers, show, rm, fork):
        q.add_argument("--json", action="store_true")
        _add_client_args(q)
        q.set_defaults(func=cmd_sessions)


REGISTER = [register_serve, register_chat, register_sessions]

__all__ = ["REGISTER", "connect", "embedded_server", "read_token", "sessions_action"]
