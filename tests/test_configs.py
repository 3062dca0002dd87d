"""Every shipped config under configs/ loads, trains on small simulated data and keeps the best
checkpoint by its monitor's own direction.

Each config is run from its file by the CLI with ``--set`` overrides that only point it at
small data: the data paths, embedding tables cut to at most ``MAX_BUCKETS`` rows (the shipped
tables hold millions), small batches, a step budget and frequent evaluations. The model, the
optimizer, the loader and the early-stopping settings are the config's own.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import load_config
from esmm.data.aliccp import ingest, simulate_raw
from esmm.data.simulate import get_preset, write_simulation
from esmm.train import load_checkpoint
from tests.conftest import cli_output

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SMALL_WORLD = dict(n_users=300, n_items=2_000, n_categories=40, n_shops=300, n_brands=200,
                   n_intentions=100)
ROWS = {"train": 6_000, "valid": 2_000}
SEED = 5
MAX_BUCKETS = 1_000
BATCH = 64
STEPS = 240
EVAL_EVERY = 40  # six evaluations unless early stopping ends the run sooner
runner = CliRunner()


def _schema(folder: Path) -> dict[str, bool]:
    """Column -> whether it holds lists, over every Parquet file under ``folder``."""
    cols: dict[str, bool] = {}
    for f in sorted(folder.rglob("*.parquet")):
        for field in pq.read_schema(f):
            cols[field.name] = str(field.type).startswith(("list", "large_list"))
    return cols


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The two layouts a config can be written for, from one small simulated world.

    ``tables``: ``esmm simulate`` (normalized impressions.parquet + users.parquet; 853 is a
    single id). ``ingested``: raw Ali-CCP files written by the simulator and read by
    ``esmm data aliccp`` with its default bag fields (853 is a list), as real Ali-CCP is.
    """
    root = tmp_path_factory.mktemp("configs_data")
    sim = get_preset("dense", **SMALL_WORLD)
    write_simulation(root / "tables", sim, ROWS, SEED)
    simulate_raw(root / "raw", sim, ROWS, SEED)
    out = {"tables": {s: root / "tables" / s for s in ROWS}, "ingested": {}}
    for split in ROWS:
        ingest(root / "raw" / f"sample_skeleton_{split}.csv",
               root / "raw" / f"common_features_{split}.csv", root / "ingested" / split,
               ground_truth=root / "raw" / f"ground_truth_{split}.parquet")
        out["ingested"][split] = root / "ingested" / split
    return out


def _matching_data(path: Path, datasets: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """The dataset whose columns hold every feature of the config with the kind it declares."""
    features = load_config(path).features
    misfits = {}
    for name, splits in datasets.items():
        cols = _schema(splits["train"])
        bad = [f.name for f in features if f.name not in cols
               or (f.kind == "dense" and cols[f.name])
               or cols[f.name] != (f.kind == "multi_categorical")]
        if not bad:
            return splits
        misfits[name] = bad
    pytest.fail(f"{path.name}: no simulated layout fits its features {misfits}")


def _small_overrides(path: Path, data: dict[str, Path]) -> list[str]:
    cfg = load_config(path)
    sets = [f"data.train={data['train']}", f"data.eval={data['valid']}",
            f"data.test={data['valid']}", f"train.batch_size={BATCH}", "train.epochs=100",
            f"train.max_steps={STEPS}", f"train.eval_every={EVAL_EVERY}",
            "train.eval_batch_size=4096", "train.progress=off", "train.num_threads=1"]
    for i, f in enumerate(cfg.features):
        if f.buckets is not None and f.buckets > MAX_BUCKETS:
            sets.append(f"features.{i}.buckets={MAX_BUCKETS}")
    return sets


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_configs_folder_is_not_empty():
    assert CONFIGS, "no configs found under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_trains_and_keeps_the_best_checkpoint_by_its_monitor(path, datasets, tmp_path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and "train" in raw  # a config, not some other YAML
    data = _matching_data(path, datasets)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(path), "--out", str(run),
                              *[a for s in _small_overrides(path, data) for a in ("--set", s)]])
    assert res.exit_code == 0, cli_output(res)

    best = load_checkpoint(run / "checkpoints" / "best.pt")
    monitor = best["monitor"]
    hist = _history(run)
    assert len(hist) >= 3, f"{path.name}: only {len(hist)} evaluations"
    assert all(r["monitor"] != "" for r in hist)
    # The direction each metric improves in, independently of esmm.config: log losses down,
    # AUCs up.
    terms = monitor.split("+")
    assert all(t.endswith("_logloss") for t in terms) or all(
        t.endswith(("_auc", "_gauc")) for t in terms), monitor
    pick = min if terms[0].endswith("_logloss") else max
    values = [float(r["monitor"]) for r in hist]
    assert all(math.isfinite(v) for v in values), values
    best_row = hist[values.index(pick(values))]
    assert best["best_metric"] == pytest.approx(pick(values), rel=1e-12, abs=0)
    assert best["step"] == int(best_row["step"]) == best["best_step"]
    # The monitored value of a row is the sum of the metrics it names.
    for r in hist:
        assert float(r["monitor"]) == pytest.approx(sum(float(r[t]) for t in terms))
