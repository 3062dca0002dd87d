"""ESMM, ESMM-NS and BASE (Ma et al., SIGIR 2018, arXiv 1804.07931)."""

from __future__ import annotations

import torch

from esmm.config import ModelConfig
from esmm.features import FeatureSpec
from esmm.losses import bce_product_of_logits, bce_with_logits
from esmm.models.base import MultiTaskModel, register
from esmm.nn.embedding import EmbeddingCollection
from esmm.nn.mlp import Tower


def _tower(cfg: ModelConfig, in_dim: int) -> Tower:
    return Tower(in_dim, cfg.tower, cfg.activation, cfg.dropout, cfg.batch_norm)


class ESMM(MultiTaskModel):
    """Entire-space multi-task model.

    A CTR tower and a CVR tower over the same embeddings (``shared=True``) or over separate
    embeddings (``shared=False``: ESMM-NS). pCTCVR = pCTR * pCVR; both losses run over all
    impressions and pCVR gets no direct label:

        loss_ctr   = BCE(click, pCTR)
        loss_ctcvr = BCE(click * conversion, pCTR * pCVR)   (in log space)
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True,
                 shared: bool = True) -> None:
        super().__init__()
        self.shared = shared
        self.embedding = EmbeddingCollection(spec, sparse=sparse)
        self.cvr_embedding = None if shared else EmbeddingCollection(spec, sparse=sparse)
        d = self.embedding.output_dim
        self.ctr_tower = _tower(cfg, d)
        self.cvr_tower = _tower(cfg, d)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        x = self.embedding(batch)  # (B, input_dim)
        xc = x if self.cvr_embedding is None else self.cvr_embedding(batch)
        return {"ctr_logit": self.ctr_tower(x), "cvr_logit": self.cvr_tower(xc)}

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        a, b = out["ctr_logit"], out["cvr_logit"]
        ctcvr = batch.click * batch.conversion
        return {
            "loss_ctr": bce_with_logits(a, batch.click, batch.weight),
            "loss_ctcvr": bce_product_of_logits([a, b], ctcvr, batch.weight),
        }


class Base(MultiTaskModel):
    """BASE: a CVR net trained on clicked impressions only, and an independent CTR net.

    The two nets share no parameter, so training them in one loop is the same as training them
    apart on the same batches. pCTCVR = pCTR * pCVR, as in the paper.

        loss_ctr = BCE(click, pCTR) over all impressions
        loss_cvr = BCE(conversion, pCVR) over clicked impressions
    """

    monitor = "ctr_logloss+cvr_logloss"

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        super().__init__()
        self.ctr_embedding = EmbeddingCollection(spec, sparse=sparse)
        self.cvr_embedding = EmbeddingCollection(spec, sparse=sparse)
        d = self.ctr_embedding.output_dim
        self.ctr_tower = _tower(cfg, d)
        self.cvr_tower = _tower(cfg, d)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return {
            "ctr_logit": self.ctr_tower(self.ctr_embedding(batch)),
            "cvr_logit": self.cvr_tower(self.cvr_embedding(batch)),
        }

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        w = batch.click if batch.weight is None else batch.click * batch.weight
        return {
            "loss_ctr": bce_with_logits(out["ctr_logit"], batch.click, batch.weight),
            "loss_cvr": bce_with_logits(out["cvr_logit"], batch.conversion, w),
        }


@register("esmm")
def _esmm(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return ESMM(spec, cfg, sparse=sparse, shared=True)


@register("esmm_ns")
def _esmm_ns(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return ESMM(spec, cfg, sparse=sparse, shared=False)


@register("base")
def _base(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Base(spec, cfg, sparse=sparse)
