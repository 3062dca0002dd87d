import math

import numpy as np
import pytest
import torch

from esmm.losses import bce_product_of_logits, bce_with_logits, log1mexp


def _ref_product_bce(a, b, y, w=None):
    """float64 reference via mpmath-free exact formulas on small magnitudes and log1p tricks."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    log_p = log_sig(a) + log_sig(b)
    # log(1 - e^x), x <= 0, in float64 with the same two-branch rule computed independently.
    with np.errstate(divide="ignore"):
        log_q = np.where(log_p > -math.log(2), np.log(-np.expm1(log_p)),
                         np.log1p(-np.exp(log_p)))
    per = -(y * log_p + (1 - y) * log_q)
    w = np.ones_like(per) if w is None else np.asarray(w, dtype=np.float64)
    return float((per * w).sum() / w.sum())


def test_log1mexp_matches_float64_everywhere():
    x = torch.tensor([-1e-20, -1e-7, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -50.0, -700.0],
                     dtype=torch.float64)
    got = log1mexp(x).numpy()
    want = np.array([math.log1p(-math.exp(v)) if v < -1e-3 else math.log(-math.expm1(v))
                     for v in x.tolist()])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_log1mexp_gradient_finite_at_branch_edges():
    x = torch.tensor([-1e-30, -math.log(2), -1e-3, -60.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_product_bce_matches_float64_reference(scale):
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(4000, generator=g) * 2 - 1) * scale
    b = (torch.rand(4000, generator=g) * 2 - 1) * scale
    y = (torch.rand(4000, generator=g) < 0.3).float()
    got = bce_product_of_logits([a, b], y).item()
    want = _ref_product_bce(a.double().numpy(), b.double().numpy(), y.numpy())
    assert math.isfinite(got)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("a,b,y", [(50.0, 50.0, 0.0), (50.0, 50.0, 1.0), (-50.0, -50.0, 1.0),
                                   (-50.0, -50.0, 0.0), (50.0, -50.0, 1.0), (-50.0, 50.0, 0.0)])
def test_extreme_logits_finite_and_correct(a, b, y):
    ta = torch.tensor([a], requires_grad=True)
    tb = torch.tensor([b], requires_grad=True)
    loss = bce_product_of_logits([ta, tb], torch.tensor([y]))
    loss.backward()
    want = _ref_product_bce([a], [b], np.array([y]))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-30)
    assert torch.isfinite(ta.grad).all() and torch.isfinite(tb.grad).all()


def test_both_logits_plus_50_label_zero_costs_about_fifty():
    # p = sigmoid(50)^2 ~ 1 - 2e-22: -log(1 - p) = -log(2e-22) ~ 49.3; clamping would give ~16.
    loss = bce_product_of_logits([torch.tensor([50.0]), torch.tensor([50.0])], torch.tensor([0.0]))
    assert loss.item() == pytest.approx(-math.log(2 * math.exp(-50)), rel=1e-4)


def test_sample_weights_honoured():
    a = torch.tensor([0.3, -1.0, 2.0])
    b = torch.tensor([1.0, 0.5, -2.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([2.0, 0.0, 1.0])
    got = bce_product_of_logits([a, b], y, w).item()
    want = _ref_product_bce(a.numpy(), b.numpy(), y.numpy(), w.numpy())
    assert got == pytest.approx(want, rel=1e-6)
    # Weight 2 equals repeating the row.
    rep = bce_product_of_logits([a[[0, 0, 2]], b[[0, 0, 2]]], y[[0, 0, 2]]).item()
    assert got == pytest.approx(rep, rel=1e-6)


def test_bce_with_logits_all_zero_weight_is_zero_not_nan():
    a = torch.tensor([0.5, -0.5], requires_grad=True)
    loss = bce_with_logits(a, torch.tensor([1.0, 0.0]), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(a.grad, torch.zeros(2))


def test_bce_with_logits_matches_formula():
    a = torch.tensor([0.2, -3.0, 40.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    want = np.mean([-math.log(1 / (1 + math.exp(-0.2))), math.log1p(math.exp(-3.0)),
                    40.0 + math.log1p(math.exp(-40.0))])
    assert bce_with_logits(a, y).item() == pytest.approx(want, rel=1e-12)
