"""TRAIN_RUN: the coordinator of a split-training job, on the JobRunner.

The pillar plans (:mod:`.planner`), the runner assigns the train-stage roles and plans
around refusals (its one policy: the refusing node is excluded and the job re-planned, a
bounded number of times), and :class:`~.driver.StepDriver` runs the steps. A stage that dies
is a lost member: training state lives on the stages, so there is no replay; the job fails
with an error naming the stage (the last checkpoint, if any, stays intact).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.modelrefs import ModelRoots, is_path_ref
from p2pllm.daemon.runner import Exclusions, JobRunner, MemberLost, Slot
from p2pllm.pillars.paths import output_path
from p2pllm.pillars.splittrain.checkpoint import CHECKPOINTS
from p2pllm.pillars.splittrain.driver import StageFailed, StepDriver
from p2pllm.pillars.splittrain.messages import RunSpec
from p2pllm.pillars.splittrain.planner import ROLE, Stage, plan_stages_for, stage_cost, stage_params
from p2pllm.plan.layers import StageCost
from p2pllm.wire.connection import ConnectionClosed, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["TrainPillar", "coordinate"]

log = logging.getLogger(__name__)


class TrainPillar:
    """What the JobRunner runs for one TRAIN_RUN."""

    def __init__(self, spec: RunSpec, cost: StageCost, local_path: str | None,
                 req: Request, save_dir: Path | None = None, data: bytes | None = None,
                 model_dir: Path | None = None) -> None:
        self.spec = spec
        self.model_dir = model_dir  # this node's copy (prices fetches), None when it lacks it
        self.cost = cost
        self.local_path = local_path
        self.req = req
        self.save_dir = save_dir
        self.data = data
        self.stages: list[Stage] = []

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        self.stages = plan_stages_for(self.spec, nodes, self.cost, excluded, self.local_path,
                                      self.model_dir)
        data_bytes = len(self.data) if self.data is not None else None
        return [Slot(st.rid, ROLE, st.node_id,
                     stage_params(self.spec, self.stages, st, self.cost, data_bytes),
                     summary=st.summary(), label=st.describe())
                for st in self.stages]

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> Reply:
        driver = StepDriver(job, self.spec, self.stages, self.req, self.cost, self.save_dir,
                            self.data)
        try:
            return await driver.run()
        except ProtocolError as e:
            cause = e.__cause__
            if isinstance(cause, StageFailed) and isinstance(cause.__cause__, ConnectionClosed):
                raise MemberLost(cause.stage.rid, cause.message, node_id=cause.stage.node_id,
                                 code=ErrorCode.PEER_DOWN) from e
            raise


async def coordinate(host: JobHost, req: Request) -> Reply:
    """TRAIN_RUN: plan the stages, assign them, drive the steps, save, report.

    Nodes that lack the model files are left out of the plan; a node that refuses its stage is
    left out of a new plan (the JobRunner's policy). The dataset is a name (stage 0 resolves it
    in its --data-dir) or the request's payload (at most max_dataset_bytes, forwarded to stage
    0 in TRAIN_DATA); the checkpoint is a name under this daemon's state dir.
    """
    spec = RunSpec.from_meta(req.meta)
    data: bytes | None = None
    got = req.frame.payload.nbytes
    if spec.data_format is not None:
        cap = host.config.max_dataset_bytes
        if got > cap:
            raise ProtocolError(ErrorCode.OVER_LIMIT, f"TRAIN_RUN: a dataset of {got} bytes is "
                                f"over this daemon's max_dataset_bytes ({cap})")
        if got == 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "TRAIN_RUN: data_format is set but the payload is empty")
        data = bytes(req.frame.payload)
    elif got:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            "TRAIN_RUN: a payload (dataset content) needs data_format")
    save_dir = None
    if spec.save is not None:
        save_dir = output_path(host.config.state_dir, CHECKPOINTS, spec.save, "TRAIN_RUN save")
    # the model inside this daemon's roots (FORBIDDEN outside; a hub download, with
    # --allow-hub, in a thread); the stages get the name and resolve it in their own roots
    local = await ModelRoots.of(host.config).alocal(spec.model)
    # a path the user named: nodes that do not list the model may still share the root
    local_path = str(local.path) if local is not None and is_path_ref(spec.model) else None
    if local is not None:
        spec = dataclasses.replace(spec, model=local.name)  # same name = same model
    cost, _tied = stage_cost(spec, host.cluster.nodes(), local.path if local else None)
    async with host.job("splittrain", spec.job_params()) as job:
        pillar = TrainPillar(spec, cost, local_path, req, save_dir, data,
                             local.path if local is not None else None)
        result: Reply = await JobRunner(job, pillar, what="split training stopped").run()
        return result
