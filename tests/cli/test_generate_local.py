"""`p2pllm generate --mode local`: streams the story, --json prints the result object."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from p2pllm.cli import generate as cli
from tests.conftest import SHARED_MODELS, SHARED_SKIP, real_model

STORY = ("Once upon a time, a little girl named Lily lived in a small house with her mom, dad, "
         "and her dog, Spot, Spot, loved to play all day. One day, Lily saw a small bird on the "
         "ground. She picked it up and tried to reach the bird and see what it was.\nLily had "
         "an idea")
IDS = [313, 598, 303, 1049, 1468, 267, 628, 333, 94, 1210, 263, 251, 604, 94, 1030, 94, 1030, 94,
       436, 220, 1053, 615, 303, 328, 552, 319, 1269, 163, 1945, 897, 645, 1188, 108, 319, 135,
       448, 563, 1799, 1380, 1067]


@pytest.fixture
def tinystories() -> str:
    path = (SHARED_MODELS / "tinystories-656k").resolve()
    if not (path / "config.json").is_file():
        pytest.skip(f"{SHARED_SKIP}: real model not found at {path}")
    return str(path)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_streams_the_reference_story(tinystories: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    threads = torch.get_num_threads()
    code = cli.run(_args("--mode", "local", "--model", tinystories, "--max-tokens", "40",
                         "--threads", "1", "Once upon a time"))
    out, err = capsys.readouterr()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert code == 0
    assert out == STORY + "\n"
    assert "40 tokens" in err and "tokens/s" in err


def test_json_result(tinystories: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--model", tinystories, "--max-tokens", "40", "--json", "Once upon a time"])
    out, _ = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert list(result) == ["text", "prompt_tokens", "generated_tokens", "token_ids", "seconds",
                            "tokens_per_s", "time_to_first_token_s", "mode"]
    assert result["token_ids"] == IDS
    assert "Once upon a time" + result["text"] == STORY
    assert (result["prompt_tokens"], result["generated_tokens"], result["mode"]) == (6, 40, "local")
    assert result["tokens_per_s"] > 0 and result["seconds"] >= result["time_to_first_token_s"] > 0


def test_sampling_flags_are_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    model = str(real_model("tinystories-656k"))  # any real model: no reference ids here
    runs = []
    for seed in ("1", "1", "2"):
        cli.main(["--model", model, "--max-tokens", "12", "--json", "--temperature", "0.9",
                  "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.1",
                  "--seed", seed, "Once upon a time"])
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1] != runs[2]


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model", str(tmp_path / "missing" / "model"), "hi"]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--temperature", "-1", "hi"]) == 2
    assert "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--max-tokens", "0", "hi")


def test_remote_modes_go_to_the_daemon_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pllm.cli.remote as remote

    seen: list[argparse.Namespace] = []

    def fake(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(remote, "run_generate", fake)
    assert cli.run(_args("--mode", "spec", "--draft-tokens", "auto", "ROMEO:")) == 0
    assert cli.run(_args("--mode", "split", "--model", "m", "--layers", "0-2,2-5", "--wire-dtype",
                         "bfloat16", "--shards", "2", "--daemon", "127.0.0.1:9", "hi")) == 0
    spec, split = seen
    assert (spec.model, spec.draft_model, spec.draft_tokens) == ("shakespeare", "shakespeare-draft",
                                                                 "auto")
    assert (split.layers, split.wire_dtype, split.shards, split.daemon) == ("0-2,2-5", "bfloat16",
                                                                            2, "127.0.0.1:9")
    assert _args("--draft-tokens", "4", "x").draft_tokens == 4
