"""Expert groups: the batched computation equals each expert on its own, and MMoE / PLE
checkpoints written when every expert was its own MLP still load and predict the same."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from esmm.checkpoint import load_model
from esmm.data.tables import load_split
from esmm.errors import EsmmError
from esmm.evaluate import predict_arrays
from esmm.nn.experts import ExpertGroup, mix

PER_EXPERT = Path(__file__).parent.parent / "files" / "zoo-per-expert"  # written by make.py


def _expert_mlps(group: ExpertGroup) -> list[nn.Sequential]:
    """Each expert of ``group`` as its own Linear [BatchNorm] ReLU stack, same weights."""
    mlps = []
    for e in range(group.n):
        layers: list[nn.Module] = []
        for w, b, norm in zip(group.weights, group.biases, group.norms, strict=True):
            lin = nn.Linear(w.shape[1], w.shape[2]).to(w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[e].t())
                lin.bias.copy_(b[e])
            layers.append(lin)
            if isinstance(norm, nn.BatchNorm1d):
                h = w.shape[2]
                bn = nn.BatchNorm1d(h).to(w.dtype)
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name).copy_(getattr(norm, name)[e * h:(e + 1) * h])
                    bn.num_batches_tracked.copy_(norm.num_batches_tracked)
                layers.append(bn)
            layers.append(nn.ReLU())
        mlps.append(nn.Sequential(*layers))
    return mlps


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_batched_experts_equal_each_expert_alone(batch_norm, train):
    torch.manual_seed(0)
    # float64, so that the only difference left is the order of summation
    group = ExpertGroup(4, 12, [16, 8, 5], batch_norm=batch_norm).double()
    if batch_norm:  # running statistics that are not the identity
        group.train()(torch.randn(64, 12, dtype=torch.float64) * 3 + 1)
    group.train(train)
    mlps = [m.train(train) for m in _expert_mlps(group)]
    x = torch.randn(48, 12, dtype=torch.float64, requires_grad=True)
    out = group(x)  # (B, n, H)
    assert out.shape == (48, 4, 5)
    ref = torch.stack([m(x) for m in mlps], dim=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    (grad_batched,) = torch.autograd.grad(out, x, g)
    (grad_alone,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_batched, grad_alone, rtol=0, atol=1e-6)


def test_a_group_loads_the_state_of_separate_expert_mlps():
    torch.manual_seed(1)
    group = ExpertGroup(3, 10, [7, 4], batch_norm=True).double()
    group.train()(torch.randn(32, 10, dtype=torch.float64))
    mlps = _expert_mlps(group)
    old = {f"experts.{e}.net.{k}": v for e, m in enumerate(mlps)
           for k, v in m.state_dict().items()}
    fresh = ExpertGroup(3, 10, [7, 4], batch_norm=True).double()
    fresh.load_state_dict(old)
    for k, v in group.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["mmoe", "ple"])
def test_checkpoints_with_one_mlp_per_expert_load_and_predict_the_same(backbone, caplog):
    with caplog.at_level(logging.WARNING, logger="esmm.checkpoint"):
        model, cfg, spec, ck = load_model(PER_EXPERT / f"{backbone}.pt")
    assert any(".experts.0.net.0.weight" in k for k in ck["model"])  # the old layout
    assert not any(".net." in k for k in model.backbone.state_dict())
    preds = predict_arrays(model, load_split(PER_EXPERT / "train.parquet", spec, cfg.data))
    expected = json.loads((PER_EXPERT / "expected.json").read_text())[backbone]
    assert len(expected["p_ctr"]) == len(preds["p_ctr"]) == 400
    for name, want in expected.items():
        np.testing.assert_allclose(preds[name], np.asarray(want), rtol=0, atol=1e-6)


def test_an_old_checkpoint_of_another_expert_count_is_refused_in_one_line(tmp_path):
    ck = torch.load(PER_EXPERT / "mmoe.pt", weights_only=True)
    ck["config"]["model"]["backbone"]["experts"] = 2  # the file has 3
    ck.pop("weights_sha256", None)
    torch.save(ck, tmp_path / "mmoe.pt")
    with pytest.raises(EsmmError, match=r"weight 'backbone\.[^']*' has shape \(3, "):
        load_model(tmp_path / "mmoe.pt")


def test_mixing_groups_of_experts_equals_mixing_them_concatenated():
    torch.manual_seed(4)
    own, shared = torch.randn(9, 2, 5), torch.randn(9, 3, 5)
    w = torch.softmax(torch.randn(9, 5), -1)
    both = torch.cat([own, shared], 1)
    torch.testing.assert_close(mix([own, shared], w), mix(both, w))
    torch.testing.assert_close(mix(both, w), torch.einsum("bn,bnh->bh", w, both))
