import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esmm.errors import EsmmError
from esmm.losses import bce_product_of_logits, bce_with_logits, check_gradients, log1mexp


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


# ---------------------------------------------------------------------------------------------
# Any finite logits: finite loss and gradient, equal to an independent float64 reference


def _ref_product_bce_and_grad(a: float, b: float, y: float) -> tuple[float, float, float]:
    """Loss and d/da, d/db of BCE(y, s(a) s(b)) in float64, from the subset expansion
    1 - s(a) s(b) = (e^-a + e^-b + e^-(a+b)) / ((1 + e^-a)(1 + e^-b)): finite everywhere."""
    def log_sig(x):
        return -np.logaddexp(0.0, -x)

    log_q = (np.logaddexp.reduce([-a, -b, -a - b]) + log_sig(a) + log_sig(b))
    if y == 1.0:
        return -(log_sig(a) + log_sig(b)), -math.exp(log_sig(-a)), -math.exp(log_sig(-b))
    # d/da [-log(1 - p)] = s(a) s(-a) s(b) / (1 - p), in log space.
    ga = math.exp(log_sig(a) + log_sig(-a) + log_sig(b) - log_q)
    gb = math.exp(log_sig(b) + log_sig(-b) + log_sig(a) - log_q)
    return -log_q, ga, gb


def _loss_and_grads(a: float, b: float, y: float, dtype=torch.float32):
    ta = torch.tensor([a], dtype=dtype, requires_grad=True)
    tb = torch.tensor([b], dtype=dtype, requires_grad=True)
    loss = bce_product_of_logits([ta, tb], torch.tensor([y], dtype=dtype))
    loss.backward()
    return loss.item(), ta.grad.item(), tb.grad.item()


@pytest.mark.parametrize("a,b", [(120.0, 120.0), (104.0, 110.0), (1e4, 1e4), (-1e4, -1e4),
                                 (1e4, -1e4), (-1e4, 1e4), (1e4, 0.0), (0.0, -1e4)])
@pytest.mark.parametrize("y", [0.0, 1.0])
def test_huge_logits_finite_loss_and_gradient(a, b, y):
    """Both logits past ~104 used to give loss 0 (label 1) or inf (label 0) with NaN
    gradients: log p rounded to 0 and log(1 - p) = log(0)."""
    loss, ga, gb = _loss_and_grads(a, b, y)
    want, wa, wb = _ref_product_bce_and_grad(a, b, y)
    assert math.isfinite(loss) and math.isfinite(ga) and math.isfinite(gb)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ga == pytest.approx(wa, rel=1e-4, abs=1e-6)
    assert gb == pytest.approx(wb, rel=1e-4, abs=1e-6)


def test_label_zero_both_logits_120_costs_what_it_should():
    # 1 - s(120)^2 ~ 2 e^-120: the loss is 120 - log 2, not inf, and pushes both logits down.
    loss, ga, gb = _loss_and_grads(120.0, 120.0, 0.0)
    assert loss == pytest.approx(120.0 - math.log(2.0), rel=1e-6)
    assert ga == pytest.approx(0.5, rel=1e-5) and gb == pytest.approx(0.5, rel=1e-5)


_logit = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(a=_logit, b=_logit, y=st.sampled_from([0.0, 1.0]))
def test_property_loss_and_gradient_finite_and_exact(a, b, y):
    loss, ga, gb = _loss_and_grads(a, b, y)
    assert math.isfinite(loss) and math.isfinite(ga) and math.isfinite(gb)
    want, wa, wb = _ref_product_bce_and_grad(a, b, y)
    assert loss == pytest.approx(want, rel=1e-4, abs=1e-5)
    # The gradient of each BCE term lies in [-1, 1]; float32 rounding is absolute near 0.
    assert ga == pytest.approx(wa, rel=1e-3, abs=1e-5)
    assert gb == pytest.approx(wb, rel=1e-3, abs=1e-5)


def test_three_factor_product_matches_float64():
    g = torch.Generator().manual_seed(3)
    logits = [((torch.rand(500, generator=g) * 2 - 1) * 30).double() for _ in range(3)]
    y = (torch.rand(500, generator=g) < 0.5).double()
    got = bce_product_of_logits(logits, y).item()
    p = np.prod([1 / (1 + np.exp(-x.numpy())) for x in logits], axis=0)
    want = float(-(y.numpy() * np.log(p) + (1 - y.numpy()) * np.log1p(-p)).mean())
    assert got == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Non-finite gradients are named


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.good = torch.nn.Linear(2, 1)
        self.table = torch.nn.Embedding(5, 2, sparse=True)


def test_check_gradients_names_the_parameter():
    m = _Two()
    x = m.table(torch.tensor([1, 2]))  # (2, 2)
    # A finite value whose gradient is 0 * inf = NaN, on the embedding only.
    loss = m.good(x.detach()).sum() + torch.sqrt(x.sum() * 0.0)
    assert math.isfinite(loss.item())
    loss.backward()
    with pytest.raises(EsmmError, match=r"step 7.*table\.weight") as e:
        check_gradients(m, 7)
    assert "good" not in str(e.value)


def test_check_gradients_passes_finite_and_missing_gradients():
    m = _Two()
    check_gradients(m, 1)  # no gradient yet
    m.good(m.table(torch.tensor([0, 4]))).sum().backward()
    check_gradients(m, 2)
    # Finite entries whose sum overflows float32 are not an error; an inf entry is.
    m.good.weight.grad = torch.full_like(m.good.weight, 3e38)
    check_gradients(m, 3)
    m.good.bias.grad = torch.tensor([float("inf")])
    with pytest.raises(EsmmError, match=r"step 4 in parameter\(s\) good\.bias \("):
        check_gradients(m, 4)


def test_training_stops_at_a_non_finite_gradient_naming_it(flat_data, cfg_factory, tmp_path,
                                                            monkeypatch):
    from esmm.models.esmm import ESMM
    from esmm.train import train

    real = ESMM.losses

    def nan_gradient_losses(self, out, batch):
        losses = dict(real(self, out, batch))
        # Value +0, gradient NaN into the CTR tower only.
        losses["loss_ctr"] = losses["loss_ctr"] + torch.sqrt(out["ctr_logit"].sum() * 0.0)
        return losses

    monkeypatch.setattr(ESMM, "losses", nan_gradient_losses)
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=20)
    with pytest.raises(EsmmError, match=r"non-finite gradient at step 1 .*ctr_tower") as e:
        train(cfg, tmp_path / "run")
    assert "cvr_tower" not in str(e.value) and "lr" not in str(e.value)
