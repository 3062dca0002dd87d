"""Bad configuration gets one line and exit code 2 from the CLI, never a traceback.

Every case runs ``esmm train`` and asserts: exit code 2, exactly one ``esmm: error:`` line that
names the key (or the file and line), and no traceback. A hypothesis-driven fuzz then gives
every leaf key of the default config random values, through ``--set`` and through YAML files:
each outcome is a valid :class:`Config` or a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import Config, load_config
from esmm.errors import ConfigError
from tests.conftest import small_config

runner = CliRunner()


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _train(config: Path, out: Path, *sets: str) -> str:
    """Run ``esmm train`` expecting exit 2 and one error line; returns that line."""
    args = ["train", str(config), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    text = res.output  # stdout and stderr as a terminal shows them
    assert res.exit_code == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("esmm: error:")]
    assert len(errors) == 1, text
    assert text.strip().count("\n") == 0, f"more than one line: {text!r}"
    return errors[0]


@pytest.fixture()
def small_yaml(flat_data, tmp_path) -> Path:
    """A config that trains on real (small, simulated) data."""
    tree = small_config(flat_data["train"], flat_data["valid"], max_steps=4)
    return _write(tmp_path / "cfg.yaml", yaml.safe_dump(tree))


# ---------------------------------------------------------------------------------------------
# The cases named by the reliability review


@pytest.mark.parametrize("override, key, expect", [
    ("train.batch_size=true", "train.batch_size", "a boolean is not a number"),
    ("train.batch_size=false", "train.batch_size", "a boolean is not a number"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr", "finite"),
    ("train.optimizer.lr=-.inf", "train.optimizer.lr", "finite"),
    ("train.optimizer.lr=.nan", "train.optimizer.lr", "finite"),
    ("train.optimizer.lr=0", "train.optimizer.lr", "greater than 0"),
    ("train.optimizer.lr=true", "train.optimizer.lr", "a boolean is not a number"),
    ("train.optimizer.eps=-1", "train.optimizer.eps", "greater than 0"),
    ("train.optimizer.betas=[2,3]", "train.optimizer.betas.0", "less than 1"),
    ("train.optimizer.betas=[0.9]", "train.optimizer.betas", "expected two numbers"),
    ("train.optimizer.betas=[-0.1,0.9]", "train.optimizer.betas.0", "greater than or equal to 0"),
])
def test_reviewed_values_are_refused_naming_the_key(small_yaml, tmp_path, override, key, expect):
    line = _train(small_yaml, tmp_path / "run", override)
    assert f"{key}:" in line and expect in line, line
    assert str(small_yaml) in line  # and the file the config came from
    assert not (tmp_path / "run").exists()


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path):
    p = _write(tmp_path / "dup.yaml", "train:\n  batch_size: 64\n  epochs: 2\n  batch_size: 128\n")
    line = _train(p, tmp_path / "run")
    assert str(p) in line and "line 4" in line and "duplicate key 'batch_size'" in line
    assert "line 2" in line, line


def test_duplicate_key_in_a_set_value_and_in_a_flow_mapping(tmp_path):
    p = _write(tmp_path / "dup.yaml", "train: {optimizer: {lr: 0.1, lr: 0.2}}\n")
    assert "duplicate key 'lr'" in _train(p, tmp_path / "run")
    plain = _write(tmp_path / "plain.yaml", "train: {batch_size: 8}\n")
    line = _train(plain, tmp_path / "run", "model={tower: [4], tower: [8]}")
    assert "duplicate key 'tower'" in line and "--set" in line


def test_merge_keys_are_not_duplicates(tmp_path):
    # An anchor merged into a mapping that sets one of its keys again is ordinary YAML.
    tree = "x: &b {batch_size: 8, epochs: 2}\ntrain: {<<: *b, epochs: 3}\n"
    p = _write(tmp_path / "merge.yaml", tree)
    line = _train(p, tmp_path / "run")
    assert "x: unknown key" in line  # the merge itself was accepted
    p = _write(tmp_path / "merge2.yaml", "train: {<<: {batch_size: 8, epochs: 2}, epochs: 3}\n")
    cfg = load_config(p)
    assert (cfg.train.batch_size, cfg.train.epochs) == (8, 3)


def test_non_utf8_config_names_the_file(tmp_path):
    p = _write(tmp_path / "latin1.yaml", "model: {name: esmm}\n# caf\xe9\n".encode("latin-1"))
    line = _train(p, tmp_path / "run")
    assert str(p) in line and "not UTF-8" in line and "line 2" in line and "0xe9" in line


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.yaml", "train:\n  batch_size: 8\n  epochs: [1, 2\n")
    line = _train(p, tmp_path / "run")
    assert str(p) in line and "line " in line and "not valid YAML" in line
    p = _write(tmp_path / "tab.yaml", "train:\n\tbatch_size: 8\n")
    assert str(p) in _train(p, tmp_path / "run")
    p = _write(tmp_path / "obj.yaml", "train: !!python/object/apply:os.system [echo hi]\n")
    assert "not valid YAML" in _train(p, tmp_path / "run")
    p = _write(tmp_path / "ctl.yaml", "train: {batch_size: 8}\x07\n")
    assert str(p) in _train(p, tmp_path / "run")


def test_config_file_missing_a_folder_or_not_a_mapping(tmp_path):
    assert "does not exist" in _train(tmp_path / "nope.yaml", tmp_path / "run")
    assert "is a folder" in _train(tmp_path, tmp_path / "run")
    p = _write(tmp_path / "list.yaml", "- a\n- b\n")
    assert "expected a mapping at the top level, got list" in _train(p, tmp_path / "run")
    p = _write(tmp_path / "deep.yaml", "train: " + "[" * 5000 + "]" * 5000 + "\n")
    assert str(p) in _train(p, tmp_path / "run")


def test_monitor_typo_is_refused_before_training(small_yaml, tmp_path):
    line = _train(small_yaml, tmp_path / "run", "train.early_stop.metric=cvr_aux")
    assert "train.early_stop.metric" in line and "'cvr_aux'" in line and "'cvr_auc'" in line
    line = _train(small_yaml, tmp_path / "run", "train.early_stop.metric=ctr_logloss+ctcvr_loss")
    assert "train.early_stop.metric" in line and "'ctcvr_loss'" in line
    # Well-formed but not reported by this model: a task it has no metric space for.
    line = _train(small_yaml, tmp_path / "run", "train.early_stop.metric=click_auc")
    assert "train.early_stop.metric" in line and "'click_auc' is not a metric of model" in line
    line = _train(small_yaml, tmp_path / "run", "train.early_stop.metric=ctr_auc_entire_space")
    assert "train.early_stop.metric" in line and "cvr_auc_entire_space" in line
    # GAUC groups by user: without a user column it cannot be computed.
    line = _train(small_yaml, tmp_path / "run", "train.early_stop.metric=ctr_gauc",
                  "data.user_column=null")
    assert "train.early_stop.metric" in line and "data.user_column" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize("metric, why", [
    ("ctr_pcoc", "PCOC is best at 1"),
    ("cvr_auc_entire_space_oracle", "true probabilities"),
    ("n_impressions", "is not a metric to monitor"),
    ("ctr_auc+ctcvr_logloss", "opposite directions"),
    ("ctr_auc+", "empty term"),
])
def test_monitors_without_a_direction_are_refused(small_yaml, tmp_path, metric, why):
    line = _train(small_yaml, tmp_path / "run", f"train.early_stop.metric={metric}")
    assert "train.early_stop.metric" in line and why in line


@pytest.mark.parametrize("sets, monitor, fix", [
    # The shipped esmm_sim.yaml did this: ESMM's own monitor is a sum of log losses.
    (["train.early_stop.mode=max"], "ctr_logloss+ctcvr_logloss", "set mode: min"),
    (["model.name=aman", "train.early_stop.mode=min"], "cvr_auc", "set mode: max"),
    (["train.early_stop.metric=cvr_auc", "train.early_stop.mode=min"], "cvr_auc",
     "set mode: max"),
    (["train.early_stop.metric=ctr_logloss", "train.early_stop.mode=max"], "ctr_logloss",
     "set mode: min"),
])
def test_mode_against_the_metric_direction_is_refused(small_yaml, tmp_path, sets, monitor, fix):
    line = _train(small_yaml, tmp_path / "run", *sets)
    assert "train.early_stop.mode" in line and repr(monitor) in line and fix in line
    assert ("lower is better" if "logloss" in monitor else "higher is better") in line
    assert not (tmp_path / "run").exists()


def test_missing_data_paths_exit_2_naming_key_and_path(small_yaml, tmp_path):
    missing = tmp_path / "no_such_split"
    line = _train(small_yaml, tmp_path / "run", f"data.train={missing}")
    assert "data.train" in line and str(missing) in line and "does not exist" in line
    line = _train(small_yaml, tmp_path / "run", f"data.eval={missing}")
    assert "data.eval" in line and str(missing) in line
    tree = yaml.safe_load(small_yaml.read_text())
    tree["data"]["train"] = "bad\0path"  # YAML writes it as "bad\0path", a NUL byte
    p = _write(tmp_path / "nul.yaml", yaml.safe_dump(tree))
    line = _train(p, tmp_path / "run")
    assert "data.train: 'bad\\x00path' does not exist" in line, line
    assert not (tmp_path / "run").exists()


def test_evaluate_names_a_missing_split_of_the_run_config(flat_data, tmp_path):
    gone = tmp_path / "test_split_moved_away.parquet"
    tree = small_config(flat_data["train"], None, max_steps=2)
    tree["data"]["test"] = str(gone)
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(tree))
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"data.test: {gone} does not exist" in res.output


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_missing_data_option_path_exits_2_naming_the_option(flat_data, tmp_path, command):
    tree = small_config(flat_data["train"], None, max_steps=2)
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(tree))
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    gone = tmp_path / "moved_away.parquet"
    out = tmp_path / "out.parquet"
    res = runner.invoke(app, [command, str(tmp_path / "run"), "--data", str(gone),
                              "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().count("\n") == 0, res.output
    assert f"--data {gone}: no such file or folder" in res.output
    assert not out.exists()


def test_an_unknown_model_name_lists_the_known_ones(small_yaml, tmp_path):
    line = _train(small_yaml, tmp_path / "run", "model.name=esm")
    assert "model.name: unknown model 'esm'; expected one of [" in line and "'esmm'" in line
    assert not (tmp_path / "run").exists()


def test_a_label_listed_as_a_feature_is_refused(small_yaml, tmp_path):
    line = _train(small_yaml, tmp_path / "run",
                  "features=[{name: click, kind: categorical, buckets: 10}]")
    assert "label column(s) ['click'] are listed as features" in line, line
    assert not (tmp_path / "run").exists()


def test_buckets_beyond_int64_are_a_config_error(small_yaml, tmp_path):
    line = _train(small_yaml, tmp_path / "run", "features.0.buckets=9223372036854775808")
    assert "features.0.buckets:" in line and "less than 9223372036854775808" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("buckets", [10**15, 2**62])
def test_an_embedding_table_too_large_to_allocate_is_one_line(small_yaml, tmp_path, buckets):
    # 10**15 rows exceed any address space (allocation fails); 2**62 overflows torch's size.
    res = runner.invoke(app, ["train", str(small_yaml), "--out", str(tmp_path / "run"),
                              "--set", f"features.0.buckets={buckets}"])
    text = res.output
    assert res.exit_code == 1 and "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("esmm: error:")]
    assert len(errors) == 1, text
    assert "does not fit in memory" in errors[0] and f"{buckets:,} buckets" in errors[0]
    assert "'101'" in errors[0] and "lower `buckets`" in errors[0], errors[0]


def test_simulator_set_values_get_one_line(tmp_path):
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "sim"), "--rows", "100",
                              "--set", "cvr=[0.1"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().count("\n") == 0 and "--set 'cvr=[0.1'" in res.output
    assert not (tmp_path / "sim").exists()


# ---------------------------------------------------------------------------------------------
# A valid range for every field


@pytest.mark.parametrize("override, key", [
    ("data.train=''", "data.train"),
    ("data.format=xlsx", "data.format"),
    ("data.labels.conversion=click", "data.labels"),
    ("data.labels.click=''", "data.labels.click"),
    ("data.user_column=''", "data.user_column"),
    ("data.user_key=[a]", "data.user_key"),
    ("data.weight_column=click", "data"),
    ("data.conversion_without_click=ignore", "data.conversion_without_click"),
    ("data.csv_header=1", "data.csv_header"),
    ("data.csv_columns=[]", "data.csv_columns"),
    ("data.csv_columns=[a, a]", "data.csv_columns"),
    ("data.loader=disk", "data.loader"),
    ("data.chunk_rows=0", "data.chunk_rows"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer"),
    ("data.read_ahead=-1", "data.read_ahead"),
    ("data.read_ahead=1000", "data.read_ahead"),
    ("features.0.buckets=0", "features.0.buckets"),
    ("features.0.buckets=1.5", "features.0.buckets"),
    ("features.0.kind=image", "features.0.kind"),
    ("features.0.dim=true", "features.0.dim"),
    ("model.tower=[]", "model.tower"),
    ("model.tower=[32, 0]", "model.tower"),
    ("model.embedding_dim=0", "model.embedding_dim"),
    ("model.activation=swish", "model.activation"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=.nan", "model.dropout"),
    ("model.batch_norm=1", "model.batch_norm"),
    ("model.aman_rate=0", "model.aman_rate"),
    ("model.oversample_k=0", "model.oversample_k"),
    ("model.unbias_clip=1.5", "model.unbias_clip"),
    ("model.division_clip=0", "model.division_clip"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=5.5", "train.batch_size"),
    ("train.batch_size='64'", "train.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.optimizer.name=rmsprop", "train.optimizer.name"),
    ("train.optimizer.weight_decay=-0.1", "train.optimizer.weight_decay"),
    ("train.optimizer.weight_decay=.inf", "train.optimizer.weight_decay"),
    ("train.optimizer.fused=1", "train.optimizer.fused"),
    ("train.sparse_optimizer.name=adam", "train.sparse_optimizer.name"),
    ("train.sparse_optimizer.lr=0", "train.sparse_optimizer.lr"),
    ("train.seed=-1", "train.seed"),
    ("train.seed=18446744073709551616", "train.seed"),
    ("train.shuffle_block=0", "train.shuffle_block"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.eval_batch_size=-1", "train.eval_batch_size"),
    ("train.early_stop.metric=''", "train.early_stop.metric"),
    ("train.early_stop.mode=up", "train.early_stop.mode"),
    ("train.early_stop.patience=0", "train.early_stop.patience"),
    ("train.num_threads=0", "train.num_threads"),
    ("train.progress=maybe", "train.progress"),
    ("train.checkpoint_interval_s=-1", "train.checkpoint_interval_s"),
    ("train.checkpoint_interval_s=.inf", "train.checkpoint_interval_s"),
    ("train.device=gpu", "train.device"),
    ("train.optimiser.lr=0.1", "train.optimiser"),
    ("model=[1]", "model"),
])
def test_every_field_has_a_range(small_yaml, tmp_path, override, key):
    line = _train(small_yaml, tmp_path / "run", override)
    assert f" {key}:" in line, line


@pytest.mark.parametrize("override, fragment", [
    ("nokey", "expected the form path.to.key=value"),
    ("=5", "the key path is empty"),
    ("features.9.dim=4", "is not an index"),
    ("train.batch_size.x=1", "is not a mapping"),
    ("model.tower=[1, 2", "not valid YAML"),
])
def test_malformed_set_options(small_yaml, tmp_path, override, fragment):
    assert fragment in _train(small_yaml, tmp_path / "run", override)


def test_values_that_remain_valid(tmp_path):
    # Strictness refuses wrong types, not ordinary YAML: numbers from --set strings, 1e-3
    # as a float, an integer for a float field, null for an automatic setting.
    p = _write(tmp_path / "ok.yaml",
               "train:\n  optimizer: {lr: 1e-3, eps: 1E-8, betas: [0.9, 0.999]}\n"
               "  checkpoint_interval_s: 0\n  early_stop: {metric: cvr_auc, mode: null}\n"
               "  progress: off\n")
    cfg = load_config(p, ["train.batch_size=5", "train.optimizer.weight_decay=1e-5",
                          "features=aliccp", "features.0.buckets=77", "data.user_column=101"])
    assert cfg.train.batch_size == 5 and cfg.train.optimizer.lr == 1e-3
    assert cfg.train.optimizer.eps == 1e-8 and cfg.train.optimizer.weight_decay == 1e-5
    assert cfg.train.optimizer.betas == (0.9, 0.999)
    assert cfg.train.early_stop.mode == "auto" and cfg.train.progress == "off"
    assert cfg.features[0].buckets == 77 and cfg.data.user_column == "101"
    # The stored form (as in config.yaml and checkpoints) validates again to the same config.
    assert Config.model_validate(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# Fuzz: random values for every leaf key


def _leaves(tree: object, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out += _leaves(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]]


BASE_TREE = Config.model_validate(
    {"features": [{"name": "205", "kind": "categorical", "buckets": 10, "dim": 4}]}).to_dict()
LEAF_KEYS = sorted(set(_leaves(BASE_TREE)) - {"features"}) + [
    f"features.0.{k}" for k in BASE_TREE["features"][0]] + ["features", "nope", "train.nope"]

_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "max", "min", "adam", "esmm", "cpu", "on", "aliccp", "1e-3",
                     "ctr_auc", "ctr_logloss+ctcvr_logloss", "ctr_pcoc", "101"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _set_value(key: str, tree: dict, value: object) -> dict:
    tree = yaml.safe_load(yaml.safe_dump(tree))
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return tree


def _check_outcome(fn) -> None:
    """A valid Config, or a one-line ConfigError; anything else fails the test."""
    try:
        cfg = fn()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        # The message may quote the value itself, which can be any text, "Traceback" too.
        assert "Traceback (most recent call last)" not in msg
        return
    assert isinstance(cfg, Config)
    # What validated is finite and round-trips through its stored form.
    for key in _leaves(cfg.to_dict()):
        node = cfg.to_dict()
        for p in key.split("."):
            node = node[p]
        assert not (isinstance(node, float) and not math.isfinite(node)), key
    assert Config.model_validate(cfg.to_dict()) == cfg


FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(key=st.sampled_from(LEAF_KEYS), value=_values, raw=st.one_of(st.none(), st.text()))
def test_fuzz_set_overrides(tmp_path_factory, key, value, raw):
    base = tmp_path_factory.getbasetemp() / "fuzz_base.yaml"
    if not base.exists():
        base.write_text(yaml.safe_dump(BASE_TREE), encoding="utf-8")
    # Either the YAML text of a random value, or random text as typed on a command line.
    text = raw if raw is not None else yaml.safe_dump(value, default_flow_style=True,
                                                      width=10**6).removesuffix("\n...\n")
    _check_outcome(lambda: load_config(base, [f"{key}={text}"]))


@FUZZ
@given(key=st.sampled_from(LEAF_KEYS), value=_values)
def test_fuzz_yaml_files(tmp_path_factory, key, value):
    p = tmp_path_factory.getbasetemp() / "fuzz_file.yaml"
    p.write_text(yaml.safe_dump(_set_value(key, BASE_TREE, value)), encoding="utf-8")
    _check_outcome(lambda: load_config(p))


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_fuzz_raw_file_bytes(tmp_path_factory, data):
    p = tmp_path_factory.getbasetemp() / "fuzz_bytes.yaml"
    p.write_bytes(data)
    _check_outcome(lambda: load_config(p))
