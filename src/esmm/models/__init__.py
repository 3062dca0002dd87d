"""Models behind one contract (see :mod:`esmm.models.base`)."""

from __future__ import annotations

from esmm.config import Config
from esmm.errors import ConfigError
from esmm.features import FeatureSpec
from esmm.loss_weighting import build_loss_weighting
from esmm.models import baselines as _baselines  # noqa: F401  (aman, oversampling, ...)
from esmm.models import counterfactual as _counterfactual  # noqa: F401  (escm2_*, dcmt)
from esmm.models import esmm as _esmm  # noqa: F401  (registers esmm, esmm_ns, base)
from esmm.models import zoo as _zoo  # noqa: F401  (shared_bottom, mmoe, ple, dbmtl, aitm, esmm_*)
from esmm.models.base import (
    OUTPUT_NAMES,
    ModelEntry,
    MultiTaskModel,
    entries,
    get_entry,
    get_factory,
    model_names,
    reference_entry,
)

__all__ = ["OUTPUT_NAMES", "ModelEntry", "MultiTaskModel", "build_model", "entries",
           "get_entry", "model_names", "reference_entry"]


def build_model(cfg: Config, spec: FeatureSpec) -> MultiTaskModel:
    """Build the model named by ``cfg.model.name`` over the feature spec."""
    factory = get_factory(cfg.model.name)
    if factory is None:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; "
                          f"expected one of {model_names()}")
    sparse = cfg.train.sparse_optimizer.name != "dense"
    model = factory(cfg.model, spec, sparse)
    model.loss_weighting = build_loss_weighting(cfg.train, model.loss_names)
    return model
