"""DBMTL: Deep Bayesian Multi-Target Learning (Alibaba; as EasyRec and TorchEasyRec build it).

The targets form a Bayesian chain, p(click, conversion | x) = p(click | x) p(conversion |
click, x): the conversion tower's last hidden output is joined with the CTR tower's through a
relation MLP before its logit layer, over an optional shared bottom MLP:

    h = bottom(x);   t_ctr = T_ctr(h);   t_cvr = T_cvr(h)
    logit_ctr = w_ctr . t_ctr;   logit_cvr = w_cvr . relation([t_cvr || t_ctr])
"""

from __future__ import annotations

import torch

from esmm.config import DBMTLConfig, ModelConfig
from esmm.models.backbone import Backbone, register_backbone
from esmm.nn.experts import MLP


class DBMTL(Backbone):
    """``forward``: (B, D) -> the bottom's (B, H) for both towers; ``transfer``: towers'
    (B, T) hidden outputs -> (B, T) CTR unchanged, (B, T) conversion conditioned on CTR."""

    transfers = True

    def __init__(self, bcfg: DBMTLConfig, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__(in_dim)
        act = (cfg.activation, cfg.dropout, cfg.batch_norm)
        self.bottom = MLP(in_dim, bcfg.bottom, *act)
        self.out_dims = (self.bottom.out_dim, self.bottom.out_dim)
        t = cfg.tower[-1]
        # Ends at the tower's width so the conversion tower's logit layer keeps its shape.
        self.relation = MLP(2 * t, [*bcfg.relation, t], *act)

    def forward(self, x_ctr: torch.Tensor, x_cvr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.bottom(x_ctr)
        return h, h

    def transfer(self, t_ctr: torch.Tensor, t_cvr: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return t_ctr, self.relation(torch.cat([t_cvr, t_ctr], dim=-1))


register_backbone("dbmtl", "DBMTL", "Alibaba EasyRec / TorchEasyRec DBMTL",
                  "conversion tower conditioned on the CTR tower (Bayesian chain)")(DBMTL)
