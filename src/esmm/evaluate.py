"""Run a model over a split and compute every task's metrics."""

from __future__ import annotations

import logging

import numpy as np
import torch

from esmm.data.batches import iter_batches
from esmm.data.tables import EncodedData
from esmm.metrics import compute_metrics
from esmm.models.base import OUTPUT_NAMES, MultiTaskModel

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_arrays(model: MultiTaskModel, data: EncodedData, batch_size: int = 8192
                   ) -> dict[str, np.ndarray]:
    """Predictions for every row of ``data`` in row order.

    Returns:
        ``p_ctr``, ``p_cvr``, ``p_ctcvr``: each (N,) float64.
    """
    was_training = model.training
    model.eval()
    out = {k: np.empty(data.n, dtype=np.float64) for k in OUTPUT_NAMES}
    pos = 0
    try:
        for batch in iter_batches(data, batch_size, shuffle=False):
            probs = model.predict(model(batch))
            for k in OUTPUT_NAMES:
                out[k][pos:pos + batch.size] = probs[k].double().numpy()
            pos += batch.size
    finally:
        model.train(was_training)
    return out


def evaluate_arrays(model: MultiTaskModel, data: EncodedData, preds: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """Metrics of ``preds`` on ``data`` in the model's declared metric spaces."""
    labels = {"click": data.click, "conversion": data.conversion}
    return compute_metrics(preds, labels, groups=data.groups,
                           ground_truth=data.ground_truth or None, spaces=model.metric_spaces)


def evaluate(model: MultiTaskModel, data: EncodedData, batch_size: int = 8192
             ) -> dict[str, float]:
    """Predict ``data`` and compute its metrics."""
    return evaluate_arrays(model, data, predict_arrays(model, data, batch_size))
