"""The Python API: fit from paths and tables, evaluate, predict, export and load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import esmm
from esmm.api import Run, in_notebook
from esmm.errors import ArgumentError, ConfigError, DataError, UsageError
from esmm.export import Predictor
from tests.conftest import small_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _config(**train_kw) -> dict:
    tree = small_config(Path("unused"), None, **{"max_steps": 12, "eval_every": 6, **train_kw})
    del tree["data"]["train"], tree["data"]["eval"]
    return tree


@pytest.fixture(scope="module")
def trained(flat_data, tmp_path_factory) -> Run:
    return esmm.fit(_config(), train=flat_data["train"], eval=flat_data["valid"],
                    out=tmp_path_factory.mktemp("api") / "run")


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- fit


def test_fit_from_a_dataframe_equals_fit_from_its_file(flat_data, trained, tmp_path):
    run = esmm.fit(_config(), train=pd.read_parquet(flat_data["train"]),
                   eval=pq.read_table(flat_data["valid"]), out=tmp_path / "mem")
    assert run.metrics and run.metrics == trained.metrics
    assert (run.best_step, run.best_metric) == (trained.best_step, trained.best_metric)
    # the run's config records the paths it read, and no path for data given in memory
    assert yaml.safe_load((trained.path / "config.yaml").read_text())["data"]["train"] == \
        str(flat_data["train"])
    assert yaml.safe_load((run.path / "config.yaml").read_text())["data"]["train"] is None
    with pytest.raises(UsageError, match="no data to evaluate"):
        run.evaluate()


def test_fit_from_an_impressions_users_pair_equals_the_normalized_folder(normalized_data,
                                                                         tmp_path):
    from_path = esmm.fit(_config(), train=normalized_data["train"],
                         eval=normalized_data["valid"], out=tmp_path / "path")
    pair = {k: (pd.read_parquet(p / "impressions.parquet"), pq.read_table(p / "users.parquet"))
            for k, p in normalized_data.items()}
    from_pair = esmm.fit(_config(), train=pair["train"], eval=pair["valid"],
                         out=tmp_path / "pair")
    assert from_pair.metrics == from_path.metrics
    assert "cvr_auc_entire_space" in from_pair.metrics


def test_keyword_overrides_set_config_keys(flat_data, tmp_path):
    run = esmm.fit(_config(), train=flat_data["train"], out=tmp_path / "r",
                   model__name="base", train__optimizer__lr=0.01, train__max_steps=3)
    assert run.config.model.name == "base" and run.config.train.optimizer.lr == 0.01
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["model"]["name"] == "base" and saved["train"]["max_steps"] == 3
    assert run.step == 3 and run.metrics == {}  # no eval split: nothing evaluated


def test_fit_takes_a_yaml_path_and_a_config(flat_data, tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(_config(max_steps=2)))
    a = esmm.fit(p, train=flat_data["train"], eval=flat_data["valid"], out=tmp_path / "a")
    cfg = esmm.load_config(p)
    b = esmm.fit(cfg, train=flat_data["train"], eval=flat_data["valid"], out=tmp_path / "b")
    assert a.metrics == b.metrics and a.step == 2


def test_fit_without_out_writes_a_temporary_run_folder_it_reports(flat_data, caplog):
    with caplog.at_level(logging.INFO, logger="esmm"):
        run = esmm.fit(_config(max_steps=2), train=flat_data["train"])
    assert run.path.is_dir() and (run.path / "checkpoints" / "best.pt").is_file()
    assert run.path.parent == Path(tempfile.gettempdir())
    assert f"run folder: {run.path}" in caplog.text
    assert str(run.path) in repr(run)


def test_resume_continues_a_run(flat_data, tmp_path):
    cfg = _config(max_steps=4)
    esmm.fit(cfg, train=flat_data["train"], out=tmp_path / "r")
    with pytest.raises(UsageError, match="already holds a run"):
        esmm.fit(cfg, train=flat_data["train"], out=tmp_path / "r")
    run = esmm.fit(cfg, train=flat_data["train"], out=tmp_path / "r", resume=True)
    assert run.step == 4


# ----------------------------------------------------------------------------- scoring


def test_evaluate_gives_the_same_metrics_from_a_path_a_table_and_the_run(flat_data, trained):
    by_path = trained.evaluate(flat_data["valid"])
    assert by_path == trained.metrics
    assert trained.evaluate(pd.read_parquet(flat_data["valid"])) == by_path
    assert trained.evaluate(flat_data["valid"], loader="memory", batch_size=1000) == \
        pytest.approx(by_path, rel=1e-9)


def test_predict_keeps_input_order_and_matches_every_input_kind(flat_data, trained, tmp_path):
    df = pd.read_parquet(flat_data["valid"]).drop(columns=["click", "conversion"])
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    out = trained.predict(shuffled, keep=["sample_id"])
    assert list(out.columns) == ["sample_id", "p_ctr", "p_cvr", "p_ctcvr"]
    assert out["sample_id"].tolist() == shuffled["sample_id"].tolist()
    ref = trained.predict(flat_data["valid"], keep=["sample_id"]).set_index("sample_id")
    np.testing.assert_array_equal(out["p_ctr"].to_numpy(),
                                  ref.loc[out["sample_id"], "p_ctr"].to_numpy())
    streamed = trained.predict(flat_data["valid"], keep="sample_id", loader="stream")
    pd.testing.assert_frame_equal(streamed.set_index("sample_id"), ref)
    np.testing.assert_allclose(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"], rtol=1e-5)
    n = trained.predict_to_file(shuffled, tmp_path / "p.parquet", keep=["sample_id"])
    assert n == len(shuffled)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), out)


def test_load_gives_the_run_of_a_folder_or_checkpoint(flat_data, trained):
    by_folder = esmm.load(trained.path)
    assert isinstance(by_folder, Run) and by_folder.metrics == trained.metrics
    assert by_folder.best_step == trained.best_step
    by_file = esmm.load(trained.checkpoint)
    assert isinstance(by_file, Run)
    a = by_folder.predict(flat_data["valid"])
    pd.testing.assert_frame_equal(a, by_file.predict(flat_data["valid"]))
    pd.testing.assert_frame_equal(a, trained.predict(flat_data["valid"]))
    assert by_folder.checkpoint_step == trained.best_step
    hist = by_folder.history
    assert hist["step"].tolist() == [6, 12]


@pytest.mark.parametrize("fmt,name", [("torchscript", "m.pt"), ("onnx", "m.onnx")])
def test_export_and_load_score_like_the_run(flat_data, trained, tmp_path, fmt, name):
    meta = trained.export(tmp_path / name, fmt, parity_rows=64)
    assert meta["format"] == fmt and meta["parity"]["max_abs_diff"]["p_ctcvr"] < 1e-5
    scorer = esmm.load(tmp_path / name)
    assert isinstance(scorer, Predictor) and scorer.format == fmt
    table = pq.read_table(flat_data["valid"])
    got = scorer.predict_columns({c: table.column(c) for c in table.column_names})
    want = trained.predict(table)
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(got[k], want[k].to_numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs,words", [
    ({"config": 42}, ["config", "int", "expected a YAML path"]),
    ({"config": {}, "train": 42}, ["train", "int", "DataFrame"]),
    ({"config": {}, "train": ("a.parquet",)}, ["train", "1 items", "(impressions, users)"]),
    ({"config": {}, "train": (pa.table({"a": [1]}), 5)}, ["train[1] (users)", "int"]),
    ({"config": {}, "tarin": "x"}, ["'tarin'", "train__batch_size"]),
    ({"config": {}, "resume": True}, ["resume=True needs out"]),
])
def test_bad_arguments_are_one_line_type_errors_naming_the_argument(kwargs, words):
    with pytest.raises(ArgumentError) as e:
        esmm.fit(**kwargs)
    assert isinstance(e.value, TypeError) and isinstance(e.value, UsageError)
    text = _one_line(e)
    for w in words:
        assert w in text, text


def test_bad_override_values_name_the_config_key(flat_data):
    with pytest.raises(ConfigError) as e:
        esmm.fit(_config(), train=flat_data["train"], train__batch_size=0)
    assert "train.batch_size" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        esmm.fit(_config(), train=flat_data["train"], train__batchsize=5)
    assert "batchsize" in _one_line(e)


def test_bad_data_in_memory_names_the_argument_and_row(flat_data):
    df = pd.read_parquet(flat_data["train"])
    df.loc[4, "click"] = 3
    with pytest.raises(DataError) as e:
        esmm.fit(_config(), train=df)
    text = _one_line(e)
    assert "train (in memory)" in text and "row 4" in text and "'click'" in text


def test_bad_scoring_arguments(trained, flat_data):
    with pytest.raises(UsageError) as e:
        trained.predict(flat_data["valid"], keep=["nope"], loader="memory")
    assert "'nope'" in _one_line(e)
    with pytest.raises(UsageError, match="loader 'fast': expected"):
        trained.evaluate(flat_data["valid"], loader="fast")
    with pytest.raises(ArgumentError, match="batch_size: got 0"):
        trained.predict(flat_data["valid"], batch_size=0)
    with pytest.raises(ArgumentError, match="path: got int"):
        esmm.load(42)
    with pytest.raises(UsageError, match="no such run folder"):
        esmm.load(flat_data["train"].parent / "nothing-here")
    assert trained.evaluate() == trained.metrics  # the config's data.eval


# ----------------------------------------------------------------------------- the package


def test_import_is_lazy_and_every_public_name_resolves():
    code = ("import sys, esmm; assert 'torch' not in sys.modules, 'torch imported'; "
            "[getattr(esmm, n) for n in esmm.__all__]; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        esmm.nothing  # noqa: B018


def test_simulate_in_memory_and_to_a_folder(tmp_path):
    splits = esmm.simulate({"train": 1500, "test": 500}, preset="dense", seed=1)
    assert set(splits) == {"train", "test"}
    imp, users = splits["train"]
    assert imp.num_rows == 1500 and "common_key" in users.column_names
    paths = esmm.simulate({"train": 1500, "test": 500}, preset="dense", seed=1, out=tmp_path)
    on_disk = pq.read_table(paths["train"] / "impressions.parquet")
    assert on_disk.equals(imp)
    assert json.loads((tmp_path / "simulation.json").read_text())["seed"] == 1
    with pytest.raises(ArgumentError, match="rows: got str"):
        esmm.simulate("many")


def test_progress_bar_follows_terminal_notebook_and_quiet(monkeypatch):
    from esmm import train as train_mod

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not in_notebook()
    assert not train_mod._progress_enabled("auto")
    assert train_mod._progress_enabled("on")

    class ZMQInteractiveShell:  # what a Jupyter kernel's get_ipython() returns
        pass

    fake = type(sys)("IPython")
    fake.get_ipython = ZMQInteractiveShell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_notebook() and train_mod._progress_enabled("auto")
    esmm_log = logging.getLogger("esmm")
    monkeypatch.setattr(esmm_log, "level", logging.WARNING)
    assert not train_mod._progress_enabled("auto") and train_mod._progress_enabled("on")


# ----------------------------------------------------------------------------- CLI conventions


def _esmm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esmm", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin",
                                        "OMP_NUM_THREADS": "1"}, timeout=300)


def test_version_option():
    from typer.testing import CliRunner

    from esmm.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"esmm {esmm.__version__}"


def test_cli_commands_give_what_the_api_gives(flat_data, trained, tmp_path):
    from typer.testing import CliRunner

    from esmm.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["evaluate", str(trained.path), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["metrics"] == trained.evaluate() and saved["step"] == trained.best_step
    assert saved["data"] == str(flat_data["valid"])
    res = cli.invoke(app, ["predict", str(trained.path), "--data", str(flat_data["valid"]),
                           "--out", str(tmp_path / "p.parquet"), "--keep", "sample_id"])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"),
                                  trained.predict(flat_data["valid"], keep=["sample_id"]))
    res = cli.invoke(app, ["export", str(trained.path), "--out", str(tmp_path / "m.pt"),
                           "--parity-rows", "32"])
    assert res.exit_code == 0 and "parity max abs diff" in res.output, res.output
    assert isinstance(esmm.load(tmp_path / "m.pt"), Predictor)


SIM = ("simulate", "--preset", "dense", "--rows", "1000", "--valid-rows", "0", "--test-rows",
       "0", "--out", "d")


def test_quiet_silences_info_logs_and_verbose_shows_debug(tmp_path):
    plain = _esmm(*SIM, cwd=tmp_path)
    assert plain.returncode == 0 and " INFO esmm.data.simulate: simulated train" in plain.stderr
    assert " DEBUG " not in plain.stderr
    for args in (("-q", *SIM), (*SIM, "--quiet")):  # before or after the command's name
        quiet = _esmm(*args, cwd=tmp_path)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
        assert json.loads(quiet.stdout)["train"]["impressions"] == 1000
    verbose = _esmm(*SIM[:1], "-v", *SIM[1:], cwd=tmp_path)
    assert verbose.returncode == 0
    assert " DEBUG esmm: esmm " in verbose.stderr and " INFO " in verbose.stderr
    both = _esmm("-v", *SIM, "-q", cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr.strip() == ("esmm: error: -v/--verbose and -q/--quiet: give one of "
                                   "them, not both")


# ----------------------------------------------------------------------------- packaging


def test_extras_reference_each_other_and_installed_torch_satisfies_the_requirement():
    import torch
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    meta = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    dev = [Requirement(r) for r in extras["dev"]]
    assert any(r.name == "esmm" and "serve" in r.extras for r in dev)
    others = {Requirement(r).name for k, v in extras.items() if k != "dev" for r in v}
    assert not others & {r.name for r in dev if r.name != "esmm"}  # none repeated
    torch_req = next(Requirement(r) for r in meta["dependencies"] if r.startswith("torch"))
    # a local build such as 2.13.0+cpu must satisfy it, or pip would fetch another torch
    assert torch_req.specifier.contains(torch.__version__)
    for v in ("2.13.0+cpu", "2.14.3", "2.2.0"):
        assert torch_req.specifier.contains(v), v
