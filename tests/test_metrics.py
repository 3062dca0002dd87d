"""Tests for esmm.metrics, with scikit-learn as an independent oracle."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from sklearn.metrics import log_loss, roc_auc_score

from esmm.errors import DataError
from esmm.metrics import (
    DEFAULT_SPACES,
    METRIC_ORDER,
    MetricSpace,
    auc,
    average_ranks,
    compute_metrics,
    entire_space_diagnostics,
    format_table,
    grouped_auc,
    logloss,
    pcoc,
    pctr_as_pcvr_metrics,
    spearman,
)

TOL = 1e-9


def sk_log_loss(y, p):
    """sklearn log_loss across versions (``y_pred`` was renamed ``y_proba`` in 1.9)."""
    if "y_proba" in inspect.signature(log_loss).parameters:
        return log_loss(y, y_proba=p, labels=[0, 1])
    return log_loss(y, p, labels=[0, 1])


def oracle_gauc(y, s, g):
    """Straightforward GAUC: loop over groups, sklearn AUC, weight by group size."""
    num = den = 0.0
    for gid in np.unique(g):
        m = g == gid
        if len(np.unique(y[m])) < 2:
            continue
        num += m.sum() * roc_auc_score(y[m], s[m])
        den += m.sum()
    return num / den if den else math.nan


# ------------------------------------------------------------------------------------ auc


@pytest.mark.parametrize("seed", range(5))
def test_auc_random_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 3000))
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + 0.5 * y
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=TOL)


@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_auc_heavy_ties_matches_sklearn(decimals):
    rng = np.random.default_rng(10 + decimals)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000) * 0.7 + 0.3 * y, decimals)
    assert len(np.unique(s)) < 200
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_auc_weighted_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 2, 2000)
    s = np.round(rng.random(2000) + 0.2 * y, 2)  # ties too
    w = rng.exponential(size=2000)
    w[:50] = 0.0
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=TOL)


def test_auc_integer_weights_equal_repetition():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)
    w = rng.integers(0, 4, 300)
    rep = np.repeat(np.arange(300), w)
    assert auc(y, s, w) == pytest.approx(auc(y[rep], s[rep]), abs=TOL)


def test_auc_all_equal_scores_is_half():
    y = np.array([0, 1, 1, 0, 1])
    assert auc(y, np.full(5, 0.3)) == 0.5
    assert roc_auc_score(y, np.full(5, 0.3)) == 0.5


def test_auc_perfect_and_inverted():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auc(y, s) == 1.0
    assert auc(y, -s) == 0.0


def test_auc_one_class_is_nan():
    assert math.isnan(auc(np.ones(5, dtype=int), np.arange(5.0)))
    assert math.isnan(auc(np.zeros(5, dtype=int), np.arange(5.0)))
    assert math.isnan(auc(np.array([], dtype=int), np.array([])))
    # all positive weight zero -> effectively one class
    assert math.isnan(auc(np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 0, 1])))


def test_auc_accepts_bool_and_float_labels_and_float32_scores():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = rng.random(500).astype(np.float32)
    ref = roc_auc_score(y, s)
    assert auc(y.astype(bool), s) == pytest.approx(ref, abs=TOL)
    assert auc(y.astype(float), s) == pytest.approx(ref, abs=TOL)


def test_auc_errors():
    with pytest.raises(DataError, match="labels.*0/1.*2"):
        auc(np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(DataError, match="length mismatch.*scores has 2.*labels has 3"):
        auc(np.array([0, 1, 0]), np.array([0.1, 0.2]))
    with pytest.raises(DataError, match="scores contains 1 NaN"):
        auc(np.array([0, 1, 0]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(DataError, match="1-D"):
        auc(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(DataError, match="weights"):
        auc(np.array([0, 1]), np.array([0.1, 0.2]), np.array([1.0, -1.0]))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(-3, 3), st.integers(0, 3)),
        min_size=2,
        max_size=40,
    )
)
def test_auc_property_matches_sklearn(rows):
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], dtype=float) / 2.0  # few distinct values -> many ties
    w = np.array([r[2] for r in rows], dtype=float)
    if len(np.unique(y)) < 2:
        assert math.isnan(auc(y, s))
        return
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    if w[y == 1].sum() > 0 and w[y == 0].sum() > 0:
        assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=TOL)


def _float32_scores(rng, n: int, y: np.ndarray) -> np.ndarray:
    """float32 values widened to float64, as esmm's predictions are: ties (values rounded
    to a coarse grid), negatives, both zeros and infinities included."""
    s = np.round(rng.normal(size=n) + 0.7 * y, 1).astype(np.float32)
    s[rng.random(n) < 0.05] = -0.0
    s[rng.random(n) < 0.05] = 0.0
    s[rng.random(n) < 0.01] = np.inf
    s[rng.random(n) < 0.01] = -np.inf
    return s.astype(np.float64)


@pytest.mark.parametrize("seed", range(4))
def test_auc_of_float32_scores_matches_sklearn(seed):
    # float32-valued scores take the packed-key sort; float64 ones the argsort.
    rng = np.random.default_rng(300 + seed)
    n = int(rng.integers(50, 4000))
    y = rng.integers(0, 2, n)
    s = _float32_scores(rng, n, y)
    finite = np.where(np.isinf(s), np.sign(s) * 1e30, s)  # sklearn rejects infinities
    assert auc(y, s) == pytest.approx(roc_auc_score(y, finite), abs=TOL)
    # The same ranking as float64 values that are not float32's (the other path) agrees.
    assert auc(y, s) == pytest.approx(auc(y, np.where(np.isinf(s), s, s * (1 + 1e-12))),
                                      abs=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_grouped_auc_of_float32_scores_matches_loop_oracle(seed):
    rng = np.random.default_rng(400 + seed)
    n = 3000
    g = rng.integers(-60, 90, n)  # negative ids too
    y = (rng.random(n) < 0.2 + 0.4 * (g % 4 == 0)).astype(int)
    s = _float32_scores(rng, n, y)
    finite = np.where(np.isinf(s), np.sign(s) * 1e30, s)
    expect = oracle_gauc(y, finite, g)
    assert grouped_auc(y, s, g) == pytest.approx(expect, abs=TOL)
    # Group ids spread over more than 2**30 values cannot be packed: the lexsort path.
    wide = g.astype(np.int64) * (1 << 26)
    assert grouped_auc(y, s, wide) == pytest.approx(expect, abs=TOL)


# ------------------------------------------------------------------------------------ gauc


@pytest.mark.parametrize("seed", range(4))
def test_grouped_auc_matches_loop_oracle(seed):
    rng = np.random.default_rng(200 + seed)
    n = 3000
    g = rng.integers(0, 150, n)
    y = (rng.random(n) < 0.15 + 0.5 * (g % 3 == 0)).astype(int)
    s = np.round(rng.random(n) + 0.3 * y, 1 + seed % 2)  # heavy ties within groups
    # a few groups with a single class, which must be skipped
    y[g == 5] = 1
    y[g == 6] = 0
    got = grouped_auc(y, s, g)
    assert got == pytest.approx(oracle_gauc(y, s, g), abs=TOL)


def test_grouped_auc_skips_one_class_groups_by_hand():
    # group 0: perfect ranking (4 rows); group 1: only negatives (skipped);
    # group 2: inverted ranking (2 rows)
    g = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    y = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0])
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.5, 0.6, 0.7, 0.1, 0.9])
    assert grouped_auc(y, s, g) == pytest.approx((4 * 1.0 + 2 * 0.0) / 6, abs=TOL)


def test_grouped_auc_ties_across_groups_do_not_mix():
    # identical scores in different groups must not be treated as ties with each other
    g = np.array([0, 0, 1, 1])
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.6, 0.6, 0.7])
    assert grouped_auc(y, s, g) == 1.0


def test_grouped_auc_group_id_types_and_order():
    rng = np.random.default_rng(9)
    n = 800
    gi = rng.integers(0, 40, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 1)
    ref = oracle_gauc(y, s, gi)
    assert grouped_auc(y, s, gi.astype(str)) == pytest.approx(ref, abs=TOL)
    assert grouped_auc(y, s, gi.astype(float) * 1.5) == pytest.approx(ref, abs=TOL)
    assert grouped_auc(y, s, (gi * 1_000_003).astype(np.int64)) == pytest.approx(ref, abs=TOL)
    perm = rng.permutation(n)
    assert grouped_auc(y[perm], s[perm], gi[perm]) == pytest.approx(ref, abs=TOL)


def test_grouped_auc_single_group_equals_auc():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 1000)
    s = np.round(rng.random(1000), 2)
    assert grouped_auc(y, s, np.zeros(1000, dtype=int)) == pytest.approx(
        roc_auc_score(y, s), abs=TOL
    )


def test_grouped_auc_no_valid_group_is_nan():
    assert math.isnan(grouped_auc(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]), [0, 0, 1]))
    assert math.isnan(grouped_auc(np.array([], dtype=int), np.array([]), np.array([])))


def test_grouped_auc_errors():
    with pytest.raises(DataError, match="groups has 2.*labels has 3"):
        grouped_auc(np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 2]))
    with pytest.raises(DataError, match="NaN group"):
        grouped_auc(np.array([0, 1]), np.array([0.1, 0.2]), np.array([1.0, np.nan]))


def test_grouped_auc_large_runs():
    # sanity check that the vectorised path handles 1M rows / 100k groups (not timed)
    rng = np.random.default_rng(0)
    n = 1_000_000
    g = rng.integers(0, 100_000, n)
    y = (rng.random(n) < 0.3).astype(np.int8)
    s = np.round(rng.random(n) + 0.2 * y, 3)
    v = grouped_auc(y, s, g)
    assert 0.5 < v < 1.0


# ------------------------------------------------------------------------ logloss & pcoc


@pytest.mark.parametrize("seed", range(3))
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(300 + seed)
    y = rng.integers(0, 2, 1000)
    p = np.clip(rng.random(1000) * 0.8 + 0.15 * y, 1e-6, 1 - 1e-6)
    assert logloss(y, p) == pytest.approx(sk_log_loss(y, p), abs=TOL)


def test_logloss_exact_zero_one_is_finite():
    y = np.array([1, 0, 1, 0])
    p = np.array([1.0, 0.0, 0.0, 1.0])
    v = logloss(y, p)
    assert math.isfinite(v)
    assert v == pytest.approx(sk_log_loss(y, p), rel=1e-9)
    assert logloss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0.0, abs=1e-12)


def test_logloss_errors_and_empty():
    assert math.isnan(logloss(np.array([], dtype=int), np.array([])))
    with pytest.raises(DataError, match=r"probs.*\[0, 1\]"):
        logloss(np.array([0, 1]), np.array([0.5, 1.5]))
    with pytest.raises(DataError, match="eps"):
        logloss(np.array([0, 1]), np.array([0.5, 0.5]), eps=0.7)


def test_pcoc_by_hand():
    y = np.array([1, 0, 0, 1, 0])
    p = np.array([0.5, 0.2, 0.1, 0.3, 0.4])
    assert pcoc(y, p) == pytest.approx((1.5 / 5) / (2 / 5))
    assert math.isnan(pcoc(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3])))


# ------------------------------------------------------------------------ compute_metrics


def make_data(seed=0, n=4000):
    """Synthetic impressions where restricting CVR to clicked rows changes the metrics."""
    rng = np.random.default_rng(seed)
    p_ctr_true = rng.beta(2, 8, n)
    p_conv_true = rng.beta(2, 6, n)
    click = (rng.random(n) < p_ctr_true).astype(int)
    conv_if_clicked = (rng.random(n) < p_conv_true).astype(int)
    conversion = click * conv_if_clicked
    p_ctr = np.clip(p_ctr_true + rng.normal(0, 0.05, n), 0.001, 0.999)
    # p_cvr is anti-correlated with truth on unclicked rows, so subset metrics differ
    p_cvr = np.where(click == 1, p_conv_true, 1 - p_conv_true)
    p_cvr = np.clip(p_cvr + rng.normal(0, 0.05, n), 0.001, 0.999)
    preds = {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}
    labels = {"click": click, "conversion": conversion}
    groups = rng.integers(0, 60, n)
    truth = {"conversion_if_clicked": conv_if_clicked, "p_conversion": p_conv_true}
    return preds, labels, groups, truth


BASE_KEYS = {
    "ctr_auc",
    "cvr_auc",
    "ctcvr_auc",
    "ctr_logloss",
    "cvr_logloss",
    "ctcvr_logloss",
    "ctr_pcoc",
    "cvr_pcoc",
    "ctcvr_pcoc",
    "n_impressions",
    "n_clicks",
    "n_conversions",
}
GAUC_KEYS = {"ctr_gauc", "cvr_gauc", "ctcvr_gauc"}
ENTIRE_KEYS = {"cvr_auc_entire_space", "cvr_auc_entire_space_oracle"}


def test_compute_metrics_key_sets():
    preds, labels, groups, truth = make_data()
    assert set(compute_metrics(preds, labels)) == BASE_KEYS
    assert set(compute_metrics(preds, labels, groups)) == BASE_KEYS | GAUC_KEYS
    assert set(compute_metrics(preds, labels, groups, truth)) == BASE_KEYS | GAUC_KEYS | ENTIRE_KEYS
    only_truth = {"conversion_if_clicked": truth["conversion_if_clicked"]}
    assert set(compute_metrics(preds, labels, None, only_truth)) == BASE_KEYS | {
        "cvr_auc_entire_space"
    }
    assert set(compute_metrics(preds, labels, None, {"p_conversion": truth["p_conversion"]})) == (
        BASE_KEYS
    )
    assert set(BASE_KEYS | GAUC_KEYS | ENTIRE_KEYS) == set(METRIC_ORDER)


def test_compute_metrics_values_against_sklearn():
    preds, labels, groups, truth = make_data(1)
    m = compute_metrics(preds, labels, groups, truth)
    click, conv = labels["click"], labels["conversion"]
    ctcvr = click * conv
    c = click == 1

    assert m["ctr_auc"] == pytest.approx(roc_auc_score(click, preds["p_ctr"]), abs=TOL)
    assert m["ctcvr_auc"] == pytest.approx(roc_auc_score(ctcvr, preds["p_ctcvr"]), abs=TOL)
    assert m["cvr_auc"] == pytest.approx(roc_auc_score(conv[c], preds["p_cvr"][c]), abs=TOL)
    # restricting to clicks matters here: the all-rows AUC is clearly different
    assert abs(m["cvr_auc"] - roc_auc_score(conv, preds["p_cvr"])) > 0.05

    assert m["ctr_logloss"] == pytest.approx(sk_log_loss(click, preds["p_ctr"]), abs=TOL)
    assert m["ctcvr_logloss"] == pytest.approx(sk_log_loss(ctcvr, preds["p_ctcvr"]), abs=TOL)
    assert m["cvr_logloss"] == pytest.approx(sk_log_loss(conv[c], preds["p_cvr"][c]), abs=TOL)
    assert abs(m["cvr_logloss"] - sk_log_loss(conv, preds["p_cvr"])) > 0.05

    assert m["ctr_pcoc"] == pytest.approx(preds["p_ctr"].mean() / click.mean())
    assert m["cvr_pcoc"] == pytest.approx(preds["p_cvr"][c].mean() / conv[c].mean())
    assert m["ctcvr_pcoc"] == pytest.approx(preds["p_ctcvr"].mean() / ctcvr.mean())

    assert m["ctr_gauc"] == pytest.approx(oracle_gauc(click, preds["p_ctr"], groups), abs=TOL)
    assert m["ctcvr_gauc"] == pytest.approx(oracle_gauc(ctcvr, preds["p_ctcvr"], groups), abs=TOL)
    assert m["cvr_gauc"] == pytest.approx(
        oracle_gauc(conv[c], preds["p_cvr"][c], groups[c]), abs=TOL
    )

    cic = truth["conversion_if_clicked"]
    assert m["cvr_auc_entire_space"] == pytest.approx(roc_auc_score(cic, preds["p_cvr"]), abs=TOL)
    assert m["cvr_auc_entire_space_oracle"] == pytest.approx(
        roc_auc_score(cic, truth["p_conversion"]), abs=TOL
    )

    assert m["n_impressions"] == len(click)
    assert m["n_clicks"] == click.sum()
    assert m["n_conversions"] == ctcvr.sum()


def test_compute_metrics_ctcvr_label_is_click_times_conversion():
    # a conversion recorded on an unclicked row must not count as a CTCVR positive
    preds = {"p_ctr": np.array([0.9, 0.1, 0.5]), "p_cvr": np.array([0.5, 0.9, 0.5])}
    preds["p_ctcvr"] = preds["p_ctr"] * preds["p_cvr"]
    labels = {"click": np.array([1, 0, 1]), "conversion": np.array([1, 1, 0])}
    m = compute_metrics(preds, labels)
    assert m["n_conversions"] == 1
    assert m["ctcvr_pcoc"] == pytest.approx(preds["p_ctcvr"].mean() / (1 / 3))


def test_compute_metrics_no_clicks_gives_nan_cvr():
    preds = {k: np.array([0.2, 0.3, 0.4]) for k in ("p_ctr", "p_cvr", "p_ctcvr")}
    labels = {"click": np.zeros(3, dtype=int), "conversion": np.zeros(3, dtype=int)}
    m = compute_metrics(preds, labels, groups=np.array([1, 1, 2]))
    for key in ("cvr_auc", "cvr_gauc", "cvr_logloss", "cvr_pcoc", "ctr_auc", "ctr_pcoc"):
        assert math.isnan(m[key]), key


def test_compute_metrics_custom_spaces():
    preds, labels, _, _ = make_data(2, n=500)
    m = compute_metrics(preds, labels, spaces=DEFAULT_SPACES[:1])
    assert set(m) == {
        "ctr_auc",
        "ctr_logloss",
        "ctr_pcoc",
        "n_impressions",
        "n_clicks",
        "n_conversions",
    }
    sp = MetricSpace("ctr2", "p_ctr", "click", None)
    assert compute_metrics(preds, labels, spaces=[sp])["ctr2_auc"] == m["ctr_auc"]


def test_compute_metrics_errors_name_the_key():
    preds, labels, groups, truth = make_data(3, n=200)

    bad = dict(preds, p_cvr=preds["p_cvr"][:-1])
    with pytest.raises(DataError, match=r"p_cvr.*199.*200"):
        compute_metrics(bad, labels)

    bad_labels = dict(labels, conversion=labels["conversion"][:-5])
    with pytest.raises(DataError, match=r"conversion.*195.*200"):
        compute_metrics(preds, bad_labels)

    bad_labels = dict(labels, click=labels["click"].copy())
    bad_labels["click"][7] = 2
    with pytest.raises(DataError, match=r"click.*0/1.*2"):
        compute_metrics(preds, bad_labels)

    bad = dict(preds, p_ctr=preds["p_ctr"].copy())
    bad["p_ctr"][[1, 5, 9]] = np.nan
    with pytest.raises(DataError, match=r"p_ctr.*3 NaN"):
        compute_metrics(bad, labels)

    with pytest.raises(DataError, match=r"groups has 10.*200"):
        compute_metrics(preds, labels, groups[:10])

    bad_truth = dict(truth, conversion_if_clicked=truth["conversion_if_clicked"][:3])
    with pytest.raises(DataError, match=r"conversion_if_clicked.*3.*200"):
        compute_metrics(preds, labels, None, bad_truth)

    missing = {k: v for k, v in preds.items() if k != "p_ctcvr"}
    with pytest.raises(DataError, match="p_ctcvr"):
        compute_metrics(missing, labels)

    with pytest.raises(DataError, match="conversion"):
        compute_metrics(preds, {"click": labels["click"]})


# ------------------------------------------------------------------------------ format_table


def test_format_table():
    rows = {
        "esmm": {"cvr_auc": 0.71234, "ctr_auc": 0.6, "n_impressions": 1000.0, "extra": 1.5},
        "naive": {"ctr_auc": float("nan"), "cvr_auc": 0.65},
    }
    text = format_table(rows)
    lines = text.strip().split("\n")
    assert lines[0] == "| model | ctr_auc | cvr_auc | n_impressions | extra |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| esmm | 0.6000 | 0.7123 | 1000 | 1.5000 |"
    assert lines[3] == "| naive | nan | 0.6500 |  |  |"
    assert len(lines) == 4

    text = format_table(rows, columns=["cvr_auc"], fmt="{:.2f}", index_name="run")
    assert text.splitlines() == [
        "| run | cvr_auc |",
        "|---|---:|",
        "| esmm | 0.71 |",
        "| naive | 0.65 |",
    ]


def test_format_table_from_compute_metrics():
    preds, labels, groups, truth = make_data(4, n=300)
    m = compute_metrics(preds, labels, groups, truth)
    text = format_table({"esmm": m})
    header = text.splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")][1:]
    assert cols == list(METRIC_ORDER)


# ---------------------------------------------------------------------------------------------
# Spearman and the entire-space diagnostics (scipy / sklearn as oracles)


@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_and_ranks_match_scipy(seed, decimals):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=3000)
    y = 0.4 * x + rng.normal(size=3000)
    if decimals is not None:  # heavy ties
        x, y = np.round(x, decimals), np.round(y, decimals)
    np.testing.assert_array_equal(average_ranks(x), scipy_stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=TOL)


@pytest.mark.parametrize("seed", range(3))
def test_ranks_of_float32_values_match_scipy(seed):
    # float32-valued inputs (model scores) are ranked through one sort of packed keys.
    rng = np.random.default_rng(700 + seed)
    n = int(rng.integers(50, 4000))
    x = _float32_scores(rng, n, np.zeros(n))
    np.testing.assert_array_equal(average_ranks(x), scipy_stats.rankdata(x))
    y = rng.normal(size=n)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=TOL)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=2, max_size=40))
def test_spearman_property_matches_scipy(pairs):
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    got = spearman(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=TOL)


def test_spearman_edges_and_errors():
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman(np.arange(5), np.exp(np.arange(5))) == pytest.approx(1.0)
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([], []))
    with pytest.raises(DataError, match="length mismatch.*y has 2.*x has 3"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="x contains 1 NaN"):
        spearman([1.0, np.nan], [1.0, 2.0])


def test_entire_space_diagnostics_against_independent_formulas():
    preds, _, _, truth = make_data(seed=4)
    rng = np.random.default_rng(4)
    truth = {**truth, "p_click": np.clip(preds["p_ctr"] + rng.normal(0, 0.1, 4000), 0, 1)}
    d = entire_space_diagnostics(preds, truth)
    y, q, p = truth["conversion_if_clicked"], truth["p_conversion"], preds["p_cvr"]
    assert d["cvr_logloss_entire_space"] == pytest.approx(sk_log_loss(y, p), abs=TOL)
    assert d["cvr_pcoc_entire_space"] == pytest.approx(p.mean() / y.mean(), rel=TOL)
    assert d["cvr_logloss_entire_space_oracle"] == pytest.approx(sk_log_loss(y, q), abs=TOL)
    # Soft labels: the mean over the two outcomes weighted by the true probability.
    ce = -np.mean(q * np.log(p) + (1 - q) * np.log(1 - p))
    assert d["cvr_logloss_p_conversion"] == pytest.approx(ce, rel=1e-12)
    kl = np.mean(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)))
    assert d["cvr_kl_p_conversion"] == pytest.approx(kl, rel=1e-9)
    assert d["cvr_pcoc_p_conversion"] == pytest.approx(p.mean() / q.mean(), rel=TOL)
    assert d["cvr_ctr_spearman"] == pytest.approx(
        scipy_stats.spearmanr(p, preds["p_ctr"]).statistic, abs=TOL)
    assert d["cvr_p_click_spearman"] == pytest.approx(
        scipy_stats.spearmanr(p, truth["p_click"]).statistic, abs=TOL)


def test_entire_space_diagnostics_truth_scores_zero_divergence():
    _, _, _, truth = make_data(seed=5)
    q = truth["p_conversion"]
    d = entire_space_diagnostics({"p_cvr": q, "p_ctr": q}, truth)
    assert d["cvr_kl_p_conversion"] == pytest.approx(0.0, abs=1e-12)
    assert d["cvr_logloss_entire_space"] == d["cvr_logloss_entire_space_oracle"]
    assert d["cvr_ctr_spearman"] == pytest.approx(1.0)
    assert "cvr_p_click_spearman" not in d


def test_entire_space_diagnostics_keys_follow_the_inputs_and_errors():
    preds, _, _, truth = make_data(seed=6)
    only_draw = entire_space_diagnostics({"p_cvr": preds["p_cvr"]},
                                         {"conversion_if_clicked": truth["conversion_if_clicked"]})
    assert set(only_draw) == {"cvr_logloss_entire_space", "cvr_pcoc_entire_space"}
    with pytest.raises(DataError, match="missing key 'p_cvr'"):
        entire_space_diagnostics({"p_ctr": preds["p_ctr"]}, truth)
    with pytest.raises(DataError, match=r"ground_truth\['p_click'\].*probabilities"):
        entire_space_diagnostics(preds, {**truth, "p_click": np.full(4000, 1.5)})
    with pytest.raises(DataError, match="length mismatch"):
        entire_space_diagnostics(preds, {"p_conversion": truth["p_conversion"][:10]})


def test_pctr_as_pcvr_control_row():
    preds, labels, groups, truth = make_data(seed=7)
    truth = {**truth, "p_click": np.clip(preds["p_ctr"] * 0.9, 0, 1)}
    row = pctr_as_pcvr_metrics(preds, labels, truth, groups=groups)
    clicked = labels["click"] == 1
    assert row["cvr_auc"] == pytest.approx(
        roc_auc_score(labels["conversion"][clicked], preds["p_ctr"][clicked]), abs=TOL)
    assert row["cvr_gauc"] == pytest.approx(
        oracle_gauc(labels["conversion"][clicked], preds["p_ctr"][clicked], groups[clicked]),
        abs=TOL)
    assert row["cvr_auc_entire_space"] == pytest.approx(
        roc_auc_score(truth["conversion_if_clicked"], preds["p_ctr"]), abs=TOL)
    assert row["cvr_p_click_spearman"] == pytest.approx(1.0)
    # The model's own pCVR is not consulted.
    other = pctr_as_pcvr_metrics({"p_ctr": preds["p_ctr"]}, labels, truth, groups=groups)
    assert other == row
    assert set(pctr_as_pcvr_metrics(preds, labels)) == {"cvr_auc"}


def test_evaluate_reports_the_diagnostics_whenever_ground_truth_is_present(
        flat_data, cfg_factory, tmp_path):
    """`esmm evaluate`'s path: streamed and in-memory splits give the same diagnostics, equal
    to the functions applied to the model's predictions."""
    import pyarrow.parquet as pq

    from esmm.data.stream import open_split
    from esmm.evaluate import evaluate, predict_split
    from esmm.train import load_model, train

    cfg = cfg_factory(flat_data["train"], flat_data["valid"], epochs=1)
    train(cfg, tmp_path / "run")
    model, cfg, spec, _ = load_model(tmp_path / "run")
    got = {}
    for loader in ("stream", "memory"):
        got[loader] = evaluate(model, open_split(flat_data["valid"], spec, cfg.data,
                                                 loader=loader))
    for k in ("cvr_logloss_entire_space", "cvr_kl_p_conversion", "cvr_ctr_spearman",
              "cvr_p_click_spearman", "cvr_pcoc_p_conversion"):
        assert got["stream"][k] == pytest.approx(got["memory"][k], rel=1e-9), k
    preds, _ = predict_split(model, open_split(flat_data["valid"], spec, cfg.data,
                                               loader="memory"))
    t = pq.read_table(flat_data["valid"])
    truth = {c: t.column(c).to_numpy() for c in ("p_click", "p_conversion",
                                                 "conversion_if_clicked")}
    assert got["memory"]["cvr_ctr_spearman"] == pytest.approx(
        scipy_stats.spearmanr(preds["p_cvr"], preds["p_ctr"]).statistic, abs=1e-9)
    want = entire_space_diagnostics(preds, truth)
    for k, v in want.items():
        assert got["memory"][k] == pytest.approx(v, rel=1e-9), k
    # Without ground truth columns there is nothing to diagnose.
    bare = tmp_path / "bare.parquet"
    pq.write_table(t.drop_columns(["p_click", "p_conversion", "conversion_if_clicked"]), bare)
    plain = evaluate(model, open_split(bare, spec, cfg.data, loader="memory"))
    assert "cvr_ctr_spearman" not in plain and "cvr_auc" in plain


def test_grouped_auc_of_float32_scores_with_uint64_group_ids_above_int64():
    rng = np.random.default_rng(7)
    n = 2000
    g = rng.integers(0, 40, n)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.random(n).astype(np.float32).astype(np.float64)
    big = g.astype(np.uint64) + np.uint64(2**63 + 5)
    assert grouped_auc(y, s, big) == pytest.approx(oracle_gauc(y, s, g), abs=TOL)
