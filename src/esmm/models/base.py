"""The model contract shared by every method.

A model maps a batch to named logits (``forward``), turns them into named probabilities
(``predict``: ``p_ctr``, ``p_cvr``, ``p_ctcvr``) and named losses (``losses``: ``loss_ctr``, ...),
and declares the metric spaces it is measured on and the metric its early stopping watches. The
trainer relies on nothing else, so a new method never needs a change in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esmm.config import ModelConfig
from esmm.features import FeatureSpec
from esmm.metrics import DEFAULT_SPACES, MetricSpace

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
        a, b = out["ctr_logit"], out["cvr_logit"]
        return {
            "p_ctr": torch.sigmoid(a),
            "p_cvr": torch.sigmoid(b),
            "p_ctcvr": torch.exp(F.logsigmoid(a) + F.logsigmoid(b)),
        }

    def losses(self, out: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract


_REGISTRY: dict[str, Callable[[ModelConfig, FeatureSpec, bool], MultiTaskModel]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_factory(name: str):
    return _REGISTRY.get(name)
