"""Tests for esmm.stats: coverage on data with a known mean, equality with straightforward
reference implementations, scipy as the oracle for Student-t figures."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from esmm.errors import DataError, UsageError
from esmm.metrics import auc
from esmm.stats import (
    Estimate,
    bootstrap,
    bootstrap_counts,
    bootstrap_mean,
    paired_difference,
    seed_interval,
    t_quantile,
)

# ---------------------------------------------------------------------------------------------
# Equality with a straightforward loop


def _reference_grouped_bootstrap(values, groups, n_boot, level, seed):
    """One replicate at a time: draw U users with replacement, gather their rows, take the
    mean; the percentile interval of the replicates."""
    users = np.unique(groups)
    rows_of = {u: np.flatnonzero(groups == u) for u in users}
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        drawn = users[rng.integers(0, len(users), size=len(users))]
        rows = np.concatenate([rows_of[u] for u in drawn])
        reps.append(values[rows].mean())
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return np.array(reps), lo, hi


@pytest.mark.parametrize("n_boot", [1, 7, 300])
def test_bootstrap_mean_equals_the_reference_loop(n_boot, monkeypatch):
    import esmm.stats as stats_mod

    # Several chunks of replicates: the chunking must not change the draws.
    monkeypatch.setattr(stats_mod, "_CHUNK_CELLS", 200)
    rng = np.random.default_rng(1)
    groups = rng.choice(np.array([3, 10, 11, 50, 51, 52, 97, 98, 99, 120]) * 7, size=400)
    values = rng.normal(size=400) + (groups % 5)
    got = bootstrap_mean(values, groups, n_boot=n_boot, level=0.9, seed=5)
    reps, lo, hi = _reference_grouped_bootstrap(values, groups, n_boot, 0.9, 5)
    assert got.mean == pytest.approx(values.mean(), rel=1e-15)
    assert got.low == pytest.approx(lo, rel=1e-12) and got.high == pytest.approx(hi, rel=1e-12)
    assert got.n == 10 and got.level == 0.9
    counts = np.concatenate(list(bootstrap_counts(10, n_boot, 5)))
    assert counts.shape == (n_boot, 10) and (counts.sum(axis=1) == 10).all()


def test_bootstrap_of_a_weighted_statistic_equals_the_reference_loop():
    rng = np.random.default_rng(2)
    n = 600
    user = rng.integers(0, 40, n)
    y = (rng.random(n) < 0.3).astype(int)
    s = y + rng.normal(size=n)
    got = bootstrap(lambda w: auc(y, s, w), user, n_boot=50, seed=3)
    users = np.unique(user)
    rng_ref = np.random.default_rng(3)
    reps = []
    for _ in range(50):
        rows = np.concatenate([np.flatnonzero(user == u)
                               for u in users[rng_ref.integers(0, len(users), len(users))]])
        reps.append(auc(y[rows], s[rows]))
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert got.mean == auc(y, s)
    assert got.low == pytest.approx(lo, abs=1e-12) and got.high == pytest.approx(hi, abs=1e-12)


def test_paired_bootstrap_shares_resamples():
    """The same seed gives the same resamples to two statistics: their paired difference's
    interval is far narrower than either interval."""
    rng = np.random.default_rng(4)
    user = np.repeat(np.arange(200), 10)
    level = rng.normal(size=200)[user]  # large user effects, shared by both methods
    a = level + 0.05 + 0.1 * rng.normal(size=2000)
    b = level + 0.1 * rng.normal(size=2000)
    ia = bootstrap_mean(a, user, seed=9)
    diff = bootstrap(lambda w: np.average(a, weights=w) - np.average(b, weights=w), user, seed=9)
    assert diff.high - diff.low < 0.2 * (ia.high - ia.low)
    assert diff.low > 0  # the 0.05 advantage is resolved


# ---------------------------------------------------------------------------------------------
# Coverage on data with a known mean


def test_bootstrap_mean_covers_the_true_mean_of_normal_data():
    rng = np.random.default_rng(10)
    trials, hits = 300, 0
    for t in range(trials):
        x = rng.normal(loc=2.0, scale=3.0, size=80)
        est = bootstrap_mean(x, n_boot=400, seed=t)
        hits += est.low <= 2.0 <= est.high
    # Percentile intervals at n = 80 cover a little under 95%; 300 trials: sd 1.3 points.
    assert 0.90 <= hits / trials <= 0.98


def test_grouped_bootstrap_covers_where_a_row_bootstrap_does_not():
    """Rows of a user share the user's effect: resampling users keeps the coverage, resampling
    rows as if independent is overconfident."""
    rng = np.random.default_rng(11)
    user = np.repeat(np.arange(40), 25)
    trials, grouped_hits, row_hits = 200, 0, 0
    for t in range(trials):
        x = rng.normal(size=40)[user] + 0.5 * rng.normal(size=1000)  # true mean 0
        g = bootstrap_mean(x, user, n_boot=300, seed=t)
        r = bootstrap_mean(x, None, n_boot=300, seed=t)
        grouped_hits += g.low <= 0.0 <= g.high
        row_hits += r.low <= 0.0 <= r.high
    assert 0.88 <= grouped_hits / trials <= 0.99
    assert row_hits / trials < 0.6


def test_seed_interval_covers_at_the_stated_level():
    rng = np.random.default_rng(12)
    x = rng.normal(loc=0.7, scale=0.02, size=(4000, 3))  # 3 seeds per trial
    hits = 0
    for row in x:
        est = seed_interval(row)
        hits += est.low <= 0.7 <= est.high
    assert hits / len(x) == pytest.approx(0.95, abs=0.012)  # sd of the rate: 0.0034


# ---------------------------------------------------------------------------------------------
# Student-t figures against scipy


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 500])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(df, p):
    assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-10)


def test_seed_interval_matches_scipy():
    x = np.array([0.712, 0.705, 0.731, 0.719])
    est = seed_interval(x, level=0.9)
    lo, hi = scipy_stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (est.low, est.high) == pytest.approx((lo, hi), abs=1e-12)
    assert est.mean == pytest.approx(x.mean()) and est.n == 4


def test_paired_difference_interval_and_wins():
    a = np.array([0.71, 0.73, 0.70, 0.74, 0.72])
    b = np.array([0.70, 0.71, 0.70, 0.73, 0.73])
    d = paired_difference(a, b)
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert d.mean == pytest.approx(0.006)
    assert (d.wins, d.losses, d.ties, d.n) == (3, 1, 1, 5)
    # A log loss: lower is better, the same seeds swap sides.
    lower = paired_difference(a, b, higher_is_better=False)
    assert (lower.wins, lower.losses, lower.ties) == (1, 3, 1)
    assert lower.mean == d.mean


# ---------------------------------------------------------------------------------------------
# Determinism and errors


def test_seeded_and_deterministic():
    rng = np.random.default_rng(13)
    x, user = rng.normal(size=500), rng.integers(0, 50, 500)
    assert bootstrap_mean(x, user, seed=1) == bootstrap_mean(x, user, seed=1)
    assert bootstrap_mean(x, user, seed=1) != bootstrap_mean(x, user, seed=2)
    assert isinstance(bootstrap_mean(x, user), Estimate)


def test_errors_name_the_argument():
    x = np.arange(5.0)
    with pytest.raises(UsageError, match="level: got 95"):
        bootstrap_mean(x, level=95)
    with pytest.raises(UsageError, match="n_boot: got 0"):
        bootstrap_mean(x, n_boot=0)
    with pytest.raises(UsageError, match="seed: got -1"):
        bootstrap_mean(x, seed=-1)
    with pytest.raises(DataError, match="values has 1 non-finite.*nan"):
        bootstrap_mean(np.array([1.0, np.nan]))
    with pytest.raises(DataError, match="groups has 4 rows but values has 5"):
        bootstrap_mean(x, np.arange(4))
    with pytest.raises(DataError, match="at least one row"):
        bootstrap_mean(np.array([]))
    with pytest.raises(DataError, match="at least 2 values; got 1"):
        seed_interval([0.7])
    with pytest.raises(DataError, match="a has 3 seeds but b has 2"):
        paired_difference([1, 2, 3], [1, 2])
    y = np.array([0, 0, 0, 1, 1])
    with pytest.raises(DataError, match="NaN on .* replicates"):
        bootstrap(lambda w: auc(y, x, w), np.arange(5), n_boot=200)
