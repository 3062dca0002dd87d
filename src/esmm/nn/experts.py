"""Building blocks of the mixture-of-experts backbones: MLP stacks, expert groups, gates."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Hidden layers only (no logit): Linear, [BatchNorm], activation, [Dropout] per width.

    ``forward``: (B, in_dim) -> (B, widths[-1]); with no widths it is the identity.
    """

    def __init__(self, in_dim: int, widths: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in widths:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_ACT[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ExpertGroup(nn.Module):
    """``n`` expert MLPs over the same input, computed together.

    Layer l of every expert is one (n, d_in, d_out) weight: the first layer is a single
    (B, in) x (in, n * d) product (every expert reads the same input), later layers one batched
    product over the experts, instead of n small products per layer. Initialised as
    ``nn.Linear`` (uniform in +-1/sqrt(d_in)); BatchNorm and dropout act per expert and unit.

    ``forward``: (B, in_dim) -> (B, n, out_dim), experts stacked on dim 1.
    """

    def __init__(self, n: int, in_dim: int, widths: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        d = in_dim
        for h in widths:
            bound = 1.0 / math.sqrt(d)
            self.weights.append(nn.Parameter(torch.empty(n, d, h).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, h).uniform_(-bound, bound)))
            self.norms.append(nn.BatchNorm1d(n * h) if batch_norm else nn.Identity())
            d = h
        # In place, as in the towers: neither the products nor BatchNorm need their output
        # for their backward, so ReLU saves a (B, n * d) buffer and a pass per layer.
        self.act = nn.ReLU(inplace=True) if activation == "relu" else _ACT[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = d
        self.register_load_state_dict_pre_hook(_from_per_expert_mlps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = x
        for i, (w, bias, norm) in enumerate(zip(self.weights, self.biases, self.norms,
                                                strict=True)):
            if i == 0:  # (B, in) @ (in, n * d): one product for every expert
                w0 = w.permute(1, 0, 2).reshape(w.shape[1], -1)
                h = torch.addmm(bias.reshape(-1), h, w0)  # (B, n * d)
            else:  # (n, B, d_in) @ (n, d_in, d_out)
                h = torch.baddbmm(bias.unsqueeze(1), h.view(b, self.n, -1).transpose(0, 1), w)
                h = h.transpose(0, 1).reshape(b, -1)  # (B, n * d_out)
            h = self.drop(self.act(norm(h)))
        return h.view(b, self.n, -1)


class SoftmaxGate(nn.Module):
    """A linear map of the gate input to ``n`` mixture weights, softmax-normalised.

    ``forward``: (B, in_dim) -> (B, n) weights, each row summing to 1.
    """

    def __init__(self, in_dim: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x), dim=-1)


def mix(experts: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor
        ) -> torch.Tensor:
    """Weighted sum of expert outputs: (B, n, H) and (B, n) -> (B, H).

    ``experts`` may also be groups (B, n_1, H), (B, n_2, H), ... with n_1 + n_2 + ... = n,
    weighted in that order, so that PLE mixes a task's own and the shared experts without
    concatenating them. A broadcast product and a sum over the experts: with n of a few and
    B in the thousands, ``bmm`` of B (1, n) x (n, H) products is several times slower,
    backward included.
    """
    if isinstance(experts, torch.Tensor):
        return (weights.unsqueeze(-1) * experts).sum(1)
    out = None
    start = 0
    for group in experts:
        n = group.shape[1]
        part = (weights[:, start:start + n].unsqueeze(-1) * group).sum(1)
        out = part if out is None else out + part
        start += n
    return out


_PER_EXPERT = re.compile(r"experts\.(\d+)\.net\.(\d+)\.(\w+)$")


def _from_per_expert_mlps(module: ExpertGroup, state_dict, prefix, *args) -> None:
    """Load checkpoints written with one MLP per expert (``experts.I.net.J.NAME``).

    Expert i's layer l was an ``nn.Linear`` (weight (d_out, d_in)), then optionally a
    ``BatchNorm1d(d_out)``, at increasing ``J``; here layer l is row i of ``weights[l]``
    (d_in, d_out) and ``biases[l]``, and units ``i * d_out`` to ``(i + 1) * d_out`` of
    ``norms[l]``. The old keys are replaced in ``state_dict`` before loading.
    """
    old: dict[int, dict[int, dict[str, str]]] = {}  # expert -> J -> name -> key
    for key in state_dict:
        m = _PER_EXPERT.match(key[len(prefix):]) if key.startswith(prefix) else None
        if m:
            old.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = key
    if not old:
        return
    per_expert = [_layers_of(old[i], state_dict) for i in sorted(old)]
    n_layers = len(module.weights)
    if sorted(old) != list(range(module.n)) or any(len(x) != n_layers for x in per_expert):
        return  # another shape of model: load_state_dict names the first key that does not fit
    for names in (names for keys in old.values() for names in keys.values()):
        for key in names.values():
            del state_dict[key]
    for layer in range(n_layers):
        linears = [layers[layer][0] for layers in per_expert]
        state_dict[f"{prefix}weights.{layer}"] = torch.stack([w.t() for w, _ in linears])
        state_dict[f"{prefix}biases.{layer}"] = torch.stack([b for _, b in linears])
        norms = [layers[layer][1] for layers in per_expert]
        if all(norms):
            for name in ("weight", "bias", "running_mean", "running_var"):
                state_dict[f"{prefix}norms.{layer}.{name}"] = torch.cat([s[name] for s in norms])
            state_dict[f"{prefix}norms.{layer}.num_batches_tracked"] = (
                norms[0]["num_batches_tracked"])


def _layers_of(modules: dict[int, dict[str, str]], state_dict
               ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]:
    """One expert's old modules (J -> name -> key) as layers: ((W, b), BatchNorm state or {})."""
    layers: list = []
    for j in sorted(modules):
        names = modules[j]
        tensors = {name: state_dict[key] for name, key in names.items()}
        if "running_mean" in tensors:  # the BatchNorm after the layer's Linear
            if layers:
                layers[-1] = (layers[-1][0], tensors)
        elif "weight" in tensors and "bias" in tensors:
            layers.append(((tensors["weight"], tensors["bias"]), {}))
    return layers
