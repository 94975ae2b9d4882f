"""Coordinator of tensor-parallel generation: GENERATE mode "tp" (issue 15, protocol.md 14).

The daemon that receives GENERATE reads the model's config and tokenizer from its own roots,
checks that ``tp`` ranks can split it (:func:`~p2pllm.engine.tp.check_tp`: a clear error
naming the possible N before anything starts), then runs one job on the shared
:class:`~p2pllm.daemon.runner.JobRunner`:

- it hosts a TCPStore for the job on a port the OS picks (port 0 -> the bound port), and
  draws a random token; both go in every rank's ASSIGN with the rank and world size. The
  ranks use the store only under the prefix ``job/token``;
- the plan: ``tp`` nodes that have the model (this node first, as rank 0, so the sampled
  tokens reach the client in-process; then peers by name); each ASSIGN loads the rank's slice
  and joins the group (the runner assigns them all at once);
- the run: TP_RUN to every rank (a collective); rank 0's TP_TOKEN partials are the client's
  GENERATE partials. A rank whose stream ends without an answer (its daemon died: the
  connection closed or the keepalive timed out) is a lost member: the job fails naming it
  (the runner's message), after the survivors' collectives failed or timed out.

The store and the group live as long as the job: the store is closed when the job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from p2pllm.daemon.cluster import FETCH, model_tier, takes_role
from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.modelrefs import ModelRoots, is_path_ref
from p2pllm.daemon.runner import Exclusions, JobRunner, MemberLost, Slot
from p2pllm.engine.generate import TextStream, continuation_text
from p2pllm.pillars.messages import error_code, sampling_to_meta
from p2pllm.pillars.split.pipeline import registry_for
from p2pllm.pillars.tp.messages import TP_TOKEN, parse_generate
from p2pllm.pillars.tp.roles import route_to
from p2pllm.plan.partition import PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

log = logging.getLogger(__name__)

__all__ = ["TPPillar", "coordinate"]

MAX_CONTEXT = 8192
GRACE_S = 1.0  # after one rank fails, how long the others' streams may take to end


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]") or "127.0.0.1"


class TPPillar:
    """Plans ``world`` tp-rank slots and runs one generation over them."""

    def __init__(self, host: JobHost, r: Mapping[str, Any], model_ref: str, store_port: int,
                 token: str, prompt_ids: Sequence[int], budget: int, stops: Sequence[int],
                 on_token: Any) -> None:
        self.host = host
        self.r = r
        self.model_ref = model_ref
        self.world = int(r["tp"])
        self.store_port = store_port
        self.token = token
        self.prompt_ids = list(prompt_ids)
        self.budget = budget
        self.stops = list(stops)
        self.on_token = on_token
        self.ranks: list[dict[str, Any]] = []
        cfg = host.config
        self.op_timeout = max(float(cfg.keepalive_timeout), 2.0)

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        cands, lacking = [], []
        for n in nodes:
            nid, name = str(n["node_id"]), str(n.get("name"))
            caps = n.get("caps") or {}
            if not excluded.allows(nid, "tp-rank") or not takes_role(caps, "tp-rank"):
                lacking.append(excluded.reason(nid, "tp-rank") or f"{name} does not take tp-rank")
                continue
            tier, _, _ = model_tier(nodes, n, self.model_ref)
            if n.get("self") or tier > FETCH or is_path_ref(self.model_ref):
                cands.append(n)
            else:
                lacking.append(f"{name} lacks model {self.model_ref!r}")
        cands.sort(key=lambda n: (not n.get("self"), str(n.get("name")), str(n["node_id"])))
        if len(cands) < self.world:
            raise PlanError(
                f"tensor parallelism over {self.world} ranks needs {self.world} nodes with "
                f"model {self.model_ref!r}; {len(cands)} have it"
                + (f" ({'; '.join(lacking)})" if lacking else ""))
        chosen = cands[:self.world]
        others = [_host(str(n.get("address") or "")) for n in chosen if not n.get("self")]
        slots = []
        for rank, n in enumerate(chosen):
            if n.get("self"):
                store_host = "127.0.0.1"
                gloo_host = route_to(others[0]) if others else "127.0.0.1"
            else:
                # this node's address as that peer reaches it
                store_host = route_to(_host(str(n.get("address") or "")))
                gloo_host = None
            params = {"model": self.model_ref, "rank": rank, "world": self.world,
                      "store_host": store_host, "store_port": self.store_port,
                      "token": self.token, "dtype": self.r["dtype"], "quant": self.r["quant"],
                      "op_timeout_s": self.op_timeout}
            if gloo_host is not None:
                params["gloo_host"] = gloo_host
            slots.append(Slot(f"rank{rank}", "tp-rank", str(n["node_id"]), params,
                              summary=f"tp rank {rank}/{self.world}",
                              label=f"tp rank {rank} of {self.world} on {n.get('name')}"))
        return slots

    def replay(self, lost: Any) -> bool:
        return False

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> dict[str, Any]:
        slots = sorted(members.values(), key=lambda s: int(s.params["rank"]))
        meta = {"job": job.id, "prompt_ids": self.prompt_ids, "max_tokens": self.budget,
                "stop_ids": self.stops, "sampling": sampling_to_meta(self.r["sampling"])}
        results: dict[int, dict[str, Any]] = {}

        async def one(slot: Slot) -> None:
            rank = int(slot.params["rank"])
            stream = job.cluster.stream(slot.node_id, MsgType.TP_RUN,
                                        {**meta, "rid": slot.rid}, idle_timeout=600)
            try:
                async for frame in stream:
                    if frame.is_partial:
                        v = TP_TOKEN.parse(frame.meta)
                        await self.on_token(int(v["token"]))
                    else:
                        results[rank] = frame.meta
            except (ConnectionClosed, TimeoutError) as exc:
                raise MemberLost(slot.rid, f"its daemon is gone ({exc})",
                                 node_id=slot.node_id) from exc

        tasks = [asyncio.create_task(one(s), name=f"tp-{s.rid}") for s in slots]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.done() and t.exception() is not None for t in tasks):
                # a rank failed: the others' collectives fail too (or time out); give their
                # streams a moment to end, so that a dead daemon is named rather than a
                # survivor's failed all_reduce
                await asyncio.wait(tasks, timeout=self.op_timeout + GRACE_S)
                errors = [t.exception() for t in tasks if t.done() and not t.cancelled()
                          and t.exception() is not None]
                lost = [e for e in errors if isinstance(e, MemberLost)]
                if lost:
                    raise lost[0]
                for t in tasks:
                    if not t.done():
                        lost_slot = slots[tasks.index(t)]
                        raise MemberLost(lost_slot.rid, "no answer after the others failed",
                                         node_id=lost_slot.node_id, code=ErrorCode.TIMEOUT)
                exc = errors[0]
                assert exc is not None
                if isinstance(exc, RemoteError):
                    raise ProtocolError(error_code(exc.code), f"tp: {exc.message}") from exc
                raise exc
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
        return results[0] | {"ranks": [results[k] for k in sorted(results)]}


def _store(timeout_s: float) -> Any:
    import torch.distributed as dist

    # a port of the job's own (0: the OS picks), on every interface: remote ranks reach it
    return dist.TCPStore("0.0.0.0", 0, None, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


async def coordinate(host: JobHost, req: Request) -> Reply:
    """GENERATE mode "tp": stream tokens as partials, answer the result (section 14)."""
    from p2pllm.engine.tp import TPSizeError, check_tp

    r = parse_generate(req.meta)
    ModelRoots.of(host.config).check_adapter(req.meta, "tp")
    model = await registry_for(host).local_model(r["model"], need_tokenizer=r["prompt_ids"] is None)
    try:
        check_tp(model.config, r["tp"])
    except TPSizeError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{model.ref}: {exc}") from None
    if r["prompt_ids"] is not None:
        prompt_ids = list(r["prompt_ids"])
    else:
        assert model.tokenizer is not None
        prompt_ids = list(model.tokenizer(r["prompt"])["input_ids"])
    vocab = model.config.vocab_size
    if not prompt_ids or max(prompt_ids) >= vocab:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"prompt ids must be non-empty and below the vocabulary size {vocab}")
    limit = min(model.config.max_position_embeddings, MAX_CONTEXT)
    if len(prompt_ids) > limit:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the prompt has {len(prompt_ids)} tokens; "
                            f"the model takes at most {limit}")
    budget = min(r["max_tokens"], limit - len(prompt_ids) + 1)
    stops = () if r["ignore_eos"] else model.stop_ids()
    stream = TextStream(model.tokenizer, prompt_ids) if model.tokenizer is not None else None

    async def on_token(token: int) -> None:
        piece = stream.push(token) if stream is not None else ""
        await req.partial(MsgType.GENERATE, {"token_ids": [token], "text": piece})

    store = await asyncio.to_thread(_store, 120.0)
    token = secrets.token_hex(16)
    t0 = time.monotonic()
    try:
        pillar = TPPillar(host, r, model.ref, int(store.port), token, prompt_ids, budget,
                          stops, on_token)
        async with host.job("tp", {"model": model.ref, "tp": r["tp"], "dtype": r["dtype"],
                                   "quant": r["quant"]}) as job:
            runner = JobRunner(job, pillar, what=f"tp over {r['tp']} ranks")
            out = await runner.run()
            job.update(tp={"ranks": out["ranks"]})
    finally:
        del store  # the job's store closes with the job
    generated = list(out.get("token_ids") or [])
    stop_reason = str(out.get("stop_reason", "max_tokens"))
    if stop_reason == "max_tokens" and budget < r["max_tokens"]:
        stop_reason = "length"
    text = continuation_text(model.tokenizer, prompt_ids, generated) if model.tokenizer else ""
    n = max(len(generated), 1)
    return Reply(MsgType.GENERATE, {
        "text": text,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(generated),
        "token_ids": generated,
        "seconds": round(time.monotonic() - t0, 6),
        "tokens_per_s": out.get("tokens_per_s", 0.0),
        "time_to_first_token_s": out.get("time_to_first_token_s", 0.0),
        "mode": "tp",
        "tp": r["tp"],
        "stop_reason": stop_reason,
        "comm_s_per_token": round(float(out.get("comm_s", 0.0)) / n, 6),
        "allreduces_per_token": round(int(out.get("comm_calls", 0)) / n, 3),
        "ranks": out["ranks"],
    })
