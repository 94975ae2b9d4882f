"""The two roles of speculative decoding: ``drafter`` and ``verifier``.

ASSIGN params of both: ``{"model": a name (resolved in this daemon's roots: daemon/modelrefs),
"dtype": "float32"|"bfloat16"|"float16", "quant": "none"|"int8"|"int4"}`` (quant: weight-only quantized linears, engine/quant.py);
the verifier also takes ``"session_timeout"`` (seconds a session may stay idle, default 120).
Weights are shared by every role of this daemon that loads the same checkpoint
(:mod:`.models`), and one verifier engine serves the sessions of every job on one target: the
verifier roles compute on that engine's worker; a drafter drafts on its own (``Role.worker``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.daemon.roles import Refused, Role, RoleContext, RoleHandler
from p2pllm.engine.errors import ModelError
from p2pllm.engine.quant import QUANT_MODES
from p2pllm.pillars.caps import check_session_tokens, check_sessions, set_kv_limit
from p2pllm.pillars.rolemodel import need_whole, role_model_path, sources_param
from p2pllm.pillars.speculative.drafter import SessionMetrics, SpecSession
from p2pllm.pillars.speculative.messages import SPEC_CLOSE, DraftRun, OpenRequest, VerifyWindow
from p2pllm.pillars.speculative.models import (
    MODELS,
    LoadedModel,
    default_device,
    model_bytes,
)
from p2pllm.pillars.speculative.verifier import VerifierEngine, acquire_engine, release_engine
from p2pllm.wire.connection import Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import COMPUTE_DTYPES

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

__all__ = ["DrafterRole", "VerifierRole"]

log = logging.getLogger(__name__)

REPORT_EVERY = 0.5  # seconds between metric reports to the state


def _model_param(params: Mapping[str, Any]) -> tuple[str, str, str]:
    model, dtype = params.get("model"), params.get("dtype", "float32")
    quant = params.get("quant") or "none"
    if not isinstance(model, str) or not model:
        raise Refused("params need 'model' (a model name or a checkpoint path)")
    if dtype not in COMPUTE_DTYPES:
        raise Refused(f"dtype {dtype!r} is not supported; choose one of {sorted(COMPUTE_DTYPES)}")
    if quant not in QUANT_MODES:
        raise Refused(f"quant {quant!r} is not supported; choose one of {list(QUANT_MODES)}")
    return model, str(dtype), str(quant)


def _refuse_model(config: DaemonConfig, caps: Mapping[str, Any], params: Mapping[str, Any],
                  role: str) -> str | None:
    try:
        model, dtype, quant = _model_param(params)
    except Refused as exc:
        return exc.message
    try:
        sources = sources_param(params)
    except Refused as exc:
        return exc.message
    roots = ModelRoots.of(config)
    found = roots.find(model)  # FORBIDDEN for a path outside this daemon's roots
    if found is None:
        if roots.may_fetch(model):
            return None  # a hub id, downloaded (in a thread) when the role starts
        if sources:
            return None  # fetched whole from the sources when the role starts
        return f"model {model!r} is not on this host (looked under {roots.describe()})"
    path = found.path
    if any(key[0] == str(path) and key[1] == dtype and key[3] == quant
           for key in MODELS.loaded()):
        return None  # already loaded here: shared, no new memory
    need = model_bytes(path, dtype, quant)
    free = int(caps.get("mem_budget", 0)) - int(caps.get("mem_used_by_roles", 0))
    if need > free:
        return f"not enough memory for the {role} model {model}: needs {need / 1e6:.0f} MB, " \
               f"{max(free, 0) / 1e6:.0f} MB free in the budget"
    return None


class _ModelRole(Role):
    """What both roles share: the model they load, its description, throttled reports."""

    def __init__(self, ctx: RoleContext, params: Mapping[str, Any]) -> None:
        super().__init__(ctx, params)
        self.model_name, self.dtype, self.quant = _model_param(params)
        self.sources = sources_param(params)  # nodes to fetch the model from (this one lacks it)
        self.path: Path | None = None
        self._reported = 0.0

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
        return _refuse_model(config, caps, params, cls.kind)

    async def _resolve(self) -> Path:
        """The model inside this daemon's roots (a hub download, with --allow-hub, in a
        thread), or fetched whole from the sources into the models cache; FORBIDDEN outside
        the roots, REFUSED when this host lacks it or the fetch cannot complete."""
        need = need_whole() if self.sources else None
        return await role_model_path(self.ctx, self.model_name, need, self.sources)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._reported >= REPORT_EVERY:
            self._reported = now
            self.ctx.report(self.metrics())


class VerifierRole(_ModelRole):
    """Holds the target; answers SPEC_OPEN / SPEC_VERIFY / SPEC_CLOSE for its job's sessions."""

    kind = "verifier"

    def __init__(self, ctx: RoleContext, params: Mapping[str, Any]) -> None:
        super().__init__(ctx, params)
        timeout = params.get("session_timeout", 120.0)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
            raise Refused("session_timeout must be a number of seconds in (0, 86400]")
        self.session_timeout = float(timeout)
        self.engine: VerifierEngine | None = None
        self.sessions_opened = 0
        self.closed_stats = {"rounds": 0, "drafted": 0, "accepted": 0, "verify_s": 0.0}

    async def on_start(self) -> None:
        self.path = await self._resolve()
        try:
            self.engine = await acquire_engine(self.path, self.dtype, default_device(),
                                               self.quant)
        except ModelError as exc:
            raise Refused(f"cannot load the target {self.model_name}: {exc}") from exc
        self.use_worker(self.engine.worker)  # shared with the other jobs on this target
        self._report(force=True)

    async def on_stop(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            for s in [s for s in engine.sessions.values() if s.job == self.ctx.job]:
                self._retire(engine.close(self.ctx.job, s.id))
            await release_engine(engine)

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {
            MsgType.SPEC_OPEN: self.on_open,
            MsgType.SPEC_VERIFY: self.on_verify,
            MsgType.SPEC_CLOSE: self.on_close,
        }

    def _engine(self) -> VerifierEngine:
        if self.engine is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "the verifier has stopped")
        return self.engine

    async def on_open(self, req: Request) -> Reply:
        engine = self._engine()
        opening = OpenRequest.from_meta(req.meta)
        cfg = self.ctx.config  # the caps (pillars/caps.py): nothing is created past one
        check_sessions(cfg, sum(s.job == self.ctx.job for s in engine.sessions.values()), self.kind)
        check_session_tokens(cfg, len(opening.prompt) + opening.max_tokens, "a verification session")
        set_kv_limit(engine.kv_budget, self.ctx.cluster)
        opened = await engine.open(self.ctx.job, opening, self.session_timeout)
        self.sessions_opened += 1
        self._report(force=True)
        return Reply(MsgType.SPEC_OPEN, opened.to_meta())

    async def on_verify(self, req: Request) -> Reply:
        window = VerifyWindow.from_meta(req.meta, req.frame.payload)
        reply = await self._engine().verify(self.ctx.job, window)
        self._report()
        return Reply(MsgType.SPEC_VERIFY, reply.to_meta())

    async def on_close(self, req: Request) -> Reply:
        session = SPEC_CLOSE.parse(req.meta)["session"]
        self._retire(self._engine().close(self.ctx.job, session))
        self._report(force=True)
        return Reply(MsgType.ACK, {"closed": session})

    def _retire(self, s: Any) -> None:
        for key in ("rounds", "drafted", "accepted", "verify_s"):
            self.closed_stats[key] += getattr(s, key)

    def role_metrics(self) -> dict[str, Any]:
        engine = self.engine
        live = [s for s in engine.sessions.values() if s.job == self.ctx.job] if engine else []
        stats = dict(self.closed_stats)
        for s in live:
            for key in stats:
                stats[key] += getattr(s, key)
        rounds = int(stats["rounds"])
        out: dict[str, Any] = {
            "sessions_open": len(live),
            "sessions_total": self.sessions_opened,
            "rounds": rounds,
            "drafted": int(stats["drafted"]),
            "accepted": int(stats["accepted"]),
            "acceptance_rate": stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0,
            "mean_tokens_per_round": (stats["accepted"] + rounds) / rounds if rounds else 0.0,
            "verify_s": round(float(stats["verify_s"]), 6),
        }
        if engine is not None:
            out.update(
                engine_sessions=len(engine.sessions),
                engine_forwards=engine.forwards,
                engine_windows_per_forward=engine.windows / engine.forwards if engine.forwards else 0.0,
                kv_bytes=engine.kv_bytes,
            )
        return out

    def summary(self) -> str:
        n = sum(1 for s in self.engine.sessions.values() if s.job == self.ctx.job) if self.engine else 0
        return f"target {self.model_name}, {n} session(s)"

    def memory_bytes(self) -> int:
        engine = self.engine
        if engine is None:
            return 0
        return (engine.loaded.nbytes + engine.kv_bytes) // max(engine.refs, 1)


class DrafterRole(_ModelRole):
    """Holds the draft; runs a session against a verifier on SPEC_DRAFT_RUN, streaming tokens."""

    kind = "drafter"

    def __init__(self, ctx: RoleContext, params: Mapping[str, Any]) -> None:
        super().__init__(ctx, params)
        self.loaded: LoadedModel | None = None
        self.current: SessionMetrics | None = None
        self.runs = 0
        self.active = 0  # SPEC_DRAFT_RUNs running now (max_sessions_per_role)

    async def on_start(self) -> None:
        self.path = await self._resolve()
        try:
            self.loaded = await MODELS.acquire(self.path, self.dtype, default_device(),
                                               self.quant)
        except ModelError as exc:
            raise Refused(f"cannot load the draft {self.model_name}: {exc}") from exc
        self._report(force=True)

    async def on_stop(self) -> None:
        loaded, self.loaded = self.loaded, None
        if loaded is not None:
            MODELS.release(loaded)

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {MsgType.SPEC_DRAFT_RUN: self.on_run}

    async def on_run(self, req: Request) -> Reply:
        if self.loaded is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "the drafter has stopped")
        run = DraftRun.from_meta(req.meta)
        check_sessions(self.ctx.config, self.active, self.kind)  # caps: pillars/caps.py
        check_session_tokens(self.ctx.config, len(run.prompt) + run.max_tokens, "a draft run")
        nodes = {n["node_id"]: n for n in self.ctx.cluster.nodes()}
        peer = nodes.get(run.verifier, {}).get("name", "")

        async def emit(tokens: list[int], m: SessionMetrics) -> None:
            await req.partial(MsgType.SPEC_DRAFT_RUN, {
                "token_ids": tokens, "rounds": m.rounds, "drafted": m.drafted,
                "accepted": m.accepted})
            self._report()

        session = SpecSession(self.ctx.cluster, self.ctx.job, self.loaded, run, emit, peer,
                              same_node=run.verifier == self.ctx.node_id,
                              worker=self.worker)
        self.current = session.metrics
        self.runs += 1
        self.active += 1
        try:
            metrics = await session.execute()
        finally:
            self.active -= 1
            self._report(force=True)
        return Reply(MsgType.SPEC_DRAFT_RUN, {"token_ids": session.tokens, "metrics": metrics.as_dict()})

    def role_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": self.runs}
        if self.current is not None:
            out.update(self.current.as_dict())
        return out

    def summary(self) -> str:
        return f"draft {self.model_name}"

    def memory_bytes(self) -> int:
        return self.loaded.nbytes // max(self.loaded.refs, 1) if self.loaded is not None else 0
