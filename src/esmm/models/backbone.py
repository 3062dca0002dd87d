"""Backbones: the embedded input in, one representation per task out.

A backbone sits between the embeddings and the two task towers (CTR first, conversion
second). ``forward`` maps the towers' inputs; ``transfer`` (DBMTL, AITM) may then pass
information from the CTR tower's last hidden layer to the conversion tower's before the
logit layers. ``extra_losses`` adds a backbone's own loss terms (AITM's calibrator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from esmm.config import ModelConfig


class Backbone(nn.Module):
    """Base class; the identity (``none``): each tower reads its own embedded input.

    Attributes:
        out_dims: widths of the two task representations (CTR, conversion).
        transfers: whether ``transfer`` does anything (so the plain path skips it).
    """

    transfers = False

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dims = (in_dim, in_dim)

    def forward(self, x_ctr: torch.Tensor, x_cvr: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) inputs of the two towers -> (B, out_dims[k]) representations."""
        return x_ctr, x_cvr

    def gate_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mixture weights of every gate for input (B, D): name -> (B, n) (none here)."""
        return {}

    def transfer(self, t_ctr: torch.Tensor, t_cvr: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Towers' last hidden outputs (B, H) each -> the logit layers' inputs (B, H) each."""
        return t_ctr, t_cvr

    def extra_loss_names(self, head) -> tuple[str, ...]:
        """Names of the terms ``extra_losses`` returns under ``head``."""
        return ()

    def extra_losses(self, probs: dict[str, torch.Tensor], head) -> dict[str, torch.Tensor]:
        """Loss terms of the backbone itself, from the head's probabilities."""
        return {}


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone kind: how to build it and how reports name it."""

    name: str
    display: str
    citation: str
    summary: str
    build: Callable[..., Backbone]


_BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, display: str, citation: str, summary: str):
    """Register ``build(backbone_cfg, model_cfg, in_dim) -> Backbone`` under ``name``."""
    def deco(build):
        _BACKBONES[name] = BackboneInfo(name, display, citation, summary, build)
        return build
    return deco


def backbone_info(name: str) -> BackboneInfo:
    return _BACKBONES[name]


def backbone_names() -> list[str]:
    return list(_BACKBONES)


@register_backbone("none", "none", "", "each tower reads the embeddings directly")
def _none(bcfg, cfg: ModelConfig, in_dim: int) -> Backbone:
    return Backbone(in_dim)
