"""Replies from peers are peer input: the FL coordinator and the split-training step driver
read them through their bodies (FL_TRAIN reply, FL_EVAL reply, TRAIN_BATCH reply), and a
malformed one becomes the typed outcome each already handles (a rejected update, an ignored
evaluation, a failed stage) instead of a crash or a silently wrong number."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from p2pllm.pillars.federated.coordinator import Client, FLRun, Outcome
from p2pllm.pillars.messages import error_code
from p2pllm.pillars.splittrain.driver import StageFailed, _batch_reply
from p2pllm.pillars.splittrain.planner import Stage
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.tensors import tensor_meta

ADAPTER = {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}


def train_answer(tensors: dict[str, torch.Tensor], **meta: Any) -> Outcome:
    body, bufs = tensor_meta(tensors, {"round": 1, "num_examples": 5, **meta})
    payload = memoryview(bytearray(b"".join(bytes(b) for b in bufs)))
    out = Outcome(Client("n1", "a"), "dropped")
    FLRun._parse_train_answer(out, body, payload)
    return out


def test_a_good_fl_train_reply_is_taken_with_its_diverged_loss() -> None:
    out = train_answer(ADAPTER, train_loss=float("nan"), eval_loss=1.5)
    assert out.status == "ok" and out.num_examples == 5 and out.eval_loss == 1.5
    assert math.isnan(out.train_loss) and out.tensors is not None
    assert torch.equal(out.tensors["m.lora_A.weight"], ADAPTER["m.lora_A.weight"])
    assert math.isnan(train_answer(ADAPTER).eval_loss)  # absent: NaN, as before


@pytest.mark.parametrize(("tensors", "meta", "words"), [
    (ADAPTER, {"num_examples": "5"}, ("bad reply: FL_TRAIN reply: num_examples must be",)),
    (ADAPTER, {"num_examples": 0}, ("num_examples must be an integer ≥ 1",)),
    (ADAPTER, {"num_examples": None}, ("num_examples is required",)),
    (ADAPTER, {"train_loss": "low"}, ("train_loss must be a number",)),
    (ADAPTER, {"round": 0}, ("round must be",)),
    ({"w": torch.ones(2, dtype=torch.float64)}, {}, ("bad tensors: FL_TRAIN reply:", "float32")),
    ({"w": torch.ones(1, 1, 1)}, {}, ("bad tensors:", "1..2 dims")),
])
def test_a_malformed_fl_train_reply_is_rejected_with_why(tensors: dict[str, torch.Tensor],
                                                         meta: dict[str, Any],
                                                         words: tuple[str, ...]) -> None:
    out = train_answer(tensors, **meta)
    assert out.status == "rejected" and out.tensors is None
    assert all(w in out.reason for w in words), out.reason


def test_fl_eval_replies_that_do_not_parse_are_left_out_of_the_weighted_loss() -> None:
    answers = {
        "a": {"round": 1, "eval_loss": 2.0, "num_eval_examples": 4},
        "b": {"round": 1, "eval_loss": 8.0, "num_eval_examples": 12},
        "c": {"round": 1, "eval_loss": "0.1", "num_eval_examples": 10**6},  # not a number
        "d": {"round": 1, "eval_loss": 0.1, "num_eval_examples": True},  # not an int
        "e": {"round": 1, "num_eval_examples": 10**6},  # no loss
    }

    class Cluster:
        async def request(self, node: str, *args: Any, **kw: Any) -> Any:
            return SimpleNamespace(meta=answers[node], payload=memoryview(b""), sent_bytes=100,
                                   wire_bytes=50)  # the connection's byte counts

    run = object.__new__(FLRun)
    run.cfg = SimpleNamespace(round_timeout=5.0)  # type: ignore[assignment]
    run.global_adapter = dict(ADAPTER)
    run.job = SimpleNamespace(id="job-1")  # type: ignore[assignment]
    run.cluster = Cluster()
    loss, sent, received = asyncio.run(run._evaluate(1, [Client(n, n) for n in answers]))
    assert loss == pytest.approx((2.0 * 4 + 8.0 * 12) / 16)
    assert (sent, received) == (5 * 100, 5 * 50)  # every answer counts, used or not


STAGE = Stage(1, "node-b-0123", "b", 2, 4)
GOOD = {"step": 3, "grad_sq": 0.25, "forward_s": 0.5, "busy_s": 0.7, "window_s": 1.0,
        "bytes_forward": 10, "loss": 2.5}


def test_a_train_batch_reply_gives_the_driver_its_numbers_with_defaults() -> None:
    v = _batch_reply(STAGE, GOOD, 3)
    assert (v["grad_sq"], v["loss"], v["busy_s"], v["backward_s"], v["bytes_backward"]) == \
        (0.25, 2.5, 0.7, 0.0, 0)
    assert _batch_reply(STAGE, {"step": 3, "grad_sq": 1}, 3)["loss"] is None  # not the last


@pytest.mark.parametrize(("meta", "words"), [
    ({"grad_sq": None}, ("grad_sq is required",)),
    ({"grad_sq": float("nan")}, ("grad_sq must be a finite number ≥ 0",)),
    ({"loss": "2.5"}, ("loss must be a finite number",)),
    ({"busy_s": -1.0}, ("busy_s must be",)),
    ({"bytes_forward": 1.5}, ("bytes_forward must be an integer",)),
    ({"step": 2}, ("step 2, asked for step 3",)),
])
def test_a_malformed_train_batch_reply_fails_that_stage_typed(meta: dict[str, Any],
                                                              words: tuple[str, ...]) -> None:
    with pytest.raises(StageFailed) as err:
        _batch_reply(STAGE, {**GOOD, **meta}, 3)
    assert err.value.stage is STAGE and err.value.code == ErrorCode.BAD_REQUEST
    assert "bad TRAIN_BATCH answer" in err.value.message
    assert all(w in err.value.message for w in words), err.value.message
    assert "stage 1 (layers 2-4) on b" in str(err.value)


def test_error_code_is_the_one_mapping_of_a_peers_error_number() -> None:
    assert error_code(int(ErrorCode.REFUSED)) is ErrorCode.REFUSED
    assert error_code(9999) is ErrorCode.INTERNAL
