"""The command line: exit codes and one clear message for every kind of bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from esmm.cli import app
from tests.conftest import cli_output, make_rows, small_config, write_flat

runner = CliRunner()


_out = cli_output


def _cfg(tmp_path, train, eval_=None, **kw):
    tree = small_config(train, eval_, max_steps=4, **kw)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _table(tmp_path, name, **changes):
    t = pq.read_table(write_flat(tmp_path / "base.parquet", make_rows(2000, seed=4)))
    for col, val in changes.items():
        if val is None:
            t = t.drop_columns([col])
        else:
            t = t.set_column(t.column_names.index(col), col, val)
    p = tmp_path / name
    pq.write_table(t, p)
    return p


def test_help_explains_every_command():
    for cmd in ("simulate", "train", "evaluate", "predict", "demo"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "--" in res.output


def test_train_evaluate_predict_end_to_end(flat_data, tmp_path):
    cfg = _cfg(tmp_path, flat_data["train"], flat_data["valid"])
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(cfg), "--out", str(run), "--set", "model.name=base"])
    assert res.exit_code == 0, _out(res)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "base"
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(flat_data["valid"]),
                              "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, _out(res)
    assert "| base |" in res.output and "cvr_auc" in res.output
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert 0 <= m["cvr_auc"] <= 1 and "cvr_auc_entire_space" in m
    # predict keeps the input order and every row, labels or not
    unlabeled = pq.read_table(flat_data["valid"]).drop_columns(["click", "conversion"])
    unlabeled = unlabeled.take(np.arange(unlabeled.num_rows)[::-1].copy())
    pq.write_table(unlabeled, tmp_path / "u.parquet")
    res = runner.invoke(app, ["predict", str(run), "--data", str(tmp_path / "u.parquet"),
                              "--out", str(tmp_path / "p.parquet"), "--keep", "sample_id"])
    assert res.exit_code == 0, _out(res)
    p = pq.read_table(tmp_path / "p.parquet")
    assert p.column_names == ["sample_id", "p_ctr", "p_cvr", "p_ctcvr"]
    assert p.column("sample_id").to_pylist() == unlabeled.column("sample_id").to_pylist()
    np.testing.assert_allclose(p.column("p_ctcvr").to_numpy(),
                               p.column("p_ctr").to_numpy() * p.column("p_cvr").to_numpy(),
                               rtol=1e-5)


@pytest.mark.parametrize("case,expect", [
    ("missing_label", ["'click'", "missing", "data.labels.click"]),
    ("bad_label", ["'conversion'", "only 0 or 1", "row 3", "2"]),
    ("nan_dense", ["'d1'", "NaN", "first at row 5"]),
    ("empty", ["empty"]),
])
def test_bad_data_gets_one_clear_message_and_exit_1(tmp_path, case, expect):
    n = 2000
    if case == "missing_label":
        path = _table(tmp_path, "x.parquet", click=None)
    elif case == "bad_label":
        conv = np.zeros(n, dtype=np.int64)
        conv[3] = 2
        path = _table(tmp_path, "x.parquet", conversion=pa.array(conv))
    elif case == "nan_dense":
        d = np.random.default_rng(0).random(n)
        d[[5, 9]] = np.nan
        path = _table(tmp_path, "x.parquet", d1=pa.array(d))
    else:
        path = tmp_path / "x.csv"
        path.write_text("")
    res = runner.invoke(app, ["train", str(_cfg(tmp_path, path)), "--out", str(tmp_path / "r")])
    text = _out(res)
    assert res.exit_code == 1, text
    assert str(path) in text
    for e in expect:
        assert e in text, (e, text)
    assert "Traceback" not in text


def test_conversion_without_click_counted_dropped_or_refused(tmp_path, caplog):
    r = make_rows(2000, seed=4)
    unclicked = np.flatnonzero(r["click"] == 0)[:7]
    conv = r["conversion"].copy()
    conv[unclicked] = 1
    path = _table(tmp_path, "x.parquet", conversion=pa.array(conv))
    res = runner.invoke(app, ["train", str(_cfg(tmp_path, path)), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, _out(res)
    assert "dropped 7 row(s) with conversion=1 and click=0" in caplog.text
    res = runner.invoke(app, ["train", str(_cfg(tmp_path, path)), "--out", str(tmp_path / "b"),
                              "--set", "data.conversion_without_click=error"])
    assert res.exit_code == 1
    assert "7 row(s) have conversion=1 with click=0" in _out(res)


def test_config_errors_exit_2(flat_data, tmp_path):
    cfg = _cfg(tmp_path, flat_data["train"])
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "r"),
                              "--set", "train.optimiser.lr=0.1"])
    assert res.exit_code == 2 and "train.optimiser" in _out(res)
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "r"),
                              "--set", "features.1.name=999"])
    assert res.exit_code == 2
    assert "feature '999'" in _out(res) and "not in the data" in _out(res)
    # The listing is of the file's columns, including the one the config no longer reads.
    assert "'205'" in _out(res)
    res = runner.invoke(app, ["train", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in _out(res)
    res = runner.invoke(app, ["evaluate", str(tmp_path), "--data", str(flat_data["valid"])])
    assert res.exit_code == 2 and "not a run directory" in _out(res)


def test_simulate_writes_splits_and_honours_knobs(tmp_path):
    res = runner.invoke(app, ["simulate", "--preset", "dense", "--rows", "4000", "--seed", "3",
                              "--out", str(tmp_path / "sim"), "--set", "selection=0.0",
                              "--set", "n_users=500", "--set", "n_items=2000"])
    assert res.exit_code == 0, _out(res)
    meta = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert meta["config"]["selection"] == 0.0 and meta["seed"] == 3
    for split, n in (("train", 4000), ("valid", 1000), ("test", 2000)):
        t = pq.read_table(tmp_path / "sim" / split / "impressions.parquet")
        assert t.num_rows == n
        assert (tmp_path / "sim" / split / "users.parquet").is_file()
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "x"), "--set", "nope=1"])
    assert res.exit_code == 2 and "nope" in _out(res)


def test_demo_runs_end_to_end_with_paired_report(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--preset", "dense",
                              "--rows", "6000", "--seeds", "2", "--sim-set", "n_users=300",
                              "--sim-set", "n_items=3000", "--set", "train.epochs=1",
                              "--set", "model.tower=[16]", "--set", "train.eval_every=2"])
    assert res.exit_code == 0, _out(res)
    report = (tmp_path / "d" / "report.md").read_text()
    for name in ("BASE (seed 0)", "ESMM-NS (seed 1)", "ESMM (seed 1)", "Mean +- std",
                 "ESMM - BASE", "cvr_auc_entire_space"):
        assert name in report, name
    with open(tmp_path / "d" / "results.csv") as f:
        assert len(f.readlines()) == 1 + 6
