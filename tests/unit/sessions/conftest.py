"""Fixtures for the session store contract: one real redis-server, one embedded server.

Both servers live for the whole test session and are stopped by finalizers. Each test gets an
empty database (FLUSHALL) and a fresh RedisStore; `backend.restart()` restarts the server on the
same data dir (AOF), which is how persistence is tested.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lsrt.sessions.embedded import EmbeddedRedis
from lsrt.sessions.redis_store import RedisStore

_HELPER = Path(__file__).resolve().parents[2] / "redis_server.py"


def load_redis_server_module():
    """tests/ is not a package: load tests/redis_server.py by path."""
    spec = importlib.util.spec_from_file_location("lsrt_tests_redis_server", _HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


redis_server_helper = load_redis_server_module()


class Backend:
    """One store backend under test: its URL and a way to restart its server."""

    def __init__(self, name: str, server) -> None:
        self.name = name
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        if isinstance(self.server, EmbeddedRedis):
            self.server.stop()
            self.server.start()
        else:
            self.server.restart()

    def raw(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_helper():
    """The tests/redis_server.py module (RedisServer, free_port, wait_for)."""
    return redis_server_helper


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = redis_server_helper.RedisServer(tmp_path_factory.mktemp("redis-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("embedded"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server = request.getfixturevalue(f"{request.param}_server")
    b = Backend(request.param, server)
    with b.raw() as client:
        client.flushall()
    yield b


@pytest.fixture
def store(backend: Backend) -> Iterator[RedisStore]:
    s = RedisStore(backend.url)
    yield s
    s.close()


@pytest.fixture
def raw(backend: Backend) -> Iterator[redis.Redis]:
    client = backend.raw()
    yield client
    client.close()
