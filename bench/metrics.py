"""Evaluation metrics at scale: esmm's exact AUC and GAUC against scikit-learn, same inputs.

Rows are synthetic but shaped like an Ali-CCP test split: CTR about 4%, about 0.5% conversions
per click, users drawn from a Zipf-like distribution, scores correlated with the labels and
rounded to float32 (so ties occur, as they do with real model outputs).

Each measurement is the median wall time of ``--repeats`` runs after one warm-up run; every row
also checks that both implementations return the same value (to 1e-9).

    reference (scikit-learn)            esmm
    roc_auc_score(y, s)                 esmm.metrics.auc(y, s)
    per-user roc_auc_score, weighted    esmm.metrics.grouped_auc(y, s, user)
    by impressions (a loop over users)  (one lexsort, no loop)

The GAUC reference loops over users in Python, so it runs on ``--gauc-rows`` rows only; the
AUC rows run at every size in ``--sizes``. ``compute_metrics`` is the full report ``esmm
evaluate`` prints (AUC, GAUC, log loss and PCOC over CTR, CVR on clicked rows, and CTCVR).

    python bench/metrics.py --markdown
    python bench/metrics.py --sizes 1000000,10000000 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import numpy as np

from esmm.metrics import auc, compute_metrics, grouped_auc

log = logging.getLogger("bench.metrics")


def make_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Labels, scores and user ids for ``n`` impressions (all shape (n,))."""
    rng = np.random.default_rng(seed)
    n_users = max(n // 50, 10)
    user = (rng.zipf(1.3, n) - 1) % n_users
    z = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(z - 3.3)))).astype(np.int8)
    conv = ((rng.random(n) < 0.05 * (1 + np.tanh(z))) & (click == 1)).astype(np.int8)
    noisy = z + rng.normal(scale=1.5, size=n)
    p_ctr = (1 / (1 + np.exp(-(noisy - 3.3)))).astype(np.float32)
    p_cvr = (0.05 * (1 + np.tanh(noisy))).astype(np.float32).clip(1e-6, 1 - 1e-6)
    return {"user": user, "click": click, "conversion": conv, "p_ctr": p_ctr,
            "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}


def sklearn_gauc(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    order = np.argsort(g, kind="stable")
    bounds = np.flatnonzero(np.diff(g[order])) + 1
    num = den = 0.0
    for idx in np.split(order, bounds):
        yy = y[idx]
        if 0 < yy.sum() < yy.size:
            num += idx.size * roc_auc_score(yy, s[idx])
            den += idx.size
    return num / den


def timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(median seconds, value) of ``fn`` over ``repeats`` runs after one warm-up."""
    value = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def one_size(n: int, repeats: int, gauc_rows: int) -> list[list[str]]:
    """Table rows for ``n`` impressions; exits if esmm and the reference disagree."""
    from sklearn.metrics import roc_auc_score

    rows: list[list[str]] = []

    def add(what: str, ref: tuple[float, float] | None, ours: tuple[float, float]) -> None:
        if ref is not None and not abs(ref[1] - ours[1]) <= 1e-9:
            raise SystemExit(f"{what} at {n} rows: esmm {ours[1]!r} != reference {ref[1]!r}")
        rows.append([what, f"{n:,}", f"{ref[0]:.3f}" if ref else "-", f"{ours[0]:.3f}",
                     f"{ref[0] / ours[0]:.1f}x" if ref else "-", f"{ours[1]:.6f}"])

    d = make_rows(n)
    y, s, user = d["click"], d["p_ctr"], d["user"]
    add("CTR AUC", timed(lambda: roc_auc_score(y, s), repeats), timed(lambda: auc(y, s), repeats))
    ref_g = timed(lambda: sklearn_gauc(y, s, user), 1) if n <= gauc_rows else None
    add("CTR GAUC", ref_g, timed(lambda: grouped_auc(y, s, user), repeats))
    preds = {k: d[k] for k in ("p_ctr", "p_cvr", "p_ctcvr")}
    labels = {k: d[k] for k in ("click", "conversion")}
    t, _ = timed(lambda: len(compute_metrics(preds, labels, groups=user)), repeats)
    rows.append(["compute_metrics (12 metrics)", f"{n:,}", "-", f"{t:.3f}", "-", "-"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="rows, comma-separated")
    ap.add_argument("--gauc-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows: list[list[str]] = []
    for n in (int(x) for x in args.sizes.split(",")):
        log.info("%d rows", n)
        rows += one_size(n, args.repeats, args.gauc_rows)

    head = ["metric", "rows", "scikit-learn s (median)", "esmm s (median)", "speed-up", "value"]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        for r in [head, *rows]:
            print("  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
