"""Split-training bodies: the train-stage ASSIGN params and TRAIN_RUN, round trips and typed
errors; the step bodies' fields (TRAIN_STEP, TRAIN_FORWARD)."""

from __future__ import annotations

from typing import Any

import pytest

from p2pllm.pillars.splittrain.compute import OptimConfig, lora_spec
from p2pllm.pillars.splittrain.messages import (
    TRAIN_FORWARD,
    TRAIN_STEP,
    Neighbour,
    RunSpec,
    StageParams,
)
from p2pllm.wire.frame import ProtocolError, decode_frame, encode_frame
from p2pllm.wire.messages import ErrorCode, MsgType


def through_wire(meta: dict[str, Any]) -> dict[str, Any]:
    raw = bytearray(b"".join(bytes(b) for b in encode_frame(MsgType.ASSIGN, meta, (), request_id=1)))
    return decode_frame(raw).meta


def refused(fn: Any, *words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        fn()
    assert err.value.code == ErrorCode.BAD_REQUEST
    for w in words:
        assert w in err.value.message, (w, err.value.message)


def stage(**kw: Any) -> StageParams:
    base: dict[str, Any] = dict(
        model="tiny", start=0, end=2, index=0, num_stages=2, steps=5, seq_len=16, batch_size=4,
        micro_batches=2, schedule="gpipe", data="/data/x.txt",
        optim=OptimConfig(lr=2e-3, betas=(0.9, 0.95), grad_clip=1.0, warmup_steps=2,
                          decay="cosine", min_lr=1e-4),
        next=Neighbour("n2", "stage1", "beta"), tied_peer=Neighbour("n2", "stage1", "beta"),
        lora=lora_spec(r=4, alpha=8, targets=("q_proj", "down_proj")), seed=3, shuffle=False,
        init="random")
    base.update(kw)
    return StageParams(**base)


def test_stage_params_round_trip() -> None:
    first = stage()
    meta = through_wire(first.to_meta(memory_bytes=1000))
    assert meta["memory_bytes"] == 1000 and meta["layers"] == [0, 2]
    assert StageParams.from_meta(meta) == first
    last = stage(start=2, end=4, index=1, prev=Neighbour("n1", "stage0"), next=None, data=None,
                 lora=None)
    assert StageParams.from_meta(through_wire(last.to_meta())) == last


@pytest.mark.parametrize(("change", "words"), [
    ({"layers": [2]}, ("layers must be a list of 2..2 items",)),
    ({"layers": [2, 1]}, ("bad layer range",)),
    ({"schedule": "zb"}, ("schedule must be one of",)),
    ({"batch_size": 5}, ("not a multiple of micro_batches",)),
    ({"data": None}, ("needs the dataset path",)),
    ({"prev": {"node": "n0", "rid": "stage9"}}, ("exactly the first stage",)),
    ({"optim": {"lr": 1e-3, "momentum": 0.9}}, ("unknown keys ['momentum'] in optim",)),
    ({"optim": {"lr": 1e-3, "min_lr": 1.0}}, ("min_lr",)),
    ({"lora": {"r": 0}}, ("lora.r",)),
    ({"lora": {"targets": ["attn"]}}, ("lora.targets[0]",)),
    ({"shuffle": 0}, ("shuffle must be a boolean",)),
])
def test_bad_stage_params(change: dict[str, Any], words: tuple[str, ...]) -> None:
    meta = {**stage().to_meta(), **change}
    refused(lambda: StageParams.from_meta(meta), "ASSIGN train-stage: ", *words)


def test_run_spec_defaults_round_trip_and_errors() -> None:
    spec = RunSpec.from_meta({"model": "tiny", "data": "/d.txt"})
    assert (spec.steps, spec.micro_batches, spec.schedule, spec.lora) == (10, 2, "1f1b", None)
    full = RunSpec.from_meta({"model": "tiny", "data": "/d.txt", "steps": 3, "lora": True,
                              "lora_r": 2, "lora_targets": ["q_proj"], "nodes": ["a", "b", "a"],
                              "grad_clip": 1, "save": "/out", "save_every": 1, "lr": 1})
    assert full.lora is not None and full.lora.rank == 2 and full.optim.grad_clip == 1.0
    assert full.nodes == ("a", "b", "a")
    assert RunSpec.from_meta(through_wire(full.to_meta())) == full
    ok = {"model": "tiny", "data": "/d.txt"}
    refused(lambda: RunSpec.from_meta({**ok, "save_every": 2}), "save_every needs a save")
    refused(lambda: RunSpec.from_meta({**ok, "batch_size": 3}), "not a multiple")
    refused(lambda: RunSpec.from_meta({**ok, "nodes": "a,b"}), "TRAIN_RUN: nodes must be a list")
    refused(lambda: RunSpec.from_meta({**ok, "steps": 0}), "steps must be an integer ≥ 1")
    refused(lambda: RunSpec.from_meta({"data": "/d.txt"}), "model is required")


def test_step_bodies() -> None:
    assert TRAIN_STEP.parse({"step": 3, "lr": 1}) == {"job": None, "rid": None, "step": 3,
                                                       "lr": 1.0, "scale": 1.0}
    refused(lambda: TRAIN_STEP.parse({"step": 3, "lr": -1.0}), "TRAIN_STEP: lr")
    refused(lambda: TRAIN_FORWARD.parse({"step": 0, "mb": 0, "denom": 0}), "TRAIN_FORWARD: denom")
    refused(lambda: TRAIN_FORWARD.parse({"step": True, "mb": 0, "denom": 1}), "step")
