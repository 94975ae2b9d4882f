"""The fl-client role: LoRA fine-tuning on this host's --data-dir, one round per FL_TRAIN.

ASSIGN params (``ClientParams``) name the base model and the LoRA config; ``start()`` reads and
tokenizes the local data and wraps the model with peft. Each FL_TRAIN carries the global
adapter; the role loads it, trains locally, and answers with its adapter tensors, its number
of training blocks and its losses. FL_EVAL evaluates an adapter on the local eval blocks.
Only adapter tensors and numbers leave this host; the text never does. Loading, training and
evaluation run on the role's worker (``Role.worker``), one at a time, in arrival order; a round
whose request is cancelled (or whose role stops) is told through its cancel event and stops
between two optimizer steps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from torch import Tensor

from p2pllm.daemon.capabilities import device_kind
from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.daemon.roles import Refused, Role, RoleContext, RoleHandler
from p2pllm.pillars.caps import check_payload, check_train_tokens
from p2pllm.pillars.federated.data import DataError, data_files
from p2pllm.pillars.federated.lora import check_same_layout, quantize_refusal
from p2pllm.pillars.federated.messages import ClientParams, RoundConfig
from p2pllm.pillars.federated.training import LocalTrainer
from p2pllm.pillars.rolemodel import need_whole, role_model_path
from p2pllm.wire.connection import Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


async def find_model(params: ClientParams, ctx: RoleContext) -> Path:
    """The base model here: the name, resolved in this daemon's own roots
    (:class:`~p2pllm.daemon.modelrefs.ModelRoots`; a hub download, with --allow-hub, in a
    thread), or fetched whole from ``params.sources`` into the models cache when this host
    lacks it. ``model_path`` is never opened: a path a peer sends is not trusted. FORBIDDEN for
    a path outside the roots, REFUSED when this host lacks the model and cannot fetch it."""
    need = need_whole() if params.sources else None
    return await role_model_path(ctx, params.model, need, params.sources)


class FLClientRole(Role):
    kind = "fl-client"

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
        model = params.get("model")
        if isinstance(model, str) and model:
            ModelRoots.of(config).find(model)  # FORBIDDEN for a path outside this daemon's roots
        if not config.data_dir:
            return "no --data-dir: this host has no federated-learning data"
        fl = caps.get("fl_data") or {}
        if not fl.get("present"):
            return f"no .txt or .jsonl files under --data-dir {config.data_dir}"
        quantize = params.get("quantize")
        return quantize_refusal(quantize, str(caps.get("device", "cpu"))) if quantize else None

    async def on_start(self) -> None:
        self.config = ClientParams.from_meta(self.params)
        self.trainer: LocalTrainer | None = None
        self.rounds_done = 0
        self.last: dict[str, Any] = {}
        assert self.ctx.config.data_dir is not None  # refuse() checked
        if not data_files(self.ctx.config.data_dir):
            raise Refused(f"no .txt or .jsonl files under {self.ctx.config.data_dir}")
        path = await find_model(self.config, self.ctx)
        try:
            self.trainer = await self.worker.run(
                LocalTrainer.load, path, self.config, self.ctx.config.data_dir, device_kind()
            )
        except DataError as exc:
            raise Refused(str(exc)) from exc
        check_payload(self.ctx.config, sum(t.numel() * t.element_size()  # FL_TRAIN carries it
                                           for t in self.trainer.template.values()), "the adapter")
        log.info(
            "fl-client %s: %d train / %d eval blocks of %d tokens, adapter of %d tensors",
            self.ctx.job, self.trainer.data.train.shape[0], self.trainer.data.eval.shape[0],
            self.config.block_size, len(self.trainer.template),
        )

    async def on_stop(self) -> None:
        self.trainer = None  # the base class then closes the worker: a running round is cancelled

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {MsgType.FL_TRAIN: self.on_train, MsgType.FL_EVAL: self.on_eval}

    def summary(self) -> str:
        if self.trainer is None:
            return "fl-client"
        return f"{self.trainer.num_examples} examples, round {self.rounds_done}"

    def role_metrics(self) -> dict[str, Any]:
        n = self.trainer.num_examples if self.trainer is not None else 0
        return {"num_examples": n, "rounds": self.rounds_done, **self.last}

    def memory_bytes(self) -> int:
        return self.trainer.memory_bytes() if self.trainer is not None else 0

    # -- handlers --------------------------------------------------------------------------

    async def on_train(self, req: Request) -> Reply:
        trainer = self._trainer()
        cfg = RoundConfig.from_meta(req.meta)
        check_train_tokens(self.ctx.config, cfg.batch_size, self.config.block_size,
                           f"FL_TRAIN round {cfg.round}")  # caps: pillars/caps.py
        tensors = self._global_adapter(req, trainer)
        result = await self._in_thread(lambda cancel: trainer.train_round(tensors, cfg, cancel))
        self.rounds_done += 1
        self.last = {
            "round": cfg.round,
            "train_loss": result.train_loss,
            "eval_loss": result.eval_loss,
            "round_s": round(result.seconds, 3),
        }
        self.ctx.report(self.metrics())
        meta, bufs = tensor_meta(
            result.tensors,
            {
                "round": cfg.round,
                "num_examples": result.num_examples,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
                "steps": result.steps,
                "seconds": result.seconds,
            },
        )
        return Reply(MsgType.FL_TRAIN, meta, bufs)

    async def on_eval(self, req: Request) -> Reply:
        trainer = self._trainer()
        tensors = self._global_adapter(req, trainer)
        loss = await self._in_thread(lambda cancel: trainer.evaluate(tensors))
        return Reply(
            MsgType.FL_EVAL,
            {"round": req.meta.get("round"), "eval_loss": loss, "num_eval_examples": int(trainer.data.eval.shape[0])},
        )

    # -- helpers ---------------------------------------------------------------------------

    def _trainer(self) -> LocalTrainer:
        if self.trainer is None:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "this fl-client is stopping")
        return self.trainer

    @staticmethod
    def _global_adapter(req: Request, trainer: LocalTrainer) -> dict[str, Tensor]:
        """The adapter in the request, checked against this model's layout and copied."""
        tensors = unpack_tensors(req.meta.get("tensors"), req.frame.payload)
        try:
            check_same_layout(tensors, trainer.template)
            if not all(bool(t.isfinite().all()) for t in tensors.values()):
                raise ValueError("the adapter holds NaN or Inf values")
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_TENSOR, str(exc)) from exc
        return {k: v.clone() for k, v in tensors.items()}

    async def _in_thread(self, fn: Callable[[threading.Event], T]) -> T:
        """Run blocking work on the worker; if this handler is cancelled (or the role stops),
        tell the work to stop."""
        cancel = threading.Event()
        return await self.worker.run(fn, cancel, cancel=cancel)
