"""The composed model: embeddings -> backbone -> task towers -> head, written once.

ESMM is this model with no backbone and the ``entire_space`` head, BASE with two embedding
collections and the ``independent`` head; MMoE, PLE, ... swap the backbone. The towers are
:class:`esmm.nn.mlp.Tower` (``model.tower`` hidden widths, then one logit); a backbone that
transfers between tasks (DBMTL, AITM) acts between the towers' last hidden layer and their
logit layer.
"""

from __future__ import annotations

import torch

from esmm.config import ModelConfig, NoBackboneConfig
from esmm.errors import ConfigError
from esmm.features import FeatureSpec
from esmm.models.backbone import Backbone, backbone_info
from esmm.models.base import MultiTaskModel
from esmm.models.heads import Head
from esmm.nn.embedding import EmbeddingCollection
from esmm.nn.mlp import Tower


def tower(cfg: ModelConfig, in_dim: int) -> Tower:
    return Tower(in_dim, cfg.tower, cfg.activation, cfg.dropout, cfg.batch_norm)


class ComposedModel(MultiTaskModel):
    """Two task towers (CTR, then conversion) over a backbone over embeddings, then a head.

    Args:
        spec: the feature spec; cfg: ``model`` config (towers, activation, ...);
        sparse: embedding tables with sparse gradients;
        head: turns the towers' logits into probabilities and losses;
        backbone_cfg: one of the ``model.backbone`` configs;
        shared_embedding: both towers (through the backbone) read one embedding collection;
            False gives the conversion tower a collection of its own (no backbone then).

    ``forward``: batch -> the head's logits, each (B,).
    """

    # Attribute names of the CTR-side and conversion-side embedding collections; they are the
    # keys of saved checkpoints, so a subclass keeps the names its checkpoints were saved with.
    embedding_names = ("embedding", "cvr_embedding")

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, sparse: bool, head: Head,
                 backbone_cfg=None, shared_embedding: bool = True) -> None:
        super().__init__()
        backbone_cfg = backbone_cfg or NoBackboneConfig()
        if not shared_embedding and backbone_cfg.name != "none":
            raise ConfigError(f"model.backbone.name: {backbone_cfg.name!r} needs one embedding "
                              f"collection shared by both tasks; model {cfg.name!r} gives "
                              "each task its own, so it takes no backbone (expected 'none')")
        self.head = head
        ctr_name, cvr_name = self.embedding_names
        setattr(self, ctr_name, EmbeddingCollection(spec, sparse=sparse))
        setattr(self, cvr_name,
                None if shared_embedding else EmbeddingCollection(spec, sparse=sparse))
        d = getattr(self, ctr_name).output_dim
        self.backbone: Backbone = backbone_info(backbone_cfg.name).build(backbone_cfg, cfg, d)
        self.ctr_tower = tower(cfg, self.backbone.out_dims[0])
        self.cvr_tower = tower(cfg, self.backbone.out_dims[1])

    @property
    def monitor(self) -> str:  # type: ignore[override]
        return self.head.monitor

    @property
    def loss_names(self) -> tuple[str, ...]:
        return (*self.head.loss_names, *self.backbone.extra_loss_names(self.head))

    def embed(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The towers' embedded inputs, each (B, D)."""
        x = getattr(self, self.embedding_names[0])(batch)
        other = getattr(self, self.embedding_names[1])
        return x, (x if other is None else other(batch))

    def forward(self, batch) -> dict[str, torch.Tensor]:
        h_ctr, h_cvr = self.backbone(*self.embed(batch))
        if not self.backbone.transfers:
            return self.head.outputs(self.ctr_tower(h_ctr), self.cvr_tower(h_cvr))
        t_ctr, t_cvr = self.backbone.transfer(self.ctr_tower.hidden(h_ctr),
                                              self.cvr_tower.hidden(h_cvr))
        return self.head.outputs(self.ctr_tower.logit(t_ctr), self.cvr_tower.logit(t_cvr))

    def predict(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head.predict(out)

    def losses(self, out, batch) -> dict[str, torch.Tensor]:
        losses = self.head.losses(out, batch)
        extra = self.backbone.extra_losses(self.head.predict(out), self.head)
        return {**losses, **extra}

    def gate_weights(self, batch) -> dict[str, torch.Tensor]:
        """Every gate's mixture weights on ``batch``: name -> (B, n) (empty without gates)."""
        return self.backbone.gate_weights(self.embed(batch)[0])
