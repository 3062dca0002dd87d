"""The embedding collection: one table per sparse field, shared by every tower that uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esmm.features import FeatureSpec


class EmbeddingCollection(nn.Module):
    """Embeds every sparse field of a batch and concatenates the results with dense inputs.

    Args:
        spec: the feature spec (field order fixes the output layout).
        sparse: tables produce sparse gradients (for SparseAdam / row-wise Adagrad), so an
            update touches only the rows a batch used.

    Output of ``forward``: (B, spec.input_dim) float32, fields in spec order then dense values.
    """

    def __init__(self, spec: FeatureSpec, sparse: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.tables = nn.ModuleDict()
        for f in spec.sparse:
            emb = nn.Embedding(f.buckets, f.dim, sparse=sparse)
            # Small init keeps the towers' first layer in its linear range at the start.
            nn.init.normal_(emb.weight, std=0.01)
            self.tables[f.name] = emb
        self.output_dim = spec.input_dim

    def _embed(self, name: str, pooling: str, ids: dict, bags: dict) -> torch.Tensor | None:
        w = self.tables[name].weight
        if name in ids:
            return F.embedding(ids[name], w, sparse=self.tables[name].sparse)  # (N, D)
        if name in bags:
            vals, offs = bags[name]
            return F.embedding_bag(vals, w, offs, mode=pooling, sparse=self.tables[name].sparse,
                                   include_last_offset=True)  # (N, D); empty bag -> zeros
        return None

    def forward(self, batch) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for f in self.spec.sparse:
            e = self._embed(f.name, f.pooling, batch.ids, batch.bags)
            if e is None:
                # User-side field: embedded once per distinct user, then gathered.
                u = self._embed(f.name, f.pooling, batch.user_ids, batch.user_bags)  # (U, D)
                if u is None:
                    raise KeyError(f"batch has no input for field {f.name!r}")
                e = u.index_select(0, batch.user_index)  # (B, D)
            parts.append(e)
        if batch.dense is not None:
            parts.append(batch.dense)
        return torch.cat(parts, dim=1)  # (B, input_dim)
