"""ESCM2-IPS, ESCM2-DR and DCMT: their losses equal the papers' formulas and they learn."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from esmm.config import config_from_dict
from esmm.data.batches import make_batch
from esmm.data.simulate import get_preset, write_simulation
from esmm.data.tables import load_split
from esmm.errors import ConfigError
from esmm.features import spec_from_config
from esmm.models import OUTPUT_NAMES, build_model, get_entry
from esmm.models.counterfactual import DcmtHead, Escm2Head
from esmm.train import load_model, train
from tests.conftest import TINY_FEATURES as FEATURES
from tests.conftest import tiny_world

TINY_WORLD = tiny_world(ctr=0.1, cvr=0.2)
METHODS = ["escm2_ips", "escm2_dr", "dcmt", "multi_ipw", "multi_dr"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    write_simulation(d, get_preset("dense", **TINY_WORLD), {"train": 4000, "valid": 2000}, 5)
    return d


def _cfg(sim, name, steps=6, **model):
    return config_from_dict({
        "data": {"train": str(sim / "train"), "eval": str(sim / "valid")},
        "features": FEATURES,
        "model": {"name": name, "tower": [16], "embedding_dim": 4, **model},
        "train": {"batch_size": 256, "epochs": 3, "max_steps": steps, "eval_every": steps,
                  "seed": 1, "progress": "off", "optimizer": {"name": "adam", "lr": 0.01}},
    })


# A tiny batch: clicked converted, clicked unconverted, unclicked (x2), with logits chosen so
# that every term of every loss is non-trivial.
CLICK = [1.0, 1.0, 0.0, 0.0]
CONV = [1.0, 0.0, 0.0, 0.0]
CTR_LOGIT = [0.3, -2.5, 1.2, -4.0]
CVR_LOGIT = [-0.7, 0.4, 2.0, -1.1]
AUX_LOGIT = [0.9, -0.3, -1.5, 0.6]


def _batch(dtype=torch.float64, weight=None):
    return SimpleNamespace(click=torch.tensor(CLICK, dtype=dtype),
                           conversion=torch.tensor(CONV, dtype=dtype), weight=weight)


def _out(dtype=torch.float64, aux="imputation_logit", scale=1.0, grad=False):
    def t(v):
        return torch.tensor([x * scale for x in v], dtype=dtype, requires_grad=grad)
    return {"ctr_logit": t(CTR_LOGIT), "cvr_logit": t(CVR_LOGIT), aux: t(AUX_LOGIT)}


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _bce(y, p):
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _reference_escm2(estimator, lam, clip):
    o, r = np.array(CLICK), np.array(CONV)
    p_ctr, p_cvr, r_imp = _sig(CTR_LOGIT), _sig(CVR_LOGIT), _sig(AUX_LOGIT)
    prop = np.maximum(p_ctr, clip)
    ref = {"loss_ctr": _bce(o, p_ctr).mean(), "loss_ctcvr": _bce(o * r, p_ctr * p_cvr).mean()}
    e = _bce(r, p_cvr)
    if estimator == "ips":
        ref["loss_cvr_ips"] = lam * (o * e / prop).mean()
    else:
        e_hat = _bce(r_imp, p_cvr)
        ref["loss_cvr_dr"] = lam * (e_hat + o * (e - e_hat) / prop).mean()
        ref["loss_imputation"] = (o * (e - e_hat) ** 2 / prop).mean()
    return ref


@pytest.mark.parametrize("ctcvr", [True, False])  # ESCM2, Multi-IPW / Multi-DR
@pytest.mark.parametrize("estimator", ["ips", "dr"])
def test_escm2_losses_equal_the_papers_formula_in_float64(estimator, ctcvr):
    # clip 0.2 binds on row 2 (pCTR 0.076), so the clipping is part of what is checked.
    head = Escm2Head(estimator, lambda_c=0.7, clip=0.2, ctcvr=ctcvr)
    got = head.losses(_out(), _batch())
    ref = _reference_escm2(estimator, 0.7, 0.2)
    if not ctcvr:
        del ref["loss_ctcvr"]
    assert tuple(got) == head.loss_names
    for k, v in ref.items():
        assert got[k].dtype == torch.float64
        np.testing.assert_allclose(got[k].item(), v, rtol=1e-12, err_msg=k)


def test_dcmt_losses_equal_the_papers_formula_in_float64():
    head = DcmtHead(lambda_prior=0.3, clip=0.1)
    got = head.losses(_out(aux="cf_cvr_logit"), _batch())
    o, r = np.array(CLICK), np.array(CONV)
    p_ctr, p_cvr, p_cf = _sig(CTR_LOGIT), _sig(CVR_LOGIT), _sig(AUX_LOGIT)
    p, q = np.maximum(p_ctr, 0.1), np.maximum(1 - p_ctr, 0.1)
    cvr = (o * _bce(r, p_cvr) / p + (1 - o) * _bce(1 - r, p_cf) / q).mean()
    ref = {"loss_ctr": _bce(o, p_ctr).mean(), "loss_cvr": cvr,
           "loss_cf_prior": 0.3 * np.abs(1 - (p_cvr + p_cf)).mean()}
    assert tuple(got) == head.loss_names
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].item(), v, rtol=1e-12, err_msg=k)


def test_sample_weights_weigh_rows_of_every_term():
    w = torch.tensor([2.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    head = Escm2Head("dr", lambda_c=1.0, clip=0.05)
    got = head.losses(_out(), _batch(weight=w))
    # Doubling a row's weight equals seeing the row twice.
    rows = [0, 0, 1, 2, 3]
    dup = SimpleNamespace(click=torch.tensor([CLICK[i] for i in rows], dtype=torch.float64),
                          conversion=torch.tensor([CONV[i] for i in rows], dtype=torch.float64),
                          weight=torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0], dtype=torch.float64))
    out = {k: v[rows] for k, v in _out().items()}
    ref = head.losses(out, dup)
    for k in head.loss_names:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("make_head,aux", [
    (lambda: Escm2Head("ips", 1.0, 0.05), "imputation_logit"),
    (lambda: Escm2Head("dr", 1.0, 0.05), "imputation_logit"),
    (lambda: DcmtHead(1.0, 0.05), "cf_cvr_logit"),
])
@pytest.mark.parametrize("scale", [1e4, -1e4, 1e2])
def test_losses_and_gradients_finite_at_extreme_logits(make_head, aux, scale):
    head = make_head()
    out = _out(dtype=torch.float32, aux=aux, scale=scale, grad=True)
    losses = head.losses(out, _batch(torch.float32))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    for k, v in out.items():
        if v.grad is not None:
            assert bool(torch.isfinite(v.grad).all()), (k, v.grad)


def test_propensity_carries_no_gradient_and_imputation_learns_only_from_its_loss():
    head = Escm2Head("dr", 1.0, 0.05)
    out = _out(grad=True)
    losses = head.losses(out, _batch())
    losses["loss_cvr_dr"].backward(retain_graph=True)
    assert out["imputation_logit"].grad is None or not out["imputation_logit"].grad.any()
    # The CTR tower's gradient comes from its own losses only: none from the CVR risk.
    assert out["ctr_logit"].grad is None or not out["ctr_logit"].grad.any()
    # The imputed error gives unclicked rows a gradient in the CVR tower.
    assert bool((out["cvr_logit"].grad[2:] != 0).all())
    out["cvr_logit"].grad = None
    losses["loss_imputation"].backward()
    assert out["cvr_logit"].grad is None or not out["cvr_logit"].grad.any()
    assert bool((out["imputation_logit"].grad[:2] != 0).all())


@pytest.mark.parametrize("name", METHODS)
def test_outputs_named_with_shapes_and_registry_facts(sim, name):
    cfg = _cfg(sim, name)
    torch.manual_seed(0)
    model = build_model(cfg, spec_from_config(cfg))
    batch = make_batch(load_split(sim / "valid", spec_from_config(cfg), cfg.data),
                       np.arange(50))
    out = model(batch)
    p = model.predict(out)
    assert set(p) == set(OUTPUT_NAMES)
    for k in OUTPUT_NAMES:
        assert p[k].shape == (50,), k
    torch.testing.assert_close(p["p_ctcvr"], p["p_ctr"] * p["p_cvr"], rtol=1e-5, atol=1e-7)
    losses = model.losses(out, batch)
    assert tuple(losses) == model.loss_names
    entry = get_entry(name)
    assert entry.citation.startswith(("Wang", "Zhu", "Zhang"))
    assert ("counterfactual" in entry.benchmarks) == name.startswith(("escm2", "dcmt"))


@pytest.mark.parametrize("name", METHODS)
def test_a_head_override_is_refused_naming_the_key(sim, name):
    with pytest.raises(ConfigError, match=r"^model\.head: .*expected none"):
        build_model(_cfg(sim, name, head={"name": "independent"}),
                    spec_from_config(_cfg(sim, name)))


def test_lambda_zero_escm2_ips_is_esmm(sim):
    cfg = _cfg(sim, "escm2_ips", escm2={"lambda_c": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, spec_from_config(cfg))
    batch = make_batch(load_split(sim / "train", spec_from_config(cfg), cfg.data),
                       np.arange(256))
    losses = model.losses(model(batch), batch)
    assert losses["loss_cvr_ips"].item() == 0.0


def test_unknown_method_key_is_refused(sim):
    with pytest.raises(ConfigError, match="escm2"):
        _cfg(sim, "escm2_ips", escm2={"lamda_c": 1.0})


@pytest.mark.parametrize("name", METHODS)
def test_learns_on_simulated_data(sim, tmp_path, name):
    cfg = _cfg(sim, name, steps=45)
    batch = make_batch(load_split(sim / "train", spec_from_config(cfg), cfg.data),
                       np.arange(2048))
    torch.manual_seed(1)
    fresh = build_model(cfg, spec_from_config(cfg)).eval()
    res = train(cfg, tmp_path / name)
    trained, *_ = load_model(tmp_path / name)
    with torch.no_grad():
        before_out, after_out = fresh(batch), trained.eval()(batch)
    # The CVR tower fits the clicked rows' conversions and the CTR tower the clicks (the
    # risks themselves are not compared: their propensity weights move as the CTR tower learns).
    def fit(m, out):
        clicked = batch.click > 0
        cvr = torch.nn.functional.binary_cross_entropy_with_logits(
            out["cvr_logit"][clicked], batch.conversion[clicked])
        return cvr.item(), m.losses(out, batch)["loss_ctr"].item()
    cvr_before, ctr_before = fit(fresh, before_out)
    cvr_after, ctr_after = fit(trained, after_out)
    assert cvr_after < 0.8 * cvr_before and ctr_after < 0.8 * ctr_before, (
        cvr_before, cvr_after, ctr_before, ctr_after)
    assert res.metrics["ctr_logloss"] < 0.4 and res.metrics["ctr_auc"] > 0.53, res.metrics
