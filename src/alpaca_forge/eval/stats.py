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


def detectable_points(
    items: int, tie_share: float = 0.0, *, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """The smallest distance of a win rate from 50%, in points, that `items` items with this share
    of ties tell apart from a tie: the exact two-sided sign test at `alpha` rejects with
    probability `power`. Ties carry no information for the test, so they shrink what it can see;
    None where too few items are decided for any difference to show."""
    from scipy.stats import binom, binomtest

    decided = round(items * (1 - tie_share))
    if decided < 1:
        return None
    # the fewest wins of `decided` that the test calls a difference
    k = next(
        (k for k in range((decided + 1) // 2, decided + 1) if binomtest(k, decided, 0.5).pvalue <= alpha),
        None,
    )
    if k is None:
        return None
    lo, hi = 0.5, 1.0  # the share of wins among decided items at which P(wins >= k) = power
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if binom.sf(k - 1, decided, mid) >= power else (mid, hi)
    return 100 * (hi - 0.5) * (1 - tie_share)


# ---------------------------------------------------------------------------------------------
# Length control


MAX_LOG_ODDS = 30.0  # a weight past it means certainty: sigmoid(30) = 1 - 1e-13


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -500, 500)))


def fit_logistic(X: np.ndarray, y: np.ndarray, *, ridge: float = 1e-2, iterations: int = 100) -> np.ndarray:
    """Logistic regression by Newton's method on (possibly fractional) outcomes y in [0, 1]: a tie
    is y = 0.5, half a win. A small ridge on every weight but the first (the intercept, left
    free so that it is not pulled to 50%) keeps the slopes finite on a bootstrap resample where
    one side always wins."""
    w = np.zeros(X.shape[1])
    penalty = ridge * np.eye(X.shape[1])
    penalty[0, 0] = 1e-8
    for _ in range(iterations):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p) - penalty @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + penalty
        step = np.linalg.solve(hess, grad)
        w = np.clip(w + step, -MAX_LOG_ODDS, MAX_LOG_ODDS)  # a resample one side always wins: stop there
        if np.max(np.abs(step)) < 1e-9:
            break
    return w


@dataclass(frozen=True)
class LengthControlled:
    win_rate: Estimate  # at equal length (and averaged over the slot); None when not estimable
    length_coef: float | None  # the log-odds per unit of log length ratio: > 0 = the judge likes longer
    slot_coef: float | None  # the log-odds of being shown first: > 0 = the judge likes slot A
    note: str | None = None  # why it could not be estimated


def length_features(len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
    """The length difference the preference is modelled on: log(len_a / len_b), in characters
    (+1 so an empty answer is finite): scale-free, so "twice as long" weighs the same for a
    20-word answer as for a 500-word one."""
    return np.log1p(len_a) - np.log1p(len_b)


MIN_LENGTH_SPREAD = 0.05  # in log length ratio (about 5%): below it, length explains nothing
# An effect past this (odds of ~150 to 1 across one spread of it) leaves the rest to a handful of
# verdicts: the equal-length rate is then theirs, not the judge's, and is not reported.
MAX_EFFECT_LOG_ODDS = 5.0


def _not_estimable(y: np.ndarray, d: np.ndarray) -> str | None:
    """Why the model cannot be read at equal length, or None when it can."""
    if len(y) < 10:
        return f"{len(y)} verdicts are too few to model"
    if np.all(y == y[0]):
        return "every verdict is the same, so nothing separates length from preference"
    if not (d.min() < 0 < d.max()) or d.std() < MIN_LENGTH_SPREAD:
        return (
            "equal length lies outside the lengths seen (one system is always the longer), "
            "so reading the model there would be a guess"
        )
    won, lost = d[y > 0.5], d[y < 0.5]
    if len(won) and len(lost) and (won.min() > lost.max() or won.max() < lost.min()):
        return (
            "length alone decides every verdict (the longer, or the shorter, answer always wins), "
            "so the preference at equal length is not identified"
        )
    return None


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
    cannot be told from its outcome. Where the data cannot show the preference at equal length
    (`_not_estimable`), the rate is None and `note` says why.
    """
    y_, d_, s_, g_ = (np.asarray(v, dtype=float) for v in (y, dlen, slot, item))
    why = _not_estimable(y_, d_) if len(y_) else "no verdict was read"
    if why:
        return LengthControlled(Estimate(None), None, None, why)
    use_slot = bool(np.any(s_ != 0))
    X = np.column_stack([np.ones_like(d_), d_] + ([s_] if use_slot else []))
    w = fit_logistic(X, y_)
    length_coef, slot_coef = float(w[1]), float(w[2]) if use_slot else None
    if slot_coef is not None and abs(slot_coef) > MAX_EFFECT_LOG_ODDS:
        why = (
            f"the verdicts follow the slot, not the answers (log-odds {slot_coef:+.1f} for being shown first), "
            "so the few that do not decide the estimate"
        )
    elif abs(length_coef) * d_.std() > MAX_EFFECT_LOG_ODDS:
        why = (
            f"length all but decides the verdicts (log-odds {length_coef:+.1f} per unit of log length ratio)"
        )
    if why:
        return LengthControlled(Estimate(None), length_coef, slot_coef, why)
    groups = np.unique(g_)
    rows_of = [np.flatnonzero(g_ == g) for g in groups]
    rng = np.random.default_rng(seed)
    thetas = []
    for _ in range(samples):
        pick = rng.integers(0, len(groups), size=len(groups))
        idx = np.concatenate([rows_of[k] for k in pick])
        thetas.append(fit_logistic(X[idx], y_[idx])[0])
    lo, hi = np.percentile(_sigmoid(np.asarray(thetas)), [2.5, 97.5])
    return LengthControlled(Estimate(float(_sigmoid(w[0])), float(lo), float(hi)), length_coef, slot_coef)


# ---------------------------------------------------------------------------------------------
# Several systems: Bradley-Terry


def bradley_terry(
    wins: np.ndarray, *, prior: float = 0.5, iterations: int = 10_000, tol: float = 1e-10
) -> np.ndarray:
    """Log-strengths (mean 0) of K systems from `wins[i, j]`: how often i beat j (ties count half
    to each). Fitted by the minorise-maximise updates of Hunter (2004). `prior` adds that many
    wins to each side of every pair that met, so a system that won (or lost) every comparison
    gets a finite strength; with hundreds of items it moves the result by a fraction of a point."""
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
