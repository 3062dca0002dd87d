"""Task-loss weighting: fixed weights, uncertainty weighting and Dynamic Weight Average."""

import csv
import math

import pytest
import torch

from esmm.config import config_from_dict
from esmm.errors import ConfigError
from esmm.export import export_run
from esmm.loss_weighting import DynamicWeightAverage, UncertaintyWeighting
from esmm.train import load_model, train
from tests.conftest import small_config

NAMES = ("loss_ctr", "loss_ctcvr")


def _losses(a, b):
    return {"loss_ctr": torch.tensor(float(a)), "loss_ctcvr": torch.tensor(float(b))}


def test_fixed_weights_weigh_the_named_losses(flat_data, cfg_factory):
    from esmm.features import spec_from_config
    from esmm.models import build_model

    cfg = cfg_factory(flat_data["train"], overrides={"train.loss_weights": {"loss_ctcvr": 3.0}})
    model = build_model(cfg, spec_from_config(cfg))
    assert model.total_loss(_losses(0.5, 0.25)).item() == pytest.approx(0.5 + 3 * 0.25)
    assert model.loss_weights() == {"loss_ctr": 1.0, "loss_ctcvr": 3.0}
    bad = cfg_factory(flat_data["train"], overrides={"train.loss_weights": {"loss_cvr": 2.0}})
    with pytest.raises(ConfigError, match=r"train.loss_weights: \['loss_cvr'\].*loss_ctcvr"):
        build_model(bad, spec_from_config(bad))
    with pytest.raises(ConfigError, match=r"train.loss_weights.loss_ctr"):
        cfg_factory(flat_data["train"], overrides={"train.loss_weights": {"loss_ctr": -1}})


def test_uncertainty_weighting_is_kendalls_objective():
    w = UncertaintyWeighting(NAMES, {"loss_ctcvr": 2.0})
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.5, -1.0]))
    total = w(_losses(0.3, 0.1))
    want = (math.exp(-0.5) * 0.3 + 0.25) + 2.0 * (math.exp(1.0) * 0.1 - 0.5)
    assert total.item() == pytest.approx(want, rel=1e-6)
    total.backward()
    # d/ds (exp(-s) L + s/2) = -exp(-s) L + 1/2
    torch.testing.assert_close(w.log_var.grad, torch.tensor(
        [-math.exp(-0.5) * 0.3 + 0.5, 2.0 * (-math.exp(1.0) * 0.1 + 0.5)]))
    assert w.weights() == pytest.approx({"loss_ctr": math.exp(-0.5),
                                         "loss_ctcvr": 2.0 * math.exp(1.0)})


def test_dwa_follows_the_loss_ratios_of_the_last_two_windows():
    w = DynamicWeightAverage(NAMES, window=2, temperature=2.0)
    w.train()
    steps = [(1.0, 1.0), (1.0, 1.0),  # window 1: means (1, 1)
             (0.5, 0.9), (0.5, 0.9)]  # window 2: means (0.5, 0.9)
    used = []
    for a, b in steps:
        used.append(w.weights())
        w(_losses(a, b))
    assert all(u == {"loss_ctr": 1.0, "loss_ctcvr": 1.0} for u in used)  # before two windows
    r = torch.tensor([0.5, 0.9])
    want = 2 * torch.softmax(r / 2.0, 0)
    assert w.weights() == pytest.approx(dict(zip(NAMES, want.tolist(), strict=True)))
    assert w.weights()["loss_ctcvr"] > w.weights()["loss_ctr"]  # slower task weighs more
    total = w(_losses(0.4, 0.8))
    assert total.item() == pytest.approx(float(want[0] * 0.4 + want[1] * 0.8), rel=1e-6)
    # Its state is saved with the model: a fresh module loading it weighs the same.
    again = DynamicWeightAverage(NAMES, window=2, temperature=2.0)
    again.load_state_dict(w.state_dict())
    assert again.weights() == w.weights()
    w.eval()
    before = w.state_dict()["running"].clone()
    w(_losses(9.0, 9.0))  # evaluation does not feed the averages
    torch.testing.assert_close(w.state_dict()["running"], before)


@pytest.mark.parametrize("scheme", ["uncertainty", "dwa"])
def test_training_logs_the_weights_and_checkpoints_their_state(flat_data, tmp_path, scheme):
    tree = small_config(flat_data["train"], flat_data["valid"], max_steps=12, eval_every=4)
    tree["train"]["loss_weighting"] = {"name": scheme, "window": 2}
    res = train(config_from_dict(tree), tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    weights = [(float(r["weight_loss_ctr"]), float(r["weight_loss_ctcvr"])) for r in rows]
    assert len(weights) == 3 and all(math.isfinite(a) and a > 0 for w in weights for a in w)
    assert weights[-1] != (1.0, 1.0)  # learned / adapted away from the start
    model, *_ = load_model(tmp_path / "run", "latest")
    got = model.loss_weights()
    assert (got["loss_ctr"], got["loss_ctcvr"]) == pytest.approx(weights[-1], rel=1e-6)
    assert res.step == 12
    # The weighting's state does not get in the way of export.
    meta = export_run(tmp_path / "run", "onnx", tmp_path / "m.onnx", parity_rows=32)
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
