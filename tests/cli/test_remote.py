"""The GENERATE body the CLI sends for --mode spec|split."""

from __future__ import annotations

import argparse

from p2pllm.cli import generate
from p2pllm.cli.remote import generate_meta


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    return p.parse_args(list(argv))


def test_split_flags_reach_the_request() -> None:
    meta = generate_meta(parse("--mode", "split", "--model", "m", "--shards", "2", "--batch-decode",
                               "--keep-alive", "5", "--wire-dtype", "bfloat16", "hi"))
    assert meta["mode"] == "split" and meta["model"] == "m" and meta["prompt"] == "hi"
    assert meta["shards"] == 2 and meta["batch_decode"] is True and meta["keep_alive"] == 5.0
    assert meta["wire_dtype"] == "bfloat16"


def test_unset_flags_are_left_to_the_daemon() -> None:
    meta = generate_meta(parse("--mode", "spec", "--model", "m", "--draft-model", "d", "hi"))
    assert meta["draft_model"] == "d"
    assert "batch_decode" not in meta and "keep_alive" not in meta and "shards" not in meta


def test_draft_quant_and_draft_dtype_reach_the_spec_request() -> None:
    from p2pllm.pillars.speculative.messages import parse_generate

    meta = generate_meta(parse("--mode", "spec", "--model", "m", "--draft-model", "m",
                               "--draft-quant", "int4", "--draft-dtype", "bfloat16", "hi"))
    assert meta["draft_quant"] == "int4" and meta["draft_dtype"] == "bfloat16"
    v = parse_generate(meta)
    assert v["draft_quant"] == "int4" and v["draft_dtype"] == "bfloat16"
    assert v["dtype"] == "float32"  # the target keeps its own dtype


def test_draft_dtype_defaults_to_the_target_dtype() -> None:
    from p2pllm.pillars.speculative.messages import parse_generate

    meta = generate_meta(parse("--mode", "spec", "--model", "m", "--draft-model", "d",
                               "--dtype", "bfloat16", "hi"))
    assert "draft_dtype" not in meta
    assert parse_generate(meta)["draft_dtype"] == "bfloat16"
