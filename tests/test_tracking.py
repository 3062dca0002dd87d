"""train.tracking=mlflow against real MLflow stores, read back with MLflow's own client."""

from __future__ import annotations

import csv
import json
import math

import pytest

from esmm.config import config_from_dict
from esmm.errors import ConfigError
from esmm.tracking import default_tracking_uri, flatten
from esmm.train import train
from tests.conftest import small_config

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


def _cfg(flat_data, **train_kw):
    tree = small_config(flat_data["train"], flat_data["valid"], tracking="mlflow",
                        eval_every=10, max_steps=30, **train_kw)
    return config_from_dict(tree)


def _history(run):
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tracked(flat_data, tmp_path_factory):
    """One training tracked to the default store (SQLite in mlruns/ beside the run)."""
    root = tmp_path_factory.mktemp("tracked")
    run = root / "runs" / "esmm-a"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        train(_cfg(flat_data), run)
    uri = default_tracking_uri(run)
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    return run, client, client.get_run(run_id)


def test_default_store_is_sqlite_in_mlruns_beside_the_run(tracked):
    run, client, mrun = tracked
    assert (run.parent / "mlruns" / "mlflow.db").is_file()
    exp = client.get_experiment(mrun.info.experiment_id)
    assert exp.name == "esmm"
    assert mrun.info.run_name == "esmm-a" and mrun.info.status == "FINISHED"
    assert mrun.data.tags["esmm.model"] == "esmm"
    assert (run.parent / "mlruns" / "artifacts").is_dir()


def test_params_are_the_flattened_resolved_config(tracked):
    _, _, mrun = tracked
    params = mrun.data.params
    assert params["train.optimizer.lr"] == "0.005"
    assert params["model.tower"] == "[32, 16]"
    assert params["train.tracking"] == "mlflow"
    assert params["features.4.pooling"] == "mean"
    assert params["data.test"] == "null"
    assert params["train.early_stop.patience"] == "3"


def test_every_evaluation_is_logged_at_its_step(tracked):
    run, client, mrun = tracked
    rows = _history(run)
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    for name in ("ctr_auc", "cvr_auc", "ctcvr_logloss", "loss_ctr", "monitor"):
        got = client.get_metric_history(mrun.info.run_id, name)
        assert sorted(m.step for m in got) == [10, 20, 30], name
        by_step = {m.step: m.value for m in got}
        for r in rows:
            assert by_step[int(r["step"])] == pytest.approx(float(r[name]), rel=1e-12)


def test_best_checkpoint_and_run_files_are_artifacts(tracked, tmp_path):
    run, client, mrun = tracked
    top = {f.path for f in client.list_artifacts(mrun.info.run_id)}
    assert {"metrics.json", "config.yaml", "history.csv", "checkpoints", "report"} <= top
    assert {f.path for f in client.list_artifacts(mrun.info.run_id, "report")} == {
        "report/report.html"}
    ck = {f.path for f in client.list_artifacts(mrun.info.run_id, "checkpoints")}
    assert ck == {"checkpoints/best.pt"}
    got = client.download_artifacts(mrun.info.run_id, "checkpoints/best.pt", str(tmp_path))
    assert open(got, "rb").read() == (run / "checkpoints" / "best.pt").read_bytes()
    got = client.download_artifacts(mrun.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(open(got).read()) == json.loads((run / "metrics.json").read_text())


def test_tracking_uri_from_the_environment_file_store(flat_data, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-1")
    # The report's own content is checked with the default store; here only that it is logged.
    monkeypatch.setattr("esmm.report.build_report",
                        lambda run, out, **kw: (out.mkdir(), (out / "report.html").write_text(
                            "<html></html>")))
    run = tmp_path / "runs" / "b"
    train(_cfg(flat_data), run)
    assert not (tmp_path / "runs" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("sweep-1")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "b" and mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "ctr_auc")] == [
        10, 20, 30]
    assert {"metrics.json", "report"} <= {f.path for f in client.list_artifacts(
        mrun.info.run_id)}


def test_a_store_that_cannot_be_opened_is_a_one_line_config_error(flat_data, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    with pytest.raises(ConfigError, match=r"^train\.tracking=mlflow: the MLflow store "
                                          r"'nosuchscheme://x' cannot be used") as e:
        train(_cfg(flat_data), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_missing_mlflow_names_the_extra(flat_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("esmm.tracking.importlib.util.find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError) as e:
        train(_cfg(flat_data), tmp_path / "run")
    assert str(e.value) == ("train.tracking=mlflow: the package(s) ['mlflow'] are not "
                            "installed; install them with `pip install esmm[tracking]`, or "
                            "set train.tracking=none")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_store_failing_mid_run_stops_tracking_not_training(flat_data, tmp_path, monkeypatch,
                                                             caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def broken(self, run_id, metrics=(), params=(), tags=()):
        if metrics:
            raise mlflow.exceptions.MlflowException("connection refused")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    res = train(_cfg(flat_data), tmp_path / "run")
    assert res.step == 30 and math.isfinite(res.best_metric)
    assert "MLflow tracking stopped: logging the metrics of step 10 failed" in caplog.text


def test_tracking_none_is_left_out_of_the_stored_config(flat_data):
    cfg = config_from_dict(small_config(flat_data["train"]))
    assert "tracking" not in cfg.to_dict()["train"]  # configs of earlier runs compare equal
    assert cfg.train.tracking == "none"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": True},
                    "f": [{"g": "x"}, {"g": "y"}]}) == {
        "a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "true", "f.0.g": "x", "f.1.g": "y"}


def test_a_resumed_training_continues_its_mlflow_run(flat_data, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr("esmm.report.build_report", lambda *a, **kw: None)
    cfg = _cfg(flat_data, checkpoint_interval_s=0)
    run = tmp_path / "run"

    def ctrl_c(step, row):
        if step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, on_eval=ctrl_c)
    client = MlflowClient(tracking_uri=store.as_uri())
    (killed,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    assert killed.info.status == "KILLED"
    train(cfg, run, resume=True)
    (done,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    assert done.info.run_id == killed.info.run_id and done.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(done.info.run_id, "ctr_auc")] == [
        10, 20, 30]
