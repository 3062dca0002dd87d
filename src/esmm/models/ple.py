"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020, doi:10.1145/3383313.3412236).

Each level is a CGC layer: task k has m_k experts E_k of its own, all tasks share m_s experts
E_s. Task k's gate mixes [E_k || E_s] from the task's own input; on every level but the last a
shared gate mixes all experts from the shared input, which feeds the next level's shared
experts (progressive extraction). The towers read the last level's task outputs:

    h_k^l = sum_j softmax(W_k^l h_k^{l-1})_j [E_k^l || E_s^l](h_k^{l-1}, h_s^{l-1})_j
    h_s^l = sum_j softmax(W_s^l h_s^{l-1})_j [E_1^l || E_2^l || E_s^l](...)_j   (inner levels)
"""

from __future__ import annotations

import torch
from torch import nn

from esmm.config import ModelConfig, PLEConfig
from esmm.models.backbone import Backbone, register_backbone
from esmm.nn.experts import ExpertGroup, SoftmaxGate, mix

TASKS = ("ctr", "cvr")


class CGCLevel(nn.Module):
    """One extraction level. ``forward``: per-task inputs and the shared input, each (B, D)
    -> per-task outputs, the shared output (None on the last level), each (B, H), and the
    gate weights by name."""

    def __init__(self, bcfg: PLEConfig, cfg: ModelConfig, in_dim: int, last: bool) -> None:
        super().__init__()
        act = (cfg.activation, cfg.dropout, cfg.batch_norm)
        m_k, m_s = bcfg.task_experts, bcfg.shared_experts
        self.task_experts = nn.ModuleList(
            ExpertGroup(m_k, in_dim, bcfg.expert, *act) for _ in TASKS)
        self.shared_experts = ExpertGroup(m_s, in_dim, bcfg.expert, *act)
        self.task_gates = nn.ModuleList(SoftmaxGate(in_dim, m_k + m_s) for _ in TASKS)
        self.shared_gate = None if last else SoftmaxGate(in_dim, len(TASKS) * m_k + m_s)
        self.out_dim = self.shared_experts.out_dim

    def forward(self, xs: list[torch.Tensor], x_shared: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor]]:
        shared = self.shared_experts(x_shared)  # (B, m_s, H)
        own = [g(x) for g, x in zip(self.task_experts, xs, strict=True)]  # (B, m_k, H) each
        gates: dict[str, torch.Tensor] = {}
        outs = []
        for t, e, gate, x in zip(TASKS, own, self.task_gates, xs, strict=True):
            gates[f"gate_{t}"] = gate(x)
            outs.append(mix([e, shared], gates[f"gate_{t}"]))
        out_shared = None
        if self.shared_gate is not None:
            gates["gate_shared"] = self.shared_gate(x_shared)
            out_shared = mix([*own, shared], gates["gate_shared"])
        return outs, out_shared, gates


class PLE(Backbone):
    """``forward``: (B, D) -> per task (B, H), H = expert[-1], after ``levels`` CGC layers."""

    def __init__(self, bcfg: PLEConfig, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__(in_dim)
        levels = []
        d = in_dim
        for i in range(bcfg.levels):
            levels.append(CGCLevel(bcfg, cfg, d, last=i == bcfg.levels - 1))
            d = levels[-1].out_dim
        self.levels = nn.ModuleList(levels)
        self.out_dims = (d, d)

    def extract(self, x: torch.Tensor
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Per-task outputs of the last level and every gate's weights (``level{i}_gate_*``)."""
        xs, shared = [x, x], x
        gates: dict[str, torch.Tensor] = {}
        for i, level in enumerate(self.levels):
            xs, out_shared, g = level(xs, shared)
            gates.update({f"level{i}_{k}": v for k, v in g.items()})
            if out_shared is not None:
                shared = out_shared
        return xs, gates

    def forward(self, x_ctr: torch.Tensor, x_cvr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, _ = self.extract(x_ctr)
        return xs[0], xs[1]

    def gate_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.extract(x)[1]


register_backbone("ple", "PLE", "Tang et al., RecSys 2020",
                  "task-specific and shared experts, stacked CGC levels")(PLE)
