"""SHARD_* bodies and the shard's ASSIGN params: round trips through real frames, typed errors."""

from __future__ import annotations

from typing import Any

import pytest

from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.split.messages import (
    Hop,
    OpenSession,
    ShardParams,
    forward_meta,
    parse_close,
    parse_forward,
    parse_result,
    sampling_from_meta,
    sampling_to_meta,
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


def params(**kw: Any) -> ShardParams:
    base: dict[str, Any] = dict(model="tiny", start=0, end=2, num_layers=4, index=0, count=2,
                                dtype="bfloat16", wire_dtype="float16", next=Hop("n2", "shard1"))
    base.update(kw)
    return ShardParams(**base)


def test_shard_params_round_trip() -> None:
    for p in (params(), params(start=2, end=4, index=1, next=None, first=Hop("n1", "shard0"),
                               batch_decode=True, session_idle_s=5.0, stage_bytes=123,
                               hidden_size=64, vocab_size=100)):
        assert ShardParams.from_meta(through_wire(p.to_meta())) == p


@pytest.mark.parametrize(("change", "words"), [
    ({"start": 4}, ("ASSIGN shard: start", "[0, 3]")),
    ({"end": 5}, ("ASSIGN shard: end", "[1, 4]")),
    ({"end": 0}, ("end",)),
    ({"index": 2}, ("index", "[0, 1]")),
    ({"dtype": "int8"}, ("dtype must be one of",)),
    ({"next": None}, ("needs 'next'",)),
    ({"next": {"node": "n2"}}, ("next.rid is required",)),
    ({"max_sessions": 0}, ("max_sessions",)),
    ({"model": ""}, ("model",)),
    ({"batch_decode": "yes"}, ("batch_decode must be a boolean",)),
])
def test_bad_shard_params_name_the_field(change: dict[str, Any], words: tuple[str, ...]) -> None:
    meta = {**params().to_meta(), **change}
    refused(lambda: ShardParams.from_meta(meta), *words)


def test_the_last_shard_needs_first() -> None:
    meta = params(start=2, end=4, index=1, next=None, first=Hop("n1", "shard0")).to_meta()
    del meta["first"]
    refused(lambda: ShardParams.from_meta(meta), "the last shard needs 'first'")


def test_open_session_round_trip_on_the_last_and_other_shards() -> None:
    plain = OpenSession("0123456789abcdef", 40)
    assert OpenSession.from_meta(through_wire(plain.to_meta()), last=False) == plain
    tail = OpenSession("0123456789abcdef", 40, prompt_len=3, max_new=10, stop_ids=(2, 7),
                       sampling=SamplingParams(temperature=0.8, top_k=5, top_p=0.9,
                                               repetition_penalty=1.2, seed=11),
                       prompt_ids=(5, 6, 7))
    assert OpenSession.from_meta(through_wire(tail.to_meta()), last=True) == tail


@pytest.mark.parametrize(("change", "words"), [
    ({"prompt_len": None}, ("prompt_len is required on the last shard",)),
    ({"max_new": 39}, ("exceeds max_len",)),
    ({"prompt_ids": [1, 2]}, ("prompt_ids has 2 ids but prompt_len is 3",)),
    ({"prompt_ids": None}, ("prompt_ids is required with a repetition penalty",)),
    ({"session": "x" * 65}, ("session must be a string of 1..64",)),
    ({"stop_ids": [1, -1]}, ("stop_ids[1]",)),
    ({"sampling": {"top_p": 0}}, ("sampling.top_p",)),
    ({"sampling": {"temp": 1.0}}, ("unknown keys ['temp'] in sampling",)),
])
def test_bad_open_sessions(change: dict[str, Any], words: tuple[str, ...]) -> None:
    tail = OpenSession("s1", 40, prompt_len=3, max_new=10, sampling=SamplingParams(
        repetition_penalty=1.1), prompt_ids=(5, 6, 7))
    meta = {**tail.to_meta(), **change}
    refused(lambda: OpenSession.from_meta(meta, last=True), "SHARD_OPEN: ", *words)


def test_forward_close_and_sampling_helpers() -> None:
    meta = forward_meta("split-1", Hop("n", "shard1"), "s1", 5, True)
    assert meta == {"job": "split-1", "rid": "shard1", "session": "s1", "pos": 5, "sample": True}
    assert parse_forward(through_wire(meta)) == ("s1", 5, True)
    refused(lambda: parse_forward({**meta, "pos": -1}), "SHARD_FORWARD: pos")
    refused(lambda: parse_forward({**meta, "sample": 1}), "sample must be a boolean")
    assert parse_result(through_wire({"session": "s1", "token": 432, "step": 1})) == 432
    refused(lambda: parse_result({"session": "s1", "token": "a", "step": 1}), "SHARD_RESULT: token")
    refused(lambda: parse_result({"session": "s1", "step": 1}), "token is required")
    assert parse_close({"job": "j", "session": "s1"}) == "s1"
    refused(lambda: parse_close({"job": "j"}), "SHARD_CLOSE: session is required")
    assert sampling_from_meta(None) == SamplingParams()
    p = SamplingParams(temperature=0.5, top_k=3, seed=9)
    assert sampling_from_meta(through_wire(sampling_to_meta(p))) == p
