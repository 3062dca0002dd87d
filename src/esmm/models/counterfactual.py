"""Counterfactual CVR estimators: ESCM2-IPS, ESCM2-DR, DCMT, Multi-IPW and Multi-DR.

ESCM2 (H. Wang, T.-W. Chang, T. Liu, J. Huang, Z. Chen, C. Yu, R. Li, W. Chu, "ESCM2: Entire
Space Counterfactual Multi-Task Model for Post-Click Conversion Rate Estimation", SIGIR 2022,
arXiv 2204.05125) is ESMM plus a counterfactual risk regulariser on the CVR tower:

    L = loss_ctr + loss_ctcvr + lambda_c * R_cvr
    IPS:  R_cvr = 1/N sum_i o_i e_i / p_i
    DR:   R_cvr = 1/N sum_i [ e^_i + o_i (e_i - e^_i) / p_i ]
          loss_imputation = 1/N sum_i o_i (e_i - e^_i)^2 / p_i

over the N impressions of a batch, where o_i is the click, e_i = BCE(conversion_i, pCVR_i)
the CVR tower's error, p_i = max(pCTR_i, clip) the propensity from the CTR tower (without
gradient), and e^_i = BCE(r~_i, pCVR_i) the error imputed from the imputation tower's
conversion probability r~_i, the doubly robust joint learning of X. Wang et al., ICML 2019,
which ESCM2-DR builds on. The imputed error is what gives unclicked impressions a gradient in
the CVR tower; the imputation tower itself learns only from ``loss_imputation``.

DCMT (F. Zhu, M. Zhong, X. Yang, L. Li, L. Yu, T. Zhang, J. Zhou, C. Chen, F. Wu, G. Liu,
Y. Wang, "DCMT: A Direct Entire-Space Causal Multi-Task Framework for Post-Click Conversion
Estimation", ICDE 2023, arXiv 2302.06141) gives the CVR task twin towers: a factual tower
(pCVR) for clicked impressions and a counterfactual tower (pCVR*) for unclicked ones, whose
counterfactual label is 1 - conversion = 1, tied by a sum-to-one prior:

    loss_cvr      = 1/N sum_i [ o_i BCE(r_i, pCVR_i) / p_i
                                + (1 - o_i) BCE(1 - r_i, pCVR*_i) / q_i ]
    loss_cf_prior = lambda_prior * 1/N sum_i | 1 - (pCVR_i + pCVR*_i) |

with p_i = max(pCTR_i, clip), q_i = max(1 - pCTR_i, clip) (without gradient). pCVR is the
factual tower's; pCTCVR = pCTR * pCVR.

Multi-IPW and Multi-DR (W. Zhang, W. Bao, X.-Y. Liu, K. Yang, Q. Lin, H. Wen, R. Ramezani,
"Large-scale Causal Approaches to Debiasing Post-click Conversion Rate Estimation with
Multi-task Learning", WWW 2020) are the same two risks as the conversion task's loss of a
multi-task model over shared embeddings, with no CTCVR loss:
L = loss_ctr + lambda_c * R_cvr (lambda_c = 1 is the paper's sum).

Every per-row error is a BCE with logits, so losses and gradients are finite for any finite
logits; the weights are bounded by 1 / clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esmm.config import ModelConfig
from esmm.errors import ConfigError
from esmm.features import FeatureSpec
from esmm.losses import weighted_mean
from esmm.models.base import MultiTaskModel, register
from esmm.models.composed import ComposedModel, tower
from esmm.models.heads import EntireSpaceHead, Head, loss_ctr

ESCM2_CITATION = "Wang et al., SIGIR 2022, arXiv 2204.05125"
DCMT_CITATION = "Zhu et al., ICDE 2023, arXiv 2302.06141"


def _drop_unclicked(values: torch.Tensor, click: torch.Tensor) -> torch.Tensor:
    """(B,) ``values`` on clicked rows, exactly 0 elsewhere (not multiplied: no 0 * inf)."""
    return torch.where(click > 0, values, torch.zeros_like(values))


def inverse_propensity(ctr_logit: torch.Tensor, clip: float) -> torch.Tensor:
    """1 / max(pCTR, clip) from (B,) CTR logits, without gradient: (B,), at most 1 / clip.

    The propensity is an estimate the regulariser reweights by, not a quantity it may move:
    with gradient, the IPS term would lower itself by raising pCTR on clicked rows.
    """
    return 1.0 / torch.sigmoid(ctr_logit.detach()).clamp(min=clip)


def cvr_errors(cvr_logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-row BCE(label, sigmoid(cvr_logit)): (B,), finite for finite logits."""
    return F.binary_cross_entropy_with_logits(cvr_logit, label, reduction="none")


class Escm2Head(EntireSpaceHead):
    """ESMM's losses plus the counterfactual CVR risk (``ips`` or ``dr``).

    ``aux`` names the extra logit ``forward`` returns: the imputation tower's (DR only).
    """

    name = "escm2"
    aux = "imputation_logit"

    def __init__(self, estimator: str, lambda_c: float, clip: float,
                 ctcvr: bool = True) -> None:
        if estimator not in ("ips", "dr"):
            raise ValueError(f"estimator must be 'ips' or 'dr', got {estimator!r}")
        self.estimator = estimator
        self.lambda_c = lambda_c
        self.clip = clip
        # Without ESMM's CTCVR loss (Multi-IPW, Multi-DR) the CVR risk is the conversion
        # task's only loss, so the model is watched on it.
        self.ctcvr = ctcvr
        first = ("loss_ctr", "loss_ctcvr") if ctcvr else ("loss_ctr",)
        self.loss_names = ((*first, "loss_cvr_ips") if estimator == "ips"
                           else (*first, "loss_cvr_dr", "loss_imputation"))
        if not ctcvr:
            self.monitor = "ctr_logloss+cvr_logloss"
            self.benchmark_monitor = "cvr_auc"

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        losses = (super().losses(out, batch) if self.ctcvr
                  else {"loss_ctr": loss_ctr(out["ctr_logit"], batch)})
        cvr_logit, click = out["cvr_logit"], batch.click
        inv_p = inverse_propensity(out["ctr_logit"], self.clip)  # (B,)
        e = cvr_errors(cvr_logit, batch.conversion)  # (B,)
        if self.estimator == "ips":
            risk = weighted_mean(_drop_unclicked(e * inv_p, click), batch.weight)
            return {**losses, "loss_cvr_ips": self.lambda_c * risk}
        # The imputed label is a target here: the imputation tower learns from its own loss.
        r_imputed = torch.sigmoid(out[self.aux].detach())  # (B,)
        e_hat = cvr_errors(cvr_logit, r_imputed)  # (B,): gradient into the CVR tower
        risk = weighted_mean(e_hat + _drop_unclicked((e - e_hat) * inv_p, click), batch.weight)
        # Imputation error: the CVR tower is fixed here, only r~ moves.
        e_hat_imp = cvr_errors(cvr_logit.detach(), torch.sigmoid(out[self.aux]))
        gap = _drop_unclicked((e.detach() - e_hat_imp) ** 2 * inv_p, click)
        return {**losses, "loss_cvr_dr": self.lambda_c * risk,
                "loss_imputation": weighted_mean(gap, batch.weight)}


class DcmtHead(Head):
    """DCMT: CTR over all impressions; factual and counterfactual CVR towers with the
    sum-to-one prior. ``aux`` names the counterfactual tower's logit."""

    name = "dcmt"
    aux = "cf_cvr_logit"
    loss_names = ("loss_ctr", "loss_cvr", "loss_cf_prior")
    monitor = "ctr_logloss+cvr_logloss"
    benchmark_monitor = "cvr_auc"

    def __init__(self, lambda_prior: float, clip: float) -> None:
        self.lambda_prior = lambda_prior
        self.clip = clip

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        ctr_logit, cvr_logit, cf_logit = out["ctr_logit"], out["cvr_logit"], out[self.aux]
        click = batch.click
        inv_p = inverse_propensity(ctr_logit, self.clip)  # (B,)
        inv_q = 1.0 / torch.sigmoid(-ctr_logit.detach()).clamp(min=self.clip)  # 1 / (1 - pCTR)
        factual = _drop_unclicked(cvr_errors(cvr_logit, batch.conversion) * inv_p, click)
        cf = cvr_errors(cf_logit, 1.0 - batch.conversion) * inv_q
        counterfactual = torch.where(click > 0, torch.zeros_like(cf), cf)
        gap = (1.0 - (torch.sigmoid(cvr_logit) + torch.sigmoid(cf_logit))).abs()
        return {
            "loss_ctr": loss_ctr(ctr_logit, batch),
            "loss_cvr": weighted_mean(factual + counterfactual, batch.weight),
            "loss_cf_prior": self.lambda_prior * weighted_mean(gap, batch.weight),
        }


class CounterfactualModel(ComposedModel):
    """ESMM's embeddings, backbone and towers plus one auxiliary tower beside the CVR tower
    (ESCM2-DR's imputation tower, DCMT's counterfactual CVR tower), reading the conversion
    side's representation. ``forward``: batch -> ``ctr_logit``, ``cvr_logit`` and the head's
    ``aux`` logit, each (B,)."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool, head: Head,
                 aux_tower: bool) -> None:
        if cfg.head is not None:
            raise ConfigError(f"model.head: model {cfg.name!r} has its own losses (see "
                              f"docs/models.md); got head {cfg.head.name!r}, expected none "
                              "(leave model.head unset)")
        super().__init__(spec, cfg, sparse, head, backbone_cfg=cfg.backbone)
        self.aux_tower = tower(cfg, self.backbone.out_dims[1]) if aux_tower else None

    def forward(self, batch) -> dict[str, torch.Tensor]:
        h_ctr, h_cvr = self.backbone(*self.embed(batch))
        if self.backbone.transfers:
            t_ctr, t_cvr = self.backbone.transfer(self.ctr_tower.hidden(h_ctr),
                                                  self.cvr_tower.hidden(h_cvr))
            out = self.head.outputs(self.ctr_tower.logit(t_ctr), self.cvr_tower.logit(t_cvr))
        else:
            out = self.head.outputs(self.ctr_tower(h_ctr), self.cvr_tower(h_cvr))
        if self.aux_tower is not None:
            out[self.head.aux] = self.aux_tower(h_cvr)
        return out


_FACTS = dict(backbone="none", benchmarks=frozenset({"counterfactual"}))


@register("escm2_ips", display="ESCM2-IPS", rank=7, head="escm2", citation=ESCM2_CITATION,
          summary="ESMM plus the counterfactual CVR risk: clicked rows' CVR loss weighted by "
          "1 / pCTR (clipped at `model.escm2.clip`), weight `model.escm2.lambda_c`",
          benchmark_monitor="ctcvr_auc", **_FACTS)
def _escm2_ips(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    head = Escm2Head("ips", cfg.escm2.lambda_c, cfg.escm2.clip)
    return CounterfactualModel(spec, cfg, sparse, head, aux_tower=False)


@register("escm2_dr", display="ESCM2-DR", rank=8, head="escm2", citation=ESCM2_CITATION,
          summary="ESMM plus the doubly robust CVR risk over all impressions, with an "
          "imputation tower trained on clicked rows", benchmark_monitor="ctcvr_auc", **_FACTS)
def _escm2_dr(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    head = Escm2Head("dr", cfg.escm2.lambda_c, cfg.escm2.clip)
    return CounterfactualModel(spec, cfg, sparse, head, aux_tower=True)


@register("dcmt", display="DCMT", rank=9, head="dcmt", citation=DCMT_CITATION,
          summary="factual and counterfactual CVR towers, inverse-propensity weighted over "
          "clicked and unclicked rows, with the sum-to-one prior (`model.dcmt.lambda_prior`)",
          benchmark_monitor="cvr_auc", **_FACTS)
def _dcmt(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    head = DcmtHead(cfg.dcmt.lambda_prior, cfg.dcmt.clip)
    return CounterfactualModel(spec, cfg, sparse, head, aux_tower=True)


# Multi-IPW and Multi-DR: the same risks as the CVR task's only loss beside the CTR task.
MULTI_CITATION = "Zhang et al., WWW 2020 (Multi-IPW, Multi-DR)"


@register("multi_ipw", display="Multi-IPW", rank=9.1, head="escm2", citation=MULTI_CITATION,
          summary="CTR and CVR towers over shared embeddings; the CVR loss is the clicked "
          "rows' loss weighted by 1 / pCTR over all impressions (no CTCVR loss)",
          benchmark_monitor="cvr_auc", clicked_only=True, backbone="none")
def _multi_ipw(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    head = Escm2Head("ips", cfg.escm2.lambda_c, cfg.escm2.clip, ctcvr=False)
    return CounterfactualModel(spec, cfg, sparse, head, aux_tower=False)


@register("multi_dr", display="Multi-DR", rank=9.2, head="escm2", citation=MULTI_CITATION,
          summary="Multi-IPW with the doubly robust CVR loss and an imputation tower",
          benchmark_monitor="cvr_auc", backbone="none")
def _multi_dr(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    head = Escm2Head("dr", cfg.escm2.lambda_c, cfg.escm2.clip, ctcvr=False)
    return CounterfactualModel(spec, cfg, sparse, head, aux_tower=True)
