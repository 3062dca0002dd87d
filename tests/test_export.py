"""Export: artifacts agree with the eager model, the parity check bites, metadata round-trips."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import esmm
import esmm.export as ex
from esmm.cli import app
from esmm.config import DataConfig, config_from_dict
from esmm.data.tables import RawTables, encode
from esmm.errors import DataError, EsmmError, UsageError
from esmm.evaluate import predict_arrays
from esmm.models import model_names
from esmm.train import load_model, train
from tests.conftest import ATTENTION_FEATURES, small_config

FORMATS = ["torchscript", "onnx"]


@pytest.fixture(scope="module")
def run_dir(flat_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "run"
    train(config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=30)), d)
    return d


@pytest.fixture(scope="module")
def artifacts(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    return {fmt: (d / f"model.{fmt}", ex.export_run(run_dir, fmt, d / f"model.{fmt}"))
            for fmt in FORMATS}


def _edge_rows(n=64, seed=5):
    """Rows with unknown ids (huge, negative), nulls and empty bags (integer ids: the fields
    were trained on integers)."""
    rng = np.random.default_rng(seed)
    bags = [rng.integers(0, 500, k).tolist() for k in rng.integers(0, 5, n)]
    bags[0] = []
    bags[1] = None
    return {
        "101": [int(v) for v in rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)],
        "205": rng.integers(10**12, 10**15, n).tolist(),
        "206": [None] + rng.integers(0, 60, n - 1).tolist(),
        "121": rng.integers(0, 10, n).tolist(),
        "109_14": bags,
        "d1": rng.normal(size=n).tolist(),
    }


def _eager(run_dir, cols):
    model, cfg, spec, _ = load_model(run_dir)
    types = {"109_14": pa.list_(pa.int64()), "d1": pa.float64()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.int64())) for k, v in cols.items()})
    data = encode(RawTables("t", table), spec, DataConfig(user_column=None),
                  require_labels=False)
    return predict_arrays(model, data)


def test_training_used_sparse_embeddings(run_dir):
    model, *_ = load_model(run_dir)
    assert model.embedding.sparse  # export must rebuild these dense


@pytest.mark.parametrize("fmt", FORMATS)
def test_artifact_matches_eager_model_on_edge_rows(run_dir, artifacts, fmt):
    path, meta = artifacts[fmt]
    assert meta["parity"]["row_sets"][0].startswith("512 eval rows")
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    pred = ex.load_artifact(path)
    assert pred.format == fmt
    cols = _edge_rows()
    ref = _eager(run_dir, cols)
    got = pred.predict_columns(cols)
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        assert got[k].shape == (64,)
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0)
    # Every row empty-bagged and a single row: shapes the trace never saw.
    cols["109_14"] = [[] for _ in cols["109_14"]]
    np.testing.assert_allclose(pred.predict_columns(cols)["p_ctcvr"],
                               _eager(run_dir, cols)["p_ctcvr"], atol=1e-5, rtol=0)
    one = {k: v[:1] for k, v in cols.items()}
    np.testing.assert_allclose(pred.predict_columns(one)["p_cvr"],
                               _eager(run_dir, one)["p_cvr"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_user_fields_equal_per_row_values(artifacts, fmt):
    pred = ex.load_artifact(artifacts[fmt][0])
    cols = _edge_rows(20)
    user = {"101": 77, "121": 3, "109_14": [4, 5, 400], "d1": 0.25}
    per_row = dict(cols) | {k: [v] * 20 for k, v in user.items()}
    shared = pred.predict_columns({k: v for k, v in cols.items() if k not in user}, user)
    full = pred.predict_columns(per_row)
    for k in shared:
        np.testing.assert_allclose(shared[k], full[k], atol=1e-6, rtol=0)


def test_string_ids_for_a_field_trained_on_integers_are_refused(artifacts):
    # "17" would hash to another bucket than 17: a silent wrong score, so it is refused.
    pred = ex.load_artifact(artifacts["onnx"][0])
    assert pred.spec.fields[1].id_type == "int"
    cols = _edge_rows(4)
    cols["205"] = [17, 17, "17", "17"]
    with pytest.raises(DataError, match=r"request: id field '205' holds string ids \(row 2: "
                       r"'17'\) but the model was trained on integer ids"):
        pred.predict_columns(cols)
    pred.predict_columns(cols | {"205": [17] * 4})


def test_normalized_eval_data_parity(normalized_data, tmp_path):
    cfg = small_config(normalized_data["train"], normalized_data["valid"], max_steps=8)
    cfg["train"]["sparse_optimizer"] = {"name": "dense"}
    train(config_from_dict(cfg), tmp_path / "run")
    meta = ex.export_run(tmp_path / "run", "onnx", tmp_path / "m.onnx", parity_rows=200)
    assert "200 eval rows" in meta["parity"]["row_sets"][0]
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5


def _esmm_predict(run, rows_path, tmp_path):
    """`esmm predict` output for ``rows_path``: name -> (N,) array."""
    res = CliRunner().invoke(app, ["predict", str(run), "--data", str(rows_path),
                                   "--out", str(tmp_path / "preds.parquet")])
    assert res.exit_code == 0, res.output
    return {k: np.asarray(v) for k, v in pq.read_table(tmp_path / "preds.parquet")
            .to_pydict().items()}


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_exports_and_equals_esmm_predict(flat_data, tmp_path, name):
    cfg = small_config(flat_data["train"], max_steps=3)
    cfg["model"].update(name=name, batch_norm=True, dropout=0.1)
    cfg["features"] = ATTENTION_FEATURES  # every model over an attention-pooled bag too
    train(config_from_dict(cfg), tmp_path / "run")
    head = pq.read_table(flat_data["valid"]).slice(0, 40)
    pq.write_table(head, tmp_path / "rows.parquet")
    ref = _esmm_predict(tmp_path / "run", tmp_path / "rows.parquet", tmp_path)
    _, _, spec, _ = load_model(tmp_path / "run")
    for fmt in FORMATS:
        meta = ex.export_run(tmp_path / "run", fmt, tmp_path / f"m.{fmt}", parity_rows=64)
        assert meta["model"] == name and meta["metrics"]["metrics"] == {}
        assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
        got = ex.load_artifact(tmp_path / f"m.{fmt}").predict_columns(
            {f.name: head.column(f.name) for f in spec.fields})
        for k in ("p_ctr", "p_cvr", "p_ctcvr"):
            np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=f"{fmt} {k}")


def _corrupting(monkeypatch, tower):
    real = ex.build_export_module

    def corrupt(model, spec):
        module = real(model, spec)
        with torch.no_grad():
            getattr(module.model, tower).net[-1].bias += 0.5
        return module
    monkeypatch.setattr(ex, "build_export_module", corrupt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tower,output", [("cvr_tower", "p_cvr"), ("ctr_tower", "p_ctr")])
def test_parity_check_fails_on_a_corrupt_graph(run_dir, tmp_path, monkeypatch, fmt, tower,
                                               output):
    _corrupting(monkeypatch, tower)
    out = tmp_path / "out" / "model.bin"
    with pytest.raises(EsmmError, match=rf"parity check failed: {output} .* by up to") as e:
        ex.export_run(run_dir, fmt, out, parity_rows=64)
    assert "no artifact written" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trips(run_dir, artifacts, fmt):
    path, meta = artifacts[fmt]
    got = ex.load_artifact(path).metadata
    assert got == json.loads(json.dumps(meta))
    _, cfg, spec, _ = load_model(run_dir)
    assert got["config"] == cfg.to_dict()
    assert got["feature_spec"] == spec.to_dict()
    assert got["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    assert got["esmm_version"] == esmm.__version__ and got["format"] == fmt
    assert got["model"] == "esmm" and got["checkpoint_step"] is not None
    assert dt.datetime.fromisoformat(got["exported_at"]).tzinfo is not None
    assert [(f["name"], f["kind"]) for f in got["fields"]] == [
        ("101", "categorical"), ("205", "categorical"), ("206", "categorical"),
        ("121", "categorical"), ("109_14", "multi_categorical"), ("d1", "dense")]
    assert got["fields"][4]["pooling"] == "mean"


def test_onnx_metadata_is_in_metadata_props(artifacts):
    import onnx

    proto = onnx.load(str(artifacts["onnx"][0]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["esmm.json"])["feature_spec"]["fields"][0]["name"] == "101"
    assert proto.opset_import[0].version >= 17


def test_predictor_errors_name_the_field(artifacts):
    pred = ex.load_artifact(artifacts["torchscript"][0])
    cols = _edge_rows(3)
    with pytest.raises(DataError, match="'d1' is missing"):
        pred.predict_columns({k: v for k, v in cols.items() if k != "d1"})
    with pytest.raises(DataError, match="'101' is given both"):
        pred.predict_columns(cols, {"101": 1})
    with pytest.raises(DataError, match="'121' has 2 values"):
        pred.predict_columns(cols | {"121": [1, 2]})
    with pytest.raises(DataError, match="'205' row 1"):
        pred.predict_columns(cols | {"205": [1, {"a": 1}, 2]})
    with pytest.raises(DataError, match="'d1'"):
        pred.predict_columns(cols | {"d1": [1.0, float("nan"), 2.0]})


def test_load_artifact_rejects_other_files(tmp_path):
    with pytest.raises(UsageError, match="no such artifact"):
        ex.load_artifact(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EsmmError, match="cannot load"):
        ex.load_artifact(junk)


def test_cli_export(run_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "--out",
                              str(tmp_path / "m.onnx"), "--parity-rows", "32"])
    assert res.exit_code == 0, res.output
    assert "parity max abs diff" in res.output and (tmp_path / "m.onnx").is_file()
    res = runner.invoke(app, ["export", str(run_dir), "--format", "pickle", "--out",
                              str(tmp_path / "m.bin")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 2


def test_eval_rows_come_from_parquet_head(run_dir, flat_data, artifacts):
    # The parity check reads the first rows of the eval file; they match `esmm predict`'s path.
    model, cfg, spec, _ = load_model(run_dir)
    head = pq.read_table(flat_data["valid"]).slice(0, 100)
    pred = ex.load_artifact(artifacts["onnx"][0])
    got = pred.predict_columns({f.name: head.column(f.name) for f in spec.fields})
    ref = predict_arrays(model, encode(RawTables("v", head), spec, cfg.data,
                                       require_labels=False))
    np.testing.assert_allclose(got["p_ctcvr"], ref["p_ctcvr"], atol=1e-5, rtol=0)
