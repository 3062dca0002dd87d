"""Run a model over a split and compute every task's metrics.

A split is in memory (:class:`EncodedData`) or streamed (:class:`ParquetStream`); a streamed
split is scored chunk by chunk, so only the scores, labels and group ids of its rows (tens of
bytes per row, which exact AUC needs) are held, never its features.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from esmm.allocator import keep_large_buffers
from esmm.data.batches import iter_batches, read_ahead
from esmm.data.stream import Split
from esmm.data.tables import EncodedData
from esmm.errors import DataError
from esmm.metrics import compute_metrics, entire_space_diagnostics
from esmm.models.base import OUTPUT_NAMES, MultiTaskModel

log = logging.getLogger(__name__)

# Evaluation makes its batches in the scoring thread: a read-ahead thread gained nothing in
# memory (52.5 s either way for 10M rows, 1 torch thread, 2 cores) and cost a streamed split
# 45% (86 s against 59.5 s), its Python-side reading contending for the GIL with every op of
# the forward pass.
READ_AHEAD = 0


def _device(model: MultiTaskModel) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict_arrays(model: MultiTaskModel, data: EncodedData, batch_size: int = 8192
                   ) -> dict[str, np.ndarray]:
    """Predictions for every row of ``data`` in row order.

    Returns:
        ``p_ctr``, ``p_cvr``, ``p_ctcvr``: each (N,) float64.
    """
    keep_large_buffers()
    was_training = model.training
    model.eval()
    device = _device(model)
    out = {k: np.empty(data.n, dtype=np.float64) for k in OUTPUT_NAMES}
    pos = 0
    try:
        for batch in read_ahead(iter_batches(data, batch_size, shuffle=False), READ_AHEAD):
            probs = model.predict(model(batch.to(device)))
            for k in OUTPUT_NAMES:
                out[k][pos:pos + batch.size] = probs[k].double().cpu().numpy()
            pos += batch.size
    finally:
        model.train(was_training)
    return out


def evaluate_arrays(model: MultiTaskModel, data: EncodedData, preds: dict[str, np.ndarray]
                    ) -> dict[str, float]:
    """Metrics of ``preds`` on ``data`` in the model's declared metric spaces, plus the
    entire-space diagnostics of pCVR where ``data`` carries simulator ground truth."""
    labels = {"click": data.click, "conversion": data.conversion}
    out = compute_metrics(preds, labels, groups=data.groups,
                          ground_truth=data.ground_truth or None, spaces=model.metric_spaces)
    if data.ground_truth and "p_cvr" in preds:
        out.update(entire_space_diagnostics(preds, data.ground_truth))
    return out


def predict_split(model: MultiTaskModel, split: Split, batch_size: int = 8192
                  ) -> tuple[dict[str, np.ndarray], EncodedData]:
    """Predictions for every row of an in-memory or streamed split, in row order.

    Returns:
        (predictions, each (N,) float64; the split's labels, groups and ground truth as an
        :class:`EncodedData` without features).
    """
    if isinstance(split, EncodedData):
        return predict_arrays(model, split, batch_size), split
    # The batches of the in-memory split, read chunk by chunk: the same predictions, bit for bit.
    # Outputs are allocated once for all N rows: thousands of small per-batch arrays kept to the
    # end would pin the allocator's heap under every transient batch and grow RSS with N.
    keep_large_buffers()
    n = split.n
    preds = {k: np.empty(n, dtype=np.float64) for k in OUTPUT_NAMES}
    cols: dict[str, np.ndarray] = {}
    pos = 0
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        with torch.inference_mode():
            for batch in read_ahead(split.batches(batch_size, extras=True), READ_AHEAD):
                probs = model.predict(model(batch.to(device)))
                end = pos + batch.size
                for k in OUTPUT_NAMES:
                    preds[k][pos:end] = probs[k].double().cpu().numpy()
                got = {"click": batch.click, "conversion": batch.conversion,
                       "groups": batch.groups,
                       **{f"gt:{g}": a for g, a in batch.ground_truth.items()}}
                for k, a in got.items():
                    if a is None:
                        continue
                    a = np.asarray(a)
                    if k not in cols:
                        cols[k] = np.empty(n, dtype=np.int8 if k in ("click", "conversion")
                                           else a.dtype)
                    cols[k][pos:end] = a
                pos = end
    finally:
        model.train(was_training)
    if pos != n:
        raise DataError(f"{split.source}: the stream gave {pos} rows, expected {n}; the files "
                        "changed while they were read")
    keep = EncodedData(source=split.source, n=n, groups=cols.get("groups"),
                       click=cols.get("click"), conversion=cols.get("conversion"))
    keep.ground_truth = {k[3:]: v for k, v in cols.items() if k.startswith("gt:")}
    return preds, keep


def evaluate(model: MultiTaskModel, data: Split, batch_size: int = 8192) -> dict[str, float]:
    """Predict an in-memory or streamed split and compute its metrics."""
    preds, labels = predict_split(model, data, batch_size)
    return evaluate_arrays(model, labels, preds)
