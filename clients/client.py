"""The blocking SDK: `Client` (server and session calls) and `Session` (turns on one session).

Requests, responses, errors and retries come from `lsrt.clients.wire`, shared with `AsyncClient`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from lsrt.clients import wire
from lsrt.proto import lsrt_pb2 as pb
from lsrt.proto import lsrt_pb2_grpc
from lsrt.runtime.service_api import SessionInfo


class Client:
    """A connection to an lsrt server. `timeout` (seconds) is the default deadline of each call."""

    def __init__(self, addr: str, *, token: str | None = None, timeout: float | None = None):
        self.addr = addr
        self.timeout = timeout
        self._metadata = wire.call_metadata(token)
        self._channel = grpc.insecure_channel(addr)
        self._stub = lsrt_pb2_grpc.LsrtStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: str, request: Any, timeout: float | None = None, rid: str = "") -> Any:
        """One unary call with the shared retry policy; raises typed `LsrtError`s."""
        stub_method: Callable = getattr(self._stub, method)
        attempt = 0
        while True:
            try:
                return stub_method(
                    request, metadata=self._metadata, timeout=timeout or self.timeout
                )
            except grpc.RpcError as err:
                if not wire.should_retry(method, err, attempt, request_id=rid):
                    raise wire.error_from(err) from None
            time.sleep(wire.backoff_s(attempt))
            attempt += 1

    # ---- server ----

    def info(self) -> dict[str, Any]:
        """Model name, fingerprint, device, dtype, context limit."""
        return wire.info_from(self._unary("GetServerInfo", pb.GetServerInfoRequest()))

    def stats(self) -> dict[str, float]:
        return wire.stats_from(self._unary("GetStats", pb.GetStatsRequest()))

    def cancel(self, request_id: str) -> bool:
        """Cancels a running turn by request id (see `Started.request_id`); False if none ran."""
        return self._unary("Cancel", pb.CancelRequest(request_id=request_id)).cancelled

    # ---- sessions ----

    def create_session(self, name: str, **options: Any) -> SessionInfo:
        """Options: system, draft, ttl_s, metadata."""
        return wire.session_from(self._unary("CreateSession", wire.create_request(name, **options)))

    def get_session(self, name: str) -> SessionInfo:
        return wire.session_from(self._unary("GetSession", pb.GetSessionRequest(name=name)))

    def list_sessions(self, prefix: str = "", limit: int = 0) -> list[SessionInfo]:
        reply = self._unary("ListSessions", pb.ListSessionsRequest(prefix=prefix, limit=limit))
        return [wire.session_from(s) for s in reply.sessions]

    def delete_session(self, name: str) -> bool:
        return self._unary("DeleteSession", pb.DeleteSessionRequest(name=name)).deleted

    def fork_session(self, name: str, new_name: str, at_turn: int | None = None) -> SessionInfo:
        request = wire.fork_request(name, new_name, at_turn)
        return wire.session_from(self._unary("ForkSession", request))

    def session(self, name: str) -> Session:
        """A handle on session `name` (no call is made)."""
        return Session(self, name)

    # ---- turns ----

    def _generate(
        self, request: pb.GenerateRequest, timeout: float | None, *, restartable: bool
    ) -> Iterator[wire.Event]:
        """Streams one turn. Closing the iterator early cancels the call (the server rolls back).
        With `restartable`, a retry may replay events already yielded (the caller discards them)."""
        attempt = 0
        while True:
            call = self._stub.Generate(
                request, metadata=self._metadata, timeout=timeout or self.timeout
            )
            yielded = False
            try:
                for event in call:
                    yielded = True
                    yield wire.event_from(event)
                return
            except grpc.RpcError as err:
                if not wire.should_retry_turn(err, attempt, request, restartable or not yielded):
                    raise wire.error_from(err) from None
            finally:
                call.cancel()  # a no-op once the call is done
            time.sleep(wire.backoff_s(attempt))
            attempt += 1


class Session:
    """Turns on one session. `send` generates, `append` only adds messages (e.g. tool results)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def send(
        self, messages: Any, *, stream: bool = False, timeout: float | None = None, **options: Any
    ) -> wire.Finished | Iterator[wire.Event]:
        """Generates one turn after `messages` (a str is one user message).

        stream=False returns the `Finished` result (with the full text); stream=True returns an
        iterator of `Started`, `Delta`s and `Finished`. Options: see `wire.generate_request`.
        """
        request = wire.generate_request(self.name, messages, **options)
        if stream:
            return self.client._generate(request, timeout, restartable=False)
        finished = None
        for event in self.client._generate(request, timeout, restartable=True):
            if isinstance(event, wire.Finished):
                finished = event
        if finished is None:
            raise wire.missing_finished(self.name)
        return finished

    def append(
        self, messages: Any, *, timeout: float | None = None, **options: Any
    ) -> wire.Finished:
        """Adds messages and prefills them without generating (options: full_history, tools,
        expected_version, request_id, wait)."""
        request = wire.append_request(self.name, messages, **options)
        reply = self.client._unary("Append", request, timeout, rid=request.request_id)
        return wire.finished_from(reply)

    def fork(self, new_name: str, at_turn: int | None = None) -> Session:
        self.client.fork_session(self.name, new_name, at_turn)
        return Session(self.client, new_name)

    def info(self) -> SessionInfo:
        return self.client.get_session(self.name)

    def delete(self) -> bool:
        return self.client.delete_session(self.name)
