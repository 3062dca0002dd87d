"""Dense feature transforms, fills and the fitted feature state (statistics, id types).

The statistics are checked against independent oracles (numpy over the whole column,
scikit-learn's scalers); the same rows are scored through ``esmm predict``, TorchScript and
ONNX artifacts and the HTTP server, which must agree to 1e-5.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.data.fit import Moments, exact_quantiles, fit_spec
from esmm.data.tables import load_split
from esmm.errors import DataError
from esmm.export import export_run, load_artifact
from esmm.features import encode_dense, spec_from_config
from esmm.train import train
from tests.conftest import cli_output

runner = CliRunner()

DENSE = [
    {"name": "dz", "kind": "dense", "transform": "zscore", "fill": "mean"},
    {"name": "dm", "kind": "dense", "transform": "minmax"},
    {"name": "dl", "kind": "dense", "transform": "log1p", "fill": 0},
    {"name": "db", "kind": "dense", "transform": "bucketize", "boundaries": [-1.0, 0.0, 1.5]},
    {"name": "dq", "kind": "dense", "transform": "bucketize", "quantiles": 5, "fill": 2.5,
     "dim": 4},
    {"name": "dn", "kind": "dense"},
]
FEATURES = [{"name": "101", "kind": "categorical", "buckets": 300},
            {"name": "205", "kind": "categorical", "buckets": 1000}] + DENSE
FIELDS = [f["name"] for f in FEATURES]


def _columns(n: int, seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Labels that depend on the dense values (so the transforms matter), some values missing."""
    rng = np.random.default_rng(seed)
    dz = rng.normal(50.0 + shift, 12.0, n)
    dm = rng.uniform(-3.0, 7.0, n)
    dl = rng.exponential(200.0, n)
    db = rng.normal(0.0, 1.5, n)
    dq = np.round(rng.gamma(2.0, 3.0, n), 1)
    dn = rng.random(n)
    logit = -2.0 + 0.05 * (dz - 50) + 0.3 * dm + 0.4 * np.log1p(dl) / 5 + 0.5 * (db > 0)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    conv = (click & (rng.random(n) < 1 / (1 + np.exp(-(0.2 * dm - 0.5))))).astype(np.int8)
    return {"101": rng.integers(0, 200, n), "205": rng.integers(0, 800, n), "dz": dz, "dm": dm,
            "dl": dl, "db": db, "dq": dq, "dn": dn, "click": click, "conversion": conv}


def _write(path: Path, cols: dict[str, np.ndarray], missing: dict[str, np.ndarray]) -> Path:
    table = pa.table({k: pa.array(v, mask=missing.get(k)) for k, v in cols.items()})
    pq.write_table(table, path, row_group_size=1000)  # several row groups, streamed in chunks
    return path


def _missing(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    return {"dz": rng.random(n) < 0.1, "dl": rng.random(n) < 0.05, "dq": rng.random(n) < 0.05}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xform")
    return {"train": _write(d / "train.parquet", _columns(5000, 1), _missing(5000, 1)),
            "valid": _write(d / "valid.parquet", _columns(1500, 2), _missing(1500, 2))}


def _tree(data: dict[str, Path], **train_kw) -> dict:
    return {"data": {"train": str(data["train"]), "eval": str(data["valid"]),
                     "chunk_rows": 700, "user_column": None},
            "features": FEATURES,
            "model": {"name": "esmm", "tower": [16], "embedding_dim": 8},
            "train": {"batch_size": 256, "epochs": 1, "seed": 3, "progress": "off",
                      "optimizer": {"name": "adam", "lr": 0.01}, **train_kw}}


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("xrun") / "run"
    train(config_from_dict(_tree(data, max_steps=12)), d)
    return d


def _present(path: Path, name: str) -> np.ndarray:
    col = pq.read_table(path, columns=[name]).column(name)
    return np.asarray(col.drop_null().to_numpy(), dtype=np.float64)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("chunk", [1, 7, 1000, 10**6])
def test_streamed_moments_equal_the_whole_column(chunk):
    # Large offset, small spread: a running sum of squares would lose most digits here.
    x = np.random.default_rng(0).normal(1e8, 0.5, 20_000)
    m = Moments()
    for i in range(0, len(x), chunk):
        m.add(x[i:i + chunk])
    assert m.n == len(x)
    mean = math.fsum(x) / len(x)  # correctly rounded sums: the oracle
    std = math.sqrt(math.fsum((x - mean) ** 2) / len(x))
    np.testing.assert_allclose(m.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(m.std, std, rtol=1e-9)
    naive = math.sqrt(max(np.sum(x * x) / len(x) - np.mean(x) ** 2, 0.0))
    assert abs(naive - std) > 1e-3 * std  # the case is one where the textbook formula fails
    assert (m.lo, m.hi) == (x.min(), x.max())


@pytest.mark.parametrize("n_buckets", [2, 4, 7, 10])
def test_exact_quantiles_are_the_inverted_empirical_cdf(n_buckets):
    rng = np.random.default_rng(n_buckets)
    x = np.concatenate([rng.normal(size=997), np.zeros(300)])  # ties: some quantiles merge
    bounds = exact_quantiles(x.copy(), n_buckets)
    expected = np.unique(np.quantile(x, np.arange(1, n_buckets) / n_buckets,
                                     method="inverted_cdf"))
    np.testing.assert_array_equal(bounds, expected)
    for k in range(1, n_buckets):  # the definition: the smallest value with F(v) >= k / N
        b = np.quantile(x, k / n_buckets, method="inverted_cdf")
        assert (x <= b).sum() >= np.ceil(k * len(x) / n_buckets) > (x < b).sum()
    assert set(bounds) <= set(x)


def test_fitted_statistics_match_scikit_learn(data):
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    cfg = config_from_dict(_tree(data))
    spec = fit_spec(spec_from_config(cfg), data["train"], cfg.data)
    f = {x.name: x for x in spec.fields}
    dz, dm = _present(data["train"], "dz"), _present(data["train"], "dm")
    z = StandardScaler().fit(dz[:, None])
    assert f["dz"].stats.count == len(dz) and f["dz"].stats.missing == 5000 - len(dz)
    np.testing.assert_allclose([f["dz"].stats.mean, f["dz"].stats.std], [z.mean_[0], z.scale_[0]],
                               rtol=1e-12)
    assert f["dz"].fill == pytest.approx(z.mean_[0], rel=1e-12)
    mm = MinMaxScaler().fit(dm[:, None])
    assert (f["dm"].stats.min, f["dm"].stats.max) == (mm.data_min_[0], mm.data_max_[0])
    # The transforms themselves, on new values, against the scalers.
    new = np.array([-20.0, 0.0, 49.5, 130.0])
    np.testing.assert_allclose(encode_dense(pa.array(new), f["dz"], "t"),
                               z.transform(new[:, None])[:, 0], rtol=1e-6)
    np.testing.assert_allclose(encode_dense(pa.array(new), f["dm"], "t"),
                               mm.transform(new[:, None])[:, 0], rtol=1e-6)
    dq = _present(data["train"], "dq")
    np.testing.assert_array_equal(f["dq"].boundaries, np.unique(np.quantile(
        dq, [0.2, 0.4, 0.6, 0.8], method="inverted_cdf")))
    assert f["dq"].buckets == len(f["dq"].boundaries) + 1 and f["dq"].kind == "categorical"
    assert f["db"].buckets == 4 and f["db"].stats is None  # given boundaries: nothing to fit
    assert f["101"].id_type == "int" and f["205"].id_type == "int"


def test_fit_leaves_out_rows_training_drops(tmp_path):
    cols = {"d": np.array([1.0, 2.0, 100.0, 3.0]), "click": np.array([1, 0, 0, 1]),
            "conversion": np.array([0, 0, 1, 1])}  # row 2: conversion without click
    path = _write(tmp_path / "t.parquet", cols, {})
    cfg = config_from_dict({"data": {"train": str(path), "user_column": None},
                            "features": [{"name": "d", "kind": "dense", "transform": "zscore"}]})
    spec = fit_spec(spec_from_config(cfg), path, cfg.data)
    assert spec.fields[0].stats.mean == pytest.approx(2.0)
    keep = config_from_dict({"data": {"train": str(path), "user_column": None,
                                      "conversion_without_click": "keep"},
                             "features": [{"name": "d", "kind": "dense", "transform": "zscore"}]})
    assert fit_spec(spec_from_config(keep), path, keep.data).fields[0].stats.mean == 26.5


def test_bucketize_puts_a_boundary_in_the_bucket_above(data):
    cfg = config_from_dict(_tree(data))
    db = next(f for f in spec_from_config(cfg).fields if f.name == "db")
    got = encode_dense(pa.array([-5.0, -1.0, -0.5, 0.0, 1.49, 1.5, 9.0]), db, "t")
    np.testing.assert_array_equal(got, [0, 1, 1, 2, 2, 3, 3])
    assert got.dtype == np.int64


# ----------------------------------------------------------------------------- fills and errors


def test_fill_replaces_missing_values_before_the_transform(data):
    cfg = config_from_dict(_tree(data))
    spec = fit_spec(spec_from_config(cfg), data["train"], cfg.data)
    f = {x.name: x for x in spec.fields}
    z = encode_dense(pa.array([None, float("nan"), f["dz"].stats.mean]), f["dz"], "t")
    np.testing.assert_allclose(z, [0.0, 0.0, 0.0], atol=1e-6)  # the mean z-scores to 0
    np.testing.assert_allclose(encode_dense(pa.array([None], pa.float64()), f["dl"], "t"), [0.0])
    q = encode_dense(pa.array([None, 2.5], pa.float64()), f["dq"], "t")
    assert q[0] == q[1]


def test_missing_without_fill_keeps_the_error_and_infinities_stay_refused(data):
    cfg = config_from_dict(_tree(data))
    spec = fit_spec(spec_from_config(cfg), data["train"], cfg.data)
    f = {x.name: x for x in spec.fields}
    with pytest.raises(DataError, match=r"req: dense field 'dm' has 1 NaN, missing, infinite or "
                       r"float32-overflowing value\(s\), first at row 1 \(a NaN or missing "
                       r"value\); fill or drop them"):
        encode_dense(pa.array([1.0, None]), f["dm"], "req")
    with pytest.raises(DataError, match=r"req: dense field 'dz' .* first at row 2 \(\+inf\)"):
        encode_dense(pa.array([1.0, None, float("inf")]), f["dz"], "req")


def test_training_data_with_missing_values_and_no_fill_stops_before_training(data, tmp_path):
    cols = _columns(300, 5)
    path = _write(tmp_path / "t.parquet", cols, {"dm": np.arange(300) == 123})
    tree = _tree(data, max_steps=2)
    tree["data"].update(train=str(path), eval=None)
    res = runner.invoke(app, ["train", _yaml(tmp_path, tree), "--out", str(tmp_path / "r")])
    out = cli_output(res)
    assert res.exit_code == 1, out
    assert f"{path}: dense field 'dm' has 1 NaN, missing" in out and "row 123" in out, out
    assert not (tmp_path / "r" / "checkpoints" / "latest.pt").exists()


def test_log1p_refuses_values_at_or_below_minus_one(data):
    cfg = config_from_dict(_tree(data))
    dl = next(f for f in spec_from_config(cfg).fields if f.name == "dl")
    with pytest.raises(DataError, match=r"f.csv: dense field 'dl' row 1 holds -1.0; "
                       r"`transform: log1p` needs values > -1"):
        encode_dense(pa.array([0.5, -1.0]), dl, "f.csv")


def test_an_unfitted_spec_refuses_to_encode_rather_than_guess(data):
    dz = next(f for f in spec_from_config(config_from_dict(_tree(data))).fields
              if f.name == "dz")
    with pytest.raises(DataError, match="'dz' needs the statistics of `transform: zscore`"):
        encode_dense(pa.array([1.0]), dz, "x")


def test_a_field_with_no_value_to_fit_on_is_an_error(tmp_path):
    cols = {"d": np.zeros(4), "click": np.zeros(4, np.int8), "conversion": np.zeros(4, np.int8)}
    path = _write(tmp_path / "t.parquet", cols, {"d": np.ones(4, bool)})
    cfg = config_from_dict({"data": {"train": str(path), "user_column": None},
                            "features": [{"name": "d", "kind": "dense", "fill": "mean"}]})
    with pytest.raises(DataError, match=r"t.parquet: dense field 'd' has no value in the "
                       r"training split \(4 missing\)"):
        fit_spec(spec_from_config(cfg), path, cfg.data)


def _yaml(tmp_path: Path, tree: dict) -> str:
    import yaml

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


@pytest.mark.parametrize("feature, needle", [
    ({"name": "x", "kind": "categorical", "buckets": 5, "transform": "zscore"},
     "features.1: feature 'x' is categorical: `transform` applies to dense fields only"),
    ({"name": "x", "kind": "multi_categorical", "buckets": 5, "fill": 0},
     "features.1: feature 'x' is multi_categorical: `fill` applies to dense fields only"),
    ({"name": "x", "kind": "dense", "boundaries": [1.0]},
     "features.1: feature 'x' has `boundaries` but `transform: none`"),
    ({"name": "x", "kind": "dense", "transform": "zscore", "quantiles": 4},
     "features.1: feature 'x' has `quantiles` but `transform: zscore`"),
    ({"name": "x", "kind": "dense", "transform": "bucketize"},
     "give either `boundaries: [...]` (ascending cut points) or `quantiles: N`"),
    ({"name": "x", "kind": "dense", "transform": "bucketize", "boundaries": [0.0, 0.0]},
     "features.1: feature 'x': boundaries[1] = 0.0 does not exceed boundaries[0] = 0.0"),
    ({"name": "x", "kind": "dense", "fill": "median"},
     "features.1.fill: expected a number, 'mean' or 'error' (got 'median')"),
    ({"name": "x", "kind": "dense", "transform": "bucketize", "quantiles": 1},
     "features.1.quantiles: Input should be greater than or equal to 2 (got 1)"),
    ({"name": "x", "kind": "dense", "transform": "scale"},
     "features.1.transform: Input should be 'none', 'zscore', 'minmax', 'log1p' or 'bucketize'"),
    ({"name": "x", "kind": "dense", "transfrom": "zscore"}, "features.1.transfrom"),
])
def test_misplaced_keys_are_refused_with_their_path(tmp_path, feature, needle):
    tree = {"data": {"train": str(tmp_path / "t.parquet")},
            "features": [{"name": "a", "kind": "categorical", "buckets": 5}, feature]}
    res = runner.invoke(app, ["train", _yaml(tmp_path, tree), "--out", str(tmp_path / "r")])
    out = res.output  # stdout and stderr as a terminal shows them
    assert res.exit_code == 2, out
    assert needle in out and "Traceback" not in out and out.strip().count("\n") == 0, out


def test_a_config_without_transforms_reads_as_before():
    tree = {"features": [{"name": "d", "kind": "dense"},
                         {"name": "a", "kind": "categorical", "buckets": 3}]}
    assert config_from_dict(tree).to_dict()["features"] == [
        {"name": "d", "kind": "dense", "buckets": None, "dim": None, "pooling": "mean"},
        {"name": "a", "kind": "categorical", "buckets": 3, "dim": None, "pooling": "mean"}]
    spec = spec_from_config(config_from_dict(tree))
    assert spec.to_dict()["fields"][0] == {"name": "d", "kind": "dense", "buckets": 0, "dim": 1,
                                           "pooling": "mean", "dtype": "auto"}


# ------------------------------------------------------------------ one model, every path


def _checkpoint_spec(run_dir: Path, which: str = "best") -> dict:
    ck = torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=True)
    return ck["feature_spec"]


def test_checkpoint_carries_the_fitted_statistics(run_dir, data):
    fields = {f["name"]: f for f in _checkpoint_spec(run_dir)["fields"]}
    dz = _present(data["train"], "dz")
    assert fields["dz"]["stats"]["mean"] == pytest.approx(dz.mean(), rel=1e-12)
    assert fields["dz"]["fill"] == pytest.approx(dz.mean(), rel=1e-12)
    assert fields["dq"]["kind"] == "categorical" and fields["dq"]["transform"] == "bucketize"
    assert len(fields["dq"]["boundaries"]) == fields["dq"]["buckets"] - 1
    assert fields["101"]["id_type"] == "int"
    assert "transform" not in fields["dn"] and "stats" not in fields["dn"]


@pytest.fixture(scope="module")
def rows(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """60 validation rows (some values missing) as a file and as JSON impressions."""
    d = tmp_path_factory.mktemp("xrows")
    head = pq.read_table(data["valid"]).slice(0, 60)
    pq.write_table(head, d / "rows.parquet")
    items = head.select(FIELDS).to_pylist()
    assert any(it["dz"] is None for it in items) and any(it["dq"] is None for it in items)
    return d / "rows.parquet", items


@pytest.fixture(scope="module")
def reference(run_dir, rows, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("xpred") / "preds.parquet"
    res = runner.invoke(app, ["predict", str(run_dir), "--data", str(rows[0]), "--out", str(out)])
    assert res.exit_code == 0, cli_output(res)
    ref = pq.read_table(out).to_pydict()
    return {k: np.asarray(ref[k]) for k in ("p_ctr", "p_cvr", "p_ctcvr")}


def test_predict_applies_the_stored_statistics(reference, run_dir, rows, data):
    from esmm.checkpoint import load_model
    from esmm.data.batches import iter_batches

    model, cfg, spec, _ = load_model(run_dir)
    split = load_split(rows[0], spec, cfg.data)
    dz = split.dense[:, [f.name for f in spec.dense].index("dz")]
    st = next(f for f in spec.fields if f.name == "dz").stats
    raw = pq.read_table(rows[0]).column("dz").to_numpy(zero_copy_only=False)
    expect = (np.where(np.isnan(raw), st.mean, raw) - st.mean) / st.std
    np.testing.assert_allclose(dz, expect, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        p = np.concatenate([model.predict(model(b))["p_ctcvr"].numpy()
                            for b in iter_batches(split, 64)])
    np.testing.assert_allclose(p, reference["p_ctcvr"], atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_artifacts_and_server_score_as_esmm_predict(fmt, run_dir, rows, reference,
                                                    tmp_path_factory):
    from tests.test_serve import _start, _stop

    path = tmp_path_factory.mktemp("xart") / ("m.pt" if fmt == "torchscript" else "m.onnx")
    meta = export_run(run_dir, fmt, path, parity_rows=64)
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    table = pq.read_table(rows[0])
    got = load_artifact(path).predict_columns({n: table.column(n) for n in FIELDS})
    for k, v in reference.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=0)
    proc, client = _start(path)  # `esmm serve` in its own process, over HTTP
    try:
        r = client.post("/predict", json={"impressions": rows[1]})
    finally:
        _stop(proc, client)
    assert r.status_code == 200, r.text
    for k, v in reference.items():
        served = np.array([it[k] for it in r.json()["predictions"]])
        np.testing.assert_allclose(served, v, atol=1e-5, rtol=0)


class _Killed(Exception):
    pass


def test_resume_reuses_the_stored_statistics(data, tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(data["train"].read_bytes())
    tree = _tree(data, max_steps=12, eval_every=4, checkpoint_interval_s=0)
    tree["data"].update(train=str(path), eval=None)
    cfg = config_from_dict(tree)

    def kill(step):
        if step == 6:
            raise _Killed
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "run", on_step=kill)
    first = _checkpoint_spec(tmp_path / "run", "latest")
    _write(path, _columns(5000, 9, shift=30.0), {})  # the file now holds other values
    res = train(cfg, tmp_path / "run", resume=True)
    assert res.step == 12
    assert _checkpoint_spec(tmp_path / "run", "latest") == first
    refit = fit_spec(spec_from_config(cfg), path, cfg.data).to_dict()
    assert refit != first  # the check above could tell the two apart


# ----------------------------------------------------------------------------- id types


@pytest.fixture(scope="module")
def string_rows(rows, tmp_path_factory) -> Path:
    """The validation rows with field 205 written as strings."""
    t = pq.read_table(rows[0])
    i = t.column_names.index("205")
    t = t.set_column(i, "205", pa.array([str(v) for v in t.column("205").to_pylist()]))
    path = tmp_path_factory.mktemp("xstr") / "rows.parquet"
    pq.write_table(t, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_string_ids_for_a_field_trained_on_integers_are_refused(command, run_dir, string_rows,
                                                                tmp_path):
    args = [command, str(run_dir), "--data", str(string_rows)]
    if command == "predict":
        args += ["--out", str(tmp_path / "p.parquet")]
    res = runner.invoke(app, args)
    out = cli_output(res)
    assert res.exit_code == 1, out
    assert (f"{string_rows}: id field '205' holds string ids (row 0: " in out
            and "but the model was trained on integer ids (`dtype: auto`)" in out
            and "`dtype: str`" in out), out
    assert "Traceback" not in out and not (tmp_path / "p.parquet").exists()


def test_the_server_refuses_ids_of_the_other_type(run_dir, rows, tmp_path):
    from fastapi.testclient import TestClient

    from esmm.serve import create_app, load_checked

    path = tmp_path / "m.onnx"
    export_run(run_dir, "onnx", path, parity_rows=16)
    items = [dict(it, **{"205": str(it["205"])}) for it in rows[1][:3]]
    with TestClient(create_app(load_checked(path))) as client:
        r = client.post("/predict", json={"impressions": items})
        ok = client.post("/predict", json={"impressions": rows[1][:3]})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(
        "impressions[0].205: expected an integer id, got a string ('"), r.text
    assert "trained on integer ids (`dtype: auto`)" in r.text and "`dtype: str`" in r.text
    assert ok.status_code == 200, ok.text
    table = pq.read_table(rows[0])
    cols = {n: table.column(n) for n in FIELDS} | {"205": [str(v) for v in
                                                          table.column("205").to_pylist()]}
    with pytest.raises(DataError, match=r"request: id field '205' holds string ids \(row 0: "):
        load_artifact(path).predict_columns(cols)


def test_a_model_trained_on_string_ids_refuses_integers(data, tmp_path):
    t = pq.read_table(data["train"])
    t = t.set_column(t.column_names.index("101"), "101",
                     pa.array([f"u{v}" for v in t.column("101").to_pylist()]))
    pq.write_table(t, tmp_path / "train.parquet")
    tree = _tree(data, max_steps=2)
    tree["data"].update(train=str(tmp_path / "train.parquet"), eval=None)
    train(config_from_dict(tree), tmp_path / "run")
    assert {f["name"]: f.get("id_type") for f in
            _checkpoint_spec(tmp_path / "run")["fields"]}["101"] == "str"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(data["valid"])])
    out = cli_output(res)
    assert res.exit_code == 1, out
    assert "id field '101' holds integer ids" in out and "trained on string ids" in out, out
    # Declared `dtype: str`, the same field takes both, as the message says.
    tree["features"][0]["dtype"] = "str"
    train(config_from_dict(tree), tmp_path / "run2")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run2"), "--data", str(data["valid"])])
    assert res.exit_code == 0, cli_output(res)


# ----------------------------------------------------------------------------- other sources


def test_csv_and_in_memory_tables_fit_as_parquet(data, tmp_path):
    import pyarrow.csv as pacsv

    from esmm.data.tables import RawTables

    cfg = config_from_dict(_tree(data))
    spec = spec_from_config(cfg)
    table = pq.read_table(data["train"])
    pacsv.write_csv(table, tmp_path / "train.csv")
    want = fit_spec(spec, data["train"], cfg.data)
    for source in (tmp_path / "train.csv", RawTables("frame", table)):
        got = fit_spec(spec, source, cfg.data)
        for a, b in zip(got.fields, want.fields, strict=True):
            assert a.boundaries == b.boundaries and a.id_type == b.id_type, a.name
            if a.stats is not None:  # the CSV round trip may move the last digit
                np.testing.assert_allclose([a.stats.mean, a.stats.std, a.stats.min, a.stats.max],
                                           [b.stats.mean, b.stats.std, b.stats.min, b.stats.max],
                                           rtol=1e-12)


def test_a_users_table_field_is_fitted_over_its_rows(tmp_path):
    folder = tmp_path / "norm"
    folder.mkdir()
    pq.write_table(pa.table({"common_key": [1, 1, 1, 2], "click": [1, 0, 0, 1],
                             "conversion": [0, 0, 0, 1]}), folder / "impressions.parquet")
    pq.write_table(pa.table({"common_key": [1, 2, 3], "age": [20.0, 40.0, 90.0],
                             "101": ["a", "b", "c"]}), folder / "users.parquet")
    cfg = config_from_dict({"data": {"train": str(folder)}, "features": [
        {"name": "age", "kind": "dense", "transform": "zscore"},
        {"name": "101", "kind": "categorical", "buckets": 10}]})
    spec = fit_spec(spec_from_config(cfg), folder, cfg.data)
    assert spec.fields[0].stats.mean == 50.0 and spec.fields[0].stats.count == 3
    assert spec.fields[1].id_type == "str"


def test_python_api_fits_a_dataframe_and_scores_it_with_the_same_statistics(data, tmp_path):
    import esmm

    frame = pq.read_table(data["train"]).to_pandas()
    tree = _tree(data, max_steps=4)
    tree["data"].update(train=None, eval=None)
    run = esmm.fit(tree, train=frame, out=tmp_path / "run")
    fields = {f.name: f for f in run.spec.fields}
    dz = _present(data["train"], "dz")
    assert fields["dz"].stats.mean == pytest.approx(dz.mean(), rel=1e-12)
    head = frame.head(50)
    scores = run.predict(head)
    assert len(scores) == 50 and np.isfinite(scores["p_ctcvr"]).all()
    assert _checkpoint_spec(tmp_path / "run")["fields"] == [f.to_dict() for f in run.spec.fields]


def test_the_streamed_loader_encodes_as_the_in_memory_one(data):
    from esmm.data.stream import ParquetStream, concat_encoded

    cfg = config_from_dict(_tree(data))
    spec = fit_spec(spec_from_config(cfg), data["train"], cfg.data)
    mem = load_split(data["valid"], spec, cfg.data)
    streamed = concat_encoded(list(ParquetStream(data["valid"], spec, cfg.data).chunks()))
    np.testing.assert_array_equal(streamed.dense, mem.dense)
    for name in ("db", "dq", "101"):
        np.testing.assert_array_equal(streamed.ids[name], mem.ids[name])
    assert mem.ids["dq"].max() < next(f for f in spec.fields if f.name == "dq").buckets
    assert np.isfinite(mem.dense).all()


def test_artifact_metadata_without_the_fitted_state_is_refused(run_dir, tmp_path):
    import copy

    from esmm.serve import check_metadata

    path = tmp_path / "m.onnx"
    export_run(run_dir, "onnx", path, parity_rows=8)
    meta = load_artifact(path).metadata
    assert check_metadata(meta, "m.onnx").fields == load_artifact(path).spec.fields
    cases = [(2, "stats", None, "feature_spec.fields[2].stats: expected an object with keys"),
             (5, "boundaries", [0.0, 0.0, 1.0], "feature_spec.fields[5].boundaries: expected 3 "
              "ascending numbers (one fewer than buckets)"),
             (6, "boundaries", [1.0], "feature_spec.fields[6].boundaries: expected"),
             (2, "transform", "scale", "feature_spec.fields[2].transform: expected one of"),
             (0, "id_type", "float", "feature_spec.fields[0].id_type: expected one of"),
             (0, "fill", 1.0, "feature_spec.fields[0].fill: applies to dense fields")]
    for i, key, value, needle in cases:
        bad = copy.deepcopy(meta)
        bad["feature_spec"]["fields"][i][key] = value
        with pytest.raises(DataError, match=r"m.onnx: metadata field " + re.escape(needle)):
            check_metadata(bad, "m.onnx")
