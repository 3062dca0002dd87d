"""Uncertainty of benchmark figures: bootstrap over test users, intervals across seeds, paired
differences.

Two sources of noise move a benchmark figure, and each has its interval here:

* **which users the test split holds** -- :func:`bootstrap_mean` (a per-row quantity such as a
  row's log loss) and :func:`bootstrap` (any statistic that takes row weights, such as
  :func:`esmm.metrics.auc`) resample the test split's *users* with replacement, keeping each
  user's rows together (rows of one user are not independent), and report the percentile
  interval;
* **which seed a run drew** -- :func:`seed_interval` is the Student-t interval of a mean over
  runs, :func:`paired_difference` the same for the per-seed difference of two methods run on
  the same seeds, with the count of seeds each method wins.

Every function is deterministic: the same inputs and ``seed`` give the same interval. A
bootstrap resamples users by drawing, per replicate, U user indices uniformly from the U users;
:func:`bootstrap_counts` gives those draws, so that two statistics (two methods on the same
rows) can be bootstrapped on the same resamples.

Shapes: N rows, U distinct users (groups), B bootstrap replicates, S seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from esmm.errors import DataError, UsageError

__all__ = [
    "Estimate",
    "PairedDifference",
    "bootstrap",
    "bootstrap_counts",
    "bootstrap_mean",
    "paired_difference",
    "seed_interval",
    "t_quantile",
]

# Replicates per chunk are sized so that a chunk's (replicates, U) count matrix stays near this
# many cells (32 MB of int64): the work is vectorised without the whole (B, U) matrix in memory.
_CHUNK_CELLS = 1 << 22


@dataclass(frozen=True)
class Estimate:
    """A figure with its interval.

    Attributes:
        mean: the point estimate (the statistic on the data as they are).
        low, high: the interval's bounds.
        level: the interval's coverage, e.g. 0.95.
        n: the number of units resampled or averaged (users for a bootstrap, seeds across
            seeds).
    """

    mean: float
    low: float
    high: float
    level: float
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """The mean of per-seed differences a - b with its interval, and who won each seed.

    Attributes:
        mean, low, high, level, n: as in :class:`Estimate`, for the differences.
        wins: seeds where a is better than b (higher, or lower for a lower-is-better metric).
        losses: seeds where b is better.
        ties: seeds where they are equal.
    """

    mean: float
    low: float
    high: float
    level: float
    n: int
    wins: int
    losses: int
    ties: int


# --------------------------------------------------------------------------------------------
# checks


def _check_level(level: float) -> float:
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0.0 < level < 1.0:
        raise UsageError(f"level: got {level!r}, expected a number in (0, 1), e.g. 0.95")
    return float(level)


def _check_n_boot(n_boot: int) -> int:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise UsageError(f"n_boot: got {n_boot!r}, expected an integer >= 1")
    return int(n_boot)


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed: got {seed!r}, expected an integer >= 0")
    return int(seed)


def _finite_1d(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D array; got shape {arr.shape}, expected (N,)")
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(f"{name} has {int(bad.sum())} non-finite value(s) out of {arr.size}, "
                        f"e.g. {arr[np.flatnonzero(bad)[0]]!r}; expected finite numbers")
    return arr


def _group_codes(groups: object | None, n: int) -> tuple[np.ndarray, int]:
    """(codes 0..U-1 per row, U); ``None`` makes every row its own group."""
    if groups is None:
        return np.arange(n, dtype=np.int64), n
    g = np.asarray(groups)
    if g.ndim != 1:
        raise DataError(f"groups must be a 1-D array; got shape {g.shape}, expected (N,)")
    if len(g) != n:
        raise DataError(f"length mismatch: groups has {len(g)} rows but values has {n}; "
                        "expected equal lengths")
    if g.dtype.kind == "f" and np.isnan(g).any():
        raise DataError(f"groups has {int(np.isnan(g).sum())} NaN id(s); expected none")
    uniq, codes = np.unique(g, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), len(uniq)


def _percentile(replicates: np.ndarray, point: float, level: float, n: int) -> Estimate:
    lo, hi = np.quantile(replicates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Estimate(mean=float(point), low=float(lo), high=float(hi), level=level, n=n)


# --------------------------------------------------------------------------------------------
# bootstrap over users


def bootstrap_counts(n_groups: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """How often each user is drawn in each replicate, in chunks of replicates.

    Replicate b draws ``n_groups`` user indices uniformly with replacement; the draws of all
    replicates come from one generator seeded with ``seed``, replicate after replicate, so the
    chunking does not change them.

    Yields:
        int64 arrays of shape (chunk, U) whose rows sum to U; the chunks stack to (B, U).
    """
    n_groups, n_boot, seed = int(n_groups), _check_n_boot(n_boot), _check_seed(seed)
    if n_groups < 1:
        raise DataError("bootstrap needs at least one row; got none")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // n_groups)
    done = 0
    while done < n_boot:
        c = min(per_chunk, n_boot - done)
        draws = rng.integers(0, n_groups, size=(c, n_groups))
        draws += (np.arange(c, dtype=np.int64) * n_groups)[:, None]
        yield np.bincount(draws.ravel(), minlength=c * n_groups).reshape(c, n_groups)
        done += c


def bootstrap_mean(values: object, groups: object | None = None, *, n_boot: int = 2000,
                   level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values`` (N,) with a percentile interval from resampling ``groups`` (users).

    Each replicate's mean is over the rows of the users it drew (a user drawn twice counts
    twice): sum_u c_u S_u / sum_u c_u N_u with S_u, N_u the user's row sum and row count.
    Fully vectorised: one matrix product per chunk of replicates.

    Args:
        values: per-row quantity, shape (N,), finite (e.g. each row's log loss, or 0/1 hits).
        groups: user id per row, shape (N,); ``None`` resamples rows independently.
        n_boot: replicates B.
        level: coverage of the interval.
        seed: seed of the resampling.
    """
    level = _check_level(level)
    x = _finite_1d(values, "values")
    codes, n_groups = _group_codes(groups, len(x))
    sums = np.bincount(codes, weights=x, minlength=n_groups)
    sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)
    reps = np.concatenate([(c @ sums) / (c @ sizes)
                           for c in bootstrap_counts(n_groups, n_boot, seed)])
    return _percentile(reps, float(x.mean()), level, n_groups)


def bootstrap(statistic: Callable[[np.ndarray], float], groups: object, *, n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> Estimate:
    """Any weighted statistic of the test rows with a percentile interval over users.

    ``statistic(weights)`` gets one non-negative weight per row, shape (N,) float64 (how many
    times the row's user was drawn) and returns a float; the point estimate is
    ``statistic(ones)``. A paired comparison of two methods bootstraps their difference on the
    same resamples::

        bootstrap(lambda w: auc(y, p_a, w) - auc(y, p_b, w), user)

    The statistic runs once per replicate (the loop is over replicates, not rows), so its cost
    times ``n_boot`` is the cost of the interval.

    Args:
        statistic: function of the row weights, (N,) -> float.
        groups: user id per row, shape (N,).
        n_boot, level, seed: as in :func:`bootstrap_mean`.
    """
    level = _check_level(level)
    g = np.asarray(groups)
    codes, n_groups = _group_codes(g, len(g))
    point = float(statistic(np.ones(len(codes))))
    reps = [float(statistic(row[codes].astype(np.float64)))
            for chunk in bootstrap_counts(n_groups, n_boot, seed) for row in chunk]
    arr = np.asarray(reps)
    if np.isnan(arr).any():
        raise DataError(f"the statistic was NaN on {int(np.isnan(arr).sum())} of {len(arr)} "
                        "bootstrap replicates (e.g. an AUC with one class drawn); use more "
                        "users or a statistic defined on every resample")
    return _percentile(arr, point, level, n_groups)


# --------------------------------------------------------------------------------------------
# across seeds


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (bisection on its
    CDF, to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise UsageError(f"t_quantile p: got {p!r}, expected a number in (0, 1)")
    if not df > 0:
        raise UsageError(f"t_quantile df: got {df!r}, expected a number > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def seed_interval(values: object, level: float = 0.95) -> Estimate:
    """Mean over runs (one value per seed, shape (S,)) with its Student-t interval,
    mean +- t_{S-1} * sd / sqrt(S): exact for normally distributed run results.

    Needs S >= 2; a constant series gives a zero-width interval.
    """
    level = _check_level(level)
    x = _finite_1d(values, "values")
    n = len(x)
    if n < 2:
        raise DataError(f"an interval across seeds needs at least 2 values; got {n}")
    mean = float(x.mean())
    half = t_quantile(0.5 + level / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean=mean, low=mean - half, high=mean + half, level=level, n=n)


def paired_difference(a: object, b: object, level: float = 0.95,
                      higher_is_better: bool = True) -> PairedDifference:
    """Per-seed differences ``a - b`` of two methods run on the same seeds (each shape (S,),
    seed i of ``a`` paired with seed i of ``b``): their mean, Student-t interval and the count
    of seeds each side wins.

    Pairing removes what the seeds share (the same data, the same initial world), so the
    interval is usually far narrower than the two methods' own intervals would suggest.
    """
    x, y = _finite_1d(a, "a"), _finite_1d(b, "b")
    if len(x) != len(y):
        raise DataError(f"length mismatch: a has {len(x)} seeds but b has {len(y)}; expected "
                        "the same seeds for both")
    est = seed_interval(x - y, level)
    better = (x > y) if higher_is_better else (x < y)
    worse = (x < y) if higher_is_better else (x > y)
    return PairedDifference(mean=est.mean, low=est.low, high=est.high, level=est.level,
                            n=est.n, wins=int(better.sum()), losses=int(worse.sum()),
                            ties=int((x == y).sum()))
