"""The multi-task zoo: every backbone as a plain multi-task model and under ESMM's head.

``<backbone>`` is the backbone with its usual head (``independent``: CTR over all
impressions, CVR over clicked ones; AITM: ``ctcvr``, its click and purchase tasks over all
impressions), ``esmm_<backbone>`` the same backbone under the ``entire_space`` head. Both are
:class:`esmm.models.esmm.ESMM` with other defaults, so ``model.backbone`` and ``model.head``
still override them.
"""

from __future__ import annotations

from functools import partial

from pydantic import TypeAdapter

from esmm.config import BackboneConfig, ModelConfig
from esmm.features import FeatureSpec
from esmm.models import aitm, dbmtl, mmoe, ple, shared_bottom  # noqa: F401  (register backbones)
from esmm.models.backbone import backbone_info
from esmm.models.base import MultiTaskModel, register
from esmm.models.esmm import ESMM

ZOO_BACKBONES = ("shared_bottom", "mmoe", "ple", "dbmtl", "aitm")
_PLAIN_HEAD = {"aitm": "ctcvr"}


def default_backbone(name: str):
    """The ``model.backbone`` config of ``name`` with every default."""
    return TypeAdapter(BackboneConfig).validate_python({"name": name})


def _build(backbone: str, head: str, cfg: ModelConfig, spec: FeatureSpec,
           sparse: bool) -> MultiTaskModel:
    return ESMM(spec, cfg, sparse=sparse, shared=True, head=head,
                backbone=default_backbone(backbone))


def _register_zoo() -> None:
    for rank, b in enumerate(ZOO_BACKBONES):
        info = backbone_info(b)
        plain = _PLAIN_HEAD.get(b, "independent")
        register(b, display=info.display, rank=10 + 2 * rank, backbone=b, head=plain,
                 summary=f"{info.summary}; {plain} head", citation=info.citation,
                 benchmarks=frozenset({"zoo"}),
                 benchmark_monitor="cvr_auc" if plain == "independent" else "ctcvr_auc",
                 clicked_only=plain == "independent")(partial(_build, b, plain))
        register(f"esmm_{b}", display=f"ESMM-{info.display}", rank=11 + 2 * rank, backbone=b,
                 head="entire_space", summary=f"{info.summary}; ESMM's entire-space head",
                 citation=f"{info.citation}; ESMM head: Ma et al., SIGIR 2018",
                 benchmarks=frozenset({"zoo"}),
                 benchmark_monitor="ctcvr_auc")(partial(_build, b, "entire_space"))


_register_zoo()
