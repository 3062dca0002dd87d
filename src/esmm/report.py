"""A run's report: one self-contained HTML page of tables and PNG plots.

``esmm report RUN [--data SPLIT] --out DIR`` scores a split with the run's best checkpoint and
writes ``DIR/report.html`` with, each as a PNG embedded in base64 (no file beside the page):

* training and validation curves from ``history.csv``: each training loss with the validation
  log loss of its task, and every validation metric by step;
* ROC curves of each task: CTR (every impression), CVR (clicked impressions), CTCVR (every
  impression, clicked and converted);
* a reliability diagram per output: observed rate against mean prediction in equal-count bins,
  with a binomial standard error per bin and the PCOC (predicted over observed);
* score histograms by label;
* the distribution of per-user AUCs (the users with both classes), whose size-weighted mean is
  the GAUC;
* where the data has the simulator's ground truth, pCVR against the true ``p_conversion`` over
  every impression.

Every array here is (N,) with N the rows of the split; nothing loops over rows or users in
Python.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import esmm
from esmm.errors import UsageError
from esmm.fsio import prepare_dir_output, write_text
from esmm.metrics import METRIC_ORDER, MetricSpace, auc, pcoc

log = logging.getLogger(__name__)

__all__ = ["Figure", "build_report", "per_group_auc", "reliability_bins", "roc_points"]

SPLITS = ("train", "eval", "test")
_BINS = 20
_NOT_CURVES = {"step", "epoch", "samples", "elapsed_s"}


@dataclass
class Figure:
    """One plot of the page: a title, a sentence saying what it shows, and its PNG bytes."""

    title: str
    caption: str
    png: bytes


# ----------------------------------------------------------------------------- numerics


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve: false and true positive rates at every distinct score threshold.

    Args:
        labels: (N,) 0/1. scores: (N,).

    Returns:
        ``(fpr, tpr)``, each (T + 1,) from (0, 0) to (1, 1); empty when a class is missing.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    # The last row of each run of equal scores: a threshold lets a tie block through whole.
    last = np.flatnonzero(np.append(s_desc[1:] != s_desc[:-1], True))
    tps = np.cumsum(y_desc)[last]
    fps = (last + 1) - tps
    return (np.concatenate([[0.0], fps / n_neg]), np.concatenate([[0.0], tps / n_pos]))


def _bin_index(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) bin of each value among k equal-count bins of ``x`` (ties split by position)."""
    n = x.size
    order = np.argsort(x, kind="stable")
    # Row r of the sorted values falls in bin floor(r * k / n): k bins of n / k rows.
    which = np.empty(n, dtype=np.int64)
    which[order] = (np.arange(n) * k) // max(n, 1)
    return which


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = _BINS
                     ) -> dict[str, np.ndarray]:
    """Equal-count bins of the predictions: mean prediction, observed rate, rows, std error.

    Args:
        labels: (N,) 0/1. probs: (N,) in [0, 1].

    Returns:
        ``pred``, ``observed``, ``count``, ``stderr``: each (B,) with B <= ``bins``
        (fewer when N is small); ``stderr`` is sqrt(p (1 - p) / n) of the observed rate.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n = p.size
    if n == 0:
        empty = np.empty(0)
        return {"pred": empty, "observed": empty, "count": empty, "stderr": empty}
    k = min(bins, n)
    which = _bin_index(p, k)
    count = np.bincount(which, minlength=k).astype(np.float64)
    pred = np.bincount(which, weights=p, minlength=k) / count
    observed = np.bincount(which, weights=y, minlength=k) / count
    stderr = np.sqrt(observed * (1 - observed) / count)
    return {"pred": pred, "observed": observed, "count": count, "stderr": stderr}


def per_group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The AUC of each group (user) that has both classes, ties counting one half.

    Mann-Whitney form: within a group, ``AUC = (R+ - n+ (n+ + 1) / 2) / (n+ n-)`` with R+ the
    sum of the positives' ranks, tied scores sharing their mean rank. One sort by (group,
    score) and segment sums: no loop over groups.

    Args:
        labels: (N,) 0/1. scores: (N,). groups: (N,) group ids.

    Returns:
        ``(aucs, sizes)``: each (G,) over the G groups with both classes, in group-id order;
        ``sum(sizes * aucs) / sum(sizes)`` is :func:`esmm.metrics.grouped_auc`.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n = y.size
    if n == 0:
        return np.empty(0), np.empty(0)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    order = np.lexsort((s, codes))
    g_s, s_s, y_s = codes[order], s[order], y[order]
    new_group = np.append(True, g_s[1:] != g_s[:-1])
    new_block = new_group | np.append(True, s_s[1:] != s_s[:-1])
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    block_id = np.cumsum(new_block) - 1
    block_start = np.flatnonzero(new_block)
    block_len = np.diff(np.append(block_start, n))
    # 1-based rank within the group of a tie block's first row, then the block's mean rank.
    first_rank = block_start - group_start[group_id[block_start]] + 1
    mean_rank = (first_rank + (block_len - 1) / 2.0)[block_id]
    rank_pos = np.bincount(group_id, weights=y_s * mean_rank)
    n_pos = np.bincount(group_id, weights=y_s)
    size = np.bincount(group_id).astype(np.float64)
    n_neg = size - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    aucs = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return aucs, size[ok]


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One metric space's rows: its name, labels (M,) and scores (M,), and groups (M,)."""

    name: str
    pred: str
    labels: np.ndarray
    scores: np.ndarray
    groups: np.ndarray | None


def task_rows(spaces: Sequence[MetricSpace], preds: Mapping[str, np.ndarray],
              click: np.ndarray, conversion: np.ndarray, groups: np.ndarray | None
              ) -> list[Task]:
    """The rows each task is measured on (CVR: clicked impressions only)."""
    lab = {"click": np.asarray(click, dtype=np.int64),
           "conversion": np.asarray(conversion, dtype=np.int64)}
    lab["ctcvr"] = lab["click"] * lab["conversion"]
    out = []
    for sp in spaces:
        y, p, g = lab[sp.label], np.asarray(preds[sp.pred], dtype=np.float64), groups
        if sp.mask is not None:
            keep = lab[sp.mask] == 1
            y, p, g = y[keep], p[keep], None if g is None else np.asarray(g)[keep]
        out.append(Task(sp.name, sp.pred, y, p, g))
    return out


# ----------------------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _grid(n: int, cols: int, size: tuple[float, float] = (4.2, 3.2)) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure as MplFigure

    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = MplFigure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def read_history(path: Path) -> dict[str, np.ndarray]:
    """``history.csv`` as columns of floats (an empty cell is NaN)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    for name in (rows[0] if rows else {}):
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(name) or "nan"))
            except ValueError:
                vals.append(math.nan)
        cols[name] = np.asarray(vals)
    return cols


def _metric_names(history: Mapping[str, np.ndarray]) -> list[str]:
    names = [k for k in history if k not in _NOT_CURVES and not k.startswith(("loss_", "n_"))
             and np.isfinite(history[k]).any()]
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(names, key=lambda k: (rank.get(k, len(rank)), k))


def curves_figures(history: Mapping[str, np.ndarray]) -> list[Figure]:
    """Each training loss beside its task's validation log loss; every validation metric."""
    out = []
    step = history["step"]
    losses = [k for k in history if k.startswith("loss_")]
    if losses:
        fig, axes = _grid(len(losses), 3)
        for ax, name in zip(axes, losses, strict=True):
            task = name[len("loss_"):]
            ax.plot(step, history[name], marker=".", label=f"training {name}")
            if f"{task}_logloss" in history:
                ax.plot(step, history[f"{task}_logloss"], marker=".",
                        label=f"validation {task}_logloss")
            ax.set(title=name, xlabel="step")
            ax.legend(fontsize=8)
        out.append(Figure("Training and validation losses", "Mean training loss of each "
                          "logging interval and the validation log loss of the same task, by "
                          "step.", _png(fig)))
    metrics = _metric_names(history)
    if metrics:
        fig, axes = _grid(len(metrics), 4, (3.6, 2.6))
        for ax, name in zip(axes, metrics, strict=True):
            ax.plot(step, history[name], marker=".")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        out.append(Figure("Validation metrics", "Every metric of the evaluation split at "
                          "each evaluation (history.csv).", _png(fig)))
    return out


def roc_figure(tasks: Sequence[Task]) -> Figure:
    fig, axes = _grid(len(tasks), 3, (4.0, 3.8))
    for ax, t in zip(axes, tasks, strict=True):
        fpr, tpr = roc_points(t.labels, t.scores)
        if fpr.size:
            ax.plot(fpr, tpr, label=f"{t.pred}: AUC {auc(t.labels, t.scores):.4f}")
        else:
            ax.text(0.5, 0.5, "one class only: undefined", ha="center")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=f"{t.name.upper()} ({t.labels.size} rows, {int(t.labels.sum())} positive)",
               xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    return Figure("ROC curves", "CTR over every impression, CVR over clicked impressions, "
                  "CTCVR over every impression (positive: clicked and converted).", _png(fig))


def reliability_figure(tasks: Sequence[Task]) -> Figure:
    fig, axes = _grid(len(tasks), 3, (4.0, 3.8))
    for ax, t in zip(axes, tasks, strict=True):
        b = reliability_bins(t.labels, t.scores)
        top = float(max(b["pred"].max(initial=0), (b["observed"] + b["stderr"]).max(initial=0)))
        top = top * 1.05 or 1.0
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="calibrated")
        ax.errorbar(b["pred"], b["observed"], yerr=b["stderr"], fmt="o-", ms=3, capsize=2,
                    label=f"{t.pred}")
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean prediction (bin)",
               ylabel="observed rate (bin)",
               title=f"{t.name.upper()}: PCOC {pcoc(t.labels, t.scores):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    return Figure("Reliability diagrams", f"Observed rate against mean prediction in up to "
                  f"{_BINS} equal-count bins of each output, with one binomial standard error; "
                  "PCOC is the mean prediction over the observed rate (1 is calibrated).",
                  _png(fig))


def histogram_figure(tasks: Sequence[Task]) -> Figure:
    fig, axes = _grid(len(tasks), 3, (4.0, 3.2))
    for ax, t in zip(axes, tasks, strict=True):
        hi = float(np.quantile(t.scores, 0.999)) if t.scores.size else 1.0
        edges = np.linspace(0.0, hi if hi > 0 else 1.0, 41)
        for value, name in ((0, "label 0"), (1, "label 1")):
            s = t.scores[t.labels == value]
            if s.size:
                ax.hist(np.minimum(s, edges[-1]), bins=edges, density=True, alpha=0.55,
                        label=f"{name} ({s.size})")
        ax.set(title=f"{t.pred} ({t.name.upper()} rows)", xlabel="score", ylabel="density")
        ax.legend(fontsize=8)
    return Figure("Score histograms by label", "Density of each output's scores among the "
                  "negatives and the positives of its task (the top 0.1% of scores are "
                  "gathered in the last bin).", _png(fig))


def per_user_figure(tasks: Sequence[Task]) -> Figure | None:
    with_groups = [t for t in tasks if t.groups is not None]
    if not with_groups:
        return None
    fig, axes = _grid(len(with_groups), 3, (4.0, 3.2))
    for ax, t in zip(axes, with_groups, strict=True):
        aucs, sizes = per_group_auc(t.labels, t.scores, t.groups)
        if aucs.size:
            ax.hist(aucs, bins=np.linspace(0, 1, 21), color="tab:purple", alpha=0.8)
            gauc = float(np.sum(sizes * aucs) / np.sum(sizes))
            ax.axvline(gauc, color="black", ls="--", lw=1, label=f"GAUC {gauc:.4f}")
            ax.axvline(float(aucs.mean()), color="tab:orange", lw=1,
                       label=f"mean {aucs.mean():.4f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no user has both classes", ha="center")
        ax.set(title=f"{t.name.upper()}: {aucs.size} users with both classes", xlabel="AUC",
               ylabel="users")
    return Figure("Per-user AUC", "AUC of each user (data.user_column) with both a positive "
                  "and a negative row in the task; GAUC weights them by rows.", _png(fig))


def truth_figure(p_cvr: np.ndarray, p_conversion: np.ndarray) -> Figure:
    """pCVR against the simulator's true conversion probability, every impression."""
    fig, axes = _grid(2, 2, (4.6, 3.8))
    top = float(max(np.quantile(p_conversion, 0.999), np.quantile(p_cvr, 0.999))) or 1.0
    hb = axes[0].hexbin(p_conversion, p_cvr, gridsize=40, bins="log", mincnt=1,
                        extent=(0, top, 0, top), cmap="viridis")
    fig.colorbar(hb, ax=axes[0], label="impressions (log)")
    axes[0].plot([0, top], [0, top], color="red", lw=0.8, ls="--")
    axes[0].set(xlabel="true p_conversion", ylabel="p_cvr", title="every impression")
    which = _bin_index(p_conversion, min(_BINS, p_cvr.size))
    count = np.maximum(np.bincount(which), 1)
    axes[1].plot(np.bincount(which, weights=p_conversion) / count,
                 np.bincount(which, weights=p_cvr) / count, "o-", ms=3, label="mean p_cvr")
    axes[1].plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="p_cvr = truth")
    axes[1].set(xlabel="true p_conversion (bin mean)", ylabel="p_cvr (bin mean)",
                title="by equal-count bins of the truth")
    axes[1].legend(fontsize=8)
    return Figure("pCVR against the true conversion probability", "The model's p_cvr over "
                  "every impression, clicked or not, against the simulator's p_conversion: "
                  "the entire-space CVR that ESMM is built to estimate.", _png(fig))


# ----------------------------------------------------------------------------- the page


_CSS = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%}p.cap{color:#555}")


def _metrics_table(metrics: Mapping[str, float]) -> str:
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    rows = []
    for k in sorted(metrics, key=lambda k: (rank.get(k, len(rank)), k)):
        v = metrics[k]
        text = f"{v:.0f}" if k.startswith("n_") else f"{v:.5f}"
        rows.append(f"<tr><td>{html.escape(k)}</td><td>{text}</td></tr>")
    return "<table><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>"


def render_html(title: str, facts: Mapping[str, Any], metrics: Mapping[str, float],
                figures: Sequence[Figure]) -> str:
    """The page: facts, the metrics table and every figure as an embedded PNG."""
    facts_html = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td>"
                         "</tr>" for k, v in facts.items())
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
             f"{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><table>{facts_html}</table>",
             "<h2>Metrics</h2>", _metrics_table(metrics)]
    for f in figures:
        data = base64.b64encode(f.png).decode("ascii")
        parts.append(f"<h2>{html.escape(f.title)}</h2><p class=\"cap\">"
                     f"{html.escape(f.caption)}</p><img alt=\"{html.escape(f.title)}\" "
                     f"src=\"data:image/png;base64,{data}\">")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _data_path(cfg: Any, data: str | Path | None) -> Path:
    """``--data``: a split of the run's config (train, eval, test) or a path."""
    if data is None:
        chosen = cfg.data.test or cfg.data.eval
        if chosen is None:
            raise UsageError("the run's config sets neither data.test nor data.eval; pass "
                             "--data PATH or --data train")
        return Path(chosen)
    if str(data) in SPLITS:
        chosen = getattr(cfg.data, str(data))
        if chosen is None:
            raise UsageError(f"--data {data}: the run's config has no data.{data}; pass a "
                             "path or another split (train, eval, test)")
        return Path(chosen)
    p = Path(data)
    if not p.exists():
        raise UsageError(f"--data {p}: does not exist; expected a split of the run "
                         f"({', '.join(SPLITS)}) or a path to data")
    return p


def build_report(run: str | Path, out: str | Path, data: str | Path | None = None,
                 batch_size: int = 8192) -> Path:
    """Score ``data`` with the run's best checkpoint and write ``out/report.html``.

    Args:
        run: a run folder (``checkpoints/best.pt``, ``history.csv``).
        out: the folder of ``report.html`` (created).
        data: ``train``, ``eval`` or ``test`` (that split of the run's config), a path, or
            None for data.test, else data.eval.

    Returns:
        The path of ``report.html``.
    """
    from esmm.checkpoint import load_model
    from esmm.data.stream import open_split
    from esmm.evaluate import evaluate_arrays, predict_split

    run = Path(run)
    if not run.is_dir():
        raise UsageError(f"RUN {run}: {'is a file' if run.exists() else 'does not exist'}; "
                         "expected a run folder (esmm train --out)")
    model, cfg, spec, ck = load_model(run)
    path = _data_path(cfg, data)
    out_dir = prepare_dir_output(out)
    split = open_split(path, spec, cfg.data)
    preds, labels = predict_split(model, split, batch_size)
    metrics = evaluate_arrays(model, labels, preds)
    figures: list[Figure] = []
    if (run / "history.csv").is_file():
        figures += curves_figures(read_history(run / "history.csv"))
    else:
        log.info("%s has no history.csv: the report has no training curves", run)
    tasks = task_rows(model.metric_spaces, preds, labels.click, labels.conversion,
                      labels.groups)
    figures += [roc_figure(tasks), reliability_figure(tasks), histogram_figure(tasks)]
    user_fig = per_user_figure(tasks)
    if user_fig is not None:
        figures.append(user_fig)
    truth = (labels.ground_truth or {}).get("p_conversion")
    if truth is not None and "p_cvr" in preds:
        figures.append(truth_figure(preds["p_cvr"], np.asarray(truth, dtype=np.float64)))
    facts = {"run": run.resolve(), "model": cfg.model.name, "checkpoint step": ck.get("step"),
             "data": path, "rows": split.n, "esmm": esmm.__version__}
    page = out_dir / "report.html"
    write_text(page, render_html(f"esmm report: {run.name}", facts, metrics, figures))
    return page
