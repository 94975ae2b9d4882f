"""The serve config (daemon/serving.py): what it accepts, what it refuses (naming the entry
and the key), and the GENERATE request one API request makes of an entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pllm.config import ConfigError
from p2pllm.daemon.serving import load_serve_config, parse_serve_config

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_serve_config_parses() -> None:
    jobs = load_serve_config(REPO / "configs" / "serve.yaml")
    assert {"shakespeare-spec", "shakespeare-split", "smollm2-spec"} <= set(jobs)
    assert jobs["smollm2-spec"].fields["draft_quant"] == "int4"


def test_an_entry_becomes_one_generate_request_per_api_request() -> None:
    job = parse_serve_config({"models": {"s": {"mode": "split", "model": "m", "shards": 2,
                                               "wire_dtype": None}}})["s"]
    assert job.model == "m"
    assert job.meta([5, 6], 10, 0.0, 1.0, None) == {
        "mode": "split", "model": "m", "shards": 2, "prompt_ids": [5, 6], "max_tokens": 10,
        "temperature": 0.0, "top_p": 1.0}
    assert job.meta([5], 1, 0.7, 0.9, 3)["seed"] == 3


@pytest.mark.parametrize("raw, error", [
    ({"models": {"x": {"mode": "local", "model": "m"}}}, "x: mode must be one of spec, split, tp"),
    ({"models": {"x": {"mode": "spec"}}}, "x: needs `model:`"),
    ({"models": {"x": {"mode": "spec", "model": "m", "temperature": 0}}},
     "x: temperature is set by each API request"),
    ({"models": {"x": {"mode": "spec", "model": "m", "prompt_ids": [1]}}},
     "x: prompt_ids is set by each API request"),
    ({"models": {"x": {"mode": "split", "model": "m", "shard": 2}}}, "x: unknown key 'shard'"),
    ({"models": {"x": {"mode": "split", "model": "m", "layers": [1, 2]}}},
     "x: layers must be a plain value"),
    ({"models": {"../x": {"mode": "split", "model": "m"}}}, "served name '../x'"),
    ({"models": {"x": "spec"}}, "x: must be a mapping"),
    (["a list"], "one mapping"),
    ({"models": {}, "extra": 1}, "one mapping"),
])
def test_bad_entries_are_refused_naming_them(raw: object, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_serve_config(raw, "serve.yaml")
    assert error in str(e.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the serve config"):
        load_serve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_config(bad)
