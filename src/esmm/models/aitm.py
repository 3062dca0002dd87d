"""AITM: Adaptive Information Transfer Multi-task (Xi et al., KDD 2021, arXiv 2105.08489).

Both towers read the shared embeddings. The click tower's last hidden output q_ctr is
transferred to the conversion task through an attention unit (see
:class:`esmm.nn.attention.TransferAttention`), which weighs it against the conversion tower's
own q_cvr; the behavioural-expectation calibrator penalises a conversion probability above
the click probability:

    z_cvr = attention(transfer(q_ctr), q_cvr);   logit_cvr = w . z_cvr
    loss_calibration = alpha * mean(max(p_ctcvr - p_ctr, 0))

The calibrator acts under the ``ctcvr`` head (AITM's own setup: click and purchase towers over
all impressions). Under ``entire_space`` and ``independent``, pCTCVR = pCTR * pCVR <= pCTR holds
by construction, so the term would be zero: it is left out there.
"""

from __future__ import annotations

import torch

from esmm.config import AITMConfig, ModelConfig
from esmm.models.backbone import Backbone, register_backbone
from esmm.nn.attention import TransferAttention


class AITM(Backbone):
    """``forward``: the identity on (B, D); ``transfer``: (B, T), (B, T) -> (B, T), (B, T)."""

    transfers = True

    def __init__(self, bcfg: AITMConfig, cfg: ModelConfig, in_dim: int) -> None:
        super().__init__(in_dim)
        self.attention = TransferAttention(cfg.tower[-1])
        self.alpha = bcfg.calibrator

    def transfer(self, t_ctr: torch.Tensor, t_cvr: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return t_ctr, self.attention(t_ctr, t_cvr)[0]

    def extra_loss_names(self, head) -> tuple[str, ...]:
        return () if head.ctcvr_below_ctr or self.alpha == 0.0 else ("loss_calibration",)

    def extra_losses(self, probs: dict[str, torch.Tensor], head) -> dict[str, torch.Tensor]:
        if not self.extra_loss_names(head):
            return {}
        gap = torch.relu(probs["p_ctcvr"] - probs["p_ctr"])  # (B,)
        return {"loss_calibration": self.alpha * gap.mean()}


register_backbone("aitm", "AITM", "Xi et al., KDD 2021",
                  "attention transfer from the click tower plus a calibrator")(AITM)
