"""Models behind one contract (see :mod:`esmm.models.base`)."""

from __future__ import annotations

from esmm.config import Config
from esmm.errors import ConfigError, EsmmError
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
    try:
        model = factory(cfg.model, spec, sparse)
    except (MemoryError, RuntimeError) as e:
        # An oversized embedding table fails inside torch's allocator; the user needs the field.
        if isinstance(e, RuntimeError) and not ("allocate" in str(e) or "overflow" in str(e)):
            raise
        raise EsmmError(_no_memory_message(cfg, spec)) from None
    model.loss_weighting = build_loss_weighting(cfg.train, model.loss_names)
    return model


def _no_memory_message(cfg: Config, spec: FeatureSpec) -> str:
    """One line naming the embedding rows the model asked for and the largest field."""
    sparse = [f for f in spec.fields if f.kind != "dense"]
    rows = sum(f.buckets for f in sparse)
    biggest = max(sparse, key=lambda f: f.buckets * f.dim)
    gib = sum(f.buckets * f.dim for f in sparse) * 4 / 2**30
    return (f"model {cfg.model.name!r} does not fit in memory: its embedding tables hold "
            f"{rows:,} rows (at least {gib:,.1f} GiB of float32), the largest field "
            f"{biggest.name!r} with {biggest.buckets:,} buckets of width {biggest.dim}; lower "
            "`buckets` in `features`")
