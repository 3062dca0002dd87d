"""ESMM, ESMM-NS and BASE (Ma et al., SIGIR 2018, arXiv 1804.07931)."""

from __future__ import annotations

from esmm.config import ModelConfig
from esmm.features import FeatureSpec
from esmm.models.base import MultiTaskModel, register
from esmm.models.composed import ComposedModel, tower
from esmm.models.heads import make_head

ESMM_CITATION = "Ma et al., SIGIR 2018, arXiv 1804.07931"
# Ali-CCP, Table 2 of arXiv 1804.07931: AUC (%) mean and std over 10 runs:
# (CVR AUC on clicked impressions, its std, CTCVR AUC on all impressions, its std).
_TABLE2_ESMM = (68.56, 0.37, 65.32, 0.49)
_TABLE2_ESMM_NS = (68.25, 0.44, 64.44, 0.62)
_TABLE2_BASE = (66.00, 0.37, 62.07, 0.45)

__all__ = ["ESMM", "Base", "tower"]
_tower = tower  # the name the baselines module imported before the composed model existed


class ESMM(ComposedModel):
    """Entire-space multi-task model.

    A CTR tower and a CVR tower over the same embeddings (``shared=True``) or over separate
    embeddings (``shared=False``: ESMM-NS). pCTCVR = pCTR * pCVR; both losses run over all
    impressions and pCVR gets no direct label:

        loss_ctr   = BCE(click, pCTR)
        loss_ctcvr = BCE(click * conversion, pCTR * pCVR)   (in log space)

    ``model.backbone`` and ``model.head`` change the backbone (e.g. ESMM over MMoE) and the
    head (e.g. ``independent``: a plain multi-task model over shared embeddings).
    """

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True,
                 shared: bool = True, head: str = "entire_space", backbone=None) -> None:
        head_name = cfg.head.name if cfg.head is not None else head
        super().__init__(spec, cfg, sparse, make_head(head_name),
                         backbone_cfg=cfg.backbone if cfg.backbone is not None else backbone,
                         shared_embedding=shared)
        self.shared = shared


class Base(ComposedModel):
    """BASE: a CVR net trained on clicked impressions only, and an independent CTR net.

    The two nets share no parameter, so training them in one loop is the same as training them
    apart on the same batches. pCTCVR = pCTR * pCVR, as in the paper.

        loss_ctr = BCE(click, pCTR) over all impressions
        loss_cvr = BCE(conversion, pCVR) over clicked impressions
    """

    embedding_names = ("ctr_embedding", "cvr_embedding")

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool = True) -> None:
        _fixed_architecture(cfg)
        super().__init__(spec, cfg, sparse, make_head("independent"), shared_embedding=False)


def _fixed_architecture(cfg: ModelConfig) -> None:
    """BASE and the paper's baselines are defined by their own nets: refuse a backbone/head."""
    from esmm.errors import ConfigError

    for key, value, allowed in (("backbone", cfg.backbone, "none"),
                                ("head", cfg.head, None)):
        if value is not None and value.name != allowed:
            raise ConfigError(f"model.{key}: model {cfg.name!r} has a fixed architecture "
                              f"(see docs/models.md); got {key} {value.name!r}, expected none "
                              f"(leave model.{key} unset)")


_ESMM_FACTS = dict(citation=ESMM_CITATION, benchmark_monitor="ctcvr_auc",
                   benchmarks=frozenset({"paper", "sweep", "zoo", "demo"}))


@register("esmm", display="ESMM", rank=6, backbone="none", head="entire_space",
          summary="CTR and CVR towers over shared embeddings; pCTCVR = pCTR x pCVR and both "
          "losses over all impressions", paper_table2=_TABLE2_ESMM, **_ESMM_FACTS)
def _esmm(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return ESMM(spec, cfg, sparse=sparse, shared=True)


@register("esmm_ns", display="ESMM-NS", rank=5, backbone="none", head="entire_space",
          summary="ESMM with separate embeddings for the two towers",
          paper_table2=_TABLE2_ESMM_NS, **_ESMM_FACTS)
def _esmm_ns(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return ESMM(spec, cfg, sparse=sparse, shared=False)


@register("base", display="BASE", rank=0, citation=ESMM_CITATION,
          summary="independent CTR net and CVR net, the CVR net trained on clicked impressions "
          "only", benchmarks=frozenset({"paper", "sweep", "zoo", "demo"}),
          benchmark_monitor="cvr_auc",
          clicked_only=True, ctr_from_reference=True, reference=True,
          paper_table2=_TABLE2_BASE)
def _base(cfg: ModelConfig, spec: FeatureSpec, sparse: bool) -> MultiTaskModel:
    return Base(spec, cfg, sparse=sparse)
