"""Benchmarks: the paper's Table 2 (every method, several seeds) and a selection-bias sweep.

``run_paper`` trains BASE, AMAN, OVERSAMPLING, UNBIAS, DIVISION, ESMM-NS and ESMM once per seed
on the same splits (a seed changes the initialisation and the shuffling, never the data),
measures each best checkpoint on the test split, and writes

    OUT/results.csv   one row per method and seed, every metric (and the reference CTR
                      net's rows, method ``ctr_net``)
    OUT/report.md     mean +- std per method in the paper's layout, beside the published
                      numbers, and each method's paired per-seed difference from BASE
    OUT/auc.png       the same with error bars

``run_bias_sweep`` does the same for a few methods over a grid of the simulator's ``selection``
and ``cvr`` knobs and writes ``sweep.csv``, ``summary.csv``, ``report.md`` and one line chart
per metric (``cvr_auc_entire_space.png``, ``cvr_auc.png``, ``ctcvr_auc.png``).

Fair budget: every method has the same early stopping (patience on the validation split) and
the epoch cap ``train.epochs``, except the methods whose CVR net learns from clicked impressions
only (BASE, OVERSAMPLING, UNBIAS), whose cap is ``CLICKED_ONLY_EPOCH_FACTOR`` times larger by
default; ``budgets`` (``--budget METHOD=EPOCHS``) sets any method's cap. Early stopping watches
each method's own validation metric (``MONITOR``): ``cvr_auc`` for the methods built around a
CVR net, ``ctcvr_auc`` for those trained on CTCVR; ``--set train.early_stop.metric=...`` sets one
metric for all.

CTCVR of the methods that multiply pCVR by the pCTR of an independent CTR net (BASE, AMAN,
OVERSAMPLING, UNBIAS) uses one reference CTR net per seed, early-stopped on ``ctr_auc``, as the
paper does; each CVR net then stops on its own metric without dragging an over- or under-trained
CTR net into the CTCVR comparison. The reference runs are rows ``ctr_net`` of the results.

The setup is the demo's (``esmm.demo.demo_config``: towers 128-64, embeddings 16, every
Ali-CCP field), evaluated on the validation split after every epoch; ``--set`` changes any key
for every method.

Finished runs are kept in ``OUT/runs/<method>-seed<k>/`` (config, history, metrics and
``test_result.json``; checkpoints are deleted once measured unless ``keep_checkpoints``) and are
reused when the config and the data have not changed, so an interrupted benchmark continues
where it stopped (``fresh=True`` retrains everything).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esmm.config import Config, apply_overrides, config_from_dict
from esmm.data.tables import EncodedData, load_split
from esmm.demo import DEMO_ROWS, SIM_SEED, _sim_matches, _split_stats, demo_config
from esmm.errors import DataError, UsageError
from esmm.evaluate import evaluate_arrays, predict_arrays
from esmm.features import FeatureSpec, spec_from_config
from esmm.fsio import atomic_path, atomic_write, write_text
from esmm.metrics import METRIC_ORDER, format_table
from esmm.models import entries, model_names, reference_entry
from esmm.train import _progress_enabled, load_model, train

log = logging.getLogger(__name__)

# Every per-method fact comes from the model registry (``esmm.models.ModelEntry``).
PAPER_METHODS = tuple(e.name for e in entries("paper"))
SWEEP_METHODS = tuple(e.name for e in entries("sweep"))
ZOO_METHODS = tuple(e.name for e in entries("zoo"))
CTR_NET = "ctr_net"
DISPLAY = {**{e.name: e.display for e in entries()}, CTR_NET: "CTR net"}
# Ali-CCP, Table 2 of arXiv 1804.07931 (see ``ModelEntry.paper_table2``).
PAPER_TABLE2: dict[str, tuple[float, float, float, float]] = {
    e.name: e.paper_table2 for e in entries() if e.paper_table2 is not None}
MONITOR = {e.name: e.benchmark_monitor for e in entries()}
CLICKED_ONLY = tuple(e.name for e in entries() if e.clicked_only)
# Methods whose pCTCVR is pCVR x pCTR of an independent CTR net: in the benchmark that pCTR comes
# from one reference CTR net per seed (the reference model's architecture, early-stopped on
# ctr_auc), as in the paper, so a CVR net early-stopped on cvr_auc is not paired with an
# over-trained CTR net.
CTR_FROM_REFERENCE = tuple(e.name for e in entries() if e.ctr_from_reference)
REFERENCE = reference_entry().name
CTR_NET_MODEL = REFERENCE
_P_CTR_FILE = "test_p_ctr.npy"
_P_CVR_FILE = "test_p_cvr.npy"
CLICKED_ONLY_EPOCH_FACTOR = 3
REPORT_METRICS = ("cvr_auc", "ctcvr_auc", "cvr_auc_entire_space")
METRIC_TITLE = {"cvr_auc": "CVR AUC (clicked impressions)",
                "ctcvr_auc": "CTCVR AUC (all impressions)",
                "cvr_auc_entire_space": "CVR AUC, entire space (all impressions, ground truth)"}
_RUN_FIELDS = ("method", "seed", "epochs", "monitor", "best_step", "stopped_early", "train_s")
_RESULT_FILE = "test_result.json"


# ----------------------------------------------------------------------------- options


def parse_methods(text: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Method names from ``"base,esmm"`` (or a list), checked against the registry."""
    if text is None:
        return list(default)
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [m.strip() for m in items if m.strip()]
    if not methods:
        raise UsageError("--methods: no method given")
    unknown = [m for m in methods if m not in model_names()]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {unknown}; expected some of "
                         f"{model_names()}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise UsageError(f"--methods: listed more than once: {dup}")
    return methods


def parse_budgets(items: Sequence[str]) -> dict[str, int]:
    """``["METHOD=12", ...]`` -> ``{METHOD: 12, ...}`` (epoch caps; ``ctr_net`` is
    the reference CTR net)."""
    out: dict[str, int] = {}
    for it in items:
        name, sep, value = it.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--budget {it!r}: expected METHOD=EPOCHS, e.g. base=12")
        if name not in (*model_names(), CTR_NET):
            raise UsageError(f"--budget {it!r}: unknown method {name!r}; expected one of "
                             f"{[*model_names(), CTR_NET]}")
        try:
            epochs = int(value)
        except ValueError:
            raise UsageError(f"--budget {it!r}: EPOCHS must be a positive integer") from None
        if epochs < 1:
            raise UsageError(f"--budget {it!r}: EPOCHS must be a positive integer")
        out[name] = epochs
    return out


def parse_floats(text: str, option: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated numbers, "
                         "e.g. 0,0.5,1") from None
    if not values:
        raise UsageError(f"{option}: no value given")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} {text!r}: a value is listed more than once")
    return values


def epoch_budget(method: str, epochs: int, budgets: dict[str, int],
                 clicked_only_factor: int = CLICKED_ONLY_EPOCH_FACTOR) -> int:
    """The epoch cap of ``method``: ``budgets`` if given, else the fair default."""
    if method in budgets:
        return budgets[method]
    return epochs * clicked_only_factor if method in CLICKED_ONLY else epochs


# ----------------------------------------------------------------------------- data


def split_rows_for(rows: int) -> dict[str, int]:
    """Split sizes of a simulated benchmark set (as the demo: valid rows/4, test rows/2)."""
    return {"train": rows, "valid": max(1, rows // 4), "test": max(1, rows // 2)}


def ensure_simulation(data_dir: Path, preset: str, knobs: dict[str, Any],
                      rows: int, seed: int = SIM_SEED) -> dict[str, Any]:
    """Simulate ``train``/``valid``/``test`` into ``data_dir`` unless the same set is there.

    ``seed`` draws the simulated world (its users, items and their factors) and the
    impressions. Returns the content of ``data_dir/simulation.json``.
    """
    from esmm.data.simulate import get_preset, write_simulation

    split_rows = split_rows_for(rows)
    expect = {"preset": preset, "seed": seed, "rows": split_rows, "overrides": knobs}
    if _sim_matches(data_dir, expect):
        log.info("reusing simulated data in %s", data_dir)
    else:
        sim = get_preset(preset, **knobs)
        if data_dir.exists():
            shutil.rmtree(data_dir)
        log.info("simulating %s impressions into %s (preset %s, knobs %s)", split_rows,
                 data_dir, preset, knobs or "none")
        info = write_simulation(data_dir, sim, split_rows, seed)
        meta = dict(info)
        meta.update(expect)
        write_text(data_dir / "simulation.json", json.dumps(meta, indent=2, default=str))
    return json.loads((data_dir / "simulation.json").read_text())


def check_data_dir(data_dir: Path) -> None:
    """``data_dir`` must hold ``train``, ``valid`` and ``test`` (as ``esmm simulate`` writes)."""
    if not data_dir.is_dir():
        raise UsageError(f"--data {data_dir}: no such folder")
    missing = [s for s in ("train", "valid", "test") if not (data_dir / s).exists()]
    if missing:
        raise UsageError(f"--data {data_dir}: missing split(s) {missing}; the folder needs "
                         "train/ (training), valid/ (early stopping) and test/ (the report), "
                         "as `esmm simulate --out DIR` writes them")


def data_fingerprint(data_dir: Path) -> list[list[Any]]:
    """(relative path, size, mtime) of every file of the three splits: changes when data does."""
    out: list[list[Any]] = []
    for split in ("train", "valid", "test"):
        p = data_dir / split
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                st = f.stat()
                out.append([str(f.relative_to(data_dir)), st.st_size, st.st_mtime_ns])
    return out


@dataclass
class Splits:
    train: EncodedData
    valid: EncodedData
    test: EncodedData


def fitted_spec(cfg: Config) -> FeatureSpec:
    """The feature spec training fits on ``data.train`` (statistics, id types: see
    :mod:`esmm.data.fit`), to encode the splits the runs are scored on alike."""
    from esmm.data.fit import fit_spec

    spec = spec_from_config(cfg)
    return fit_spec(spec, cfg.data.train, cfg.data) if cfg.data.train else spec


def load_splits(cfg: Config) -> Splits:
    spec = fitted_spec(cfg)
    parts = {}
    for name, path in (("train", cfg.data.train), ("valid", cfg.data.eval),
                       ("test", cfg.data.test)):
        if not path:
            raise UsageError(f"benchmark: the {name} split is not set")
        parts[name] = load_split(path, spec, cfg.data)
        if parts[name].n == 0:
            raise DataError(f"{path}: the {name} split holds no rows")
    return Splits(**parts)


def base_tree(data_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The benchmark's config with ``--set`` applied: the demo's model and training setup,
    evaluated (for early stopping) once per epoch."""
    tree = demo_config(data_dir)
    tree["train"]["eval_every"] = None
    tree = apply_overrides(tree, overrides)
    config_from_dict(tree, "benchmark config (--set)")  # fail early, with the key's path
    return tree


# ----------------------------------------------------------------------------- runs


@dataclass
class Job:
    """One training run. ``method`` is a model name, or ``CTR_NET`` for the seed's reference
    CTR net; ``ctr_from`` is the reference run whose pCTR the method's pCTCVR uses."""

    method: str
    seed: int
    tree: dict[str, Any]
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    ctr_from: Path | None = None


def make_jobs(tree: dict[str, Any], methods: Sequence[str], seeds: int, runs_dir: Path,
              budgets: dict[str, int], overrides: Sequence[str],
              extra: dict[str, Any] | None = None, monitor: str | None = None,
              clicked_only_factor: int = CLICKED_ONLY_EPOCH_FACTOR) -> list[Job]:
    """The runs of one data set, seed-major (so early results are already paired).

    Per seed: the reference CTR net first when a method needs it (see ``CTR_FROM_REFERENCE``),
    then one run per method. Each method early-stops on its own ``MONITOR`` unless ``monitor``
    names one metric for all (``--set train.early_stop.metric`` overrides both).
    """
    cfg0 = config_from_dict(tree, "benchmark config")
    user_metric = any(o.split("=", 1)[0].strip() == "train.early_stop.metric"
                      for o in overrides)
    jobs = []
    for k in range(seeds):
        seed = cfg0.train.seed + k
        common = [f"train.seed={seed}", "train.progress=\"off\""]
        ref_dir = None
        if any(m in CTR_FROM_REFERENCE for m in methods):
            ref_dir = runs_dir / f"{CTR_NET}-seed{seed}"
            sets = [f"model.name={CTR_NET_MODEL}", "train.early_stop.metric=ctr_auc",
                    f"train.epochs={budgets.get(CTR_NET, cfg0.train.epochs)}", *common]
            jobs.append(Job(CTR_NET, seed, apply_overrides(tree, sets), ref_dir,
                            dict(extra or {})))
        for m in methods:
            cap = epoch_budget(m, cfg0.train.epochs, budgets, clicked_only_factor)
            sets = [f"model.name={m}", f"train.epochs={cap}", *common]
            if not user_metric:
                sets.append(f"train.early_stop.metric={monitor or MONITOR.get(m, 'auto')}")
            jobs.append(Job(m, seed, apply_overrides(tree, sets), runs_dir / f"{m}-seed{seed}",
                            dict(extra or {}),
                            ctr_from=ref_dir if m in CTR_FROM_REFERENCE else None))
    return jobs


def _test_metrics(job: Job, model: Any, cfg: Config, test: EncodedData) -> dict[str, float]:
    """Test metrics of a trained run.

    The reference CTR net keeps its ``ctr_*`` metrics and saves its test pCTR; a method with
    ``ctr_from`` is measured with that pCTR (pCTCVR = pCTR x its pCVR), its own CTR net's
    AUCs kept as ``own_ctr_auc`` and ``own_ctcvr_auc``.
    """
    preds = predict_arrays(model, test, cfg.train.eval_batch_size)
    metrics = evaluate_arrays(model, test, preds)
    # Kept for intervals over test users, computed after all runs of a data set finish.
    with atomic_write(job.run_dir / _P_CVR_FILE, "wb") as f:
        np.save(f, preds["p_cvr"])
    if job.method == CTR_NET:
        with atomic_write(job.run_dir / _P_CTR_FILE, "wb") as f:
            np.save(f, preds["p_ctr"])
        return {k: v for k, v in metrics.items() if k.startswith(("ctr_", "n_"))}
    if job.ctr_from is None:
        return metrics
    ref = job.ctr_from / _P_CTR_FILE
    if not ref.is_file():
        raise DataError(f"{ref} is missing: the reference CTR net of seed {job.seed} did not "
                        "finish; rerun with --fresh")
    p_ctr = np.load(ref)
    if len(p_ctr) != test.n:
        raise DataError(f"{ref} holds {len(p_ctr)} predictions for a {test.n}-row test "
                        "split; rerun with --fresh")
    combined = {"p_ctr": p_ctr, "p_cvr": preds["p_cvr"], "p_ctcvr": p_ctr * preds["p_cvr"]}
    out = evaluate_arrays(model, test, combined)
    out["own_ctr_auc"] = metrics["ctr_auc"]
    out["own_ctcvr_auc"] = metrics["ctcvr_auc"]
    return out


# Keys that change how a run is watched or saved, never its result: a finished run is reused
# whatever they hold.
_NO_RESULT_KEYS = ("progress", "checkpoint_interval_s")


def _result_keys(tree: Any) -> Any:
    if not isinstance(tree, dict) or not isinstance(tree.get("train"), dict):
        return tree
    train = {k: v for k, v in tree["train"].items() if k not in _NO_RESULT_KEYS}
    return {**tree, "train": train}


def _run_one(job: Job, get_splits: Callable[[], Splits], fingerprint: Any, fresh: bool,
             keep_checkpoints: bool, reports: bool = False) -> dict[str, Any]:
    """Train one job (or reuse its finished run) and return its result row.

    Unless ``keep_checkpoints``, the run's checkpoints are deleted once its test metrics are
    written (a checkpoint holds optimizer state too: hundreds of MB with large id tables).
    With ``reports`` the run's ``esmm report`` page is written first (:func:`run_report`).
    """
    cfg = config_from_dict(job.tree, f"{job.method} config")
    marker = job.run_dir / _RESULT_FILE
    if not fresh and marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            saved = {}
        if (_result_keys(saved.get("config")) == _result_keys(cfg.to_dict())
                and saved.get("data") == fingerprint):
            log.info("%s seed %d: reusing the finished run in %s", job.method, job.seed,
                     job.run_dir)
            if reports:
                run_report(job)
            return saved["row"]
    if job.run_dir.exists():
        shutil.rmtree(job.run_dir)
    t0 = time.perf_counter()
    splits = get_splits()
    res = train(cfg, job.run_dir, train_data=splits.train, eval_data=splits.valid)
    model, *_ = load_model(job.run_dir)
    metrics = _test_metrics(job, model, cfg, splits.test)
    row = {**job.extra, "method": job.method, "seed": job.seed, "epochs": cfg.train.epochs,
           "monitor": res.monitor, "best_step": res.best_step,
           "stopped_early": res.stopped_early,
           "train_s": round(time.perf_counter() - t0, 1), **metrics}
    write_text(marker, json.dumps({"config": cfg.to_dict(), "data": fingerprint, "row": row},
                                  default=_json_default))
    if reports:
        run_report(job)
    if not keep_checkpoints:
        shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)
    return row


REPORT_PAGE = Path("report") / "report.html"  # a run's `esmm report` page, in its folder


def run_report(job: Job) -> Path | None:
    """Write the ``esmm report`` page of a finished run on its test split, into
    ``run_dir/report/``, unless it is there. Returns the page, or None when the run's
    checkpoints are gone (a run reused from a call without ``--reports``)."""
    from esmm.report import build_report

    page = job.run_dir / REPORT_PAGE
    if page.is_file():
        return page
    if not (job.run_dir / "checkpoints").is_dir():
        log.warning("%s seed %d: no report page: the run's checkpoints were deleted by an "
                    "earlier call without --reports (rerun with --fresh to retrain it)",
                    job.method, job.seed)
        return None
    return build_report(job.run_dir, page.parent, data="test")


def report_links(out: Path, where: Sequence[tuple[dict[str, float], int, Path, list[Job]]],
                 reports: bool) -> list[str]:
    """Markdown lines of the section linking every run's report page (relative links from
    ``out/report.md``); a run without a page says why."""
    lines = ["", "## Per-run reports", ""]
    if not reports:
        return [*lines, "Not written: rerun with `--reports` for each run's `esmm report` page "
                "(curves, ROC, calibration, score histograms, per-user AUC, pCVR against the "
                "true p_conversion) on the test split; finished runs are reused.", ""]
    lines += ["Each run's `esmm report` page on the test split.", "",
              "| cell | world | method | seed | page |", "|---|---:|---|---:|---|"]
    for cell, world, _, jobs in where:
        label = ", ".join(f"{k} {v:g}" for k, v in cell.items()) or "-"
        for job in jobs:
            page = job.run_dir / REPORT_PAGE
            link = (f"[{page.relative_to(out).as_posix()}]({page.relative_to(out).as_posix()})"
                    if page.is_file() else "none (checkpoints deleted; `--fresh` retrains)")
            lines.append(f"| {label} | {world} | {DISPLAY.get(job.method, job.method)} | "
                         f"{job.seed} | {link} |")
    return [*lines, ""]


@contextmanager
def _quiet_training(progress: bool) -> Iterator[None]:
    """The trainer's per-evaluation log lines are held back (warnings still show) while a
    benchmark runs; with a progress bar, log records are printed above it."""
    train_log = logging.getLogger("esmm.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)
    try:
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                yield
        else:
            yield
    finally:
        train_log.setLevel(level)


def run_jobs(groups: Sequence[tuple[Path, list[Job]]], *, fresh: bool, progress: bool,
             keep_checkpoints: bool = False, reports: bool = False) -> list[dict[str, Any]]:
    """Run every job; ``groups`` pairs a data folder with its jobs. A group's splits are
    loaded once, when its first job needs training (not at all when every run is reused).
    ``reports``: write each run's report page (:func:`run_report`)."""
    from tqdm.auto import tqdm

    total = sum(len(j) for _, j in groups)
    rows: list[dict[str, Any]] = []
    done = 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, unit="run", desc="benchmark", disable=not progress,
               dynamic_ncols=True)
    try:
        with _quiet_training(progress):
            for data_dir, jobs in groups:
                cache: list[Splits] = []

                def get_splits(jobs: list[Job] = jobs, cache: list[Splits] = cache) -> Splits:
                    if not cache:
                        cache.append(load_splits(config_from_dict(jobs[0].tree,
                                                                  "benchmark config")))
                    return cache[0]

                fp = data_fingerprint(data_dir)
                for job in jobs:
                    where = " ".join(f"{k}={v}" for k, v in job.extra.items())
                    bar.set_description(f"{DISPLAY.get(job.method, job.method)} seed "
                                        f"{job.seed}{' ' + where if where else ''}")
                    row = _run_one(job, get_splits, fp, fresh, keep_checkpoints, reports)
                    rows.append(row)
                    done += 1
                    bar.update(1)
                    spent = time.perf_counter() - t_start
                    left = spent / done * (total - done)
                    shown = ("ctr_auc",) if job.method == CTR_NET else ("cvr_auc",
                                                                          "ctcvr_auc")
                    log.info("run %d/%d %s seed %d%s: %s (best step %s, %.0f s; about %.0f "
                             "min left)", done, total, job.method, job.seed,
                             f" ({where})" if where else "",
                             ", ".join(f"{k} {row.get(k, math.nan):.4f}" for k in shown),
                             row.get("best_step"), row.get("train_s", 0.0), left / 60)
                cache.clear()
    finally:
        bar.close()
    return rows


# ----------------------------------------------------------------------------- statistics


def _values(rows: Sequence[dict[str, Any]], method: str, metric: str) -> np.ndarray:
    return np.array([float(r[metric]) for r in rows
                     if r["method"] == method and metric in r], dtype=np.float64)


def mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof 1; nan with fewer than 2 values), ignoring nan values."""
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else math.nan)


def paired_diff(rows: Sequence[dict[str, Any]], method: str, metric: str,
                against: str = REFERENCE) -> np.ndarray:
    """Per-run ``method - against`` of ``metric`` over the runs both have (nan dropped); a run
    is a (world, seed) pair, so runs on different simulated worlds are never paired."""
    def run(r: dict[str, Any]) -> tuple[Any, Any]:
        return r.get("world", 0), r["seed"]

    ref = {run(r): float(r[metric]) for r in rows if r["method"] == against and metric in r}
    d = np.array([float(r[metric]) - ref[run(r)] for r in rows
                  if r["method"] == method and metric in r and run(r) in ref],
                 dtype=np.float64)
    return d[~np.isnan(d)]


def _pct(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return "nan"
    m = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return m if math.isnan(std) else f"{m} ± {100 * std:.2f}"


def _present(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    return [k for k in metrics
            if any(k in r and not math.isnan(float(r[k])) for r in rows)]


# ----------------------------------------------------------------------------- files


def write_csv(path: Path, rows: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> None:
    """Rows as CSV: ``first`` columns, run fields, then metrics in the report's order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    rank = {k: i for i, k in enumerate(METRIC_ORDER)}
    lead = [k for k in dict.fromkeys((*first, *_RUN_FIELDS)) if k in keys]
    rest = sorted((k for k in keys if k not in lead), key=lambda k: (rank.get(k, len(rank)), k))
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=lead + rest)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in r.items()})


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paper_chart(path: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str],
                metrics: Sequence[str], seeds: int) -> None:
    """AUC per method (mean, error bar = std over seeds) and the paired difference from BASE."""
    plt = _pyplot()
    with_base = REFERENCE in methods and len(methods) > 1
    fig, axes = plt.subplots(1, 2 if with_base else 1, figsize=(13 if with_base else 7, 4.5),
                             squeeze=False)
    x = np.arange(len(methods))
    width = 0.8 / max(len(metrics), 1)
    ax = axes[0][0]
    for i, k in enumerate(metrics):
        stats = [mean_std(_values(rows, m, k)) for m in methods]
        ax.errorbar(x + (i - (len(metrics) - 1) / 2) * width, [s[0] for s in stats],
                    yerr=[0.0 if math.isnan(s[1]) else s[1] for s in stats], fmt="o",
                    capsize=4, label=k)
    ax.set_xticks(x, [DISPLAY.get(m, m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel("AUC (test split)")
    ax.set_title(f"AUC, mean ± std over {seeds} seed(s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if with_base:
        ax = axes[0][1]
        others = [m for m in methods if m != REFERENCE]
        xo = np.arange(len(others))
        for i, k in enumerate(metrics):
            stats = [mean_std(paired_diff(rows, m, k)) for m in others]
            ax.errorbar(xo + (i - (len(metrics) - 1) / 2) * width, [s[0] for s in stats],
                        yerr=[0.0 if math.isnan(s[1]) else s[1] for s in stats], fmt="o",
                        capsize=4, label=k)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xo, [DISPLAY.get(m, m) for m in others], rotation=30, ha="right")
        ax.set_ylabel("AUC difference")
        ax.set_title(f"Paired per-seed difference from {DISPLAY[REFERENCE]}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- paper


def _setup_lines(cfg: Config, methods: Sequence[str], budgets: dict[str, int],
                 overrides: Sequence[str], jobs: Sequence[Job]) -> list[str]:
    t = cfg.train
    caps = {j.method: j.tree["train"]["epochs"] for j in jobs}
    mons = {j.method: config_from_dict(j.tree).train.early_stop.metric for j in jobs}
    every = f"every {t.eval_every} steps" if t.eval_every else "after every epoch"
    if CTR_NET in caps:
        methods = [CTR_NET, *methods]
    lines = [
        f"Model: towers {cfg.model.tower}, embedding dim {cfg.model.embedding_dim}, "
        f"{len(cfg.features)} feature fields. Training: batch {t.batch_size}, "
        f"{t.optimizer.name} lr {t.optimizer.lr}, embeddings {t.sparse_optimizer.name}; "
        f"evaluation on `valid` {every}, early stopping with "
        f"patience {t.early_stop.patience}. `--set` overrides: "
        f"{', '.join(f'`{o}`' for o in overrides) or 'none'}.",
        "",
        "| method | epoch cap | early stopping on |",
        "|---|---:|---|",
    ]
    for m in methods:
        lines.append(f"| {DISPLAY.get(m, m)} | {caps[m]} | `{mons[m]}` |")
    ref = [DISPLAY.get(m, m) for m in methods if m in CTR_FROM_REFERENCE]
    own = [DISPLAY.get(m, m) for m in methods if m not in CTR_FROM_REFERENCE and m != CTR_NET]
    if ref:
        lines += ["", f"pCTCVR of {', '.join(ref)} is pCVR x pCTR of the seed's CTR net (the "
                  "BASE architecture trained on clicks over all impressions, early-stopped on "
                  "`ctr_auc`), as in the paper; the AUCs with each method's own CTR net are "
                  "kept in the CSV results as `own_ctr_auc` and `own_ctcvr_auc`."
                  + (f" {', '.join(own)} use their own pCTR." if own else "")]
    return lines


def paper_report(rows: Sequence[dict[str, Any]], methods: Sequence[str], seeds: int,
                 header: Sequence[str]) -> str:
    """The Markdown report of the paper benchmark."""
    metrics = _present(rows, REPORT_METRICS)
    lines = ["# ESMM paper benchmark (Table 2 layout)", "", *header, ""]
    lines += [f"## AUC (%) on the test split, mean ± std over {seeds} seed(s)", ""]
    cols = ["CVR AUC (clicked)", "CTCVR AUC (all)"]
    if "cvr_auc_entire_space" in metrics:
        cols.append("CVR AUC, entire space")
    cols += ["paper: CVR AUC", "paper: CTCVR AUC"]
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for m in methods:
        cells = [_pct(*mean_std(_values(rows, m, "cvr_auc"))),
                 _pct(*mean_std(_values(rows, m, "ctcvr_auc")))]
        if "cvr_auc_entire_space" in metrics:
            cells.append(_pct(*mean_std(_values(rows, m, "cvr_auc_entire_space"))))
        paper = PAPER_TABLE2.get(m)
        cells += ([f"{paper[0]:.2f} ± {paper[1]:.2f}", f"{paper[2]:.2f} ± {paper[3]:.2f}"]
                  if paper else ["", ""])
        lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's numbers are on Ali-CCP (10 runs); on other data only the order "
              "of the methods and the size of the gaps compare.", ""]
    if REFERENCE in methods and len(methods) > 1:
        ref = DISPLAY[REFERENCE]
        lines += [f"## Paired difference from {ref} (AUC points, per seed: mean ± std; "
                  f"seeds where the method beats {ref})", ""]
        lines.append("| model | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---:|" * len(metrics))
        for m in methods:
            if m == REFERENCE:
                continue
            cells = []
            for k in metrics:
                d = paired_diff(rows, m, k)
                cells.append(f"{_pct(*mean_std(d), signed=True)} ({int((d > 0).sum())}/{len(d)})"
                             if len(d) else "")
            lines.append(f"| {DISPLAY.get(m, m)} - {ref} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![AUC per method](auc.png)", "", "## Every run (test split)", ""]
    table = {f"{DISPLAY.get(r['method'], r['method'])} (seed {r['seed']})": r for r in rows}
    cols_all = [k for k in (*METRIC_ORDER, "own_ctr_auc", "own_ctcvr_auc")
                if any(k in r for r in rows) and not k.startswith("n_")]
    lines.append(format_table(table, columns=["best_step", *cols_all]))
    lines += ["`cvr_auc` is measured on clicked impressions only (the paper's CVR AUC); "
              "`ctcvr_auc` over all impressions. `cvr_auc_entire_space` (simulated data only) "
              "scores pCVR against `conversion_if_clicked` over all impressions; "
              "`cvr_auc_entire_space_oracle` does the same for the true p_conversion: the "
              "ceiling. Methods other than ESMM, ESMM-NS and DIVISION rank CTCVR by "
              "pCVR x pCTR, the pCTR coming from the seed's CTR net (rows `CTR net`); "
              "`own_ctr_auc` and `own_ctcvr_auc` use the method's own CTR net instead."]
    return "\n".join(lines) + "\n"


def run_paper(out: str | Path, *, data: str | Path | None = None, seeds: int = 3,
              methods: Sequence[str] = PAPER_METHODS, overrides: Sequence[str] = (),
              rows: int | None = None, preset: str = "aliccp",
              knobs: dict[str, Any] | None = None, budgets: dict[str, int] | None = None,
              fresh: bool = False, keep_checkpoints: bool = False, world_seeds: int = 1,
              n_boot: int = 200, reports: bool = False) -> str:
    """Run the paper benchmark into ``out``; returns the Markdown report.

    Args:
        data: a folder with ``train``, ``valid`` and ``test``; None simulates one into
            ``out/data`` (``preset``, ``knobs``, ``rows`` training impressions).
        seeds: runs per method; seed k uses ``train.seed + k``.
        overrides: ``--set`` config overrides applied to every run.
        budgets: epoch cap per method (default: see :func:`epoch_budget`).
        fresh: retrain runs that a previous call finished.
        keep_checkpoints: keep each run's ``checkpoints/`` (default: deleted once measured).
        world_seeds: simulated worlds (data seeds ``SIM_SEED + w``); each runs every seed.
        n_boot: bootstrap replicates over test users for the interval tables.
        reports: write each run's ``esmm report`` page (``runs/.../report/report.html``),
            linked from ``report.md``.
    """
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: need at least 1")
    out = Path(out)
    methods = parse_methods(list(methods), PAPER_METHODS)
    budgets = dict(budgets or {})
    knobs = dict(knobs or {})
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    where, source = world_jobs(
        out, data, rows, preset, knobs, world_seeds, overrides,
        lambda tree, runs, extra: make_jobs(tree, methods, seeds, runs, budgets, overrides,
                                            extra=extra))
    jobs = where[0][3]
    cfg0 = config_from_dict(jobs[0].tree, "benchmark config")
    progress = _progress_enabled(cfg0.train.progress)
    results = run_jobs([(d, j) for _, _, d, j in where], fresh=fresh, progress=progress,
                       keep_checkpoints=keep_checkpoints, reports=reports)

    metrics = _present(results, REPORT_METRICS)
    write_csv(out / "results.csv", results)
    paper_chart(out / "auc.png", results, methods, metrics, seeds)
    header = [source, "", *_setup_lines(cfg0, methods, budgets, overrides, jobs), "",
              f"Seeds: {seeds} (train.seed {cfg0.train.seed} to {cfg0.train.seed + seeds - 1})"
              f" on each of {world_seeds} world(s). Total time "
              f"{time.perf_counter() - t0:.0f} s."]
    text = paper_report(results, methods, seeds * world_seeds, header)
    text += "\n".join(interval_section(results, where, methods, n_boot, out)) + "\n"
    text += "\n".join(report_links(out, where, reports))
    write_text(out / "report.md", text)
    log.info("wrote %s, %s and %s", out / "results.csv", out / "report.md", out / "auc.png")
    return text


# ----------------------------------------------------------------------------- bias sweep


def _cell_name(cvr: float, selection: float) -> str:
    return f"cvr{cvr:g}-sel{selection:g}"


def sweep_summary(rows: Sequence[dict[str, Any]], methods: Sequence[str],
                  cells: Sequence[tuple[float, float]],
                  metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (cvr, selection, method): mean, std and paired difference from BASE."""
    out = []
    for c, s in cells:
        sub = [r for r in rows if r["cvr"] == c and r["selection"] == s]
        for m in methods:
            row: dict[str, Any] = {"cvr": c, "selection": s, "method": m,
                                   "seeds": len(_values(sub, m, "ctr_auc"))}
            for k in metrics:
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std(_values(sub, m, k))
                if m != REFERENCE and REFERENCE in methods:
                    row[f"{k}_minus_base_mean"], row[f"{k}_minus_base_std"] = mean_std(
                        paired_diff(sub, m, k))
            out.append(row)
    return out


def sweep_chart(path: Path, summary: Sequence[dict[str, Any]], methods: Sequence[str],
                cvrs: Sequence[float], selections: Sequence[float], metric: str) -> None:
    """``metric`` against selection, one panel per cvr, one line per method (± std)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cvrs), figsize=(4.2 * len(cvrs), 3.8), squeeze=False,
                             sharey=True)
    xs = sorted(selections)
    for ax, c in zip(axes[0], cvrs, strict=True):
        for m in methods:
            pts = {r["selection"]: r for r in summary if r["cvr"] == c and r["method"] == m}
            mean = [pts[s][f"{metric}_mean"] for s in xs]
            std = [0.0 if math.isnan(pts[s][f"{metric}_std"]) else pts[s][f"{metric}_std"]
                   for s in xs]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=DISPLAY.get(m, m))
        ax.set_title(f"cvr = {c:g}")
        ax.set_xlabel("selection")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(METRIC_TITLE.get(metric, metric) + ", mean ± std over seeds")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def sweep_report(summary: Sequence[dict[str, Any]], methods: Sequence[str],
                 cells: Sequence[tuple[float, float]], metrics: Sequence[str],
                 header: Sequence[str]) -> str:
    lines = ["# Selection-bias sweep", "", *header, ""]
    by = {(r["cvr"], r["selection"], r["method"]): r for r in summary}
    for k in metrics:
        lines += [f"## {METRIC_TITLE.get(k, k)}: `{k}` (%), mean ± std over seeds", ""]
        lines.append("| cvr | selection | " + " | ".join(DISPLAY.get(m, m) for m in methods)
                     + " |")
        lines.append("|---:|---:|" + "---:|" * len(methods))
        for c, s in cells:
            cells_txt = [_pct(by[(c, s, m)][f"{k}_mean"], by[(c, s, m)][f"{k}_std"])
                         for m in methods]
            lines.append(f"| {c:g} | {s:g} | " + " | ".join(cells_txt) + " |")
        others = [m for m in methods if m != REFERENCE]
        if REFERENCE in methods and others:
            lines += ["", f"Paired difference from {DISPLAY[REFERENCE]}, `{k}` (AUC points, "
                      "mean ± std over "
                      "seeds):", ""]
            lines.append("| cvr | selection | " + " | ".join(
                f"{DISPLAY.get(m, m)} - {DISPLAY[REFERENCE]}" for m in others) + " |")
            lines.append("|---:|---:|" + "---:|" * len(others))
            for c, s in cells:
                cells_txt = [_pct(by[(c, s, m)][f"{k}_minus_base_mean"],
                                  by[(c, s, m)][f"{k}_minus_base_std"], signed=True)
                             for m in others]
                lines.append(f"| {c:g} | {s:g} | " + " | ".join(cells_txt) + " |")
        lines += ["", f"![{k}]({k}.png)", ""]
    return "\n".join(lines) + "\n"


def run_bias_sweep(out: str | Path, *, selection: Sequence[float] = (0.0, 0.5, 1.0),
                   cvr: Sequence[float] = (0.1, 0.02, 0.005), seeds: int = 2,
                   rows: int = 200_000, methods: Sequence[str] = SWEEP_METHODS,
                   preset: str = "dense", knobs: dict[str, Any] | None = None,
                   overrides: Sequence[str] = (), budgets: dict[str, int] | None = None,
                   fresh: bool = False, keep_checkpoints: bool = False,
                   world_seeds: int = 1, n_boot: int = 200, reports: bool = False) -> str:
    """Train ``methods`` on simulated sets per (cvr, selection) and chart the metrics.

    World w of every cell uses simulator seed ``SIM_SEED + w``, so the cells differ only in
    the two knobs (``world_seeds`` worlds per cell; one keeps the folders of earlier calls).
    Writes ``sweep.csv`` (one row per cell, method and seed), ``summary.csv``, ``report.md``
    and ``<metric>.png`` into ``out``, with ``reports`` each run's report page (see
    :func:`run_paper`); returns the report.
    """
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: need at least 1")
    if world_seeds < 1:
        raise UsageError(f"--world-seeds {world_seeds}: need at least 1")
    out = Path(out)
    methods = parse_methods(list(methods), SWEEP_METHODS)
    knobs = dict(knobs or {})
    clash = sorted({"selection", "cvr"} & set(knobs))
    if clash:
        raise UsageError(f"--sim-set {clash}: the sweep sets these knobs itself; use "
                         "--selection and --cvr")
    selection = [float(s) for s in selection]
    cvr = [float(c) for c in cvr]
    budgets = dict(budgets or {})
    from esmm.data.simulate import get_preset

    for c in cvr:  # validate the whole grid before any work
        for s in selection:
            get_preset(preset, **knobs, selection=s, cvr=c)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cells = [(c, s) for c in cvr for s in selection]
    where = []
    sim_stats = {}
    for c, s in cells:
        for w in range(world_seeds):
            sub = _cell_name(c, s) if world_seeds == 1 else f"{_cell_name(c, s)}/world{w}"
            meta = ensure_simulation(out / "data" / sub, preset,
                                     {**knobs, "selection": s, "cvr": c}, rows,
                                     seed=SIM_SEED + w)
            sim_stats.setdefault((c, s), _split_stats(meta, "train"))
            tree = _evals_per_epoch(base_tree(out / "data" / sub, overrides), rows)
            jobs = make_jobs(tree, methods, seeds, out / "runs" / sub, budgets, overrides,
                             extra={"cvr": c, "selection": s, "world": w})
            where.append(({"cvr": c, "selection": s}, w, out / "data" / sub, jobs))
    groups = [(d, j) for _, _, d, j in where]
    cfg0 = config_from_dict(groups[0][1][0].tree, "benchmark config")
    progress = _progress_enabled(cfg0.train.progress)
    results = run_jobs(groups, fresh=fresh, progress=progress,
                       keep_checkpoints=keep_checkpoints, reports=reports)

    metrics = _present(results, REPORT_METRICS)
    summary = sweep_summary(results, methods, cells, metrics)
    write_csv(out / "sweep.csv", results, first=("cvr", "selection"))
    write_csv(out / "summary.csv", summary, first=("cvr", "selection", "method", "seeds"))
    for k in metrics:
        sweep_chart(out / f"{k}.png", summary, methods, cvr, selection, k)
    header = [
        f"Simulator preset `{preset}`, knobs {knobs or 'none'} plus the grid; {world_seeds} "
        f"world(s) per cell (data seeds {SIM_SEED} to {SIM_SEED + world_seeds - 1}); splits "
        f"{split_rows_for(rows)} per world. Seeds per method and world: {seeds}. "
        f"Total time {time.perf_counter() - t0:.0f} s.",
        "",
        *_setup_lines(cfg0, methods, budgets, overrides, groups[0][1]),
        "",
        "Simulated training splits per cell (world 0):",
        "",
        "| cvr | selection | ctr | conversions per click | clicks | conversions |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (c, s), st in sim_stats.items():
        header.append(f"| {c:g} | {s:g} | {st.get('ctr', math.nan):.4f} | "
                      f"{st.get('conversions_per_click', math.nan):.4f} | "
                      f"{st.get('clicks', '')} | {st.get('conversions', '')} |")
    text = sweep_report(summary, methods, cells, metrics, header)
    text += "\n".join(interval_section(results, where, methods, n_boot, out)) + "\n"
    text += "\n".join(report_links(out, where, reports))
    write_text(out / "report.md", text)
    log.info("wrote %s", ", ".join(str(out / n) for n in (
        "sweep.csv", "summary.csv", "report.md", *(f"{k}.png" for k in metrics))))
    return text


# ----------------------------------------------------------------------------- model zoo

# One early-stopping protocol for every zoo model: the sum of the two tasks' validation AUCs,
# the two axes of the seesaw, so no model is stopped where only its favoured task peaks.
ZOO_MONITOR = "ctr_auc+cvr_auc"
SEESAW_AXES = ("ctr_auc", "cvr_auc")


def zoo_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every AUC-type metric the runs report (``*_auc*``, ``*_gauc``), in the report order."""
    keys = [k for k in METRIC_ORDER if "auc" in k and not k.endswith("_oracle")]
    return _present(rows, keys)


def zoo_table(rows: Sequence[dict[str, Any]], methods: Sequence[str],
              metrics: Sequence[str]) -> list[str]:
    """Markdown lines: mean ± std per model and metric (AUC %)."""
    lines = ["| model | " + " | ".join(f"`{k}`" for k in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for m in methods:
        cells = [_pct(*mean_std(_values(rows, m, k))) for k in metrics]
        lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def zoo_diff_table(rows: Sequence[dict[str, Any]], methods: Sequence[str],
                   metrics: Sequence[str]) -> list[str]:
    """Markdown lines: per-seed difference from the reference, mean ± std (wins/seeds)."""
    ref = DISPLAY[REFERENCE]
    lines = ["| model | " + " | ".join(f"`{k}`" for k in metrics) + " | moved both |",
             "|---|" + "---:|" * len(metrics) + "---|"]
    for m in methods:
        if m == REFERENCE:
            continue
        cells = []
        for k in metrics:
            d = paired_diff(rows, m, k)
            cells.append(f"{_pct(*mean_std(d), signed=True)} ({int((d > 0).sum())}/{len(d)})"
                         if len(d) else "")
        lines.append(f"| {DISPLAY.get(m, m)} - {ref} | " + " | ".join(cells)
                     + f" | {seesaw_verdict(rows, m)} |")
    return lines


def seesaw_verdict(rows: Sequence[dict[str, Any]], method: str) -> str:
    """How ``method`` moved the two seesaw axes against the reference, seed by seed.

    A task counts as moved when the mean paired difference is more than two standard errors
    from 0 (with fewer than 2 seeds nothing counts as moved).
    """
    signs = []
    for k in SEESAW_AXES:
        d = paired_diff(rows, method, k)
        if len(d) == 0:
            # e.g. no conversion among the clicked test rows: cvr_auc is undefined.
            return f"`{k}` not measured"
        if len(d) < 2:
            return "too few seeds"
        se = float(d.std(ddof=1)) / math.sqrt(len(d))
        m = float(d.mean())
        signs.append(0 if abs(m) <= 2 * se else (1 if m > 0 else -1))
    table = {(1, 1): "both up", (-1, -1): "both down", (1, -1): "seesaw: CTR up, CVR down",
             (-1, 1): "seesaw: CVR up, CTR down", (0, 0): "neither moved"}
    if signs in ([1, 0], [0, 1]):
        return "one up, the other level"
    if signs in ([-1, 0], [0, -1]):
        return "one down, the other level"
    return table[tuple(signs)]


def seesaw_chart(path: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> None:
    """CTR AUC against CVR AUC per model (mean, error bars = std over seeds); the
    single-task reference is the star, dashed lines through it split the four quadrants."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    colors = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        (x, sx), (y, sy) = (mean_std(_values(rows, m, k)) for k in SEESAW_AXES)
        if math.isnan(x) or math.isnan(y):
            continue
        ref = m == REFERENCE
        ax.errorbar(x, y, xerr=0 if math.isnan(sx) else sx, yerr=0 if math.isnan(sy) else sy,
                    marker="*" if ref else "o", markersize=14 if ref else 6, capsize=3,
                    color="black" if ref else colors(i % 20), label=DISPLAY.get(m, m))
        ax.annotate(DISPLAY.get(m, m), (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
        if ref:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("CTR AUC (test, all impressions)")
    ax.set_ylabel("CVR AUC (test, clicked impressions)")
    ax.set_title(f"Seesaw: each model against {DISPLAY[REFERENCE]} (star), mean ± std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def zoo_report(rows: Sequence[dict[str, Any]], methods: Sequence[str], seeds: int,
               header: Sequence[str]) -> str:
    metrics = zoo_metrics(rows)
    ref = DISPLAY[REFERENCE]
    lines = ["# Multi-task model zoo: the seesaw benchmark", "", *header, "",
             f"## AUC (%) on the test split, mean ± std over {seeds} seed(s)", "",
             *zoo_table(rows, methods, metrics), "",
             f"## Paired difference from the single-task reference {ref} (AUC points, per "
             f"seed: mean ± std; seeds where the model beats {ref})", "",
             *zoo_diff_table(rows, methods, metrics), "",
             f"{ref} is the single-task reference: its CTR AUC is the seed's CTR net alone, its "
             "CVR AUC a CVR net trained on clicked impressions alone. \"moved both\" reads the "
             "`ctr_auc` and `cvr_auc` columns: a task moved when its mean paired difference is "
             "more than two standard errors from 0.", "",
             "![seesaw: CTR AUC against CVR AUC](seesaw.png)", ""]
    return "\n".join(lines) + "\n"


def run_zoo(out: str | Path, *, data: str | Path | None = None, seeds: int = 3,
            methods: Sequence[str] = ZOO_METHODS, overrides: Sequence[str] = (),
            rows: int | None = None, preset: str = "aliccp",
            knobs: dict[str, Any] | None = None, budgets: dict[str, int] | None = None,
            fresh: bool = False, keep_checkpoints: bool = False, world_seeds: int = 1,
            n_boot: int = 200, reports: bool = False) -> str:
    """Run the seesaw benchmark into ``out``; returns the Markdown report.

    Every model of ``methods`` (default: the reference, every zoo backbone under its own head
    and under ESMM's, ESMM and ESMM-NS) trains once per seed on the same splits, with the
    same epoch cap (``train.epochs``; ``budgets`` per method) and the same early stopping
    (``ZOO_MONITOR`` on the validation split). Writes ``results.csv``, ``report.md`` and
    ``seesaw.png`` (with ``reports`` each run's report page); finished runs in ``out/runs``
    are reused (see :func:`run_paper`).
    """
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: need at least 1")
    out = Path(out)
    methods = parse_methods(list(methods), ZOO_METHODS)
    knobs = dict(knobs or {})
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    budgets = dict(budgets or {})
    where, source = world_jobs(
        out, data, rows, preset, knobs, world_seeds, overrides,
        lambda tree, runs, extra: make_jobs(tree, methods, seeds, runs, budgets, overrides,
                                            extra=extra, monitor=ZOO_MONITOR,
                                            clicked_only_factor=1))
    jobs = where[0][3]
    cfg0 = config_from_dict(jobs[0].tree, "benchmark config")
    results = run_jobs([(d, j) for _, _, d, j in where], fresh=fresh,
                       progress=_progress_enabled(cfg0.train.progress),
                       keep_checkpoints=keep_checkpoints, reports=reports)
    write_csv(out / "results.csv", results)
    seesaw_chart(out / "seesaw.png", results, methods)
    header = [source, "", *_setup_lines(cfg0, methods, budgets, overrides, jobs), "",
              f"Seeds: {seeds} (train.seed {cfg0.train.seed} to {cfg0.train.seed + seeds - 1})"
              f" on each of {world_seeds} world(s). Every model: epoch cap `train.epochs`, "
              f"early stopping on `{ZOO_MONITOR}` of the validation split. Total time "
              f"{time.perf_counter() - t0:.0f} s."]
    text = zoo_report(results, methods, seeds * world_seeds, header)
    text += "\n".join(interval_section(results, where, methods, n_boot, out)) + "\n"
    text += "\n".join(report_links(out, where, reports))
    write_text(out / "report.md", text)
    log.info("wrote %s, %s and %s", out / "results.csv", out / "report.md", out / "seesaw.png")
    return text


def _benchmark_data(out: Path, data: str | Path | None, rows: int | None, preset: str,
                    knobs: dict[str, Any], world: int = 0, world_seeds: int = 1
                    ) -> tuple[Path, str]:
    """The benchmark's data folder (given, or simulated into ``out/data``, or
    ``out/data/world<w>`` with several worlds, world w with data seed ``SIM_SEED + w``) and a
    sentence describing it."""
    if data is not None:
        if rows is not None or knobs:
            raise UsageError("--rows and --sim-set describe simulated data; they cannot be "
                             "combined with --data")
        data_dir = Path(data)
        check_data_dir(data_dir)
        return data_dir, f"Data: `{data_dir}` (train / valid / test)."
    data_dir = out / "data" if world_seeds == 1 else out / "data" / f"world{world}"
    meta = ensure_simulation(data_dir, preset, knobs, rows or DEMO_ROWS, seed=SIM_SEED + world)
    seeds = (f"data seed {SIM_SEED}" if world_seeds == 1 else
             f"{world_seeds} worlds (data seeds {SIM_SEED} to {SIM_SEED + world_seeds - 1})")
    return data_dir, (f"Data: simulated, preset `{preset}`, knobs {knobs or 'none'}, {seeds}, "
                      f"splits {split_rows_for(rows or DEMO_ROWS)}. Test split (world "
                      f"{world}): " + json.dumps(_split_stats(meta, "test"), default=str))


def world_jobs(out: Path, data: str | Path | None, rows: int | None, preset: str,
               knobs: dict[str, Any], world_seeds: int, overrides: Sequence[str],
               jobs_for: Callable[[dict[str, Any], Path, dict[str, Any]], list[Job]]
               ) -> tuple[list[tuple[dict[str, float], int, Path, list[Job]]], str]:
    """The data folder and runs of every world of a one-data-set benchmark (paper, zoo).

    ``jobs_for(tree, runs_dir, extra)`` makes one world's jobs. One world keeps the folders
    ``out/data`` and ``out/runs``; several put each under ``world<w>``. Simulated data are
    evaluated ``EVALS_PER_EPOCH`` times per epoch (given data: once per epoch, its size
    unknown before loading). Returns ``(cell, world, data folder, jobs)`` per world and the
    data sentence.
    """
    if world_seeds < 1:
        raise UsageError(f"--world-seeds {world_seeds}: need at least 1")
    if data is not None and world_seeds > 1:
        raise UsageError(f"--world-seeds {world_seeds}: a world is a simulated data set; it "
                         "cannot be combined with --data (expected --world-seeds 1)")
    where = []
    source = ""
    for w in range(world_seeds):
        data_dir, text = _benchmark_data(out, data, rows, preset, knobs, w, world_seeds)
        source = source or text
        tree = base_tree(data_dir, overrides)
        if data is None:
            tree = _evals_per_epoch(tree, rows or DEMO_ROWS)
        runs = out / "runs" if world_seeds == 1 else out / "runs" / f"world{w}"
        where.append(({}, w, data_dir, jobs_for(tree, runs, {"world": w})))
    return where, source


def interval_section(results: Sequence[dict[str, Any]],
                     where: Sequence[tuple[dict[str, float], int, Path, list[Job]]],
                     methods: Sequence[str], n_boot: int, out: Path) -> list[str]:
    """Markdown lines of the entire-space tables with intervals (see
    :func:`counterfactual_report`), the control and oracle rows included, and
    ``out/intervals.csv``; empty when the test split has no simulator ground truth."""
    cfg = config_from_dict(where[0][3][0].tree, "benchmark config")
    test = load_split(cfg.data.test, fitted_spec(cfg), cfg.data)
    if not test.ground_truth or "conversion_if_clicked" not in test.ground_truth:
        return []
    rows_all, summary = _counterfactual_stats(results, where, methods, n_boot)
    write_csv(out / "intervals.csv", summary, first=(*where[0][0], "method"))
    cells = list({_cell_dir(c): c for c, *_ in where}.values())
    lines = ["## Entire-space CVR with intervals", "", INTERVALS_NOTE, ""]
    for cell in cells:
        rows = [r for r in summary if all(r.get(k) == v for k, v in cell.items())]
        if cell:
            lines += ["### " + ", ".join(f"{k} {v:g}" for k, v in cell.items()), ""]
        for k in CF_METRICS:
            lines += [f"#### {CF_TITLE[k]} (`{k}`)", "", *cell_table(rows, k), ""]
    return lines


# ----------------------------------------------------------------------------- counterfactual

# Every CVR method: the paper's (BASE, its baselines, ESMM-NS, ESMM) and the counterfactual
# estimators; two reference rows are scored without training: the control (the seed's CTR
# net's pCTR used as pCVR: what click propensity alone earns) and the oracle (the simulator's
# true p_conversion: the ceiling).
COUNTERFACTUAL_METHODS = tuple(dict.fromkeys(
    (*PAPER_METHODS, *(e.name for e in entries("counterfactual")))))
CONTROL = "pctr_as_pcvr"
ORACLE = "p_conversion"
DISPLAY.update({CONTROL: "pCTR as pCVR (control)", ORACLE: "p_conversion (oracle)"})
CF_METRICS = ("cvr_auc_entire_space", "cvr_logloss_entire_space", "cvr_auc")
CF_TITLE = {"cvr_auc_entire_space": "CVR AUC over all impressions against "
            "conversion_if_clicked",
            "cvr_logloss_entire_space": "CVR log loss over all impressions against "
            "conversion_if_clicked",
            "cvr_auc": "CVR AUC on clicked impressions"}
LOWER_IS_BETTER = frozenset({"cvr_logloss_entire_space"})
# What a method's pCVR is made of, per cell: how much it follows its own pCTR and the true
# click propensity (the leak ESCM2 calls intrinsic estimation bias), its calibration over all
# impressions, and the CTR AUC it reached (an under-fit CTR tower leaves click signal for the
# CVR tower to absorb).
CF_DIAGNOSTICS = {"cvr_ctr_spearman": "Spearman(pCVR, pCTR)",
                  "cvr_p_click_spearman": "Spearman(pCVR, true p_click)",
                  "cvr_pcoc_entire_space": "PCOC of pCVR over all impressions",
                  "ctr_auc": "its CTR AUC"}
# Evaluations on the validation split per epoch: early stopping chooses among several
# checkpoints even when the best one falls in the first epoch.
EVALS_PER_EPOCH = 4
# One early-stopping protocol for every method: validation CTR AUC + CVR AUC (clicked rows),
# observable without ground truth; the reference CTR net stops on ``ctr_auc``.
CF_MONITOR = "ctr_auc+cvr_auc"
CF_GRID = {"selection": (0.0, 0.5, 1.0), "hidden_confounder": (0.0, 1.0),
           "cvr": (0.1, 0.02)}


def replicate_aucs(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted AUC of ``scores`` (N,) against 0/1 ``labels`` (N,) under each row of
    ``weights`` (C, N): (C,), nan where a replicate lacks a class. Ties count one half, as in
    :func:`esmm.metrics.auc`; one sort serves every replicate."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    y = labels[order].astype(np.float64)
    w = weights[:, order]
    pos = np.add.reduceat(w * y, starts, axis=1)  # (C, G) positives per tie group
    neg = np.add.reduceat(w * (1.0 - y), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _row_logloss(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-row binary cross-entropy (N,), probabilities clipped as :func:`metrics.logloss`."""
    p = np.clip(probs, np.finfo(np.float64).eps, 1.0 - np.finfo(np.float64).eps)
    return -(labels * np.log(p) + (1.0 - labels) * np.log1p(-p))


@dataclass
class TestScores:
    """The test split of one simulated world and every pCVR scored on it.

    ``scores[(method, seed)]``: (N,) pCVR of one run (the control's is its CTR net's pCTR,
    the oracle's the true ``p_conversion``); ``truth``: ``conversion_if_clicked`` (N,);
    ``click``, ``conversion``: (N,) labels; ``users``: (N,) user id per row.
    """

    truth: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    users: np.ndarray
    scores: dict[tuple[str, int], np.ndarray]


def score_metrics(t: TestScores, key: tuple[str, int], w: np.ndarray) -> dict[str, np.ndarray]:
    """``CF_METRICS`` of one score under row weights ``w`` (C, N): each (C,). The control's
    log loss is nan: pCTR is on the click scale, so its log loss would measure the scale."""
    p = t.scores[key]
    clicked = t.click > 0
    out = {"cvr_auc_entire_space": replicate_aucs(t.truth, p, w),
           "cvr_auc": replicate_aucs(t.conversion[clicked], p[clicked], w[:, clicked])}
    if key[0] == CONTROL:
        out["cvr_logloss_entire_space"] = np.full(len(w), np.nan)
    else:
        out["cvr_logloss_entire_space"] = (w @ _row_logloss(t.truth, p)) / w.sum(axis=1)
    return out


def load_test_scores(cfg: Config, jobs: Sequence[Job], seeds: Sequence[int]) -> TestScores:
    """The test split's labels and ground truth, and the saved pCVR of every run in ``jobs``
    (plus the control and the oracle per seed)."""
    test = load_split(cfg.data.test, fitted_spec(cfg), cfg.data)
    gt = test.ground_truth or {}
    missing = [k for k in ("conversion_if_clicked", "p_conversion") if k not in gt]
    if missing:
        raise DataError(f"{cfg.data.test}: no ground truth {missing}; the counterfactual "
                        "benchmark needs simulated data")
    scores: dict[tuple[str, int], np.ndarray] = {}
    for job in jobs:
        name = CONTROL if job.method == CTR_NET else job.method
        path = job.run_dir / (_P_CTR_FILE if job.method == CTR_NET else _P_CVR_FILE)
        if not path.is_file():
            raise DataError(f"{path} is missing: the run finished before test predictions "
                            "were kept; rerun with --fresh")
        scores[(name, job.seed)] = np.load(path).astype(np.float64)
    for seed in seeds:
        scores[(ORACLE, seed)] = np.asarray(gt["p_conversion"], dtype=np.float64)
    users = test.groups if test.groups is not None else np.arange(test.n)
    return TestScores(truth=np.asarray(gt["conversion_if_clicked"], dtype=np.float64),
                      click=np.asarray(test.click), conversion=np.asarray(test.conversion),
                      users=np.asarray(users), scores=scores)


_BOOT_CELLS = 1 << 22


def world_replicates(t: TestScores, n_boot: int, seed: int
                     ) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Each score's ``CF_METRICS`` on ``n_boot`` resamples of the test users (the same
    resamples for every score, so differences are paired): key -> metric -> (n_boot,)."""
    from esmm.stats import bootstrap_counts

    codes = np.unique(t.users, return_inverse=True)[1]
    n_users = int(codes.max()) + 1 if len(codes) else 0
    parts: dict[tuple[str, int], dict[str, list[np.ndarray]]] = {
        k: {m: [] for m in CF_METRICS} for k in t.scores}
    # (C, N) weights are built a few replicates at a time: C * N stays near 4M cells (32 MB).
    step = max(1, _BOOT_CELLS // max(1, len(codes)))
    for counts in bootstrap_counts(n_users, n_boot, seed):
        for lo in range(0, len(counts), step):
            w = counts[lo:lo + step, codes].astype(np.float64)  # row weights per replicate
            for key in t.scores:
                for m, v in score_metrics(t, key, w).items():
                    parts[key][m].append(v)
    return {k: {m: np.concatenate(v) for m, v in d.items()} for k, d in parts.items()}


def _interval(x: np.ndarray) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(x, [2.5, 97.5])
    return float(lo), float(hi)


def cell_summary(rows: Sequence[dict[str, Any]], reps: dict[int, dict], methods: Sequence[str],
                 cell: dict[str, float]) -> list[dict[str, Any]]:
    """One summary row per method of a cell: per metric the mean over runs (worlds x
    seeds), the 95% Student-t interval across runs (``esmm.stats.seed_interval``), the 95%
    bootstrap interval over test users (``reps``: world -> key -> metric -> replicates; users
    resampled within each world, the replicate of the cell is the mean of its runs), and the
    paired difference from BASE over the same (world, seed) pairs with its interval and wins
    (``esmm.stats.paired_difference``)."""
    from esmm.stats import paired_difference, seed_interval

    def values(method: str, metric: str) -> dict[tuple[int, int], float]:
        return {(r["world"], r["seed"]): float(r[metric]) for r in rows
                if r["method"] == method and metric in r and not math.isnan(float(r[metric]))}

    out = []
    for m in methods:
        row: dict[str, Any] = {**cell, "method": m}
        for k in CF_METRICS:
            v = values(m, k)
            x = np.array(list(v.values()))
            if m == ORACLE:  # one value per world: its seeds are copies, not new draws
                x = np.array(list({w: val for (w, _), val in v.items()}.values()))
            row[f"{k}_mean"] = float(x.mean()) if len(x) else math.nan
            row[f"{k}_runs"] = len(x)
            est = seed_interval(x) if len(x) >= 2 else None
            row[f"{k}_seed_low"] = est.low if est else math.nan
            row[f"{k}_seed_high"] = est.high if est else math.nan
            user_reps = [np.mean([reps[w][(m, s)][k] for (w2, s) in v if w2 == w], axis=0)
                         for w in sorted({w for w, _ in v})]
            lo, hi = _interval(np.mean(user_reps, axis=0)) if user_reps else (math.nan,
                                                                             math.nan)
            row[f"{k}_user_low"], row[f"{k}_user_high"] = lo, hi
            ref = values(REFERENCE, k)
            pairs = sorted(set(v) & set(ref))
            if m != REFERENCE and len(pairs) >= 2:
                d = paired_difference([v[p] for p in pairs], [ref[p] for p in pairs],
                                      higher_is_better=k not in LOWER_IS_BETTER)
                row.update({f"{k}_minus_base_mean": d.mean, f"{k}_minus_base_low": d.low,
                            f"{k}_minus_base_high": d.high, f"{k}_wins": d.wins,
                            f"{k}_pairs": d.n})
        out.append(row)
    return out


def _ci(row: dict[str, Any], k: str, kind: str) -> str:
    lo, hi = row.get(f"{k}_{kind}_low", math.nan), row.get(f"{k}_{kind}_high", math.nan)
    if math.isnan(lo):
        return ""
    return f"[{100 * lo:.2f}, {100 * hi:.2f}]" if "auc" in k else f"[{lo:.4f}, {hi:.4f}]"


def _fmt(k: str, x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "nan"
    if "auc" in k:
        return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def cell_table(summary: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """Markdown lines of one cell and metric: every method's mean, both intervals and its
    paired difference from BASE with its interval and wins."""
    lines = ["| method | mean | 95% CI across runs | 95% CI over test users | "
             f"- {DISPLAY[REFERENCE]} | its 95% CI | wins |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        k = metric
        diff = r.get(f"{k}_minus_base_mean", math.nan)
        lo, hi = r.get(f"{k}_minus_base_low", math.nan), r.get(f"{k}_minus_base_high", math.nan)
        ci = "" if math.isnan(lo) else f"[{_fmt(k, lo, True)}, {_fmt(k, hi, True)}]"
        wins = (f"{r[f'{k}_wins']}/{r[f'{k}_pairs']}" if f"{k}_wins" in r else "")
        lines.append(f"| {DISPLAY.get(r['method'], r['method'])} | {_fmt(k, r[f'{k}_mean'])} | "
                     f"{_ci(r, k, 'seed')} | {_ci(r, k, 'user')} | "
                     f"{'' if math.isnan(diff) else _fmt(k, diff, True)} | {ci} | {wins} |")
    return lines


INTERVALS_NOTE = (
    "Every table: the mean over runs (worlds x seeds); the 95% Student-t interval across "
    "runs; the 95% bootstrap interval resampling the test split's users within each world "
    "(the same resamples for every method); the paired difference from "
    f"{DISPLAY[REFERENCE]} over the same (world, seed) runs with its 95% interval and the "
    "runs it wins. AUCs in %; log loss in nats (lower is better; the control has none: pCTR "
    "is on the click scale). The control row scores the seed's CTR net's pCTR as pCVR; the "
    "oracle row scores the simulator's true `p_conversion`.")
_REFERENCE_STYLE = {CONTROL: {"linestyle": ":", "color": "grey"},
                    ORACLE: {"linestyle": "--", "color": "black"}}


def counterfactual_chart(path: Path, summary: Sequence[dict[str, Any]],
                         methods: Sequence[str], grid: dict[str, Sequence[float]],
                         metric: str) -> None:
    """``metric`` against selection, one panel per (hidden confounder, cvr), one line per
    method with its 95% interval across runs as a band."""
    plt = _pyplot()
    hs, cs, ss = grid["hidden_confounder"], grid["cvr"], grid["selection"]
    fig, axes = plt.subplots(len(hs), len(cs), figsize=(max(7.0, 4.8 * len(cs)), 3.8 * len(hs)),
                             squeeze=False, sharey=True)
    by = {(r["hidden_confounder"], r["cvr"], r["selection"], r["method"]): r for r in summary}
    colors = plt.get_cmap("tab20")
    for i, h in enumerate(hs):
        for j, c in enumerate(cs):
            ax = axes[i][j]
            for n, m in enumerate(methods):
                rs = [by.get((h, c, s, m)) for s in ss]
                y = [r[f"{metric}_mean"] if r else math.nan for r in rs]
                lo = [r[f"{metric}_seed_low"] if r else math.nan for r in rs]
                hi = [r[f"{metric}_seed_high"] if r else math.nan for r in rs]
                style = _REFERENCE_STYLE.get(m, {"color": colors(n % 20)})
                ax.plot(ss, y, marker="o", label=DISPLAY.get(m, m), **style)
                ax.fill_between(ss, lo, hi, alpha=0.15, color=style["color"])
            ax.set_title(f"hidden_confounder {h:g}, cvr {c:g}", fontsize=9)
            ax.set_xlabel("selection")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{CF_TITLE.get(metric, metric)}\nmean and 95% interval across runs",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _cf_grid(selection: Sequence[float], hidden_confounder: Sequence[float],
             cvr: Sequence[float]) -> dict[str, list[float]]:
    grid = {"selection": [float(x) for x in selection],
            "hidden_confounder": [float(x) for x in hidden_confounder],
            "cvr": [float(x) for x in cvr]}
    for k, v in grid.items():
        if not v:
            raise UsageError(f"--{k.replace('_', '-')}: no value given")
        if len(set(v)) != len(v):
            raise UsageError(f"--{k.replace('_', '-')} {v}: a value is listed more than once")
    return grid


def _cell_dir(cell: dict[str, float]) -> str:
    return "-".join(f"{k}{v:g}" for k, v in cell.items())


def _evals_per_epoch(tree: dict[str, Any], train_rows: int) -> dict[str, Any]:
    """``tree`` evaluated ``EVALS_PER_EPOCH`` times per epoch (unless ``--set`` chose)."""
    if tree["train"].get("eval_every") is None:
        steps = max(1, math.ceil(train_rows / int(tree["train"]["batch_size"])))
        tree = {**tree, "train": {**tree["train"],
                                  "eval_every": max(1, steps // EVALS_PER_EPOCH)}}
    return tree


def _check_counterfactual_args(seeds: int, world_seeds: int, n_boot: int,
                               knobs: dict[str, Any]) -> None:
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: need at least 1")
    if world_seeds < 1:
        raise UsageError(f"--world-seeds {world_seeds}: need at least 1")
    if n_boot < 1:
        raise UsageError(f"--boot {n_boot}: need at least 1 bootstrap replicate")
    clash = sorted(set(CF_GRID) & set(knobs))
    if clash:
        raise UsageError(f"--sim-set {clash}: the grid sets these knobs itself; use "
                         "--selection, --hidden-confounder and --cvr")


def run_counterfactual(out: str | Path, *, selection: Sequence[float] = CF_GRID["selection"],
                       hidden_confounder: Sequence[float] = CF_GRID["hidden_confounder"],
                       cvr: Sequence[float] = CF_GRID["cvr"], world_seeds: int = 3,
                       seeds: int = 2, rows: int = 100_000,
                       methods: Sequence[str] = COUNTERFACTUAL_METHODS,
                       preset: str = "dense", knobs: dict[str, Any] | None = None,
                       overrides: Sequence[str] = (), budgets: dict[str, int] | None = None,
                       n_boot: int = 500, fresh: bool = False,
                       keep_checkpoints: bool = False, reports: bool = False) -> str:
    """Every CVR method over a grid of observed selection x hidden confounder x conversion
    rate, ``world_seeds`` simulated worlds x ``seeds`` training seeds per cell.

    World ``w`` of every cell is simulated with seed ``SIM_SEED + w``, so cells differ only in
    their knobs and worlds only in their seed. Every method has the same epoch cap and early
    stopping (``CF_MONITOR``, ``EVALS_PER_EPOCH`` evaluations per epoch). Writes
    ``results.csv`` (every run, every metric, and the control and oracle rows),
    ``summary.csv`` (per cell and method: means, intervals, paired differences),
    ``report.md`` and one line chart per metric (``<metric>.png``), with ``reports`` each
    run's report page; finished runs in ``out/runs`` are reused. Returns the report.
    """
    knobs = dict(knobs or {})
    _check_counterfactual_args(seeds, world_seeds, n_boot, knobs)
    out = Path(out)
    methods = parse_methods(list(methods), COUNTERFACTUAL_METHODS)
    if REFERENCE not in methods:
        methods = [REFERENCE, *methods]  # the paired differences are taken against it
    grid = _cf_grid(selection, hidden_confounder, cvr)
    budgets = dict(budgets or {})
    from esmm.data.simulate import get_preset

    cells = [{"selection": s, "hidden_confounder": h, "cvr": c}
             for c in grid["cvr"] for h in grid["hidden_confounder"] for s in grid["selection"]]
    for cell in cells:  # validate the whole grid before any work
        get_preset(preset, **knobs, **cell)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    groups: list[tuple[Path, list[Job]]] = []
    where: list[tuple[dict[str, float], int, Path, list[Job]]] = []
    cfg0 = None
    for cell in cells:
        for w in range(world_seeds):
            data_dir = out / "data" / _cell_dir(cell) / f"world{w}"
            ensure_simulation(data_dir, preset, {**knobs, **cell}, rows, seed=SIM_SEED + w)
            tree = _evals_per_epoch(base_tree(data_dir, overrides), rows)
            cfg0 = cfg0 or config_from_dict(tree, "benchmark config")
            jobs = make_jobs(tree, methods, seeds, out / "runs" / _cell_dir(cell) / f"world{w}",
                             budgets, overrides, extra={**cell, "world": w},
                             monitor=CF_MONITOR, clicked_only_factor=1)
            groups.append((data_dir, jobs))
            where.append((cell, w, data_dir, jobs))
    results = run_jobs(groups, fresh=fresh, progress=_progress_enabled(cfg0.train.progress),
                       keep_checkpoints=keep_checkpoints, reports=reports)
    rows_all, summary = _counterfactual_stats(results, where, methods, n_boot)
    shown = [*methods, CONTROL, ORACLE]
    write_csv(out / "results.csv", rows_all, first=(*CF_GRID, "world"))
    write_csv(out / "summary.csv", summary, first=(*CF_GRID, "method"))
    for k in CF_METRICS:
        counterfactual_chart(out / f"{k}.png", summary, shown, grid, k)
    header = [f"Simulator preset `{preset}`, knobs {knobs or 'none'} plus the grid; "
              f"{world_seeds} world(s) per cell (data seeds {SIM_SEED} to "
              f"{SIM_SEED + world_seeds - 1}) x {seeds} training seed(s); splits "
              f"{split_rows_for(rows)} per world; {n_boot} bootstrap replicates over test "
              f"users. Total time {time.perf_counter() - t0:.0f} s.", "",
              *_setup_lines(cfg0, methods, budgets, overrides, where[0][3])]
    text = counterfactual_report(summary, cells, header, rows_all, methods)
    text += "\n".join(report_links(out, where, reports))
    write_text(out / "report.md", text)
    log.info("wrote %s", ", ".join(str(out / n) for n in (
        "results.csv", "summary.csv", "report.md", *(f"{k}.png" for k in CF_METRICS))))
    return text


def _counterfactual_stats(results: Sequence[dict[str, Any]],
                          where: Sequence[tuple[dict[str, float], int, Path, list[Job]]],
                          methods: Sequence[str], n_boot: int
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run rows plus control and oracle rows, and the summary of every cell."""
    rows_all = [r for r in results if r["method"] != CTR_NET]
    summary: list[dict[str, Any]] = []
    by_cell: dict[str, list[tuple[int, TestScores]]] = {}
    cell_of: dict[str, dict[str, float]] = {}
    for cell, w, _, jobs in where:
        cfg = config_from_dict(jobs[0].tree, "benchmark config")
        seeds = sorted({j.seed for j in jobs})
        t = load_test_scores(cfg, jobs, seeds)
        ones = np.ones((1, len(t.truth)))
        for key in t.scores:
            if key[0] in (CONTROL, ORACLE):
                vals = {k: float(v[0]) for k, v in score_metrics(t, key, ones).items()}
                rows_all.append({**cell, "world": w, "method": key[0], "seed": key[1], **vals})
        by_cell.setdefault(_cell_dir(cell), []).append((w, t))
        cell_of[_cell_dir(cell)] = cell
    for name, worlds in by_cell.items():
        cell = cell_of[name]
        reps = {w: world_replicates(t, n_boot, seed=w) for w, t in worlds}
        cell_rows = [r for r in rows_all if all(r.get(k) == v for k, v in cell.items())]
        summary += cell_summary(cell_rows, reps, [*methods, CONTROL, ORACLE], cell)
    return rows_all, summary


def counterfactual_report(summary: Sequence[dict[str, Any]], cells: Sequence[dict[str, float]],
                          header: Sequence[str], results: Sequence[dict[str, Any]] = (),
                          methods: Sequence[str] = ()) -> str:
    lines = ["# Counterfactual CVR benchmark", "", *header, "", INTERVALS_NOTE, ""]
    lines += grid_overview(summary, cells, methods)
    for cell in cells:
        rows = [r for r in summary if all(r.get(k) == v for k, v in cell.items())]
        lines += [f"## {_cell_title(cell)}", ""]
        for k in CF_METRICS:
            lines += [f"### {CF_TITLE[k]} (`{k}`)", "", *cell_table(rows, k), ""]
        cell_runs = [r for r in results if all(r.get(k) == v for k, v in cell.items())]
        lines += ["### Diagnostics", "", *diagnostics_table(cell_runs, methods), ""]
    lines += [f"![{k}]({k}.png)" for k in CF_METRICS]
    return "\n".join(lines) + "\n"


def _cell_title(cell: dict[str, float]) -> str:
    return (f"selection {cell['selection']:g}, hidden_confounder "
            f"{cell['hidden_confounder']:g}, cvr {cell['cvr']:g}")


def grid_overview(summary: Sequence[dict[str, Any]], cells: Sequence[dict[str, float]],
                  methods: Sequence[str]) -> list[str]:
    """Markdown lines: per entire-space metric, every method's paired difference from the
    reference in every cell (rows: cells, columns: methods), marked where its 95% interval
    excludes zero, so the whole grid reads in one table."""
    shown = [m for m in methods if m != REFERENCE]
    lines = ["## The grid at a glance", "",
             f"Paired difference from {DISPLAY[REFERENCE]} (mean over runs; `*` where its 95% "
             "interval excludes zero; AUC in points, higher is better; log loss in nats, lower "
             "is better). The per-cell sections below give the intervals.", ""]
    for k in CF_METRICS[:2]:
        lines += [f"### {CF_TITLE[k]} (`{k}`), method - {DISPLAY[REFERENCE]}", "",
                  "| cell | " + " | ".join(DISPLAY.get(m, m) for m in shown) + " |",
                  "|---|" + "---:|" * len(shown)]
        for cell in cells:
            by = {r["method"]: r for r in summary
                  if all(r.get(c) == v for c, v in cell.items())}
            vals = [_overview_entry(by.get(m, {}), k) for m in shown]
            lines.append(f"| {_cell_title(cell)} | " + " | ".join(vals) + " |")
        lines.append("")
    return lines


def _overview_entry(row: dict[str, Any], k: str) -> str:
    diff = row.get(f"{k}_minus_base_mean", math.nan)
    if math.isnan(diff):
        return ""
    lo, hi = row[f"{k}_minus_base_low"], row[f"{k}_minus_base_high"]
    return _fmt(k, diff, True) + ("*" if lo > 0 or hi < 0 else "")


def diagnostics_table(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """Markdown lines of one cell's diagnostics (``CF_DIAGNOSTICS``): per method the mean
    over runs and its 95% Student-t interval across runs."""
    from esmm.stats import seed_interval

    lines = ["| method | " + " | ".join(CF_DIAGNOSTICS.values()) + " |",
             "|---|" + "---:|" * len(CF_DIAGNOSTICS)]
    for m in [*methods, CONTROL]:
        cols = []
        for k in CF_DIAGNOSTICS:
            x = np.array([float(r[k]) for r in runs if r["method"] == m and k in r
                          and r[k] != "" and not math.isnan(float(r[k]))])
            if not len(x):
                cols.append("")
                continue
            text = f"{x.mean():.3f}"
            if len(x) >= 2:
                est = seed_interval(x)
                text += f" [{est.low:.3f}, {est.high:.3f}]"
            cols.append(text)
        if any(cols):
            lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(cols) + " |")
    return lines
