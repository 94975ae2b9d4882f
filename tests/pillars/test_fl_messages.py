"""FL message bodies: defaults, validation as typed errors, resume merging, the CLI's body."""

from __future__ import annotations

import argparse

import pytest

from p2pllm.cli import fl as fl_cli
from p2pllm.pillars.federated.lora import LoraSpec
from p2pllm.pillars.federated.messages import ClientParams, RoundConfig, RunConfig
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode


def test_run_config_defaults_and_name() -> None:
    cfg = RunConfig.from_meta({"model": "/models/tinystories-656k"})
    assert (cfg.rounds, cfg.min_clients, cfg.aggregation, cfg.lora_rank) == (3, 1, "fedavg", 8)
    assert cfg.lora == LoraSpec(8, 16.0, 0.05, ("q_proj", "v_proj"))
    assert cfg.name == "fl-tinystories-656k"
    # --out is the CLI's own directory: it names the run there, and no path reaches the daemon
    assert fl_cli.run_meta(cli_args(out="/tmp/my out/"))["run_name"] == "fl-my_out"
    assert RunConfig.from_meta({"model": "m", "run_name": "exp.1"}).name == "exp.1"
    assert RunConfig.from_meta({"model": "m", "lr": 1}).lr == 1.0  # ints are fine for floats
    assert RunConfig.from_meta({"model": "m", "target_modules": "all-linear"}).target_modules == ("all-linear",)


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({}, "model is required"),
        ({"model": "m", "rounds": 0}, "rounds"),
        ({"model": "m", "rounds": True}, "rounds"),
        ({"model": "m", "lr": -1.0}, "lr"),
        ({"model": "m", "lr": float("nan")}, "lr"),
        ({"model": "m", "clients": 2, "min_clients": 3}, "exceeds"),
        ({"model": "m", "aggregation": "median"}, "aggregation"),
        ({"model": "m", "lora_rank": 0}, "lora rank"),
        ({"model": "m", "lora_dropout": 1.0}, "dropout"),
        ({"model": "m", "target_modules": []}, "target modules"),
        ({"model": "m", "quantize": "3bit"}, "quantize"),
        ({"model": "m", "run_name": "../escape"}, "run_name"),
        ({"model": "m", "round_timeout": 0}, "round_timeout"),
        ({"model": "m", "bogus": 1}, "unknown keys"),
        ({"model": "m", "out": "/tmp/x"}, "unknown keys"),  # a path is not taken
    ],
)
def test_run_config_rejects_bad_values_as_bad_request(meta: dict, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        RunConfig.from_meta(meta)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert words in info.value.message


def test_resume_takes_the_checkpoint_values_and_names_conflicts() -> None:
    saved = RunConfig.from_meta({"model": "m", "lora_rank": 4, "lr": 0.01, "rounds": 3}).to_meta()
    given = {"model": "m", "rounds": 5, "resume": True}
    cfg = RunConfig.from_meta(given, base=saved)
    assert (cfg.lora_rank, cfg.lr, cfg.rounds, cfg.resume) == (4, 0.01, 5, True)
    assert cfg.conflicts(saved, given) == []
    clash = {"model": "m", "lora_rank": 8, "lr": 0.5}
    cfg2 = RunConfig.from_meta(clash, base=saved)
    # lr may change on resume; the rank fixes the adapter's shapes and may not.
    assert cfg2.conflicts(saved, clash) == ["lora_rank=8 (checkpoint: 4)"]


def test_round_config_and_client_params() -> None:
    rc = RoundConfig.from_meta({"round": 2, "local_steps": 7, "lr": 0.1, "batch_size": 4, "seed": 1})
    assert rc.steps_for(100) == 7
    assert RoundConfig(1, 7, 0.1, 4, 0, local_epochs=2.0).steps_for(10) == 6  # 2 x ceil(10/4)
    assert RoundConfig.from_meta(rc.to_meta()) == rc
    with pytest.raises(ProtocolError, match="round"):
        RoundConfig.from_meta({"round": 0, "local_steps": 7, "lr": 0.1, "batch_size": 4})
    with pytest.raises(ProtocolError, match="batch_size"):
        RoundConfig.from_meta({"round": 1, "local_steps": 7, "lr": 0.1, "batch_size": "4"})
    cp = ClientParams("m", "/p/m", LoraSpec(), 64, 0.1, 0)
    assert ClientParams.from_meta(cp.to_meta()) == cp
    with pytest.raises(ProtocolError, match="lora must be a map"):
        ClientParams.from_meta({"model": "m"})


def cli_args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fl_cli.add_arguments(parser)
    argv = ["run", "--model", kw.pop("model", "tiny")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_cli_sends_only_the_flags_given(tmp_path) -> None:
    meta = fl_cli.run_meta(cli_args())
    assert meta == {"model": "tiny"}  # the daemon fills in defaults (or the checkpoint's)
    meta = fl_cli.run_meta(cli_args(
        model=str(tmp_path), rounds=5, lora_rank=4, target_modules="q_proj, k_proj", resume=True,
        aggregation="fedavgm", out="rel/out",
    ))
    assert meta["model"] == str(tmp_path.resolve())
    assert meta["rounds"] == 5 and meta["lora_rank"] == 4 and meta["resume"] is True
    assert meta["target_modules"] == ["q_proj", "k_proj"] and meta["aggregation"] == "fedavgm"
    assert "out" not in meta and meta["run_name"] == "fl-out" and meta["send_files"] is True
    assert RunConfig.from_meta(meta).rounds == 5


def test_cli_without_a_daemon_says_where_it_tried(capsys) -> None:
    args = cli_args(daemon="127.0.0.1:1")
    assert fl_cli.run(args) == 2
    assert "no p2pllm daemon answered at 127.0.0.1:1" in capsys.readouterr().err
