"""Optimizers for embedding tables with sparse gradients."""

from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` computed on the touched rows only.

    The same algorithm and state (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints of
    either load into the other: for every row id in the gradient, with g the row's summed
    gradient,

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        w -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    and rows absent from the gradient keep their weights and moments. torch's version coalesces
    the sparse gradient and then goes through sparse-tensor masks and adds for each moment;
    here the duplicate ids are summed once (``unique`` + ``index_add``) and every update is a
    gather, a few in-place ops on (R, D) rows and a scatter, which is faster per step
    (``bench/train_throughput.py``) and gives the same result to float rounding.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("maximize", False):
                raise ValueError("RowSparseAdam: maximize=True is not supported")
            beta1, beta2 = group["betas"]
            lr, eps = float(group["lr"]), group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise RuntimeError("RowSparseAdam takes sparse gradients (an embedding with "
                                       "sparse=True); use Adam for dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                # A sparse gradient of a (rows, D) table: (1, nnz) row ids, (nnz, D) values.
                rows, g = _rows_and_sums(grad)  # (R,), (R, D)
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
                v.addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)
        return loss


def _rows_and_sums(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows (R,) of a sparse (rows, D) gradient and each row's summed values
    (R, D).

    A gradient whose row ids are strictly increasing (as the embedding collection's backward
    gives; autograd drops the coalesced flag when it stores a gradient, so the ids are
    checked, one O(nnz) comparison) already is that; otherwise duplicate ids are summed once
    (``unique`` + ``index_add``).
    """
    idx, val = grad._indices()[0], grad._values()
    if grad.is_coalesced() or bool((idx[1:] > idx[:-1]).all()):
        return idx, val
    rows, inv = torch.unique(idx, return_inverse=True)  # (R,), (nnz,)
    return rows, val.new_zeros(len(rows), val.shape[1]).index_add_(0, inv, val)
