"""The embedding collection: every sparse field's rows in one table per embedding width,
shared by every tower that uses it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from esmm.features import FeatureSpec


class EmbeddingCollection(nn.Module):
    """Embeds every sparse field of a batch and concatenates the results with dense inputs.

    The fields that share an embedding width share one table, each field owning a contiguous
    block of rows (``field_rows``). A batch is then embedded with one lookup per kind of input
    (single ids, bags per pooling, each on the impression or the user side) instead of one per
    field, and the optimizer sees one sparse gradient per table: with a dozen fields this
    removes most of the per-field calls of a training step. Field ``f``'s rows are
    ``table[offset_f : offset_f + buckets_f]``; encoding hashes every id into [0, buckets_f),
    so a field reads only its own rows.

    Args:
        spec: the feature spec (field order fixes the output layout).
        sparse: tables produce sparse gradients (for SparseAdam / row-wise Adagrad), so an
            update touches only the rows a batch used.

    Output of ``forward``: (B, spec.input_dim) float32, fields in spec order then dense values.
    """

    def __init__(self, spec: FeatureSpec, sparse: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.sparse = sparse
        self.weights = nn.ParameterDict()
        # field -> (table key, first row)
        self.field_rows: dict[str, tuple[str, int]] = {}
        sizes: dict[str, int] = {}
        for f in spec.sparse:
            key = f"dim{f.dim}"
            start = sizes.get(key, 0)
            self.field_rows[f.name] = (key, start)
            sizes[key] = start + f.buckets
        self._fields = {f.name: f for f in spec.sparse}
        self._names = {key: [n for n, (k, _) in self.field_rows.items() if k == key]
                       for key in sizes}  # each table's fields, in spec order
        for key, rows in sizes.items():
            self.weights[key] = nn.Parameter(torch.empty(rows, int(key[3:])))
        self.reset_parameters()
        self.output_dim = spec.input_dim
        self.register_load_state_dict_pre_hook(_from_per_field_tables)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.01^2) weights, drawn field by field in spec order.

        The random stream is the one of one ``nn.Embedding`` per field re-initialised with
        ``normal_(std=0.01)`` (a N(0, 1) draw, then the N(0, 0.01^2) one), so a seed gives the
        same initial weights as esmm 0.1 did. The small scale keeps the towers' first layer in
        its linear range at the start.
        """
        for f in self.spec.sparse:
            block = self.field_weight(f.name)
            block.normal_()
            block.normal_(std=0.01)

    def field_weight(self, name: str) -> torch.Tensor:
        """Field ``name``'s rows of its table: (buckets, D), a view."""
        key, start = self.field_rows[name]
        return self.weights[key][start:start + self._fields[name].buckets]

    def tables(self) -> Iterator[nn.Parameter]:
        """The embedding tables (the parameters that take sparse gradients when ``sparse``)."""
        return iter(self.weights.values())

    def _lookup(self, names: list[str], ids: dict, bags: dict
                ) -> tuple[list[str], torch.Tensor]:
        """Embed fields ``names`` (all of one table, all on one input side).

        Single ids of k fields: one gather of (N, k) ids shifted to their fields' rows. Bags of
        k fields with the same pooling: one ``embedding_bag`` over the k fields' bags laid end
        to end (k * N bags; an empty bag gives zeros).

        Returns the fields in the order of the block and the block, (N, len(names), D).
        """
        w = self.weights[self.field_rows[names[0]][0]]
        order: list[str] = []
        blocks: list[torch.Tensor] = []
        singles = [n for n in names if n in ids]
        if singles:
            shift = torch.tensor([self.field_rows[n][1] for n in singles], device=w.device)
            x = torch.stack([ids[n] for n in singles], dim=1) + shift  # (N, k)
            blocks.append(F.embedding(x, w, sparse=self.sparse))  # (N, k, D)
            order += singles
        for pooling in ("sum", "mean"):
            group = [n for n in names if n in bags and self._fields[n].pooling == pooling]
            if not group:
                continue
            vals, offs, base = [], [], 0
            for n in group:
                v, o = bags[n]
                vals.append(v + self.field_rows[n][1])
                offs.append(o[:-1] + base)
                base += len(v)
            n_rows = len(bags[group[0]][1]) - 1
            offs.append(torch.tensor([base], device=w.device))
            e = F.embedding_bag(torch.cat(vals), w, torch.cat(offs), mode=pooling,
                                sparse=self.sparse, include_last_offset=True)  # (k * N, D)
            blocks.append(e.view(len(group), n_rows, -1).transpose(0, 1))  # (N, k, D)
            order += group
        return order, blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def _table(self, names: list[str], batch) -> torch.Tensor:
        """One table's fields for a batch: (B, k, D), fields in spec order.

        User-side fields are embedded once per distinct user (U rows of ``batch.user_ids`` /
        ``batch.user_bags``) and gathered to the impressions by ``batch.user_index``.
        """
        own = [n for n in names if n in batch.ids or n in batch.bags]
        user = [n for n in names if n not in batch.ids and n not in batch.bags]
        order: list[str] = []
        blocks: list[torch.Tensor] = []
        if own:
            o, e = self._lookup(own, batch.ids, batch.bags)  # (B, k_own, D)
            order += o
            blocks.append(e)
        if user:
            missing = [n for n in user if n not in batch.user_ids and n not in batch.user_bags]
            if missing:
                raise KeyError(f"batch has no input for field(s) {missing}")
            o, u = self._lookup(user, batch.user_ids, batch.user_bags)  # (U, k_user, D)
            order += o
            blocks.append(u.index_select(0, batch.user_index))  # (B, k_user, D)
        e = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)  # (B, k, D)
        if order != names:
            pos = {n: i for i, n in enumerate(order)}
            perm = torch.tensor([pos[n] for n in names], device=e.device)
            e = e.index_select(1, perm)
        return e

    def forward(self, batch) -> torch.Tensor:
        """(B, input_dim): sparse fields in spec order, then ``batch.dense``."""
        tables = [(names, self._table(names, batch)) for names in self._names.values()]
        if len(tables) == 1:
            parts = [tables[0][1].flatten(1)]  # (B, F, D) -> (B, F * D)
        else:
            # Tables of different widths interleave in spec order: one (B, D_f) per field.
            by_field = {n: e for names, t in tables for n, e in zip(names, t.unbind(1),
                                                                    strict=True)}
            parts = [by_field[f.name] for f in self.spec.sparse]
        if batch.dense is not None:
            parts.append(batch.dense)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, input_dim)


def _from_per_field_tables(module: EmbeddingCollection, state_dict, prefix, *args) -> None:
    """Load checkpoints written with one table per field (``tables.NAME.weight``)."""
    old = {f.name: f"{prefix}tables.{f.name}.weight" for f in module.spec.sparse}
    if not all(k in state_dict for k in old.values()):
        return
    for key, names in module._names.items():
        state_dict[f"{prefix}weights.{key}"] = torch.cat([state_dict.pop(old[n]) for n in names])
