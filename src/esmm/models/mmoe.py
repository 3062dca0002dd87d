"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018, doi:10.1145/3219819.3220007).

n expert MLPs f_i over the embeddings x; each task k has its own softmax gate:

    g^k(x) = softmax(W_k x)  (n weights summing to 1);   h_k = sum_i g^k_i(x) f_i(x)
"""

from __future__ import annotations

import torch
from torch import nn

from esmm.config import MMoEConfig, ModelConfig
from esmm.models.backbone import Backbone, register_backbone
from esmm.nn.experts import ExpertGroup, SoftmaxGate, mix

TASKS = ("ctr", "cvr")


class MMoE(Backbone):
    """``forward``: (B, D) -> per task (B, H) mixtures of the experts (H = expert[-1])."""

    def __init__(self, bcfg: MMoEConfig, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__(in_dim)
        self.experts = ExpertGroup(bcfg.experts, in_dim, bcfg.expert, cfg.activation,
                                   cfg.dropout, cfg.batch_norm)
        self.gates = nn.ModuleList(SoftmaxGate(in_dim, bcfg.experts) for _ in TASKS)
        self.out_dims = (self.experts.out_dim, self.experts.out_dim)

    def forward(self, x_ctr: torch.Tensor, x_cvr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.experts(x_ctr)  # (B, n, H)
        return mix(e, self.gates[0](x_ctr)), mix(e, self.gates[1](x_ctr))

    def gate_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"gate_{t}": g(x) for t, g in zip(TASKS, self.gates, strict=True)}


register_backbone("mmoe", "MMoE", "Ma et al., KDD 2018",
                  "shared experts mixed by one softmax gate per task")(MMoE)
