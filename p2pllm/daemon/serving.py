"""The served names beyond the local engine (issue 13 item 2): ``p2pllmd --api-serve FILE``.

A serve config (``configs/serve.yaml``) maps a name clients send as ``model`` to a GENERATE job
that this daemon coordinates, exactly as ``p2pllm generate --mode spec|split|tp`` would: the
job runner places it on the cluster, the pillar runs it and streams its tokens back. Each API
request is one job; the API fills in the prompt (``prompt_ids``, rendered through the model's
chat template here), ``max_tokens``, ``temperature``, ``top_p`` and ``seed``. The file fixes
the rest::

    models:
      smollm2-spec:                 # the served name
        mode: spec                  # spec | split | tp
        model: smollm2-135m-instruct
        draft_quant: int4
        draft_tokens: auto
      smollm2-split:
        mode: split
        model: smollm2-135m-instruct
        shards: 2

Pure: reading and checking the file (a :class:`~p2pllm.config.ConfigError` naming the entry
and the key), nothing else; the pillar's own schema checks the values when the job starts.
``model`` (and ``draft_model``) must name a model in this daemon's models dirs, as for the
CLI: the API renders prompts with its tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from p2pllm.config import ConfigError
from p2pllm.daemon.jobs import GENERATE_KEYS

MODES = ("spec", "split", "tp")
# what each request sets (the API's request fields) or the API itself (the prompt)
PER_REQUEST = frozenset({"max_tokens", "temperature", "top_p", "seed", "ignore_eos"})
JOB_KEYS = frozenset(GENERATE_KEYS) - PER_REQUEST - {"mode"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_ENTRIES = 256


@dataclass(frozen=True)
class ServedJob:
    """One served name: the GENERATE fields of its jobs (all but the per-request ones)."""

    name: str
    mode: str
    fields: Mapping[str, Any]

    @property
    def model(self) -> str:
        return str(self.fields["model"])

    def meta(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
             seed: int | None) -> dict[str, Any]:
        """The GENERATE request of one API request."""
        meta: dict[str, Any] = {"mode": self.mode, **self.fields, "prompt_ids": prompt_ids,
                                "max_tokens": max_tokens, "temperature": temperature,
                                "top_p": top_p}
        if seed is not None:
            meta["seed"] = seed
        return meta


def load_serve_config(path: str | Path) -> dict[str, ServedJob]:
    """The served names of a serve config file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the serve config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"the serve config {path} is not valid YAML: {exc}") from exc
    return parse_serve_config(raw, str(path))


def parse_serve_config(raw: Any, where: str = "the serve config") -> dict[str, ServedJob]:
    """Check a parsed serve config: ``{"models": {name: {"mode": ..., "model": ..., ...}}}``."""
    if not isinstance(raw, dict) or set(raw) != {"models"} or not isinstance(raw["models"], dict):
        raise ConfigError(f"{where}: the file must hold one mapping, `models:`, of served "
                          "names to jobs")
    entries = raw["models"]
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"{where}: {len(entries)} served names; at most {MAX_ENTRIES}")
    out: dict[str, ServedJob] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{where}: served name {name!r}: letters, digits and ._:- only "
                              "(at most 128), starting with a letter or digit")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {name}: must be a mapping (mode, model, ...)")
        mode = entry.get("mode")
        if mode not in MODES:
            raise ConfigError(f"{where}: {name}: mode must be one of {', '.join(MODES)}, got "
                              f"{mode!r} (models the local engine serves need no entry)")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: {name}: needs `model:`, the name of a model in this "
                              "daemon's models dirs")
        fields: dict[str, Any] = {}
        for key, value in entry.items():
            if key == "mode":
                continue
            if key in PER_REQUEST or key in ("prompt", "prompt_ids"):
                raise ConfigError(f"{where}: {name}: {key} is set by each API request, not here")
            if key not in JOB_KEYS:
                raise ConfigError(f"{where}: {name}: unknown key {key!r}; a job takes "
                                  f"{', '.join(sorted(JOB_KEYS))}")
            if not isinstance(value, str | int | float | bool) and value is not None:
                raise ConfigError(f"{where}: {name}: {key} must be a plain value, got "
                                  f"{type(value).__name__}")
            if value is not None:
                fields[key] = value
        out[name] = ServedJob(name, str(mode), fields)
    return out
