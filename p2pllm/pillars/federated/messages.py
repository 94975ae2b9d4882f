"""Bodies of the federated messages (protocol.md section 10) as small frozen dataclasses.

``RunConfig`` is the FL_RUN request a CLI sends to its daemon; ``ClientParams`` the ASSIGN
params of an ``fl-client``; ``RoundConfig`` the FL_TRAIN metadata besides the adapter tensors.
Each validates in ``__post_init__`` and raises ValueError; ``from_meta`` turns that into a
typed ``BAD_REQUEST`` for whoever sent it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from p2pllm.pillars.federated.lora import DEFAULT_TARGETS, QUANTIZE_CHOICES, LoraSpec
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

AGGREGATIONS = ("fedavg", "fedavgm")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {v!r}")


def _float(name: str, v: Any, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if open_lo else v >= lo) and v <= hi
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if open_lo else '['}{lo}, {hi}], got {v!r}")


def _bad_request(what: str, exc: Exception) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{what}: {exc}")


@dataclass(frozen=True)
class RunConfig:
    """An FL run, as `p2pllm fl run` asks for it (FL_RUN body)."""

    model: str
    rounds: int = 3
    clients: int | None = None  # None: every eligible node
    min_clients: int = 1
    local_steps: int = 20
    local_epochs: float | None = None  # set: overrides local_steps (epochs over the train blocks)
    lr: float = 1e-3
    batch_size: int = 8
    block_size: int = 128
    eval_fraction: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    round_timeout: float = 300.0
    aggregation: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    seed: int = 0
    quantize: str | None = None
    max_retries: int = 3
    wait_clients: float = 10.0
    resume: bool = False
    out: str | None = None
    run_name: str | None = None

    # Keys a resumed run must share with its checkpoint: they fix the adapter's layout, the
    # data split or the server optimizer's state.
    STRUCTURAL = (
        "model", "block_size", "eval_fraction", "lora_rank", "lora_alpha", "lora_dropout",
        "target_modules", "seed", "quantize", "aggregation", "server_lr", "server_momentum",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string (a name or a path)")
        _int("rounds", self.rounds, 1, 100_000)
        if self.clients is not None:
            _int("clients", self.clients, 1, 10_000)
        _int("min_clients", self.min_clients, 1, 10_000)
        if self.clients is not None and self.min_clients > self.clients:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients ({self.clients})")
        _int("local_steps", self.local_steps, 1, 10_000_000)
        if self.local_epochs is not None:
            _float("local_epochs", self.local_epochs, 0.0, 10_000.0, open_lo=True)
        _float("lr", self.lr, 0.0, 10.0, open_lo=True)
        _int("batch_size", self.batch_size, 1, 65_536)
        _int("block_size", self.block_size, 2, 1 << 20)
        _float("eval_fraction", self.eval_fraction, 0.0, 0.9, open_lo=True)
        _ = self.lora  # validates the LoRA fields
        _float("round_timeout", self.round_timeout, 0.0, 7 * 86400.0, open_lo=True)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        _float("server_lr", self.server_lr, 0.0, 100.0, open_lo=True)
        _float("server_momentum", self.server_momentum, 0.0, 0.999)
        _int("seed", self.seed, 0, 2**63 - 1)
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        _int("max_retries", self.max_retries, 0, 1000)
        _float("wait_clients", self.wait_clients, 0.0, 3600.0)
        if not isinstance(self.resume, bool):
            raise ValueError("resume must be a bool")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise ValueError("out must be a directory path")
        if self.run_name is not None and (
            not isinstance(self.run_name, str) or not _RUN_NAME.match(self.run_name)
        ):
            raise ValueError(
                f"run_name must be 1-100 characters of letters, digits, '.', '_', '-', got {self.run_name!r}"
            )

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.target_modules)

    @property
    def name(self) -> str:
        """The run's name: its checkpoint lives in <state_dir>/fl/<name>/."""
        if self.run_name:
            return self.run_name
        base = (self.out or self.model).rstrip("/").rsplit("/", 1)[-1]
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-") or "run"
        return ("fl-" + cleaned)[:100]

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults < ``base`` (a checkpoint's config) < ``meta``; BAD_REQUEST when invalid."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in meta.items() if k not in ("job", "rid") and v is not None}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"FL_RUN: unknown keys {unknown}; known: {sorted(known)}"
            )
        values = {k: v for k, v in (base or {}).items() if k in known}
        values.update(given)
        if isinstance(values.get("target_modules"), str):
            values["target_modules"] = [values["target_modules"]]
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = tuple(values["target_modules"])
        for key in ("lora_alpha", "lora_dropout", "lr", "round_timeout", "server_lr",
                    "server_momentum", "eval_fraction", "wait_clients", "local_epochs"):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        if "model" not in values:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "FL_RUN: model is required")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise _bad_request("FL_RUN", exc) from exc

    def conflicts(self, saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
        """Structural keys the user gave explicitly that differ from the checkpoint's."""
        out = []
        for key in self.STRUCTURAL:
            if key in given and given[key] is not None and key in saved:
                mine, theirs = getattr(self, key), saved[key]
                if isinstance(mine, tuple):
                    theirs = tuple(theirs) if isinstance(theirs, list) else theirs
                if mine != theirs:
                    out.append(f"{key}={mine!r} (checkpoint: {theirs!r})")
        return out


@dataclass(frozen=True)
class ClientParams:
    """ASSIGN params of an fl-client role."""

    model: str  # the name (looked up in the client's --models-dir first)
    model_path: str  # the coordinator's path to it (used when the name is not found locally)
    lora: LoraSpec
    block_size: int
    eval_fraction: float
    seed: int
    quantize: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not isinstance(self.model_path, str):
            raise ValueError("model and model_path must be strings")
        _int("block_size", self.block_size, 2, 1 << 20)
        _float("eval_fraction", self.eval_fraction, 0.0, 0.9, open_lo=True)
        _int("seed", self.seed, 0, 2**63 - 1)
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}")

    def to_meta(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_path": self.model_path,
            "lora": self.lora.to_meta(),
            "block_size": self.block_size,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "quantize": self.quantize,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ClientParams:
        try:
            lora = meta.get("lora")
            if not isinstance(lora, Mapping):
                raise ValueError("lora must be a map")
            return cls(
                model=meta.get("model"),  # type: ignore[arg-type]
                model_path=meta.get("model_path", meta.get("model")),  # type: ignore[arg-type]
                lora=LoraSpec.from_meta(lora),
                block_size=meta.get("block_size", 128),  # type: ignore[arg-type]
                eval_fraction=meta.get("eval_fraction", 0.1),  # type: ignore[arg-type]
                seed=meta.get("seed", 0),  # type: ignore[arg-type]
                quantize=meta.get("quantize"),
            )
        except (TypeError, ValueError) as exc:
            raise _bad_request("fl-client params", exc) from exc


@dataclass(frozen=True)
class RoundConfig:
    """What a client does in one round (FL_TRAIN metadata besides the tensors)."""

    round: int
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    local_epochs: float | None = None

    def __post_init__(self) -> None:
        _int("round", self.round, 1, 1 << 31)
        _int("local_steps", self.local_steps, 1, 10_000_000)
        _float("lr", self.lr, 0.0, 10.0, open_lo=True)
        _int("batch_size", self.batch_size, 1, 65_536)
        _int("seed", self.seed, 0, 2**63 - 1)
        if self.local_epochs is not None:
            _float("local_epochs", self.local_epochs, 0.0, 10_000.0, open_lo=True)

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps this round: local_steps, or local_epochs over the train blocks."""
        if self.local_epochs is None:
            return self.local_steps
        per_epoch = math.ceil(num_examples / self.batch_size)
        return max(1, round(self.local_epochs * per_epoch))

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        if d["local_epochs"] is None:
            del d["local_epochs"]
        return d

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RoundConfig:
        try:
            return cls(
                round=meta.get("round"),  # type: ignore[arg-type]
                local_steps=meta.get("local_steps"),  # type: ignore[arg-type]
                lr=meta.get("lr"),  # type: ignore[arg-type]
                batch_size=meta.get("batch_size"),  # type: ignore[arg-type]
                seed=meta.get("seed", 0),  # type: ignore[arg-type]
                local_epochs=meta.get("local_epochs"),
            )
        except (TypeError, ValueError) as exc:
            raise _bad_request("FL_TRAIN", exc) from exc
