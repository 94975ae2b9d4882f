"""What the two training pillars share: the LoRA adapter spec and the data error.

Federated LoRA (``pillars/federated``) and split training (``pillars/splittrain``) both import
this module; it imports neither (nor torch; peft only inside :meth:`LoraSpec.peft_config`), so
there is no cycle. Each pillar keeps its own wire form of the spec: federated's is
:meth:`LoraSpec.to_meta` / :meth:`LoraSpec.from_meta` (``{rank, alpha, dropout,
target_modules}``), split training's is ``lora_meta`` / ``lora_from_meta`` in
``splittrain/compute.py`` (``{r, alpha, targets}``, no dropout), as protocol.md describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DEFAULT_TARGETS", "DataError", "LoraSpec"]

DEFAULT_TARGETS = ("q_proj", "v_proj")


class DataError(ValueError):
    """Training data that cannot be used: a data dir or dataset that is unreadable, empty or too
    short for one batch (the message says what was found)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft) on the named linear modules; identical everywhere in a run."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 4096:
            raise ValueError(f"lora rank must be an int in 1..4096, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if (
            not isinstance(self.target_modules, tuple)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(
                f"target modules must be a non-empty list of module names, got {self.target_modules!r}"
            )

    def to_meta(self) -> dict[str, Any]:
        """Federated learning's wire form (``ASSIGN fl-client`` params' ``lora``)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> LoraSpec:
        """From a msgpack map; ValueError (with the reason) for anything malformed."""
        targets = meta.get("target_modules", list(DEFAULT_TARGETS))
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list | tuple):
            raise ValueError(f"target_modules must be a list of strings, got {targets!r}")
        return cls(
            rank=meta.get("rank", 8),
            alpha=meta.get("alpha", 16.0),
            dropout=meta.get("dropout", 0.05),
            target_modules=tuple(targets),
        )

    def peft_config(self, base_model_path: str | None = None) -> Any:
        from peft import LoraConfig

        # "all-linear" is peft's own shorthand and must be passed as a string.
        targets: str | list[str] = (
            "all-linear" if self.target_modules == ("all-linear",) else list(self.target_modules)
        )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft takes floats too
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_path,
        )

    def peft_config_dict(self, base_model: str = "") -> dict[str, Any]:
        """The adapter_config.json of an adapter with this spec (sets as sorted lists)."""
        d = self.peft_config(base_model or None).to_dict()
        for k, v in list(d.items()):
            if isinstance(v, set):
                d[k] = sorted(v)
        return d
