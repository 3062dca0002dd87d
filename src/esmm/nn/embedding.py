"""The embedding collection: every sparse field's rows in one table per embedding width,
shared by every tower that uses it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esmm.features import FeatureSpec
from esmm.nn.attention import TargetAttention


class EmbeddingCollection(nn.Module):
    """Embeds every sparse field of a batch and concatenates the results with dense inputs.

    The fields that share an embedding width share one table, each field owning a contiguous
    block of rows (``field_rows``). A batch is embedded with at most two ``embedding_bag``
    calls per table (bags summed, single ids among them as bags of one; bags averaged) over
    every field and both input sides, instead of one lookup per field. Field ``f``'s rows are
    ``table[offset_f : offset_f + buckets_f]``; encoding hashes every id into [0, buckets_f),
    so a field reads only its own rows.

    In training each table gets one gradient holding every row the batch used once (sorted,
    summed over all its uses): with rows shuffled, a batch's ~2k impressions carry ~1k
    users' behaviour bags, about 0.7M ids over ~30k distinct rows (``aliccp`` preset), and a
    gradient row per use would make autograd add and the optimizer coalesce 0.7M-row sparse
    tensors every step.

    A ``pooling: attention`` bag (DIN target attention, :class:`TargetAttention`) is not
    pooled by ``embedding_bag``: its elements are embedded as single ids among the summed
    bags (so once per distinct user for user-side bags, and with the same one-row-per-use
    gradient), then each impression attends its bag with its ``query`` field's embedding.

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
        # One attention unit per `pooling: attention` field, in spec order (a list: field
        # names may hold characters a module name cannot).
        self.attended = [f.name for f in spec.sparse if f.attention is not None]
        self.attention = nn.ModuleList(
            TargetAttention(self._fields[n].dim, self._fields[n].attention.hidden,
                            self._fields[n].attention.weights, self._fields[n].attention.chunk)
            for n in self.attended)
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

    def _plan(self, names: list[str], batch) -> _Plan:
        """The inputs of one table's fields ``names`` in ``batch`` as one :class:`_Plan`.

        Impression-side inputs (B rows) come first, then user-side ones (U rows, one per
        distinct user of the batch); on each side single ids, then bags by pooling.
        """
        plan = _Plan()
        own = [n for n in names if n in batch.ids or n in batch.bags]
        user = [n for n in names if n not in batch.ids and n not in batch.bags]
        if user:
            missing = [n for n in user if n not in batch.user_ids and n not in batch.user_bags]
            if missing:
                raise KeyError(f"batch has no input for field(s) {missing}")
        for side, fields, ids, bags in (("own", own, batch.ids, batch.bags),
                                        ("user", user, batch.user_ids, batch.user_bags)):
            singles = [n for n in fields if n in ids]
            if singles:
                plan.add_singles(side, singles, [ids[n] for n in singles],
                                 [self.field_rows[n][1] for n in singles])
            for pooling in ("sum", "mean"):
                group = [n for n in fields if n in bags and self._fields[n].pooling == pooling]
                if group:
                    plan.add_bags(side, pooling, group, [bags[n] for n in group],
                                  [self.field_rows[n][1] for n in group])
            for n in fields:
                if n in bags and self._fields[n].pooling == "attention":
                    plan.add_elements(side, n, bags[n][0], self.field_rows[n][1])
        return plan

    def _table(self, names: list[str], batch) -> dict[str, torch.Tensor]:
        """One table's fields for a batch: field name -> (B, D) (a view where it can be).

        User-side fields are embedded once per distinct user (U rows of ``batch.user_ids`` /
        ``batch.user_bags``) and gathered to the impressions by ``batch.user_index``.
        """
        w = self.weights[self.field_rows[names[0]][0]]
        plan = self._plan(names, batch)
        values, sum_offsets, mean_offsets = plan.tensors(w.device)
        if torch.is_grad_enabled() and w.requires_grad:
            pooled = _PooledRows.apply(w, values, sum_offsets, mean_offsets, self.sparse)
        else:
            pooled = _pool(w, values, sum_offsets, mean_offsets)  # (n_bags, D)
        out: dict[str, torch.Tensor] = {}
        for side in ("own", "user"):
            for group, e in plan.blocks(side, pooled):  # (N, k, D)
                if side == "user":
                    e = e.index_select(0, batch.user_index)  # (U, k, D) -> (B, k, D)
                out.update(zip(group, e.unbind(1), strict=True))
        for name, (side, keys) in plan.elements(pooled).items():
            out[name] = self._attend(name, side, keys, out, batch)
        return out

    def _attend(self, name: str, side: str, keys: torch.Tensor, out: dict[str, torch.Tensor],
                batch) -> torch.Tensor:
        """Field ``name``'s bags attended per impression: (B, D).

        ``keys`` (nnz, D) are its bags' element embeddings, per impression (``own``) or per
        distinct user (``user``); ``out`` holds the (B, D) query field (same table: same dim).
        """
        unit = self.attention[self.attended.index(name)]
        query = out[self._fields[name].attention.query]  # (B, D)
        if side == "user":
            offsets, rows = batch.user_bags[name][1], batch.user_index
        else:
            offsets = batch.bags[name][1]
            rows = torch.arange(len(offsets) - 1, device=offsets.device)
        return unit(query, keys, offsets.to(keys.device), rows.to(keys.device))

    def forward(self, batch) -> torch.Tensor:
        """(B, input_dim): sparse fields in spec order, then ``batch.dense``.

        The fields' (B, D) blocks are views into the pooled rows; the one ``cat`` here is the
        only copy that lays them out in spec order.
        """
        by_field: dict[str, torch.Tensor] = {}
        for names in self._names.values():
            by_field.update(self._table(names, batch))
        parts = [by_field[f.name] for f in self.spec.sparse]
        if batch.dense is not None:
            parts.append(batch.dense)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, input_dim)


class _Plan:
    """One table's inputs of one batch, laid out for two ``embedding_bag`` calls.

    Every input is a bag of table rows (field ids shifted to their field's block), a single id
    being a bag of one. The bags pooled by sum (single ids, then ``pooling: sum`` bags) come
    first, then the bags pooled by mean; pooled, bag i is row i of a (n_sum + n_mean, D)
    block. ``pieces`` maps that block back to fields: (side, pooling, names, first bag, N,
    layout), single ids of k fields laid row-major (bag ``n * k + j`` is row n's field j),
    bags field-major (bag ``j * N + n``).
    """

    def __init__(self) -> None:
        # Per pooling: (ids, shift) parts, ids (n,) or (N, k) with shift an int or (k,).
        self.values: dict[str, list[tuple[torch.Tensor, Any]]] = {"sum": [], "mean": []}
        self.offsets: dict[str, list[torch.Tensor]] = {"sum": [], "mean": []}
        self.nnz = {"sum": 0, "mean": 0}
        self.bags = {"sum": 0, "mean": 0}
        self.pieces: list[tuple[str, str, list[str], int, int, str]] = []

    def add_singles(self, side: str, names: list[str], ids: list[torch.Tensor],
                    shifts: list[int]) -> None:
        """Single ids of fields ``names``: ``ids[j]`` (N,) bucket ids of field j."""
        x = torch.stack(ids, dim=1)  # (N, k)
        n = x.numel()
        self.pieces.append((side, "sum", names, self.bags["sum"], x.shape[0], "nk"))
        self.values["sum"].append((x, torch.tensor(shifts, dtype=x.dtype, device=x.device)))
        self.offsets["sum"].append(torch.arange(n, device=x.device) + self.nnz["sum"])
        self.nnz["sum"] += n
        self.bags["sum"] += n

    def add_bags(self, side: str, pooling: str, names: list[str],
                 bags: list[tuple[torch.Tensor, torch.Tensor]], shifts: list[int]) -> None:
        """Bags of fields ``names`` pooled by ``pooling``: ``bags[j]`` = ((nnz_j,) bucket ids,
        (N + 1,) offsets from 0) of field j."""
        n_rows = len(bags[0][1]) - 1
        self.pieces.append((side, pooling, names, self.bags[pooling], n_rows, "kn"))
        for (v, o), shift in zip(bags, shifts, strict=True):
            self.values[pooling].append((v, shift))
            self.offsets[pooling].append(o[:-1] + self.nnz[pooling])
            self.nnz[pooling] += len(v)
            self.bags[pooling] += n_rows

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nnz,) rows, sum bags then mean bags; (n_sum + 1,) and (n_mean + 1,) offsets.

        The rows are written once, each part shifted straight into its slice: a user's
        behaviour bags are most of a batch's ids, and a shifted copy then a ``cat`` would pass
        over them twice.
        """
        parts = self.values["sum"] + self.values["mean"]
        first = parts[0][0] if parts else torch.zeros(0, dtype=torch.int64)
        values = torch.empty(self.nnz["sum"] + self.nnz["mean"], dtype=torch.int64,
                             device=first.device)
        pos = 0
        for ids, shift in parts:
            n = ids.numel()
            torch.add(ids, shift, out=values[pos:pos + n].view(ids.shape))
            pos += n
        offsets = []
        for p in ("sum", "mean"):
            end = torch.tensor([self.nnz[p]], device=values.device)
            offsets.append(torch.cat([*self.offsets[p], end]).to(device))
        return values.to(device), offsets[0], offsets[1]

    def add_elements(self, side: str, name: str, values: torch.Tensor, shift: int) -> None:
        """The elements of bag field ``name`` (``values`` (nnz,) bucket ids), each embedded on
        its own as a summed bag of one, for attention."""
        n = values.numel()
        self.pieces.append((side, "sum", [name], self.bags["sum"], n, "flat"))
        self.values["sum"].append((values, shift))
        self.offsets["sum"].append(torch.arange(n, device=values.device) + self.nnz["sum"])
        self.nnz["sum"] += n
        self.bags["sum"] += n

    def elements(self, pooled: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
        """The embedded elements of the attention fields: name -> (side, (nnz, D))."""
        return {names[0]: (side, pooled[first:first + n])
                for side, _, names, first, n, layout in self.pieces if layout == "flat"}

    def blocks(self, side: str, pooled: torch.Tensor) -> list[tuple[list[str], torch.Tensor]]:
        """The pooled rows of ``side``'s fields: [(names, (N, k, D))]."""
        out = []
        for s, pooling, names, first, n, layout in self.pieces:
            if s != side or layout == "flat":
                continue
            start = first + (self.bags["sum"] if pooling == "mean" else 0)
            rows = pooled[start:start + n * len(names)]  # (N * k, D)
            if layout == "nk":
                out.append((names, rows.view(n, len(names), -1)))
            else:
                out.append((names, rows.view(len(names), n, -1).transpose(0, 1)))
        return out


def _pool(weight: torch.Tensor, values: torch.Tensor, sum_offsets: torch.Tensor,
          mean_offsets: torch.Tensor) -> torch.Tensor:
    """Pooled rows of ``weight`` (rows, D): (n_sum + n_mean, D), the sum bags then the mean
    bags (an empty bag pools to zeros)."""
    split = int(sum_offsets[-1])
    parts = []
    for mode, vals, offs in (("sum", values[:split], sum_offsets),
                             ("mean", values[split:], mean_offsets)):
        if len(offs) > 1:
            parts.append(F.embedding_bag(vals, weight, offs, mode=mode,
                                         include_last_offset=True))
    if not parts:
        return weight.new_zeros(0, weight.shape[1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_gradient(grad: torch.Tensor, values: torch.Tensor, sum_offsets: torch.Tensor,
                  mean_offsets: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of :func:`_pool` with respect to ``weight``, on the rows it used.

    Args:
        grad: (n_sum + n_mean, D) gradient of the pooled rows.
        n_rows: rows of the table (the bound of ``values``).
    Returns:
        rows (R,) sorted distinct rows of ``values`` and their summed gradients (R, D).

    A row used by many bags (a popular item, ids shared by the behaviour bags of many
    users) gets one gradient row, not one per use: the uses are grouped by one stable sort
    of ``values`` and each group is summed by a single ``embedding_bag`` over ``grad`` (the
    transpose of the forward pooling), with weight 1 / bag length for mean bags.
    """
    n_sum = len(sum_offsets) - 1
    lengths = torch.cat([sum_offsets.diff(), mean_offsets.diff()])  # (n_bags,)
    nnz = len(values)
    if nnz == 0:
        return values, grad.new_zeros(0, grad.shape[1])
    bag_of = torch.repeat_interleave(torch.arange(len(lengths), device=values.device),
                                     lengths, output_size=nnz)  # (nnz,) bag of each use
    # 32-bit keys sort about twice as fast as 64-bit ones (fewer radix passes and bytes).
    keys = values.to(torch.int32) if n_rows < 2**31 else values
    sorted_rows, perm = torch.sort(keys, stable=True)
    first = torch.ones(nnz, dtype=torch.bool, device=values.device)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=first[1:])
    starts = first.nonzero().squeeze(1)  # (R,) first use of each distinct row
    rows = sorted_rows.index_select(0, starts).to(torch.int64)
    offsets = torch.cat([starts, starts.new_tensor([nnz])])
    src = bag_of.index_select(0, perm)  # (nnz,) bags in row order
    weights = None
    if len(mean_offsets) > 1:
        # An empty mean bag gets weight inf, which no use ever reads (it has no uses).
        scale = lengths.to(grad.dtype).reciprocal()
        scale[:n_sum] = 1.0
        weights = scale.index_select(0, src)
    g = F.embedding_bag(src, grad, offsets, mode="sum", per_sample_weights=weights,
                        include_last_offset=True)  # (R, D)
    return rows, g


class _PooledRows(torch.autograd.Function):
    """:func:`_pool` whose weight gradient holds each used row once.

    Forward reads the rows straight from the table (a repeated row is a cache hit). Backward
    returns a coalesced sparse gradient (R distinct rows, D) when ``sparse``, so neither
    autograd nor the optimizer has to add or coalesce one gradient row per use; else the
    dense (rows, D) gradient.
    """

    @staticmethod
    def forward(ctx, weight, values, sum_offsets, mean_offsets, sparse):  # noqa: D102
        ctx.save_for_backward(values, sum_offsets, mean_offsets)
        ctx.shape = weight.shape
        ctx.sparse = sparse
        return _pool(weight, values, sum_offsets, mean_offsets)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        values, sum_offsets, mean_offsets = ctx.saved_tensors
        rows, g = _row_gradient(grad.contiguous(), values, sum_offsets, mean_offsets,
                                ctx.shape[0])
        if ctx.sparse:
            # The rows are sorted and distinct by construction: the invariant check would only
            # repeat that at O(R) per step.
            gw = torch.sparse_coo_tensor(rows.unsqueeze(0), g, ctx.shape, is_coalesced=True,
                                         check_invariants=False)
        else:
            gw = g.new_zeros(ctx.shape).index_copy_(0, rows, g)
        return gw, None, None, None, None


def _from_per_field_tables(module: EmbeddingCollection, state_dict, prefix, *args) -> None:
    """Load checkpoints written with one table per field (``tables.NAME.weight``)."""
    old = {f.name: f"{prefix}tables.{f.name}.weight" for f in module.spec.sparse}
    if not all(k in state_dict for k in old.values()):
        return
    for key, names in module._names.items():
        state_dict[f"{prefix}weights.{key}"] = torch.cat([state_dict.pop(old[n]) for n in names])
