"""AMAN, OVERSAMPLING, UNBIAS and DIVISION: each trains and obeys its definition."""

import math

import numpy as np
import pytest
import torch

from esmm.config import config_from_dict
from esmm.data.batches import make_batch
from esmm.data.simulate import get_preset, write_simulation
from esmm.data.tables import load_split
from esmm.errors import ConfigError
from esmm.features import spec_from_config
from esmm.losses import bce_with_logits
from esmm.models import OUTPUT_NAMES, build_model
from esmm.models.baselines import row_uniform
from esmm.train import load_model, train
from tests.conftest import TINY_FEATURES as FEATURES
from tests.conftest import tiny_world

TINY_WORLD = tiny_world(ctr=0.1, cvr=0.2)
ALL_METHODS = ["base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    write_simulation(d, get_preset("dense", **TINY_WORLD), {"train": 3000, "valid": 1000}, 11)
    return d


def _cfg(sim, name, **model):
    return config_from_dict({
        "data": {"train": str(sim / "train"), "eval": str(sim / "valid")},
        "features": FEATURES,
        "model": {"name": name, "tower": [16], "embedding_dim": 4, **model},
        "train": {"batch_size": 256, "epochs": 1, "max_steps": 6, "eval_every": 3,
                  "seed": 1, "progress": "off", "optimizer": {"name": "adam", "lr": 0.01}},
    })


@pytest.fixture(scope="module")
def data(sim):
    cfg = _cfg(sim, "base")
    return load_split(sim / "train", spec_from_config(cfg), cfg.data)


def _model(sim, name, **model):
    cfg = _cfg(sim, name, **model)
    torch.manual_seed(0)
    return build_model(cfg, spec_from_config(cfg))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_trains_and_predicts(sim, tmp_path, name):
    res = train(_cfg(sim, name), tmp_path / name)
    assert res.best_step is not None and res.step == 6
    for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "cvr_auc_entire_space"):
        assert 0.0 <= res.metrics[k] <= 1.0, k
    model, *_ = load_model(tmp_path / name)
    batch = make_batch(load_split(sim / "valid", spec_from_config(_cfg(sim, name)),
                                  _cfg(sim, name).data), np.arange(300))
    p = model.predict(model(batch))
    assert set(p) == set(OUTPUT_NAMES)
    for k in OUTPUT_NAMES:
        assert p[k].shape == (300,) and bool(((p[k] >= 0) & (p[k] <= 1)).all()), k
    losses = model.losses(model(batch), batch)
    assert losses and all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items())
    if name != "division":  # every method but DIVISION ranks CTCVR by pCTR * pCVR
        torch.testing.assert_close(p["p_ctcvr"], p["p_ctr"] * p["p_cvr"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,monitor,mode", [
    ("aman", "cvr_auc", "max"), ("oversampling", "cvr_auc", "max"),
    ("unbias", "cvr_auc", "max"), ("division", "ctr_logloss+ctcvr_logloss", "min"),
    ("base", "ctr_logloss+cvr_logloss", "min"), ("esmm", "ctr_logloss+ctcvr_logloss", "min"),
])
def test_monitors_and_their_direction(sim, name, monitor, mode):
    # The direction follows the metric: an AUC monitor must never be minimised.
    m = _model(sim, name)
    assert (m.monitor, m.monitor_mode) == (monitor, mode)


def test_auc_monitor_keeps_the_highest_auc_checkpoint(sim, tmp_path):
    res = train(_cfg(sim, "aman"), tmp_path / "run")
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    aucs = [float(r["monitor"]) for r in rows if r.get("monitor")]
    assert res.best_metric == pytest.approx(max(aucs))


# --------------------------------------------------------------------------- AMAN


def test_row_uniform_is_uniform_and_fixed_by_row_and_salt():
    rows = torch.arange(200_000)
    u = row_uniform(rows, 12345)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0) / len(u)
    assert float((hist - 0.1).abs().max()) < 0.005
    torch.testing.assert_close(row_uniform(rows.flip(0), 12345), u.flip(0), rtol=0, atol=0)
    assert float((row_uniform(rows, 999) == u).float().mean()) < 0.001


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_aman_samples_unclicked_rows_at_the_rate(sim, rate):
    model = _model(sim, "aman", aman_rate=rate)
    n = 100_000
    batch = type("B", (), {})()
    batch.rows = torch.arange(n)
    batch.click = (torch.arange(n) % 10 == 0).float()  # 10% clicked
    sampled = model.sampled_negatives(batch)
    unclicked = batch.click == 0
    assert not bool(sampled[~unclicked].any())  # clicked rows are never "negatives"
    frac = float(sampled[unclicked].float().mean())
    sd = math.sqrt(rate * (1 - rate) / int(unclicked.sum()))
    assert abs(frac - rate) < 5 * sd
    # Deterministic: the same rows give the same sample, whatever their order in the batch.
    perm = torch.randperm(n)
    batch2 = type("B", (), {})()
    batch2.rows, batch2.click = batch.rows[perm], batch.click[perm]
    assert torch.equal(model.sampled_negatives(batch2), sampled[perm])


def test_aman_loss_and_salt(sim, data, tmp_path):
    model = _model(sim, "aman", aman_rate=0.3)
    batch = make_batch(data, np.arange(1024))
    out = model(batch)
    keep = (batch.click > 0) | model.sampled_negatives(batch)
    assert 0 < int(keep.sum()) < batch.size
    want = bce_with_logits(out["cvr_logit"][keep], (batch.click * batch.conversion)[keep])
    got = model.losses(out, batch)["loss_cvr"]
    torch.testing.assert_close(got, want)
    # rate 1: every unclicked row is a negative
    full = _model(sim, "aman", aman_rate=1.0)
    assert torch.equal(full.sampled_negatives(batch), batch.click == 0)
    # the salt is fixed by train.seed and restored from the checkpoint
    cfg = _cfg(sim, "aman", aman_rate=0.3)  # train.seed = 1
    res = train(cfg, tmp_path / "a")
    loaded, *_ = load_model(res.run_dir)
    torch.manual_seed(1)
    same_seed = build_model(cfg, spec_from_config(cfg))
    torch.manual_seed(2)
    other_seed = build_model(cfg, spec_from_config(cfg))
    assert int(loaded.sample_salt) == int(same_seed.sample_salt)
    assert int(other_seed.sample_salt) != int(same_seed.sample_salt)


# --------------------------------------------------------------------------- OVERSAMPLING


@pytest.mark.parametrize("k", [1, 3])
def test_oversampling_equals_a_duplicated_batch(sim, data, k):
    model = _model(sim, "oversampling", oversample_k=k)
    rows = np.arange(1024)
    batch = make_batch(data, rows)
    pos = (batch.click * batch.conversion).bool().numpy()
    assert pos.sum() > 0
    dup_rows = np.concatenate([rows, np.repeat(rows[pos], k - 1)])
    dup = make_batch(data, dup_rows)
    got = model.losses(model(batch), batch)["loss_cvr"]
    out_d = model(dup)
    clicked = dup.click.bool()
    want = bce_with_logits(out_d["cvr_logit"][clicked], dup.conversion[clicked])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- UNBIAS


def test_unbias_weights_are_finite_clipped_inverse_propensities(sim, data):
    clip = 0.05
    model = _model(sim, "unbias", unbias_clip=clip)
    batch = make_batch(data, np.arange(1024))
    out = model(batch)
    # Push some CTR logits far out: propensities near 0 and near 1.
    a = out["ctr_logit"].detach().clone()
    a[:100] = -80.0
    a[100:200] = 80.0
    out = {**out, "ctr_logit": a}
    w = model.cvr_weight(out, batch)
    assert bool(torch.isfinite(w).all())
    clicked = batch.click > 0
    assert bool((w[~clicked] == 0).all())
    assert float(w.max()) <= 1 / clip + 1e-4 and bool((w[clicked] >= 1.0 - 1e-6).all())
    p = torch.sigmoid(a)
    inside = clicked & (p > clip)
    torch.testing.assert_close(w[inside], 1 / p[inside])
    torch.testing.assert_close(w[clicked & (p <= clip)],
                               torch.full_like(w[clicked & (p <= clip)], 1 / clip))
    # The weight carries no gradient into the CTR net.
    out = model(batch)
    model.losses(out, batch)["loss_cvr"].backward()
    assert all(p.grad is None for p in model.ctr_tower.parameters())


# --------------------------------------------------------------------------- DIVISION


def test_division_pcvr_is_a_clipped_ratio(sim, data):
    model = _model(sim, "division")
    a = torch.tensor([-2.0, 0.0, 3.0, -50.0, 40.0, -3.0, 5.0])
    c = torch.tensor([-4.0, 1.0, -1.0, -60.0, -40.0, -3.0, -90.0])  # some pCTCVR > pCTR
    out = {"ctr_logit": a, "ctcvr_logit": c}
    p = model.predict(out)
    ratio = torch.sigmoid(c).double() / torch.sigmoid(a).double()
    torch.testing.assert_close(p["p_cvr"].double(), ratio.clamp(max=1.0), rtol=1e-4, atol=1e-12)
    assert bool(((p["p_cvr"] >= 0) & (p["p_cvr"] <= 1)).all())
    assert float(p["p_cvr"][1]) == 1.0 and float(p["p_cvr"][5]) == pytest.approx(1.0)
    torch.testing.assert_close(p["p_ctcvr"], torch.sigmoid(c))
    clipped = _model(sim, "division", division_clip=0.5).predict(out)["p_cvr"]
    assert float(clipped.max()) <= 0.5
    # forward: a finite cvr_logit whose sigmoid is pCVR
    batch = make_batch(data, np.arange(512))
    fo = model(batch)
    assert bool(torch.isfinite(fo["cvr_logit"]).all())
    pp = model.predict(fo)
    assert bool(((pp["p_cvr"] >= 0) & (pp["p_cvr"] <= 1)).all())
    torch.testing.assert_close(torch.sigmoid(fo["cvr_logit"]), pp["p_cvr"], rtol=1e-4,
                               atol=1e-6)
    losses = model.losses(fo, batch)
    assert set(losses) == {"loss_ctr", "loss_ctcvr"}
    want = bce_with_logits(fo["ctcvr_logit"], batch.click * batch.conversion)
    torch.testing.assert_close(losses["loss_ctcvr"], want)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [("aman_rate", 0.0), ("aman_rate", 1.5),
                                       ("oversample_k", 0), ("unbias_clip", 0.0),
                                       ("division_clip", 1.2)])
def test_bad_method_options_are_config_errors(sim, key, value):
    with pytest.raises(ConfigError, match=key):
        _cfg(sim, "base", **{key: value})
