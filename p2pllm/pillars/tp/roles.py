"""The tp-rank role: one rank of a tensor-parallel group (issue 15, protocol.md section 14).

ASSIGN: the rank loads its slice (:func:`~p2pllm.engine.tp.load_tp_rank`, only its rows and
columns of a safetensors checkpoint) on its worker thread, then joins the job's gloo group on
the coordinator's TCPStore under the prefix ``job/token`` (the ASSIGN's random token: a
process without it cannot take a rank of this job), and answers ACK once every rank has
joined. TP_RUN: :func:`~p2pllm.engine.tp.tp_generate` on the worker thread (collectives block:
never on the event loop); rank 0 streams each token as a TP_TOKEN partial. A collective that
waits past ``op_timeout_s`` (a rank died or froze) fails the run; RELEASE (or the
coordinator's loss) aborts the group, so no thread stays blocked in gloo past that timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from p2pllm.daemon.roles import Refused, Role, RoleHandler
from p2pllm.engine.errors import ModelError
from p2pllm.pillars.messages import SAMPLING, sampling_from_values
from p2pllm.pillars.rolemodel import model_refusal, role_model_path
from p2pllm.pillars.tp.messages import ASSIGN_TP_RANK, TP_RUN
from p2pllm.wire.connection import Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import torch_dtype

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

log = logging.getLogger(__name__)

__all__ = ["TPRankRole", "route_to"]


class Stopped(Exception):
    """The run was cancelled (the coordinator went away or the role is being released)."""


def route_to(host: str) -> str:
    """The local address this host uses to reach ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def join_group(store_host: str, store_port: int, prefix: str, rank: int, world: int,
               gloo_host: str, join_timeout_s: float, op_timeout_s: float) -> Any:
    """A gloo process group of the job's ranks: a client of the coordinator's TCPStore, keys
    under ``prefix``; every rank checks in (``ready``) before the mesh connects, so a slow
    loader does not eat the op timeout. Collectives then time out after ``op_timeout_s``."""
    import torch.distributed as dist

    join = datetime.timedelta(seconds=join_timeout_s)
    client = dist.TCPStore(store_host, store_port, None, False, join)
    store = dist.PrefixStore(prefix, client)
    store.add("ready", 1)
    deadline = time.monotonic() + join_timeout_s
    while int(store.add("ready", 0)) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank joined within {join_timeout_s:g} s")
        time.sleep(0.02)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = join
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=gloo_host)]
    pg = dist.ProcessGroupGloo(store, rank, world, opts)
    pg._set_default_timeout(datetime.timedelta(seconds=op_timeout_s))
    pg.barrier().wait()  # type: ignore[attr-defined]
    return pg, client


class TPRankRole(Role):
    """Rank ``rank`` of ``world``: its slice of every layer, its own KV cache, the group."""

    kind = "tp-rank"

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any],
               params: Mapping[str, Any]) -> str | None:
        try:
            p = ASSIGN_TP_RANK.parse(params)
        except ProtocolError as exc:
            return f"bad tp-rank parameters: {exc.message}"
        if p["rank"] >= p["world"]:
            return f"rank {p['rank']} is not in [0, {p['world']})"
        return model_refusal(config, p["model"], ())

    async def on_start(self) -> None:
        self.p = p = ASSIGN_TP_RANK.parse(self.params)
        self.rank, self.world = int(p["rank"]), int(p["world"])
        self.group: Any = None
        self._store: Any = None
        self.model: Any = None
        self._cancel = threading.Event()
        self.runs = 0
        self.tokens = 0
        self.comm_s = 0.0
        self.comm_calls = 0
        path = await role_model_path(self.ctx, p["model"], None, ())
        from p2pllm.engine.tp import load_tp_rank

        try:
            self.model = await self.worker.run(functools.partial(
                load_tp_rank, path, self.rank, self.world, None,
                dtype=torch_dtype(p["dtype"]), quant=p["quant"]))
        except ModelError as exc:  # TPSizeError included: it names the possible N
            raise Refused(f"cannot load tp rank {self.rank}/{self.world} of {path}: {exc}") from exc
        gloo_host = p["gloo_host"] or route_to(p["store_host"])
        prefix = f"{self.ctx.job}/{p['token']}"
        try:
            self.group, self._store = await self.worker.run(
                join_group, p["store_host"], p["store_port"], prefix, self.rank, self.world,
                gloo_host, p["join_timeout_s"], p["op_timeout_s"])
        except (RuntimeError, TimeoutError, ValueError) as exc:
            raise ProtocolError(ErrorCode.PEER_DOWN, (
                f"tp rank {self.rank}/{self.world} could not join the group at "
                f"{p['store_host']}:{p['store_port']}: {exc}")) from exc
        self.model.group = self.group
        log.info("tp rank %d/%d of %s loaded and joined", self.rank, self.world, path.name)

    async def on_stop(self) -> None:
        self._cancel.set()
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            # a rank blocked in a collective returns with an error; the others see this
            # rank's sockets close (or time out)
            with contextlib.suppress(Exception):
                group.abort()
        self.model = None
        self._store = None

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {MsgType.TP_RUN: self.on_run}

    def summary(self) -> str:
        return f"tp rank {self.p['rank']}/{self.p['world']}" if hasattr(self, "p") else ""

    def role_metrics(self) -> dict[str, Any]:
        return {"rank": getattr(self, "rank", None), "world": getattr(self, "world", None),
                "runs": getattr(self, "runs", 0), "tokens": getattr(self, "tokens", 0),
                "comm_s": round(getattr(self, "comm_s", 0.0), 6),
                "comm_calls": getattr(self, "comm_calls", 0)}

    def memory_bytes(self) -> int:
        model = getattr(self, "model", None)
        if model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in model.parameters())

    async def on_run(self, req: Request) -> Reply:
        from p2pllm.engine.tp import tp_generate

        v = TP_RUN.parse(req.meta)
        if self.model is None or self.group is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"tp rank {self.rank} is not running")
        params = sampling_from_values(SAMPLING.parse(dict(v["sampling"])))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = threading.Event()
        role_cancel = self._cancel
        model = self.model
        rank = self.rank

        def on_token(token: int) -> None:
            if cancel.is_set() or role_cancel.is_set():
                raise Stopped("cancelled")
            if rank == 0:
                loop.call_soon_threadsafe(queue.put_nowait, token)

        def run() -> Any:
            model.reset_stats()
            with torch.inference_mode():
                return tp_generate(model, list(v["prompt_ids"]), v["max_tokens"], params,
                                   stop_ids=list(v["stop_ids"]), on_token=on_token)

        async def pump() -> None:
            step = 0
            while True:
                tok = await queue.get()
                if tok is None:
                    return
                await req.partial(MsgType.TP_TOKEN, {"token": tok, "step": step})
                step += 1

        pumper = asyncio.create_task(pump())
        try:
            result = await self.worker.run(run, cancel=cancel)
        except (RuntimeError, Stopped) as exc:  # gloo: a peer closed, or a timeout
            raise ProtocolError(ErrorCode.PEER_DOWN,
                                f"tp rank {rank}/{self.world}: a collective failed: {exc}") from exc
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await pumper
            self.comm_s += model.comm_s
            self.comm_calls += model.comm_calls
        self.runs += 1
        self.tokens += result.generated_tokens
        return Reply(MsgType.TP_RUN, {
            "rank": rank, "generated_tokens": result.generated_tokens,
            "stop_reason": result.stop_reason, "tokens_per_s": round(result.tokens_per_s, 3),
            "time_to_first_token_s": round(result.time_to_first_token_s, 6),
            "seconds": round(result.seconds, 6), "comm_s": round(model.comm_s, 6),
            "comm_calls": model.comm_calls,
            "token_ids": result.token_ids if rank == 0 else []})
