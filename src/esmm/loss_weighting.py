"""Task-loss weighting: how the named losses of a model become the one loss training minimises.

``train.loss_weights`` fixes a weight per named loss (``{loss_ctcvr: 2.0}``; unnamed losses
weigh 1). ``train.loss_weighting.name`` then chooses how weights change during training:

    fixed        total = sum_k c_k L_k
    uncertainty  total = sum_k c_k (exp(-s_k) L_k + s_k / 2), s_k = log sigma_k^2 learned with
                 the model (Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to
                 Weigh Losses for Scene Geometry and Semantics", CVPR 2018); the weight of
                 task k is exp(-s_k), and the s_k / 2 term keeps sigma_k from growing without
                 bound.
    dwa          Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning
                 with Attention", CVPR 2019): w_k = K softmax_k(r_k / T), r_k the ratio of task
                 k's mean loss over the last window of ``window`` steps to its mean over the
                 window before; w_k = 1 until two windows are complete. Tasks whose loss falls
                 slowly get more weight. total = sum_k c_k w_k L_k.

The weighting is a submodule of the model (``model.loss_weighting``), so its parameters are
trained by the dense optimizer and its state is saved and resumed with the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from esmm.config import TrainConfig
from esmm.errors import ConfigError

log = logging.getLogger(__name__)


class LossWeighting(nn.Module):
    """Fixed weights. ``forward``: name -> scalar loss -> the scalar total.

    Args:
        names: the model's loss names, in order; fixed: weight per name (missing: 1).
    """

    def __init__(self, names: Sequence[str], fixed: dict[str, float] | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        self.fixed = {n: float((fixed or {}).get(n, 1.0)) for n in self.names}

    def dynamic(self) -> torch.Tensor | None:
        """(K,) weights of the scheme on top of the fixed ones; None: all ones."""
        return None

    def weights(self) -> dict[str, float]:
        """The weight each named loss gets now (fixed times dynamic), for logging."""
        dyn = self.dynamic()
        return {n: self.fixed[n] * (1.0 if dyn is None else float(dyn[i]))
                for i, n in enumerate(self.names)}

    def _check(self, losses: dict[str, torch.Tensor]) -> None:
        if tuple(losses) != self.names:
            raise ConfigError(f"loss weighting was built for losses {list(self.names)}, "
                              f"the model returned {list(losses)}")

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check(losses)
        if all(c == 1.0 for c in self.fixed.values()):
            return sum(losses.values())
        return sum(self.fixed[n] * losses[n] for n in self.names)


class UncertaintyWeighting(LossWeighting):
    """Learned log-variances ``log_var`` (K,), initialised to 0 (every weight 1)."""

    def __init__(self, names: Sequence[str], fixed: dict[str, float] | None = None) -> None:
        super().__init__(names, fixed)
        self.log_var = nn.Parameter(torch.zeros(len(self.names)))

    def dynamic(self) -> torch.Tensor:
        return torch.exp(-self.log_var.detach())

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check(losses)
        terms = [self.fixed[n] * (torch.exp(-self.log_var[i]) * losses[n]
                                  + 0.5 * self.log_var[i])
                 for i, n in enumerate(self.names)]
        return sum(terms)


class DynamicWeightAverage(LossWeighting):
    """DWA over windows of ``window`` training steps at temperature ``temperature``.

    Buffers (saved with the checkpoint): ``current`` (K,) weights, ``history`` (2, K) mean
    losses of the last two complete windows, ``running`` (K,) loss sums of the open window,
    ``seen`` steps in it and ``complete`` windows so far.
    """

    def __init__(self, names: Sequence[str], fixed: dict[str, float] | None = None,
                 window: int = 100, temperature: float = 2.0) -> None:
        super().__init__(names, fixed)
        k = len(self.names)
        self.window = window
        self.temperature = temperature
        self.register_buffer("current", torch.ones(k))
        self.register_buffer("history", torch.ones(2, k))
        self.register_buffer("running", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("complete", torch.zeros((), dtype=torch.int64))

    def dynamic(self) -> torch.Tensor:
        return self.current

    def _observe(self, values: torch.Tensor) -> None:
        """Add one step's (K,) losses; at the end of a window update the weights."""
        self.running += values.detach().to(self.running)
        self.seen += 1
        if int(self.seen) < self.window:
            return
        mean = (self.running / self.window).to(self.history)
        self.history = torch.stack([self.history[1], mean])
        self.running.zero_()
        self.seen.zero_()
        self.complete += 1
        if int(self.complete) >= 2:
            # A zero mean loss (e.g. a clicked-only loss on a window without clicks) would
            # divide by zero: such a task keeps ratio 1.
            prev = self.history[0]
            ratio = torch.where(prev > 0, self.history[1] / prev.clamp_min(1e-12),
                                torch.ones_like(prev))
            self.current = len(self.names) * torch.softmax(ratio / self.temperature, dim=0)
            log.debug("dwa weights %s", self.weights())

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check(losses)
        w = self.current.clone()
        if self.training:
            self._observe(torch.stack([losses[n] for n in self.names]))
        return sum(self.fixed[n] * w[i] * losses[n] for i, n in enumerate(self.names))


def build_loss_weighting(tc: TrainConfig, names: Sequence[str]) -> LossWeighting:
    """The weighting ``train.loss_weights`` and ``train.loss_weighting`` ask for, over the
    model's loss ``names``; a weight for a loss the model does not have is a ConfigError."""
    unknown = sorted(set(tc.loss_weights) - set(names))
    if unknown:
        raise ConfigError(f"train.loss_weights: {unknown} is not a loss of this model; "
                          f"expected some of {list(names)}")
    lw = tc.loss_weighting
    if lw.name == "uncertainty":
        return UncertaintyWeighting(names, tc.loss_weights)
    if lw.name == "dwa":
        return DynamicWeightAverage(names, tc.loss_weights, lw.window, lw.temperature)
    return LossWeighting(names, tc.loss_weights)
