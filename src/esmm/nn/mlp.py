"""MLP towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Tower(nn.Module):
    """Hidden layers then one logit.

    Args:
        in_dim: input width; hidden: widths of the hidden layers (e.g. [360, 200, 80]);
        activation: relu | gelu | tanh; dropout: after each hidden layer; batch_norm: before
        each activation.

    ``forward``: (B, in_dim) -> (B,) logits.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            # In place: neither BatchNorm nor Linear needs its output for its backward, so
            # ReLU can overwrite it and save a (B, h) buffer and a pass over it per layer.
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else _ACT[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    @property
    def hidden_dim(self) -> int:
        """Width of the last hidden layer (the input of the logit layer)."""
        return self.net[-1].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B, 1) -> (B,)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, hidden_dim): every layer but the logit layer."""
        for layer in self.net[:-1]:
            x = layer(x)
        return x

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """(B, hidden_dim) -> (B,): the logit layer alone; ``logit(hidden(x)) == forward(x)``."""
        return self.net[-1](h).squeeze(-1)
