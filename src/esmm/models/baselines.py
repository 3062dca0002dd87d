"""The paper's other baselines: AMAN, OVERSAMPLING, UNBIAS and DIVISION (arXiv 1804.07931).

Every method here pairs its conversion model with a CTR net of its own (own embeddings, own
tower, trained on clicks over all impressions), as BASE does, and ranks impressions for CTCVR by
pCTCVR = pCTR * pCVR; only DIVISION, which learns pCTCVR directly, differs.

    AMAN          CVR net over clicked impressions (label: conversion) plus unclicked
                  impressions as negatives, a fraction ``aman.rate`` of them, chosen by a hash
                  of the row position and a per-model salt (the same rows in every epoch).
    OVERSAMPLING  CVR net over clicked impressions; clicked-and-converted rows count
                  ``oversampling.k`` times (exactly the loss of a batch holding k copies of them).
    UNBIAS        CVR net over clicked impressions, each weighted by 1 / max(pCTR,
                  ``unbias.clip``) from the CTR net (no gradient flows through the weight);
                  the weighted mean is self-normalised over the batch.
    DIVISION      a CTR net and a CTCVR net (label click * conversion over all impressions);
                  pCVR = min(pCTCVR / pCTR, ``division.clip``), computed in log space.

Early stopping: the CVR-net methods watch ``cvr_auc`` (the validation AUC of the net that
differs between them); DIVISION watches ``ctcvr_auc``, the task it is trained on.
"""

from __future__ import annotations

import torch

from esmm.config import ModelConfig
from esmm.features import FeatureSpec
from esmm.losses import bce_with_logits
from esmm.models.base import MultiTaskModel, register
from esmm.models.composed import tower
from esmm.models.esmm import ESMM_CITATION, Base, _fixed_architecture
from esmm.models.heads import CtcvrHead, loss_ctr
from esmm.nn.embedding import EmbeddingCollection

# splitmix64 constants as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MUL2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts int64 arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def row_uniform(rows: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per row position, fixed by (row, salt): (B,) float64.

    A splitmix64 hash of ``rows + salt`` (wrapping int64 arithmetic), top 53 bits scaled.
    """
    x = rows.to(torch.int64) + salt + _GOLDEN
    x = (x ^ _srl(x, 30)) * _MUL1
    x = (x ^ _srl(x, 27)) * _MUL2
    x = x ^ _srl(x, 31)
    return _srl(x, 11).to(torch.float64) * (2.0 ** -53)


def _with_weight(w: torch.Tensor, batch) -> torch.Tensor:
    return w if batch.weight is None else w * batch.weight


class Aman(Base):
    """AMAN: unclicked impressions are CVR negatives, a fraction ``rate`` of them sampled.

        loss_ctr = BCE(click, pCTR) over all impressions
        loss_cvr = BCE(click * conversion, pCVR) over clicked rows and sampled unclicked rows

    Whether an unclicked row is sampled depends only on its row position and ``sample_salt``
    (a buffer drawn from torch's generator at construction, so fixed by ``train.seed`` and
    saved with the checkpoint): the same negatives in every epoch, a different set per seed.
    """

    # These CVR nets are fit to a deliberately reweighted or resampled target, so the log loss
    # of the plain clicked validation rows would penalise the intended miscalibration; they are
    # early-stopped on the ranking metric the paper reports instead.
    monitor = "cvr_auc"

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        super().__init__(spec, cfg, sparse=sparse)
        self.rate = cfg.aman.rate
        self.register_buffer("sample_salt", torch.randint(0, 1 << 62, (), dtype=torch.int64))

    def sampled_negatives(self, batch) -> torch.Tensor:
        """(B,) bool: unclicked rows that enter the CVR loss as negatives."""
        unclicked = batch.click == 0
        if self.rate >= 1.0:
            return unclicked
        if batch.rows is None:
            raise ValueError("AMAN samples negatives by row position: the batch has no rows")
        u = row_uniform(batch.rows, self.sample_salt)
        return unclicked & (u < self.rate).to(unclicked.device)

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        keep = (batch.click > 0) | self.sampled_negatives(batch)
        w = _with_weight(keep.to(out["cvr_logit"].dtype), batch)
        return {
            "loss_ctr": loss_ctr(out["ctr_logit"], batch),
            "loss_cvr": bce_with_logits(out["cvr_logit"], batch.click * batch.conversion, w),
        }


class Oversampling(Base):
    """OVERSAMPLING: clicked impressions, each clicked-and-converted one counted ``k`` times.

        loss_cvr = sum_i w_i BCE_i / sum_i w_i,  w_i = click_i * (1 + (k - 1) * conversion_i)

    which is the mean CVR loss over a batch where every positive appears k times.
    """

    monitor = "cvr_auc"

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        super().__init__(spec, cfg, sparse=sparse)
        self.k = cfg.oversampling.k

    def cvr_weight(self, batch) -> torch.Tensor:
        """(B,) copies of each row in the CVR loss (0 for unclicked rows)."""
        w = batch.click * (1.0 + (self.k - 1) * batch.conversion)
        return _with_weight(w, batch)

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        return {
            "loss_ctr": loss_ctr(out["ctr_logit"], batch),
            "loss_cvr": bce_with_logits(out["cvr_logit"], batch.conversion,
                                        self.cvr_weight(batch)),
        }


class Unbias(Base):
    """UNBIAS: clicked impressions reweighted by the inverse click propensity.

        w_i = click_i / max(pCTR_i, clip)   (pCTR from the CTR net, detached)
        loss_cvr = sum_i w_i BCE_i / sum_i w_i

    Weights are finite and at most 1 / clip; the CVR loss gives the CTR net no gradient.
    """

    monitor = "cvr_auc"

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        super().__init__(spec, cfg, sparse=sparse)
        self.clip = cfg.unbias.clip

    def cvr_weight(self, out, batch) -> torch.Tensor:
        """(B,) inverse-propensity weights, 0 for unclicked rows."""
        p_ctr = torch.sigmoid(out["ctr_logit"].detach()).clamp(min=self.clip)
        return _with_weight(batch.click / p_ctr, batch)

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        return {
            "loss_ctr": loss_ctr(out["ctr_logit"], batch),
            "loss_cvr": bce_with_logits(out["cvr_logit"], batch.conversion,
                                        self.cvr_weight(out, batch)),
        }


class Division(MultiTaskModel):
    """DIVISION: independent CTR and CTCVR nets; pCVR = min(pCTCVR / pCTR, clip).

        loss_ctr   = BCE(click, pCTR)                   over all impressions
        loss_ctcvr = BCE(click * conversion, pCTCVR)    over all impressions

    ``p_ctcvr`` is the CTCVR net's own output. ``forward`` also returns ``cvr_logit``, the
    logit of the clipped ratio (finite: a ratio of 1 maps to about 16.1).
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        _fixed_architecture(cfg)
        super().__init__()
        self.ctr_embedding = EmbeddingCollection(spec, sparse=sparse)
        self.ctcvr_embedding = EmbeddingCollection(spec, sparse=sparse)
        d = self.ctr_embedding.output_dim
        self.ctr_tower = tower(cfg, d)
        self.ctcvr_tower = tower(cfg, d)
        self.head = CtcvrHead(cfg.division.clip)
        self.clip = cfg.division.clip

    def log_p_cvr(self, ctr_logit: torch.Tensor, ctcvr_logit: torch.Tensor) -> torch.Tensor:
        """log pCVR = min(log pCTCVR - log pCTR, log clip): (B,), <= 0."""
        return self.head.log_p_cvr(ctr_logit, ctcvr_logit)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return self.head.outputs(self.ctr_tower(self.ctr_embedding(batch)),
                                 self.ctcvr_tower(self.ctcvr_embedding(batch)))

    def predict(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head.predict(out)

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        return self.head.losses(out, batch)


_PAPER = dict(citation=ESMM_CITATION, benchmarks=frozenset({"paper"}))
_CVR_NET = dict(benchmark_monitor="cvr_auc", ctr_from_reference=True)


@register("aman", display="AMAN", rank=1, paper_table2=(65.21, 0.59, 63.53, 0.57),
          summary="BASE plus unclicked impressions as CVR negatives, a fraction "
          "`model.aman.rate` of them", **_PAPER, **_CVR_NET)
def _aman(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Aman(spec, cfg, sparse=sparse)


@register("oversampling", display="OVERSAMPLING", rank=2, clicked_only=True,
          paper_table2=(67.18, 0.32, 63.05, 0.48),
          summary="BASE with each converted click counted `model.oversampling.k` times",
          **_PAPER, **_CVR_NET)
def _oversampling(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Oversampling(spec, cfg, sparse=sparse)


@register("unbias", display="UNBIAS", rank=3, clicked_only=True,
          paper_table2=(66.65, 0.28, 63.56, 0.70),
          summary="BASE with clicked rows weighted by 1 / pCTR (clipped at "
          "`model.unbias.clip`)", **_PAPER, **_CVR_NET)
def _unbias(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Unbias(spec, cfg, sparse=sparse)


@register("division", display="DIVISION", rank=4, paper_table2=(67.56, 0.48, 63.62, 0.09),
          benchmarks=frozenset({"paper", "sweep"}), citation=ESMM_CITATION,
          summary="independent CTR and CTCVR nets; pCVR = pCTCVR / pCTR, clipped at "
          "`model.division.clip`", benchmark_monitor="ctcvr_auc")
def _division(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Division(spec, cfg, sparse=sparse)
