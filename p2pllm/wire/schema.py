"""Declarative message bodies: one :class:`Body` per message body, typed fields, tensor fields.

A body validates what a peer sent (:meth:`Body.parse`, :meth:`Body.check_tensors`) into plain
Python values, or raises :class:`ProtocolError` — ``BAD_REQUEST`` for a field, ``BAD_TENSOR``
for a tensor descriptor — whose message names the body, the field and why, and turns values
back into metadata (:meth:`Body.to_meta`). protocol.md lists every body in a table whose
header is ``| field of `NAME` | type | default | meaning |``; ``tests/wire/test_schema.py``
checks those tables against :func:`definitions` (names, :meth:`Field.type_name`,
:meth:`Field.default_text`), so the two cannot drift.

Rules every body follows (protocol.md section 4.2):

- **nil is absent.** A key whose value is nil counts as not sent: the field's default applies,
  and a required field is missing.
- **Unknown keys.** A body is *open* (``extra="ignore"``, the default: keys it does not
  declare are ignored, so a newer peer may add keys) or *closed* (``extra="reject"``: unknown
  keys are ``BAD_REQUEST`` naming them; used where a typo would silently change a run, like
  configs a user typed). The routing keys ``job``, ``rid`` and the ``tensors`` descriptor list
  are never unknown.
- **No coercion.** An int field takes a msgpack integer (not a bool, not a float); a float
  field takes an integer or a finite float; strings, lists and maps are bounded in length.
- **Tensors** are checked on their descriptors (name, dtype name, shape) before any tensor is
  built: no torch here (``p2pllm.wire`` never imports torch at module load).

Why one module over 400 lines: each field kind keeps its check, its msgpack form, its
protocol.md type and its test examples side by side, so a kind cannot change in one of those
without the others; spread over several modules they would drift.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.tensors import ITEMSIZE, MAX_DIMS

__all__ = [
    "ENVELOPE",
    "REQUIRED",
    "Body",
    "Bool",
    "Enum",
    "Field",
    "Float",
    "Int",
    "List",
    "Map",
    "OneOf",
    "Routing",
    "Str",
    "Tensor",
    "definitions",
    "fmt_number",
]

ENVELOPE = ("job", "rid", "tensors")  # routing keys and the tensor list: never "unknown"
MAX_STR = 4096  # default bound of a string field
MAX_LIST = 1 << 20  # default bound of a list field
_SHOW = 60  # characters of a bad value echoed back in an error message


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class Invalid(Exception):
    """A value a field does not accept: ``why`` completes "<field> must be ..."."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path
        self.why = why


def fmt_number(x: float) -> str:
    """How protocol.md writes a bound: 2^k and 2^k-1 for large powers of two, else plainly."""
    if isinstance(x, int) and not isinstance(x, bool):
        for k in range(16, 65):
            if x == 2**k:
                return f"2^{k}"
            if x == 2**k - 1:
                return f"2^{k}-1"
        return str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _fmt_default(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return fmt_number(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt_default(v) for v in value) + "]"
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One key of a body. ``default`` is REQUIRED or the value an absent (or nil) key takes;
    ``attr`` the name the parsed value goes under (default: the key)."""

    name: str
    default: Any = field(default=REQUIRED, kw_only=True)
    attr: str | None = field(default=None, kw_only=True)
    doc: str = field(default="", kw_only=True)

    @property
    def key(self) -> str:
        return self.attr or self.name

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, path: str) -> Any:
        """The parsed value, or Invalid(path, why)."""
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """The msgpack form of a parsed value."""
        return value

    def expect(self) -> str:
        """What the field takes, as the end of "<field> must be ..."."""
        raise NotImplementedError

    def type_name(self) -> str:
        """The field's type as protocol.md's tables write it."""
        raise NotImplementedError

    def default_text(self) -> str:
        return "required" if self.required else _fmt_default(self.default)

    def example(self) -> Any:
        """A valid msgpack value (for tests and docs)."""
        raise NotImplementedError

    def bad_examples(self) -> Iterator[Any]:
        """Msgpack values the field must refuse (for tests)."""
        raise NotImplementedError

    def _fail(self, value: Any, path: str) -> Invalid:
        return Invalid(path, f"must be {self.expect()}, got {_show(value)}")


def _range(lo: Any, hi: Any, *, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '≥'} {fmt_number(lo)}"
    if lo is None:
        return f" {'<' if hi_open else '≤'} {fmt_number(hi)}"
    if not (lo_open or hi_open):
        return f" {fmt_number(lo)}..{fmt_number(hi)}"
    return f" in {'(' if lo_open else '['}{fmt_number(lo)}, {fmt_number(hi)}{')' if hi_open else ']'}"


@dataclass(frozen=True)
class Int(Field):
    lo: int | None = None
    hi: int | None = None

    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(value, path)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise self._fail(value, path)
        return value

    def expect(self) -> str:
        return "an integer" + _range(self.lo, self.hi)

    def type_name(self) -> str:
        return "int" + _range(self.lo, self.hi)

    def example(self) -> int:
        return self.lo if self.lo is not None else (min(0, self.hi) if self.hi is not None else 0)

    def bad_examples(self) -> Iterator[Any]:
        yield "1"
        yield True
        yield 1.5
        if self.lo is not None:
            yield self.lo - 1
        if self.hi is not None:
            yield self.hi + 1


@dataclass(frozen=True)
class Float(Field):
    """A finite number (with ``finite=False`` also NaN and ±Inf, e.g. a diverged loss);
    integers are taken and become floats."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    finite: bool = True

    def check(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(value, path)
        v = float(value)
        if not math.isfinite(v):
            if self.finite or self.lo is not None or self.hi is not None:
                raise self._fail(value, path)
            return v
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            raise self._fail(value, path)
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            raise self._fail(value, path)
        return v

    def expect(self) -> str:
        return ("a finite number" if self.finite else "a number") + \
            _range(self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

    def type_name(self) -> str:
        return ("float" if self.finite else "float, NaN/Inf allowed") + \
            _range(self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)

    def example(self) -> float:
        if self.lo is None:
            return 0.0 if self.hi is None or self.hi > 0 else float(self.hi) - 1.0
        if self.hi is None:
            return float(self.lo) + 1.0
        return (float(self.lo) + float(self.hi)) / 2

    def bad_examples(self) -> Iterator[Any]:
        yield "1.0"
        yield True
        if self.finite:
            yield float("nan")
            yield float("inf")
        if self.lo is not None:
            yield float(self.lo) if self.lo_open else float(self.lo) - 1.0
        if self.hi is not None:
            yield float(self.hi) if self.hi_open else float(self.hi) + 1.0


@dataclass(frozen=True)
class Bool(Field):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self._fail(value, path)
        return value

    def expect(self) -> str:
        return "a boolean"

    def type_name(self) -> str:
        return "bool"

    def example(self) -> bool:
        return False

    def bad_examples(self) -> Iterator[Any]:
        yield 1
        yield "true"


@dataclass(frozen=True)
class Str(Field):
    min_len: int = 0
    max_len: int = MAX_STR
    pattern: str | None = None

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not self.min_len <= len(value) <= self.max_len:
            raise self._fail(value, path)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise self._fail(value, path)
        return value

    def expect(self) -> str:
        what = f"a string of {self.min_len}..{self.max_len} characters"
        return what + (f" matching {self.pattern}" if self.pattern else "")

    def type_name(self) -> str:
        if self.pattern:
            return f"str /{self.pattern}/"
        if self.min_len:
            return f"str {self.min_len}..{fmt_number(self.max_len)}"
        return f"str ≤ {fmt_number(self.max_len)}"

    def example(self) -> str:
        return "x" * max(1, self.min_len) if self.pattern is None else "x1"

    def bad_examples(self) -> Iterator[Any]:
        yield 7
        yield b"bytes"
        yield "x" * (self.max_len + 1)
        if self.min_len:
            yield ""


@dataclass(frozen=True)
class Routing(Str):
    """A routing key (``job``, ``rid``): the receiving daemon routes on it before the body is
    parsed (protocol.md section 4), so the body itself takes it as optional."""

    def __post_init__(self) -> None:
        if self.default is REQUIRED:
            object.__setattr__(self, "default", None)

    def default_text(self) -> str:
        return "routing"


@dataclass(frozen=True)
class Enum(Field):
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))  # any iterable (a dict's keys)

    def check(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or value not in self.choices:
            raise self._fail(value, path)
        return value

    def expect(self) -> str:
        return "one of " + ", ".join(_fmt_default(c) for c in self.choices)

    def type_name(self) -> str:
        return " | ".join(_fmt_default(c) for c in self.choices)

    def example(self) -> Any:
        return self.choices[0]

    def bad_examples(self) -> Iterator[Any]:
        yield "not-a-choice"
        yield 12345


@dataclass(frozen=True)
class List(Field):
    of: Field = field(default_factory=lambda: Str(""))
    min_len: int = 0
    max_len: int = MAX_LIST

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple) or not self.min_len <= len(value) <= self.max_len:
            raise self._fail(value, path)
        check = self.of.check
        try:  # the fast path names the list; a bad item is then found again, with its index
            return tuple([check(v, path) for v in value])
        except Invalid:
            for i, v in enumerate(value):
                check(v, f"{path}[{i}]")
            raise  # pragma: no cover - the loop raised

    def dump(self, value: Any) -> list[Any]:
        return [self.of.dump(v) for v in value]

    def expect(self) -> str:
        return f"a list of {self.min_len}..{self.max_len} items, each {self.of.expect()}"

    def type_name(self) -> str:
        if self.min_len == self.max_len:
            n = f" ×{self.min_len}"
        elif self.min_len:
            n = f" {fmt_number(self.min_len)}..{fmt_number(self.max_len)}"
        else:
            n = f" ≤ {fmt_number(self.max_len)}"
        return f"[{self.of.type_name()}]{n}"

    def example(self) -> list[Any]:
        return [self.of.example() for _ in range(max(1, self.min_len))]

    def bad_examples(self) -> Iterator[Any]:
        yield "abc"
        yield {"a": 1}
        if self.min_len:
            yield []
        for bad in self.of.bad_examples():
            yield [bad] * max(1, self.min_len)
            break


@dataclass(frozen=True)
class Map(Field):
    """A nested map: checked by ``body`` when given, else any map with string keys."""

    body: Body | None = None

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self._fail(value, path)
        if self.body is None:
            return dict(value)
        return self.body._parse(value, path + ".")

    def dump(self, value: Any) -> dict[str, Any]:
        return dict(value) if self.body is None else self.body.to_meta(value)

    def expect(self) -> str:
        return "a map" if self.body is None else f"a map ({self.body.name})"

    def type_name(self) -> str:
        return "map" if self.body is None else "{" + self.body.name + "}"

    def example(self) -> dict[str, Any]:
        return {} if self.body is None else self.body.example()

    def bad_examples(self) -> Iterator[Any]:
        yield "map"
        yield [1, 2]
        yield {1: "non-string key"}


@dataclass(frozen=True)
class OneOf(Field):
    """The first of ``options`` that takes the value (e.g. an int or ``"auto"``)."""

    options: tuple[Field, ...] = ()

    def check(self, value: Any, path: str) -> Any:
        for option in self.options:
            try:
                return option.check(value, path)
            except Invalid:
                continue
        raise self._fail(value, path)

    def dump(self, value: Any) -> Any:
        for option in self.options:
            try:
                option.check(value, "")
            except Invalid:
                continue
            return option.dump(value)
        return value

    def expect(self) -> str:
        return " or ".join(o.expect() for o in self.options)

    def type_name(self) -> str:
        return " | ".join(o.type_name() for o in self.options)

    def example(self) -> Any:
        return self.options[0].example()

    def bad_examples(self) -> Iterator[Any]:
        for option in self.options:
            for bad in option.bad_examples():
                try:
                    self.check(bad, "")
                except Invalid:
                    yield bad


Dim = int | str | None  # an exact size, a symbol (same size wherever it appears), any size


@dataclass(frozen=True)
class Tensor:
    """A tensor in the payload, by its descriptor in ``meta["tensors"]`` (protocol.md 5).

    ``name`` "*" stands for any name the body does not declare (e.g. adapter tensors).
    ``shape``: a tuple of dims (an int is exact, a str a symbol bound by ``dims`` or by its
    first use, None any size); without it, any shape of ``min_rank..max_rank`` dims."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[Dim, ...] | None = None
    min_rank: int = 0
    max_rank: int = MAX_DIMS
    required: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        bad = [d for d in self.dtypes if d not in ITEMSIZE]
        if bad or not self.dtypes:
            raise ValueError(f"tensor {self.name}: no such wire dtypes {bad}")

    def type_name(self) -> str:
        if self.shape is None:
            shape = f"rank {self.min_rank}..{self.max_rank}"
        else:
            shape = "(" + ", ".join("*" if d is None else str(d) for d in self.shape) + \
                    ("," if len(self.shape) == 1 else "") + ")"
        return f"tensor {'/'.join(self.dtypes)} {shape}"

    def default_text(self) -> str:
        return "required" if self.required and self.name != "*" else "optional"


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Body] = {}


def definitions() -> dict[str, Body]:
    """Every body defined so far, by name (import the pillars' messages modules first)."""
    return dict(_REGISTRY)


class Body:
    """The definition of one message body (or of a map nested in one)."""

    def __init__(self, name: str, fields: Sequence[Field], *,
                 tensors: Sequence[Tensor] = (), extra: Literal["ignore", "reject"] = "ignore",
                 doc: str = "", register: bool = True) -> None:
        self.name = name
        self.fields = tuple(fields)
        self.tensors = tuple(tensors)
        self.extra = extra
        self.doc = doc
        self.by_name = {f.name: f for f in self.fields}
        if len(self.by_name) != len(self.fields):
            raise ValueError(f"{name}: a field is declared twice")
        keys = [f.key for f in self.fields]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name}: two fields parse into the same attribute")
        # (name, key, check, required, default, default needs parsing) per field: parse() is on
        # every frame's path, so nothing here is looked up twice
        self._plan = tuple(
            (f.name, f.key, f.check, f.required, f.default,
             isinstance(f, Map) and f.body is not None and isinstance(f.default, Mapping))
            for f in self.fields)
        if register:
            if name in _REGISTRY:
                raise ValueError(f"a body named {name!r} is already defined")
            _REGISTRY[name] = self

    def __repr__(self) -> str:
        return f"Body({self.name!r})"

    # -- parsing ---------------------------------------------------------------------------

    def error(self, path: str, why: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
        """The typed error for this body: "<NAME>: <field> <why>"."""
        return ProtocolError(code, f"{self.name}: {path} {why}" if path else f"{self.name}: {why}")

    def parse(self, meta: Any, *, partial: bool = False) -> dict[str, Any]:
        """Validated values by attribute name, defaults filled in (with ``partial``, only the
        keys present), or ProtocolError(BAD_REQUEST) naming this body and the field."""
        try:
            return self._parse(meta, "", partial=partial)
        except Invalid as e:
            raise self.error(e.path, e.why) from None

    def _parse(self, meta: Any, prefix: str, *, partial: bool = False) -> dict[str, Any]:
        if type(meta) is not dict and not isinstance(meta, Mapping):
            raise Invalid(prefix.rstrip(".") or "the body", f"must be a map, got {_show(meta)}")
        if self.extra == "reject":
            unknown = sorted(str(k) for k in meta if k not in self.by_name and k not in ENVELOPE)
            if unknown:
                where = f" in {prefix.rstrip('.')}" if prefix else ""
                raise Invalid("", f"unknown keys {unknown}{where}; known: "
                                  f"{sorted(self.by_name)}")
        out: dict[str, Any] = {}
        get = meta.get
        for name, key, check, required, default, nested in self._plan:
            raw = get(name)
            if raw is not None:
                out[key] = check(raw, prefix + name if prefix else name)
            elif partial:
                continue
            elif required:
                f = self.by_name[name]
                raise Invalid(prefix + name, f"is required: {prefix + name} must be {f.expect()}")
            else:  # a nested body's default map gets that body's defaults
                out[key] = check(default, prefix + name) if nested else default
        return out

    def check_tensors(self, meta: Mapping[str, Any], payload_len: int | None = None,
                      dims: Mapping[str, int] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Check ``meta["tensors"]`` against the declared tensors (and, given ``payload_len``,
        that their bytes fill the payload exactly): ``{name: (dtype, shape)}``, or
        ProtocolError(BAD_TENSOR) naming what was expected and what came."""
        descs = meta.get("tensors")
        if descs is None:
            descs = []
        if not isinstance(descs, list):
            raise self.error("tensors", "must be a list of tensor descriptors", ErrorCode.BAD_TENSOR)
        declared = {t.name: t for t in self.tensors}
        wildcard = declared.get("*")
        bound = dict(dims or {})
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        total = 0
        for i, d in enumerate(descs):
            if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
                raise self.error(f"tensors[{i}]", "must be a map with a name", ErrorCode.BAD_TENSOR)
            name, dtype, shape = d["name"], d.get("dtype"), d.get("shape")
            spec = declared.get(name, wildcard)
            if spec is None:
                raise self.error(f"tensor {name!r}", f"is not expected; expected "
                                 f"{self._tensor_list()}", ErrorCode.BAD_TENSOR)
            if name in out:
                raise self.error(f"tensor {name!r}", "appears twice", ErrorCode.BAD_TENSOR)
            if dtype not in spec.dtypes:
                raise self.error(f"tensor {name!r}", f"must be {'/'.join(spec.dtypes)}, got "
                                 f"{_show(dtype)}", ErrorCode.BAD_TENSOR)
            got = self._check_shape(spec, name, shape, bound)
            out[name] = (dtype, got)
            total += math.prod(got) * ITEMSIZE[dtype]
        missing = [t.name for t in self.tensors if t.required and t.name != "*" and t.name not in out]
        if missing:
            came = ", ".join(out) or "none"
            raise self.error("tensors", f"must include {', '.join(missing)}; came: {came}",
                             ErrorCode.BAD_TENSOR)
        if payload_len is not None and total != payload_len:
            raise self.error("tensors", f"describe {total} bytes, the payload has {payload_len}",
                             ErrorCode.BAD_TENSOR)
        return out

    def _check_shape(self, spec: Tensor, name: str, shape: Any,
                     bound: dict[str, int]) -> tuple[int, ...]:
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise self.error(f"tensor {name!r}", f"has a bad shape {_show(shape)}",
                             ErrorCode.BAD_TENSOR)
        got = tuple(shape)
        if spec.shape is None:
            if not spec.min_rank <= len(got) <= spec.max_rank:
                raise self.error(f"tensor {name!r}", f"must have {spec.min_rank}..{spec.max_rank} "
                                 f"dims, got shape {got}", ErrorCode.BAD_TENSOR)
            return got
        want = spec.type_name().split(" ", 2)[2]
        if len(got) != len(spec.shape):
            raise self.error(f"tensor {name!r}", f"must be shaped {want}, got {got}",
                             ErrorCode.BAD_TENSOR)
        for size, dim in zip(got, spec.shape, strict=True):
            if isinstance(dim, str):
                dim = bound.setdefault(dim, size)
            if dim is not None and size != dim:
                concrete = tuple(bound.get(d, d) if isinstance(d, str) else d for d in spec.shape)
                raise self.error(f"tensor {name!r}", f"must be shaped {want} = {concrete}, got {got}",
                                 ErrorCode.BAD_TENSOR)
        return got

    def _tensor_list(self) -> str:
        return ", ".join(t.name for t in self.tensors) or "no tensors"

    # -- serializing -----------------------------------------------------------------------

    def to_meta(self, values: Mapping[str, Any] | Any) -> dict[str, Any]:
        """Metadata from values by attribute name (a mapping, or an object with those
        attributes); None values are left out (nil is absent), in declaration order."""
        get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k, None)
        out: dict[str, Any] = {}
        for f in self.fields:
            v = get(f.key)
            if v is not None:
                out[f.name] = f.dump(v)
        return out

    # -- documentation and tests -----------------------------------------------------------

    def rows(self) -> list[tuple[str, str, str]]:
        """(name, type, default) of each field then each tensor: protocol.md's table rows."""
        out = [(f.name, f.type_name(), f.default_text()) for f in self.fields]
        out += [(t.name, t.type_name(), t.default_text()) for t in self.tensors]
        return out

    def example(self) -> dict[str, Any]:
        """A valid body with every field set."""
        return {f.name: f.example() for f in self.fields}
