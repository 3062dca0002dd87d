"""Encoded numpy arrays -> batches of torch tensors, vectorised (no per-row Python).

Each batch gathers its impressions' ids, bags (values + offsets) and dense values; user-side
fields are gathered once per distinct user in the batch, with ``user_index`` mapping each
impression to its user's row, so a user's bags are embedded once per batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from esmm.data.tables import EncodedData
from esmm.features import take_ragged

T = TypeVar("T")


@dataclass
class Batch:
    """A batch of B impressions (and U <= B distinct users when the data is normalized).

    ids: field -> (B,) int64 bucket ids; bags: field -> ((nnz,) values, (B + 1,) offsets);
    dense: (B, n_dense) float32; user_ids / user_bags: the same over U users;
    user_index: (B,) int64 row of each impression's user; click / conversion / weight: (B,)
    float32; rows: (B,) int64 positions of the impressions in their split; groups (B,) and
    ground_truth (name -> (B,)): numpy arrays for metrics, only when asked for (``extras``).
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
    groups: np.ndarray | None = None
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        """This batch with every tensor on ``device`` (itself when already there)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            size=self.size, ids={k: mv(v) for k, v in self.ids.items()},
            bags={k: (mv(v), mv(o)) for k, (v, o) in self.bags.items()}, dense=mv(self.dense),
            user_ids={k: mv(v) for k, v in self.user_ids.items()},
            user_bags={k: (mv(v), mv(o)) for k, (v, o) in self.user_bags.items()},
            user_index=mv(self.user_index), click=mv(self.click),
            conversion=mv(self.conversion), weight=mv(self.weight), rows=mv(self.rows),
            groups=self.groups, ground_truth=self.ground_truth)


def make_batch(data: EncodedData, rows: np.ndarray, extras: bool = False) -> Batch:
    """Gather impressions ``rows`` (K,) of ``data`` into a :class:`Batch` (with group ids and
    ground truth when ``extras``)."""
    t = torch.from_numpy
    pos = data.row_ids[rows] if data.row_ids is not None else rows
    b = Batch(size=len(rows), rows=t(pos.astype(np.int64)))
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
    if extras:
        b.groups = data.groups[rows] if data.groups is not None else None
        b.ground_truth = {k: v[rows] for k, v in data.ground_truth.items()}
    return b


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, block: int = 1) -> np.ndarray:
    """Row order of one epoch, fixed by (seed, epoch).

    ``block > 1`` shuffles blocks of ``block`` consecutive rows instead of single rows: where
    a user's impressions are consecutive (as in Ali-CCP logs) a batch then holds few distinct
    users, and their long behaviour bags are embedded once for many impressions.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return shuffled_order(np.random.default_rng([seed, epoch]), n, block)


def shuffled_order(rng: np.random.Generator, n: int, block: int = 1) -> np.ndarray:
    """A permutation of 0..n-1 drawn from ``rng``, moving blocks of ``block`` rows together."""
    if block <= 1:
        return rng.permutation(n).astype(np.int64)
    n_blocks = (n + block - 1) // block
    starts = rng.permutation(n_blocks).astype(np.int64) * block
    order = (starts[:, None] + np.arange(block, dtype=np.int64)).reshape(-1)  # (n_blocks*block,)
    return order[order < n]


def iter_batches(data: EncodedData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, block: int = 1, rank: int = 0,
                 world: int = 1) -> Iterator[Batch]:
    """Yield the batches of one epoch, starting at batch ``start_batch`` (for resuming).

    With ``world > 1`` ranks, ``batch_size`` is the global batch: every rank draws the same
    epoch order and global batches (:func:`batch_bounds`) and yields its slice of each
    (:func:`rank_slice`), so the ranks' batches together are the one-process batches.
    """
    order = epoch_order(data.n, seed, epoch, shuffle, block)
    bounds = batch_bounds(data.n, batch_size, world)
    for k in range(start_batch, len(bounds) - 1):
        rows = order[bounds[k]:bounds[k + 1]]
        if world > 1:
            rows = rows[rank_slice(len(rows), rank, world)]
        yield make_batch(data, rows)


def batch_bounds(n: int, batch_size: int, world: int = 1) -> np.ndarray:
    """(S + 1,) start of each global batch of an epoch of ``n`` rows, and ``n``.

    Batches of ``batch_size`` rows, the last one shorter. With ``world`` ranks a last batch
    of fewer than ``world`` rows would leave a rank without rows, so those rows join the batch
    before (one batch of up to ``batch_size + world - 1`` rows): every row is used exactly
    once per epoch and every rank holds at least one row of every batch.
    """
    if n < world:
        raise ValueError(f"{n} rows cannot be shared among {world} ranks")
    bounds = np.arange(0, n, batch_size, dtype=np.int64)
    if len(bounds) > 1 and n - bounds[-1] < world:
        bounds = bounds[:-1]
    return np.append(bounds, n)


def rank_slice(size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a batch of ``size`` rows: shares differ by at most
    one row, the larger ones going to the last ranks."""
    return slice(rank * size // world, (rank + 1) * size // world)


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Batches of an epoch of ``n`` rows (global batches over ``world`` ranks)."""
    if world > 1:
        return len(batch_bounds(n, batch_size, world)) - 1
    return (n + batch_size - 1) // batch_size


_DONE = object()


def read_ahead(batches: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``batches`` in a background thread, ``depth`` items ahead of the consumer.

    The gathers that build a batch (numpy, mostly outside the GIL) then overlap the model's
    step. Items come out in the same order as without read-ahead; an exception raised while
    producing them is raised here. Closing this generator stops the thread.
    """
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer to raise
            q.put(_Failure(e))

    thread = threading.Thread(target=produce, name="esmm-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


@dataclass
class _Failure:
    error: BaseException
