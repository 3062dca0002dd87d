"""esmm tune: a real Optuna study on tiny trainings: resume, pruning, parallel workers, errors."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import load_config
from esmm.errors import ConfigError, UsageError
from tests.conftest import cli_output, small_config

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

import esmm.train  # noqa: E402
from esmm import tune as tune_mod  # noqa: E402

SPACE = {"train.optimizer.lr": {"log_uniform": [1.0e-3, 2.0e-2]},
         "model.tower": {"choice": [[16], [32, 16]]},
         "model.embedding_dim": {"int_uniform": [4, 8]}}


@pytest.fixture()
def files(flat_data, tmp_path):
    """A base config (30 steps, an evaluation every 10) and a space file."""
    cfg = small_config(flat_data["train"], flat_data["valid"], eval_every=10, max_steps=30)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp_path / "cfg.yaml", tmp_path / "space.yaml"


def _study(out):
    return optuna.load_study(study_name="esmm", storage=f"sqlite:///{out / 'study.db'}")


def _is_png(path):
    import matplotlib.pyplot as plt

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert plt.imread(path).ndim == 3  # decodes to an image


def test_a_study_resumes_after_interruption_and_writes_every_file(files, tmp_path,
                                                                  monkeypatch):
    cfg, space = files
    out = tmp_path / "study"
    real_train, calls = esmm.train.train, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second trial
        return real_train(*args, **kwargs)

    monkeypatch.setattr(esmm.train, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune_mod.tune(cfg, space, 3, out, seed=1)
    monkeypatch.setattr(esmm.train, "train", real_train)
    first = _study(out).trials
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.FAIL]
    # A process killed in a trial leaves it running in the storage.
    _study(out).ask()

    res = tune_mod.tune(cfg, space, 3, out, seed=1)
    trials = _study(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.user_attrs.get("interrupted", False) for t in trials] == [
        False, True, True, False, False]
    assert trials[0].value == first[0].value and trials[0].params == first[0].params
    assert res.counts == {"complete": 3, "fail": 2}
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert res.best_trial == best.number and res.best_value == best.value
    assert res.direction == "minimize" and res.metric == "ctr_logloss+ctcvr_logloss"

    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.train.optimizer.lr == best.params["train.optimizer.lr"]
    assert best_cfg.model.tower == json.loads(best.params["model.tower"])
    assert best_cfg.model.embedding_dim == best.params["model.embedding_dim"]
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete", "fail", "fail", "complete", "complete"]
    assert float(rows[best.number]["ctr_logloss+ctcvr_logloss"]) == pytest.approx(best.value)
    assert rows[1]["note"] == "interrupted"
    md = (out / "trials.md").read_text()
    assert f"| {best.number} (best) | complete |" in md
    for name in ("history.png", "importances.png"):
        _is_png(out / name)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert (out / "trials" / f"{t.number:04d}" / "metrics.json").is_file()

    again = tune_mod.tune(cfg, space, 3, out, seed=1)  # already done: no new trial
    assert len(_study(out).trials) == 5 and again.best_trial == res.best_trial


def test_a_lagging_trial_is_pruned_at_an_evaluation(files, tmp_path):
    cfg, space = files
    base = load_config(cfg)
    st = tune_mod.Study(base.to_dict(), tune_mod.load_space(space, base.to_dict()),
                        "ctr_logloss+ctcvr_logloss", tmp_path / "s", trials=2,
                        startup_trials=1)
    st.out.mkdir()
    tune_mod._prepare_study(st)
    study = _study(st.out)
    study.enqueue_trial({"train.optimizer.lr": 0.01, "model.tower": "[16]",
                         "model.embedding_dim": 8})
    study.enqueue_trial({"train.optimizer.lr": 0.001, "model.tower": "[16]",
                         "model.embedding_dim": 8})
    tune_mod._work(st)
    good, bad = _study(st.out).trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [10, 20, 30]
    assert bad.state == TrialState.PRUNED and bad.last_step == 10
    assert bad.intermediate_values[10] > good.intermediate_values[10]
    with open(st.out / "trials" / "0001" / "history.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["10"]


def test_parallel_workers_share_the_study(files, tmp_path):
    cfg, space = files
    res = tune_mod.tune(cfg, space, 2, tmp_path / "par", jobs=2, seed=3,
                        overrides=["train.max_steps=10"], metric="cvr_auc")
    trials = _study(tmp_path / "par").trials
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert res.direction == "maximize"
    assert load_config(tmp_path / "par" / "best_config.yaml").train.early_stop.metric == (
        "cvr_auc")
    assert (tmp_path / "par" / "history.png").is_file()


@pytest.mark.parametrize(("spec", "message"), [
    ({"train.optimizer.lrr": {"uniform": [0.1, 0.2]}},
     r"train\.optimizer\.lrr: `lrr` is not a key of `train\.optimizer`; did you mean "
     r"`train\.optimizer\.lr`\?"),
    ({"train.optimizer": {"uniform": [0.1, 0.2]}},
     r"train\.optimizer: `train\.optimizer` is a section; expected a key inside it"),
    ({"model.tower.x": {"choice": [1]}},
     r"model\.tower\.x: `model\.tower` is a list; expected an index, got `x`"),
    ({"train.optimizer.lr": {"normal": [0.1, 0.2]}},
     r"train\.optimizer\.lr: expected one of \{log_uniform: \[low, high\]\}"),
    ({"train.optimizer.lr": {"log_uniform": [0.0, 0.1]}},
     r"train\.optimizer\.lr: log_uniform needs low > 0, got 0\.0"),
    ({"train.optimizer.lr": {"uniform": [0.2, 0.1]}},
     r"train\.optimizer\.lr: uniform needs low < high"),
    ({"model.embedding_dim": {"int_uniform": [4.5, 8]}},
     r"model\.embedding_dim: int_uniform takes integers"),
    ({"model.activation": {"choice": ["relu", "swish"]}},
     r"model\.activation: the value 'swish' is refused for this config: "
     r"model\.activation: Input should be 'relu', 'gelu' or 'tanh' \(got 'swish'\)$"),
    ({"model.embedding_dim": {"int_uniform": [0, 8]}},
     r"model\.embedding_dim: the value 0 is refused"),
    ({"model.tower": {"choice": []}}, r"model\.tower: choice takes a non-empty list"),
])
def test_a_bad_space_is_a_one_line_error_naming_the_key(files, spec, message):
    cfg, space = files
    space.write_text(yaml.safe_dump(spec))
    tree = load_config(cfg).to_dict()
    with pytest.raises(ConfigError, match=message) as e:
        tune_mod.load_space(space, tree)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--space {space}: ")


def test_a_metric_without_direction_or_unknown_is_refused_before_any_trial(files, tmp_path):
    cfg, space = files
    with pytest.raises(UsageError, match=r"--metric 'ctr_pcoc': 'ctr_pcoc' cannot be "
                                         r"monitored: PCOC is best at 1"):
        tune_mod.tune(cfg, space, 2, tmp_path / "x", metric="ctr_pcoc")
    with pytest.raises(UsageError, match=r"--metric 'cvr_aucc': .*did you mean 'cvr_auc'"):
        tune_mod.tune(cfg, space, 2, tmp_path / "x", metric="cvr_aucc")
    assert not (tmp_path / "x").exists()


def test_cli_tune_reports_errors_in_one_line_with_exit_2(files, tmp_path):
    cfg, space = files
    space.write_text("train.optimizer.lr: {log_uniform: [1, 0.1]}\n")
    res = CliRunner().invoke(app, ["tune", str(cfg), "--space", str(space), "--trials", "2",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert set(cli_output(res).strip().splitlines()) == {
        f"esmm: error: --space {space}: train.optimizer.lr: log_uniform needs low < high, "
        "got [1, 0.1]"}


def test_missing_optuna_names_the_extra(files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    cfg, space = files
    with pytest.raises(UsageError, match=r"needs the package 'optuna'.*pip install "
                                         r"esmm\[tune\]"):
        tune_mod.tune(cfg, space, 2, tmp_path / "x")


def test_a_folder_with_trial_runs_but_no_study_is_refused(files, tmp_path):
    cfg, space = files
    base = load_config(cfg)
    st = tune_mod.Study(base.to_dict(), tune_mod.load_space(space, base.to_dict()),
                        "ctr_logloss+ctcvr_logloss", tmp_path / "s", trials=2)
    (st.out / "trials" / "mlruns").mkdir(parents=True)  # a tracking store alone is no trial
    tune_mod._prepare_study(st)
    (st.out / "study.db").unlink()
    (st.out / "trials" / "0000").mkdir()
    with pytest.raises(UsageError, match=r"holds trial runs \(trials/\) but no study\.db"):
        tune_mod._prepare_study(st)
