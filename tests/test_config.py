import pytest

from esmm.config import apply_overrides, config_from_dict, load_config
from esmm.errors import ConfigError


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
