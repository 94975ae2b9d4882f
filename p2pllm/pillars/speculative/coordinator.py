"""GENERATE mode "spec": the local daemon plans, assigns and runs one speculative generation.

1. tokenize the prompt with the tokenizer of the target (or the draft: they share it) found on
   this host;
2. plan the verifier and the drafter (:mod:`.placement`: the best of each ranking, one node
   may take both) and let the :class:`~p2pllm.daemon.runner.JobRunner` assign them: a
   refusal excludes that node for that role and the runner re-plans (its one policy);
3. ask the drafter to run the session (SPEC_DRAFT_RUN, streamed) against the verifier;
   forward each partial to the CLI as ``{"token_ids", "text"}``;
4. answer with the result: the engine's ``generate --json`` fields plus the speculative ones.

Every assigned role is released when the job ends, however it ends. A member lost mid-way
(the verifier's or the drafter's node dies) fails the job with an error naming it; there is no
replay (a new GENERATE starts afresh).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pllm.daemon.cluster import advertised_disk_bytes, fetch_estimate, model_disk_bytes
from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.daemon.runner import Exclusions, JobRunner, MemberLost, Slot
from p2pllm.engine.errors import ModelError
from p2pllm.engine.generate import JSON_FIELDS, TextStream, continuation_text
from p2pllm.engine.loader import load_tokenizer
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.messages import (
    DraftRun,
    error_code,
    parse_generate,
)
from p2pllm.pillars.speculative.models import model_bytes
from p2pllm.pillars.speculative.placement import Candidate, rank_drafters, rank_verifiers
from p2pllm.plan.partition import PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

__all__ = ["GenerateSpec", "coordinate"]

log = logging.getLogger(__name__)

def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


@dataclass(frozen=True)
class GenerateSpec:
    """A GENERATE request in mode "spec", validated."""

    prompt: str
    prompt_ids: tuple[int, ...] | None
    model: str
    draft_model: str
    window: int | None  # None = "auto"
    max_tokens: int
    params: SamplingParams
    seed: int | None
    dtype: str = "float32"
    draft_dtype: str = "float32"
    quant: str = "none"  # weight-only quantized linears of the target (engine/quant.py)
    draft_quant: str = "none"
    verifier: str | None = None
    drafter: str | None = None
    q_top_k: int = 256
    q_mass: float = 0.999
    overlap: bool | None = None  # None: the drafter decides (8.4)
    min_window: int = 1
    max_window: int = 16
    session_timeout: float = 120.0
    ignore_eos: bool = False  # no end id stops the reply (generate --ignore-eos)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> GenerateSpec:
        """The GENERATE_SPEC body (messages.py), checked; BAD_REQUEST naming the field."""
        return cls(**parse_generate(meta))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str) -> Any:
    return load_tokenizer(path)


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return (eos,) if isinstance(eos, int) else ()


async def coordinate(host: JobHost, req: Request) -> Reply:
    spec = GenerateSpec.from_meta(req.meta)
    roots = ModelRoots.of(host.config)
    roots.check_adapter(req.meta, "spec")
    # names cross the wire: each member resolves the name in its own roots (daemon/modelrefs)
    target = await roots.alocal(spec.model)
    draft = await roots.alocal(spec.draft_model)
    names = (target.name if target else spec.model, draft.name if draft else spec.draft_model)
    target_path = target.path if target else None
    draft_path = draft.path if draft else None

    # 1. the prompt's token ids, with the tokenizer found on this host
    tokenizer = None
    for path in (target_path, draft_path):
        if path is not None:
            try:
                tokenizer = await asyncio.to_thread(_tokenizer, str(path))
                break
            except ModelError as exc:
                log.debug("no tokenizer in %s: %s", path, exc)
    if spec.prompt_ids is not None:
        prompt_ids = list(spec.prompt_ids)
    elif tokenizer is None:
        raise _bad(f"this daemon needs the tokenizer to encode the prompt: neither {spec.model} "
                   f"nor {spec.draft_model} is on this host (use --models-dir)")
    else:
        prompt_ids = list(tokenizer(spec.prompt)["input_ids"])
        if not prompt_ids:
            raise _bad("the prompt encodes to no tokens")

    # 2. placement, assignment and the session, on the JobRunner
    seed = spec.seed if spec.seed is not None else random.SystemRandom().randrange(2**63)
    job_params = {"model": spec.model, "draft_model": spec.draft_model,
                  "draft_tokens": "auto" if spec.window is None else spec.window,
                  "max_tokens": spec.max_tokens, "temperature": spec.params.temperature,
                  "seed": seed}
    async with host.job("spec", job_params) as job:
        pillar = SpecPillar(host, req, spec, target_path, draft_path, prompt_ids, seed,
                            tokenizer, names)
        result: dict[str, Any] = await JobRunner(job, pillar, what="speculative").run()
    return Reply(MsgType.GENERATE, result)


class SpecPillar:
    """The JobRunner's view of one speculative generation: plan the pair, run the session."""

    def __init__(self, host: JobHost, req: Request, spec: GenerateSpec, target_path: Path | None,
                 draft_path: Path | None, prompt_ids: list[int], seed: int,
                 tokenizer: Any, names: tuple[str, str] | None = None) -> None:
        self.host, self.req, self.spec = host, req, spec
        # what the members are sent: the names (each resolves them in its own roots); the
        # ranking uses the request's refs (a path: any node may share the root, MAYBE)
        self.target_name, self.draft_name = names or (spec.model, spec.draft_model)
        self.target_path, self.draft_path = target_path, draft_path
        self.prompt_ids, self.seed, self.tokenizer = prompt_ids, seed, tokenizer
        self.t_plan: float | None = None
        self.verifier: Candidate | None = None
        self.drafter: Candidate | None = None

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        spec, tp, dp = self.spec, self.target_path, self.draft_path
        if self.t_plan is None:
            self.t_plan = time.perf_counter()
        verifier = _best(rank_verifiers(
            nodes, spec.model, local_has=tp is not None,
            size_hint=model_bytes(tp, spec.dtype, spec.quant) if tp else None,
            pin=spec.verifier),
            excluded, "verifier", spec.model)
        drafter = _best(rank_drafters(
            nodes, spec.draft_model, verifier.node_id, local_has=dp is not None,
            size_hint=model_bytes(dp, spec.draft_dtype, spec.draft_quant) if dp else None,
            pin=spec.drafter), excluded, "drafter", spec.draft_model)
        self.verifier, self.drafter = verifier, drafter
        # a node that lacks its model fetches it whole from the nodes that list it
        vfetch = _fetch(nodes, verifier, self.target_name, tp)
        dfetch = _fetch(nodes, drafter, self.draft_name, dp)
        return [
            Slot("verifier", "verifier", verifier.node_id,
                 {"model": self.target_name, "dtype": spec.dtype,
                  "quant": spec.quant, "session_timeout": spec.session_timeout,
                  **({"sources": list(verifier.sources)} if verifier.sources else {})},
                 summary=f"verifier {self.target_name}" + (f" ({vfetch})" if vfetch else ""),
                 label=f"verifier {verifier.name}"),
            Slot("drafter", "drafter", drafter.node_id,
                 {"model": self.draft_name, "dtype": spec.draft_dtype,
                  "quant": spec.draft_quant,
                  **({"sources": list(drafter.sources)} if drafter.sources else {})},
                 summary=f"drafter {self.draft_name}" + (f" ({dfetch})" if dfetch else ""),
                 label=f"drafter {drafter.name}"),
        ]

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> dict[str, Any]:
        assert self.verifier is not None and self.drafter is not None
        spec, verifier, drafter = self.spec, self.verifier, self.drafter
        load_s = time.perf_counter() - (self.t_plan or time.perf_counter())
        run = DraftRun(
            prompt=tuple(self.prompt_ids), max_tokens=spec.max_tokens, params=spec.params,
            seed=self.seed, window=spec.window, verifier=verifier.node_id,
            stop=() if spec.ignore_eos else _stop_ids(self.tokenizer), q_top_k=spec.q_top_k,
            q_mass=spec.q_mass, overlap=spec.overlap, min_window=spec.min_window,
            max_window=spec.max_window, ignore_eos=spec.ignore_eos)
        result = await _run(self.host, job, self.req, drafter, verifier, run, self.tokenizer)
        result.update(verifier=verifier.name, drafter=drafter.name, seed=self.seed,
                      load_s=round(load_s, 6), job=job.id)
        return result


def _fetch(nodes: Sequence[Mapping[str, Any]], cand: Candidate, model: str,
           local: Path | None) -> str:
    """``fetch 270.0 MB ~2.7 s`` for a candidate that fetches ``model`` whole ('' if none):
    its size on disk here (``local``), else as its first source advertises it."""
    if not cand.sources:
        return ""
    nbytes = model_disk_bytes(local) if local is not None else (
        advertised_disk_bytes(nodes, model, cand.sources) or 0)
    return fetch_estimate(nodes, cand.node_id, cand.sources, nbytes).text()


def _best(ranked: list[Candidate], excluded: Exclusions, role: str, model: str) -> Candidate:
    """The best-ranked candidate the runner has not excluded for ``role``."""
    for cand in ranked:
        if excluded.allows(cand.node_id, role):
            return cand
    raise PlanError(f"no node can take the {role} role for {model}: "
                    + "; ".join(excluded.reason(c.node_id, role) or c.name for c in ranked),
                    code=ErrorCode.REFUSED)


async def _run(host: JobHost, job: Job, req: Request, drafter: Candidate, verifier: Candidate,
               run: DraftRun, tokenizer: Any) -> dict[str, Any]:
    """Stream the drafter's session to the CLI; the result fields."""
    prompt = list(run.prompt)
    stream = TextStream(tokenizer, prompt) if tokenizer is not None else None
    tokens: list[int] = []
    final: dict[str, Any] = {}
    t0 = time.perf_counter()
    t_first = 0.0
    try:
        async for frame in host.cluster.stream(drafter.node_id, MsgType.SPEC_DRAFT_RUN,
                                               run.to_meta(job.id)):
            if not frame.is_partial:
                final = dict(frame.meta)
                break
            new = [int(t) for t in frame.meta.get("token_ids", [])]
            if not tokens and new:
                t_first = time.perf_counter() - t0
            tokens.extend(new)
            text = "".join(stream.push(t) for t in new) if stream is not None else ""
            await req.partial(MsgType.GENERATE, {"token_ids": new, "text": text})
            rounds, drafted = frame.meta.get("rounds", 0), frame.meta.get("drafted", 0)
            accepted = frame.meta.get("accepted", 0)
            job.update(tokens=len(tokens), rounds=rounds,
                       acceptance_rate=round(accepted / drafted, 4) if drafted else 0.0)
    except RemoteError as exc:
        code = error_code(exc.code)
        message = f"speculative generation failed on {drafter.name}: {exc.message}"
        if code == ErrorCode.PEER_DOWN:  # the drafter lost its verifier
            raise MemberLost("verifier", message, node_id=verifier.node_id) from exc
        raise ProtocolError(code, message) from exc
    except ConnectionClosed as exc:
        raise MemberLost("drafter", f"lost the drafter {drafter.name}: {exc}",
                         node_id=drafter.node_id) from exc
    seconds = time.perf_counter() - t0
    metrics = final.get("metrics", {}) if isinstance(final.get("metrics"), dict) else {}
    all_ids = [int(t) for t in final.get("token_ids", tokens)]
    text = continuation_text(tokenizer, prompt, all_ids) if tokenizer is not None else ""
    decode = seconds - t_first
    out: dict[str, Any] = {
        "text": text,
        "prompt_tokens": len(prompt),
        "generated_tokens": len(all_ids),
        "token_ids": all_ids,
        "seconds": seconds,
        "tokens_per_s": (len(all_ids) - 1) / decode if len(all_ids) > 1 and decode > 0 else 0.0,
        "time_to_first_token_s": t_first,
        "mode": "spec",
    }
    assert set(JSON_FIELDS) <= set(out)
    for key in ("acceptance_rate", "drafted", "accepted", "rounds", "draft_tokens"):
        out[key] = metrics.get(key)
    skip = {"generated_tokens", "tokens_per_s", "seconds"}
    out.update({k: v for k, v in metrics.items() if k not in out and k not in skip})
    job.update(tokens=len(all_ids), rounds=out["rounds"], acceptance_rate=out["acceptance_rate"],
               tokens_per_s=round(out["tokens_per_s"], 2),
               **{k: out[k] for k in ("drafted", "accepted", "alpha", "mean_tokens_per_round",
                                      "draft_s", "verify_s", "network_s", "bytes_out", "bytes_in",
                                      "stop_reason") if k in out})
    return out
