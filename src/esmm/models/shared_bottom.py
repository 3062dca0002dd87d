"""Shared-Bottom (Caruana, "Multitask Learning", Machine Learning 28, 1997).

One MLP over the embeddings feeds both task towers (hard parameter sharing):

    h = f(x);   logit_k = t_k(h)
"""

from __future__ import annotations

import torch

from esmm.config import ModelConfig, SharedBottomConfig
from esmm.models.backbone import Backbone, register_backbone
from esmm.nn.experts import MLP


class SharedBottom(Backbone):
    """``forward``: (B, D), (B, D) -> (B, H), (B, H), the same h for both tasks."""

    def __init__(self, bcfg: SharedBottomConfig, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__(in_dim)
        self.bottom = MLP(in_dim, bcfg.bottom, cfg.activation, cfg.dropout, cfg.batch_norm)
        self.out_dims = (self.bottom.out_dim, self.bottom.out_dim)

    def forward(self, x_ctr: torch.Tensor, x_cvr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bottom(x_ctr)
        return h, h


register_backbone("shared_bottom", "Shared-Bottom",
                  "Caruana, Multitask Learning, Machine Learning 1997",
                  "one MLP over the embeddings shared by both towers")(SharedBottom)
