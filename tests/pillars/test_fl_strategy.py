"""The server side of a round: screening updates, example-weighted FedAvg, FedAvgM, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from p2pllm.pillars.federated.aggregate import FedAvgM
from p2pllm.pillars.federated.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from p2pllm.pillars.federated.strategy import ClientUpdate, screen, server_update, weighted_mean


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.randn(4, 8, generator=g), "x.lora_B.weight": torch.randn(8, 4, generator=g)}


def test_screen_keeps_fitting_updates_and_rejects_the_rest_with_reasons() -> None:
    glob = adapter(0)
    good_b, good_a = ClientUpdate("b", adapter(2), 30, 1.0), ClientUpdate("a", adapter(1), 10, 2.0)
    nan = {k: v.clone() for k, v in adapter(3).items()}
    nan["x.lora_B.weight"][0, 0] = math.nan
    wrong_shape = {**adapter(4), "x.lora_A.weight": torch.zeros(5, 8)}
    missing = {"x.lora_A.weight": torch.zeros(4, 8)}
    half = {k: v.half() for k, v in adapter(5).items()}
    out = screen(glob, [
        good_b, ClientUpdate("n", nan, 10**9, 0.0), ClientUpdate("s", wrong_shape, 5, 0.0),
        ClientUpdate("m", missing, 5, 0.0), ClientUpdate("h", half, 5, 0.0),
        ClientUpdate("z", adapter(6), 0, 0.0), ClientUpdate("t", adapter(7), True, 0.0),  # type: ignore[arg-type]
        good_a,
    ])
    assert [u.client for u in out.accepted] == ["a", "b"]  # sorted: a reproducible order
    reasons = dict(out.rejected)
    assert "NaN" in reasons["n"] and "shape (5, 8)" in reasons["s"] and "missing keys" in reasons["m"]
    assert "dtype" in reasons["h"] and "positive int" in reasons["z"] and "positive int" in reasons["t"]


def test_fedavg_is_the_example_weighted_mean_of_the_accepted_updates() -> None:
    glob = adapter(0)
    ups = [ClientUpdate("a", adapter(1), 10, 0.0), ClientUpdate("b", adapter(2), 30, 0.0)]
    new, velocity = server_update(glob, ups, "fedavg")
    assert velocity is None
    for k in glob:
        direct = (10 * adapter(1)[k].double() + 30 * adapter(2)[k].double()) / 40
        torch.testing.assert_close(new[k], direct.float(), rtol=0, atol=0)


def test_fedavgm_applies_server_momentum_and_carries_velocity() -> None:
    glob = adapter(0)
    ups = [ClientUpdate("a", adapter(1), 10, 0.0), ClientUpdate("b", adapter(2), 30, 0.0)]
    new1, v1 = server_update(glob, ups, "fedavgm", server_lr=0.5, momentum=0.9)
    mean, _ = server_update(glob, ups, "fedavg")
    expected, exp_v = FedAvgM(0.5, 0.9).step(glob, mean)
    assert v1 is not None
    for k in glob:
        assert torch.equal(new1[k], expected[k]) and torch.equal(v1[k], exp_v[k])
    new2, v2 = server_update(new1, ups, "fedavgm", server_lr=0.5, momentum=0.9, velocity=v1)
    mean2, _ = server_update(new1, ups, "fedavg")
    expected2, _ = FedAvgM(0.5, 0.9).step(new1, mean2, v1)
    assert all(torch.equal(new2[k], expected2[k]) for k in glob)
    with pytest.raises(ValueError, match="unknown aggregation"):
        server_update(glob, ups, "median")


def test_weighted_mean_skips_non_finite_values() -> None:
    assert weighted_mean([1.0, 3.0], [1, 3]) == 2.5
    assert weighted_mean([1.0, math.nan, 3.0], [1, 100, 3]) == 2.5
    assert weighted_mean([math.nan], [1]) is None and weighted_mean([], []) is None


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoint.safetensors"
    assert load_checkpoint(path) is None
    ckpt = Checkpoint(
        round=2, config={"model": "m", "rounds": 3}, rounds=[{"round": 1, "eval_loss": 4.5}, {"round": 2}],
        global_adapter=adapter(1), velocity=adapter(2), initial_eval_loss=5.0, extra={"k": "v"},
    )
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    assert back is not None
    assert (back.round, back.config, back.rounds, back.initial_eval_loss, back.extra) == (
        2, ckpt.config, ckpt.rounds, 5.0, {"k": "v"})
    assert all(torch.equal(back.global_adapter[k], ckpt.global_adapter[k]) for k in ckpt.global_adapter)
    assert back.velocity is not None and all(torch.equal(back.velocity[k], adapter(2)[k]) for k in back.velocity)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.safetensors"]  # no temp file left
    save_checkpoint(path, Checkpoint(3, {}, [], adapter(3)))
    again = load_checkpoint(path)
    assert again is not None and again.round == 3 and again.velocity is None


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="cannot read FL checkpoint"):
        load_checkpoint(path)
    from safetensors.torch import save_file

    save_file(adapter(0), str(path), metadata={"p2pllm_fl": '{"format": "other"}'})
    with pytest.raises(CheckpointError, match="not a p2pllm-fl-checkpoint-v1"):
        load_checkpoint(path)
