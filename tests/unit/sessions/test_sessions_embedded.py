"""EmbeddedRedis lifecycle and open_store(): restart on the same dir, pidfile reuse, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsrt.runtime.errors import StoreError
from lsrt.sessions.embedded import EmbeddedRedis, _pid_alive, default_data_dir, open_store
from lsrt.sessions.redis_store import RedisStore
from lsrt.sessions.store import SessionMeta, Turn

pytestmark = pytest.mark.redis


def _commit_one(store: RedisStore, name: str) -> None:
    store.create(SessionMeta.new(name))
    store.commit_turn(name, expected_version=0, truncate_to=0, new_tokens=[3, 1, 4],
                      turns=[Turn(role="user", start=0, end=3, text="pi")])  # fmt: skip


def test_default_data_dir_from_given_environment(tmp_path: Path) -> None:
    assert default_data_dir({"LSRT_HOME": str(tmp_path)}) == tmp_path / "data"
    assert default_data_dir({}) == Path.home() / ".local" / "share" / "lsrt"


def test_stop_and_start_keeps_data(tmp_path: Path) -> None:
    emb = EmbeddedRedis(tmp_path / "data").start()
    try:
        assert emb.url.startswith("unix://")
        with RedisStore(emb.url) as store:
            _commit_one(store, "s")
        first_pid = emb.pid
        emb.stop()
        assert not _pid_alive(first_pid)
        emb.start()
        assert emb.pid != first_pid and not emb.reused
        with RedisStore(emb.url) as store:
            rec = store.get("s")
        assert rec.tokens == [3, 1, 4] and rec.turns[0].text == "pi" and rec.meta.version == 1
    finally:
        emb.stop()


def test_live_server_from_earlier_run_is_reused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path).start()
    try:
        with RedisStore(first.url) as store:
            _commit_one(store, "s")
        second = EmbeddedRedis(tmp_path).start()  # as if the runtime had crashed and restarted
        assert second.reused and second.pid == first.pid and second.url == first.url
        with RedisStore(second.url) as store:
            assert store.get("s").tokens == [3, 1, 4]
        pid = second.pid
        second.stop()
        assert not _pid_alive(pid)
    finally:
        first.stop()


def test_stale_pidfile_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "redis.pid").write_text(f"{dead.pid}\n")
    with EmbeddedRedis(tmp_path) as emb:
        assert not emb.reused and emb.pid != dead.pid
    (tmp_path / "redis.pid").write_text(f"{os.getpid()}\n")  # alive, but not a redis-server
    with EmbeddedRedis(tmp_path) as emb:
        assert not emb.reused and emb.pid != os.getpid()


def test_long_data_dir_falls_back_to_loopback_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep) as emb:
        assert emb.url.startswith("redis://127.0.0.1:")
        with RedisStore(emb.url) as store:
            _commit_one(store, "s")
    with EmbeddedRedis(deep) as emb:
        with RedisStore(emb.url) as store:
            assert store.get("s").tokens == [3, 1, 4]


def test_open_store_embedded_and_closer(tmp_path: Path) -> None:
    store, closer = open_store(None, tmp_path)
    try:
        _commit_one(store, "s")
        pid = int((tmp_path / "redis.pid").read_text())
    finally:
        closer()
    assert not _pid_alive(pid)


def test_open_store_with_url(redis_server) -> None:
    store, closer = open_store(redis_server.url, None)
    try:
        store.create(SessionMeta.new("via-url"))
        assert store.exists("via-url")
        store.delete("via-url")
    finally:
        closer()


def test_unreachable_url_names_the_url(redis_helper) -> None:
    url = f"redis://127.0.0.1:{redis_helper.free_port()}/0"
    with pytest.raises(StoreError, match=f"127.0.0.1:{url.split(':')[-1]}"):
        open_store(url, None)
    store = RedisStore(url)
    with pytest.raises(StoreError, match="cannot reach Redis"):
        store.get("s")
    store.close()


def test_embedded_failure_points_at_redis_url(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(StoreError, match="--redis-url"):
        open_store(None, blocker / "data")
