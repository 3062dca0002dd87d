"""The attention unit of AITM (Xi et al., KDD 2021, arXiv 2105.08489)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TransferAttention(nn.Module):
    """Fuse the information transferred from the previous task with the current task's own.

    With ``p`` = transfer(q_prev) and ``q`` = the current tower's hidden output, each (B, H):

        u in {p, q};  w_u = softmax_u(<h2(u), h3(u)> / sqrt(H));  z = sum_u w_u * h1(u)

    ``forward(q_prev, q)``: (B, H), (B, H) -> z (B, H) and the weights (B, 2) over (p, q).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.h1 = nn.Linear(dim, dim)
        self.h2 = nn.Linear(dim, dim)
        self.h3 = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, q_prev: torch.Tensor, q: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.stack([self.transfer(q_prev), q], dim=1)  # (B, 2, H)
        score = (self.h2(u) * self.h3(u)).sum(-1) * self.scale  # (B, 2)
        w = torch.softmax(score, dim=1)
        z = (w.unsqueeze(-1) * self.h1(u)).sum(1)  # (B, H)
        return z, w
