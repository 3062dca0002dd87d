"""Losses in log space.

For ESMM the CTCVR probability is a product, p = sigmoid(a) * sigmoid(b). Computing it in
probability space and feeding it to BCE underflows (p -> 0 gives log(0)) and is usually
"fixed" by clamping, which hides the problem. Here:

    log p       = logsigmoid(a) + logsigmoid(b)
    log (1 - p) = log1mexp(log p)

with a stable ``log1mexp``, so the loss stays finite and exact for logits of any size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) ``values`` under (N,) non-negative ``weight`` (None = uniform).

    With all weights zero (e.g. no clicked row in a batch for a clicked-only loss) the loss is
    exactly zero with zero gradient, not NaN.
    """
    if weight is None:
        return values.mean()
    total = weight.sum()
    if float(total) == 0.0:
        return (values * weight).sum()
    return (values * weight).sum() / total


def bce_with_logits(logit: torch.Tensor, label: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logit) against (N,) 0/1 labels, weighted mean."""
    per_row = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return weighted_mean(per_row, weight)


def product_log_probs(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) for p = prod_i sigmoid(logits[i]), each (N,)."""
    log_p = F.logsigmoid(logits[0])
    for lg in logits[1:]:
        log_p = log_p + F.logsigmoid(lg)
    return log_p, log1mexp(log_p)


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
