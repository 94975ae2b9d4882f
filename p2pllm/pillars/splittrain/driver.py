"""The step driver of a split-training job: what the coordinator does once every stage is
assigned (protocol.md section 11). Each step: TRAIN_BATCH to every stage at once (they run the
schedule among themselves), the global gradient norm from their squared norms, TRAIN_STEP with
the clip scale; figures per step and per stage; checkpoints through :mod:`.checkpoint`. Before
the first step, stage 0 gets the dataset's content in TRAIN_DATA when the CLI sent it; after the
last, a CLI that asked for the checkpoint's files receives them as "file" partials.

A stage that fails is a :class:`StageFailed` naming it; the coordinator turns a dead stage
into the JobRunner's lost member.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from p2pllm.daemon.jobs import Job
from p2pllm.pillars.messages import error_code
from p2pllm.pillars.paths import send_files
from p2pllm.pillars.splittrain.checkpoint import write_checkpoint
from p2pllm.pillars.splittrain.compute import clip_scale
from p2pllm.pillars.splittrain.messages import TRAIN_BATCH_REPLY, TRAIN_DATA_REPLY, RunSpec
from p2pllm.pillars.splittrain.planner import Stage
from p2pllm.pillars.splittrain.schedule import bubble_fraction, measured_bubble
from p2pllm.plan.layers import StageCost
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import unpack_tensors

__all__ = ["STEP_TIMEOUT", "StageFailed", "StepDriver"]

log = logging.getLogger(__name__)

STEP_TIMEOUT = 3600.0


class StageFailed(Exception):
    def __init__(self, stage: Stage, code: int, message: str) -> None:
        super().__init__(f"{stage.describe()}: {message}")
        self.stage = stage
        self.code = code
        self.message = message


def _batch_reply(st: Stage, meta: Mapping[str, Any], step: int) -> dict[str, Any]:
    """A stage's TRAIN_BATCH answer through TRAIN_BATCH_REPLY; a malformed one fails that stage."""
    try:
        v = TRAIN_BATCH_REPLY.parse(meta)
    except ProtocolError as e:
        raise StageFailed(st, e.code, f"bad TRAIN_BATCH answer: {e.message}") from e
    if v["step"] != step:
        raise StageFailed(st, ErrorCode.BAD_REQUEST,
                          f"bad TRAIN_BATCH answer: step {v['step']}, asked for step {step}")
    return v


class StepDriver:
    """Drives the steps of one placed split-training job: TRAIN_BATCH to every stage, the
    global gradient-norm clip, TRAIN_STEP, figures, checkpoints."""

    def __init__(self, job: Job, spec: RunSpec, stages: list[Stage], req: Request,
                 cost: StageCost, save_dir: Path | None = None, data: bytes | None = None) -> None:
        self.job = job
        self.save_dir = save_dir  # <state_dir>/checkpoints/<save>, checked by the coordinator
        self.data = data
        self.spec = spec
        self.stages = stages
        self.req = req
        self.cost = cost
        self.records: list[dict[str, Any]] = []
        self.stage_totals = [{"forward_s": 0.0, "backward_s": 0.0, "idle_s": 0.0,
                              "busy_window_s": 0.0, "busy_s": 0.0, "pipeline_s": 0.0}
                             for _ in stages]
        self.saved: str | None = None

    @property
    def cluster(self) -> Any:
        return self.job.cluster

    async def _gather(self, coros: Sequence[Any]) -> list[Any]:
        """Run one call per stage; on the first failure cancel the rest and raise it (a stage
        that died is reported before the neighbours that could not reach it)."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed and pending:  # give a dying peer's own connection a moment to close
                more, pending = await asyncio.wait(pending, timeout=0.5,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                failed += [t for t in more if t.exception() is not None]
            if failed:
                errors = [t.exception() for t in failed]
                down = [e for e in errors if isinstance(e, StageFailed)
                        and e.code == ErrorCode.PEER_DOWN and "died" in e.message]
                raise (down or errors)[0]  # type: ignore[misc]
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, st: Stage, msg_type: MsgType, meta: dict[str, Any],
                    payload: Sequence[bytes] = ()) -> Frame:
        try:
            return await self.cluster.request(st.node_id, msg_type,
                                              {**meta, "job": self.job.id, "rid": st.rid},
                                              payload, timeout=STEP_TIMEOUT)
        except RemoteError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ConnectionClosed as e:
            raise StageFailed(st, ErrorCode.PEER_DOWN, f"the node died or left ({e})") from e
        except TimeoutError as e:
            raise StageFailed(st, ErrorCode.TIMEOUT,
                              f"no answer to {msg_type.name} in {STEP_TIMEOUT:.0f}s") from e

    async def run(self) -> Reply:
        try:
            return await self._run()
        except StageFailed as e:
            log.warning("split training %s failed: %s", self.job.id, e)
            raise ProtocolError(error_code(e.code), f"split training stopped: {e}") from e

    async def _run(self) -> Reply:
        s = self.spec
        t_start = time.perf_counter()
        plan_meta = [{"index": st.index, "node_id": st.node_id, "name": st.name,
                      "layers": [st.start, st.end],
                      **(st.fetch.describe() if st.fetch is not None else {})}
                     for st in self.stages]
        self.job.update(step=0, loss=None, step_seconds=None, bubble=None,
                        bubble_theory=bubble_fraction(len(self.stages), s.micro_batches),
                        idle_fraction=None, steps_total=s.steps, stages=plan_meta)
        await self.req.partial(MsgType.TRAIN_RUN, {"event": "plan", "job": self.job.id,
                                                   "stages": plan_meta})
        if self.data is not None:
            await self._send_data()
        train_s = 0.0
        for step in range(s.steps):
            rec = await self._step(step)
            train_s += rec["seconds"]
            self.records.append(rec)
            self.job.update(step=step + 1, loss=rec["loss"], step_seconds=rec["seconds"],
                            idle_fraction=self._idle_fraction(), bubble=rec["bubble"],
                            bubble_stages=[st["bubble"] for st in rec["stages"]],
                            bytes_forward=rec["bytes_forward"],
                            bytes_backward=rec["bytes_backward"])
            await self.req.partial(MsgType.TRAIN_RUN, {"event": "step", **rec})
            if s.save and s.save_every and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
                await self._save(step + 1)
        if s.save:
            await self._save(s.steps)
            if s.send_files and self.save_dir is not None:
                await send_files(self.req, MsgType.TRAIN_RUN, self.save_dir)
        return Reply(MsgType.TRAIN_RUN, self._result(train_s, time.perf_counter() - t_start))

    async def _send_data(self) -> None:
        """The dataset's content to stage 0 (TRAIN_DATA), before the first step."""
        assert self.data is not None
        st = self.stages[0]
        frame = await self._call(st, MsgType.TRAIN_DATA, {}, [self.data])
        try:
            blocks = TRAIN_DATA_REPLY.parse(frame.meta)["blocks"]
        except ProtocolError as e:
            raise StageFailed(st, e.code, f"bad TRAIN_DATA answer: {e.message}") from e
        self.job.update(dataset_blocks=blocks)

    async def _step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        frames = await self._gather([self._call(st, MsgType.TRAIN_BATCH, {"step": step})
                                     for st in self.stages])
        replies = [_batch_reply(st, f.meta, step) for st, f in zip(self.stages, frames, strict=True)]
        loss = replies[-1]["loss"]
        if loss is None:
            raise StageFailed(self.stages[-1], ErrorCode.INTERNAL, "the last stage sent no loss")
        total_sq = sum(r["grad_sq"] for r in replies)
        lr = self.spec.optim.lr_at(step, self.spec.steps)
        scale = clip_scale(total_sq, self.spec.optim.grad_clip)
        await self._gather([self._call(st, MsgType.TRAIN_STEP,
                                       {"step": step, "lr": lr, "scale": scale})
                            for st in self.stages])
        seconds = time.perf_counter() - t0
        for tot, r in zip(self.stage_totals, replies, strict=True):
            for key in ("forward_s", "backward_s", "idle_s"):
                tot[key] += r[key]
            tot["busy_window_s"] += seconds
        # the measured bubble: each stage's worker busy time against the step's pipeline time
        busy = [r["busy_s"] for r in replies]
        windows = [r["window_s"] for r in replies]
        bubbles = measured_bubble(busy, windows)
        for tot, b in zip(self.stage_totals, busy, strict=True):
            tot["busy_s"] += b
            tot["pipeline_s"] += max(windows)
        return {
            "step": step, "loss": loss, "seconds": seconds,
            "bytes_forward": sum(r["bytes_forward"] for r in replies),
            "bytes_backward": sum(r["bytes_backward"] for r in replies),
            "lr": lr, "grad_norm": math.sqrt(total_sq),
            "bubble": sum(bubbles) / len(bubbles),
            "stages": [{**{k: r[k] for k in ("forward_s", "backward_s", "idle_s", "busy_s",
                                                 "window_s")}, "bubble": b}
                       for r, b in zip(replies, bubbles, strict=True)],
        }

    def _stage_idle(self, tot: Mapping[str, float]) -> float:
        window = tot["busy_window_s"] or 1.0
        return max(0.0, 1.0 - (tot["forward_s"] + tot["backward_s"]) / window)

    def _idle_fraction(self) -> float:
        return sum(self._stage_idle(t) for t in self.stage_totals) / len(self.stage_totals)

    @staticmethod
    def _stage_bubble(tot: Mapping[str, float]) -> float:
        """Measured over every step: 1 - busy seconds / pipeline seconds."""
        return measured_bubble([tot["busy_s"]], [tot["pipeline_s"]])[0]

    def _result(self, train_s: float, total_s: float) -> dict[str, Any]:
        s = self.spec
        stages: list[dict[str, Any]] = []
        for st, tot in zip(self.stages, self.stage_totals, strict=True):
            stages.append({
                "index": st.index, "node_id": st.node_id, "name": st.name,
                "layers": [st.start, st.end], "forward_s": tot["forward_s"],
                "backward_s": tot["backward_s"], "idle_s": tot["idle_s"],
                "idle_fraction": self._stage_idle(tot), "busy_s": tot["busy_s"],
                "bubble": self._stage_bubble(tot),
            })
        steps = [{k: r[k] for k in ("step", "loss", "seconds", "bytes_forward", "bytes_backward",
                                    "lr", "grad_norm", "bubble")} for r in self.records]
        tokens = s.steps * s.batch_size * s.seq_len
        return {
            "job": self.job.id, "losses": [r["loss"] for r in self.records], "steps": steps,
            "stages": stages, "seconds": total_s, "train_seconds": train_s,
            "step_seconds": train_s / max(1, len(self.records)),
            "idle_fraction": self._idle_fraction(),
            "bubble": sum(st["bubble"] for st in stages) / len(stages),
            "bubble_theory": bubble_fraction(len(self.stages), s.micro_batches),
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "schedule": s.schedule, "micro_batches": s.micro_batches,
            "saved": self.saved,
        }

    # -- checkpoints ------------------------------------------------------------------------

    async def _save(self, step: int) -> None:
        assert self.save_dir is not None
        dest = self.save_dir
        parts = await self._gather([self._fetch(st) for st in self.stages])
        tensors: dict[str, torch.Tensor] = {}
        for state, _ in parts:
            for k, v in state.items():
                tensors.setdefault(k, v)
        config_raw, files = parts[0][1]
        await asyncio.to_thread(write_checkpoint, dest, tensors, config_raw, files,
                                self.spec, self.job.id)
        self.saved = str(dest)
        self.job.update(saved=str(dest), saved_step=step)
        await self.req.partial(MsgType.TRAIN_RUN, {"event": "saved", "step": step,
                                                   "name": dest.name, "path": str(dest)})

    async def _fetch(self, st: Stage) -> tuple[dict[str, torch.Tensor],
                                               tuple[dict[str, Any], dict[str, bytes]]]:
        state: dict[str, torch.Tensor] = {}
        try:
            async for frame in self.cluster.stream(
                    st.node_id, MsgType.TRAIN_SAVE, {"job": self.job.id, "rid": st.rid},
                    idle_timeout=STEP_TIMEOUT):
                got = unpack_tensors(frame.meta.get("tensors"), frame.payload)
                if frame.is_partial:
                    state.update({k: v.clone() for k, v in got.items()})
                    continue
                config_raw = frame.meta.get("config") or {}
                files = {k: bytes(v.numpy().tobytes()) for k, v in got.items()}
                return state, (config_raw, files)
        except RemoteError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ProtocolError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ConnectionClosed as e:
            raise StageFailed(st, ErrorCode.PEER_DOWN, f"the node died or left ({e})") from e
        except TimeoutError as e:
            raise StageFailed(st, ErrorCode.TIMEOUT, "TRAIN_SAVE timed out") from e
        raise StageFailed(st, ErrorCode.INTERNAL, "TRAIN_SAVE ended without a final answer")


