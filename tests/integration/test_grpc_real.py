"""The service end to end: a real grpc.aio server on loopback, the real SessionManager on
SmolLM2-135M and a real redis-server, driven through the SDK.

Covers the issue's list: health and reflection, a streamed Generate equal to `lsrt generate`,
each status code produced by the real backend, cancel mid-stream (rollback, next turn works) and
a request-id retry that does not generate twice.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from lsrt.clients import Client
from lsrt.clients.wire import Delta, Finished, Started, Unauthenticated
from lsrt.runtime.errors import (ContextTooLong, InvalidRequest, ResourceExhausted,
                                 SessionExists, SessionNotFound, VersionConflict)
from lsrt.runtime.llm import LLM
from lsrt.runtime.runner import RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.server import start_in_thread
from lsrt.runtime.session_manager import SessionManager

TOKEN = "s3cret-token"


@pytest.fixture
def served(manager):
    server = start_in_thread(manager, "127.0.0.1:0", auth_token=TOKEN)
    client = Client(f"127.0.0.1:{server.port}", token=TOKEN)
    yield client, server
    server.stop(1.0)


def test_health_reflection_and_generate_matches_lsrt_generate(served, smollm2):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client, server = served
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        meta = (("authorization", f"Bearer {TOKEN}"),)
        reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=meta,
            timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert {"lsrt.v1.Lsrt", "grpc.health.v1.Health"} <= names

    prompt = "Name three colours."
    client.create_session("g1")
    events = list(client.session("g1").send(prompt, stream=True, max_tokens=20, draft="none"))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    fin = events[-1]
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    direct = smollm2.generate(smollm2.encode_prompt(prompt, chat=True),
                              SamplingParams(max_tokens=20)).generation
    assert list(fin.token_ids) == direct.token_ids
    assert streamed == fin.text == direct.text
    assert fin.usage.completion_tokens == len(direct.token_ids)


def test_status_codes_from_the_real_backend(served, smollm2):
    client, server = served
    with pytest.raises(SessionNotFound):
        client.session("nope").send("hi", max_tokens=2)
    client.create_session("s1")
    with pytest.raises(SessionExists):
        client.create_session("s1")
    with pytest.raises(InvalidRequest):
        client.session("s1").send("hi", max_tokens=2, temperature=-1.0)
    with pytest.raises(ContextTooLong):
        client.session("s1").send("word " * (smollm2.context_limit + 10), max_tokens=2)
    with pytest.raises(Unauthenticated):
        Client(f"127.0.0.1:{server.port}", token="wrong").list_sessions()
    with pytest.raises(Unauthenticated):
        Client(f"127.0.0.1:{server.port}").list_sessions()
    # A second turn while one is streaming on the same session: ABORTED.
    stream = client.session("s1").send("Tell me a long story.", stream=True, max_tokens=64)
    assert isinstance(next(stream), Started)
    with pytest.raises(VersionConflict):
        client.session("s1").send("interrupt", max_tokens=2)
    stream.close()
    assert client.get_session("s1").version == 0  # the cancelled turn was rolled back


def test_resource_exhausted_with_a_tiny_kv_budget(smollm2_dir, session_store):
    llm = LLM(smollm2_dir, RunnerConfig(kv_budget_mb=2))  # ~44 tokens of KV
    manager = SessionManager(llm, session_store)
    server = start_in_thread(manager, "127.0.0.1:0")
    try:
        client = Client(f"127.0.0.1:{server.port}")
        client.create_session("big")
        with pytest.raises(ResourceExhausted):
            client.session("big").send("please " * 200, max_tokens=4)
        assert client.get_session("big").version == 0
    finally:
        server.stop(1.0)
        manager.close()


def test_cancel_mid_stream_rolls_back_and_next_turn_works(served):
    client, _ = served
    client.create_session("c1")
    s = client.session("c1")
    first = s.send("Hello!", max_tokens=8)
    v = client.get_session("c1").version
    stream = s.send("Write a long poem about rivers.", stream=True, max_tokens=200)
    seen = 0
    for event in stream:
        if isinstance(event, Delta):
            seen += 1
            if seen == 3:
                break
    stream.close()
    info = client.get_session("c1")
    assert info.version == v and info.num_tokens == first.usage.prompt_tokens + len(
        first.token_ids)
    again = s.send("Hello again!", max_tokens=6)
    assert again.version == v + 1


def test_request_id_retry_does_not_generate_twice(served, manager):
    client, _ = served
    client.create_session("r1")
    s = client.session("r1")
    a = s.send("Count to three.", max_tokens=10, request_id="req-1")
    turns = manager.stats()["turns"]
    b = s.send("Count to three.", max_tokens=10, request_id="req-1")
    assert b.replayed and not a.replayed
    assert b.version == a.version and list(b.token_ids) == list(a.token_ids)
    assert manager.stats()["turns"] == turns
    assert client.get_session("r1").version == a.version


def test_concurrent_turns_one_wins(served):
    client, _ = served
    client.create_session("cc")
    results: list[object] = []

    def turn(text: str) -> None:
        try:
            results.append(client.session("cc").send(text, max_tokens=24))
        except VersionConflict as err:
            results.append(err)

    threads = [threading.Thread(target=turn, args=(t,)) for t in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wins = [r for r in results if isinstance(r, Finished)]
    assert len(results) == 2 and len(wins) >= 1
    assert client.get_session("cc").version == len(wins)
