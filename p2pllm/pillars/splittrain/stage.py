"""The ``train-stage`` role: one contiguous layer range of a model, trained across hosts.

Per step (protocol.md section 11): the coordinator sends ``TRAIN_BATCH``; the stage runs its
schedule's operations (:mod:`.schedule`) in order. A forward of micro-batch m takes token ids
from the dataset (first stage) or the activations ``TRAIN_FORWARD`` brought from the stage
before, and pushes its output (with the labels) to the stage after; the last stage computes
the loss. A backward takes the gradient ``TRAIN_BACKWARD`` brought from the stage after (the
last stage starts from its loss) and pushes the gradient of its input to the stage before.
Gradients accumulate; when the model ties its embedding and head and both train on different
stages, the last stage swaps its head gradient for the first stage's embedding gradient
(``TRAIN_TIED``) so both copies step on the sum. The stage answers with its timings and the
squared norm of its gradients; ``TRAIN_STEP`` then applies AdamW with the coordinator's
learning rate and clip factor. ``TRAIN_SAVE`` streams the slice's tensors back.

Stage 0's dataset is a name in this daemon's ``--data-dir`` (loaded at start, confined by
:mod:`p2pllm.pillars.paths`) or the content the CLI sent, which the coordinator forwards in
``TRAIN_DATA`` before the first step; no path from the wire is opened.

All torch work of a stage runs, in order, on the role's worker (``Role.worker``), off the event
loop. The worker's accounting gives each step's busy seconds (``busy_s``) and the step's wall
time on this stage (``window_s``) in the ``TRAIN_BATCH`` answer: the coordinator's measured
pipeline bubble.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from p2pllm.daemon.roles import Role, RoleHandler
from p2pllm.daemon.worker import Span
from p2pllm.engine.errors import ModelError, ModelNotFoundError
from p2pllm.pillars.caps import check_payload, check_train_tokens
from p2pllm.pillars.messages import error_code
from p2pllm.pillars.paths import dataset_path
from p2pllm.pillars.splittrain.compute import (
    IGNORE_INDEX,
    StageModel,
    build_slice,
    lora_meta,
)
from p2pllm.pillars.splittrain.data import (
    DataError,
    DatasetNotFound,
    batch_rows,
    blocks_from_bytes,
    load_blocks,
    micro_rows,
    split_batch,
)
from p2pllm.pillars.splittrain.messages import (
    TRAIN_BACKWARD,
    TRAIN_BATCH,
    TRAIN_DATA,
    TRAIN_FORWARD,
    TRAIN_STEP,
    TRAIN_TIED,
    Neighbour,
    StageParams,
)
from p2pllm.pillars.splittrain.schedule import Op, Phase, stage_schedule
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.schema import Body
from p2pllm.wire.tensors import tensor_meta, unpack_tensors

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

__all__ = ["StageParams", "TrainStageRole"]

log = logging.getLogger(__name__)

T = TypeVar("T")

INBOX_TIMEOUT = 600.0  # seconds a stage waits for a neighbour's activations or gradients
SEND_TIMEOUT = 600.0
SAVE_CHUNK = 64 << 20  # bytes of tensors per TRAIN_SAVE partial response
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "added_tokens.json", "chat_template.jinja")
MAX_FILE = 64 << 20


@dataclass
class _Totals:
    forward_s: float = 0.0
    backward_s: float = 0.0
    idle_s: float = 0.0
    bytes_forward: int = 0
    bytes_backward: int = 0

    def add(self, other: _Totals) -> None:
        self.forward_s += other.forward_s
        self.backward_s += other.backward_s
        self.idle_s += other.idle_s
        self.bytes_forward += other.bytes_forward
        self.bytes_backward += other.bytes_backward


class _Inbox:
    """Activations / gradients that neighbours pushed, by (phase, step, micro-batch)."""

    def __init__(self) -> None:
        self._slots: dict[tuple[Phase, int, int], asyncio.Future[Any]] = {}

    def put(self, key: tuple[Phase, int, int], value: Any) -> None:
        fut = self._slots.get(key)
        if fut is None:
            fut = self._slots[key] = asyncio.get_running_loop().create_future()
        if fut.done():
            raise ProtocolError(ErrorCode.DUPLICATE,
                                f"{key[0].value}{key[2]} of step {key[1]} arrived twice")
        fut.set_result(value)

    async def get(self, key: tuple[Phase, int, int], timeout: float) -> Any:
        fut = self._slots.get(key)
        if fut is None:
            fut = self._slots[key] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._slots.pop(key, None)

    def clear(self) -> None:
        for fut in self._slots.values():
            fut.cancel()
        self._slots.clear()


class TrainStageRole(Role):
    """Holds layers [start, end) as trainable parameters and runs its part of each step."""

    kind = "train-stage"

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any],
               params: Mapping[str, Any]) -> str | None:
        model = params.get("model")
        sources = params.get("sources")  # nodes holding it whole: fetched on start
        if isinstance(model, str) and not sources and not _model_here(config, caps, model):
            from p2pllm.daemon.modelrefs import ModelRoots

            return (f"{config.name or 'this node'} does not have model {model!r} "
                    f"(looked under {ModelRoots.of(config).describe()})")
        need = params.get("memory_bytes", 0)
        if isinstance(need, int) and need > 0:
            room = int(caps.get("mem_budget", 0)) - int(caps.get("mem_used_by_roles", 0))
            if room > 0 and need > room:
                return f"not enough memory for the stage: needs {need} bytes, {room} free"
        return None

    # -- lifecycle --------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.p = StageParams.from_meta(self.params)
        self.where = f"stage {self.p.index} (layers {self.p.start}-{self.p.end})"
        check_train_tokens(self.ctx.config, self.p.batch_size, self.p.seq_len, self.where)
        self.step = 0  # optimizer steps done
        self.accumulated = False  # a TRAIN_BATCH ran; TRAIN_STEP is due
        self.running = False
        self.inbox = _Inbox()
        self.forwarded: set[int] = set()
        self.totals = _Totals()
        self.last_loss: float | None = None
        self.step_span: Span | None = None  # the worker's busy and wall time of the last step
        self.last: dict[str, Any] = {}
        self.blocks: torch.Tensor | None = None
        self.dataset: Path | None = None  # stage 0: the named dataset, inside --data-dir
        if self.p.first and self.p.data is not None:
            where = f"{self.where} on {self.ctx.config.name or 'this host'}"
            self.dataset = dataset_path(self.ctx.config.data_dir, self.p.data, where)
        cap = self.ctx.config.max_dataset_bytes
        if self.p.data_bytes is not None and self.p.data_bytes > cap:
            raise ProtocolError(ErrorCode.OVER_LIMIT,
                                f"{self.where}: a dataset of {self.p.data_bytes} bytes is over "
                                f"this host's max_dataset_bytes ({cap})")
        self._tied_ready = asyncio.Event()  # first stage: this step's backward is complete
        self._tied_done = asyncio.Event()  # first stage: the tied gradient was summed
        self.ops: list[Op] = stage_schedule(self.p.schedule, self.p.index, self.p.num_stages,
                                            self.p.micro_batches)
        await self._prepare()
        log.info("%s of %s ready: %d trainable parameters", self.where, self.ctx.job,
                 self.compute.num_trainable())

    async def _prepare(self) -> None:
        # a model this node lacks: the stage's layers (and the embedding on the first stage,
        # the norm and head on the last) fetched from the sources into the models cache
        self.fetched: Path | None = None
        if self.p.sources:
            from p2pllm.pillars.rolemodel import role_model_path
            from p2pllm.weights.slices import Need

            need = Need((self.p.start, self.p.end), embed=self.p.first, head=self.p.last)
            self.fetched = await role_model_path(self.ctx, self.p.model, need, self.p.sources)
        try:
            self.compute, self.blocks, self.model_dir = await self._run(self._load)
        except DatasetNotFound as e:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{self.where}: {e} on this host "
                                f"({self.ctx.cluster.name})") from e
        except ModelNotFoundError as e:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"{self.where}: {e}") from e
        except (ModelError, DataError, ValueError) as e:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where}: {e}") from e
        self._check_blocks()
        self.hidden = self.compute.config.hidden_size
        self.vocab = self.compute.config.vocab_size
        # a micro-batch's activations (float32) and labels (int64) travel in one frame
        check_payload(self.ctx.config, self.p.mb_size * self.p.seq_len * (self.hidden * 4 + 8),
                      f"{self.where}: a micro-batch's TRAIN_FORWARD")

    def _check_blocks(self) -> None:
        if self.p.first and self.blocks is not None and self.blocks.shape[0] < self.p.batch_size:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where}: the dataset has {self.blocks.shape[0]} blocks "
                                f"of {self.p.seq_len + 1} tokens, fewer than one batch of "
                                f"{self.p.batch_size}")

    def _load(self) -> tuple[StageModel, torch.Tensor | None, Path]:
        from p2pllm.daemon.modelrefs import ModelRoots

        if self.ctx.config.threads:
            torch.set_num_threads(self.ctx.config.threads)
        # inside this daemon's roots, FORBIDDEN outside (on the worker thread: a hub
        # download, with --allow-hub, never on the event loop)
        path = self.fetched or ModelRoots.of(self.ctx.config).resolve(self.p.model).path
        model = build_slice(path, (self.p.start, self.p.end), init=self.p.init,
                            seed=self.p.seed, lora=self.p.lora)
        compute = StageModel(model, self.p.optim)
        if compute.tied is not None and self.p.tied_peer is None:
            raise ModelError("the model ties its embedding and head, which train on different "
                             "stages, but no tied_peer was given")
        blocks = None
        if self.dataset is not None:  # a name in --data-dir (content comes in TRAIN_DATA)
            assert self.ctx.config.data_dir is not None
            blocks = load_blocks(self.dataset, self.p.seq_len, path,
                                 root=self.ctx.config.data_dir)
        return compute, blocks, path

    async def on_stop(self) -> None:
        self.inbox.clear()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work on this stage's worker thread (in submission order)."""
        return await self.worker.run(fn, *args)

    async def _timed(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """_run, and the worker's busy seconds while it ran (the op's compute time)."""
        span = self.worker.span()
        out = await self.worker.run(fn, *args)
        return out, span.end().busy_s

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {
            MsgType.TRAIN_BATCH: self.on_batch,
            MsgType.TRAIN_FORWARD: self.on_forward,
            MsgType.TRAIN_BACKWARD: self.on_backward,
            MsgType.TRAIN_TIED: self.on_tied,
            MsgType.TRAIN_STEP: self.on_step,
            MsgType.TRAIN_SAVE: self.on_save,
            MsgType.TRAIN_DATA: self.on_data,
        }

    def summary(self) -> str:
        p: StageParams | None = getattr(self, "p", None)
        if p is None:  # asked while start() has not parsed the params (or is failing on them)
            return "stage (not started)"
        return f"stage {p.index}/{p.num_stages} layers {p.start}-{p.end}"

    def role_metrics(self) -> dict[str, Any]:
        if getattr(self, "totals", None) is None:  # before on_start set its figures up
            return {}
        t = self.totals
        out: dict[str, Any] = {
            "stage": self.p.index, "layers": [self.p.start, self.p.end], "step": self.step,
            "forward_s": round(t.forward_s, 4), "backward_s": round(t.backward_s, 4),
            "idle_s": round(t.idle_s, 4), "bytes_forward": t.bytes_forward,
            "bytes_backward": t.bytes_backward,
        }
        if self.step_span is not None:  # the last step, as this stage saw it
            out["step_busy_s"] = round(self.step_span.busy_s, 4)
            out["step_window_s"] = round(self.step_span.wall_s, 4)
        if self.last_loss is not None:
            out["loss"] = self.last_loss
        return out

    def memory_bytes(self) -> int:
        compute = getattr(self, "compute", None)
        return compute.memory_bytes() if compute is not None else 0

    # -- a step's micro-batches --------------------------------------------------------------

    def _check_step(self, req: Request, body: Body = TRAIN_BATCH) -> int:
        step: int = body.parse(req.meta)["step"]  # the whole body: BAD_REQUEST naming a field
        if step != self.step:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where} is at step {self.step}, got step {step}")
        return step

    async def on_data(self, req: Request) -> Reply:
        """Stage 0: the dataset's content (TRAIN_DATA's payload), tokenized into blocks."""
        TRAIN_DATA.parse(req.meta)
        if not self.p.first or self.p.data_format is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where} takes no dataset content")
        if self.blocks is not None:
            raise ProtocolError(ErrorCode.DUPLICATE, f"{self.where} has its dataset already")
        got = req.frame.payload.nbytes
        if got != self.p.data_bytes:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where}: TRAIN_DATA carries {got} "
                                f"bytes, ASSIGN announced {self.p.data_bytes}")
        data, fmt = bytes(req.frame.payload), self.p.data_format
        try:
            blocks = await self._run(blocks_from_bytes, data, fmt, self.p.seq_len,
                                     self.model_dir, "the dataset sent")
        except DataError as e:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where}: {e}") from e
        self.blocks = blocks
        try:
            self._check_blocks()
        except ProtocolError:
            self.blocks = None
            raise
        return Reply(MsgType.TRAIN_DATA, {"blocks": int(blocks.shape[0])})

    async def on_batch(self, req: Request) -> Reply:
        step = self._check_step(req)
        if self.p.first and self.blocks is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where} has no dataset yet (TRAIN_DATA comes first)")
        if self.running or self.accumulated:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where}: step {step}'s micro-batches already ran")
        self.running = True
        self._tied_ready.clear()
        self._tied_done.clear()
        stats = _Totals()
        span = self.worker.span()  # this step's busy and wall time on this stage
        try:
            try:
                loss, peak = await self._run_ops(step, stats)
            except BaseExceptionGroup as group:
                raise _unwrap(group) from None
            await self._sync_tied(step)
            grad_sq = await self._run(self.compute.grad_sq, self._exclude_tied())
            span.end()
        except BaseException:
            self.inbox.clear()
            self.forwarded.clear()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._run(self.compute.reset))
            raise
        finally:
            self.running = False
        self.accumulated = True
        self.totals.add(stats)
        self.step_span = span
        out: dict[str, Any] = {
            "step": step, "grad_sq": grad_sq, "forward_s": stats.forward_s,
            "backward_s": stats.backward_s, "idle_s": stats.idle_s,
            "busy_s": span.busy_s, "window_s": span.wall_s,
            "bytes_forward": stats.bytes_forward, "bytes_backward": stats.bytes_backward,
            "peak_in_flight": peak,
        }
        if loss is not None:
            out["loss"] = loss
            self.last_loss = loss
        self.last = out
        self.ctx.report(self.metrics())
        return Reply(MsgType.TRAIN_BATCH, out)

    def _exclude_tied(self) -> bool:
        """The last stage leaves the tied weight out of its norm: the first stage counts it."""
        return self.compute.tied is not None and self.p.last

    async def _run_ops(self, step: int, stats: _Totals) -> tuple[float | None, int]:
        """Run this stage's schedule for one step; returns (the step loss or None, peak)."""
        p = self.p
        inputs = labels = None
        denom = 0
        if p.first:
            assert self.blocks is not None
            rows = batch_rows(self.blocks.shape[0], p.batch_size, step, p.seed, p.shuffle)
            inputs, labels = split_batch(self.blocks, rows)
            denom = int((labels != IGNORE_INDEX).sum())
        saved_labels: dict[int, torch.Tensor] = {}
        loss = 0.0
        in_flight = peak = 0
        async with asyncio.TaskGroup() as sends:
            for op in self.ops:
                m = op.mb
                if op.phase is Phase.FORWARD:
                    if p.first:
                        assert inputs is not None and labels is not None
                        rows_m = micro_rows(range(p.batch_size), p.micro_batches, m)
                        x, lab = inputs[rows_m], labels[rows_m]
                    else:
                        x, lab, denom = await self._wait(Phase.FORWARD, step, m, stats)
                    out, busy = await self._timed(self.compute.forward, m, x, lab, denom)
                    stats.forward_s += busy
                    self.forwarded.add(m)
                    in_flight += 1
                    peak = max(peak, in_flight)
                    if p.last:
                        loss += float(out)
                    else:
                        saved_labels[m] = lab
                        tensors = {"hidden": out, "labels": lab}
                        stats.bytes_forward += _nbytes(tensors)
                        sends.create_task(self._send(
                            MsgType.TRAIN_FORWARD, p.next, p.index + 1,
                            {"step": step, "mb": m, "denom": denom}, tensors))
                else:
                    grad = None
                    if not p.last:
                        grad = await self._wait(Phase.BACKWARD, step, m, stats)
                    gin, busy = await self._timed(self.compute.backward, m, grad)
                    stats.backward_s += busy
                    self.forwarded.discard(m)
                    in_flight -= 1
                    if gin is not None:
                        tensors = {"grad": gin}
                        stats.bytes_backward += _nbytes(tensors)
                        sends.create_task(self._send(
                            MsgType.TRAIN_BACKWARD, p.prev, p.index - 1,
                            {"step": step, "mb": m}, tensors))
        return (loss if p.last else None), peak

    async def _wait(self, phase: Phase, step: int, m: int, stats: _Totals) -> Any:
        t0 = time.perf_counter()
        src = self.p.index - 1 if phase is Phase.FORWARD else self.p.index + 1
        try:
            value = await self.inbox.get((phase, step, m), INBOX_TIMEOUT)
        except TimeoutError:
            what = "activations" if phase is Phase.FORWARD else "gradients"
            raise ProtocolError(ErrorCode.TIMEOUT,
                                f"{self.where}: no {what} of micro-batch {m} from stage {src} "
                                f"within {INBOX_TIMEOUT:.0f}s") from None
        stats.idle_s += time.perf_counter() - t0
        return value

    async def _send(self, msg_type: MsgType, to: Neighbour | None, index: int,
                    meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
        assert to is not None
        body, payload = tensor_meta(tensors, {**meta, "job": self.ctx.job, "rid": to.rid})
        try:
            return await self.ctx.cluster.request(to.node_id, msg_type, body, payload,
                                                  timeout=SEND_TIMEOUT)
        except RemoteError as e:
            code = error_code(e.code)
            raise ProtocolError(code, f"{to.describe(index)} rejected {msg_type.name} from "
                                      f"{self.where}: {e.message}") from e
        except (ConnectionClosed, TimeoutError) as e:
            raise ProtocolError(ErrorCode.PEER_DOWN,
                                f"{self.where} cannot reach {to.describe(index)}: "
                                f"{e or type(e).__name__}") from e

    # -- tied embedding / head -----------------------------------------------------------------

    async def _sync_tied(self, step: int) -> None:
        """Sum the two copies' gradients of a tied embedding/head (first and last stage)."""
        if self.compute.tied is None:
            return
        if self.p.first:
            self._tied_ready.set()  # on_tied may now answer
            try:
                async with asyncio.timeout(INBOX_TIMEOUT):
                    await self._tied_done.wait()
            except TimeoutError:
                raise ProtocolError(ErrorCode.TIMEOUT, f"{self.where}: the last stage did not "
                                    f"send its tied head gradient") from None
            return
        assert self.p.tied_peer is not None
        own = await self._run(self.compute.tied_grad)
        reply = await self._send(MsgType.TRAIN_TIED, self.p.tied_peer, 0,
                                 {"step": step}, {"grad": own})
        other = self._tied_tensor(reply.meta, reply.payload)
        await self._run(lambda: self.compute.set_tied_grad(own + other))

    def _tied_tensor(self, meta: Mapping[str, Any], payload: memoryview) -> torch.Tensor:
        assert self.compute.tied is not None
        tensors = unpack_tensors(meta.get("tensors"), payload)
        g = tensors.get("grad")
        want = tuple(self.compute.tied.shape)
        if set(tensors) != {"grad"} or g is None or tuple(g.shape) != want \
                or g.dtype != self.compute.tied.dtype:
            got = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"{self.where}: expected the tied gradient 'grad' "
                                f"{self.compute.tied.dtype} {want}, got {got}")
        return g.clone()

    async def on_tied(self, req: Request) -> Reply:
        """First stage: the last stage's head gradient in, this stage's embedding gradient out."""
        step = self._check_step(req, TRAIN_TIED)
        if self.compute.tied is None or not self.p.first:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where} holds no tied embedding")
        other = self._tied_tensor(req.meta, req.frame.payload)
        if not self.running:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where} is not running step {step}'s micro-batches")
        try:
            async with asyncio.timeout(INBOX_TIMEOUT):
                await self._tied_ready.wait()
        except TimeoutError:
            raise ProtocolError(ErrorCode.TIMEOUT,
                                f"{self.where}: backward of step {step} did not finish") from None
        if self._tied_done.is_set():
            raise ProtocolError(ErrorCode.DUPLICATE, f"tied gradient of step {step} arrived twice")
        own = await self._run(self.compute.tied_grad)
        await self._run(lambda: self.compute.set_tied_grad(own + other))
        self._tied_done.set()
        body, payload = tensor_meta({"grad": own}, {"step": step})
        return Reply(MsgType.TRAIN_TIED, body, payload)

    # -- messages from neighbours ------------------------------------------------------------

    def _check_mb(self, req: Request, phase: Phase) -> tuple[int, int]:
        step = self._check_step(req, TRAIN_FORWARD if phase is Phase.FORWARD else TRAIN_BACKWARD)
        if self.accumulated:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where}: step {step}'s micro-batches are done")
        mb = req.meta["mb"]
        if not 0 <= mb < self.p.micro_batches:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"mb must be an int in [0, {self.p.micro_batches}), got {mb!r}")
        return step, mb

    def _expect(self, tensors: Mapping[str, torch.Tensor],
                want: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], sender: str) -> None:
        got = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        if got != dict(want):
            fmt = ", ".join(f"{k} {str(d).removeprefix('torch.')} {s}" for k, (d, s) in want.items())
            got_s = ", ".join(f"{k} {str(d).removeprefix('torch.')} {s}"
                              for k, (d, s) in got.items()) or "nothing"
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"{self.where} expected {fmt} from {sender}, got {got_s}")

    async def on_forward(self, req: Request) -> Reply:
        if self.p.first:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where} takes no activations")
        step, mb = self._check_mb(req, Phase.FORWARD)
        denom = req.meta["denom"]  # checked by TRAIN_FORWARD
        tensors = unpack_tensors(req.meta.get("tensors"), req.frame.payload)
        b, t = self.p.mb_size, self.p.seq_len
        self._expect(tensors, {"hidden": (torch.float32, (b, t, self.hidden)),
                               "labels": (torch.int64, (b, t))}, f"stage {self.p.index - 1}")
        labels = tensors["labels"]
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab))
        if bool(bad.any()):
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"{self.where}: labels outside [0, {self.vocab}) in micro-batch {mb}")
        hidden = tensors["hidden"]
        if not bool(torch.isfinite(hidden).all()):
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"{self.where}: non-finite activations in micro-batch {mb}")
        self.inbox.put((Phase.FORWARD, step, mb), (hidden.clone(), labels.clone(), denom))
        return Reply(MsgType.ACK, {})

    async def on_backward(self, req: Request) -> Reply:
        if self.p.last:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where} takes no gradients")
        step, mb = self._check_mb(req, Phase.BACKWARD)
        if mb not in self.forwarded:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where}: gradient for micro-batch {mb}, which it has not "
                                f"sent forward")
        tensors = unpack_tensors(req.meta.get("tensors"), req.frame.payload)
        self._expect(tensors, {"grad": (torch.float32, (self.p.mb_size, self.p.seq_len,
                                                        self.hidden))},
                     f"stage {self.p.index + 1}")
        self.inbox.put((Phase.BACKWARD, step, mb), tensors["grad"].clone())
        return Reply(MsgType.ACK, {})

    # -- optimizer step, checkpoint ----------------------------------------------------------

    async def on_step(self, req: Request) -> Reply:
        step = self._check_step(req, TRAIN_STEP)
        if not self.accumulated:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{self.where}: step {step}'s micro-batches have not run")
        v = TRAIN_STEP.parse(req.meta)
        await self._run(self.compute.step, v["lr"], v["scale"])
        self.step += 1
        self.accumulated = False
        return Reply(MsgType.ACK, {"step": self.step})

    async def on_save(self, req: Request) -> Reply:
        """Stream this slice's tensors (HF names, or LoRA keys) in chunks; the final answer
        carries the model's config (and, from the first stage, its tokenizer files)."""
        if self.running:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.where} is running a step")
        lora = self.p.lora is not None
        state = await self._run(lambda: {k: v.detach().contiguous().clone()
                                         for k, v in self.compute.state_tensors(lora).items()})
        chunk: dict[str, torch.Tensor] = {}
        size = 0
        for name, t in state.items():
            chunk[name] = t
            size += t.numel() * t.element_size()
            if size >= SAVE_CHUNK:
                body, payload = tensor_meta(chunk, {"step": self.step})
                await req.partial(MsgType.TRAIN_SAVE, body, payload)
                chunk, size = {}, 0
        if chunk:
            body, payload = tensor_meta(chunk, {"step": self.step})
            await req.partial(MsgType.TRAIN_SAVE, body, payload)
        files: dict[str, torch.Tensor] = {}
        if self.p.first:
            files = await self._run(self._tokenizer_files)
        meta = {"step": self.step, "config": self.compute.config.source or {},
                "files": sorted(files), "lora": lora_meta(self.p.lora) if self.p.lora else None}
        body, payload = tensor_meta(files, meta)
        return Reply(MsgType.TRAIN_SAVE, body, payload)

    def _tokenizer_files(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in TOKENIZER_FILES:
            f = self.model_dir / name
            if f.is_file() and 0 < f.stat().st_size <= MAX_FILE:
                out[name] = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
        return out


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a TaskGroup's failures: a ProtocolError if there is one."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for e in leaves:
        if isinstance(e, ProtocolError):
            return e
    return leaves[0] if leaves else group


def _model_here(config: DaemonConfig, caps: Mapping[str, Any], model: str) -> bool:
    """Cheap check (no loading, no hub download): a model inside this daemon's roots
    (daemon/modelrefs; FORBIDDEN raised for a path outside them), or a hub id it may fetch."""
    from p2pllm.daemon.modelrefs import ModelRoots

    roots = ModelRoots.of(config)
    return roots.find(model) is not None or roots.may_fetch(model)
