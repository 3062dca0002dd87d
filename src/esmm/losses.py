"""Losses in log space.

For ESMM the CTCVR probability is a product, p = sigmoid(a) * sigmoid(b). Computing it in
probability space and feeding it to BCE underflows (p -> 0 gives log(0)) and is usually
"fixed" by clamping, which hides the problem. Here:

    log p       = logsigmoid(a) + logsigmoid(b)
    log (1 - p) = logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))

The second line is the identity 1 - s(a) s(b) = (1 - s(a)) + s(a) (1 - s(b)). It is not
``log1mexp(log p)``: once both logits pass about 104, log p rounds to exactly 0 in float32,
log(1 - p) becomes log(0) and its gradient 0 * inf = NaN, even on rows whose label drops that
term. Every term of the recursion is finite for finite logits, so the loss and its gradient are
finite and exact for any finite logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from esmm.errors import EsmmError

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012).

    Near 0 it uses log(-expm1(x)); far from 0 it uses log1p(-exp(x)). Each branch gets an
    input inside its own domain, so the branch not taken cannot send NaN into the gradient.
    """
    near = x > _LOG_HALF
    x_near = torch.where(near, x, torch.full_like(x, _LOG_HALF))
    x_far = torch.where(near, torch.full_like(x, _LOG_HALF), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


# Sums a 0-d tensor over the processes that share a global batch (None: one process).
_GLOBAL_SUM: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar(
    "esmm_global_sum", default=None)


@contextmanager
def global_batch(total: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within this block every loss is this process's share of the loss of a global batch
    split across processes: its numerator is the local sum, its denominator (row count or
    weight total) ``total`` of the local one, summed over the processes. The losses and
    gradients of all processes then add up to those of one process at the global batch,
    whatever the split of rows (see :mod:`esmm.distributed`)."""
    token = _GLOBAL_SUM.set(total)
    try:
        yield
    finally:
        _GLOBAL_SUM.reset(token)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) ``values`` under (N,) non-negative ``weight`` (None = uniform).

    With all weights zero (e.g. no clicked row in a batch for a clicked-only loss) the loss is
    exactly zero with zero gradient, not NaN. Inside :func:`global_batch` the denominator is
    the global one.
    """
    reduce = _GLOBAL_SUM.get()
    if weight is None:
        if reduce is None:
            return values.mean()
        weight = torch.ones_like(values)
    total = weight.sum() if reduce is None else reduce(weight.detach().sum())
    if float(total) == 0.0:
        return (values * weight).sum()
    return (values * weight).sum() / total


def bce_with_logits(logit: torch.Tensor, label: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logit) against (N,) 0/1 labels, weighted mean."""
    per_row = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return weighted_mean(per_row, weight)


def product_log_probs(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) for p = prod_i sigmoid(logits[i]), each (N,).

    log(1 - p) follows 1 - P s(x) = (1 - s(x)) + s(x) (1 - P) factor by factor, in log space,
    so neither output nor its gradient overflows for finite logits (see the module docstring).
    """
    log_p = F.logsigmoid(logits[0])
    log_q = F.logsigmoid(-logits[0])
    for lg in logits[1:]:
        log_s = F.logsigmoid(lg)
        log_q = torch.logaddexp(F.logsigmoid(-lg), log_s + log_q)
        log_p = log_p + log_s
    return log_p, log_q


def bce_product_of_logits(logits: list[torch.Tensor], label: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of p = prod_i sigmoid(logits[i]) against (N,) labels, computed in log space."""
    log_p, log_q = product_log_probs(logits)
    zero = torch.zeros_like(log_p)
    # A term whose label weight is 0 is dropped, not multiplied: 0 * (-inf) would be NaN when a
    # probability rounds to exactly 1 or 0.
    per_row = -(torch.where(label > 0, label * log_p, zero)
                + torch.where(label < 1, (1.0 - label) * log_q, zero))
    return weighted_mean(per_row, weight)


def check_gradients(model: torch.nn.Module, step: int) -> None:
    """Raise :class:`EsmmError` naming every parameter whose gradient holds a NaN or an inf.

    Called between ``backward()`` and the optimizer step: a non-finite gradient would otherwise
    be written into the weights and surface one step later as a non-finite loss, far from its
    cause. The common case costs one sum per gradient and a single host synchronisation: a sum
    is finite when every entry is (a NaN or inf propagates); only a non-finite sum triggers the
    exact per-parameter check. Sparse gradients are checked on their stored values.
    """
    named = [(name, p.grad._values() if p.grad.is_sparse else p.grad)
             for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return
    if bool(torch.isfinite(torch.stack([g.sum() for _, g in named]).sum())):
        return
    # The sum can also overflow with finite entries; only entries that are NaN or inf count.
    bad = [name for name, g in named if not bool(torch.isfinite(g).all())]
    if bad:
        raise EsmmError(f"non-finite gradient at step {step} in parameter(s) {', '.join(bad)} "
                        "(the loss itself was finite); check the model's losses and the input "
                        "features of this batch")
