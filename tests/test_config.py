import pytest

from esmm.config import apply_overrides, config_from_dict, load_config
from esmm.errors import ConfigError
from esmm.models import model_names


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_feature_preset(tmp_path):
    cfg = load_config(_write(tmp_path, "features: aliccp\n"))
    names = [f.name for f in cfg.features]
    assert "101" in names and "109_14" in names and "853" in names
    assert cfg.model.tower == [360, 200, 80] and cfg.model.embedding_dim == 18


def test_unknown_key_reports_its_path(tmp_path):
    p = _write(tmp_path, "train:\n  optimizer: {name: adam, lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.optimizer.lrr" in str(e.value) and "unknown key" in str(e.value)
    assert str(p) in str(e.value)


def test_wrong_type_reports_path_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "train: {batch_size: many}\n"))
    assert "train.batch_size" in str(e.value) and "'many'" in str(e.value)


def test_set_overrides_parse_yaml_values(tmp_path):
    p = _write(tmp_path, "features: [{name: '205', buckets: 10}]\n")
    cfg = load_config(p, ["train.optimizer.lr=0.01", "model.tower=[64,32]", "model.name=base",
                          "features.0.dim=4", "data.user_column=101"])
    assert cfg.train.optimizer.lr == 0.01
    assert cfg.model.tower == [64, 32]
    assert cfg.model.name == "base"
    assert cfg.features[0].dim == 4
    assert cfg.data.user_column == "101"


def test_bad_override_forms():
    with pytest.raises(ConfigError, match="path.to.key=value"):
        apply_overrides({}, ["nokey"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"features": [{}]}, ["features.3.dim=4"])


def test_label_column_as_feature_is_refused():
    with pytest.raises(ConfigError, match="label column"):
        config_from_dict({"features": [{"name": "click", "buckets": 2}]})


def test_categorical_needs_buckets_and_no_duplicates():
    with pytest.raises(ConfigError, match="buckets"):
        config_from_dict({"features": [{"name": "205"}]})
    with pytest.raises(ConfigError, match="more than once"):
        config_from_dict({"features": [{"name": "205", "buckets": 3},
                                       {"name": "205", "buckets": 3}]})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_progress_accepts_yaml_booleans():
    # `--set train.progress=off` arrives as YAML False; it must mean "off", not a type error.
    assert load_config(None, ["train.progress=off"]).train.progress == "off"
    assert load_config(None, ["train.progress=on"]).train.progress == "on"
    with pytest.raises(ConfigError, match="train.progress"):
        load_config(None, ["train.progress=maybe"])


# ----------------------------------------------------------------------------- monitors

def test_metric_directions():
    from esmm.config import monitor_direction

    assert monitor_direction("ctr_logloss") == "min"
    assert monitor_direction("ctr_logloss + ctcvr_logloss") == "min"
    for name in ("ctr_auc", "cvr_gauc", "cvr_auc_entire_space", "cvr_auc+ctcvr_auc"):
        assert monitor_direction(name) == "max", name
    for bad, why in (("ctr_pcoc", "PCOC"), ("cvr_auc_entire_space_oracle", "true probabilities"),
                     ("n_clicks", "not a metric"), ("_auc", "not a metric"),
                     ("cvr_auc+cvr_logloss", "opposite directions"), ("+ctr_auc", "empty")):
        with pytest.raises(ValueError, match=why):
            monitor_direction(bad)


@pytest.mark.parametrize("name", model_names())
def test_every_model_monitor_resolves_to_its_own_direction(name):
    from esmm.config import resolve_monitor

    tree = {"features": [{"name": "205", "buckets": 10}], "model": {"name": name}}
    monitor, direction = resolve_monitor(config_from_dict(tree))
    assert direction == ("min" if monitor.endswith("logloss") else "max")
    tree["train"] = {"early_stop": {"mode": direction}}
    assert resolve_monitor(config_from_dict(tree)) == (monitor, direction)
    tree["train"] = {"early_stop": {"mode": "max" if direction == "min" else "min"}}
    with pytest.raises(ConfigError, match=r"^train\.early_stop\.mode: .*set mode: " + direction):
        resolve_monitor(config_from_dict(tree))


def test_monitor_names_are_checked_against_the_model():
    from esmm.config import resolve_monitor

    tree = {"features": [{"name": "205", "buckets": 10}],
            "train": {"early_stop": {"metric": "ctcvr_gauc"}}}
    assert resolve_monitor(config_from_dict(tree)) == ("ctcvr_gauc", "max")
    tree["data"] = {"user_column": None}
    with pytest.raises(ConfigError, match="data.user_column"):
        resolve_monitor(config_from_dict(tree))
    tree["train"]["early_stop"]["metric"] = "ctr_auc_entire_space"
    with pytest.raises(ConfigError, match="not a metric of model 'esmm'"):
        resolve_monitor(config_from_dict(tree))


# ----------------------------------------------------------------------------- strict values

def test_strict_values_and_yaml_floats(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*boolean"):
        config_from_dict({"train": {"batch_size": True}})
    with pytest.raises(ConfigError, match=r"train\.optimizer\.lr: .*finite"):
        config_from_dict({"train": {"optimizer": {"lr": float("inf")}}})
    with pytest.raises(ConfigError, match=r"model\.batch_norm: "):
        config_from_dict({"model": {"batch_norm": "yes"}})
    cfg = load_config(_write(tmp_path, "train: {optimizer: {lr: 5e-4, eps: 1E-7}}\n"))
    assert cfg.train.optimizer.lr == 5e-4 and cfg.train.optimizer.eps == 1e-7
    assert load_config(None, ["train.seed=0x10"]).train.seed == 16  # YAML's own integers


def test_errors_are_one_line_and_capped():
    tree = {"train": {k: -1 for k in ("batch_size", "epochs", "max_steps", "eval_every",
                                      "eval_batch_size", "shuffle_block", "num_threads")}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree, "here")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("invalid configuration in here: train.")
    assert msg.count("; ") == 5 and msg.endswith("; and 2 more")


def test_check_data_paths(tmp_path):
    from esmm.config import check_data_paths

    cfg = config_from_dict({"data": {"train": str(tmp_path), "eval": str(tmp_path / "x")}})
    check_data_paths(cfg, ["train"])
    with pytest.raises(ConfigError, match=r"^data\.eval: .*x does not exist"):
        check_data_paths(cfg, ["train", "eval"])


def test_dump_config_round_trips(tmp_path):
    from esmm.config import dump_config

    cfg = load_config(None, ["features=aliccp", "train.optimizer.betas=[0.8, 0.9]",
                             "train.early_stop.mode=null"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind


def test_a_run_config_with_an_outdated_monitor_still_loads():
    # Early-stopping rules bind training, not reading: a run trained before them is evaluated,
    # exported and served as before, and training with the same settings is refused.
    from esmm.config import resolve_monitor

    old = {"features": [{"name": "205", "buckets": 10}],
           "train": {"early_stop": {"metric": "n_impressions", "mode": "max"}}}
    cfg = config_from_dict(old)
    with pytest.raises(ConfigError, match=r"^train\.early_stop\.metric: 'n_impressions'"):
        resolve_monitor(cfg)
