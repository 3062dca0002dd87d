"""Data-parallel training on torch.distributed: process group, gradient exchange, evaluation.

``torchrun --nproc-per-node N -m esmm train CONFIG --out RUN`` (or ``esmm train --nproc N``)
starts N processes (ranks). Each builds the same model from the same seed, reads a disjoint
share of every global batch of ``train.batch_size`` rows (:func:`esmm.data.stream.split_batches`)
and after the backward pass the ranks exchange gradients so that every rank applies the update
of one process at the global batch:

* every loss is the rank's share of the global loss (:func:`esmm.losses.global_batch`): the
  local numerator over the global denominator (rows, or weight total, summed over ranks by a
  scalar all-reduce per loss term), so the global gradient is the **sum** of the ranks'
  gradients, whatever the split of rows;
* dense gradients (towers, dense tables): one all-reduce (sum) of one flat buffer;
* sparse embedding gradients (``sparse=True`` tables, :class:`esmm.optim.RowSparseAdam`):
  on gloo a sparse all-reduce of each table's coalesced gradient; on NCCL, which has no
  sparse all-reduce, an all-gather of the row counts, then of the touched row ids and their
  gradient rows (padded to the largest rank). The optimizer sums duplicate ids, so either
  way it sees the summed gradient of the global batch.

Evaluation is exact: each rank scores a contiguous share of the eval split, rank 0 gathers the
scores in row order and computes the metrics, which it broadcasts so that every rank takes the
same early-stopping decision. Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from esmm.errors import ConfigError, EsmmError

log = logging.getLogger(__name__)

__all__ = ["DistContext", "GradientSync", "launched_by_torchrun", "torchrun_command"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by ``torchrun`` (its environment is set)."""
    return all(k in os.environ for k in _ENV)


def torchrun_command(nproc: int, esmm_args: list[str]) -> list[str]:
    """The command that runs ``esmm ESMM_ARGS`` as ``nproc`` ranks on this machine."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "esmm", *esmm_args]


@dataclass
class DistContext:
    """This process's place among the ranks (a single process: rank 0 of 1, no group).

    Attributes:
        rank / world / local_rank: as torchrun sets them.
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA); None for a single process.
        device: the device this rank trains on (``cuda:LOCAL_RANK`` on GPUs).
        bytes_sent: bytes this rank put into gradient collectives since the last reset.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bytes_sent: int = 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Join the process group torchrun describes, on ``device`` (``train.device``
        resolved; under torchrun ``cuda`` means this rank's ``cuda:LOCAL_RANK``)."""
        if not launched_by_torchrun():
            return cls(device=device)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            if device.index is not None and world > 1:
                raise ConfigError(f"train.device={device}: under torchrun each rank trains on "
                                  "its LOCAL_RANK's GPU; set train.device=cuda")
            if device.index is None and local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local} but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s); start at most "
                                  "that many processes per node")
            # One process may keep the GPU it names; ranks of a machine take one GPU each.
            device = device if device.index is not None else torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise ConfigError(f"train.device={device}: distributed training runs on cpu (gloo) "
                              "or cuda (NCCL)")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        log.info("rank %d of %d (%s on %s)", rank, world, backend, device)
        return cls(rank, world, local, backend, device)

    def close(self, synchronize: bool = False) -> None:
        """Leave the process group. ``synchronize`` (a run that finished on this rank) waits
        for every rank first: a rank that tears its group down while another still has a
        collective in flight was seen to abort at exit (SIGABRT) with TorchRec's sharded
        tables. After a failure no rank waits: the others may be gone."""
        if self.active and dist.is_initialized():
            if synchronize:
                self.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.active:
            dist.barrier(device_ids=[self.device.index] if self.backend == "nccl" else None)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._obj_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        if self.backend == "nccl":
            # gather_object on NCCL needs the current device set (done in from_env); the
            # all-gather form is the one every NCCL version supports.
            every: list[Any] = [None] * self.world
            dist.all_gather_object(every, obj)
            return every if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (and returned)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def _obj_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def check_same(self, what: str, value: int) -> None:
        """Raise on every rank unless every rank holds the same ``value`` of ``what``."""
        values = self.broadcast(value)
        t = torch.tensor([int(value != values)], device=self.device)
        if int(self.sum_(t).item()):
            raise EsmmError(f"ranks disagree on {what} (rank 0: {values}); every rank must "
                            "read the same data and config")


class GradientSync:
    """Sums the gradients of all ranks after ``backward()`` (see the module docstring).

    Args:
        dense / sparse: the model's parameters with dense and with sparse gradients
            (:func:`esmm.train.split_parameters`).
        sparse_exchange: ``all_reduce`` (gloo only) or ``all_gather`` (any backend; NCCL's
            way); None picks by backend.
    """

    def __init__(self, ctx: DistContext, dense: list[nn.Parameter], sparse: list[nn.Parameter],
                 sparse_exchange: str | None = None) -> None:
        self.ctx, self.dense, self.sparse = ctx, dense, sparse
        self.sparse_exchange = sparse_exchange or (
            "all_reduce" if ctx.backend == "gloo" else "all_gather")
        if self.sparse_exchange == "all_reduce" and ctx.backend == "nccl":
            raise ConfigError("NCCL has no sparse all-reduce; exchange sparse gradients with "
                              "all_gather")

    def __call__(self) -> None:
        if not self.ctx.active:
            return
        self._dense()
        for p in self.sparse:
            self._sparse(p)

    def _dense(self) -> None:
        """One all-reduce of every dense gradient, flattened, plus one presence flag per
        parameter: a parameter no rank gave a gradient keeps ``grad=None``, as it would in one
        process (an optimizer skips it), instead of a zero gradient."""
        if not self.dense:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        flags = torch.tensor([p.grad is not None for p in self.dense], dtype=grads[0].dtype,
                             device=grads[0].device)  # (P,)
        flat = torch.cat([g.reshape(-1) for g in grads] + [flags])  # (sum numel + P,)
        self.ctx.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
        present = (flat[-len(grads):] > 0).tolist()
        pos = 0
        for p, g, has in zip(self.dense, grads, present, strict=True):
            p.grad = flat[pos:pos + g.numel()].view_as(p) if has else None
            pos += g.numel()

    def _sparse(self, p: nn.Parameter) -> None:
        g = p.grad
        if g is None:
            g = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.int64, device=p.device),
                                        p.new_empty(0, *p.shape[1:]), p.shape,
                                        check_invariants=False)
        g = g.coalesce()
        idx, val = g.indices(), g.values()  # (1, nnz), (nnz, D)
        self.ctx.bytes_sent += idx.numel() * idx.element_size() + val.numel() * val.element_size()
        if self.sparse_exchange == "all_reduce":
            dist.all_reduce(g)
            p.grad = g
            return
        p.grad = _all_gather_rows(idx[0], val, p.shape)


def _all_gather_rows(idx: torch.Tensor, val: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The sum over ranks of sparse gradients given as (nnz,) row ids and (nnz, D) rows,
    exchanged with dense all-gathers (padded to the largest nnz) as NCCL needs."""
    world = dist.get_world_size()
    n = torch.tensor([idx.numel()], dtype=torch.int64, device=idx.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    top = max(sizes)
    pad_idx = torch.zeros(top, dtype=torch.int64, device=idx.device)
    pad_idx[:idx.numel()] = idx
    pad_val = val.new_zeros(top, *val.shape[1:])
    pad_val[:len(val)] = val
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    ids = torch.cat([a[:k] for a, k in zip(all_idx, sizes, strict=True)])  # (sum nnz,)
    rows = torch.cat([a[:k] for a, k in zip(all_val, sizes, strict=True)])  # (sum nnz, D)
    return torch.sparse_coo_tensor(ids[None], rows, shape, check_invariants=False)


def shard_bounds(n: int, world: int) -> np.ndarray:
    """(world + 1,) contiguous row ranges of ``n`` rows, one per rank (evaluation shares)."""
    return np.arange(world + 1, dtype=np.int64) * n // world
