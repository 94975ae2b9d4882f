"""Tests for FedAvg / FedAvgM aggregation."""

from __future__ import annotations

import pytest
import torch

from p2pllm.pillars.federated.aggregate import AggregationError, FedAvgM, aggregate, validate_update

torch.set_num_threads(1)


def adapter(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q_proj.lora_A": torch.randn(4, 16, generator=gen).to(dtype),
        "layers.0.q_proj.lora_B": torch.randn(16, 4, generator=gen).to(dtype),
        "layers.1.v_proj.lora_A": torch.randn(4, 16, generator=gen).to(dtype),
    }


# ---------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_aggregate_is_the_example_weighted_mean(dtype: torch.dtype) -> None:
    # Prepare: three clients with unequal example counts
    updates = [adapter(s, dtype) for s in (1, 2, 3)]
    counts = [10, 30, 60]
    # Execute
    out = aggregate(list(zip(updates, counts, strict=True)))
    # Assert: against the directly computed weighted mean (float64, then cast)
    assert set(out) == set(updates[0])
    for key in out:
        direct = sum(n * u[key].double() for u, n in zip(updates, counts, strict=True)) / sum(
            counts
        )
        assert isinstance(direct, torch.Tensor)
        assert out[key].dtype == dtype and out[key].shape == updates[0][key].shape
        torch.testing.assert_close(out[key], direct.to(dtype), rtol=0, atol=0)
        # and not the unweighted mean
        plain = sum(u[key].double() for u in updates) / len(updates)
        assert isinstance(plain, torch.Tensor)
        assert not torch.allclose(out[key].double(), plain, atol=1e-3)


def test_aggregate_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([4.0, 8.0])}
    out = aggregate([(a, 1), (b, 2)])
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 6.0]))


def test_aggregate_single_client_and_identical_clients() -> None:
    u = adapter(5)
    torch.testing.assert_close(aggregate([(u, 7)]), u, rtol=0, atol=0)
    torch.testing.assert_close(aggregate([(u, 3), (adapter(5), 1000)]), u, rtol=0, atol=0)


def test_aggregate_accumulates_in_float64() -> None:
    # A float32 accumulation of these values loses the small one entirely.
    big, small = {"w": torch.tensor([1e8], dtype=torch.float32)}, {"w": torch.tensor([1.0])}
    out = aggregate([(big, 1), (small, 1), ({"w": torch.tensor([-1e8])}, 1)])
    assert float(out["w"]) == pytest.approx(1 / 3, rel=1e-6)


def test_aggregate_returns_new_tensors_and_leaves_inputs_alone() -> None:
    u, v = adapter(1), adapter(2)
    before = {k: t.clone() for k, t in u.items()}
    out = aggregate([(u, 1), (v, 1)])
    for key in out:
        out[key].add_(1.0)
    torch.testing.assert_close(u, before, rtol=0, atol=0)
    solo = aggregate([(u, 1)])
    assert all(solo[k].data_ptr() != u[k].data_ptr() for k in u)


def test_aggregate_rejects_empty_input() -> None:
    with pytest.raises(AggregationError, match="no results"):
        aggregate([])


@pytest.mark.parametrize("count", [0, -3, 2.5, True, "10"])
def test_aggregate_rejects_bad_counts(count: object) -> None:
    with pytest.raises(AggregationError, match="client 1: num_examples") as info:
        aggregate([(adapter(1), 5), (adapter(2), count)])  # type: ignore[list-item]
    assert info.value.client == 1


def _missing(u: dict[str, torch.Tensor]) -> None:
    del u["layers.0.q_proj.lora_B"]


def _extra(u: dict[str, torch.Tensor]) -> None:
    u["layers.9.k_proj.lora_A"] = torch.zeros(2)


def _shape(u: dict[str, torch.Tensor]) -> None:
    u["layers.0.q_proj.lora_B"] = torch.zeros(16, 8)


def _dtype(u: dict[str, torch.Tensor]) -> None:
    u["layers.0.q_proj.lora_B"] = u["layers.0.q_proj.lora_B"].double()


def _nan(u: dict[str, torch.Tensor]) -> None:
    u["layers.0.q_proj.lora_B"][3, 1] = float("nan")


def _inf(u: dict[str, torch.Tensor]) -> None:
    u["layers.0.q_proj.lora_B"][0, 0] = float("-inf")


def _not_tensor(u: dict[str, torch.Tensor]) -> None:
    u["layers.0.q_proj.lora_B"] = [[0.0]]  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("corrupt", "key", "match"),
    [
        (_missing, "layers.0.q_proj.lora_B", "missing keys"),
        (_extra, "layers.9.k_proj.lora_A", "unexpected keys"),
        (_shape, "layers.0.q_proj.lora_B", r"shape \(16, 8\) differs from expected \(16, 4\)"),
        (_dtype, "layers.0.q_proj.lora_B", "dtype torch.float64 differs"),
        (_nan, "layers.0.q_proj.lora_B", "NaN or Inf"),
        (_inf, "layers.0.q_proj.lora_B", "NaN or Inf"),
        (_not_tensor, "layers.0.q_proj.lora_B", "expected a tensor"),
    ],
)
def test_aggregate_and_validate_name_client_and_key(corrupt, key: str, match: str) -> None:  # type: ignore[no-untyped-def]
    bad = adapter(3)
    corrupt(bad)
    results = [(adapter(1), 4), (adapter(2), 4), (bad, 4)]
    with pytest.raises(AggregationError, match=match) as info:
        aggregate(results)
    assert info.value.client == 2 and info.value.key == key
    assert f"client 2, key {key!r}" in str(info.value)
    assert isinstance(info.value, ValueError)
    # the same check on its own, as the coordinator runs it per client
    with pytest.raises(AggregationError, match=match):
        validate_update(bad, adapter(0), client=2)


def test_first_client_is_checked_too() -> None:
    bad = adapter(1)
    _nan(bad)
    with pytest.raises(AggregationError, match="client 0, key") as info:
        aggregate([(bad, 1), (adapter(2), 1)])
    assert info.value.client == 0


def test_validate_update_accepts_a_good_update_and_rejects_integer_tensors() -> None:
    validate_update(adapter(1), adapter(2))
    ints = {"step": torch.tensor([3])}
    with pytest.raises(AggregationError, match="not floating point"):
        validate_update(ints, ints)
    with pytest.raises(AggregationError, match="mapping"):
        validate_update([1, 2], adapter(1))  # type: ignore[arg-type]


def test_malformed_result_entry() -> None:
    with pytest.raises(AggregationError, match="client 0: each result"):
        aggregate([adapter(1)])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# FedAvgM
# ---------------------------------------------------------------------------------------------


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg() -> None:
    global_params = adapter(0)
    results = [(adapter(1), 3), (adapter(2), 9)]
    avg = aggregate(results)
    new, velocity = FedAvgM(server_lr=1.0, momentum=0.0).step(global_params, avg)
    torch.testing.assert_close(new, avg, rtol=0, atol=1e-6)
    # and again, with a velocity carried over: momentum 0 ignores it
    new2, _ = FedAvgM(server_lr=1.0, momentum=0.0).step(new, aggregate(results), velocity)
    torch.testing.assert_close(new2, avg, rtol=0, atol=1e-6)


def test_fedavgm_momentum_matches_the_recurrence() -> None:
    # Prepare: two rounds by hand; Δ = g − agg, v' = βv + Δ, g' = g − lr·v'
    opt = FedAvgM(server_lr=0.5, momentum=0.9)
    g0 = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    a1 = {"w": torch.tensor([0.0, 0.0], dtype=torch.float64)}
    a2 = {"w": torch.tensor([2.0, 2.0], dtype=torch.float64)}
    # Execute
    g1, v1 = opt.step(g0, a1)
    g2, v2 = opt.step(g1, a2, v1)
    # Assert
    d1 = g0["w"] - a1["w"]
    torch.testing.assert_close(v1["w"], d1)
    torch.testing.assert_close(g1["w"], g0["w"] - 0.5 * d1)
    d2 = g1["w"] - a2["w"]
    torch.testing.assert_close(v2["w"], 0.9 * d1 + d2)
    torch.testing.assert_close(g2["w"], g1["w"] - 0.5 * (0.9 * d1 + d2))


def test_fedavgm_is_pure_and_keeps_dtypes() -> None:
    g = adapter(0, torch.bfloat16)
    agg = adapter(1, torch.bfloat16)
    g_before = {k: t.clone() for k, t in g.items()}
    new, velocity = FedAvgM(momentum=0.5).step(g, agg)
    torch.testing.assert_close(g, g_before, rtol=0, atol=0)
    assert all(new[k].dtype == torch.bfloat16 for k in new)
    assert all(velocity[k].dtype == torch.float32 for k in velocity)  # velocity kept in ≥ fp32
    new2, _ = FedAvgM(momentum=0.5).step(new, agg, velocity)
    assert set(new2) == set(g)


def test_fedavgm_rejects_bad_inputs() -> None:
    g = adapter(0)
    bad = adapter(1)
    _shape(bad)
    with pytest.raises(AggregationError, match="shape"):
        FedAvgM().step(g, bad)
    _, velocity = FedAvgM().step(g, adapter(1))
    with pytest.raises(AggregationError, match="dtype"):
        FedAvgM().step(g, adapter(1), {k: v.double() for k, v in velocity.items()})
    with pytest.raises(AggregationError, match="missing keys"):
        FedAvgM().step(g, adapter(1), {})


@pytest.mark.parametrize(("lr", "beta"), [(0.0, 0.9), (-1.0, 0.9), (1.0, 1.0), (1.0, -0.1)])
def test_fedavgm_rejects_bad_config(lr: float, beta: float) -> None:
    with pytest.raises(ValueError):
        FedAvgM(server_lr=lr, momentum=beta)
