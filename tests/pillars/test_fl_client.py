"""The fl-client role in process: refusals, FL_TRAIN/FL_EVAL answers, typed errors on bad input."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.config import DaemonConfig
from p2pllm.daemon.roles import Refused, RoleContext
from p2pllm.pillars.federated import lora as lora_mod
from p2pllm.pillars.federated.client import FLClientRole
from p2pllm.pillars.federated.lora import LoraSpec
from p2pllm.pillars.federated.messages import ClientParams
from p2pllm.wire.connection import Request
from p2pllm.wire.frame import Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors
from tests.conftest import real_model

torch.set_num_threads(1)

CAPS = {"device": "cpu", "fl_data": {"present": True}}


def make_role(tmp_path: Path, text: str | None = "Sam the cat sat on a mat. " * 60, **extra: Any) -> FLClientRole:
    model = real_model("tinystories-656k")
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (data / "d.txt").write_text(text)
    # the model by its name under the client's models dir (a client never opens a peer's path)
    cfg = DaemonConfig(data_dir=str(data), models_dir=str(model.parent))
    ctx = RoleContext("job1", "fl-client", "coord", "me", cfg, None, lambda m: None)  # type: ignore[arg-type]
    p = ClientParams(model.name, str(model), LoraSpec(), 32, 0.2, 0).to_meta()
    return FLClientRole(ctx, {**p, **extra})


def request(msg_type: MsgType, tensors: dict[str, torch.Tensor], **meta: Any) -> Request:
    m, bufs = tensor_meta(tensors, {"job": "job1", **meta})
    payload = memoryview(bytearray(b"".join(bytes(b) for b in bufs)))
    return Request(None, Frame(msg_type, 0, 1, m, payload))  # type: ignore[arg-type]


ROUND = {"round": 1, "local_steps": 3, "lr": 1e-3, "batch_size": 4, "seed": 0}


def test_refusals_are_cheap_and_clear(tmp_path: Path) -> None:
    assert "no --data-dir" in FLClientRole.refuse(DaemonConfig(), CAPS, {})  # type: ignore[operator]
    cfg = DaemonConfig(data_dir=str(tmp_path))
    assert "no .txt or .jsonl" in FLClientRole.refuse(cfg, {"fl_data": {"present": False}}, {})  # type: ignore[operator]
    reason = FLClientRole.refuse(cfg, CAPS, {"quantize": "4bit"})
    assert reason is not None and "QLoRA" in reason and "cpu" in reason
    assert FLClientRole.refuse(cfg, CAPS, {}) is None


async def test_start_refuses_without_usable_data_or_model(tmp_path: Path) -> None:
    with pytest.raises(Refused, match=r"no \.txt or \.jsonl"):
        await make_role(tmp_path / "a", text=None).start()
    with pytest.raises(Refused, match="need at least 2"):
        await make_role(tmp_path / "b", text="tiny").start()
    with pytest.raises(Refused, match="is not on this host"):
        await make_role(tmp_path / "c", model="nope", model_path="/nonexistent/nope").start()


async def test_train_and_eval_answer_with_adapter_tensors_and_numbers_only(tmp_path: Path) -> None:
    role = make_role(tmp_path)
    await role.start()
    try:
        glob = lora_mod.initial_adapter(real_model("tinystories-656k"), LoraSpec(), seed=0)
        reply = await role.on_train(request(MsgType.FL_TRAIN, glob, **ROUND))
        assert reply.msg_type == MsgType.FL_TRAIN
        assert set(reply.meta) == {"round", "num_examples", "train_loss", "eval_loss", "steps", "seconds", "tensors"}
        assert reply.meta["num_examples"] == role.trainer.num_examples  # type: ignore[union-attr]
        payload = memoryview(bytearray(b"".join(bytes(b) for b in reply.payload)))
        got = unpack_tensors(reply.meta["tensors"], payload)
        assert got.keys() == glob.keys() and payload.nbytes == lora_mod.adapter_nbytes(glob)
        assert role.metrics()["rounds"] == 1 and "examples" in role.summary()
        ev = await role.on_eval(request(MsgType.FL_EVAL, got, round=1))
        assert ev.meta["eval_loss"] == pytest.approx(reply.meta["eval_loss"])
        assert ev.meta["num_eval_examples"] == role.trainer.data.eval.shape[0]  # type: ignore[union-attr]
    finally:
        await role.stop()


async def test_bad_input_gets_typed_errors(tmp_path: Path) -> None:
    role = make_role(tmp_path)
    await role.start()
    glob = lora_mod.initial_adapter(real_model("tinystories-656k"), LoraSpec(), seed=0)
    cases = [
        (request(MsgType.FL_TRAIN, {k: torch.zeros(3, 3) for k in glob}, **ROUND), ErrorCode.BAD_TENSOR, "expected"),
        (request(MsgType.FL_TRAIN, {**glob, "extra.weight": torch.zeros(1)}, **ROUND), ErrorCode.BAD_TENSOR, "unexpected"),
        (request(MsgType.FL_TRAIN, {k: torch.full_like(v, math.nan) for k, v in glob.items()}, **ROUND),
         ErrorCode.BAD_TENSOR, "NaN"),
        (request(MsgType.FL_TRAIN, glob, **{**ROUND, "lr": "fast"}), ErrorCode.BAD_REQUEST, "lr"),
        (request(MsgType.FL_TRAIN, glob, **{**ROUND, "round": -1}), ErrorCode.BAD_REQUEST, "round"),
    ]
    truncated = request(MsgType.FL_EVAL, glob)
    truncated.frame.payload = truncated.frame.payload[:-4]
    cases.append((truncated, ErrorCode.BAD_TENSOR, "payload"))
    for req, code, words in cases:
        handler = role.on_train if req.frame.msg_type == MsgType.FL_TRAIN else role.on_eval
        with pytest.raises(ProtocolError) as info:
            await handler(req)
        assert info.value.code == code and words in info.value.message, info.value.message
    await role.stop()
    with pytest.raises(ProtocolError) as info:
        await role.on_eval(request(MsgType.FL_EVAL, glob))
    assert info.value.code == ErrorCode.SHUTTING_DOWN


async def test_a_cancelled_round_stops_its_thread(tmp_path: Path) -> None:
    role = make_role(tmp_path)
    await role.start()
    try:
        glob = lora_mod.initial_adapter(real_model("tinystories-656k"), LoraSpec(), seed=0)
        long_round = {**ROUND, "local_steps": 1_000_000}
        task = asyncio.create_task(role.on_train(request(MsgType.FL_TRAIN, glob, **long_round)))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The worker saw the cancel: the next round gets the model within seconds, not hours.
        reply = await asyncio.wait_for(role.on_train(request(MsgType.FL_TRAIN, glob, **ROUND)), 30)
        assert reply.meta["steps"] == 3
    finally:
        await role.stop()
