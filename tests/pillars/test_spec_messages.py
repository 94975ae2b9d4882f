"""SPEC_* message bodies: round trips through real frames, and typed errors for bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.acceptance import SparseDist
from p2pllm.pillars.speculative.messages import (
    MAX_WINDOW,
    DraftRun,
    OpenReply,
    OpenRequest,
    VerifyReply,
    VerifyWindow,
)
from p2pllm.wire.frame import Frame, ProtocolError, decode_frame, encode_frame
from p2pllm.wire.messages import ErrorCode, MsgType


def through_wire(meta: dict[str, Any], payload: Any = ()) -> Frame:
    raw = bytearray(b"".join(bytes(b) for b in encode_frame(MsgType.SPEC_VERIFY, meta, payload, request_id=7)))
    return decode_frame(raw)


def dist(ids: list[int], probs: list[float]) -> SparseDist:
    return SparseDist(ids=torch.tensor(ids), probs=torch.tensor(probs, dtype=torch.float16))


def test_open_round_trip() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1, seed=3)
    req = OpenRequest((1, 5, 9), 40, params, 3)
    meta, payload = req.to_meta("spec-1")
    frame = through_wire(meta, payload)
    assert frame.meta["job"] == "spec-1"
    assert OpenRequest.from_meta(frame.meta) == req
    reply = OpenReply(session=12, vocab_size=2048, eos=(2,), limit=43, prefill_s=0.01)
    assert OpenReply.from_meta(through_wire(reply.to_meta()).meta) == reply


def test_greedy_window_is_ids_only() -> None:
    w = VerifyWindow(session=5, start=9, tokens=(4, 8, 15))
    meta, payload = w.to_meta("spec-1")
    assert payload == () and "tensors" not in meta
    frame = through_wire(meta, payload)
    back = VerifyWindow.from_meta(frame.meta, frame.payload)
    assert (back.session, back.start, back.tokens, back.q) == (5, 9, (4, 8, 15), None)


def test_sampling_window_carries_sparse_q_bit_exact() -> None:
    q = (dist([4, 1, 7], [0.5, 0.3, 0.2]), dist([8], [1.0]))
    w = VerifyWindow(session=5, start=9, tokens=(4, 8), q=q)
    meta, payload = w.to_meta("spec-1")
    assert [t["name"] for t in meta["tensors"]] == ["q_len", "q_ids", "q_probs"]
    # 2 int32 lengths, 4 int32 ids, 4 float16 probs
    assert sum(memoryview(b).nbytes for b in payload) == 2 * 4 + 4 * 4 + 4 * 2
    frame = through_wire(meta, payload)
    back = VerifyWindow.from_meta(frame.meta, frame.payload)
    assert back.tokens == (4, 8) and back.q is not None and len(back.q) == 2
    for a, b in zip(q, back.q, strict=True):
        assert torch.equal(a.ids, b.ids)
        assert torch.equal(a.probs, b.probs) and b.probs.dtype == torch.float16
        assert torch.equal(a.normalized(), b.normalized())


def test_empty_window() -> None:
    for q in (None, ()):
        w = VerifyWindow(session=1, start=3, tokens=(), q=q)
        frame = through_wire(*w.to_meta("j"))
        assert VerifyWindow.from_meta(frame.meta, frame.payload).tokens == ()


def _bad_window(**changes: Any) -> tuple[dict[str, Any], Any]:
    q = (dist([4, 1], [0.5, 0.5]), dist([8, 2], [0.9, 0.1]))
    meta, payload = VerifyWindow(session=5, start=9, tokens=(4, 8), q=q).to_meta("j")
    meta = dict(meta)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return meta, payload


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"session": "x"}, ErrorCode.BAD_REQUEST),
        ({"session": None}, ErrorCode.BAD_REQUEST),
        ({"start": 0}, ErrorCode.BAD_REQUEST),
        ({"tokens": [4, -1]}, ErrorCode.BAD_REQUEST),
        ({"tokens": [4, True]}, ErrorCode.BAD_REQUEST),
        ({"tokens": "abc"}, ErrorCode.BAD_REQUEST),
        ({"tokens": list(range(MAX_WINDOW + 1))}, ErrorCode.BAD_REQUEST),
        ({"tokens": [4, 8, 9]}, ErrorCode.BAD_TENSOR),  # 3 tokens, 2 distributions
        ({"tensors": None}, ErrorCode.BAD_TENSOR),
    ],
)
def test_bad_windows_are_typed_errors(changes: dict[str, Any], code: ErrorCode) -> None:
    meta, payload = _bad_window(**changes)
    frame = through_wire(meta, payload)
    with pytest.raises(ProtocolError) as err:
        VerifyWindow.from_meta(frame.meta, frame.payload)
    assert err.value.code == code


def _raw_window(q_len: list[int], ids: list[int], probs: list[float],
                ids_dtype: torch.dtype = torch.int32) -> Frame:
    from p2pllm.wire.tensors import tensor_meta

    meta, payload = tensor_meta(
        {"q_len": torch.tensor(q_len, dtype=torch.int32), "q_ids": torch.tensor(ids, dtype=ids_dtype),
         "q_probs": torch.tensor(probs, dtype=torch.float16)},
        {"job": "j", "session": 1, "start": 3, "tokens": [4, 8], "q": True})
    return through_wire(meta, payload)


@pytest.mark.parametrize(
    ("q_len", "ids", "probs", "ids_dtype", "match"),
    [
        ([1, 2], [4, 8, 8], [1.0, 0.5, 0.5], torch.int32, "distinct"),
        ([1, 2], [4, 8, 2], [1.0, float("nan"), 0.5], torch.int32, "NaN"),
        ([1, 2], [4, 8, 2], [1.0, -0.5, 0.5], torch.int32, "non-negative"),
        ([1, 1], [4, 8, 2], [1.0, 0.5, 0.5], torch.int32, "sum"),
        ([0, 3], [4, 8, 2], [1.0, 0.5, 0.5], torch.int32, "q_len"),
        ([1, 2], [4, 8, 2], [1.0, 0.5, 0.5], torch.int64, "int32"),
        ([1, 2], [4, 8, 2], [0.0, 0.5, 0.5], torch.int32, "zero"),
    ],
)
def test_bad_sparse_q(q_len: list[int], ids: list[int], probs: list[float],
                      ids_dtype: torch.dtype, match: str) -> None:
    frame = _raw_window(q_len, ids, probs, ids_dtype)
    with pytest.raises(ProtocolError, match=match) as err:
        VerifyWindow.from_meta(frame.meta, frame.payload)
    assert err.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.BAD_TENSOR)


def test_greedy_window_with_stray_payload_is_refused() -> None:
    meta, _ = VerifyWindow(session=5, start=9, tokens=(4,)).to_meta("j")
    frame = through_wire(meta, [b"junk"])
    with pytest.raises(ProtocolError) as err:
        VerifyWindow.from_meta(frame.meta, frame.payload)
    assert err.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "params",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": 1.5}, {"bogus": 1}, "hot"],
)
def test_bad_sampling_params(params: Any) -> None:
    meta, _ = OpenRequest((1, 2), 4, SamplingParams(), 0).to_meta("j")
    meta["params"] = params
    with pytest.raises(ProtocolError) as err:
        OpenRequest.from_meta(meta)
    assert err.value.code == ErrorCode.BAD_REQUEST


def test_open_needs_a_prompt_and_a_seed() -> None:
    meta, _ = OpenRequest((1, 2), 4, SamplingParams(), 0).to_meta("j")
    for key, value in (("prompt", []), ("seed", -1), ("seed", 2**63), ("max_tokens", 0)):
        bad = {**meta, key: value}
        with pytest.raises(ProtocolError):
            OpenRequest.from_meta(bad)


def test_draft_run_round_trip() -> None:
    for window, overlap in ((None, None), (0, False), (5, True)):
        run = DraftRun(prompt=(1, 2, 3), max_tokens=9, params=SamplingParams(temperature=1.0, seed=4),
                       seed=4, window=window, verifier="abc", stop=(2,), q_top_k=8, q_mass=0.9,
                       overlap=overlap, min_window=2, max_window=6)
        meta = run.to_meta("spec-1")
        assert meta["window"] == ("auto" if window is None else window)
        assert meta["overlap"] == ("auto" if overlap is None else overlap)
        assert DraftRun.from_meta(through_wire(meta).meta) == run
    meta = DraftRun((1,), 4, SamplingParams(), 0, None, "abc").to_meta("j")
    for key, value in (("window", MAX_WINDOW + 1), ("window", "big"), ("q_mass", 0.0),
                       ("verifier", ""), ("min_window", 0), ("overlap", "yes")):
        with pytest.raises(ProtocolError):
            DraftRun.from_meta({**meta, key: value})


def test_verify_reply_round_trip_and_bounds() -> None:
    r = VerifyReply(accepted=3, next=17, seconds=0.01, forward_s=0.008, batch=2)
    assert VerifyReply.from_meta(through_wire(r.to_meta()).meta) == r
    with pytest.raises(ProtocolError):
        VerifyReply.from_meta({"n": MAX_WINDOW + 1, "next": 1})
    with pytest.raises(ProtocolError):
        VerifyReply.from_meta({"n": 1})


def test_a_quantized_copy_of_the_target_needs_no_draft_model() -> None:
    from p2pllm.pillars.speculative.messages import parse_generate

    base = {"mode": "spec", "model": "smol", "prompt": "hi"}
    assert parse_generate({**base, "draft_quant": "int4"})["draft_model"] == "smol"
    assert parse_generate({**base, "draft_dtype": "bfloat16"})["draft_model"] == "smol"
    assert parse_generate({**base, "draft_model": "d"})["draft_model"] == "d"
    with pytest.raises(ProtocolError, match="draft_model is required, unless draft_quant"):
        parse_generate(base)
