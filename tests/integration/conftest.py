"""Fixtures for the SessionManager tests: one real redis-server, a fresh store per test, and a
SessionManager over the session-scoped SmolLM2 (tests/conftest.py) that frees its KV after."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

_HELPER = Path(__file__).resolve().parents[1] / "redis_server.py"


def _load_redis_helper():
    """tests/ is not a package: load tests/redis_server.py by path."""
    spec = importlib.util.spec_from_file_location("lsrt_tests_redis_server", _HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def redis_helper():
    """The tests/redis_server.py module (RedisServer, free_port, wait_for)."""
    return _load_redis_helper()


@pytest.fixture(scope="session")
def sessions_redis(redis_helper, tmp_path_factory: pytest.TempPathFactory):
    server = redis_helper.RedisServer(tmp_path_factory.mktemp("sessions-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def session_store(sessions_redis) -> Iterator:
    from lsrt.sessions.redis_store import RedisStore

    with sessions_redis.client() as client:
        client.flushall()
    store = RedisStore(sessions_redis.url)
    yield store
    store.close()


@pytest.fixture
def manager(smollm2, session_store) -> Iterator:
    from lsrt.runtime.session_manager import SessionManager

    m = SessionManager(smollm2, session_store)
    yield m
    m.close()
