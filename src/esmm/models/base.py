"""The model contract shared by every method.

A model maps a batch to named logits (``forward``), turns them into named probabilities
(``predict``: ``p_ctr``, ``p_cvr``, ``p_ctcvr``) and named losses (``losses``: ``loss_ctr``, ...),
and declares the metric spaces it is measured on and the metric its early stopping watches. The
trainer relies on nothing else, so a new method never needs a change in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from esmm.config import ModelConfig
from esmm.features import FeatureSpec
from esmm.metrics import DEFAULT_SPACES, MetricSpace
from esmm.models.heads import product_probs

OUTPUT_NAMES = ("p_ctr", "p_cvr", "p_ctcvr")


class MultiTaskModel(nn.Module):
    """Base class: subclasses implement ``forward`` and ``losses``."""

    metric_spaces: tuple[MetricSpace, ...] = DEFAULT_SPACES
    # Early stopping watches the validation log loss of the tasks the model is trained on.
    monitor: str = "ctr_logloss+ctcvr_logloss"

    @property
    def monitor_mode(self) -> str:
        """``"min"`` for a log-loss monitor, ``"max"`` for anything else (AUCs)."""
        return "min" if "logloss" in self.monitor else "max"

    def forward(self, batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probabilities from logits ``ctr_logit`` and ``cvr_logit`` (each (B,)).

        ``p_ctcvr`` is computed in log space so it does not underflow before the product.
        """
        return product_probs(out["ctr_logit"], out["cvr_logit"])

    def losses(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the losses ``losses`` returns, in order (a model without a ``head``
        overrides this)."""
        return self.head.loss_names

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training minimises: the losses weighted by ``loss_weighting`` (set by
        ``build_model`` from ``train.loss_weights`` / ``train.loss_weighting``), else summed."""
        weighting = getattr(self, "loss_weighting", None)
        return sum(losses.values()) if weighting is None else weighting(losses)

    def loss_weights(self) -> dict[str, float]:
        """The weight each named loss gets now (1 for all without a weighting)."""
        weighting = getattr(self, "loss_weighting", None)
        return {n: 1.0 for n in self.loss_names} if weighting is None else weighting.weights()


@dataclass(frozen=True)
class ModelEntry:
    """A registered model and every fact the benchmarks, the demo and the CLI need about it.

    Attributes:
        name: the ``model.name`` that selects it.
        factory: ``(ModelConfig, FeatureSpec, sparse) -> MultiTaskModel``.
        display: name in reports (``ESMM``, ``MMoE``, ``ESMM-MMoE``, ...).
        summary: one sentence for the models table (README, docs/models.md).
        citation: the paper it comes from.
        rank: order in reports and tables (lower first).
        benchmarks: where it takes part by default (``paper``, ``sweep`` and ``zoo`` benchmarks,
            the ``demo``).
        benchmark_monitor: the validation metric a benchmark early-stops it on: the metric of
            the net that differs between methods (``cvr_auc`` for CVR nets, ``ctcvr_auc`` for
            models trained on CTCVR). ``esmm train``'s default (``MultiTaskModel.monitor``) is a
            log loss instead, which stays informative on tiny validation splits.
        clicked_only: its conversion task learns from clicked impressions only (a benchmark
            gives it more epochs, as it sees fewer conversion rows per epoch).
        ctr_from_reference: its pCTCVR multiplies pCVR by the pCTR of an independent CTR net,
            so a benchmark takes that pCTR from the reference CTR net.
        reference: the single-task reference (an independent CTR net and a CVR net on clicks):
            benchmarks report paired differences against it and use its architecture as the
            reference CTR net.
        paper_table2: the Ali-CCP AUCs (%) of Table 2 of arXiv 1804.07931 (CVR AUC, std,
            CTCVR AUC, std), for methods the paper reports.
        backbone, head: the default backbone and head of a composed model (None otherwise).

    The facts describe the model as registered: a run that overrides ``model.head`` (e.g.
    ``esmm`` under the ``independent`` head) keeps the registered entry's benchmark facts.
    """

    name: str
    factory: Callable[[ModelConfig, FeatureSpec, bool], MultiTaskModel]
    display: str
    summary: str
    citation: str
    rank: float
    benchmarks: frozenset[str] = frozenset()
    benchmark_monitor: str = "ctcvr_auc"
    clicked_only: bool = False
    ctr_from_reference: bool = False
    reference: bool = False
    paper_table2: tuple[float, float, float, float] | None = None
    backbone: str | None = None
    head: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, **facts):
    """Decorator registering a model factory under ``name`` with its :class:`ModelEntry` facts."""
    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name=name, factory=factory, **facts)
        return factory
    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def entries(benchmark: str | None = None) -> list[ModelEntry]:
    """Registered models in report order; only those of ``benchmark`` when given."""
    out = [e for e in _REGISTRY.values() if benchmark is None or benchmark in e.benchmarks]
    return sorted(out, key=lambda e: (e.rank, e.name))


def get_entry(name: str) -> ModelEntry | None:
    return _REGISTRY.get(name)


def reference_entry() -> ModelEntry:
    """The single-task reference model (see :attr:`ModelEntry.reference`)."""
    refs = [e for e in _REGISTRY.values() if e.reference]
    if len(refs) != 1:
        raise RuntimeError(f"expected one reference model, found {[e.name for e in refs]}")
    return refs[0]


def get_factory(name: str):
    e = _REGISTRY.get(name)
    return None if e is None else e.factory
