"""The demo: simulate Ali-CCP-like data, train BASE, ESMM-NS and ESMM, compare on the test split.

With ``seeds > 1`` every model is trained once per seed on the same data (the seed changes the
initialisation and the shuffling), and the report adds mean +- std per model and the paired
per-seed differences against BASE: the fairer test, since a seed's luck is shared by the pair.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esmm.config import apply_overrides, config_from_dict
from esmm.data.tables import load_split
from esmm.evaluate import evaluate
from esmm.features import spec_from_config
from esmm.fsio import atomic_write, write_text
from esmm.metrics import format_table
from esmm.models import entries, reference_entry
from esmm.train import load_model, train

log = logging.getLogger(__name__)

DEMO_ROWS = 500_000
SIM_SEED = 2018
KEY_METRICS = ("cvr_auc_entire_space", "ctcvr_auc", "cvr_auc", "ctr_auc")
DISPLAY = {e.name: e.display for e in entries()}
REFERENCE = reference_entry().name
DEMO_MODELS = tuple(e.name for e in entries("demo"))


def demo_config(data_dir: Path) -> dict[str, Any]:
    """The demo's training config (a plain dict, validated by :class:`esmm.config.Config`)."""
    return {
        "data": {"train": str(data_dir / "train"), "eval": str(data_dir / "valid"),
                 "test": str(data_dir / "test"), "user_column": "101"},
        "features": "aliccp",
        "model": {"tower": [128, 64], "embedding_dim": 16},
        "train": {"batch_size": 2048, "epochs": 4, "optimizer": {"name": "adam", "lr": 0.002},
                  "seed": 0, "shuffle_block": 64, "eval_every": 50,
                  "early_stop": {"metric": "auto", "patience": 3}},
    }


def _split_stats(meta: dict[str, Any], split: str) -> Any:
    for key in ("splits", "rates", "stats"):
        if isinstance(meta.get(key), dict) and split in meta[key]:
            return meta[key][split]
    return {}


def _sim_matches(data_dir: Path, expect: dict[str, Any]) -> bool:
    meta = data_dir / "simulation.json"
    if not meta.is_file():
        return False
    try:
        got = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return all(got.get(k) == v for k, v in expect.items())


def _summary(results: list[dict[str, Any]], models: Sequence[str]) -> str:
    lines = ["", "### Mean +- std over seeds (test split)", ""]
    rows: dict[str, dict[str, str]] = {}
    for m in models:
        rs = [r for r in results if r["model"] == m]
        rows[DISPLAY.get(m, m)] = {
            k: f"{np.mean([r[k] for r in rs]):.4f} +- {np.std([r[k] for r in rs], ddof=1):.4f}"
            for k in KEY_METRICS if all(k in r for r in rs)
        }
    cols = [k for k in KEY_METRICS if any(k in r for r in rows.values())]
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(r.get(c, "") for c in cols) + " |")
    if REFERENCE in models:
        ref = DISPLAY[REFERENCE]
        lines += ["", f"### Paired difference against {ref}, per seed (mean +- std; wins)", ""]
        lines.append("| model | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        base = {r["seed"]: r for r in results if r["model"] == REFERENCE}
        for m in models:
            if m == REFERENCE:
                continue
            cells = []
            for k in cols:
                d = np.array([r[k] - base[r["seed"]][k] for r in results
                              if r["model"] == m and r["seed"] in base])
                wins = int((d > 0).sum())
                cells.append(f"{d.mean():+.4f} +- {d.std(ddof=1):.4f} ({wins}/{len(d)})")
            lines.append(f"| {DISPLAY.get(m, m)} - {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _demo_data(data_dir: Path, preset: str, split_rows: dict[str, int],
               knobs: dict[str, Any]) -> dict[str, Any]:
    """Simulate the demo's splits into ``data_dir`` unless the same set is already there;
    returns the content of ``data_dir/simulation.json``."""
    from esmm.data.simulate import get_preset, write_simulation

    sim = get_preset(preset, **knobs)
    expect = {"preset": preset, "seed": SIM_SEED, "rows": split_rows, "overrides": knobs}
    if _sim_matches(data_dir, expect):
        log.info("reusing simulated data in %s", data_dir)
    else:
        if data_dir.exists():
            shutil.rmtree(data_dir)
        log.info("simulating %s impressions (preset %s)", split_rows, preset)
        info = write_simulation(data_dir, sim, split_rows, SIM_SEED)
        meta = json.loads((data_dir / "simulation.json").read_text()) if (
            data_dir / "simulation.json").is_file() else dict(info)
        meta.update(expect)
        write_text(data_dir / "simulation.json", json.dumps(meta, indent=2, default=str))
    return json.loads((data_dir / "simulation.json").read_text())


def _train_models(base_tree: dict[str, Any], models: Sequence[str], seeds: int,
                  runs: Path) -> list[dict[str, Any]]:
    """Train every model once per seed on the demo's splits; one row of test metrics each."""
    from esmm.data.fit import fit_spec

    cfg0 = config_from_dict(base_tree, "demo config")
    spec = fit_spec(spec_from_config(cfg0), cfg0.data.train, cfg0.data)  # as training fits it
    train_data = load_split(cfg0.data.train, spec, cfg0.data)
    valid_data = load_split(cfg0.data.eval, spec, cfg0.data)
    test_data = load_split(cfg0.data.test, spec, cfg0.data)
    if runs.exists():
        shutil.rmtree(runs)
    results: list[dict[str, Any]] = []
    for seed in range(seeds):
        for m in models:
            tree = apply_overrides(base_tree, [f"model.name={m}", f"train.seed={seed}"])
            cfg = config_from_dict(tree, "demo config")
            t0 = time.perf_counter()
            res = train(cfg, runs / f"{m}-seed{seed}", train_data=train_data,
                        eval_data=valid_data)
            model, *_ = load_model(res.run_dir)
            metrics = evaluate(model, test_data, cfg.train.eval_batch_size)
            results.append({"model": m, "seed": seed, "best_step": res.best_step,
                            "train_s": round(time.perf_counter() - t0, 1), **metrics})
            log.info("%s seed %d: %s", m, seed, {k: round(metrics[k], 4) for k in KEY_METRICS
                                                   if k in metrics})
    return results


def _write_results(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Every run's row as CSV (nan written as ``nan``)."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        keys: list[str] = []
        for r in results:
            keys += [k for k in r if k not in keys]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in results:
            w.writerow({k: (v if not (isinstance(v, float) and math.isnan(v)) else "nan")
                        for k, v in r.items()})


def run_demo(out: str | Path, *, preset: str = "aliccp", rows: int | None = None, seeds: int = 1,
             models: Sequence[str] = DEMO_MODELS, knobs: dict | None = None,
             overrides: Sequence[str] = ()) -> str:
    """Run the demo into ``out`` and return the Markdown report (also written to report.md)."""
    out = Path(out)
    rows = rows or DEMO_ROWS
    knobs = knobs or {}
    split_rows = {"train": rows, "valid": rows // 4, "test": rows // 2}
    data_dir = out / "data"
    t_start = time.perf_counter()
    sim_meta = _demo_data(data_dir, preset, split_rows, knobs)
    base_tree = apply_overrides(demo_config(data_dir), overrides)
    results = _train_models(base_tree, models, seeds, out / "runs")

    table_rows = {f"{DISPLAY.get(r['model'], r['model'])} (seed {r['seed']})": r
                  for r in results}
    metric_cols = [k for k in results[0] if k not in ("model", "seed", "best_step", "train_s")
                   and not k.startswith("n_") and isinstance(results[0][k], float)]
    report = [
        "# esmm demo report",
        "",
        f"Simulator preset `{preset}` (knob overrides: {knobs or 'none'}), data seed {SIM_SEED}; "
        f"splits {split_rows}. Models trained on `train`, early-stopped on `valid`, measured on "
        f"`test`. Seeds: {seeds}. Total time {time.perf_counter() - t_start:.0f} s.",
        "",
        "Simulated test split: " + json.dumps(_split_stats(sim_meta, "test"), default=str),
        "",
        "## All metrics (test split)",
        "",
        format_table(table_rows, columns=metric_cols),
    ]
    if seeds > 1:
        report.append(_summary(results, models))
    report += ["", "`cvr_auc` is measured on clicked impressions only; `cvr_auc_entire_space` "
               "scores pCVR against the simulator's `conversion_if_clicked` over all impressions "
               "(what a CVR model is used for), and `cvr_auc_entire_space_oracle` is the same "
               "for the true p_conversion: the ceiling."]
    text = "\n".join(report) + "\n"
    write_text(out / "report.md", text)
    _write_results(out / "results.csv", results)
    return text
