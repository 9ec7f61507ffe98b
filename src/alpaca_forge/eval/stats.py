"""The statistics of a comparison, as small pure functions on arrays.

A comparison's unit is the item (an instruction), not the judgement: the two orders of one item
are one observation, so every interval resamples items, never rows (resampling rows would treat
the two orders as independent and make the interval too narrow). Scores are from system A's
side: 1 a win, 0.5 a tie, 0 a loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054  # the normal quantile at 0.975
Z_80 = 0.8416212335729143  # ... at 0.8 (80% power)


@dataclass(frozen=True)
class Estimate:
    value: float | None  # None where there is nothing to estimate from
    low: float | None = None  # the 95% interval
    high: float | None = None


def win_rate(scores: Sequence[float]) -> float | None:
    """Wins plus half the ties, over the items judged."""
    return float(np.mean(scores)) if len(scores) else None


def bootstrap_mean(scores: Sequence[float], *, samples: int = 2000, seed: int = 0) -> Estimate:
    """The mean and its 95% percentile interval, resampling items with replacement."""
    x = np.asarray(scores, dtype=float)
    if not len(x):
        return Estimate(None)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(lo), float(hi))


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test: ties dropped, wins ~ Binomial(wins + losses, 1/2)."""
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error at most alpha over all the tests."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def detectable_points(n: int, sd: float = 0.5) -> float | None:
    """The smallest distance of a win rate from 50%, in points, that `n` items tell apart from a
    tie (two-sided 5% test, 80% power): (z_0.975 + z_0.8) * sd / sqrt(n). `sd` is the spread of one
    item's score (0.5 with no ties; ties make it smaller)."""
    return 100 * (Z_95 + Z_80) * sd / math.sqrt(n) if n else None


def score_sd(scores: Sequence[float]) -> float:
    """The spread of one item's score; 0.5 (its largest) where there are too few to tell."""
    return float(np.std(scores)) if len(scores) > 1 and np.std(scores) > 0 else 0.5


# ---------------------------------------------------------------------------------------------
# Length control


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def fit_logistic(X: np.ndarray, y: np.ndarray, *, ridge: float = 1e-2, iterations: int = 50) -> np.ndarray:
    """Logistic regression by Newton's method on (possibly fractional) outcomes y in [0, 1]: a tie
    is y = 0.5, half a win. A small ridge keeps the fit finite when one side always wins."""
    w = np.zeros(X.shape[1])
    eye = ridge * np.eye(X.shape[1])
    for _ in range(iterations):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - eye @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + eye
        step = np.linalg.solve(hess, grad)
        w += step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


@dataclass(frozen=True)
class LengthControlled:
    win_rate: Estimate  # at equal length (and averaged over the slot)
    length_coef: float | None  # the log-odds per unit of log length ratio: > 0 = the judge likes longer
    slot_coef: float | None  # the log-odds of being shown first: > 0 = the judge likes slot A


def length_features(len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
    """The length difference the preference is modelled on: log(len_a / len_b), in characters
    (+1 so an empty answer is finite): scale-free, so "twice as long" weighs the same for a
    20-word answer as for a 500-word one."""
    return np.log1p(len_a) - np.log1p(len_b)


def length_controlled(
    y: Sequence[float],
    dlen: Sequence[float],
    slot: Sequence[float],
    item: Sequence[int],
    *,
    samples: int = 1000,
    seed: int = 0,
) -> LengthControlled:
    """The win rate of A at zero length difference, from one row per judgement:

        logit P(A preferred) = theta + beta * dlen + gamma * slot

    with `dlen` = log length ratio A/B, `slot` = +1 where A was shown first, -1 where second
    (0 when unknown). The length-controlled win rate is sigmoid(theta): what the judge would say
    if the answers were equally long and the order balanced. Its interval comes from a bootstrap
    over items (all rows of an item together) that refits the model each time. Per-item effects
    are not in the model: with two systems each item is one comparison, so an item's own effect
    cannot be told from its outcome.
    """
    y_, d_, s_, g_ = (np.asarray(v, dtype=float) for v in (y, dlen, slot, item))
    if not len(y_):
        return LengthControlled(Estimate(None), None, None)
    use_slot = bool(np.any(s_ != 0))
    X = np.column_stack([np.ones_like(d_), d_] + ([s_] if use_slot else []))
    w = fit_logistic(X, y_)
    groups = np.unique(g_)
    rows_of = [np.flatnonzero(g_ == g) for g in groups]
    rng = np.random.default_rng(seed)
    thetas = []
    for _ in range(samples):
        pick = rng.integers(0, len(groups), size=len(groups))
        idx = np.concatenate([rows_of[k] for k in pick])
        thetas.append(fit_logistic(X[idx], y_[idx])[0])
    lo, hi = np.percentile(_sigmoid(np.asarray(thetas)), [2.5, 97.5])
    return LengthControlled(
        Estimate(float(_sigmoid(w[0])), float(lo), float(hi)),
        float(w[1]),
        float(w[2]) if use_slot else None,
    )


# ---------------------------------------------------------------------------------------------
# Several systems: Bradley-Terry


def bradley_terry(
    wins: np.ndarray, *, prior: float = 0.5, iterations: int = 10_000, tol: float = 1e-10
) -> np.ndarray:
    """Log-strengths (mean 0) of K systems from `wins[i, j]`: how often i beat j (ties count half
    to each). Fitted by the minorise-maximise updates of Hunter (2004). `prior` adds that many
    ties to every pair that met, so a system that won (or lost) every comparison gets a finite
    strength; with hundreds of items it moves the result by a fraction of a point."""
    w = np.asarray(wins, dtype=float)
    k = w.shape[0]
    met = (w + w.T) > 0
    w = w + prior * met
    n = w + w.T
    total = w.sum(axis=1)
    p = np.ones(k)
    for _ in range(iterations):
        denom = (n / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1), p)
        new = new / np.exp(np.mean(np.log(new)))
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    return np.log(p)


def bt_win_probability(theta_i: float, theta_j: float) -> float:
    return 1 / (1 + math.exp(theta_j - theta_i))


# ---------------------------------------------------------------------------------------------
# Agreement


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Agreement of two raters on the same items beyond chance: (p_o - p_e) / (1 - p_e)."""
    if len(first) != len(second):
        raise ValueError("two raters' labels must be of the same items")
    if not first:
        return None
    labels = sorted(set(first) | set(second))
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    expected = sum((list(first).count(lab) / n) * (list(second).count(lab) / n) for lab in labels)
    if expected >= 1:
        return 1.0 if observed >= 1 else None  # one label only, on both sides: agreement is total
    return (observed - expected) / (1 - expected)
