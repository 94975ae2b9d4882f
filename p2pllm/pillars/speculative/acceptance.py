"""Exact speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

Pure tensor code: no sockets, no models. The verifier calls :func:`verify_greedy` or
:func:`verify_sampled` on the target's output for one drafted window; the drafter uses
:func:`to_sparse` and :func:`sample_sparse` to produce exactly the ``q`` it sends.

The rule, for a window of drafted tokens x_0 .. x_{γ-1} with draft distributions q_i and target
distributions p_0 .. p_γ (one more than drafted):

1. for i = 0 .. γ-1: accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
2. at the first rejection, emit a token sampled from norm(max(0, p_i − q_i)) and stop;
3. if all γ were accepted, emit one more token sampled from p_γ.

Every emitted token is then distributed exactly as the target's own sampling would be.

What crosses the wire: the drafter samples each x_i from a *sparse* q_i (its top-k, renormalised,
or its whole support when the vocabulary is small) and sends that q_i as k (token id, prob) pairs,
a :class:`SparseDist`. Exactness needs one invariant, which is the drafter's duty: **x_i must be
sampled from exactly the SparseDist that is sent**, with the same numbers (after any cast the wire
applies, e.g. float32 → float16: cast first, then sample). Both sides interpret a SparseDist as
``probs / probs.sum()`` computed in float64 (:meth:`SparseDist.normalized`), so a sum that is off
by float rounding changes nothing. Truncating q to top-k does not bias the output: the rule is
exact for any q the drafter really sampled from; it only lowers the acceptance rate by the
probability mass dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AcceptanceStats",
    "AdaptiveWindow",
    "SparseDist",
    "acceptance_probabilities",
    "densify",
    "expected_speedup",
    "expected_tokens_per_round",
    "residual_distribution",
    "sample_sparse",
    "to_sparse",
    "verify_greedy",
    "verify_sampled",
]


# ---------------------------------------------------------------------------------------------
# Sparse draft distributions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseDist:
    """A draft distribution q over the vocabulary, zero outside ``ids``.

    ``ids``: integer tensor (k,), distinct, non-negative. ``probs``: floating tensor (k,),
    finite, non-negative, positive sum; interpreted as ``probs / probs.sum()``.
    Built from peer bytes, so every check raises ``ValueError``.
    """

    ids: Tensor
    probs: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.ids, Tensor) or not isinstance(self.probs, Tensor):
            raise ValueError("SparseDist: ids and probs must be tensors")
        if self.ids.dim() != 1 or self.probs.dim() != 1:
            raise ValueError(
                f"SparseDist: ids and probs must be 1-D, got shapes "
                f"{tuple(self.ids.shape)} and {tuple(self.probs.shape)}"
            )
        if self.ids.numel() != self.probs.numel():
            raise ValueError(f"SparseDist: {self.ids.numel()} ids but {self.probs.numel()} probs")
        if self.ids.numel() == 0:
            raise ValueError("SparseDist: needs at least one entry")
        if (
            self.ids.dtype.is_floating_point
            or self.ids.dtype.is_complex
            or self.ids.dtype == torch.bool
        ):
            raise ValueError(f"SparseDist: ids must be an integer tensor, got {self.ids.dtype}")
        if not self.probs.dtype.is_floating_point:
            raise ValueError(f"SparseDist: probs must be floating point, got {self.probs.dtype}")
        if not bool(torch.isfinite(self.probs).all()):
            raise ValueError("SparseDist: probs contain NaN or Inf")
        if bool((self.probs < 0).any()):
            raise ValueError("SparseDist: probs must be non-negative")
        if not float(self.probs.double().sum()) > 0.0:
            raise ValueError("SparseDist: probs sum to zero")
        if int(self.ids.min()) < 0:
            raise ValueError("SparseDist: token ids must be non-negative")
        if torch.unique(self.ids).numel() != self.ids.numel():
            raise ValueError("SparseDist: token ids must be distinct")

    @property
    def k(self) -> int:
        """Number of entries."""
        return self.ids.numel()

    def normalized(self) -> Tensor:
        """The probabilities as both sides use them: float64, summing to 1. Shape (k,)."""
        p = self.probs.detach().to(torch.float64)
        return p / p.sum()

    def prob(self, token: int) -> float:
        """q(token) after normalisation; 0.0 for a token outside ``ids``."""
        hit = (self.ids == int(token)).nonzero()
        if hit.numel() == 0:
            return 0.0
        return float(self.normalized()[int(hit[0, 0])])

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if an id is outside ``[0, vocab_size)``."""
        top = int(self.ids.max())
        if top >= vocab_size:
            raise ValueError(f"SparseDist: token id {top} is outside the vocabulary ({vocab_size})")


def to_sparse(q_dense: Tensor, k: int) -> SparseDist:
    """Truncate a dense draft distribution (V,) to its top-k entries and renormalise.

    ``k == 0`` (or k at least the support size) keeps every nonzero entry, which makes the sparse
    q identical to the dense one. Entries are ordered by decreasing probability; probs are
    float32 (the wire format), ids int64. The drafter must then sample from the result
    (:func:`sample_sparse`), not from ``q_dense``.
    """
    if k < 0:
        raise ValueError(f"to_sparse: k must be >= 0, got {k}")
    if q_dense.dim() != 1:
        raise ValueError(f"to_sparse: q_dense must be 1-D (V,), got shape {tuple(q_dense.shape)}")
    q = _check_dist(q_dense, "q_dense")  # (V,) float64, sums to 1
    support = int((q > 0).sum())
    keep = support if k == 0 else min(k, support)
    vals, ids = torch.topk(q, keep)  # (keep,), descending
    probs = (vals / vals.sum()).to(torch.float32)
    nonzero = probs > 0  # a float64 value can underflow in float32
    return SparseDist(ids=ids[nonzero].to(torch.int64), probs=probs[nonzero])


def densify(sparse: SparseDist, vocab_size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense (vocab_size,) distribution that ``sparse`` stands for, normalised."""
    sparse.check_vocab(vocab_size)
    out = torch.zeros(vocab_size, dtype=torch.float64, device=sparse.probs.device)
    out[sparse.ids.to(torch.int64)] = sparse.normalized()
    return out.to(dtype)


def sample_sparse(q: SparseDist, generator: torch.Generator | None = None) -> int:
    """Draw one token id from ``q`` exactly as the verifier will interpret it."""
    idx = torch.multinomial(q.normalized(), 1, generator=generator)
    return int(q.ids[idx])


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def verify_greedy(
    draft_tokens: Sequence[int] | Tensor, target_argmax: Sequence[int] | Tensor
) -> tuple[int, int]:
    """Greedy verification: ``(n, next_token)``.

    n = length of the longest prefix of ``draft_tokens`` equal to ``target_argmax``;
    next_token = ``target_argmax[n]`` (the correction, or the bonus token if all match).
    ``target_argmax`` has one entry per drafted token plus one.
    """
    draft = _as_ints(draft_tokens)
    target = _as_ints(target_argmax)
    if len(target) != len(draft) + 1:
        raise ValueError(
            f"verify_greedy: target_argmax needs {len(draft) + 1} entries "
            f"(drafted + 1), got {len(target)}"
        )
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n, target[n]


def verify_sampled(
    draft_tokens: Sequence[int] | Tensor,
    q: Sequence[SparseDist],
    p: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Exact rejection sampling over one window: ``(n, next_token)``.

    draft_tokens: γ ids the drafter sampled, x_i ~ q[i].
    q: γ SparseDist, the draft distributions sent with the window.
    p: (γ+1, V) target probabilities (after temperature etc.) at the window's positions.
    generator: the verifier's per-session CPU RNG; consumes one uniform per examined token and
        one categorical draw at the end. The decision runs on CPU in float64 whatever p's
        device, so it is reproducible across devices given the seed.

    Returns n accepted tokens and the token emitted after them (resampled from the residual
    at the first rejection, or sampled from p[γ] when all were accepted).
    Raises ``ValueError`` for inconsistent shapes, ids outside the vocabulary, or a drafted
    token that its own q gives probability 0 (the drafter cannot have sampled it).
    """
    draft = _as_ints(draft_tokens)
    gamma = len(draft)
    if len(q) != gamma:
        raise ValueError(f"verify_sampled: {gamma} drafted tokens but {len(q)} draft distributions")
    if p.dim() != 2 or p.shape[0] != gamma + 1:
        raise ValueError(
            f"verify_sampled: p must have shape ({gamma + 1}, V), got {tuple(p.shape)}"
        )
    vocab = p.shape[1]
    probs = _check_dist(p.detach().cpu(), "p")  # (γ+1, V) float64 on CPU, rows sum to 1

    # 0. validate the whole window before drawing anything: a bad window is an error whatever
    #    the random outcome would have been
    q_of_x = []
    for i, x in enumerate(draft):
        if not 0 <= x < vocab:
            raise ValueError(
                f"verify_sampled: drafted token {x} at position {i} is outside the vocabulary ({vocab})"
            )
        q[i].check_vocab(vocab)
        qx = q[i].prob(x)
        if qx <= 0.0:
            raise ValueError(
                f"verify_sampled: drafted token {x} at position {i} has q(x) = 0; "
                "the drafter must sample from the distribution it sends"
            )
        q_of_x.append(qx)

    for i, (x, qx) in enumerate(zip(draft, q_of_x, strict=True)):
        px = float(probs[i, x])
        # 1. accept with probability min(1, p(x)/q(x)): u ~ U[0, 1), accept iff u < p/q
        u = float(torch.rand((), dtype=torch.float64, generator=generator))
        if u < px / qx:
            continue
        # 2. first rejection: resample from norm(max(0, p - q)) and stop
        residual = residual_distribution(probs[i], densify(q[i], vocab).cpu())
        return i, _sample(residual, generator)
    # 3. all accepted: one more token from p[γ]
    return gamma, _sample(probs[gamma], generator)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p − q)) for dense (V,) distributions, in float64.

    Falls back to ``p`` when the residual is all zeros (p ≤ q everywhere, i.e. p == q up to
    rounding): the rule then rejects with probability 0, but float rounding may still land here.
    """
    p64 = p.to(torch.float64)
    r = torch.clamp(p64 - q.to(torch.float64), min=0.0)  # (V,)
    total = float(r.sum())
    if not total > 0.0:
        return p64 / p64.sum()
    return r / total


@dataclass(frozen=True, eq=False)
class AcceptanceStats:
    """What the rule does at one position, computed analytically (float64 tensors, shape (V,)).

    accept: per-token acceptance probability min(1, p/q) (0 off q's support).
    accept_rate: probability that the drafted token is accepted, Σ_x q(x)·accept(x) = Σ min(p, q).
    residual: the distribution sampled from after a rejection.
    marginal: distribution of the emitted token, q·accept + (1 − accept_rate)·residual; equals p.
    """

    accept: Tensor
    accept_rate: float
    residual: Tensor
    marginal: Tensor


def acceptance_probabilities(p: Tensor, q: Tensor | SparseDist) -> AcceptanceStats:
    """Analytic outcome of the rule for one position with target p (V,) and draft q.

    ``q`` is dense (V,) or a SparseDist. The mean of ``accept_rate`` over positions is the α that
    :func:`expected_speedup` takes.
    """
    p64 = _check_dist(p, "p")
    if p64.dim() != 1:
        raise ValueError(f"acceptance_probabilities: p must be 1-D, got shape {tuple(p.shape)}")
    vocab = p64.shape[0]
    q64 = densify(q, vocab) if isinstance(q, SparseDist) else _check_dist(q, "q")
    if q64.shape != p64.shape:
        raise ValueError(
            f"acceptance_probabilities: p and q shapes differ: {tuple(p64.shape)} vs {tuple(q64.shape)}"
        )
    on_support = q64 > 0
    ratio = p64 / torch.where(on_support, q64, torch.ones_like(q64))
    accept = torch.where(on_support, torch.clamp(ratio, max=1.0), torch.zeros_like(q64))
    accept_rate = float((q64 * accept).sum())
    residual = residual_distribution(p64, q64)
    marginal = q64 * accept + (1.0 - accept_rate) * residual
    return AcceptanceStats(
        accept=accept, accept_rate=accept_rate, residual=residual, marginal=marginal
    )


# ---------------------------------------------------------------------------------------------
# Throughput model and adaptive window
# ---------------------------------------------------------------------------------------------


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per round, (1 − α^(γ+1)) / (1 − α); γ + 1 when α = 1."""
    _check_alpha_gamma(alpha, gamma)
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Theoretical speedup over target-only decoding (Leviathan et al. 2023, Thm 3.8).

    (1 − α^(γ+1)) / ((1 − α)(γc + 1)), with α the per-token acceptance rate, γ the window and
    c the cost of one draft step relative to one target step. α = 1 gives (γ+1) / (γc + 1).
    """
    _check_alpha_gamma(alpha, gamma)
    if not (c >= 0.0 and math.isfinite(c)):
        raise ValueError(f"expected_speedup: c must be finite and >= 0, got {c}")
    return expected_tokens_per_round(alpha, gamma) / (gamma * c + 1.0)


class AdaptiveWindow:
    """Draft-window length that follows the observed acceptance (``--draft-tokens auto``).

    Policy, deterministic and bounded to [min_window, max_window]:

    1. Estimate α. Each verified token is a Bernoulli trial: the ``accepted`` tokens are
       successes, the rejected one (if any) a failure; tokens after it were never tried. α̂ is
       successes / trials with exponential forgetting (``decay`` per round), started from
       ``prior_weight`` pseudo-trials at ``prior_alpha``. This is the censored-geometric
       maximum-likelihood estimate, unbiased by the window length (a plain accepted/drafted
       ratio is not).
    2. target = the γ in bounds maximising :func:`expected_speedup` (α̂, γ, cost_ratio);
       the smallest such γ on ties.
    3. Move, never against the latest evidence:
       - window fully accepted → grow: max(target, window + 1);
       - rejected in the first half (2·accepted < drafted) → shrink: min(target, window − 1);
       - rejected later → min(target, window) (may shrink, never grows).

    ``update`` returns the next window; the drafter may also pass a fresh measured cost ratio.
    """

    def __init__(
        self,
        initial: int = 4,
        *,
        min_window: int = 1,
        max_window: int = 16,
        cost_ratio: float = 0.1,
        decay: float = 0.8,
        prior_alpha: float = 0.8,
        prior_weight: float = 2.0,
    ) -> None:
        if not 1 <= min_window <= max_window:
            raise ValueError(
                f"AdaptiveWindow: need 1 <= min_window <= max_window, got {min_window}, {max_window}"
            )
        if not min_window <= initial <= max_window:
            raise ValueError(
                f"AdaptiveWindow: initial {initial} outside [{min_window}, {max_window}]"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"AdaptiveWindow: decay must be in [0, 1), got {decay}")
        if not 0.0 <= prior_alpha <= 1.0:
            raise ValueError(f"AdaptiveWindow: prior_alpha must be in [0, 1], got {prior_alpha}")
        if not prior_weight > 0.0:
            raise ValueError(f"AdaptiveWindow: prior_weight must be > 0, got {prior_weight}")
        self._check_cost(cost_ratio)
        self.min_window = min_window
        self.max_window = max_window
        self.cost_ratio = cost_ratio
        self.decay = decay
        self._window = initial
        self._successes = prior_alpha * prior_weight
        self._trials = prior_weight

    @property
    def window(self) -> int:
        """The window to draft next."""
        return self._window

    @property
    def alpha(self) -> float:
        """Current estimate of the per-token acceptance rate."""
        return self._successes / self._trials

    def target(self) -> int:
        """The window that maximises the expected speedup at the current α̂."""
        alpha = min(1.0, max(0.0, self.alpha))
        best, best_speedup = self.min_window, -1.0
        for gamma in range(self.min_window, self.max_window + 1):
            s = expected_speedup(alpha, gamma, self.cost_ratio)
            if s > best_speedup * (1.0 + 1e-12):
                best, best_speedup = gamma, s
        return best

    def update(self, drafted: int, accepted: int, *, cost_ratio: float | None = None) -> int:
        """Record one verified window (``accepted`` of ``drafted``) and return the next window."""
        if drafted < 1:
            raise ValueError(f"AdaptiveWindow.update: drafted must be >= 1, got {drafted}")
        if not 0 <= accepted <= drafted:
            raise ValueError(f"AdaptiveWindow.update: accepted {accepted} outside [0, {drafted}]")
        if cost_ratio is not None:
            self._check_cost(cost_ratio)
            self.cost_ratio = cost_ratio
        # 1. censored-geometric estimate with forgetting
        rejected = accepted < drafted
        self._successes = self.decay * self._successes + accepted
        self._trials = self.decay * self._trials + accepted + int(rejected)
        # 2. best window for that estimate
        target = self.target()
        # 3. move consistently with this round
        if not rejected:
            nxt = max(target, self._window + 1)
        elif 2 * accepted < drafted:
            nxt = min(target, self._window - 1)
        else:
            nxt = min(target, self._window)
        self._window = max(self.min_window, min(self.max_window, nxt))
        return self._window

    @staticmethod
    def _check_cost(cost_ratio: float) -> None:
        if not (cost_ratio >= 0.0 and math.isfinite(cost_ratio)):
            raise ValueError(
                f"AdaptiveWindow: cost_ratio must be finite and >= 0, got {cost_ratio}"
            )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _as_ints(tokens: Sequence[int] | Tensor) -> list[int]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(tokens.shape)}")
        return [int(t) for t in tokens.tolist()]
    return [int(t) for t in tokens]


def _check_dist(probs: Tensor, name: str) -> Tensor:
    """Validate probabilities along the last dim; return them in float64, each row normalised."""
    if not isinstance(probs, Tensor) or not probs.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor")
    if probs.dim() == 0 or probs.shape[-1] == 0:
        raise ValueError(
            f"{name} must have a non-empty last dimension, got shape {tuple(probs.shape)}"
        )
    p = probs.detach().to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if bool((p < 0).any()):
        raise ValueError(f"{name} contains negative probabilities")
    sums = p.sum(dim=-1, keepdim=True)
    if not bool((sums > 0).all()):
        raise ValueError(f"{name} has a row summing to zero")
    return p / sums


def _sample(dist: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(dist, 1, generator=generator))


def _check_alpha_gamma(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
