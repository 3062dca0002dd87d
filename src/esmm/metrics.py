"""Exact, vectorised evaluation metrics for click and conversion models.

Everything here is plain numpy and works in float64 internally; there is no Python loop over
rows or groups, so the functions scale to tens of millions of impressions.

* :func:`auc` -- exact ROC AUC (tied scores count one half), optional sample weights.
* :func:`grouped_auc` -- GAUC: per-group AUC averaged with weights equal to group size.
* :func:`logloss` -- mean binary cross-entropy.
* :func:`pcoc` -- predicted over observed rate, ``mean(prob) / mean(label)``.
* :func:`compute_metrics` -- the full CTR / CVR / CTCVR report for a multi-task model.
* :func:`format_table` -- a Markdown table of several runs' metrics.
* :func:`spearman` -- exact rank correlation (tied values share their mean rank).
* :func:`entire_space_diagnostics` -- pCVR over every impression against the simulator's truth,
  and how much of it is click propensity.
* :func:`pctr_as_pcvr_metrics` -- the control row: the model's pCTR scored as its pCVR.

All arrays are 1-D with N rows. Labels are 0/1 (bool, integer or float dtype).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esmm.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SPACES",
    "METRIC_ORDER",
    "MetricSpace",
    "auc",
    "average_ranks",
    "compute_metrics",
    "entire_space_diagnostics",
    "format_table",
    "grouped_auc",
    "logloss",
    "pcoc",
    "pctr_as_pcvr_metrics",
    "spearman",
]

_DEFAULT_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_1d(values: object, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D array; got shape {arr.shape}, expected (N,)")
    return arr


def _check_lengths(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the common length of ``arrays`` or raise naming the first mismatch."""
    items = list(arrays.items())
    ref_name, ref = items[0]
    n = len(ref)
    for name, arr in items[1:]:
        if len(arr) != n:
            raise DataError(
                f"length mismatch: {name} has {len(arr)} rows but {ref_name} has {n} rows; "
                "expected equal lengths"
            )
    return n


def _binary(values: object, name: str) -> np.ndarray:
    """Validate a 0/1 label array; return it as int64 (shape (N,))."""
    arr = _as_1d(values, name)
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{name} must be numeric 0/1 labels; got dtype {arr.dtype}")
    # Integer labels in [0, 1] are 0/1: two reductions, no (N,) temporaries. The metrics of
    # one report validate the same label arrays many times over, so int64 ones pass uncopied.
    if arr.dtype.kind in "iu" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 1)):
        return arr.astype(np.int64, copy=False)
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        first = arr[np.flatnonzero(bad)[0]]
        raise DataError(
            f"{name} must contain only 0/1 labels; got {int(bad.sum())} bad value(s), "
            f"e.g. {first!r}"
        )
    return arr.astype(np.int64)


def _scores(values: object, name: str) -> np.ndarray:
    """Validate a score array (any real values, no NaN); return float64 (shape (N,))."""
    arr = _as_1d(values, name)
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise DataError(f"{name} contains {n_nan} NaN value(s) out of {arr.size}; expected none")
    return arr


def _probs(values: object, name: str) -> np.ndarray:
    """Validate probabilities: no NaN, all in [0, 1]; return float64 (shape (N,))."""
    arr = _scores(values, name)
    if arr.size == 0 or (arr.min() >= 0.0 and arr.max() <= 1.0):  # no NaN: _scores checked
        return arr
    bad = (arr < 0.0) | (arr > 1.0)
    if bad.any():
        first = arr[np.flatnonzero(bad)[0]]
        raise DataError(
            f"{name} must be probabilities in [0, 1]; got {int(bad.sum())} value(s) outside, "
            f"e.g. {first!r}"
        )
    return arr


def _weights(values: object, name: str) -> np.ndarray:
    arr = _scores(values, name)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise DataError(f"{name} must be finite and non-negative; got min {arr.min()!r}")
    return arr


def _group_codes(values: object, name: str) -> np.ndarray:
    """Group ids as a sortable integer-like array (shape (N,))."""
    arr = _as_1d(values, name)
    if arr.dtype.kind in "iub":
        return arr
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise DataError(
            f"{name} contains {int(np.isnan(arr).sum())} NaN group id(s); expected none"
        )
    try:
        _, codes = np.unique(arr, return_inverse=True)
    except TypeError as exc:
        raise DataError(f"{name} group ids are not sortable (dtype {arr.dtype}): {exc}") from exc
    return codes.reshape(-1)


def _float32_order(s: np.ndarray) -> np.ndarray | None:
    """(N,) uint64 keys that sort as the scores ``s`` do, equal keys for equal scores, each
    below 2**32; None unless every score is a float32 value (model outputs are: esmm scores in
    float32 and widens them to float64)."""
    s32 = s.astype(np.float32)
    s32 += np.float32(0.0)  # -0.0 -> +0.0: the two compare equal, their bits do not
    if not np.array_equal(s32, s):
        return None
    bits = s32.view(np.uint32)
    # IEEE order as unsigned order: flip every bit of negatives, set the sign bit of others.
    neg = bits >= np.uint32(0x80000000)
    key = np.where(neg, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    return key


def _packed_sort(y: np.ndarray, s: np.ndarray, g: np.ndarray | None = None
                 ) -> tuple[np.ndarray, ...] | None:
    """Rows sorted by (group, score) through one sort of packed integer keys, or None when
    they do not fit 64 bits.

    A row's key is ``group << 33 | score_order << 1 | label`` (group 0 when ``g`` is None):
    sorting these (N,) uint64 values, with no permutation to carry, is several times faster
    than ``argsort`` / ``lexsort`` of the columns, and each column is read back from the sorted
    keys. Equal (group, score) rows stay adjacent, as the tie blocks of the AUC need; their
    order by label does not change any sum taken over a block.

    Returns:
        (scores as order keys, labels, group codes (when ``g`` is given)), each (N,) sorted.
    """
    key = _float32_order(s)
    if key is None:
        return None
    if g is not None:
        if g.dtype.kind not in "iu" or len(g) == 0:
            return None
        lo, hi = int(g.min()), int(g.max())
        if hi - lo >= 1 << 30:
            return None
        # In g's own dtype: exact, as the range fits 30 bits (and uint64 ids may not fit int64).
        key |= (g - g.dtype.type(lo)).astype(np.uint64) << np.uint64(32)
    key <<= np.uint64(1)
    key |= y.astype(np.uint64)
    key.sort()
    y_sorted = (key & np.uint64(1)).astype(y.dtype)
    key >>= np.uint64(1)
    if g is None:
        return key, y_sorted
    return key & np.uint64(0xFFFFFFFF), y_sorted, key >> np.uint64(32)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def auc(labels: object, scores: object, weights: object | None = None) -> float:
    """Exact area under the ROC curve.

    Equals ``P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)`` over (weighted) pairs
    of one positive and one negative row, i.e. tied scores are averaged; this is the same value
    as ``sklearn.metrics.roc_auc_score``. One O(N log N) sort, then segment sums over runs of
    equal scores.

    Args:
        labels: shape (N,), 0/1.
        scores: shape (N,), any real values (higher means more likely positive), no NaN.
        weights: optional shape (N,), non-negative sample weights.

    Returns:
        The AUC in [0, 1], or ``nan`` when only one class is present (no positive or no
        negative rows, or all of one class's weight is zero) -- including empty input.
    """
    y = _binary(labels, "labels")
    s = _scores(scores, "scores")
    arrays = {"labels": y, "scores": s}
    w = None
    if weights is not None:
        w = _weights(weights, "weights")
        arrays["weights"] = w
    n = _check_lengths(arrays)
    if n == 0:
        return math.nan

    if w is None:
        packed = _packed_sort(y, s)
        if packed is None:
            return _auc_by_class(y, s)
        s_sorted, y_sorted = packed
    else:
        order = np.argsort(s)
        s_sorted, y_sorted = s[order], y[order]
    new_block = np.empty(n, dtype=bool)
    new_block[0] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=new_block[1:])
    starts = np.flatnonzero(new_block)

    if w is None:
        # Integer arithmetic: exact, and twice the numerator avoids the 1/2 for ties.
        pos = np.add.reduceat(y_sorted, starts)
        neg = np.diff(np.append(starts, n)) - pos
        n_pos = int(pos.sum())
        n_neg = int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            logger.debug("auc: only one class present (pos=%d, neg=%d)", n_pos, n_neg)
            return math.nan
        neg_below = np.cumsum(neg) - neg
        num2 = int(np.sum(pos * (2 * neg_below + neg)))
        return num2 / (2.0 * n_pos * n_neg)

    w_sorted = w[order]
    wpos = np.add.reduceat(w_sorted * y_sorted, starts)
    wneg = np.add.reduceat(w_sorted * (1 - y_sorted), starts)
    tot_pos = float(wpos.sum())
    tot_neg = float(wneg.sum())
    if tot_pos <= 0.0 or tot_neg <= 0.0:
        logger.debug("auc: only one class has weight (pos=%g, neg=%g)", tot_pos, tot_neg)
        return math.nan
    neg_below = np.cumsum(wneg) - wneg
    return float(np.sum(wpos * (neg_below + 0.5 * wneg)) / (tot_pos * tot_neg))


def _auc_by_class(y: np.ndarray, s: np.ndarray) -> float:
    """:func:`auc` of 0/1 labels ``y`` and scores ``s`` (both (N,), N > 0) from the two
    classes' scores sorted apart (two value sorts instead of an ``argsort``, for scores that
    are not float32 values, such as a simulator's float64 probabilities).

    Each positive counts the negatives below its score plus half those equal to it:
    ``searchsorted`` left and right of it in the sorted negatives, summed in integers.
    """
    is_pos = y.astype(bool)
    pos = np.sort(s[is_pos])
    neg = np.sort(s[~is_pos])
    if len(pos) == 0 or len(neg) == 0:
        logger.debug("auc: only one class present (pos=%d, neg=%d)", len(pos), len(neg))
        return math.nan
    num2 = int(np.searchsorted(neg, pos, side="left").sum()) + \
        int(np.searchsorted(neg, pos, side="right").sum())
    return num2 / (2.0 * len(pos) * len(neg))


def grouped_auc(labels: object, scores: object, groups: object) -> float:
    """Group AUC (GAUC): per-group AUC averaged with weights equal to group size.

    ``GAUC = sum_g n_g * AUC_g / sum_g n_g`` where ``n_g`` is the number of rows (impressions)
    of group ``g`` and the sums run only over groups containing both classes; groups with only
    positives or only negatives are skipped. Ties within a group count one half, as in
    :func:`auc`.

    Implementation: one global lexicographic sort by (group, score), then segment sums over
    runs of equal (group, score) and over groups -- no Python loop over groups.

    Args:
        labels: shape (N,), 0/1.
        scores: shape (N,), real values, no NaN.
        groups: shape (N,), group ids (e.g. user ids); integers, strings or floats (no NaN).

    Returns:
        The GAUC, or ``nan`` when no group contains both classes (including empty input).
    """
    y = _binary(labels, "labels")
    s = _scores(scores, "scores")
    g = _group_codes(groups, "groups")
    n = _check_lengths({"labels": y, "scores": s, "groups": g})
    if n == 0:
        return math.nan

    packed = _packed_sort(y, s, g)
    if packed is not None:
        s_sorted, y_sorted, g_sorted = packed
    else:
        order = np.lexsort((s, g))  # last key is primary: sort by group, then by score
        g_sorted = g[order]
        s_sorted = s[order]
        y_sorted = y[order]

    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(g_sorted[1:], g_sorted[:-1], out=new_group[1:])
    new_block = new_group.copy()
    new_block[1:] |= s_sorted[1:] != s_sorted[:-1]

    block_starts = np.flatnonzero(new_block)
    pos = np.add.reduceat(y_sorted, block_starts)
    neg = np.diff(np.append(block_starts, n)) - pos

    # Negatives below each tie block within its own group: global exclusive cumsum minus the
    # value it had at the group's first block.
    neg_below = np.cumsum(neg) - neg
    block_is_group_start = new_group[block_starts]
    block_group = np.cumsum(block_is_group_start) - 1
    group_first_block = np.flatnonzero(block_is_group_start)
    neg_below -= neg_below[group_first_block][block_group]

    num2 = np.add.reduceat(pos * (2 * neg_below + neg), group_first_block)  # int64, exact
    g_pos = np.add.reduceat(pos, group_first_block)
    g_size = np.add.reduceat(neg, group_first_block) + g_pos
    g_neg = g_size - g_pos

    valid = (g_pos > 0) & (g_neg > 0)
    n_valid = int(valid.sum())
    logger.debug("grouped_auc: %d of %d groups contain both classes", n_valid, valid.size)
    if n_valid == 0:
        return math.nan
    g_auc = num2[valid] / (2.0 * g_pos[valid].astype(np.float64) * g_neg[valid])
    size = g_size[valid].astype(np.float64)
    return float(np.sum(size * g_auc) / np.sum(size))


def logloss(labels: object, probs: object, eps: float = _DEFAULT_EPS) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))`` (natural log).

    Probabilities are clipped to ``[eps, 1 - eps]`` only so that an exact 0 or 1 does not give
    ``log(0)``; with the default ``eps`` (float64 machine epsilon, as scikit-learn uses for
    float64 input) no other value is changed.

    Args:
        labels: shape (N,), 0/1.
        probs: shape (N,), probabilities in [0, 1], no NaN.
        eps: clipping margin, in [0, 0.5).

    Returns:
        The mean loss, or ``nan`` for empty input.
    """
    if not 0.0 <= eps < 0.5:
        raise DataError(f"eps must be in [0, 0.5); got {eps!r}")
    y = _binary(labels, "labels")
    p = _probs(probs, "probs")
    n = _check_lengths({"labels": y, "probs": p})
    if n == 0:
        return math.nan
    p = np.clip(p, eps, 1.0 - eps)
    with np.errstate(divide="ignore"):
        ll = np.where(y == 1, np.log(p), np.log1p(-p))
    return float(-np.mean(ll))


def pcoc(labels: object, probs: object) -> float:
    """Predicted over observed rate: ``mean(probs) / mean(labels)``.

    1.0 means calibrated on average; above 1 over-predicts.

    Args:
        labels: shape (N,), 0/1.
        probs: shape (N,), probabilities in [0, 1], no NaN.

    Returns:
        The ratio, or ``nan`` when there are no positive labels (including empty input).
    """
    y = _binary(labels, "labels")
    p = _probs(probs, "probs")
    _check_lengths({"labels": y, "probs": p})
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    return float(p.sum() / n_pos)


# --------------------------------------------------------------------------------------------
# the multi-task report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpace:
    """Which rows, prediction and label one task is measured on.

    Attributes:
        name: task name used as the metric prefix, e.g. ``"ctr"``, ``"cvr"``, ``"ctcvr"``.
        pred: key in the predictions mapping, e.g. ``"p_ctr"``.
        label: label key, e.g. ``"click"``; ``"ctcvr"`` means ``click * conversion``.
        mask: ``None`` for all rows, or a label key: only rows where that label is 1
            (``"click"`` restricts the CVR task to clicked impressions).
    """

    name: str
    pred: str
    label: str
    mask: str | None = None


DEFAULT_SPACES: tuple[MetricSpace, ...] = (
    MetricSpace("ctr", "p_ctr", "click", None),
    MetricSpace("cvr", "p_cvr", "conversion", "click"),
    MetricSpace("ctcvr", "p_ctcvr", "ctcvr", None),
)

METRIC_ORDER: tuple[str, ...] = (
    "ctr_auc",
    "ctr_gauc",
    "ctr_logloss",
    "ctr_pcoc",
    "cvr_auc",
    "cvr_gauc",
    "cvr_logloss",
    "cvr_pcoc",
    "cvr_auc_entire_space",
    "cvr_auc_entire_space_oracle",
    "ctcvr_auc",
    "ctcvr_gauc",
    "ctcvr_logloss",
    "ctcvr_pcoc",
    "n_impressions",
    "n_clicks",
    "n_conversions",
)


def compute_metrics(
    preds: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    groups: np.ndarray | None = None,
    ground_truth: Mapping[str, np.ndarray] | None = None,
    spaces: Sequence[MetricSpace] = DEFAULT_SPACES,
) -> dict[str, float]:
    """Compute the evaluation report of a CTR/CVR multi-task model.

    For each space ``s`` (default: ctr, cvr, ctcvr) this returns ``{s}_auc``, ``{s}_logloss``,
    ``{s}_pcoc`` and, when ``groups`` is given, ``{s}_gauc``, all measured on the space's rows:
    every impression for ctr and ctcvr, clicked impressions only for cvr (the mask also
    applies to the group ids). Always returns ``n_impressions``, ``n_clicks`` and
    ``n_conversions`` (clicked and converted), as floats.

    When ``ground_truth`` (e.g. from a simulator) holds ``conversion_if_clicked`` -- whether
    each impression would convert if clicked -- it also returns ``cvr_auc_entire_space``, the
    AUC of the cvr prediction against it over all impressions, and, if it also holds
    ``p_conversion`` (the true conversion probability), ``cvr_auc_entire_space_oracle``, the
    same AUC for the true probability (the best achievable value).

    Metrics that are undefined on the data (one class present, no positives) are ``nan``.

    Args:
        preds: prediction key -> probabilities, shape (N,); needs every space's ``pred`` key.
        labels: ``click`` and ``conversion``, 0/1 arrays of shape (N,); ``ctcvr`` is derived
            as ``click * conversion``.
        groups: optional group ids (user ids), shape (N,), for GAUC.
        ground_truth: optional ``conversion_if_clicked`` (0/1) and ``p_conversion``
            (probabilities), shape (N,).
        spaces: the tasks to measure.

    Raises:
        DataError: a missing key, unequal lengths, non-0/1 labels, NaN or out-of-range
            predictions.
    """
    for key in ("click", "conversion"):
        if key not in labels:
            raise DataError(f"labels is missing key {key!r}; got keys {sorted(labels)}")
    lab: dict[str, np.ndarray] = {}
    for key, values in labels.items():
        lab[key] = _binary(values, f"labels[{key!r}]")
    n = _check_lengths({f"labels[{k!r}]": v for k, v in lab.items()})
    lab.setdefault("ctcvr", lab["click"] * lab["conversion"])

    needed = list(dict.fromkeys(space.pred for space in spaces))
    missing = [k for k in needed if k not in preds]
    if missing:
        raise DataError(
            f"predictions are missing key(s) {missing}; got keys {sorted(preds)}, expected {needed}"
        )
    pr: dict[str, np.ndarray] = {}
    for key in needed:
        pr[key] = _probs(preds[key], f"preds[{key!r}]")
        _check_lengths({"labels['click']": lab["click"], f"preds[{key!r}]": pr[key]})

    grp = None
    if groups is not None:
        grp = _as_1d(groups, "groups")
        _check_lengths({"labels['click']": lab["click"], "groups": grp})

    out: dict[str, float] = {}
    for space in spaces:
        for key in (space.label, space.mask):
            if key is not None and key not in lab:
                raise DataError(
                    f"metric space {space.name!r} needs label {key!r}; got label keys {sorted(lab)}"
                )
        y = lab[space.label]
        p = pr[space.pred]
        g = grp
        if space.mask is not None:
            keep = lab[space.mask] == 1
            y, p = y[keep], p[keep]
            g = None if g is None else g[keep]
        out[f"{space.name}_auc"] = auc(y, p)
        if g is not None:
            out[f"{space.name}_gauc"] = grouped_auc(y, p, g)
        out[f"{space.name}_logloss"] = logloss(y, p)
        out[f"{space.name}_pcoc"] = pcoc(y, p)

    if ground_truth is not None and "conversion_if_clicked" in ground_truth:
        cvr_space = next((sp for sp in spaces if sp.name == "cvr"), None)
        if cvr_space is None:
            logger.debug("compute_metrics: no 'cvr' space; skipping entire-space CVR metrics")
        else:
            truth = _binary(
                ground_truth["conversion_if_clicked"], "ground_truth['conversion_if_clicked']"
            )
            _check_lengths(
                {"labels['click']": lab["click"], "ground_truth['conversion_if_clicked']": truth}
            )
            out["cvr_auc_entire_space"] = auc(truth, pr[cvr_space.pred])
            if "p_conversion" in ground_truth:
                oracle = _probs(ground_truth["p_conversion"], "ground_truth['p_conversion']")
                _check_lengths(
                    {"labels['click']": lab["click"], "ground_truth['p_conversion']": oracle}
                )
                out["cvr_auc_entire_space_oracle"] = auc(truth, oracle)

    out["n_impressions"] = float(n)
    out["n_clicks"] = float(lab["click"].sum())
    out["n_conversions"] = float(lab["ctcvr"].sum())
    return out


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _ordered_columns(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for metrics in rows.values():
        for key in metrics:
            seen.setdefault(key, None)
    rank = {name: i for i, name in enumerate(METRIC_ORDER)}
    known = sorted((k for k in seen if k in rank), key=rank.__getitem__)
    return known + [k for k in seen if k not in rank]


def _format_value(column: str, value: object, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v):
        return "nan"
    if column.startswith("n_") and math.isfinite(v) and v == int(v):
        return str(int(v))
    return fmt.format(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    columns: Sequence[str] | None = None,
    fmt: str = "{:.4f}",
    index_name: str = "model",
) -> str:
    """Render metrics of several runs as a Markdown table.

    Args:
        rows: run or model name -> metrics mapping (e.g. the output of
            :func:`compute_metrics`); one table row each, in mapping order.
        columns: metric names to show, in order; default: every metric present in any row,
            ordered by :data:`METRIC_ORDER` and then by first appearance.
        fmt: format for float values. NaN is shown as ``nan``; integer values, and integral
            values of count columns (names starting with ``n_``), are shown without decimals;
            a metric missing from a row leaves the cell empty.
        index_name: header of the first (name) column.

    Returns:
        The table as a string ending in a newline.
    """
    cols = list(columns) if columns is not None else _ordered_columns(rows)
    header = "| " + " | ".join(_cell(c) for c in [index_name, *cols]) + " |"
    rule = "|" + "|".join(["---", *("---:" for _ in cols)]) + "|"
    lines = [header, rule]
    for name, metrics in rows.items():
        cells = [_cell(name)] + [_format_value(c, metrics.get(c), fmt) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# entire-space diagnostics (simulated data: the ground truth is known for every impression)
# --------------------------------------------------------------------------------------------


def average_ranks(values: object) -> np.ndarray:
    """Ranks 1..N of ``values`` (shape (N,), no NaN), tied values sharing their mean rank.

    One sort, then one pass over runs of equal values: a run covering sorted positions a..b
    (0-based) gets rank (a + b) / 2 + 1, so the order of tied values within their run does not
    matter. Returns float64, shape (N,).
    """
    x = _scores(values, "values")
    n = len(x)
    order, xs = _sorted_order(x)
    new_run = np.empty(n, dtype=bool)
    if n:
        new_run[0] = True
        np.not_equal(xs[1:], xs[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n) - 1
    run_rank = 0.5 * (starts + ends).astype(np.float64) + 1.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts + 1)
    return ranks


def _sorted_order(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, keys): a permutation sorting ``x`` (N,) and (N,) keys in that order, equal
    exactly where the sorted values are equal.

    Model scores are float32 values: each row's key is then ``score_order << 32 | row`` and
    one sort of these uint64 values (no permutation to carry; several times faster than
    ``argsort``) gives both. Other values take ``argsort``.
    """
    key = _float32_order(x) if len(x) < 1 << 32 else None
    if key is None:
        order = np.argsort(x)
        return order, x[order]
    key <<= np.uint64(32)
    key |= np.arange(len(x), dtype=np.uint64)
    key.sort()
    order = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
    key >>= np.uint64(32)
    return order, key


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if denom == 0.0:
        return math.nan
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def spearman(x: object, y: object) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (each shape (N,), no NaN), exact with ties.

    The Pearson correlation of the average ranks (:func:`average_ranks`): the same value as
    ``scipy.stats.spearmanr``. ``nan`` when N < 2 or either input is constant.
    """
    a, b = _scores(x, "x"), _scores(y, "y")
    n = _check_lengths({"x": a, "y": b})
    if n < 2:
        return math.nan
    return _pearson(average_ranks(a), average_ranks(b))


def _soft_logloss(targets: np.ndarray, probs: np.ndarray, eps: float = _DEFAULT_EPS) -> float:
    """Mean cross-entropy of ``probs`` against probability ``targets`` (both (N,)): the
    expected log loss over Bernoulli(targets) labels."""
    p = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(targets * np.log(p) + (1.0 - targets) * np.log1p(-p)))


def _bernoulli_entropy(q: np.ndarray) -> float:
    """Mean entropy of Bernoulli(q), (N,) -> float; 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(q > 0, q * np.log(q), 0.0) + np.where(q < 1, (1 - q) * np.log1p(-q), 0.0))
    return float(np.mean(h))


def entire_space_diagnostics(preds: Mapping[str, np.ndarray],
                             ground_truth: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How a model's pCVR behaves on every impression, clicked or not.

    A CVR model is trained where clicks happen but used on every impression. These measure it
    there, against the simulator's ground truth, and measure how much of pCVR is click
    propensity (the leak of pCTR into pCVR through shared parameters).

    Keys, each present when its inputs are:

    * ``cvr_logloss_entire_space``, ``cvr_pcoc_entire_space``: log loss and PCOC of ``p_cvr``
      against ``conversion_if_clicked`` over all impressions;
      ``cvr_logloss_entire_space_oracle``: the log loss of ``p_conversion`` there (the floor).
    * ``cvr_logloss_p_conversion``: cross-entropy of ``p_cvr`` against the true
      ``p_conversion`` (the log loss expected over the conversion draw);
      ``cvr_kl_p_conversion``: that minus the entropy of ``p_conversion`` (mean KL divergence,
      0 only for the truth); ``cvr_pcoc_p_conversion``: ``mean(p_cvr) / mean(p_conversion)``.
    * ``cvr_ctr_spearman``: Spearman(``p_cvr``, the model's ``p_ctr``);
      ``cvr_p_click_spearman``: Spearman(``p_cvr``, the true ``p_click``).

    Args:
        preds: ``p_cvr`` and optionally ``p_ctr``, probabilities of shape (N,).
        ground_truth: any of ``conversion_if_clicked`` (0/1), ``p_conversion`` and
            ``p_click`` (probabilities), shape (N,).

    Raises:
        DataError: ``p_cvr`` missing, unequal lengths, bad labels or probabilities.
    """
    if "p_cvr" not in preds:
        raise DataError(f"predictions are missing key 'p_cvr'; got keys {sorted(preds)}")
    p = _probs(preds["p_cvr"], "preds['p_cvr']")
    arrays: dict[str, np.ndarray] = {"preds['p_cvr']": p}
    truth = p_conv = p_click = p_ctr = None
    if "p_ctr" in preds:
        p_ctr = arrays["preds['p_ctr']"] = _probs(preds["p_ctr"], "preds['p_ctr']")
    if "conversion_if_clicked" in ground_truth:
        truth = _binary(ground_truth["conversion_if_clicked"],
                        "ground_truth['conversion_if_clicked']")
        arrays["ground_truth['conversion_if_clicked']"] = truth
    if "p_conversion" in ground_truth:
        p_conv = _probs(ground_truth["p_conversion"], "ground_truth['p_conversion']")
        arrays["ground_truth['p_conversion']"] = p_conv
    if "p_click" in ground_truth:
        p_click = _probs(ground_truth["p_click"], "ground_truth['p_click']")
        arrays["ground_truth['p_click']"] = p_click
    n = _check_lengths(arrays)
    out: dict[str, float] = {}
    if n == 0:
        return out
    if truth is not None:
        out["cvr_logloss_entire_space"] = logloss(truth, p)
        out["cvr_pcoc_entire_space"] = pcoc(truth, p)
        if p_conv is not None:
            out["cvr_logloss_entire_space_oracle"] = logloss(truth, p_conv)
    if p_conv is not None:
        out["cvr_logloss_p_conversion"] = _soft_logloss(p_conv, p)
        out["cvr_kl_p_conversion"] = out["cvr_logloss_p_conversion"] - _bernoulli_entropy(p_conv)
        mean_truth = float(p_conv.mean())
        out["cvr_pcoc_p_conversion"] = float(p.mean()) / mean_truth if mean_truth else math.nan
    if (p_ctr is not None or p_click is not None) and n >= 2:
        rank_cvr = average_ranks(p)  # shared by both correlations
        if p_ctr is not None:
            out["cvr_ctr_spearman"] = _pearson(rank_cvr, average_ranks(p_ctr))
        if p_click is not None:
            out["cvr_p_click_spearman"] = _pearson(rank_cvr, average_ranks(p_click))
    return out


def pctr_as_pcvr_metrics(preds: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                         ground_truth: Mapping[str, np.ndarray] | None = None,
                         groups: np.ndarray | None = None) -> dict[str, float]:
    """The control row "pCTR used as pCVR": what click propensity alone earns on CVR ranking.

    Scores the CVR task with the model's own ``p_ctr`` in place of ``p_cvr``, under the same
    keys as :func:`compute_metrics`: ``cvr_auc`` (and ``cvr_gauc`` with ``groups``) on clicked
    impressions against ``conversion``, and ``cvr_auc_entire_space`` over all impressions
    against ``conversion_if_clicked`` when the ground truth has it, plus
    ``cvr_p_click_spearman`` when it has ``p_click``. A method's CVR AUC close to this row's
    says its pCVR ranks impressions about as its pCTR does. Log loss and PCOC are left out:
    pCTR is on the click scale, so they would measure the scale, not the ranking.

    Args:
        preds: ``p_ctr``, shape (N,).
        labels: ``click`` and ``conversion``, 0/1, shape (N,).
        ground_truth: optional ``conversion_if_clicked`` and ``p_click``, shape (N,).
        groups: optional group ids (user ids), shape (N,), for GAUC.
    """
    spaces = (MetricSpace("cvr", "p_ctr", "conversion", "click"),)
    full = compute_metrics(preds, labels, groups=groups, ground_truth=ground_truth,
                           spaces=spaces)
    keep = ("cvr_auc", "cvr_gauc", "cvr_auc_entire_space")
    out = {k: full[k] for k in keep if k in full}
    if ground_truth is not None and "p_click" in ground_truth:
        out["cvr_p_click_spearman"] = spearman(preds["p_ctr"], ground_truth["p_click"])
    return out
