"""Towers: the oneDNN products and the folded evaluation path equal the layer-by-layer ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import esmm.nn.mlp as mlp
from esmm.nn.mlp import Tower, linear

needs_onednn = pytest.mark.skipif(mlp._LINEAR is None, reason="torch built without oneDNN")


def _trained_tower(activation: str = "relu", dropout: float = 0.0,
                   batch_norm: bool = True) -> tuple[Tower, torch.Tensor]:
    """A tower after a few steps, so its batch norms hold running statistics far from (0, 1),
    and a (300, 24) input."""
    torch.manual_seed(0)
    tower = Tower(24, [64, 32, 16], activation=activation, dropout=dropout,
                  batch_norm=batch_norm)
    opt = torch.optim.Adam(tower.parameters(), lr=0.01)
    for _ in range(20):
        x = torch.randn(256, 24) * 3 + 1
        loss = F.binary_cross_entropy_with_logits(tower(x), (x[:, 0] > 1).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tower.eval(), torch.randn(300, 24) * 3 + 1


@pytest.mark.parametrize("activation,dropout,batch_norm",
                         [("relu", 0.0, True), ("relu", 0.2, True), ("gelu", 0.0, True),
                          ("relu", 0.0, False), ("tanh", 0.1, False)])
def test_folded_evaluation_equals_the_layer_by_layer_forward(activation, dropout, batch_norm):
    tower, x = _trained_tower(activation, dropout, batch_norm)
    reference = tower(x).detach()  # autograd on: every layer in turn, batch norm unfolded
    manual = x
    for layer in tower.net:
        manual = layer(manual)
    torch.testing.assert_close(reference, manual.squeeze(-1).detach(), rtol=0, atol=0)
    with torch.inference_mode():
        folded = tower(x)
        from_hidden = tower.logit(tower.hidden(x))
        assert tower._folds(x) is not (mlp._LINEAR is None)
    torch.testing.assert_close(folded, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.sigmoid(folded), torch.sigmoid(reference), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(from_hidden, folded, rtol=1e-6, atol=1e-6)


def test_batch_norm_is_folded_into_the_layer_before():
    tower, x = _trained_tower()
    lin, bn = tower.net[0], tower.net[1]
    w, b = mlp._fold_batch_norm(lin.weight, lin.bias, bn)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, w, b), bn(lin(x)), rtol=1e-5, atol=1e-5)


def test_training_mode_keeps_batch_statistics():
    tower, x = _trained_tower()
    tower.train()
    with torch.no_grad():
        assert not tower._folds(x)
        out = tower(x)
    manual = x
    with torch.no_grad():
        for layer in tower.net:
            manual = layer(manual)
    torch.testing.assert_close(out, manual.squeeze(-1))


@needs_onednn
def test_onednn_linear_gradients_equal_f_linear():
    torch.manual_seed(1)
    x = torch.randn(1000, 96, requires_grad=True)
    w = torch.randn(48, 96, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    grad = torch.randn(1000, 48)
    out = linear(x, w, b)
    assert type(out.grad_fn).__name__ == "_OneDnnLinearBackward"
    out.backward(grad)
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    expect_out = F.linear(x, w, b)
    expect_out.backward(grad)
    torch.testing.assert_close(out, expect_out, rtol=1e-5, atol=1e-5)
    for g, t in zip(got, (x, w, b), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_linear_fused_relu_and_no_bias():
    torch.manual_seed(2)
    x, w = torch.randn(64, 10), torch.randn(7, 10)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, None, relu=True), F.relu(F.linear(x, w)),
                                   rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    linear(xg, w, None, relu=True).sum().backward()
    xr = x.clone().requires_grad_()
    F.relu(F.linear(xr, w)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_tracing_records_the_portable_linear_op():
    tower, x = _trained_tower()
    with torch.no_grad():
        traced = torch.jit.trace(tower, x[:4])
    graph = str(traced.inlined_graph)
    assert "aten::linear" in graph and "mkldnn" not in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), tower(x), rtol=1e-5, atol=1e-5)


def test_autocast_and_other_dtypes_use_f_linear():
    x = torch.randn(8, 4, dtype=torch.float64)
    assert not mlp.onednn_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mlp.onednn_applies(torch.randn(8, 4))
        out = linear(torch.randn(8, 4), torch.randn(3, 4), None)
    assert out.dtype == torch.bfloat16


def test_evaluation_predictions_equal_the_training_forward(flat_data, cfg_factory, tmp_path):
    # A trained ESMM with batch norm: esmm evaluate's predictions (inference mode, batch norm
    # folded, oneDNN products) against the model's forward with autograd on, layer by layer.
    from esmm.data.batches import iter_batches
    from esmm.data.tables import load_split
    from esmm.evaluate import predict_arrays
    from esmm.models.base import OUTPUT_NAMES
    from esmm.train import load_model, train

    cfg = cfg_factory(flat_data["train"], overrides={"model.batch_norm": True}, epochs=1)
    train(cfg, tmp_path / "run")
    model, cfg, spec, _ = load_model(tmp_path / "run")
    data = load_split(flat_data["valid"], spec, cfg.data)
    preds = predict_arrays(model, data, batch_size=1024)
    model.eval()
    pos = 0
    for batch in iter_batches(data, 1024):
        with torch.enable_grad():
            probs = model.predict(model(batch))
        for k in OUTPUT_NAMES:
            ref = probs[k].detach().double().numpy()
            np.testing.assert_allclose(preds[k][pos:pos + batch.size], ref, rtol=0, atol=1e-6)
        pos += batch.size
    assert pos == data.n
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
