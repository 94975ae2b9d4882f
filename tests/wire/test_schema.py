"""Message schemas (p2pllm/wire/schema.py): each field kind, the body rules, every message body
defined by the pillars (round trips through real frames, bad bodies), and protocol.md's tables
checked against the definitions."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The daemon's and the pillars' messages modules define (and register) every body.
import p2pllm.daemon.messages
import p2pllm.pillars.federated.messages
import p2pllm.pillars.messages
import p2pllm.pillars.speculative.messages
import p2pllm.pillars.split.messages
import p2pllm.pillars.splittrain.messages
import p2pllm.pillars.tp.messages  # noqa: F401
from p2pllm.wire.frame import ProtocolError, decode_frame, encode_frame
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.schema import (
    Body,
    Bool,
    Enum,
    Float,
    Int,
    List,
    Map,
    OneOf,
    Routing,
    Str,
    Tensor,
    definitions,
    fmt_number,
)

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol.md"
BODIES = definitions()


def bad(body: Body, meta: Any, *words: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> str:
    with pytest.raises(ProtocolError) as err:
        body.parse(meta)
    assert err.value.code == code
    assert err.value.message.startswith(f"{body.name}: ")
    for w in words:
        assert w in err.value.message, (w, err.value.message)
    return err.value.message


def body(*fields: Any, **kw: Any) -> Body:
    return Body("T", fields, register=False, **kw)


def through_wire(meta: dict[str, Any]) -> dict[str, Any]:
    raw = bytearray(b"".join(bytes(b) for b in encode_frame(MsgType.ACK, meta, (), request_id=3)))
    return decode_frame(raw).meta


# ---------------------------------------------------------------------------------------------
# Field kinds
# ---------------------------------------------------------------------------------------------


def test_int_bounds_and_types() -> None:
    b = body(Int("n", 1, 10))
    assert b.parse({"n": 1}) == {"n": 1} and b.parse({"n": 10}) == {"n": 10}
    for v in (0, 11, True, 1.0, "3", [1]):
        bad(b, {"n": v}, "n must be an integer 1..10", repr(v))
    assert body(Int("n", 0)).parse({"n": 2**64 - 1})["n"] == 2**64 - 1
    assert Int("n", 0, 2**63 - 1).type_name() == "int 0..2^63-1"
    assert Int("n", 1).type_name() == "int ≥ 1" and Int("n").type_name() == "int"


def test_float_takes_ints_and_refuses_non_finite() -> None:
    b = body(Float("x", 0.0, 1.0, lo_open=True))
    assert b.parse({"x": 1}) == {"x": 1.0} and isinstance(b.parse({"x": 1})["x"], float)
    for v in (0, 0.0, 1.5, float("nan"), float("inf"), True, "0.5"):
        bad(b, {"x": v}, "x must be a finite number in (0, 1]")
    assert Float("x", 0.0).type_name() == "float ≥ 0"
    assert Float("x", 0.0, lo_open=True).type_name() == "float > 0"
    assert Float("x", 0.0, 0.999).type_name() == "float 0..0.999"
    loss = body(Float("loss", finite=False))
    assert math.isnan(loss.parse({"loss": float("nan")})["loss"])
    assert loss.parse({"loss": float("inf")})["loss"] == float("inf")
    bad(loss, {"loss": "nan"}, "loss must be a number")
    assert loss.fields[0].type_name() == "float, NaN/Inf allowed"


def test_bool_str_enum() -> None:
    assert body(Bool("b")).parse({"b": False}) == {"b": False}
    bad(body(Bool("b")), {"b": 1}, "b must be a boolean")
    s = body(Str("s", 1, 4))
    assert s.parse({"s": "abcd"}) == {"s": "abcd"}
    for v in ("", "abcde", 5, b"ab"):
        bad(s, {"s": v}, "s must be a string of 1..4 characters")
    p = body(Str("s", pattern=r"[a-z]+"))
    assert p.parse({"s": "abc"}) == {"s": "abc"}
    bad(p, {"s": "ab/c"}, "matching [a-z]+")
    e = body(Enum("e", ("gpipe", "1f1b")))
    assert e.parse({"e": "1f1b"}) == {"e": "1f1b"}
    bad(e, {"e": "zero"}, "e must be one of \"gpipe\", \"1f1b\"")
    assert Enum("e", ("gpipe", "1f1b")).type_name() == '"gpipe" | "1f1b"'


def test_list_bounds_and_elements_name_the_item() -> None:
    b = body(List("ids", Int("", 0, 9), 1, 3))
    assert b.parse({"ids": [1, 2]}) == {"ids": (1, 2)}
    bad(b, {"ids": []}, "ids must be a list of 1..3 items")
    bad(b, {"ids": [1, 2, 3, 4]}, "ids must be a list")
    bad(b, {"ids": "12"}, "ids must be a list")
    bad(b, {"ids": [1, 10]}, "ids[1] must be an integer 0..9", "10")
    assert b.to_meta({"ids": (1, 2)}) == {"ids": [1, 2]}
    assert List("ids", Int("", 0, 9), 1, 3).type_name() == "[int 0..9] 1..3"
    assert List("ids", Str(""), max_len=8).type_name() == "[str ≤ 4096] ≤ 8"


def test_nested_map_validates_with_its_body_and_fills_its_defaults() -> None:
    inner = Body("inner", [Float("t", 0.0, default=0.0), Int("k", 0, default=0)],
                 extra="reject", register=False)
    b = body(Map("params", inner, default={}), Map("free", default=None),
             Map("hop", inner, default=None))
    assert b.parse({}) == {"params": {"t": 0.0, "k": 0}, "free": None, "hop": None}
    assert b.parse({"params": {"k": 3}, "free": {"a": [1]}}) == \
        {"params": {"t": 0.0, "k": 3}, "free": {"a": [1]}, "hop": None}
    bad(b, {"params": {"t": -1.0}}, "params.t must be a finite number ≥ 0")
    bad(b, {"params": {"bogus": 1}}, "unknown keys ['bogus'] in params")
    bad(b, {"params": "hot"}, "params must be a map (inner)")
    bad(b, {"free": [1]}, "free must be a map")
    assert Map("params", inner).type_name() == "{inner}"


def test_one_of_takes_the_first_option_that_fits() -> None:
    b = body(OneOf("window", (Int("", 0, 64), Enum("", ("auto",))), default="auto"))
    assert b.parse({}) == {"window": "auto"}
    assert b.parse({"window": 8}) == {"window": 8}
    for v in (65, "big", True):
        bad(b, {"window": v}, "window must be an integer 0..64 or one of \"auto\"")
    assert b.fields[0].type_name() == 'int 0..64 | "auto"'


# ---------------------------------------------------------------------------------------------
# Body rules
# ---------------------------------------------------------------------------------------------


def test_missing_required_names_the_field_and_what_it_takes() -> None:
    b = body(Str("model", 1), Int("n", 0, default=3))
    assert b.parse({"model": "m"}) == {"model": "m", "n": 3}
    bad(b, {}, "model is required", "model must be a string of 1..4096 characters")
    bad(b, {"model": None}, "model is required")  # nil is absent
    bad(b, [1, 2], "must be a map")


def test_nil_is_absent_and_to_meta_leaves_none_out_in_declaration_order() -> None:
    b = body(Int("a", 0, default=1), Str("b", default=None), Bool("c", default=False))
    assert b.parse({"a": None, "b": None}) == {"a": 1, "b": None, "c": False}
    assert list(b.to_meta({"c": True, "b": None, "a": 2})) == ["a", "c"]
    assert b.parse({"b": "x"}, partial=True) == {"b": "x"}


def test_unknown_keys_are_ignored_by_open_bodies_and_refused_by_closed_ones() -> None:
    open_ = body(Int("a", 0, default=0))
    assert open_.parse({"a": 1, "newer": "key"}) == {"a": 1}
    closed = body(Int("a", 0, default=0), extra="reject")
    msg = bad(closed, {"a": 1, "zz": 2, "typo": 3}, "unknown keys ['typo', 'zz']", "known: ['a']")
    assert "a must" not in msg
    # routing keys and the tensor list are never unknown
    assert closed.parse({"job": "j", "rid": "r", "tensors": []}) == {"a": 0}


def test_routing_keys_are_optional_and_checked_when_present() -> None:
    b = body(Routing("job", 1, 256))
    assert b.parse({}) == {"job": None}
    bad(b, {"job": 5}, "job must be a string")
    assert b.fields[0].default_text() == "routing"


def test_attr_renames_the_parsed_value() -> None:
    b = body(Int("n", 0, attr="accepted"))
    assert b.parse({"n": 2}) == {"accepted": 2}
    assert b.to_meta({"accepted": 2}) == {"n": 2}


def test_a_body_name_is_defined_once() -> None:
    with pytest.raises(ValueError, match="already defined"):
        Body("SPEC_OPEN", [])
    with pytest.raises(ValueError, match="twice"):
        Body("x", [Int("a"), Int("a")], register=False)


# ---------------------------------------------------------------------------------------------
# Tensor fields
# ---------------------------------------------------------------------------------------------


def desc(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def tbad(b: Body, meta: dict[str, Any], *words: str, **kw: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        b.check_tensors(meta, **kw)
    assert err.value.code == ErrorCode.BAD_TENSOR
    for w in words:
        assert w in err.value.message, (w, err.value.message)


def test_tensor_descriptors_dtypes_symbols_and_payload_length() -> None:
    b = body(tensors=[Tensor("q_len", ("int32",), ("γ",)), Tensor("q_ids", ("int32",), ("K",)),
                      Tensor("q_probs", ("float16", "float32"), ("K",))])
    good = {"tensors": [desc("q_len", "int32", [2]), desc("q_ids", "int32", [5]),
                        desc("q_probs", "float16", [5])]}
    assert b.check_tensors(good, 2 * 4 + 5 * 4 + 5 * 2, {"γ": 2}) == \
        {"q_len": ("int32", (2,)), "q_ids": ("int32", (5,)), "q_probs": ("float16", (5,))}
    tbad(b, good, "q_len", "(γ,) = (3,)", dims={"γ": 3})
    tbad(b, good, "describe 38 bytes, the payload has 40", payload_len=40)
    wrong = {"tensors": [*good["tensors"][:2], desc("q_probs", "float16", [4])]}
    tbad(b, wrong, "q_probs", "(K,) = (5,)", "got (4,)")
    tbad(b, {"tensors": [desc("q_len", "int64", [2])]}, "q_len", "must be int32", "int64")
    tbad(b, {"tensors": good["tensors"][:2]}, "must include q_probs")
    tbad(b, {"tensors": [*good["tensors"], desc("x", "int32", [1])]}, "'x'", "not expected")
    tbad(b, {"tensors": [*good["tensors"], good["tensors"][0]]}, "appears twice")
    tbad(b, {"tensors": "q"}, "must be a list")
    tbad(b, {"tensors": [desc("q_len", "int32", [-1])]}, "bad shape")
    tbad(b, {"tensors": [desc("q_len", "int32", [2, 2])]}, "must be shaped (γ,)")
    tbad(b, {}, "must include q_len, q_ids, q_probs", "came: none")


def test_wildcard_tensors_and_rank_bounds() -> None:
    b = body(tensors=[Tensor("*", ("float32",), min_rank=1, max_rank=2)])
    meta = {"tensors": [desc("a.lora_A.weight", "float32", [4, 8]),
                        desc("a.lora_B.weight", "float32", [8, 4])]}
    assert set(b.check_tensors(meta, 2 * 32 * 4)) == {"a.lora_A.weight", "a.lora_B.weight"}
    assert b.check_tensors({}) == {}
    tbad(b, {"tensors": [desc("x", "float32", [])]}, "1..2 dims")
    tbad(b, {"tensors": [desc("x", "float64", [2])]}, "must be float32")
    assert b.tensors[0].type_name() == "tensor float32 rank 1..2"
    with pytest.raises(ValueError, match="no such wire dtypes"):
        Tensor("x", ("complex64",))


# ---------------------------------------------------------------------------------------------
# Every message body the pillars define
# ---------------------------------------------------------------------------------------------


def test_the_pillars_define_their_bodies() -> None:
    for name in ("SPEC_OPEN", "SPEC_VERIFY", "SPEC_DRAFT_RUN", "SHARD_OPEN", "SHARD_FORWARD",
                 "ASSIGN shard", "FL_RUN", "FL_TRAIN", "ASSIGN fl-client", "TRAIN_FORWARD",
                 "TRAIN_STEP", "TRAIN_RUN", "ASSIGN train-stage", "sampling", "GENERATE spec",
                 "GENERATE split", "ASSIGN", "RELEASE", "JOB_STOP"):
        assert name in BODIES


def test_generate_bodies_check_across_fields_and_give_the_coordinators_their_values() -> None:
    from p2pllm.pillars.speculative.messages import parse_generate as spec
    from p2pllm.pillars.split.messages import GENERATE_SPLIT
    from p2pllm.pillars.split.messages import parse_generate as split

    v = spec({"mode": "spec", "model": "t", "draft_model": "d", "prompt": "hi", "seed": 7,
              "temperature": 0.5, "draft_tokens": 3, "overlap": "auto", "dtype": "bfloat16"})
    assert (v["window"], v["overlap"], v["draft_dtype"], v["seed"]) == (3, None, "bfloat16", 7)
    assert (v["params"].temperature, v["params"].seed) == (0.5, 7) and "temperature" not in v
    assert spec({"model": "t", "draft_model": "d", "prompt_ids": [1, 2]})["window"] is None
    with pytest.raises(ProtocolError, match="draft_model is required, unless draft_quant"):
        spec({"model": "t", "prompt": "hi"})  # the target's copy needs draft_quant/dtype
    for meta, words in (({}, ("needs a prompt or prompt_ids",)),
                        ({"prompt": "x", "min_window": 5, "max_window": 4},
                         ("max_window must be at least min_window (5), got 4",)),
                        ({"prompt": "x", "top_p": 0.0}, ("top_p must be",))):
        with pytest.raises(ProtocolError) as err:
            spec({"model": "t", "draft_model": "d", **meta})
        assert err.value.code == ErrorCode.BAD_REQUEST
        assert err.value.message.startswith("GENERATE spec: ")
        assert all(w in err.value.message for w in words), err.value.message

    r = split({"mode": "split", "model": "m", "prompt": "hi", "layers": " 0-1,1-4 ",
               "dtype": "auto", "seed": 3, "repetition_penalty": 1.2})
    assert (r["layers"], r["dtype"], r["wire_dtype"], r["retries"]) == ("0-1,1-4", "float32",
                                                                          "float32", 1)
    assert (r["sampling"].seed, r["sampling"].repetition_penalty) == (3, 1.2) and "seed" not in r
    for meta, words in (({}, ("split generation needs a prompt",)),
                        ({"prompt": "x", "layers": "  "}, ("layers must be ranges",)),
                        ({"prompt_ids": []}, ("prompt_ids must be a list of 1..",)),
                        ({"prompt": "x", "batch_decode": 1}, ("batch_decode must be a boolean",))):
        with pytest.raises(ProtocolError) as err:
            split({"model": "m", **meta})
        assert err.value.code == ErrorCode.BAD_REQUEST
        assert err.value.message.startswith("GENERATE split: ")
        assert all(w in err.value.message for w in words), err.value.message
    assert GENERATE_SPLIT.parse({"model": "m"})["prompt"] is None


@pytest.mark.parametrize("name", sorted(BODIES))
def test_round_trip_through_a_frame(name: str) -> None:
    b = BODIES[name]
    values = b.parse(b.example())
    meta = through_wire(b.to_meta(values))
    assert b.parse(meta) == values
    assert b.to_meta(b.parse(meta)) == meta


@pytest.mark.parametrize("name", sorted(BODIES))
def test_bad_bodies_are_typed_errors_naming_the_body_and_the_field(name: str) -> None:
    b = BODIES[name]
    example = b.example()
    bad(b, "not a map", "must be a map")
    for f in b.fields:
        tried = 0
        for value in f.bad_examples():
            bad(b, {**example, f.name: value}, f.name)
            tried += 1
        assert tried, f.name
        if f.required:
            bad(b, {k: v for k, v in example.items() if k != f.name}, f"{f.name} is required")
    extra = {**example, "zz_unknown": 1}
    if b.extra == "reject":
        bad(b, extra, "unknown keys ['zz_unknown']")
    else:
        assert b.parse(extra) == b.parse(example)


@pytest.mark.parametrize("name", sorted(n for n, b in BODIES.items() if b.tensors))
def test_tensor_bodies_refuse_a_foreign_dtype(name: str) -> None:
    b = BODIES[name]
    t = b.tensors[0]
    shape = [1] * (len(t.shape) if t.shape is not None else max(1, t.min_rank))
    other = next(d for d in ("complex", "bool", "uint8", "int16") if d not in t.dtypes)
    tbad(b, {"tensors": [desc("w" if t.name == "*" else t.name, other, shape)]}, "must be")


# ---------------------------------------------------------------------------------------------
# protocol.md's tables = the definitions
# ---------------------------------------------------------------------------------------------

TABLE_HEAD = re.compile(r"^\| field of `([^`]+)` \| type \| default \| meaning \|$")


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def _unquote(cell: str) -> str:
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def protocol_tables() -> dict[str, list[tuple[str, str, str]]]:
    tables: dict[str, list[tuple[str, str, str]]] = {}
    lines = PROTOCOL.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = TABLE_HEAD.match(line)
        if not m:
            continue
        name = m.group(1)
        assert name not in tables, f"protocol.md has two tables for {name}"
        assert re.fullmatch(r"\|[-:| ]+\|", lines[i + 1]), f"{name}: no table separator"
        rows = []
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            assert len(cells) == 4, f"{name}: a row needs 4 cells: {row}"
            rows.append((_unquote(cells[0]), _unquote(cells[1]), cells[2]))
        tables[name] = rows
    return tables


def test_protocol_md_has_one_table_per_definition_and_no_others() -> None:
    tables = protocol_tables()
    assert sorted(tables) == sorted(BODIES)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_protocol_md_table_matches_the_definition(name: str) -> None:
    rows = protocol_tables().get(name)
    assert rows is not None, f"protocol.md has no table `| field of `{name}` | ...`"
    assert rows == BODIES[name].rows()


def test_protocol_md_names_the_closed_bodies() -> None:
    text = PROTOCOL.read_text(encoding="utf-8").replace("\n", " ")
    m = re.search(r"except in the closed bodies (.+?), which answer", text)
    assert m, "protocol.md 4.2 lists the closed bodies"
    named = sorted(re.findall(r"`([^`]+)`", m.group(1)))
    assert named == sorted(n for n, b in BODIES.items() if b.extra == "reject")


def test_the_table_parser_sees_drift() -> None:
    """The cross-check can fail: a changed bound, a missing row and a renamed field differ."""
    rows = BODIES["SPEC_OPEN"].rows()
    assert ("max_tokens", "int 1..2^20", "required") in rows
    assert rows != [(n, t.replace("2^20", "2^21"), d) for n, t, d in rows]
    assert _cells(r'| `x` | `"a" \| "b"` | 1 | m |') == ["`x`", '`"a" | "b"`', "1", "m"]
    assert fmt_number(2**31 - 1) == "2^31-1" and fmt_number(0.999) == "0.999"


# ---------------------------------------------------------------------------------------------
# No torch in p2pllm.wire
# ---------------------------------------------------------------------------------------------


def test_schema_and_tensor_names_do_not_import_torch() -> None:
    code = ("import sys, p2pllm.wire.schema, p2pllm.wire.tensors, p2pllm.wire.messages; "
            "from p2pllm.wire.tensors import COMPUTE_DTYPES, DTYPE_NAMES; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
