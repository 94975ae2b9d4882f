"""Coordinator of split inference: GENERATE mode "split".

The daemon that receives GENERATE tokenizes the prompt (from its own copy of the model's
tokenizer), then runs the session on a *pipeline*: a job holding one shard role per layer
range, planned over the nodes that have the model in proportion to their free memory (or on
the ranges the user gave). Pipelines outlive one request: concurrent and later requests for
the same model and plan reuse the loaded shards (so many sessions are in flight on the same
shards, each shard working on one while the next works on another), and a pipeline idle for
``keep_alive`` seconds is released. ``p2pllm ctl stop JOB`` ends one at once.

A pipeline's job runs on the :class:`~p2pllm.daemon.runner.JobRunner`: the pipeline plans
(:func:`plan_pipeline`), the runner assigns the shards, plans around refusals, and replays
after a lost shard.

A session: SHARD_OPEN (a stream) to every shard; the prompt to the first shard in chunks;
then the shards run the decode loop among themselves (the last shard feeds each sampled token
back to the first) while the last shard streams the tokens here. A shard that dies ends its
stream (at the latest after the keepalive timeout): the session fails with PEER_DOWN and the
pipeline loses that member. With ``retries`` left (default 1) the runner re-places the
pipeline on the survivors, in the same job (shards whose slot is unchanged are kept; when
fewer nodes remain than shards, a node takes several consecutive ranges), and the session is
replayed on it with the tokens generated so far appended to the prompt. Without, the job fails
naming the lost shard.

Size: one module because a pipeline's lifetime (plan, hold, replay), its sessions and the
registry that shares pipelines between requests work on the same state; the shard role and
the message bodies are the modules beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pllm.daemon.cluster import (
    FETCH,
    FetchCost,
    fetch_estimate,
    label,
    model_disk_bytes,
    model_tier,
    takes_role,
)
from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.modelrefs import ModelRoots, is_path_ref
from p2pllm.daemon.runner import Exclusions, JobRunner, Lost, MemberLost, Slot
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.generate import TextStream, continuation_text
from p2pllm.engine.loader import load_tokenizer, slice_weight_bytes
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.messages import error_code
from p2pllm.pillars.split.messages import (
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_SESSIONS,
    PREFILL_CHUNK,
    Hop,
    OpenSession,
    ShardParams,
    parse_generate,
    parse_result,
)
from p2pllm.plan.layers import StageCost, free_bytes, kv_bytes_per_token_layer, plan_stages
from p2pllm.plan.partition import NodeBudget, PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, torch_dtype

log = logging.getLogger(__name__)

__all__ = ["SplitRequest", "coordinate"]

MAX_CONTEXT = 8192  # positions per session a shard reserves (address space, not memory)
KV_RESERVE_TOKENS = 2048  # KV cache the planner charges each layer, in tokens
STEP_TIMEOUT = 600.0  # no news from the shards for this long: the session is abandoned
CLOSE_TIMEOUT = 10.0
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class SessionError(ProtocolError):
    """A session failed; ``tokens`` were generated before, ``peer_down`` when a shard is gone."""

    def __init__(self, code: ErrorCode, message: str, *, peer_down: bool = False,
                 tokens: Sequence[int] = ()) -> None:
        super().__init__(code, message)
        self.peer_down = peer_down
        self.tokens = list(tokens)


# -- the request --------------------------------------------------------------------------------


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


@dataclass(frozen=True)
class SplitRequest:
    """A GENERATE body for mode "split", validated (protocol.md section 9.6)."""

    model: str
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_tokens: int = 128
    ignore_eos: bool = False  # no end id stops the reply (generate --ignore-eos)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    dtype: str = "float32"
    wire_dtype: str = "float32"
    quant: str = "none"  # weight-only quantized linears of every shard
    shards: int | None = None
    layers: str | None = None
    keep_alive: float = DEFAULT_KEEP_ALIVE
    batch_decode: bool = False
    retries: int = 1
    max_sessions: int = DEFAULT_MAX_SESSIONS
    prefill_chunk: int = PREFILL_CHUNK

    @classmethod
    def from_meta(cls, m: Mapping[str, Any]) -> SplitRequest:
        """The GENERATE_SPLIT body (messages.py), checked; BAD_REQUEST naming the field."""
        return cls(**parse_generate(m))


# -- models and plans -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    """What the coordinator reads from its own copy: config and (optional) tokenizer."""

    ref: str
    path: Path
    config: ModelConfig
    tokenizer: Any | None

    @property
    def max_len(self) -> int:
        return min(self.config.max_position_embeddings, MAX_CONTEXT)

    def stop_ids(self) -> tuple[int, ...]:
        stops = list(self.config.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and eos not in stops:
            stops.append(eos)
        return tuple(stops)


@dataclass(frozen=True)
class Stage:
    """One shard of a plan: layers [start, end) on a node, under a rid."""

    index: int
    node_id: str
    name: str
    rid: str
    start: int
    end: int
    planned_bytes: int
    model_ref: str  # the name that node resolves in its own roots (never a path)
    fetch: FetchCost | None = None  # the node lacks the model: its slice comes from peers

    @property
    def sources(self) -> tuple[str, ...]:
        """Nodes holding the model whole, where the shard fetches its slice (none: local)."""
        return self.fetch.sources if self.fetch is not None else ()

    @property
    def fetch_bytes(self) -> int:
        return self.fetch.nbytes if self.fetch is not None else 0

    @property
    def fetch_s(self) -> float:
        return self.fetch.seconds if self.fetch is not None else 0.0

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "node_id": self.node_id, "name": self.name,
                "rid": self.rid, "layers": [self.start, self.end],
                **(self.fetch.describe() if self.fetch is not None else {})}

    @property
    def label(self) -> str:
        return f"shard {self.index} (layers {self.start}-{self.end}) on {self.name}"


def shard_cost(config: ModelConfig, dtype: str, quant: str) -> StageCost:
    """What the planner charges a shard of ``config``: per layer its weights as the engine
    holds them (``slice_weight_bytes``: ``dtype``, with ``quant`` the linears at their codes
    and scales) plus a KV reserve of KV_RESERVE_TOKENS; the embedding (first stage) and the
    final norm and head (last stage, an untied copy of a tied table) likewise."""
    wdtype = torch_dtype(dtype)

    def weights(embed: bool, head: bool) -> int:
        return slice_weight_bytes(config, 0, 1, embed, head, wdtype, quant)

    layer = weights(False, False)
    reserve = kv_bytes_per_token_layer(config, _BYTES[dtype]) * KV_RESERVE_TOKENS
    return StageCost(num_layers=config.num_layers, layer_bytes=layer + reserve,
                     first_extra_bytes=weights(True, False) - layer,
                     last_extra_bytes=weights(False, True) - layer)


def slice_fetch_bytes(config: ModelConfig, disk_bytes: int, start: int, end: int) -> int:
    """Bytes a shard of layers [start, end) fetches from a model of ``disk_bytes`` on disk:
    the model's size times the slice's share of the weights (engine estimate, float32, the
    embedding on the first shard, the norm and head on the last; a tied head reads the
    embedding table). An estimate: the exact count is the manifest's pieces_for the slice."""
    n = config.num_layers
    part = slice_weight_bytes(config, start, end, start == 0, end == n)
    whole = slice_weight_bytes(config, 0, n, True, True)
    return min(disk_bytes, round(disk_bytes * part / whole)) if whole > 0 else disk_bytes


def plan_pipeline(nodes: Sequence[Mapping[str, Any]], model: LocalModel,
                  req: SplitRequest, excluded: Exclusions | None = None,
                  share: bool = False) -> list[Stage]:
    """Pick and order the nodes that can hold a shard, and give them layer ranges.

    Nodes that have the model come first; when the request wants more shards than they can
    take, nodes that lack it join (tier FETCH: other nodes list it whole, the shard fetches
    its slice from them before loading; the stage carries the fetch's bytes and time).

    ``excluded``: (node, role) pairs that refused and nodes lost in this job (left out).
    ``share``: when fewer nodes can take a shard than there are shards (after a loss), a
    node takes several consecutive ranges.

    Raises ProtocolError: NOT_FOUND when too few nodes have the model (naming who lacks it),
    BAD_REQUEST for invalid ranges, REFUSED when the plan does not fit in memory.
    """
    # 1. candidates: nodes that have the model and take shard roles, in pipeline order: the
    # peers by name, this node last. The coordinator holding the last range takes each token
    # in-process and relays it to the client while shard 0 computes the next step; on shard
    # 0's node that relay ran exactly when shard 0's next step arrived, on the same core
    # (issue 19: 0.5 ms of its worker's start per token, 0.07 ms elsewhere)
    cands: list[tuple[Mapping[str, Any], str]] = []
    fetchers: list[tuple[Mapping[str, Any], tuple[str, ...]]] = []  # nodes that would fetch
    lacking: list[str] = []
    ordered = sorted(nodes, key=lambda n: (bool(n.get("self")), str(n.get("name")), n["node_id"]))
    for n in ordered:
        caps = n.get("caps") or {}
        name = label(n)
        if excluded is not None and not excluded.allows(str(n["node_id"]), "shard"):
            lacking.append(f"{name}: {excluded.reason(str(n['node_id']), 'shard')}")
            continue
        if not takes_role(caps, "shard"):
            lacking.append(f"{name} does not take shard roles")
            continue
        # names cross the wire: every member (this node too) resolves model.ref in its own
        # roots; a node that lists it has it, a nested name or hub id (org/name) it may have,
        # and so may every node when the user named a path (resolved inside this node's roots:
        # others may share that root); they check on ASSIGN. Advertised paths are never sent.
        tier, _, sources = model_tier(nodes, n, model.ref)
        if n.get("self") or (tier > FETCH) or is_path_ref(req.model):
            cands.append((n, model.ref))
        elif tier == FETCH:
            fetchers.append((n, sources))
        else:
            lacking.append(f"{name} lacks model {model.ref!r}")
    want = req.shards if req.shards is not None else (
        len(req.layers.split(",")) if req.layers else None)
    fetch_from: dict[str, tuple[str, ...]] = {}
    if want is not None and want > len(cands) and fetchers:
        # more shards than nodes with the model: nodes that fetch their slice join, in the
        # order of every node (by name, this node last)
        extra = dict((str(n["node_id"]), s) for n, s in fetchers[:want - len(cands)])
        fetch_from.update(extra)
        chosen = {str(n["node_id"]) for n, _ in cands} | set(extra)
        cands = [(n, model.ref) for n in ordered if str(n["node_id"]) in chosen]
    if share and cands and want is not None and want > len(cands):
        # consecutive ranges on one node: e.g. 3 shards on (a, c) -> a, a, c
        cands = [cands[i * len(cands) // want] for i in range(want)]
    if not cands or (want is not None and want > len(cands)):
        have = ", ".join(f"{n.get('name')}({str(n['node_id'])[:8]})" for n, _ in cands
                         if str(n["node_id"]) not in fetch_from) or "none"
        fetching = ", ".join(map(label, (n for n, _ in fetchers))) or "none"
        raise ProtocolError(ErrorCode.NOT_FOUND, (
            f"{want or 1} shard(s) of {model.ref} need as many nodes with the model or able to "
            f"fetch it from a peer; nodes that have it: {have}; that can fetch it: {fetching}"
            + (f"; {'; '.join(lacking)}" if lacking else "")))
    # 2. costs and budgets
    cost = shard_cost(model.config, req.dtype, req.quant)
    repeats = {n["node_id"]: sum(1 for m, _ in cands if m["node_id"] == n["node_id"])
               for n, _ in cands}
    labels = [label(n) + (f" shard {i}" if repeats[n["node_id"]] > 1 else "")
              for i, (n, _) in enumerate(cands)]
    budgets = [NodeBudget(lab, free_bytes(n.get("caps") or {}) // repeats[n["node_id"]])
               for lab, (n, _) in zip(labels, cands, strict=True)]
    # 3. ranges
    try:
        ranges = plan_stages(budgets, cost, stages=req.shards, layers=req.layers)
    except PlanError as exc:
        code = ErrorCode.REFUSED if exc.shortfalls or "fit" in str(exc) else ErrorCode.BAD_REQUEST
        raise ProtocolError(code, f"cannot plan {model.ref}: {exc}") from None
    by_label = dict(zip(labels, cands, strict=True))
    disk = model_disk_bytes(model.path) if fetch_from else 0
    stages = []
    for i, r in enumerate(ranges):
        node, ref = by_label[r.node_id]
        nid = str(node["node_id"])
        fetch = None
        if nid in fetch_from:
            nbytes = slice_fetch_bytes(model.config, disk, r.start, r.end)
            fetch = fetch_estimate(nodes, nid, fetch_from[nid], nbytes)
        stages.append(Stage(i, nid, str(node.get("name")), f"shard{i}",
                            r.start, r.end, r.planned_bytes, ref, fetch))
    return stages


# -- a pipeline: one job, one shard role per stage ---------------------------------------------------


@dataclass
class SessionOutcome:
    session: str
    tokens: list[int]
    stop_reason: str
    started: float
    ready: float
    first_token: float | None
    last_token: float | None
    ended: float
    shard_stats: dict[int, dict[str, Any]]


OnToken = Callable[[int], Awaitable[None]]


class Pipeline:
    """Shards for one model and plan, loaded once and shared by many sessions."""

    def __init__(self, registry: PipelineRegistry, key: tuple[Any, ...], model: LocalModel,
                 stages: list[Stage], req: SplitRequest) -> None:
        self.registry = registry
        self.host = registry.host
        self.key = key
        self.model = model
        self.stages = stages
        self.req = req
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.job: Job | None = None
        self.active = 0  # requests holding this pipeline
        self.keep_alive = req.keep_alive
        self.last_used = time.monotonic()
        self.broken: str | None = None
        self.lost: Stage | None = None  # the stage whose shard was lost
        self.retries = req.retries  # replays on the survivors this pipeline may make
        self.replays = 0
        self.runner: JobRunner | None = None
        self.closing = False
        self.changed = asyncio.Event()
        self.slots = asyncio.Semaphore(req.max_sessions)
        self.params_loaded: dict[int, int] = {}
        self.created = time.monotonic()
        self.ready_at: float | None = None
        self.sessions_done = 0
        self.sessions_failed = 0
        self.tokens_total = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=8)
        # rid -> the shard's worker busy fraction (RoleWorker, its recent window), as the
        # shard last reported it: opening a session and closing it (protocol.md 9.2)
        self.shard_busy: dict[str, float] = {}

    @property
    def cluster(self) -> Any:
        return self.host.cluster

    @property
    def job_id(self) -> str:
        return self.job.id if self.job is not None else ""

    @property
    def replaying(self) -> bool:
        """A shard was lost and the pipeline is being re-placed on the survivors."""
        return self.broken is not None and not self.ready.done()

    def usable(self, up: set[str]) -> bool:
        if self.closing or (self.job is not None and self.job.stopped):
            return False  # a stopped job's pipeline is being released: never hand it out
        if self.replaying:
            return True
        if self.broken:
            return False
        if self.ready.done() and (self.ready.cancelled() or self.ready.exception() is not None):
            return False
        return all(s.node_id in up for s in self.stages)

    def mark_broken(self, reason: str, stage: Stage | None = None) -> None:
        if self.broken is None:
            log.warning("split pipeline %s broken: %s", self.job_id, reason)
            self.broken = reason
            self.lost = stage
            if stage is not None and self.replays < self.retries and self.ready.done():
                # sessions that replay wait for the re-placed pipeline
                self.ready = asyncio.get_running_loop().create_future()
        self.changed.set()

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.changed.set()

    def shard_params(self, stage: Stage) -> ShardParams:
        n = len(self.stages)
        first, last = self.stages[0], self.stages[-1]
        nxt = self.stages[stage.index + 1] if stage.index + 1 < n else None
        c = self.model.config
        return ShardParams(
            model=stage.model_ref, start=stage.start, end=stage.end, num_layers=c.num_layers,
            index=stage.index, count=n, dtype=self.req.dtype, quant=self.req.quant,
            wire_dtype=self.req.wire_dtype,
            next=Hop(nxt.node_id, nxt.rid) if nxt else None,
            first=Hop(first.node_id, first.rid) if stage is last else None,
            max_sessions=self.req.max_sessions, max_len=self.model.max_len,
            batch_decode=self.req.batch_decode, stage_bytes=stage.planned_bytes,
            hidden_size=c.hidden_size, vocab_size=c.vocab_size, sources=stage.sources)

    def job_params(self) -> dict[str, Any]:
        return {"model": self.model.ref, "dtype": self.req.dtype, "quant": self.req.quant,
                "wire_dtype": self.req.wire_dtype, "batch_decode": self.req.batch_decode,
                "layers": ",".join(f"{s.start}-{s.end}" for s in self.stages),
                "nodes": [s.name for s in self.stages]}

    # -- the runner's pillar: plan, run, replay ---------------------------------------------

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        self.stages = plan_pipeline(nodes, self.model, self.req, excluded,
                                    share=bool(excluded.lost))
        return [Slot(s.rid, "shard", s.node_id, self.shard_params(s).to_meta(),
                     summary=f"layers {s.start}-{s.end} of {self.model.path.name}"
                     + (f" ({s.fetch.text()})" if s.fetch is not None else ""),
                     label=s.label) for s in self.stages]

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> None:
        """Hold the placed shards while sessions use them; MemberLost when one is gone."""
        self.broken = self.lost = None
        self.ready_at = time.monotonic()
        if not self.ready.done():
            self.ready.set_result(None)
        self.publish()
        await self._hold()

    def replay(self, lost: Lost) -> bool:
        if self.replays >= self.retries:
            return False
        self.replays += 1
        return True

    def publish(self) -> None:
        if self.job is None:
            return
        self.job.update(
            shards=len(self.stages),
            plan=[s.describe() | {"params": self.params_loaded.get(s.index)} for s in self.stages],
            sessions_active=self.active, sessions_done=self.sessions_done,
            sessions_failed=self.sessions_failed, tokens=self.tokens_total,
            recent_sessions=list(self.recent),
            setup_s=round(self.ready_at - self.created, 3) if self.ready_at else None,
            **({"shard_busy": busy} if (busy := {
                s.rid: self.shard_busy[s.rid] for s in self.stages if s.rid in self.shard_busy})
               else {}))

    def note_busy(self, idx: int, meta: Mapping[str, Any] | None) -> None:
        """Record a shard's reported worker busy fraction (``busy`` in ``meta``), if any."""
        busy = (meta or {}).get("busy")
        if isinstance(busy, (int, float)) and not isinstance(busy, bool) and 0 <= busy <= 1:
            self.shard_busy[self.stages[idx].rid] = float(busy)

    # -- lifetime -------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Own the job: assign every shard, hold them while used, release them after."""
        try:
            async with self.host.job("split", self.job_params()) as job:
                self.job = job
                self.runner = JobRunner(job, self, what=f"split {self.model.ref}")
                await self.runner.run()
        except asyncio.CancelledError:
            self._failed(ProtocolError(ErrorCode.CANCELLED, "the daemon is shutting down"))
            raise
        except ProtocolError as exc:
            self._failed(exc)
        except Exception as exc:
            log.warning("split pipeline failed", exc_info=True)
            self._failed(ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            self.closing = True
            self.registry.forget(self)

    def _failed(self, exc: ProtocolError) -> None:
        self.broken = self.broken or exc.message
        if not self.ready.done():
            self.ready.set_exception(exc)

    async def _hold(self) -> None:
        while True:
            if self.broken:
                stage = self.lost
                if stage is None:
                    raise ProtocolError(ErrorCode.PEER_DOWN, self.broken)
                raise MemberLost(stage.rid, self.broken, node_id=stage.node_id)
            idle = time.monotonic() - self.last_used
            if self.active == 0 and idle >= self.keep_alive:
                self.closing = True
                return
            self.changed.clear()
            timeout = self.keep_alive - idle if self.active == 0 else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.changed.wait()

    # -- a session ------------------------------------------------------------------------------

    async def run_session(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                          max_new: int, stop_ids: Sequence[int], on_token: OnToken,
                          ) -> SessionOutcome:
        """Generate up to ``max_new`` tokens after ``prompt_ids`` on this pipeline's shards."""
        sid = uuid.uuid4().hex[:16]
        job = self.job_id
        n, last = len(self.stages), len(self.stages) - 1
        n_prompt = len(prompt_ids)
        max_len = n_prompt + max_new - 1
        plain = OpenSession(sid, max_len).to_meta()
        penalise = sampling.repetition_penalty != 1.0
        tail = OpenSession(sid, max_len, n_prompt, max_new, tuple(stop_ids), sampling,
                           tuple(prompt_ids) if penalise else None).to_meta()
        events: asyncio.Queue[tuple[int, Frame | BaseException]] = asyncio.Queue()

        async def watch(stage: Stage) -> None:
            meta = {"job": job, "rid": stage.rid, **(tail if stage.index == last else plain)}
            try:
                async for frame in self.cluster.stream(stage.node_id, MsgType.SHARD_OPEN, meta):
                    events.put_nowait((stage.index, frame))
            except (RemoteError, ConnectionClosed, OSError, TimeoutError) as exc:
                events.put_nowait((stage.index, exc))

        tokens: list[int] = []
        started = time.monotonic()
        first_token: float | None = None
        last_token: float | None = None
        stats: dict[int, dict[str, Any]] = {}
        tasks = [asyncio.create_task(watch(s), name=f"split-watch-{sid}-{s.index}")
                 for s in self.stages]
        closed_ok = False
        try:
            # 1. every shard has the session open
            ready: set[int] = set()
            while len(ready) < n:
                idx, item = await self._next(events, tokens)
                if item.msg_type == MsgType.SHARD_OPEN and item.is_partial:
                    ready.add(idx)
                    if isinstance(item.meta.get("params"), int):
                        self.params_loaded[idx] = item.meta["params"]
                    self.note_busy(idx, item.meta)
                else:
                    raise SessionError(ErrorCode.INTERNAL, f"{self.stages[idx].label} answered "
                                       f"{item.msg_type.name} before opening the session")
            ready_at = time.monotonic()
            self.publish()  # the shards' busy figures as they opened the session
            # 2. the prompt, in chunks, to the first shard
            first = self.stages[0]
            chunk = self.req.prefill_chunk
            for off in range(0, n_prompt, chunk):
                ids = torch.tensor(list(prompt_ids[off:off + chunk]), dtype=torch.int64)
                meta, payload = tensor_meta({"ids": ids}, {
                    "job": job, "rid": first.rid, "session": sid, "pos": off,
                    "sample": off + chunk >= n_prompt})
                try:
                    await self.cluster.request(first.node_id, MsgType.SHARD_FORWARD, meta,
                                               payload, timeout=STEP_TIMEOUT)
                except (RemoteError, ConnectionClosed, OSError, TimeoutError) as exc:
                    raise self._error(0, exc, tokens) from None
            # 3. tokens, until the last shard ends the session
            while True:
                idx, item = await self._next(events, tokens)
                if idx == last and item.msg_type == MsgType.SHARD_RESULT and item.is_partial:
                    try:
                        token = parse_result(item.meta)
                    except ProtocolError as exc:
                        raise SessionError(ErrorCode.INTERNAL,
                                           f"the last shard sent no token: {exc.message}") from exc
                    last_token = time.monotonic()
                    first_token = first_token or last_token
                    tokens.append(token)
                    await on_token(token)
                elif idx == last and not item.is_partial:
                    stats[last] = dict(item.meta.get("stats") or {})
                    self.note_busy(last, stats[last])
                    reason = str(item.meta.get("reason", "max_tokens"))
                    break
                else:
                    raise SessionError(ErrorCode.INTERNAL, f"{self.stages[idx].label} ended the "
                                       f"session unexpectedly ({item.msg_type.name})",
                                       tokens=tokens)
            # 4. close it on the other shards, collecting their figures
            acks = await asyncio.gather(*(
                self.cluster.request(s.node_id, MsgType.SHARD_CLOSE,
                                     {"job": job, "rid": s.rid, "session": sid},
                                     timeout=CLOSE_TIMEOUT)
                for s in self.stages[:last]), return_exceptions=True)
            for s, ack in zip(self.stages[:last], acks, strict=True):
                if isinstance(ack, Frame):
                    stats[s.index] = dict(ack.meta.get("stats") or {})
                    self.note_busy(s.index, stats[s.index])
            closed_ok = True
        finally:
            # Cancelling a watcher whose stream is still open sends CANCEL: the shard frees
            # the session (after an error, or when this request itself is cancelled).
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if closed_ok:
                self.sessions_done += 1
            else:
                self.sessions_failed += 1
        return SessionOutcome(sid, tokens, reason, started, ready_at, first_token, last_token,
                              time.monotonic(), stats)

    async def _next(self, events: asyncio.Queue[tuple[int, Frame | BaseException]],
                    tokens: list[int]) -> tuple[int, Frame]:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                idx, item = await events.get()
        except TimeoutError:
            raise SessionError(ErrorCode.TIMEOUT, f"no word from the shards for {STEP_TIMEOUT:g}s",
                               tokens=tokens) from None
        if isinstance(item, BaseException):
            raise self._error(idx, item, tokens)
        return idx, item

    def _error(self, idx: int, exc: BaseException, tokens: list[int]) -> SessionError:
        stage = self.stages[idx]
        if isinstance(exc, RemoteError):
            code = error_code(exc.code)
            # A member that lost the role (it restarted, or released it while shutting down)
            # is as gone as a dead one, unless this job is being stopped on purpose.
            stopping = self.job is not None and self.job.stopped
            gone = code == ErrorCode.PEER_DOWN or (
                code in (ErrorCode.UNKNOWN_JOB, ErrorCode.CANCELLED) and not stopping)
            if gone:
                self.mark_broken(f"{stage.label}: {exc.message}", stage)
            return SessionError(code, f"{stage.label}: {exc.message}", peer_down=gone,
                                tokens=tokens)
        reason = f"{stage.label} is down: {exc}"
        self.mark_broken(reason, stage)
        return SessionError(ErrorCode.PEER_DOWN, reason, peer_down=True, tokens=tokens)


# -- the registry of pipelines of one daemon -------------------------------------------------------


class PipelineRegistry:
    """The pipelines a daemon coordinates, by model and plan; owns their tasks."""

    def __init__(self, host: JobHost) -> None:
        self.host = host
        self.pipelines: dict[tuple[Any, ...], Pipeline] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._models: dict[Path, LocalModel] = {}

    async def local_model(self, ref: str, need_tokenizer: bool) -> LocalModel:
        roots = ModelRoots.of(self.host.config)
        found = await roots.alocal(ref)  # FORBIDDEN for a path outside this node's roots
        if found is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"model {ref!r} is not on this node (the coordinator needs its config and "
                f"tokenizer): looked under {roots.describe()}; name a model under a root, or "
                f"add its folder with `p2pllmd --models-dir DIR`"))
        path, ref = found.path, found.name  # members get the name, never this path
        model = self._models.get(path)
        if model is None:
            try:
                config = await asyncio.to_thread(ModelConfig.from_dir, path)
            except ModelError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"cannot read {path}: {exc}") from None
            try:
                tokenizer = await asyncio.to_thread(load_tokenizer, path)
            except ModelError as exc:
                log.info("no tokenizer for %s: %s", path, exc)
                tokenizer = None
            model = self._models[path] = LocalModel(ref, path, config, tokenizer)
        if need_tokenizer and model.tokenizer is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{path} has no tokenizer: send "
                                f"prompt_ids instead of a prompt")
        return model

    async def acquire(self, req: SplitRequest, model: LocalModel) -> tuple[Pipeline, bool]:
        """A ready pipeline for this request (reused or new); the caller must release() it."""
        key = (str(model.path), req.dtype, req.quant, req.wire_dtype, req.shards, req.layers,
               req.batch_decode, req.max_sessions)
        nodes = self.host.cluster.nodes()
        up = {str(n["node_id"]) for n in nodes}
        pipe = self.pipelines.get(key)
        created = False
        if pipe is None or not pipe.usable(up):
            # planned here first, so that a bad request fails before any job starts; the
            # pipeline's runner plans again (the same, unless refusals change it)
            stages = plan_pipeline(nodes, model, req)
            pipe = Pipeline(self, key, model, stages, req)
            self.pipelines[key] = pipe
            task = asyncio.get_running_loop().create_task(pipe.serve(), name="split-pipeline")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            created = True
        pipe.active += 1
        pipe.keep_alive = req.keep_alive
        pipe.retries = max(pipe.retries, pipe.replays + req.retries)
        pipe.touch()
        try:
            await asyncio.shield(pipe.ready)
        except BaseException:
            self.release(pipe)
            raise
        return pipe, created

    def release(self, pipe: Pipeline) -> None:
        pipe.active -= 1
        pipe.touch()
        pipe.publish()

    def forget(self, pipe: Pipeline) -> None:
        if self.pipelines.get(pipe.key) is pipe:
            del self.pipelines[pipe.key]


_REGISTRIES: weakref.WeakKeyDictionary[JobHost, PipelineRegistry] = weakref.WeakKeyDictionary()


def registry_for(host: JobHost) -> PipelineRegistry:
    reg = _REGISTRIES.get(host)
    if reg is None:
        reg = _REGISTRIES[host] = PipelineRegistry(host)
    return reg


# -- GENERATE ----------------------------------------------------------------------------------------


async def coordinate(host: JobHost, req: Request) -> Reply:
    """GENERATE mode "split": stream tokens as partials, answer the result (section 9.6)."""
    r = SplitRequest.from_meta(req.meta)
    ModelRoots.of(host.config).check_adapter(req.meta, "split")
    registry = registry_for(host)
    model = await registry.local_model(r.model, need_tokenizer=r.prompt_ids is None)
    if r.prompt_ids is not None:
        prompt_ids = list(r.prompt_ids)
    else:
        assert model.tokenizer is not None  # local_model() checked
        prompt_ids = list(model.tokenizer(r.prompt)["input_ids"])
    vocab = model.config.vocab_size
    if not prompt_ids or max(prompt_ids) >= vocab:
        raise _bad(f"prompt ids must be non-empty and below the vocabulary size {vocab}")
    limit = model.max_len
    if len(prompt_ids) > limit:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the prompt has {len(prompt_ids)} tokens; "
                            f"the model takes at most {limit}")
    budget = min(r.max_tokens, limit - len(prompt_ids) + 1)
    stops = () if r.ignore_eos else model.stop_ids()
    stream = TextStream(model.tokenizer, prompt_ids) if model.tokenizer is not None else None

    async def on_token(token: int) -> None:
        piece = stream.push(token) if stream is not None else ""
        await req.partial(MsgType.GENERATE, {"token_ids": [token], "text": piece})

    generated: list[int] = []
    outcomes: list[tuple[Pipeline, SessionOutcome, bool]] = []
    setup_s = 0.0
    attempt = 0
    t0 = time.monotonic()
    while True:
        t_acq = time.monotonic()
        pipe, created = await registry.acquire(r, model)
        if created:
            setup_s += time.monotonic() - t_acq
        try:
            async with pipe.slots:
                outcome = await pipe.run_session(
                    prompt_ids + generated, r.sampling, budget - len(generated), stops, on_token)
            outcomes.append((pipe, outcome, created))
            pipe.tokens_total += len(outcome.tokens)
            generated += outcome.tokens
            break
        except SessionError as exc:
            generated += exc.tokens
            pipe.tokens_total += len(exc.tokens)
            done = len(generated) >= budget or (generated and generated[-1] in stops)
            if exc.peer_down and attempt < r.retries and not done:
                attempt += 1
                log.warning("split session failed (%s); replaying %d+%d tokens on a new plan "
                            "(retry %d of %d)", exc.message, len(prompt_ids), len(generated),
                            attempt, r.retries)
                continue
            raise
        finally:
            registry.release(pipe)

    pipe, outcome, _ = outcomes[-1]
    stop_reason = outcome.stop_reason
    if stop_reason == "max_tokens" and budget < r.max_tokens:
        stop_reason = "length"
    first = outcome.first_token or outcome.ended
    n_out = len(generated)
    decode_s = (outcome.last_token or first) - first
    wire = sum(int(st.get("bytes_out", 0)) for st in outcome.shard_stats.values())
    positions = len(prompt_ids) + n_out - 1
    session = {"session": outcome.session, "tokens": n_out,
               "time_to_first_token_s": round(first - outcome.started, 6),
               "tokens_per_s": round((len(outcome.tokens) - 1) / decode_s, 3) if decode_s > 0 else 0.0}
    pipe.recent.append(session)
    pipe.publish()
    text = continuation_text(model.tokenizer, prompt_ids, generated) if model.tokenizer else ""
    return Reply(MsgType.GENERATE, {
        "text": text,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": n_out,
        "token_ids": generated,
        "seconds": round(outcome.ended - outcome.started, 6),
        "tokens_per_s": session["tokens_per_s"],
        "time_to_first_token_s": session["time_to_first_token_s"],
        "mode": "split",
        "stop_reason": stop_reason,
        "job": pipe.job_id,
        "session": outcome.session,
        "setup_s": round(setup_s, 6),
        "pipeline_reused": not outcomes[-1][2],
        "retries": attempt,
        "total_s": round(time.monotonic() - t0, 6),
        "dtype": r.dtype,
        "quant": r.quant,
        "wire_dtype": r.wire_dtype,
        "shards": [s.describe() | {"params": pipe.params_loaded.get(s.index),
                                   **outcome.shard_stats.get(s.index, {})}
                   for s in pipe.stages],
        "wire_bytes": wire,
        "wire_bytes_per_position": round(wire / positions, 3) if positions > 0 else 0.0,
    })
