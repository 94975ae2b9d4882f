"""Tests for the pure speculative-sampling acceptance rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from p2pllm.pillars.speculative import acceptance
from p2pllm.pillars.speculative.acceptance import (
    AdaptiveWindow,
    SparseDist,
    acceptance_probabilities,
    densify,
    expected_speedup,
    expected_tokens_per_round,
    residual_distribution,
    sample_sparse,
    to_sparse,
    verify_greedy,
    verify_sampled,
)

torch.set_num_threads(1)

# Upper 0.1% quantiles of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def random_dist(vocab: int, gen: torch.Generator, *, zeros: int = 0) -> torch.Tensor:
    """A random distribution over `vocab` tokens, with `zeros` entries forced to zero. (V,)"""
    w = torch.rand(vocab, generator=gen, dtype=torch.float64) ** 2 + 0.01
    if zeros:
        w[torch.randperm(vocab, generator=gen)[:zeros]] = 0.0
    return w / w.sum()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over cells with positive expected count; returns (stat, dof)."""
    total = float(counts.sum())
    expected = probs.to(torch.float64) * total
    cells = expected > 0
    assert int(counts[~cells].sum()) == 0, "a token with probability 0 was emitted"
    stat = float((((counts[cells] - expected[cells]) ** 2) / expected[cells]).sum())
    return stat, int(cells.sum()) - 1


# ---------------------------------------------------------------------------------------------
# SparseDist, to_sparse, densify
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "probs", "match"),
    [
        (torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]), "1-D"),
        (torch.tensor([0, 1]), torch.tensor([1.0]), "2 ids but 1 probs"),
        (torch.tensor([], dtype=torch.long), torch.tensor([]), "at least one"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), "integer"),
        (torch.tensor([0, 1]), torch.tensor([1, 1]), "floating"),
        (torch.tensor([0, 1]), torch.tensor([0.5, float("nan")]), "NaN"),
        (torch.tensor([0, 1]), torch.tensor([1.5, -0.5]), "non-negative"),
        (torch.tensor([0, 1]), torch.tensor([0.0, 0.0]), "sum to zero"),
        (torch.tensor([-1, 1]), torch.tensor([0.5, 0.5]), "non-negative"),
        (torch.tensor([3, 3]), torch.tensor([0.5, 0.5]), "distinct"),
    ],
)
def test_sparse_dist_rejects_bad_input(ids: torch.Tensor, probs: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseDist(ids, probs)


def test_sparse_dist_normalizes_and_looks_up() -> None:
    q = SparseDist(torch.tensor([5, 2]), torch.tensor([3.0, 1.0]))
    assert q.k == 2
    assert q.prob(5) == pytest.approx(0.75)
    assert q.prob(2) == pytest.approx(0.25)
    assert q.prob(0) == 0.0
    assert float(q.normalized().sum()) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        q.check_vocab(5)


def test_to_sparse_keeps_top_k_renormalised() -> None:
    q = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    s = to_sparse(q, 2)
    assert s.ids.tolist() == [1, 3]
    assert s.ids.dtype == torch.int64 and s.probs.dtype == torch.float32
    torch.testing.assert_close(s.probs, torch.tensor([4 / 7, 3 / 7]))
    torch.testing.assert_close(
        densify(s, 5), torch.tensor([0, 4 / 7, 0, 3 / 7, 0], dtype=torch.float64)
    )


@pytest.mark.parametrize("k", [0, 4, 100])
def test_to_sparse_full_support_round_trips(k: int) -> None:
    q = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    s = to_sparse(q, k)
    assert s.k == 4  # zero entries are never sent
    assert sorted(s.ids.tolist()) == [0, 1, 3, 4]
    torch.testing.assert_close(densify(s, 5, torch.float32), q)


def test_to_sparse_and_densify_errors() -> None:
    with pytest.raises(ValueError, match="k must be"):
        to_sparse(torch.tensor([0.5, 0.5]), -1)
    with pytest.raises(ValueError, match="NaN"):
        to_sparse(torch.tensor([0.5, float("inf")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        to_sparse(torch.full((2, 2), 0.25), 1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        densify(SparseDist(torch.tensor([0, 9]), torch.tensor([0.5, 0.5])), 4)


def test_sample_sparse_draws_only_from_support_with_its_probs() -> None:
    q = SparseDist(torch.tensor([7, 2, 4]), torch.tensor([0.5, 0.3, 0.2]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_sparse(q, gen) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=8).to(torch.float64)
    stat, dof = chi_square(counts, densify(q, 8))
    assert stat < CHI2_999[dof]


# ---------------------------------------------------------------------------------------------
# Greedy verification
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([5, 6, 7], [5, 6, 7, 8], (3, 8)),  # all accepted, bonus token
        ([5, 6, 7], [5, 9, 7, 8], (1, 9)),  # correction at position 1
        ([5, 6, 7], [1, 6, 7, 8], (0, 1)),  # rejected at once
        ([5, 6, 7], [5, 6, 2, 8], (2, 2)),  # rejected at the last drafted token
        ([], [4], (0, 4)),  # empty window: just the target's next token
    ],
)
def test_verify_greedy(draft: list[int], target: list[int], expected: tuple[int, int]) -> None:
    assert verify_greedy(draft, target) == expected
    assert verify_greedy(torch.tensor(draft, dtype=torch.long), torch.tensor(target)) == expected


@pytest.mark.parametrize("target", [[5, 6, 7], [5, 6, 7, 8, 9]])
def test_verify_greedy_rejects_wrong_length(target: list[int]) -> None:
    with pytest.raises(ValueError, match="needs 4 entries"):
        verify_greedy([5, 6, 7], target)


# ---------------------------------------------------------------------------------------------
# Analytic marginal: the rule reproduces p exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "case", ["dense", "sparse_top3", "q_zeros", "p_zeros", "float32", "sparse_k0"]
)
def test_analytic_marginal_equals_p(seed: int, case: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = 8
    p = random_dist(vocab, gen, zeros=3 if case == "p_zeros" else 0)
    q_dense = random_dist(vocab, gen, zeros=3 if case == "q_zeros" else 0)
    q: torch.Tensor | SparseDist = q_dense
    if case == "sparse_top3":
        q = to_sparse(q_dense, 3)
    elif case == "sparse_k0":
        q = to_sparse(q_dense, 0)
    elif case == "float32":
        p, q = p.float(), q_dense.float()

    stats = acceptance_probabilities(p, q)

    q_used = densify(q, vocab) if isinstance(q, SparseDist) else q.double() / q.double().sum()
    p_used = p.double() / p.double().sum()
    torch.testing.assert_close(stats.marginal, p_used, rtol=0, atol=1e-9)
    assert stats.accept_rate == pytest.approx(float(torch.minimum(p_used, q_used).sum()), abs=1e-12)
    assert bool((stats.accept >= 0).all()) and bool((stats.accept <= 1).all())
    assert float(stats.residual.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_analytic_marginal_edge_distributions(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    p = random_dist(6, gen)
    # q == p: everything accepted, residual falls back to p
    same = acceptance_probabilities(p, p)
    assert same.accept_rate == pytest.approx(1.0)
    torch.testing.assert_close(same.residual, p)
    torch.testing.assert_close(same.marginal, p)
    # disjoint supports: nothing accepted, the residual is p itself
    p2 = torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    q2 = torch.tensor([0, 0, 0.2, 0.2, 0.3, 0.3], dtype=torch.float64)
    disjoint = acceptance_probabilities(p2, q2)
    assert disjoint.accept_rate == 0.0
    torch.testing.assert_close(disjoint.marginal, p2)


def test_acceptance_probabilities_errors() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        acceptance_probabilities(torch.full((4,), 0.25), torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="1-D"):
        acceptance_probabilities(torch.full((2, 4), 0.25), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="negative"):
        acceptance_probabilities(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]))


def test_residual_distribution() -> None:
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    torch.testing.assert_close(
        residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(residual_distribution(p, p), p)  # all-zero residual → p
    # p ≤ q everywhere by float noise only: still a valid distribution (p)
    q_noisy = p + torch.tensor([1e-17, 1e-17, 0.0], dtype=torch.float64)
    torch.testing.assert_close(residual_distribution(p, q_noisy), p)


# ---------------------------------------------------------------------------------------------
# Empirical: verify_sampled itself, over many seeded draws
# ---------------------------------------------------------------------------------------------


def run_windows(
    p: torch.Tensor, q: list[SparseDist], trials: int, seed: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Draft from q and verify against p `trials` times; per-position emitted-token counts."""
    gamma, vocab = len(q), p.shape[1]
    draft_gen = torch.Generator().manual_seed(seed)
    verify_gen = torch.Generator().manual_seed(seed + 1)
    counts = [torch.zeros(vocab, dtype=torch.float64) for _ in range(gamma + 1)]
    accepted = []
    for _ in range(trials):
        draft = [sample_sparse(q_i, draft_gen) for q_i in q]
        n, nxt = verify_sampled(draft, q, p, verify_gen)
        assert 0 <= n <= gamma
        for j, tok in enumerate([*draft[:n], nxt]):
            counts[j][tok] += 1
        accepted.append(n)
    return counts, accepted


def make_window(seed: int, gamma: int, vocab: int, k: int) -> tuple[torch.Tensor, list[SparseDist]]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.stack([random_dist(vocab, gen) for _ in range(gamma + 1)]).float()  # (γ+1, V)
    q = [to_sparse(random_dist(vocab, gen), k) for _ in range(gamma)]
    return p, q


@pytest.mark.parametrize(("seed", "k"), [(11, 0), (12, 3), (13, 4)])
def test_empirical_output_distribution_matches_p(seed: int, k: int) -> None:
    # Prepare: target rows independent of context, so the token emitted at window position j,
    # given the round reaches j, must follow p[j]; q is the drafter's (top-k) sparse q.
    gamma, vocab, trials = 2, 6, 3000
    p, q = make_window(seed, gamma, vocab, k)
    # Execute
    counts, accepted = run_windows(p, q, trials, seed)
    # Assert: chi-square per position (deterministic: fixed seeds), and the acceptance rate
    for j in range(gamma + 1):
        if counts[j].sum() < 200:
            continue
        stat, dof = chi_square(counts[j], p[j].double() / p[j].double().sum())
        assert stat < CHI2_999[dof], f"position {j}: chi2 {stat:.1f} with {dof} dof"
        freq = counts[j] / counts[j].sum()
        assert float((freq - p[j].double()).abs().max()) < 0.05
    rate0 = sum(1 for n in accepted if n >= 1) / trials
    alpha0 = acceptance_probabilities(p[0], q[0]).accept_rate
    assert rate0 == pytest.approx(alpha0, abs=4 * math.sqrt(alpha0 * (1 - alpha0) / trials) + 1e-3)


def test_empirical_test_detects_a_wrong_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    # The empirical harness has power: resampling from p instead of norm(max(0, p − q)) after
    # a rejection biases the output, and the same chi-square check catches it.
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p / p.sum())
    p, q = make_window(12, 1, 6, 3)
    counts, _ = run_windows(p, q, 3000, 12)
    stat, dof = chi_square(counts[0], p[0].double() / p[0].double().sum())
    assert stat > CHI2_999[dof]


def test_mean_tokens_per_round_matches_theory() -> None:
    # Same p and q at every position: n is a truncated geometric with α = Σ min(p, q).
    gamma, vocab, trials = 3, 5, 3000
    gen = torch.Generator().manual_seed(3)
    p_row, q_row = random_dist(vocab, gen), random_dist(vocab, gen)
    p = p_row.expand(gamma + 1, vocab).clone()
    q = [to_sparse(q_row, 0)] * gamma
    _, accepted = run_windows(p, q, trials, 3)
    alpha = acceptance_probabilities(p_row, q_row).accept_rate
    mean_tokens = sum(n + 1 for n in accepted) / trials
    assert mean_tokens == pytest.approx(expected_tokens_per_round(alpha, gamma), rel=0.03)


# ---------------------------------------------------------------------------------------------
# verify_sampled: edge cases and errors
# ---------------------------------------------------------------------------------------------


def test_verify_sampled_accepts_everything_when_p_equals_q() -> None:
    gen = torch.Generator().manual_seed(0)
    row = random_dist(6, gen).float()
    q = to_sparse(row, 0)
    p = densify(q, 6).float().expand(4, 6).clone()  # exactly the q the drafter sampled from
    for _ in range(200):
        draft = [sample_sparse(q, gen) for _ in range(3)]
        n, _ = verify_sampled(draft, [q] * 3, p, gen)
        assert n == 3


def test_verify_sampled_never_accepts_a_token_the_target_forbids() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    q = SparseDist(torch.tensor([0]), torch.tensor([1.0]))  # the drafter always proposes 0
    outs = {verify_sampled([0], [q], p, gen) for _ in range(200)}
    assert {n for n, _ in outs} == {0}
    assert {t for _, t in outs} == {1, 2}


def test_verify_sampled_is_deterministic_given_the_generator() -> None:
    p, q = make_window(5, 3, 6, 0)
    draft = [int(q_i.ids[0]) for q_i in q]
    a = [verify_sampled(draft, q, p, torch.Generator().manual_seed(9)) for _ in range(3)]
    g = torch.Generator().manual_seed(9)
    b = [verify_sampled(draft, q, p, g) for _ in range(50)]
    assert a[0] == a[1] == a[2] == b[0]
    assert len(set(b)) > 1  # the generator advances


def test_verify_sampled_empty_window_samples_from_p() -> None:
    gen = torch.Generator().manual_seed(2)
    p = torch.tensor([[0.0, 1.0, 0.0]])
    assert verify_sampled([], [], p, gen) == (0, 1)


def test_verify_sampled_errors() -> None:
    p = torch.full((3, 4), 0.25)
    q = SparseDist(torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="q\\(x\\) = 0"):
        verify_sampled([0, 3], [q, q], p)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_sampled([0, 4], [q, q], p)
    with pytest.raises(ValueError, match="2 drafted tokens but 1"):
        verify_sampled([0, 1], [q], p)
    with pytest.raises(ValueError, match="shape \\(3, V\\)"):
        verify_sampled([0, 1], [q, q], torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="NaN"):
        verify_sampled([0, 1], [q, q], torch.tensor([[0.25] * 4, [0.25] * 4, [float("nan")] * 4]))
    with pytest.raises(ValueError, match="summing to zero"):
        verify_sampled([0, 1], [q, q], torch.zeros(3, 4))
    big = SparseDist(torch.tensor([0, 7]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_sampled([0, 1], [big, q], p)


# ---------------------------------------------------------------------------------------------
# Throughput model
# ---------------------------------------------------------------------------------------------


def test_expected_speedup_values() -> None:
    assert expected_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert expected_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)
    assert expected_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / (0.2 * 1.2))
    assert expected_speedup(0.5, 0, 0.3) == pytest.approx(1.0)
    # continuous at α → 1
    assert expected_speedup(1 - 1e-9, 6, 0.1) == pytest.approx(
        expected_speedup(1.0, 6, 0.1), rel=1e-6
    )
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("alpha", "gamma", "c"),
    [(-0.1, 3, 0.1), (1.1, 3, 0.1), (0.5, -1, 0.1), (0.5, 3, -1.0), (0.5, 3, math.nan)],
)
def test_expected_speedup_rejects_bad_arguments(alpha: float, gamma: int, c: float) -> None:
    with pytest.raises(ValueError):
        expected_speedup(alpha, gamma, c)


# ---------------------------------------------------------------------------------------------
# AdaptiveWindow
# ---------------------------------------------------------------------------------------------


def test_adaptive_window_grows_on_full_acceptance_up_to_max() -> None:
    w = AdaptiveWindow(4, min_window=2, max_window=8)
    seen = [4] + [w.update(w.window, w.window) for _ in range(10)]
    assert all(b > a or a == b == 8 for a, b in itertools.pairwise(seen))
    assert seen[-1] == 8
    assert w.alpha > 0.95


def test_adaptive_window_shrinks_on_early_rejection_down_to_min() -> None:
    w = AdaptiveWindow(8, min_window=2, max_window=8)
    seen = [w.update(w.window, 0) for _ in range(10)]
    assert seen[0] < 8
    assert all(b <= a for a, b in itertools.pairwise(seen))
    assert seen[-1] == 2
    assert w.alpha < 0.1


def test_adaptive_window_never_grows_after_a_rejection_nor_shrinks_after_full_acceptance() -> None:
    gen = torch.Generator().manual_seed(4)
    w = AdaptiveWindow(4, min_window=1, max_window=12)
    for _ in range(300):
        before = w.window
        drafted = before
        accepted = int(torch.randint(0, drafted + 1, (), generator=gen))
        after = w.update(drafted, accepted)
        assert 1 <= after <= 12
        if accepted == drafted:
            assert after >= min(before + 1, 12)
        else:
            assert after <= before
            if 2 * accepted < drafted:
                assert after <= max(before - 1, 1)


@pytest.mark.parametrize(("alpha", "low", "high"), [(0.95, 8, 16), (0.5, 1, 3)])
def test_adaptive_window_tracks_the_acceptance_rate(alpha: float, low: int, high: int) -> None:
    # Simulate i.i.d. per-token acceptance with probability α: the estimate converges to α
    # (the censored-geometric estimate is unbiased by the window) and the window settles
    # around the speedup-optimal value for α.
    gen = torch.Generator().manual_seed(8)
    w = AdaptiveWindow(4, min_window=1, max_window=16, cost_ratio=0.05, decay=0.98)
    windows, alphas = [], []
    for _ in range(400):
        drafted = w.window
        accepted = 0
        while accepted < drafted and float(torch.rand((), generator=gen)) < alpha:
            accepted += 1
        windows.append(w.update(drafted, accepted))
        alphas.append(w.alpha)
    tail = windows[200:]
    assert low <= sum(tail) / len(tail) <= high
    assert sum(alphas[200:]) / 200 == pytest.approx(alpha, abs=0.04)


def test_adaptive_window_is_deterministic_and_uses_cost_ratio() -> None:
    rounds = [(4, 4), (5, 1), (4, 4), (5, 5), (6, 0), (5, 3)]
    a, b = AdaptiveWindow(4), AdaptiveWindow(4)
    assert [a.update(d, n) for d, n in rounds] == [b.update(d, n) for d, n in rounds]
    cheap = AdaptiveWindow(4, cost_ratio=0.0, prior_alpha=0.6)
    dear = AdaptiveWindow(4, cost_ratio=0.5, prior_alpha=0.6)
    assert cheap.target() > dear.target()
    dear.update(4, 4, cost_ratio=0.0)
    assert dear.cost_ratio == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": 20},
        {"min_window": 0},
        {"min_window": 5, "max_window": 4},
        {"decay": 1.0},
        {"prior_alpha": 1.5},
        {"prior_weight": 0.0},
        {"cost_ratio": -0.1},
    ],
)
def test_adaptive_window_rejects_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveWindow(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("drafted", "accepted"), [(0, 0), (3, 4), (3, -1)])
def test_adaptive_window_rejects_bad_update(drafted: int, accepted: int) -> None:
    with pytest.raises(ValueError):
        AdaptiveWindow().update(drafted, accepted)
