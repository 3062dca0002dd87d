"""Backbones and heads: shapes, gradients, gates, learning on simulated data, configuration."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from esmm.config import config_from_dict, load_config
from esmm.data.batches import make_batch
from esmm.data.simulate import get_preset, write_simulation
from esmm.data.tables import load_split
from esmm.errors import ConfigError
from esmm.evaluate import predict_arrays
from esmm.features import spec_from_config
from esmm.models import OUTPUT_NAMES, build_model
from esmm.models.heads import EntireSpaceHead, IndependentHead
from esmm.train import load_model, train
from tests.conftest import TINY_FEATURES as FEATURES
from tests.conftest import small_config, tiny_world

BACKBONES = ["shared_bottom", "mmoe", "ple", "dbmtl", "aitm"]
HEADS = ["independent", "entire_space", "ctcvr"]
TINY_WORLD = tiny_world(ctr=0.15, cvr=0.3)
SMALL = {"shared_bottom": {"bottom": [24]}, "mmoe": {"experts": 3, "expert": [24]},
         "ple": {"levels": 2, "task_experts": 2, "shared_experts": 1, "expert": [24, 16]},
         "dbmtl": {"bottom": [24], "relation": [12]}, "aitm": {}}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    write_simulation(d, get_preset("dense", **TINY_WORLD), {"train": 20000, "valid": 3000}, 3)
    return d


def _cfg(sim, backbone, head, **train_kw):
    return config_from_dict({
        "data": {"train": str(sim / "train"), "eval": str(sim / "valid")},
        "features": FEATURES,
        "model": {"name": "esmm", "tower": [16, 8], "embedding_dim": 6,
                  "backbone": {"name": backbone, **SMALL[backbone]}, "head": {"name": head}},
        "train": {"batch_size": 250, "epochs": 3, "seed": 2, "progress": "off",
                  "optimizer": {"name": "adam", "lr": 0.01},
                  "sparse_optimizer": {"name": "dense"}, **train_kw},
    })


@pytest.fixture(scope="module")
def data(sim):
    cfg = _cfg(sim, "mmoe", "independent")
    return load_split(sim / "train", spec_from_config(cfg), cfg.data)


def _model(sim, backbone, head):
    cfg = _cfg(sim, backbone, head)
    torch.manual_seed(0)
    return build_model(cfg, spec_from_config(cfg))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_gradients_reach_every_parameter(sim, data, backbone, head):
    model = _model(sim, backbone, head)
    batch = make_batch(data, np.arange(400))
    out = model(batch)
    assert all(v.shape == (400,) for v in out.values())
    p = model.predict(out)
    assert set(p) == set(OUTPUT_NAMES)
    assert all(bool(((v >= 0) & (v <= 1)).all()) for v in p.values())
    losses = model.losses(out, batch)
    assert all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items())
    sum(losses.values()).backward()
    # Every expert, gate, bottom, relation and attention weight gets a gradient.
    dead = [n for n, w in model.backbone.named_parameters()
            if w.grad is None or float(w.grad.abs().sum()) == 0.0]
    assert not dead, dead


@pytest.mark.parametrize("backbone", ["mmoe", "ple"])
def test_gates_are_distributions(sim, data, backbone):
    model = _model(sim, backbone, "entire_space")
    gates = model.gate_weights(make_batch(data, np.arange(300)))
    want = {"mmoe": {"gate_ctr", "gate_cvr"},
            "ple": {"level0_gate_ctr", "level0_gate_cvr", "level0_gate_shared",
                    "level1_gate_ctr", "level1_gate_cvr"}}[backbone]
    assert set(gates) == want  # the last PLE level has no shared gate
    for g in gates.values():
        assert g.shape[0] == 300 and bool((g >= 0).all())
        torch.testing.assert_close(g.sum(-1), torch.ones(300), rtol=0, atol=1e-6)
    if backbone == "ple":  # task gates mix own + shared experts; the shared gate all of them
        assert gates["level0_gate_ctr"].shape[1] == 3 and gates["level0_gate_shared"].shape[1] == 5


@pytest.mark.parametrize("backbone,head", [("mmoe", "independent"), ("ple", "entire_space"),
                                           ("dbmtl", "entire_space"), ("aitm", "ctcvr"),
                                           ("shared_bottom", "independent")])
def test_learns_on_simulated_data(flat_data, tmp_path, backbone, head):
    tree = small_config(flat_data["train"], flat_data["valid"], epochs=2)
    tree["model"].update(backbone={"name": backbone, **SMALL[backbone]}, head={"name": head})
    train(config_from_dict(tree), tmp_path / "run")
    model, cfg, spec, _ = load_model(tmp_path / "run")
    valid = load_split(flat_data["valid"], spec, cfg.data)
    p = predict_arrays(model, valid)
    click, conv = np.asarray(valid.click), np.asarray(valid.conversion)
    clicked = click > 0
    assert roc_auc_score(click, p["p_ctr"]) > _chance(click)
    assert roc_auc_score(click * conv, p["p_ctcvr"]) > _chance(click * conv)
    # Among the ~700 clicked validation rows the conversion signal is weaker (plain ESMM
    # reaches about 0.58 here), so the bar is two standard deviations.
    assert roc_auc_score(conv[clicked], p["p_cvr"][clicked]) > _chance(conv[clicked], sds=2)


def _chance(y, sds=3):
    """0.5 plus ``sds`` standard deviations of the AUC of a random score on labels ``y``."""
    n1 = int(y.sum())
    n0 = len(y) - n1
    return 0.5 + sds * np.sqrt((n0 + n1 + 1) / (12 * n0 * n1))


def test_aitm_calibrator_acts_under_ctcvr_and_is_left_out_where_it_holds(sim, data):
    batch = make_batch(data, np.arange(500))
    direct = _model(sim, "aitm", "ctcvr")
    with torch.no_grad():  # push pCTCVR above pCTR: the calibrator must see it
        direct.cvr_tower.net[-1].bias += 5.0
    out = direct(batch)
    p = direct.predict(out)
    gap = torch.relu(p["p_ctcvr"] - p["p_ctr"]).mean()
    assert float(gap) > 0
    torch.testing.assert_close(direct.losses(out, batch)["loss_calibration"], 0.6 * gap)
    for head in ("entire_space", "independent"):
        m = _model(sim, "aitm", head)
        with torch.no_grad():
            m.cvr_tower.net[-1].bias += 5.0
        out = m(batch)
        p = m.predict(out)
        assert bool((p["p_ctcvr"] <= p["p_ctr"] + 1e-7).all())  # holds by construction
        assert "loss_calibration" not in m.losses(out, batch)


def test_dbmtl_conversion_logit_depends_on_the_ctr_tower(sim, data):
    model = _model(sim, "dbmtl", "entire_space")
    batch = make_batch(data, np.arange(200))
    before = model(batch)["cvr_logit"].detach().clone()
    with torch.no_grad():
        model.ctr_tower.net[0].weight.mul_(2.0)
    assert not torch.allclose(model(batch)["cvr_logit"], before)
    out = model(batch)
    out["cvr_logit"].sum().backward()
    assert float(model.ctr_tower.net[0].weight.grad.abs().sum()) > 0


def test_heads_losses_follow_their_definition(sim, data):
    batch = make_batch(data, np.arange(600))
    model = _model(sim, "mmoe", "independent")
    out = model(batch)
    assert set(model.losses(out, batch)) == {"loss_ctr", "loss_cvr"}
    assert isinstance(model.head, IndependentHead) and model.monitor == "ctr_logloss+cvr_logloss"
    esmm = _model(sim, "mmoe", "entire_space")
    assert isinstance(esmm.head, EntireSpaceHead)
    out = esmm(batch)
    p = esmm.predict(out)
    y = (batch.click * batch.conversion).double().numpy()
    q = p["p_ctcvr"].detach().double().numpy()
    want = -np.mean(y * np.log(q) + (1 - y) * np.log1p(-q))
    assert float(esmm.losses(out, batch)["loss_ctcvr"]) == pytest.approx(want, rel=1e-4)


def test_set_puts_any_backbone_under_any_head(tmp_path):
    cfg = load_config(None, ["model.backbone.name=mmoe", "model.head.name=entire_space",
                             "model.backbone.experts=2"])
    assert cfg.model.name == "esmm" and cfg.model.backbone.experts == 2
    with pytest.raises(ConfigError, match=r"model\.backbone\.mmoe\.levels: unknown key"):
        load_config(None, ["model.backbone.name=mmoe", "model.backbone.levels=2"])
    with pytest.raises(ConfigError, match=r"model\.backbone\.ple\.expert"):
        load_config(None, ["model.backbone.name=ple", "model.backbone.expert=[0]"])
    with pytest.raises(ConfigError, match=r"model\.head\.name"):
        load_config(None, ["model.head.name=joint"])


@pytest.mark.parametrize("name,key,value", [("esmm_ns", "backbone", "mmoe"),
                                            ("base", "backbone", "ple"),
                                            ("aman", "head", "entire_space"),
                                            ("division", "head", "independent")])
def test_fixed_architectures_refuse_a_backbone_or_head(sim, name, key, value):
    cfg = config_from_dict({"features": FEATURES,
                            "model": {"name": name, key: {"name": value}}})
    with pytest.raises(ConfigError, match=rf"model\.{key}"):
        build_model(cfg, spec_from_config(cfg))


def test_cli_trains_esmm_over_mmoe_with_set(flat_data, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from esmm.cli import app
    from tests.conftest import cli_output

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_config(flat_data["train"], flat_data["valid"],
                                               max_steps=4)))
    res = CliRunner().invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run"),
                                   "--set", "model.backbone.name=mmoe",
                                   "--set", "model.backbone.experts=2",
                                   "--set", "model.head.name=entire_space"])
    assert res.exit_code == 0, cli_output(res)
    model, cfg, *_ = load_model(tmp_path / "run")
    assert type(model.backbone).__name__ == "MMoE" and len(model.backbone.gates) == 2
    assert isinstance(model.head, EntireSpaceHead)
    res = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--out",
                                   str(tmp_path / "bad"), "--set", "model.backbone.name=mmoe",
                                   "--set", "model.backbone.expert=[]"])
    assert res.exit_code == 2 and "model.backbone.mmoe.expert" in cli_output(res)
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0 and "| `esmm_mmoe` | ESMM-MMoE | mmoe | entire_space |" in res.output


# Parameter names are checkpoint keys: the paper's models keep the names they were saved with.
SAVED_KEYS = {
    "esmm": {"embedding", "ctr_tower", "cvr_tower"},
    "esmm_ns": {"embedding", "cvr_embedding", "ctr_tower", "cvr_tower"},
    "base": {"ctr_embedding", "cvr_embedding", "ctr_tower", "cvr_tower"},
    "aman": {"ctr_embedding", "cvr_embedding", "ctr_tower", "cvr_tower", "sample_salt"},
    "division": {"ctr_embedding", "ctcvr_embedding", "ctr_tower", "ctcvr_tower"},
}


@pytest.mark.parametrize("name", sorted(SAVED_KEYS))
def test_paper_models_keep_their_checkpoint_keys(name):
    cfg = config_from_dict({"features": FEATURES, "model": {"name": name, "tower": [4]}})
    keys = build_model(cfg, spec_from_config(cfg)).state_dict()
    assert {k.split(".")[0] for k in keys} == SAVED_KEYS[name]
    assert "ctr_tower.net.0.weight" in keys and "ctr_tower.net.2.bias" in keys


@pytest.mark.parametrize("flat,section,key,value", [
    ("aman_rate", "aman", "rate", 0.3), ("oversample_k", "oversampling", "k", 3),
    ("unbias_clip", "unbias", "clip", 0.05), ("division_clip", "division", "clip", 0.5)])
def test_method_knobs_live_under_their_method_and_flat_keys_still_read(flat, section, key,
                                                                        value):
    nested = load_config(None, [f"model.{section}.{key}={value}"])
    assert getattr(getattr(nested.model, section), key) == value
    old = load_config(None, [f"model.{flat}={value}"])  # configs and checkpoints before
    assert getattr(getattr(old.model, section), key) == value
    assert getattr(config_from_dict(old.to_dict()).model, section) == getattr(old.model,
                                                                               section)
    with pytest.raises(ConfigError, match=rf"{flat}={value} and {section}\.{key}=.* disagree"):
        load_config(None, [f"model.{flat}={value}", f"model.{section}.{key}=1"])
    with pytest.raises(ConfigError, match=rf"model\.{section}\.{key}"):
        load_config(None, [f"model.{section}.{key}=0"])
    with pytest.raises(ConfigError, match=rf"model\.{section}\.typo: unknown key"):
        load_config(None, [f"model.{section}.typo=1"])


def test_nested_knob_reaches_the_model(sim):
    cfg = config_from_dict({"features": FEATURES,
                            "model": {"name": "oversampling", "oversampling": {"k": 7}}})
    assert build_model(cfg, spec_from_config(cfg)).k == 7
    cfg = config_from_dict({"features": FEATURES,
                            "model": {"name": "division", "division": {"clip": 0.25}}})
    assert build_model(cfg, spec_from_config(cfg)).head.clip == 0.25
