"""FL_RUN: the local daemon coordinates a federated LoRA run, round after round.

1. Config (defaults < checkpoint when resuming < the request), the base model, the global
   adapter (the checkpoint's, or a fresh peft wrap of the base model from the run's seed).
2. Clients: nodes that advertise FL data and accept the fl-client role, placed by the
   :class:`~p2pllm.daemon.runner.JobRunner`: a node that refuses is excluded from the run and
   the runner re-plans (its one policy); a client that loses its role is dropped and re-placed
   (refilled) at the start of the next round, keeping the clients that still hold theirs.
3. Each round: FL_TRAIN (global adapter + round config) to every client at once; answers that
   do not arrive within the round timeout are dropped; answers that do not fit the global
   adapter are rejected; with at least min-clients valid updates the round aggregates them
   weighted by example count, else it is retried. Then FL_EVAL of the new global adapter on
   the clients' eval blocks, a checkpoint, and a progress line to the CLI.
4. The end: the global adapter in peft's format, a PNG of eval loss per round, the result.
   Everything is written under ``<state_dir>/fl/<run_name>/`` only (the adapter directory
   replaced atomically, and only if this daemon made it); a CLI that asked for the files
   (``send_files``) receives them as "file" partials and writes its --out itself.

Size: one module because a run's state (config, clients, global adapter, rounds, checkpoint)
is one object driven round after round; its pure parts (strategy, aggregation, checkpoint,
messages) are the modules beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from p2pllm.daemon.cluster import (
    FETCH,
    FetchCost,
    fetch_estimate,
    model_disk_bytes,
    model_tier,
    takes_role,
)
from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.daemon.runner import Exclusions, JobRunner, Slot
from p2pllm.pillars.federated import lora as lora_mod
from p2pllm.pillars.federated.checkpoint import (
    FILENAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from p2pllm.pillars.federated.messages import (
    FL_EVAL_REPLY,
    FL_TRAIN_REPLY,
    ClientParams,
    RoundConfig,
    RunConfig,
)
from p2pllm.pillars.federated.plot import plot_eval_loss
from p2pllm.pillars.federated.strategy import ClientUpdate, screen, server_update, weighted_mean
from p2pllm.pillars.paths import is_ours, output_path, send_files, write_dir
from p2pllm.plan.partition import PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import Buffer, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors

log = logging.getLogger(__name__)

ROLE = "fl-client"
POLL = 0.2


def accepts_client_role(caps: Mapping[str, Any]) -> bool:
    return takes_role(caps, ROLE)


def eligible_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Nodes with FL data that take the fl-client role, most data first."""
    out = [
        n for n in nodes
        if (n.get("caps") or {}).get("fl_data", {}).get("present") and accepts_client_role(n["caps"])
    ]
    out.sort(key=lambda n: (-int(n["caps"]["fl_data"].get("bytes", 0)), str(n["name"]), str(n["node_id"])))
    return out


def client_fetch(nodes: Sequence[Mapping[str, Any]], node: Mapping[str, Any], model: str,
                 model_path: Path) -> FetchCost | None:
    """The fetch of the whole base model (``model_path``: this node's copy, its size on disk)
    by a client on ``node``, when that node lacks it and other nodes list it; else None."""
    tier, _, sources = model_tier(nodes, node, model)
    if tier != FETCH:
        return None
    return fetch_estimate(nodes, str(node["node_id"]), sources, model_disk_bytes(model_path))


def run_dir(state_dir: str, run_name: str) -> Path:
    """Where a run keeps its checkpoint and its adapter: <state_dir>/fl/<run_name>, FORBIDDEN
    for a name that is not one path component or that resolves outside the state dir."""
    return output_path(state_dir, "fl", run_name, "FL_RUN run_name", require_ours=False)


def output_dir(cfg: RunConfig, run_dir: Path) -> Path:
    return run_dir / "adapter"


def model_nbytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@dataclass
class Client:
    node_id: str
    name: str
    assigned: bool = True


@dataclass
class Outcome:
    """What became of one client in one attempt of a round."""

    client: Client
    status: str  # "ok" | "dropped" | "rejected"
    reason: str = ""
    tensors: dict[str, Tensor] | None = None
    num_examples: int = 0
    train_loss: float = math.nan
    eval_loss: float = math.nan
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    sent: bool = False  # the FL_TRAIN request was written (its link was up)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.client.node_id,
            "name": self.client.name,
            "status": self.status,
            "num_examples": self.num_examples,
            "train_loss": _num(self.train_loss),
            "eval_loss": _num(self.eval_loss),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "seconds": round(self.seconds, 3),
        }
        if self.reason:
            out["reason"] = self.reason
        return out


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class RunState:
    done: int = 0  # rounds finished
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial_eval_loss: float | None = None
    resumed_from: int = 0
    rejected_total: int = 0


async def coordinate(host: JobHost, req: Request) -> Reply:
    """FL_RUN handler: run the whole job; partial FL_RUN responses report each round."""
    run = FLRun(host, req)
    await run.prepare()
    async with host.job("fl", run.job_params()) as job:
        return await run.execute(job)


class FLRun:
    """One FL run on its coordinator."""

    def __init__(self, host: JobHost, req: Request) -> None:
        self.host = host
        self.req = req
        self.cluster = host.cluster
        self.clients: dict[str, Client] = {}
        self.runner: JobRunner | None = None
        self.selecting = True  # the first placement: fewer than min-clients is an error
        self.state = RunState()
        self.velocity: dict[str, Tensor] | None = None
        self.global_adapter: dict[str, Tensor] = {}

    # -- 1. config, model, checkpoint --------------------------------------------------------

    async def prepare(self) -> None:
        given = {k: v for k, v in self.req.meta.items() if v is not None}
        cfg = RunConfig.from_meta(given)
        self.dir = run_dir(self.host.config.state_dir, cfg.name)
        self.ckpt_path = self.dir / FILENAME
        ckpt: Checkpoint | None = None
        if cfg.resume:
            try:
                ckpt = await asyncio.to_thread(load_checkpoint, self.ckpt_path)
            except CheckpointError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from exc
            if ckpt is None:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND,
                    f"--resume: no checkpoint of run {cfg.name!r} at {self.ckpt_path}; "
                    f"start it without --resume (or name the run with --run-name)",
                )
            cfg = RunConfig.from_meta(given, base=ckpt.config)
            clashes = cfg.conflicts(ckpt.config, given)
            if clashes:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"--resume: these settings differ from the checkpoint of run {cfg.name!r}: "
                    f"{'; '.join(clashes)}. Leave them out to use the checkpoint's values.",
                )
            self.state = RunState(
                done=ckpt.round,
                rounds=list(ckpt.rounds),
                initial_eval_loss=ckpt.initial_eval_loss,
                resumed_from=ckpt.round,
                rejected_total=sum(int(r.get("rejected", 0)) for r in ckpt.rounds),
            )
            self.global_adapter = ckpt.global_adapter
            self.velocity = ckpt.velocity
        elif self.ckpt_path.exists():
            log.info("FL run %s starts afresh: its old checkpoint will be replaced", cfg.name)
        self.cfg = cfg
        self.out_dir = output_dir(cfg, self.dir)
        if self.out_dir.is_symlink() or (self.out_dir.exists() and not is_ours(self.out_dir)):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"FL run {cfg.name!r}: {self.out_dir} was not "
                                f"made by p2pllm; it is not replaced (choose another --run-name)")
        # inside this daemon's roots (FORBIDDEN outside, NOT_FOUND unknown; a hub download,
        # with --allow-hub, in a thread); clients get the name and resolve it in their own
        found = await ModelRoots.of(self.host.config).aresolve(cfg.model)
        self.model_path = found.path
        self.model_name = found.name

    def job_params(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": c.model, "rounds": c.rounds, "run": c.name, "aggregation": c.aggregation,
            "lora_rank": c.lora_rank, "local_steps": c.local_steps, "lr": c.lr,
            "resume_from": self.state.done,
        }

    # -- the job ----------------------------------------------------------------------------

    async def execute(self, job: Job) -> Reply:
        self.job = job
        cfg = self.cfg
        # The initial adapter (a model load and a peft wrap) is built while clients load theirs.
        initial = None
        if not self.global_adapter:
            initial = asyncio.ensure_future(
                asyncio.to_thread(lora_mod.initial_adapter, self.model_path, cfg.lora, cfg.seed)
            )
        self.initial = initial
        try:
            if self.state.done < cfg.rounds:
                await self._wait_for_clients()
            if initial is not None and any(n.get("self") for n in eligible_nodes(self.cluster.nodes())):
                # This node is a client too: its fl-client would load the base model while the
                # adapter is built, two model builds at once in one process (transformers' lazy
                # imports and init_empty_weights are process-wide): build the adapter first.
                self.global_adapter = await initial
                self.initial = initial = None
            self.runner = JobRunner(job, self, what=f"FL run {cfg.name}")
            result: Reply = await self.runner.run()
            return result
        finally:
            if initial is not None and not initial.done():
                initial.cancel()

    # -- the JobRunner's pillar: plan the clients, run the rounds -----------------------------

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        """Clients: those holding the role first, then the other eligible nodes (most data
        first), up to `clients`; none once every round is done."""
        cfg = self.cfg
        if self.state.done >= cfg.rounds:
            return []
        found = eligible_nodes(nodes)
        up = [n for n in found if excluded.allows(str(n["node_id"]), ROLE)]
        held = {nid for nid, _ in self.runner.members} if self.runner is not None else set()
        ordered = [n for n in up if n["node_id"] in held] + [n for n in up if n["node_id"] not in held]
        chosen = ordered[:cfg.clients or len(ordered)]
        if self.selecting and len(chosen) < cfg.min_clients:
            refused = "; ".join(excluded.refused.values()) or "none"
            raise PlanError(
                f"need at least {cfg.min_clients} fl-clients, {len(chosen)} can take one "
                f"(nodes with data: {', '.join(str(n['name']) for n in found)}; refusals: {refused})",
                code=ErrorCode.REFUSED)
        slots = []
        for n in chosen:
            # a client without the base model fetches it whole from the nodes that list it
            fetch = client_fetch(nodes, n, self.model_name, self.model_path)
            params = self._client_params(fetch.sources if fetch is not None else ())
            summary = f"fl-client of {cfg.name}" + (f" ({fetch.text()})" if fetch else "")
            slots.append(Slot(ROLE, ROLE, str(n["node_id"]), params, summary=summary,
                              label=f"fl-client {n['name']}"))
        return slots

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> Reply:
        cfg = self.cfg
        self.selecting = False
        self._sync_clients()
        if self.clients:
            log.info("FL run %s: clients %s", cfg.name, ", ".join(c.name for c in self._active()))
        if self.initial is not None:
            self.global_adapter = await self.initial
        self.adapter_bytes = lora_mod.adapter_nbytes(self.global_adapter)
        last = self.state.rounds[-1] if self.state.rounds else {}
        job.update(
            round=self.state.done, rounds=cfg.rounds, eval_loss=last.get("eval_loss"),
            train_loss=last.get("train_loss"), run=cfg.name, adapter_bytes=self.adapter_bytes,
        )
        if self.state.done < cfg.rounds:
            if self.state.initial_eval_loss is None:
                loss, _, _ = await self._evaluate(0)
                self.state.initial_eval_loss = loss
                job.update(initial_eval_loss=loss)
                await self.req.partial(
                    MsgType.FL_RUN,
                    {"round": 0, "initial_eval_loss": loss, "clients": [c.name for c in self._active()]},
                )
            for rnd in range(self.state.done + 1, cfg.rounds + 1):
                record = await self._round(rnd)
                await self.req.partial(MsgType.FL_RUN, {"round": rnd, "record": record})
        return Reply(MsgType.FL_RUN, await self._finish())

    # -- 2. clients -------------------------------------------------------------------------

    def _sync_clients(self) -> None:
        """Clients as the runner holds them: assigned, or no longer."""
        assert self.runner is not None
        held = {nid for nid, _ in self.runner.members}
        names = {str(n["node_id"]): str(n["name"]) for n in self.cluster.nodes()}
        for nid in held:
            c = self.clients.get(nid)
            if c is None:
                self.clients[nid] = Client(nid, names.get(nid, nid[:8]))
            else:
                c.assigned = True
        for nid, c in self.clients.items():
            if nid not in held:
                c.assigned = False

    def _active(self) -> list[Client]:
        return sorted((c for c in self.clients.values() if c.assigned), key=lambda c: c.node_id)

    def _client_params(self, sources: Sequence[str] = ()) -> dict[str, Any]:
        c = self.cfg
        return ClientParams(
            model=self.model_name,
            model_path=self.model_name,  # the name: a client never opens a path a peer sends
            lora=c.lora,
            block_size=c.block_size,
            eval_fraction=c.eval_fraction,
            seed=c.seed,
            quantize=c.quantize,
            sources=tuple(sources),
        ).to_meta()

    async def _wait_for_clients(self) -> None:
        """Wait (up to wait_clients) for enough nodes with data; check they can run the job."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.wait_clients
        while True:
            found = eligible_nodes(self.cluster.nodes())
            if len(found) >= max(cfg.min_clients, cfg.clients or 0) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        if not found:
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"no node with FL data that accepts {ROLE} (waited {cfg.wait_clients:g}s); "
                f"start clients with `p2pllmd --data-dir DIR` holding .txt or .jsonl files",
            )
        if len(found) < cfg.min_clients:
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"need at least {cfg.min_clients} clients with FL data, found {len(found)} "
                f"({', '.join(str(n['name']) for n in found)}) after waiting {cfg.wait_clients:g}s",
            )
        if cfg.quantize:
            devices = {str(n["name"]): (n.get("caps") or {}).get("device", "?") for n in found}
            if "cuda" not in devices.values():
                raise ProtocolError(
                    ErrorCode.REFUSED,
                    f"QLoRA ({cfg.quantize} base) needs CUDA clients with bitsandbytes, and every "
                    f"client with data runs without CUDA ({', '.join(f'{k}: {v}' for k, v in devices.items())}); "
                    f"run without --quantize on these hosts",
                )
    def _name(self, node_id: str) -> str:
        c = self.clients.get(node_id)
        return c.name if c else self.job.node_name(node_id)

    async def _refill(self) -> None:
        """Re-place the clients (the JobRunner keeps those that hold their role): clients that
        lost their role are dropped, so that they, or new eligible nodes, take it again. Nodes
        that refused stay out of this run."""
        assert self.runner is not None
        for c in self.clients.values():
            if not c.assigned:
                self.runner.drop(c.node_id, ROLE)
        try:
            await self.runner.place()
        except ProtocolError as exc:
            log.warning("FL run %s: could not refill the clients: %s", self.cfg.name, exc.message)
        self._sync_clients()

    # -- 3. one round -----------------------------------------------------------------------

    async def _round(self, rnd: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        bytes_sent = bytes_received = 0
        attempt = 0
        while True:
            attempt += 1
            await self._refill()
            outcomes = await self._train(rnd)
            bytes_sent += sum(o.bytes_sent for o in outcomes)
            bytes_received += sum(o.bytes_received for o in outcomes)
            accepted = [o for o in outcomes if o.status == "ok"]
            if len(accepted) >= cfg.min_clients:
                break
            detail = "; ".join(f"{o.client.name}: {o.status} ({o.reason})" for o in outcomes if o.status != "ok")
            if attempt > cfg.max_retries:
                raise ProtocolError(
                    ErrorCode.TIMEOUT,
                    f"round {rnd}: {len(accepted)} valid updates of {len(outcomes)} clients asked, "
                    f"need {cfg.min_clients}; gave up after {attempt} attempts ({detail or 'no clients'})",
                )
            log.warning(
                "FL run %s round %d attempt %d: %d valid updates, need %d; retrying (%s)",
                cfg.name, rnd, attempt, len(accepted), cfg.min_clients, detail,
            )
            self.job.update(round_retries=attempt)
            if not outcomes:
                await asyncio.sleep(min(cfg.round_timeout, 1.0))
        # Aggregate (pure math, off the loop: big adapters take a while).
        updates = [ClientUpdate(o.client.node_id, o.tensors or {}, o.num_examples, o.train_loss) for o in accepted]
        new_global, new_velocity = await asyncio.to_thread(
            server_update,
            self.global_adapter,
            updates,
            cfg.aggregation,
            server_lr=cfg.server_lr,
            momentum=cfg.server_momentum,
            velocity=self.velocity,
        )
        self.global_adapter, self.velocity = new_global, new_velocity
        eval_loss, eval_sent, eval_received = await self._evaluate(rnd, [o.client for o in accepted])
        bytes_sent += eval_sent
        bytes_received += eval_received
        dropped = [o for o in outcomes if o.status == "dropped"]
        rejected = [o for o in outcomes if o.status == "rejected"]
        self.state.rejected_total += len(rejected)
        record: dict[str, Any] = {
            "round": rnd,
            "clients_asked": len(outcomes),
            "clients_answered": len(accepted),
            "dropped": len(dropped),
            "rejected": len(rejected),
            "train_loss": _num(weighted_mean([o.train_loss for o in accepted], [o.num_examples for o in accepted])),
            "eval_loss": _num(eval_loss),
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "seconds": 0.0,
            "attempts": attempt,
            "num_examples": sum(o.num_examples for o in accepted),
            "dropped_clients": [o.client.name for o in dropped],
            "rejected_clients": [{"name": o.client.name, "reason": o.reason} for o in rejected],
            "clients": [o.record() for o in outcomes],
        }
        self.state.done = rnd
        self.state.rounds.append(record)
        record["seconds"] = round(time.monotonic() - t0, 3)
        await asyncio.to_thread(self._checkpoint)
        record["seconds"] = round(time.monotonic() - t0, 3)
        self.job.update(
            round=rnd, rounds=cfg.rounds, train_loss=record["train_loss"], eval_loss=record["eval_loss"],
            clients_asked=record["clients_asked"], clients_answered=record["clients_answered"],
            dropped=record["dropped"], rejected=record["rejected"], rejected_total=self.state.rejected_total,
            bytes_sent=bytes_sent, bytes_received=bytes_received, round_s=record["seconds"],
            client_losses={o.client.name: _num(o.train_loss) for o in accepted},
        )
        log.info(
            "FL run %s round %d/%d: %d/%d clients, train loss %s, eval loss %s, %.2fs",
            cfg.name, rnd, cfg.rounds, len(accepted), len(outcomes), record["train_loss"],
            record["eval_loss"], record["seconds"],
        )
        return record

    async def _train(self, rnd: int) -> list[Outcome]:
        """FL_TRAIN to every active client at once; each answer, drop or rejection."""
        cfg = self.cfg
        round_cfg = RoundConfig(
            round=rnd, local_steps=cfg.local_steps, lr=cfg.lr, batch_size=cfg.batch_size,
            seed=cfg.seed, local_epochs=cfg.local_epochs,
        )
        meta, bufs = tensor_meta(self.global_adapter, {"job": self.job.id, "rid": ROLE, **round_cfg.to_meta()})
        outcomes = list(await asyncio.gather(*(self._ask_train(c, meta, bufs) for c in self._active())))
        # Byte counts are the connections' (0 to a client on this node). A client whose answer
        # never came was still sent the frame, byte for byte the one the others got: it counts
        # what their links measured (nothing when its link was already gone).
        sent = max((o.bytes_sent for o in outcomes), default=0)
        for o in outcomes:
            if o.sent and not o.bytes_sent and o.client.node_id != self.cluster.node_id:
                o.bytes_sent = sent
        # Screen the answers against the global adapter (pure): bad ones are rejected.
        answered = [o for o in outcomes if o.status == "ok"]
        verdict = screen(
            self.global_adapter,
            [ClientUpdate(o.client.node_id, o.tensors or {}, o.num_examples, o.train_loss) for o in answered],
        )
        reasons = dict(verdict.rejected)
        for o in answered:
            if o.client.node_id in reasons:
                o.status, o.reason, o.tensors = "rejected", reasons[o.client.node_id], None
                log.warning("FL round %d: rejected the update of %s: %s", rnd, o.client.name, o.reason)
        return outcomes

    async def _ask_train(self, client: Client, meta: dict[str, Any], bufs: Sequence[Buffer]) -> Outcome:
        t0 = time.monotonic()
        out = Outcome(client, "dropped", sent=True)
        try:
            frame = await self.cluster.request(
                client.node_id, MsgType.FL_TRAIN, meta, bufs, timeout=self.cfg.round_timeout
            )
        except TimeoutError:
            out.reason = f"no answer within the round timeout ({self.cfg.round_timeout:g}s)"
        except ConnectionClosed as exc:
            client.assigned = False
            out.sent = False
            out.reason = f"connection lost: {exc}"
        except RemoteError as exc:
            if exc.code in (ErrorCode.UNKNOWN_JOB, ErrorCode.SHUTTING_DOWN):
                client.assigned = False
            out.reason = f"answered an error: {exc}"
        else:
            out.bytes_sent, out.bytes_received = frame.sent_bytes, frame.wire_bytes
            self._parse_train_answer(out, frame.meta, frame.payload)
        out.seconds = time.monotonic() - t0
        if out.status == "dropped":
            log.warning("FL: dropped %s from round %s: %s", client.name, meta.get("round"), out.reason)
        return out

    @staticmethod
    def _parse_train_answer(out: Outcome, meta: Mapping[str, Any], payload: memoryview) -> None:
        """An FL_TRAIN reply through FL_TRAIN_REPLY: a malformed one is rejected, with why."""
        try:
            v = FL_TRAIN_REPLY.parse(meta)
            FL_TRAIN_REPLY.check_tensors(meta, payload.nbytes)
            tensors = unpack_tensors(meta.get("tensors"), payload)
        except ProtocolError as exc:
            what = "bad tensors" if exc.code == ErrorCode.BAD_TENSOR else "bad reply"
            out.status, out.reason = "rejected", f"{what}: {exc.message}"
            return
        out.status = "ok"
        out.tensors = {k: t.clone() for k, t in tensors.items()}
        out.num_examples = v["num_examples"]
        for key in ("train_loss", "eval_loss"):
            setattr(out, key, math.nan if v[key] is None else v[key])

    async def _evaluate(self, rnd: int, clients: Sequence[Client] | None = None) -> tuple[float | None, int, int]:
        """FL_EVAL of the global adapter on the clients' eval blocks: (weighted loss, bytes out, in)."""
        targets = list(clients) if clients is not None else self._active()
        meta, bufs = tensor_meta(self.global_adapter, {"job": self.job.id, "rid": ROLE, "round": rnd})

        async def ask(c: Client) -> tuple[float, int, int, int]:
            try:
                f = await self.cluster.request(c.node_id, MsgType.FL_EVAL, meta, bufs, timeout=self.cfg.round_timeout)
            except (TimeoutError, ConnectionClosed, RemoteError) as exc:
                log.warning("FL: %s did not evaluate round %d: %s", c.name, rnd, exc)
                return math.nan, 0, 0, 0
            try:
                v = FL_EVAL_REPLY.parse(f.meta)
            except ProtocolError as exc:
                log.warning("FL: %s answered FL_EVAL badly: %s", c.name, exc.message)
                return math.nan, 0, f.sent_bytes, f.wire_bytes
            loss, n = v["eval_loss"], v["num_eval_examples"]
            if loss is None or n <= 0:
                log.warning("FL: %s answered FL_EVAL without a loss and a count", c.name)
                return math.nan, 0, f.sent_bytes, f.wire_bytes
            return float(loss), n, f.sent_bytes, f.wire_bytes

        results = await asyncio.gather(*(ask(c) for c in targets))
        loss = weighted_mean([r[0] for r in results], [r[1] for r in results])
        return loss, sum(r[2] for r in results), sum(r[3] for r in results)

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.ckpt_path,
            Checkpoint(
                round=self.state.done,
                config=self.cfg.to_meta(),
                rounds=self.state.rounds,
                global_adapter=self.global_adapter,
                velocity=self.velocity,
                initial_eval_loss=self.state.initial_eval_loss,
                extra={"model_path": str(self.model_path)},
            ),
        )

    # -- 4. the end -------------------------------------------------------------------------

    async def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        plot_path = self.out_dir / "eval_loss.png"
        plot_error: str | None = None

        def fill(tmp: Path) -> None:
            nonlocal plot_error
            lora_mod.save_peft_adapter(tmp, self.global_adapter, cfg.lora, str(self.model_path))
            plot_error = plot_eval_loss(
                tmp / plot_path.name, self.state.rounds, self.state.initial_eval_loss,
                f"{cfg.name}: federated LoRA on {self.model_name}",
            )
            (tmp / "fl_metrics.json").write_text(json.dumps(self._result(plot_error), indent=2))

        await asyncio.to_thread(write_dir, self.out_dir, fill, {"kind": "fl", "name": cfg.name, "job": self.job.id})
        if self.req.meta.get("send_files") is True:
            await send_files(self.req, MsgType.FL_RUN, self.out_dir)
        return self._result(plot_error)

    def _result(self, plot_error: str | None) -> dict[str, Any]:
        cfg = self.cfg
        plot_path = self.out_dir / "eval_loss.png"
        evals = [r["eval_loss"] for r in self.state.rounds if r.get("eval_loss") is not None]
        result: dict[str, Any] = {
            "rounds": self.state.rounds,
            "adapter_dir": str(self.out_dir),
            "plot": None if plot_error else str(plot_path),
            "job": self.job.id,
            "run_name": cfg.name,
            "model": str(self.model_path),
            "aggregation": cfg.aggregation,
            "initial_eval_loss": _num(self.state.initial_eval_loss),
            "final_eval_loss": evals[-1] if evals else None,
            "resumed_from": self.state.resumed_from,
            "clients": [c.name for c in self._active()],
            "rejected_total": self.state.rejected_total,
            "adapter_bytes": self.adapter_bytes,
            "model_bytes": model_nbytes(self.model_path),
            "checkpoint": str(self.ckpt_path),
        }
        if plot_error:
            result["plot_error"] = plot_error
        return result
