"""The fused expert group equals n separate expert MLPs; gates are distributions."""

import pytest
import torch

from esmm.nn.attention import TransferAttention
from esmm.nn.experts import ExpertGroup, SoftmaxGate, mix


@pytest.mark.parametrize("batch_norm", [False, True])
def test_expert_group_equals_separate_experts(batch_norm):
    torch.manual_seed(0)
    group = ExpertGroup(3, 10, [8, 6, 4], batch_norm=batch_norm).train()
    x = torch.randn(32, 10)
    out = group(x)
    assert out.shape == (32, 3, 4)
    for e in range(3):  # each expert on its own, from the same weights
        h = x
        for w, b in zip(group.weights, group.biases, strict=True):
            h = h @ w[e] + b[e]
            if batch_norm:  # training-mode BatchNorm, per expert and unit
                h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
            h = torch.relu(h)
        torch.testing.assert_close(out[:, e], h, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for w in group.weights:  # every expert's every layer gets a gradient
        assert bool((w.grad.flatten(1).abs().sum(1) > 0).all())


def test_expert_group_initialises_like_linear():
    torch.manual_seed(1)
    group = ExpertGroup(4, 100, [50])
    bound = 1 / 100 ** 0.5
    assert float(group.weights[0].abs().max()) <= bound
    assert float(group.weights[0].abs().max()) > 0.9 * bound


def test_gate_and_mix():
    torch.manual_seed(2)
    g = SoftmaxGate(6, 3)(torch.randn(5, 6))
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    experts = torch.randn(5, 3, 4)
    torch.testing.assert_close(mix(experts, g), (g.unsqueeze(-1) * experts).sum(1))


def test_transfer_attention_weights_are_a_distribution_over_two_sources():
    torch.manual_seed(3)
    att = TransferAttention(8)
    q_prev, q = torch.randn(7, 8), torch.randn(7, 8)
    z, w = att(q_prev, q)
    assert z.shape == (7, 8) and w.shape == (7, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(7))
    u = torch.stack([att.transfer(q_prev), q], 1)
    torch.testing.assert_close(z, (w.unsqueeze(-1) * att.h1(u)).sum(1))
