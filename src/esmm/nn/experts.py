"""Building blocks of the mixture-of-experts backbones: MLP stacks, expert groups, gates."""

from __future__ import annotations

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
    """``n`` expert MLPs over the same input.

    ``forward``: (B, in_dim) -> (B, n, out_dim), experts stacked on dim 1.
    """

    def __init__(self, n: int, in_dim: int, widths: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            MLP(in_dim, widths, activation, dropout, batch_norm) for _ in range(n))
        self.out_dim = self.experts[0].out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([e(x) for e in self.experts], dim=1)


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
