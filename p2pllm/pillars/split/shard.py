"""The shard role: layers [start, end) of a model, a KV cache row per session, and a worker
that pushes each step's output straight to the next shard.

Flow of one session (protocol.md section 9):

1. SHARD_OPEN (a streamed request from the coordinator) takes a cache row; the shard
   answers a first partial when ready, and keeps the stream open: the last shard streams one
   SHARD_RESULT partial per sampled token, the final response (SHARD_CLOSE) says why the
   session ended, an ERROR says why it failed. Whatever ends the stream frees the row.
2. SHARD_FORWARD brings T new positions (token ids on the first shard, hidden states
   elsewhere). It is checked and queued at once; the batching loop takes queued steps one at a
   time (or, with ``batch_decode``, the one-token steps of several sessions in one forward),
   runs each forward on the role's worker thread (``Role.worker``), then sends hidden states
   to the next shard as one-way SHARD_FORWARDs, from the worker's follow-up (``then``: on the
   event loop as the result lands, before the batching loop's turn; its bookkeeping comes
   after the frame has left). The last shard samples and sends the token back to the first
   shard itself (the ring), so decoding never waits on the coordinator.
3. SHARD_CLOSE (or the coordinator cancelling the OPEN stream, or the session idling past
   ``session_idle_s``) frees the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from p2pllm.daemon.roles import Refused, Role, RoleHandler
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import KVBudgetError, KVCacheFullError, ModelError
from p2pllm.engine.loader import load_slice
from p2pllm.pillars.caps import check_session_tokens, check_sessions, set_kv_limit
from p2pllm.pillars.rolemodel import model_refusal, need_layers, role_model_path
from p2pllm.pillars.split.compute import Sampler, ShardEngine, Step
from p2pllm.pillars.split.messages import (
    Hop,
    OpenSession,
    ShardParams,
    forward_meta,
    parse_close,
    parse_forward,
)
from p2pllm.plan.layers import free_bytes
from p2pllm.wire.connection import ConnectionClosed, Reply, Request
from p2pllm.wire.frame import Buffer, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import pack_tensors, torch_dtype, unpack_tensors

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

log = logging.getLogger(__name__)

__all__ = ["ShardRole"]


@dataclass(frozen=True)
class _Event:
    """What a session's OPEN stream reports next."""

    kind: str  # "token" | "end" | "error"
    token: int = 0
    step: int = 0
    reason: str = ""
    code: ErrorCode = ErrorCode.INTERNAL


@dataclass(eq=False)
class _Session:
    id: str
    row: int
    max_len: int
    sampler: Sampler | None
    opened: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    expect: int = 0  # next position this shard expects (advanced when a step is queued)
    closed: bool = False
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    steps: int = 0
    positions: int = 0
    compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "positions": self.positions,
                "compute_s": round(self.compute_s, 6), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "tokens": self.sampler.generated if self.sampler else 0}


@dataclass(eq=False)
class _Work:
    session: _Session
    step: Step
    queued: float = field(default_factory=time.perf_counter)


_Result = torch.Tensor | tuple[int, str | None] | None | KVCacheFullError
_INT64 = struct.Struct("<q")
_NUMPY_WIRE = {torch.float32: "float32", torch.float16: "float16"}  # dtypes numpy holds


def _hidden_payload(t: torch.Tensor) -> tuple[list[dict[str, Any]], list[Buffer]]:
    """pack_tensors({"hidden": t}) of a step's output: the same descriptor and bytes, a
    contiguous CPU float32/float16 tensor's straight through numpy (no views: each torch
    call costs ~20 us right after a forward, with cold caches)."""
    name = _NUMPY_WIRE.get(t.dtype)
    if name is None or t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return pack_tensors({"hidden": t})
    return ([{"name": "hidden", "dtype": name, "shape": list(t.shape)}],
            [memoryview(t.numpy()).cast("B")])  # type: ignore[arg-type]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShardRole(Role):
    """One pipeline stage of a split-inference job."""

    kind = "shard"

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any],
               params: Mapping[str, Any]) -> str | None:
        try:
            p = ShardParams.from_meta(params)
        except ProtocolError as exc:
            return f"bad shard parameters: {exc.message}"
        # FORBIDDEN (raised) for a path outside this node's roots; a model held by the
        # sources is fetched (its slice only) when the role starts
        refusal = model_refusal(config, p.model, p.sources)
        if refusal is not None:
            return refusal
        avail = free_bytes(caps)
        if p.stage_bytes > avail:
            return (f"not enough memory for layers {p.layers}: they need {p.stage_bytes} "
                    f"bytes, {avail} are free within this node's budget")
        return None

    # -- lifecycle ----------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.p = p = ShardParams.from_meta(self.params)
        # inside this node's roots (a hub download, with --allow-hub, in a thread), or the
        # pieces of this slice fetched from the sources into the models cache
        need = need_layers(p.start, p.end, p.num_layers) if p.sources else None
        path = await role_model_path(self.ctx, p.model, need, p.sources)
        try:
            config = ModelConfig.from_dir(path)
        except ModelError as exc:
            raise Refused(f"cannot read the config of {path}: {exc}") from exc
        for name, want, have in (("num_layers", p.num_layers, config.num_layers),
                                 ("hidden_size", p.hidden_size, config.hidden_size),
                                 ("vocab_size", p.vocab_size, config.vocab_size)):
            if want and want != have:
                raise Refused(f"the model at {path} has {name} {have}, the plan expects {want}: "
                              f"not the same model")
        self.model_name = path.name
        load = functools.partial(load_slice, path, layers=(p.start, p.end), embed=p.is_first,
                                 head=p.is_last, dtype=torch_dtype(p.dtype), device=_device(),
                                 quant=p.quant)
        try:
            model = await self.worker.run(load)
        except ModelError as exc:
            raise Refused(f"cannot load layers {p.layers} of {path}: {exc}") from exc
        self.engine = ShardEngine(model, rows=p.max_sessions, max_len=p.max_len,
                                  wire_dtype=torch_dtype(p.wire_dtype))
        self.params_loaded = model.num_parameters()
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        self._sessions: dict[str, _Session] = {}
        self._queue: deque[_Work] = deque()
        self._wake = asyncio.Event()
        self._busy_rows: set[int] = set()
        self._deferred_rows: list[int] = []
        self._sent_to: set[str] = set()  # nodes this batch's outputs went to
        self._started = time.monotonic()
        self._counters = dict(sessions_total=0, steps=0, positions=0, tokens=0, batches=0,
                              max_batch=0, max_open=0, bytes_in=0, bytes_out=0, frames_in=0,
                              frames_out=0, errors=0)
        self._compute_s = 0.0
        self._wait_s = 0.0
        self._tasks = [asyncio.create_task(self._work_loop(), name=f"shard{p.index}-worker"),
                       asyncio.create_task(self._reap_loop(), name=f"shard{p.index}-reaper")]
        log.info("shard %d/%d: layers %s of %s loaded (%d params)", p.index + 1, p.count,
                 p.layers, path.name, self.params_loaded)

    async def on_stop(self) -> None:
        if not hasattr(self, "engine"):  # start() did not get as far as loading
            return
        for s in list(self._sessions.values()):
            self._fail(s, ErrorCode.CANCELLED,
                       f"shard {self.p.index} (layers {self.p.layers}) was released")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        # wait for a forward still running on the worker, then drop the weights
        await self.worker.aclose()
        del self.engine

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {MsgType.SHARD_OPEN: self.on_open, MsgType.SHARD_FORWARD: self.on_forward,
                MsgType.SHARD_CLOSE: self.on_close}

    def summary(self) -> str:
        p = self.p
        return f"layers {p.start}-{p.end}/{p.num_layers} of {self.model_name}"

    def role_metrics(self) -> dict[str, Any]:
        c = self._counters
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "index": self.p.index,
            "layers": self.p.layers,
            "params": self.params_loaded,
            "sessions_open": len(self._sessions),
            **c,
            "compute_s": round(self._compute_s, 4),
            "wait_s": round(self._wait_s, 4),
            "busy": round(self._compute_s / elapsed, 4),
            "avg_batch": round(c["steps"] / c["batches"], 3) if c["batches"] else 0.0,
        }

    def _busy(self) -> float:
        """The fraction of its recent window this shard's worker computed (RoleWorker)."""
        return round(self.worker.busy_fraction(), 4)

    def memory_bytes(self) -> int:
        engine = getattr(self, "engine", None)
        if engine is None:
            return 0
        return self.weight_bytes + engine.cache.nbytes  # the KV storage it holds now

    # -- handlers -------------------------------------------------------------------------------

    async def on_open(self, req: Request) -> Reply:
        o = OpenSession.from_meta(req.meta, last=self.p.is_last)
        if o.session in self._sessions:
            raise ProtocolError(ErrorCode.DUPLICATE, f"session {o.session} is already open")
        cfg = self.ctx.config  # the caps (pillars/caps.py): nothing is created past one
        check_sessions(cfg, len(self._sessions), f"shard {self.p.index}")
        check_session_tokens(cfg, o.max_len, "a split session")
        if o.max_len > self.engine.max_len:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"the session needs {o.max_len} positions; "
                                f"shard {self.p.index} holds at most {self.engine.max_len}")
        set_kv_limit(self.engine.kv_budget, self.ctx.cluster)
        row = self.engine.take_row()
        if row is None:
            raise ProtocolError(ErrorCode.REFUSED, f"shard {self.p.index} is full: all "
                                f"{self.p.max_sessions} session rows are in use")
        sampler = None
        if self.p.is_last:
            sampler = Sampler(o.sampling, o.prompt_len, o.max_new, o.stop_ids, o.prompt_ids)
        s = _Session(o.session, row, o.max_len, sampler)
        self._sessions[s.id] = s
        self._counters["sessions_total"] += 1
        self._counters["max_open"] = max(self._counters["max_open"], len(self._sessions))
        try:
            await req.partial(MsgType.SHARD_OPEN, {
                "session": s.id, "shard": self.p.index, "layers": [self.p.start, self.p.end],
                "params": self.params_loaded, "busy": self._busy()})
            while True:
                ev = await s.events.get()
                if ev.kind == "token":
                    await req.partial(MsgType.SHARD_RESULT,
                                      {"session": s.id, "token": ev.token, "step": ev.step})
                elif ev.kind == "end":
                    return Reply(MsgType.SHARD_CLOSE, {"session": s.id, "reason": ev.reason,
                                                       "stats": {**s.stats(), "busy": self._busy()}})
                else:
                    raise ProtocolError(ev.code, ev.reason)
        finally:
            self._drop(s)

    async def on_forward(self, req: Request) -> Reply | None:
        try:
            sid, pos, sample = parse_forward(req.meta)
        except ProtocolError:
            if req.wants_reply:
                raise
            log.debug("shard %d: dropping a malformed one-way SHARD_FORWARD", self.p.index)
            return None
        s = self._sessions.get(sid)
        if s is None:
            if req.wants_reply:
                raise ProtocolError(ErrorCode.UNKNOWN_SESSION,
                                    f"no session {sid} on shard {self.p.index}")
            log.debug("shard %d: step for closed session %s dropped", self.p.index, sid)
            return None
        try:
            if pos != s.expect:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"step at position {pos}, but the "
                                    f"session's next position is {s.expect}")
            descs, payload = req.meta.get("tensors"), req.frame.payload
            x = self.engine.take_input(descs, payload, pos, s.max_len)
            if x is None:  # not the usual step: unpack and check it all (typed errors)
                x = self.engine.check_input(unpack_tensors(descs, payload), pos, s.max_len)
        except ProtocolError as exc:
            if req.wants_reply:
                raise
            self._counters["errors"] += 1
            self._fail(s, exc.code, f"shard {self.p.index} (layers {self.p.layers}) got a bad "
                       f"step: {exc.message}")
            return None
        nbytes = req.wire_bytes  # what the step took on the wire: 0 from a shard on this node
        s.bytes_in += nbytes
        self._counters["bytes_in"] += nbytes
        self._counters["frames_in"] += 1
        self._enqueue(s, Step(s.row, pos, x, sample))
        return Reply(MsgType.ACK, {"session": sid, "queued": int(x.shape[0])})

    async def on_close(self, req: Request) -> Reply:
        sid = parse_close(req.meta)
        s = self._sessions.get(sid)
        if s is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION,
                                f"no session {sid} on shard {self.p.index}")
        stats = {**s.stats(), "busy": self._busy()}
        s.events.put_nowait(_Event("end", reason="closed"))
        self._drop(s)
        return Reply(MsgType.ACK, {"session": sid, "stats": stats})

    # -- sessions -------------------------------------------------------------------------------

    def _enqueue(self, s: _Session, step: Step) -> None:
        s.expect = step.pos + step.tokens
        s.last_active = time.monotonic()
        self._queue.append(_Work(s, step))
        self._wake.set()

    def _drop(self, s: _Session) -> None:
        if s.closed:
            return
        s.closed = True
        self._sessions.pop(s.id, None)
        if s.row in self._busy_rows:
            self._deferred_rows.append(s.row)  # the worker thread is using it right now
        else:
            self.engine.give_row(s.row)

    def _fail(self, s: _Session, code: ErrorCode, message: str) -> None:
        if s.closed:
            return
        log.info("session %s failed on shard %d: %s", s.id, self.p.index, message)
        s.events.put_nowait(_Event("error", reason=message, code=code))
        self._drop(s)

    def _finish(self, s: _Session, reason: str) -> None:
        s.events.put_nowait(_Event("end", reason=reason))
        self._drop(s)

    async def _reap_loop(self) -> None:
        idle = self.p.session_idle_s
        while True:
            await asyncio.sleep(min(1.0, idle / 4))
            now = time.monotonic()
            for s in list(self._sessions.values()):
                if now - s.last_active > idle:
                    self._fail(s, ErrorCode.TIMEOUT, f"session {s.id} idle for more than "
                               f"{idle:g}s on shard {self.p.index}: freed")

    # -- the worker -----------------------------------------------------------------------------

    def _take_batch(self) -> list[_Work]:
        first = self._queue.popleft()
        batch = [first]
        if not self.p.batch_decode or first.step.tokens != 1:
            return batch
        seen = {first.session.id}
        while (self._queue and len(batch) < self.p.max_sessions
               and self._queue[0].step.tokens == 1 and self._queue[0].session.id not in seen):
            w = self._queue.popleft()
            seen.add(w.session.id)
            batch.append(w)
        return batch

    def _compute(self, batch: list[_Work]) -> list[_Result]:
        """On the worker thread: the forward, then (last shard) the sampling. A batch whose
        forward the KV cache refuses (nothing was written) runs step by step, so only the
        sessions that cannot grow get the refusal (a KVCacheFullError in their place)."""
        if len(batch) == 1:
            return self._compute_steps(batch)
        try:
            return self._compute_steps(batch)
        except KVCacheFullError:
            out: list[_Result] = []
            for w in batch:
                try:
                    out += self._compute_steps([w])
                except KVCacheFullError as exc:
                    out.append(exc)
            return out

    def _compute_steps(self, batch: list[_Work]) -> list[_Result]:
        outs = self.engine.run([w.step for w in batch])
        if not self.engine.model.has_head:
            return list(outs)
        results: list[_Result] = []
        for w, logits in zip(batch, outs, strict=True):
            sampler = w.session.sampler
            results.append(sampler.next(logits) if w.step.sample and sampler else None)
        return results

    async def _work_loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                waiting = bool(self._sessions)
                t0 = time.perf_counter()
                await self._wake.wait()
                if waiting:
                    self._wait_s += time.perf_counter() - t0
                continue
            batch = [w for w in self._take_batch() if not w.session.closed]
            if not batch:
                continue
            self._busy_rows = {w.step.row for w in batch}
            self._sent_to.clear()
            t0 = time.perf_counter()
            try:
                results = await self.worker.run(
                    self._compute, batch, then=functools.partial(self._emit_batch, batch, t0))
            except KVCacheFullError as exc:  # nothing was written; the session is freed
                for w in batch:
                    self._fail(w.session, *self._kv_refusal(exc))
                continue
            except (ModelError, ValueError) as exc:
                for w in batch:
                    self._fail(w.session, ErrorCode.BAD_REQUEST,
                               f"shard {self.p.index} cannot run the step: {exc}")
                continue
            except Exception as exc:
                log.warning("shard %d: forward failed", self.p.index, exc_info=True)
                for w in batch:
                    self._fail(w.session, ErrorCode.INTERNAL,
                               f"shard {self.p.index} failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                self._busy_rows = set()
                for row in self._deferred_rows:
                    self.engine.give_row(row)
                self._deferred_rows.clear()
            for w, result in zip(batch, results, strict=True):
                if isinstance(result, KVCacheFullError):  # this one could not grow
                    self._fail(w.session, *self._kv_refusal(result))
            for node in self._sent_to:  # backpressure: the frames are out, wait for room
                try:
                    await self.ctx.cluster.wait_writable(node)
                except (ConnectionClosed, OSError):
                    pass  # the session's next send fails it (PEER_DOWN)

    def _kv_refusal(self, exc: KVCacheFullError) -> tuple[ErrorCode, str]:
        """Past the memory budget: a cap (OVER_LIMIT); a full pool: REFUSED."""
        if isinstance(exc, KVBudgetError):
            return ErrorCode.OVER_LIMIT, (f"shard {self.p.index}'s KV memory over the cap "
                                          f"{exc.limit} (config key memory_budget): {exc}")
        return ErrorCode.REFUSED, f"shard {self.p.index}'s KV cache is full: {exc}"

    def _emit_batch(self, batch: list[_Work], t0: float, results: list[_Result]) -> None:
        """The worker's follow-up, on the event loop as the batch's results land: each
        step is counted and its output goes on at once (before the batching loop's turn)."""
        dt = time.perf_counter() - t0
        self._compute_s += dt
        c = self._counters
        c["batches"] += 1
        c["steps"] += len(batch)
        c["max_batch"] = max(c["max_batch"], len(batch))
        for w, result in zip(batch, results, strict=True):
            if isinstance(result, KVCacheFullError):  # failed by the batching loop
                continue
            s = w.session
            s.steps += 1
            s.positions += w.step.tokens
            s.compute_s += dt / len(batch)
            c["positions"] += w.step.tokens
            if not s.closed:
                self._emit(s, w.step, result)

    def _emit(self, s: _Session, step: Step,
              result: torch.Tensor | tuple[int, str | None] | None) -> None:
        """Send a step's output on: hidden states to the next shard, or the sampled token to
        the coordinator (OPEN stream) and back to the first shard."""
        if result is None:  # a prompt chunk that is not the last: nothing to send
            return
        if isinstance(result, torch.Tensor):
            assert self.p.next is not None
            self._send(s, self.p.next, step.pos, step.sample, *_hidden_payload(result))
            return
        token, reason = result
        assert s.sampler is not None
        self._counters["tokens"] += 1
        s.events.put_nowait(_Event("token", token=token, step=s.sampler.generated))
        if reason is not None:
            self._finish(s, reason)
            return
        first = self.p.first
        assert first is not None
        if first.node == self.ctx.node_id and first.rid == self.ctx.rid:  # one shard: no hop
            ids = torch.tensor([token], dtype=torch.int64)
            self._enqueue(s, Step(s.row, s.sampler.next_pos, ids, True))
            return
        # the id as int64 (T,) = (1,) on the wire: its 8 bytes, without a tensor
        self._send(s, first, s.sampler.next_pos, True,
                   [{"name": "ids", "dtype": "int64", "shape": [1]}], [_INT64.pack(token)])

    def _send(self, s: _Session, hop: Hop, pos: int, sample: bool,
              descs: list[dict[str, Any]], payload: list[Buffer]) -> None:
        """One-way SHARD_FORWARD of a step's tensors (``descs`` and ``payload`` as
        :func:`~p2pllm.wire.tensors.pack_tensors` gives them), written now; the batching
        loop waits for room on the link after its bookkeeping (``_sent_to``)."""
        meta = forward_meta(self.ctx.job, hop, s.id, pos, sample)
        meta["tensors"] = descs
        try:
            nbytes = self.ctx.cluster.notify_nowait(hop.node, MsgType.SHARD_FORWARD, meta,
                                                    payload)
        except (ConnectionClosed, OSError) as exc:
            self._fail(s, ErrorCode.PEER_DOWN, f"shard {self.p.index} cannot reach node "
                       f"{hop.node[:8]} ({hop.rid}): {exc}")
            return
        self._sent_to.add(hop.node)
        s.bytes_out += nbytes
        self._counters["bytes_out"] += nbytes
        self._counters["frames_out"] += 1
