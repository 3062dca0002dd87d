"""Building blocks of the mixture-of-experts backbones: MLP stacks, expert groups, gates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Hidden layers only (no logit): Linear, [BatchNorm], activation, [Dropout] per width.

    ``forward``: (B, in_dim) -> (B, widths[-1]); with no widths it is the identity.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in widths:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_ACT[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ExpertGroup(nn.Module):
    """``n`` expert MLPs over the same input, computed together.

    Layer l of every expert is one (n, d_in, d_out) weight: the first layer is a single
    (B, in) x (in, n * d) product (every expert reads the same input), later layers one batched
    product over the experts, instead of n small products per layer. Initialised as
    ``nn.Linear`` (uniform in +-1/sqrt(d_in)); BatchNorm and dropout act per expert and unit.

    ``forward``: (B, in_dim) -> (B, n, out_dim), experts stacked on dim 1.
    """

    def __init__(self, n: int, in_dim: int, widths: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        d = in_dim
        for h in widths:
            bound = 1.0 / math.sqrt(d)
            self.weights.append(nn.Parameter(torch.empty(n, d, h).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, h).uniform_(-bound, bound)))
            self.norms.append(nn.BatchNorm1d(n * h) if batch_norm else nn.Identity())
            d = h
        self.act = _ACT[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = x
        for i, (w, bias, norm) in enumerate(zip(self.weights, self.biases, self.norms,
                                                strict=True)):
            if i == 0:  # (B, in) @ (in, n * d): one product for every expert
                w0 = w.permute(1, 0, 2).reshape(w.shape[1], -1)
                h = torch.addmm(bias.reshape(-1), h, w0)  # (B, n * d)
            else:  # (n, B, d_in) @ (n, d_in, d_out)
                h = torch.baddbmm(bias.unsqueeze(1), h.view(b, self.n, -1).transpose(0, 1), w)
                h = h.transpose(0, 1).reshape(b, -1)  # (B, n * d_out)
            h = self.drop(self.act(norm(h)))
        return h.view(b, self.n, -1)


class SoftmaxGate(nn.Module):
    """A linear map of the gate input to ``n`` mixture weights, softmax-normalised.

    ``forward``: (B, in_dim) -> (B, n) weights, each row summing to 1.
    """

    def __init__(self, in_dim: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x), dim=-1)


def mix(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of expert outputs: (B, n, H) and (B, n) -> (B, H)."""
    return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)
