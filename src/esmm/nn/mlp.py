"""MLP towers, with their matrix products through oneDNN on the CPU.

PyTorch runs a float32 ``nn.Linear`` on the CPU through MKL's sgemm. On the AMD EPYC machines
this project is measured on, MKL takes a generic code path and a tower's products run at
about a third of the speed of oneDNN's (``torch.ops.mkldnn._linear_pointwise``), which
dispatches on the CPU's instruction set rather than its vendor: `python bench/linear.py`
measures both. :class:`Linear` routes its products through oneDNN where that op exists
(forward and backward), and :class:`Tower` evaluates with each batch norm folded into the
linear layer before it and each ReLU fused into the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _onednn_linear_op():
    """``mkldnn::_linear_pointwise`` (X (M, K), W (N, K), bias (N,) or None, post-op name,
    post-op scalars, algorithm) -> (M, N), or None when this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


_LINEAR = _onednn_linear_op()


def onednn_applies(x: torch.Tensor) -> bool:
    """Whether a product on ``x`` can go through oneDNN: a float32 CPU tensor, outside
    autocast (which picks its own precision) and tracing (TorchScript and ONNX export trace
    the model and must record the portable ``linear`` op)."""
    return (_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           relu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU when ``relu``), with autograd.

    Args:
        x: (B, K); weight: (N, K); bias: (N,) or None.
    Returns:
        (B, N). Through oneDNN when :func:`onednn_applies`, the ReLU fused into the product
        when no gradient is needed; else ``F.linear``.
    """
    if x.dim() != 2 or not onednn_applies(x):
        y = F.linear(x, weight, bias)
        return F.relu(y) if relu else y
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return _LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    y = _OneDnnLinear.apply(x, weight, bias)
    return F.relu(y) if relu else y


class _OneDnnLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with every product of forward and backward through oneDNN.

    Backward: grad_x (B, K) = grad (B, N) @ weight (N, K), a product against weight's
    transpose (a (K, N) copy, small); grad_weight (N, K) = grad.T @ x, read from the
    transposed views without copying the (B, *) blocks; grad_bias = grad summed over B.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _LINEAR(grad, weight.t().contiguous(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            gw = _LINEAR(grad.t(), x.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose products run through oneDNN on
    the CPU (see the module docstring); elsewhere it is ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Tower(nn.Module):
    """Hidden layers then one logit.

    Args:
        in_dim: input width; hidden: widths of the hidden layers (e.g. [360, 200, 80]);
        activation: relu | gelu | tanh; dropout: after each hidden layer; batch_norm: before
        each activation.

    ``forward``: (B, in_dim) -> (B,) logits. In eval mode without autograd (evaluation,
    prediction, serving) each batch norm is folded into the linear layer before it and each
    ReLU fused into that layer's product, one pass over a layer's output instead of three;
    the logits equal the layer-by-layer ones to float32 rounding.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            # In place: neither BatchNorm nor Linear needs its output for its backward, so
            # ReLU can overwrite it and save a (B, h) buffer and a pass over it per layer.
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else _ACT[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(Linear(d, 1))
        self.net = nn.Sequential(*layers)

    @property
    def hidden_dim(self) -> int:
        """Width of the last hidden layer (the input of the logit layer)."""
        return self.net[-1].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folds(x):
            return self._folded(x, len(self.net)).squeeze(-1)
        return self.net(x).squeeze(-1)  # (B, 1) -> (B,)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, hidden_dim): every layer but the logit layer."""
        if self._folds(x):
            return self._folded(x, len(self.net) - 1)
        for layer in self.net[:-1]:
            x = layer(x)
        return x

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """(B, hidden_dim) -> (B,): the logit layer alone; ``logit(hidden(x)) == forward(x)``."""
        return self.net[-1](h).squeeze(-1)

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether :meth:`_folded` applies: eval mode, no autograd, batch norms (if any)
        normalising by their running statistics."""
        if self.training or torch.is_grad_enabled() or not onednn_applies(x):
            return False
        return all(m.running_mean is not None for m in self.net
                   if isinstance(m, nn.BatchNorm1d))

    def _folded(self, x: torch.Tensor, end: int) -> torch.Tensor:
        """``self.net[:end](x)`` in eval mode, (B, in_dim) -> (B, width of layer end - 1).

        A batch norm in eval mode is ``(z - mean) * s + beta`` with ``s = gamma /
        sqrt(var + eps)``, affine in the linear layer's output ``z = x W^T + b``; folded, the
        layer is ``x (s * W)^T + ((b - mean) * s + beta)``: (N, K) and (N,) products, nothing
        per row. Dropout is the identity in eval mode.
        """
        layers = list(self.net[:end])
        i = 0
        while i < len(layers):
            layer = layers[i]
            if not isinstance(layer, nn.Linear):
                if not isinstance(layer, nn.Dropout):
                    x = layer(x)
                i += 1
                continue
            w, b = layer.weight, layer.bias
            i += 1
            if i < len(layers) and isinstance(layers[i], nn.BatchNorm1d):
                w, b = _fold_batch_norm(w, b, layers[i])
                i += 1
            relu = i < len(layers) and isinstance(layers[i], nn.ReLU)
            x = linear(x, w, b, relu=relu)
            i += relu
        return x


def _fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, K) weight and (N,) bias of a linear layer followed by ``bn`` in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)  # (N,)
    if bn.weight is not None:
        scale = scale * bn.weight
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    shift = (b - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.unsqueeze(1), shift
