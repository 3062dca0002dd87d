"""Encoded numpy arrays -> batches of torch tensors, vectorised (no per-row Python).

Each batch gathers its impressions' ids, bags (values + offsets) and dense values; user-side
fields are gathered once per distinct user in the batch, with ``user_index`` mapping each
impression to its user's row, so a user's bags are embedded once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from esmm.data.tables import EncodedData
from esmm.features import take_ragged


@dataclass
class Batch:
    """A batch of B impressions (and U <= B distinct users when the data is normalized).

    ids: field -> (B,) int64 bucket ids; bags: field -> ((nnz,) values, (B + 1,) offsets);
    dense: (B, n_dense) float32; user_ids / user_bags: the same over U users;
    user_index: (B,) int64 row of each impression's user; click / conversion / weight: (B,)
    float32; rows: (B,) int64 positions of the impressions in their split.
    """

    size: int
    ids: dict[str, torch.Tensor] = field(default_factory=dict)
    bags: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: torch.Tensor | None = None
    user_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    user_bags: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    user_index: torch.Tensor | None = None
    click: torch.Tensor | None = None
    conversion: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def make_batch(data: EncodedData, rows: np.ndarray) -> Batch:
    """Gather impressions ``rows`` (K,) of ``data`` into a :class:`Batch`."""
    t = torch.from_numpy
    b = Batch(size=len(rows), rows=t(rows.astype(np.int64)))
    for name, arr in data.ids.items():
        b.ids[name] = t(arr[rows])
    for name, (vals, offs) in data.bags.items():
        v, o = take_ragged(vals, offs, rows)
        b.bags[name] = (t(v), t(o))
    if data.dense is not None:
        b.dense = t(np.ascontiguousarray(data.dense[rows]))
    if data.user_row is not None and (data.user_ids or data.user_bags):
        uniq, inv = np.unique(data.user_row[rows], return_inverse=True)
        b.user_index = t(inv.astype(np.int64).reshape(-1))
        for name, arr in data.user_ids.items():
            b.user_ids[name] = t(arr[uniq])
        for name, (vals, offs) in data.user_bags.items():
            v, o = take_ragged(vals, offs, uniq)
            b.user_bags[name] = (t(v), t(o))
    if data.click is not None:
        b.click = t(data.click[rows].astype(np.float32))
        b.conversion = t(data.conversion[rows].astype(np.float32))
    if data.weight is not None:
        b.weight = t(data.weight[rows])
    return b


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, block: int = 1) -> np.ndarray:
    """Row order of one epoch, fixed by (seed, epoch).

    ``block > 1`` shuffles blocks of ``block`` consecutive rows instead of single rows: where
    a user's impressions are consecutive (as in Ali-CCP logs) a batch then holds few distinct
    users, and their long behaviour bags are embedded once for many impressions.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if block <= 1:
        return rng.permutation(n).astype(np.int64)
    n_blocks = (n + block - 1) // block
    starts = rng.permutation(n_blocks).astype(np.int64) * block
    order = (starts[:, None] + np.arange(block, dtype=np.int64)).reshape(-1)  # (n_blocks*block,)
    return order[order < n]


def iter_batches(data: EncodedData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, block: int = 1) -> Iterator[Batch]:
    """Yield the batches of one epoch, starting at batch ``start_batch`` (for resuming)."""
    order = epoch_order(data.n, seed, epoch, shuffle, block)
    for start in range(start_batch * batch_size, data.n, batch_size):
        yield make_batch(data, order[start:start + batch_size])


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
