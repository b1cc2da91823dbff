"""SessionManager: persistent per-agent sessions whose target KV stays resident between turns.

Tokens are the source of truth (the store); a resident session is a cache of them: a KVSequence
covering a prefix of the stored tokens, the token history, the drafter and an LRU timestamp.
Before generating, `history[seq.num_tokens:-1]` is prefilled; the last token stays *pending*
(the engine's precondition). A session that is not resident (never loaded, evicted, restart)
is rebuilt from its stored tokens. A turn either commits atomically in the store (fenced by the
version it read) or leaves the store untouched and the resident state rolled back. Which
sessions stay resident, KV admission and LRU eviction belong to `session_resident.ResidentSet`.

Locks, always taken in this order: the per-session lock (one writer per session), then the
model lock (one model, many sessions: all model work and all KV pool accounting run under it).
Eviction only try-acquires session locks, so it never waits on them and never deadlocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lsrt.runtime.errors import (
    Cancelled, FingerprintMismatch, InvalidRequest, LsrtError, ResourceExhausted, VersionConflict)
from lsrt.runtime.kv_cache import KVSequence
from lsrt.runtime.llm import LLM
from lsrt.runtime.models import model_fingerprint
from lsrt.runtime.service_api import SessionInfo, TurnInfo
from lsrt.runtime.session_render import (
    RenderPlan, check_session_name, message_meta, parse_tool_calls, plan_turn)
from lsrt.runtime.session_resident import Resident, ResidentSet, TurnCounters
from lsrt.runtime.spec.drafter import Drafter
from lsrt.runtime.spec.drafters import make_drafter
from lsrt.runtime.spec.engine import Generation
from lsrt.runtime.types import (
    Timings, TurnDelta, TurnEvent, TurnFinished, TurnRequest, TurnStarted, Usage)
from lsrt.sessions.blob import decode_draft_blob, encode_draft_blob
from lsrt.sessions.store import SessionMeta, SessionRecord, SessionStore, Turn

DrafterFactory = Callable[[str, LLM], "Drafter | None"]
_POLL_S = 0.05  # how often a blocked wait looks at its cancel event


@dataclass
class _Marks:
    t0: float
    model: float = 0.0
    prefill_s: float = 0.0
    first_delta: float = 0.0


class SessionManager:
    """The `SessionBackend` over one `LLM` and a `SessionStore`."""

    def __init__(self, llm: LLM, store: SessionStore, *, default_draft: str = "suffix",
                 kv_reserve_tokens: int = 512, clock: Callable[[], float] = time.time,
                 drafter_factory: DrafterFactory = make_drafter) -> None:
        if kv_reserve_tokens < 0:
            raise ValueError(f"kv_reserve_tokens must be >= 0, got {kv_reserve_tokens}")
        self.llm = llm
        self.store = store
        self.default_draft = default_draft
        self.kv_reserve_tokens = kv_reserve_tokens
        self.clock = clock
        self._make_drafter = drafter_factory
        self._make_drafter(default_draft, llm)  # InvalidRequest for an unknown spec, now
        self.fingerprint = f"{model_fingerprint(llm.model_dir)}:{llm.config.dtype}"
        self._model_lock = threading.Lock()
        self._guard = threading.Lock()  # the session-lock table and the counters
        self._session_locks: dict[str, threading.Lock] = {}
        self._holder_cancel: dict[str, threading.Event] = {}  # cancel event of the running turn
        self._residents = ResidentSet(  # changed only under the model lock
            llm.runner.pool, reserve_tokens=kv_reserve_tokens, clock=clock,
            lock_of=self._existing_lock)
        self.counters = TurnCounters()

    def close(self) -> None:
        """Free every resident session's KV (the store keeps everything; nothing is lost)."""
        with self._model_lock:
            self._residents.drop_all()

    # ---- metadata -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        cfg = self.llm.config
        return {"model": self.llm.name, "fingerprint": self.fingerprint, "device": cfg.device,
                "dtype": cfg.dtype, "context_limit": self.llm.context_limit,
                "block_size": self.llm.runner.pool.block_size, "default_draft": self.default_draft}

    def stats(self) -> dict[str, float]:
        pool = self.llm.runner.pool
        out = self.counters.snapshot()
        try:
            out["sessions_total"] = float(len(self.store.list(limit=1_000_000)))
        except LsrtError:
            out["sessions_total"] = -1.0
        out.update(sessions_resident=float(len(self._residents)),
                   kv_blocks_used=float(pool.num_used_blocks),
                   kv_blocks_total=float(pool.num_blocks))
        return out

    def _info(self, meta: SessionMeta, turns: list[Turn] | None = None) -> SessionInfo:
        return SessionInfo(
            name=meta.name, version=meta.version, num_tokens=meta.num_tokens,
            created=meta.created, updated=meta.updated, parent=meta.parent or None,
            draft=meta.draft or None,
            turns=tuple(TurnInfo(role=t.role, text=t.text, start=t.start, end=t.end)
                        for t in turns or ()),
            usage={k: float(v) for k, v in meta.usage.items()},
            resident=meta.name in self._residents,
            metadata=dict(meta.extra.get("metadata", {})))

    def get_session(self, name: str) -> SessionInfo:
        record = self.store.get(check_session_name(name))
        return self._info(record.meta, record.turns)

    def list_sessions(self, prefix: str = "", limit: int = 1000) -> list[SessionInfo]:
        return [self._info(meta) for meta in self.store.list(prefix, limit)]

    # ---- lifecycle ------------------------------------------------------------------------

    def create_session(self, name: str, *, system: str | None = None, draft: str | None = None,
                       ttl_s: int | None = None, metadata: dict[str, str] | None = None
                       ) -> SessionInfo:
        """A new session; a `system` prompt is committed as turn 0 (version 1) and prefilled
        eagerly when the KV pool has room (else lazily, at the first turn)."""
        check_session_name(name)
        spec = draft or self.default_draft
        self._make_drafter(spec, self.llm)  # validates the spec before anything is stored
        self.store.create(SessionMeta.new(name, fingerprint=self.fingerprint, ttl_s=ttl_s,
                                          draft=spec, extra={"metadata": dict(metadata or {})}))
        if system:
            msg = {"role": "system", "content": system}
            try:
                tokens = self.llm.tokenizer.apply_chat([msg], add_generation_prompt=False)
            except Exception:  # noqa: BLE001 - a template that wants a user turn: tokens later
                tokens = []
            self.store.commit_turn(name, expected_version=0, truncate_to=0, new_tokens=tokens,
                                   turns=[Turn(role="system", start=0, end=len(tokens),
                                               text=system)])
            if self._model_lock.acquire(blocking=False):  # never wait behind a generation
                try:
                    self._warm(name, self.store.get(name))
                finally:
                    self._model_lock.release()
        return self.get_session(name)

    def _warm(self, name: str, record: SessionRecord) -> None:
        """Prefill a session's stored tokens if the pool has room; a cache, so no error."""
        if len(record.tokens) < 2 or name in self._residents:
            return
        res = self._new_resident(name, record)
        try:
            self._residents.make_room(name, res, 0, len(record.tokens))
            res.seq.reserve(len(record.tokens))
            self.llm.runner.prefill(res.seq, record.tokens[:-1])
        except ResourceExhausted:
            res.seq.release()
            return
        self._residents.put(name, res)

    def delete_session(self, name: str) -> bool:
        check_session_name(name)
        with self._model_lock:
            self._residents.drop(name)
            deleted = self.store.delete(name)
        with self._guard:
            lock = self._session_locks.get(name)
            if lock is not None and not lock.locked():
                del self._session_locks[name]
        return deleted

    def fork_session(self, name: str, new_name: str, at_turn: int | None) -> SessionInfo:
        """store.fork; a resident parent shares its KV blocks with the child (copy-on-write)."""
        check_session_name(name)
        check_session_name(new_name)
        self.store.fork(name, new_name, at_turn=at_turn)
        with self._model_lock:
            parent = self._residents.get(name)
            if parent is not None and new_name not in self._residents:  # (a turn may have won)
                record = self.store.get(new_name)
                n = min(parent.seq.num_tokens, len(record.tokens) - 1)
                if n > 0 and parent.history[:len(record.tokens)] == record.tokens:
                    self._residents.put(new_name, Resident(
                        seq=parent.seq.fork(n), history=list(record.tokens),
                        drafter=self._fresh_drafter(record), version=record.meta.version,
                        last_used=self.clock()))
        return self.get_session(new_name)

    # ---- residency ------------------------------------------------------------------------

    def _fresh_drafter(self, record: SessionRecord) -> Drafter | None:
        drafter = self._make_drafter(record.meta.draft or self.default_draft, self.llm)
        if drafter is not None:
            drafter.observe(list(record.tokens))
        return drafter

    def _restored_drafter(self, name: str, record: SessionRecord) -> Drafter | None:
        """The drafter from the stored blob when it is valid for this version, else rebuilt."""
        drafter = self._make_drafter(record.meta.draft or self.default_draft, self.llm)
        if drafter is None:
            return None
        try:
            blob = self.store.get_draft(name)
        except LsrtError:
            blob = None
        state = None if blob is None else decode_draft_blob(
            blob, expected_version=record.meta.version, fingerprint=self.fingerprint)
        if state is not None and state.num_tokens == len(record.tokens):
            try:
                drafter.import_state(state)
                return drafter
            except ValueError:  # another kind or header: a miss
                pass
        return self._fresh_drafter(record)

    def _new_resident(self, name: str, record: SessionRecord) -> Resident:
        return Resident(seq=self.llm.runner.new_sequence(), history=list(record.tokens),
                         drafter=self._restored_drafter(name, record),
                         version=record.meta.version, last_used=self.clock())

    def _resident_for(self, name: str, record: SessionRecord) -> tuple[Resident, bool]:
        """(state, fresh): the resident state if it matches the store, else a new empty one
        (not registered yet; its KV is prefilled by the turn)."""
        res = self._residents.get(name)
        if res is not None and res.version == record.meta.version and \
                res.history == record.tokens:
            return res, False
        self._residents.drop(name)
        return self._new_resident(name, record), True

    # ---- turns ----------------------------------------------------------------------------

    def _session_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._session_locks.setdefault(name, threading.Lock())

    def _existing_lock(self, name: str) -> threading.Lock | None:
        """`name`'s lock if one was made (eviction try-acquires it), without creating one."""
        with self._guard:
            return self._session_locks.get(name)

    @staticmethod
    def _acquire(lock: threading.Lock, cancel: threading.Event, *, wait: bool) -> bool:
        if not wait:
            return lock.acquire(blocking=False)
        while not lock.acquire(timeout=_POLL_S):
            if cancel.is_set():
                raise Cancelled("cancelled while waiting for the session")
        return True

    def run_turn(self, name: str, request: TurnRequest, emit: Callable[[TurnEvent], None],
                 cancel: threading.Event) -> TurnFinished:
        """One turn (see SessionBackend.run_turn). BLOCKING; called from a worker thread."""
        marks = _Marks(t0=time.perf_counter())
        check_session_name(name)
        if cancel.is_set():
            raise Cancelled("cancelled before the turn started")
        lock = self._session_lock(name)
        if not self._acquire(lock, cancel, wait=request.wait or self._holder_cancelled(name)):
            raise VersionConflict(f"session {name!r} is busy with another turn")
        with self._guard:
            self._holder_cancel[name] = cancel
        try:
            self.counters.add(running_turns=1)
            try:
                return self._admitted_turn(name, request, emit, cancel, marks)
            finally:
                self.counters.add(running_turns=-1)
        finally:
            with self._guard:
                self._holder_cancel.pop(name, None)
            lock.release()

    def _holder_cancelled(self, name: str) -> bool:
        """The running turn on `name` was cancelled: it is only rolling back, so a new turn
        waits for it instead of failing with a conflict."""
        with self._guard:
            event = self._holder_cancel.get(name)
        return event is not None and event.is_set()

    def _admitted_turn(self, name: str, request: TurnRequest, emit: Callable[[TurnEvent], None],
                       cancel: threading.Event, marks: _Marks) -> TurnFinished:
        record = self.store.get(name)
        meta = record.meta
        if request.request_id:
            done = self.store.find_turn_by_request_id(name, request.request_id)
            if done is not None:
                return self._replay(record, done, marks)
        if request.expected_version is not None and request.expected_version != meta.version:
            raise VersionConflict(f"session {name!r} is at version {meta.version}, "
                                  f"the request expected {request.expected_version}")
        if meta.fingerprint and meta.fingerprint != self.fingerprint:
            raise FingerprintMismatch(f"session {name!r} was made with model {meta.fingerprint}; "
                                      f"this server runs {self.fingerprint}")
        if not request.messages and not request.generate:
            raise InvalidRequest("a turn with generate=false needs at least one message")
        if request.draft is not None:
            self._make_drafter(request.draft, self.llm)
        plan = plan_turn(self.llm.tokenizer, record.tokens, record.turns, request.messages,
                         generate=request.generate, full_history=request.full_history,
                         tools=request.tools)
        if not plan.prompt:
            raise InvalidRequest("the turn renders to no tokens")
        max_new = request.sampling.max_tokens if request.generate else 0
        self.llm.runner.check_context(len(plan.prompt) + max_new)
        self._acquire(self._model_lock, cancel, wait=True)  # waits, or raises Cancelled
        try:
            marks.model = time.perf_counter()
            return self._execute(name, record, plan, request, emit, cancel, marks)
        finally:
            self._model_lock.release()

    def _execute(self, name: str, record: SessionRecord, plan: RenderPlan, request: TurnRequest,
                 emit: Callable[[TurnEvent], None], cancel: threading.Event, marks: _Marks
                 ) -> TurnFinished:
        """Under the model lock: make resident, prefill, generate, commit; roll back on failure."""
        if cancel.is_set():
            raise Cancelled("cancelled before the turn started")
        res, fresh = self._resident_for(name, record)
        old_len, prompt = len(res.history), plan.prompt
        keep = min(res.seq.num_tokens, plan.common, len(prompt) - 1)
        need = len(prompt) + (request.sampling.max_tokens + self.llm.engine.max_tree_nodes
                              if request.generate else 0)
        try:
            self._residents.make_room(name, res, keep, need)
        except BaseException:
            if fresh:
                res.seq.release()
            raise
        try:
            res.seq.truncate(keep)
            res.seq.reserve(need)
            if res.drafter is not None:
                if plan.common < old_len:
                    res.drafter.rollback(plan.common)
                res.drafter.observe(prompt[plan.common:])
            res.history = list(prompt)
            self._prefill(res.seq, prompt[keep:-1], cancel)
            marks.prefill_s = time.perf_counter() - marks.model
            usage = Usage(prompt_tokens=len(prompt), cached_tokens=keep,
                          recomputed_tokens=len(prompt) - 1 - keep,
                          rebuilt=fresh and len(record.tokens) > 0)
            version = record.meta.version + 1
            emit(TurnStarted(session=name, version=version, prompt_tokens=usage.prompt_tokens,
                             cached_tokens=keep, recomputed_tokens=usage.recomputed_tokens))
            gen = self._generate(res, request, emit, cancel, marks) if request.generate else None
            turns = self._new_turns(plan, request, res, gen, usage, version)
            totals = self._totals(record.meta.usage, usage)
            self.store.commit_turn(name, expected_version=record.meta.version,
                                   truncate_to=plan.common, new_tokens=res.history[plan.common:],
                                   turns=turns, meta_updates={"usage": totals,
                                                              "fingerprint": self.fingerprint})
        except BaseException:
            self._roll_back(name, res, fresh, old_len, plan.common)
            raise
        return self._after_commit(name, res, version, gen, usage, turns, marks)

    def _prefill(self, seq: KVSequence, tokens: list[int], cancel: threading.Event) -> None:
        """Prefill in the runner's chunks, checking `cancel` between them (long rebuilds)."""
        chunk = self.llm.runner.config.prefill_chunk
        for i in range(0, len(tokens), chunk):
            if cancel.is_set():
                raise Cancelled("cancelled during prefill")
            self.llm.runner.prefill(seq, tokens[i:i + chunk])

    def _generate(self, res: Resident, request: TurnRequest, emit: Callable[[TurnEvent], None],
                  cancel: threading.Event, marks: _Marks) -> Generation:
        drafter = res.drafter
        if request.draft is not None:  # a per-turn drafter; the session's one catches up after
            drafter = self._make_drafter(request.draft, self.llm)
            if drafter is not None:
                drafter.observe(list(res.history))
        limit = self.llm.context_limit
        if len(res.history) + request.sampling.max_tokens + self.llm.engine.max_tree_nodes > limit:
            drafter = None  # a draft tree must not reach past the context limit
        start = len(res.history)

        def on_text(text: str, ids: list[int]) -> None:
            if not marks.first_delta:
                marks.first_delta = time.perf_counter()
            emit(TurnDelta(text=text, token_ids=list(ids)))

        gen = self.llm.engine.generate(res.seq, res.history, request.sampling, drafter=drafter,
                                       on_text=on_text, cancel=cancel)
        if res.drafter is not None and drafter is not res.drafter:
            res.drafter.observe(res.history[start:])
        return gen

    def _new_turns(self, plan: RenderPlan, request: TurnRequest, res: Resident,
                   gen: Generation | None, usage: Usage, version: int) -> list[Turn]:
        rid = request.request_id
        turns = [Turn(role=m.role, start=s, end=e, text=m.content, request_id=rid,
                      meta=message_meta(m))
                 for m, (s, e) in zip(plan.new_messages, plan.spans)]
        record = {"version": version, "usage": asdict(usage)}
        if gen is None:
            record["finish_reason"] = "appended"
            last = turns[-1] if turns else None
            if last is not None:
                turns[-1] = Turn(role=last.role, start=last.start, end=last.end, text=last.text,
                                 request_id=rid, meta={**last.meta, **record})
            return turns
        usage.completion_tokens = len(gen.token_ids)
        usage.drafted_tokens = gen.stats.drafted_tokens
        usage.accepted_tokens = gen.stats.accepted_tokens
        usage.spec_steps = gen.stats.steps
        calls = parse_tool_calls(gen.text, getattr(self.llm.tokenizer.hf, "chat_template", None))
        record.update(usage=asdict(usage), generated=True, finish_reason=gen.finish_reason,
                      completion_tokens=len(gen.token_ids), tool_calls=list(calls))
        turns.append(Turn(role="assistant", start=plan.messages_end, end=len(res.history),
                          text=gen.text, request_id=rid, meta=record))
        return turns

    @staticmethod
    def _totals(old: dict[str, int], usage: Usage) -> dict[str, int]:
        totals = dict(old)
        for key, value in asdict(usage).items():
            if not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + int(value)
        totals["turns"] = totals.get("turns", 0) + 1
        return totals

    def _roll_back(self, name: str, res: Resident, fresh: bool, old_len: int,
                   common: int) -> None:
        """Back to the last committed state: cut what this turn added to the KV, history and
        drafter; a turn that had cut committed tokens (token-level diff) drops residency."""
        try:
            if common < old_len:
                raise LookupError("committed tokens were recomputed")
            res.seq.truncate(max(0, min(res.seq.num_tokens, old_len - 1)))
            del res.history[old_len:]
            if res.drafter is not None:
                res.drafter.rollback(old_len)
            self._residents.trim(res)
            self._residents.put(name, res)
        except Exception:  # noqa: BLE001 - unsure what is valid: rebuild from tokens next time
            self._residents.forget(name, res)
            res.seq.release()

    def _after_commit(self, name: str, res: Resident, version: int, gen: Generation | None,
                      usage: Usage, turns: list[Turn], marks: _Marks) -> TurnFinished:
        res.version = version
        self._residents.trim(res)
        self._residents.put(name, res)
        state = res.drafter.export_state() if res.drafter is not None else None
        if state is not None:
            try:
                blob = encode_draft_blob(state, session_version=version,
                                         fingerprint=self.fingerprint)
                self.store.put_draft(name, version, blob)
            except (LsrtError, ValueError):
                pass  # the blob is a cache; the turn is committed
        now = time.perf_counter()
        decode_s = gen.decode_s if gen is not None else 0.0
        timings = Timings(queue_s=marks.model - marks.t0, prefill_s=marks.prefill_s,
                          decode_s=decode_s, total_s=now - marks.t0,
                          ttft_s=(marks.first_delta or now) - marks.t0)
        self.counters.record_turn(usage, decode_s)
        return TurnFinished(
            session=name, version=version,
            finish_reason=gen.finish_reason if gen is not None else "appended",
            text=gen.text if gen is not None else "",
            token_ids=list(gen.token_ids) if gen is not None else [], usage=usage,
            timings=timings, tool_calls=tuple(turns[-1].meta.get("tool_calls", ())))

    def _replay(self, record: SessionRecord, turn: Turn, marks: _Marks) -> TurnFinished:
        """The answer of an already committed request, rebuilt from its turn; no generation."""
        meta = turn.meta
        n = int(meta.get("completion_tokens", 0))
        fields = {k: v for k, v in meta.get("usage", {}).items() if k in Usage.__dataclass_fields__}
        generated = bool(meta.get("generated"))
        return TurnFinished(
            session=record.meta.name, version=int(meta.get("version", record.meta.version)),
            finish_reason=str(meta.get("finish_reason", "appended")),
            text=turn.text if generated else "",
            token_ids=list(record.tokens[turn.end - n:turn.end]) if n else [],
            usage=Usage(**fields), timings=Timings(total_s=time.perf_counter() - marks.t0),
            tool_calls=tuple(meta.get("tool_calls", ())), replayed=True)
