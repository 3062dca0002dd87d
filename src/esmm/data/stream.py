"""Streaming a Parquet split: bounded memory whatever the number of rows.

A :class:`ParquetStream` reads the impressions of a split in chunks of ``data.chunk_rows``
rows, row group by row group, and encodes each chunk on its own; the users table of a
normalized split (one row per user) is encoded once and kept. Training shuffles in two
levels, both fixed by (seed, epoch): the order of the row groups, then the rows within a
buffer of ``data.shuffle_buffer`` rows. Memory is then bounded by the buffer, a chunk and the
batches read ahead, not by the number of impressions. Unshuffled (evaluation, prediction) a
stream yields exactly the rows and batches of the in-memory split, in file order.

Before the first epoch, as the in-memory loader does, the split is validated: every file must
hold every column the split reads (schemas only), and the label and dense columns, and the id
columns whose type can hold a bad value (floats, unsigned, strings), are read once, to validate
them and to count the rows an epoch holds after dropping conversions without clicks. Integer id
columns cannot hold a bad id and are not read twice. An error names the file and its row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmm.config import DataConfig
from esmm.data.batches import Batch, make_batch, shuffled_order
from esmm.data.tables import (
    GROUND_TRUTH_COLUMNS,
    EncodedData,
    RawTables,
    UserSide,
    _id_family,
    _labels_array,
    _parquet_files,
    _parquet_schema,
    _read_parquet,
    _schema_names,
    check_schemas,
    encode,
    encode_users,
    file_format,
    load_split,
    needed_columns,
    normalized_parts,
)
from esmm.errors import ConfigError, DataError
from esmm.features import (
    FeatureSpec,
    Rows,
    canonical_bags,
    canonical_ids,
    encode_dense,
    integer_like,
    mixed_error,
    take_ragged,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Unit:
    """One row group of one file: the unit of reading and of the first shuffle level."""

    file: Path
    row_group: int
    kept: int  # rows left after dropping conversions without clicks
    first_row: int  # position of the row group's first row in its file
    first_kept: int  # position of its first kept row in the split


class ParquetStream:
    """A Parquet split read chunk by chunk (see the module docstring).

    Attributes:
        n: impressions in the split after dropping conversions without clicks.
        rows_read, dropped_conversion_without_click: as on :class:`EncodedData`.
        max_buffer_rows: the most rows held in the shuffle buffer at once during the latest
            call of :meth:`batches`.
    """

    def __init__(self, path: str | Path, spec: FeatureSpec, cfg: DataConfig,
                 require_labels: bool = True, columns: Sequence[str] | None = None,
                 keep: Sequence[str] = ()) -> None:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        self.source = str(p)
        self.spec, self.cfg, self.require_labels = spec, cfg, require_labels
        imp_path, users_path = normalized_parts(p)
        if imp_path is None:
            imp_path, users_path = p, None
        files = _parquet_files(imp_path)
        if not files:
            raise DataError(f"{imp_path}: no Parquet files found")
        self.keep = tuple(keep)
        if self.keep and require_labels:
            raise ValueError("keep needs require_labels=False: kept columns follow every row")
        want = list(dict.fromkeys([*needed_columns(spec, cfg), *(columns or ()), *self.keep]))
        # Every file must hold every column the split reads, checked before any row is.
        schemas = [(str(f), _parquet_schema(f)) for f in files]
        check_schemas(schemas, want, spec)
        self.impression_columns = tuple(dict.fromkeys(c for _, s in schemas for c in s.names))
        missing = [k for k in self.keep if k not in self.impression_columns]
        if missing:
            raise DataError(f"{p}: no column {missing[0]!r} among the impressions' columns "
                            f"{list(self.impression_columns)[:40]}")
        self.available = self.impression_columns + (
            tuple(_schema_names(users_path)) if users_path else ())
        self.users: UserSide | None = None
        if users_path is not None:
            users, user_rows = _read_parquet(users_path, want, spec)
            self.users = encode_users(users, self.impression_columns, spec, cfg, self.source,
                                      user_rows)
            del users
        self.units: list[_Unit] = []
        self.rows_read = self.dropped_conversion_without_click = 0
        self.kept_conversion_without_click = 0
        self._columns = want
        self.n = self._scan(files)
        if self.rows_read == 0:
            raise DataError(f"{self.source}: the table has no rows")
        if self.n == 0:
            raise DataError(f"{self.source}: no rows left after dropping conversions without "
                            "clicks")
        if self.dropped_conversion_without_click:
            log.warning("%s: dropped %d row(s) with conversion=1 and click=0 "
                        "(data.conversion_without_click=drop)", self.source,
                        self.dropped_conversion_without_click)
        if self.kept_conversion_without_click:
            log.warning("%s: kept %d row(s) with conversion=1 and click=0; they count as CTCVR "
                        "negatives", self.source, self.kept_conversion_without_click)
        self.max_buffer_rows = 0
        # Fail on a bad feature column now, not an epoch into training.
        next(self.chunks(units=self.units[:1]), None)

    def _scan(self, files: Sequence[Path]) -> int:
        """Read the labels and dense columns of every row group once: validate them, count the
        rows an epoch keeps, and list the units. Returns the kept rows."""
        kept_total = 0
        dense = [f for f in self.spec.dense if f.name in self.impression_columns]
        schema = pq.read_schema(files[0])
        strings = _StringIds(self.spec, schema)
        ids = [f for f in self.spec.sparse if f.name in schema.names
               and (f.numeric or not _signed_ints(schema.field(f.name).type))]
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{f}: cannot read as Parquet: {e}") from None
            first_row = 0
            for rg in range(pf.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                if rows == 0:
                    continue
                kept = rows
                if self.require_labels:
                    kept = rows - self._count_dropped(pf, f, rg, first_row)
                if dense or ids:
                    t = pf.read_row_group(rg, columns=[g.name for g in dense + ids])
                    rows_here = Rows(((str(f), 0, first_row),))
                    for d in dense:
                        encode_dense(t.column(d.name), d, rows_here)
                    for g in ids:
                        check = canonical_bags if g.kind == "multi_categorical" else \
                            canonical_ids
                        check(t.column(g.name), g, rows_here)
                    strings.check(t, rows_here)
                self.units.append(_Unit(f, rg, kept, first_row, kept_total))
                first_row += rows
                kept_total += kept
                self.rows_read += rows
        return kept_total

    def _count_dropped(self, pf: pq.ParquetFile, f: Path, rg: int, first_row: int) -> int:
        labels = self.cfg.labels
        cols = [c for c in (labels.click, labels.conversion) if c in pf.schema_arrow.names]
        t = pf.read_row_group(rg, columns=cols)
        src = str(f)
        click = _labels_array(t, labels.click, src, "click", first_row)
        conv = _labels_array(t, labels.conversion, src, "conversion", first_row)
        bad = (conv == 1) & (click == 0)
        n_bad = int(bad.sum())
        if not n_bad:
            return 0
        policy = self.cfg.conversion_without_click
        if policy == "error":
            first = first_row + int(np.flatnonzero(bad)[0])
            raise DataError(f"{f}: row {first} has conversion=1 with click=0; set "
                            "`data.conversion_without_click: drop` (or keep) to go on")
        if policy == "keep":
            self.kept_conversion_without_click += n_bad
            return 0
        self.dropped_conversion_without_click += n_bad
        return n_bad

    def chunks(self, units: Sequence[_Unit] | None = None) -> Iterator[EncodedData]:
        """Encoded chunks of at most ``data.chunk_rows`` rows, unit by unit, in file order
        within a unit. ``row_ids`` hold each row's position in the split, ``extra`` the raw
        values of the ``keep`` columns."""
        for u in self.units if units is None else units:
            pf = pq.ParquetFile(u.file)
            names = pf.schema_arrow.names
            cols = [c for c in self._columns if c in names]
            row = u.first_row
            kept = u.first_kept
            for rb in pf.iter_batches(batch_size=self.cfg.chunk_rows, row_groups=[u.row_group],
                                      columns=cols):
                raw = RawTables(f"{u.file}", pa.Table.from_batches([rb]),
                                available=self.available, rows=Rows(((str(u.file), 0, row),)))
                chunk = encode(raw, self.spec, self.cfg, self.require_labels, users=self.users,
                               quiet=True)
                chunk.row_ids = np.arange(kept, kept + chunk.n, dtype=np.int64)
                chunk.extra = {k: rb.column(k) for k in self.keep}
                row += rb.num_rows
                kept += chunk.n
                if chunk.n:
                    yield chunk

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start_batch: int = 0, block: int = 1, extras: bool = False) -> Iterator[Batch]:
        """The batches of one epoch, starting at batch ``start_batch`` (for resuming), with
        group ids and ground truth when ``extras``.

        Unshuffled: consecutive rows in file order, as :func:`iter_batches` of the in-memory
        split gives. Shuffled: row groups in an order drawn from (seed, epoch), then rows
        shuffled within buffers of ``data.shuffle_buffer`` rows (in blocks of ``block``).
        Every kept row appears exactly once per epoch; every batch but the last is full.
        """
        rng = np.random.default_rng([seed, epoch, 1])
        units = self.units
        if shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        buffer_rows = max(self.cfg.shuffle_buffer, batch_size) if shuffle else batch_size
        pending: list[EncodedData] = []
        n_pending = 0
        index = 0
        self.max_buffer_rows = 0
        for chunk in self.chunks(units):
            pending.append(chunk)
            n_pending += chunk.n
            if n_pending < buffer_rows:
                continue
            data = concat_encoded(pending)
            self.max_buffer_rows = max(self.max_buffer_rows, data.n)
            order = shuffled_order(rng, data.n, block) if shuffle else np.arange(data.n)
            full = data.n // batch_size * batch_size
            for s in range(0, full, batch_size):
                if index >= start_batch:
                    yield make_batch(data, order[s:s + batch_size], extras)
                index += 1
            rest = order[full:]
            pending = [take_encoded(data, np.sort(rest))] if len(rest) else []
            n_pending = len(rest)
        if n_pending:
            data = concat_encoded(pending)
            order = shuffled_order(rng, data.n, block) if shuffle else np.arange(data.n)
            for s in range(0, data.n, batch_size):
                if index >= start_batch:
                    yield make_batch(data, order[s:s + batch_size], extras)
                index += 1


    def rank_units(self, rank: int, world: int, seed: int, epoch: int
                   ) -> tuple[list[_Unit], np.ndarray]:
        """Rank ``rank``'s row groups for one epoch, and the (world,) rows of every rank.

        The row groups are permuted by (seed, epoch); each in turn goes to the rank holding
        the fewest rows so far (the lowest such rank on ties), so every rank computes the same
        disjoint assignment and the shares differ by at most one row group.
        """
        rng = np.random.default_rng([seed, epoch, 2])
        loads = np.zeros(world, dtype=np.int64)
        mine: list[_Unit] = []
        for i in rng.permutation(len(self.units)):
            r = int(np.argmin(loads))
            loads[r] += self.units[i].kept
            if r == rank:
                mine.append(self.units[i])
        return mine, loads

    def rank_batches(self, batch_size: int, *, rank: int, world: int, steps: int, seed: int = 0,
                     epoch: int = 0, start_batch: int = 0, block: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s ``steps`` shuffled batches of one epoch (``batch_size`` global).

        The rank reads only its row groups (:meth:`rank_units`), shuffles them in buffers as
        :meth:`batches` does (its own stream of (seed, epoch, rank)), and cuts its n_r rows
        into exactly ``steps`` batches of floor or ceil(n_r / steps) rows, so all ranks take
        the same number of steps and every row is used exactly once per epoch.
        """
        units, loads = self.rank_units(rank, world, seed, epoch)
        if int(loads.min()) < steps:
            low = int(np.argmin(loads))
            raise DataError(f"{self.source}: {len(self.units)} row group(s) cannot be shared "
                            f"among {world} ranks for {steps} steps per epoch (rank {low} gets "
                            f"{int(loads[low])} rows); write the Parquet files with smaller "
                            "row groups or more files, or set data.loader=memory")
        ends = np.arange(steps + 1, dtype=np.int64) * int(loads[rank]) // steps  # (steps + 1,)
        rng = np.random.default_rng([seed, epoch, 3, rank])
        buffer_rows = max(self.cfg.shuffle_buffer, batch_size)
        pending: list[EncodedData] = []
        n_pending, k = 0, 0
        for last, chunk in _flag_last(self.chunks(units)):
            pending.append(chunk)
            n_pending += chunk.n
            if n_pending < buffer_rows and not last:
                continue
            data = concat_encoded(pending)
            order = shuffled_order(rng, data.n, block)
            pos = 0
            while k < steps and pos + ends[k + 1] - ends[k] <= data.n:
                size = int(ends[k + 1] - ends[k])
                if k >= start_batch:
                    yield make_batch(data, order[pos:pos + size])
                pos += size
                k += 1
            rest = order[pos:]
            pending = [take_encoded(data, np.sort(rest))] if len(rest) else []
            n_pending = len(rest)


def _flag_last(items: Iterator[EncodedData]) -> Iterator[tuple[bool, EncodedData]]:
    """(is it the last item, item) for each item of ``items``."""
    prev = None
    for item in items:
        if prev is not None:
            yield False, prev
        prev = item
    if prev is not None:
        yield True, prev


def _signed_ints(t: pa.DataType) -> bool:
    """Whether an id column of type ``t`` holds signed integers (or lists of them): such ids
    are always valid."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_signed_integer(t)


class _StringIds:
    """The string id columns of ``auto`` fields, checked across a whole streamed split: the
    in-memory loader refuses a column mixing integer-looking strings with others, so the
    stream does too, even when each chunk holds one kind."""

    def __init__(self, spec: FeatureSpec, schema: pa.Schema) -> None:
        self.fields = [f for f in spec.sparse if f.dtype == "auto" and f.name in schema.names
                       and _id_family(schema.field(f.name).type) == "str"]
        # field -> (integer-like?, source, position, value) of the first value seen
        self.first: dict[str, tuple[bool, str, str, object]] = {}

    def check(self, t: pa.Table, rows: Rows) -> None:
        for f in self.fields:
            col = t.column(f.name).combine_chunks()
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            where = rows
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(
                    zero_copy_only=False)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                col, where = pc.list_flatten(col), rows.values_of(offsets)
            like, other = integer_like(col)
            if f.name not in self.first and (like.any() or other.any()):
                i = int(np.flatnonzero(like | other)[0])
                self.first[f.name] = (bool(like[i]), *where.at(i), col[i].as_py())
            if f.name in self.first:
                kind, *first = self.first[f.name]
                odd = other if kind else like
                if odd.any():
                    i = int(np.flatnonzero(odd)[0])
                    raise mixed_error(f, (*where.at(i), col[i].as_py()), tuple(first),
                                      int(odd.sum()))


Split = EncodedData | ParquetStream


def open_split(path: str | Path, spec: FeatureSpec, cfg: DataConfig, require_labels: bool = True,
               loader: str | None = None) -> Split:
    """A split as ``data.loader`` (or ``loader``) says: in memory or streamed.

    ``auto`` streams Parquet and reads other formats into memory.
    """
    p = Path(path)
    if resolve_loader(p, cfg, loader) == "stream":
        return ParquetStream(p, spec, cfg, require_labels)
    return load_split(p, spec, cfg, require_labels)


def resolve_loader(path: str | Path, cfg: DataConfig, loader: str | None = None) -> str:
    """``stream`` or ``memory`` for ``path``, as ``loader`` (else ``data.loader``) says."""
    how = loader or cfg.loader
    p = Path(path)
    fmt = file_format(p, cfg)
    if how == "auto":
        how = "stream" if fmt == "parquet" else "memory"
    if how == "stream" and fmt != "parquet":
        raise ConfigError(f"data.loader=stream reads Parquet, but {p} is read as {fmt!r}; "
                          "set data.loader=memory, or convert the file to Parquet")
    return how


def split_batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                  epoch: int = 0, start_batch: int = 0, block: int = 1, rank: int = 0,
                  world: int = 1) -> Iterator[Batch]:
    """The batches of one epoch of an in-memory or streamed split.

    With ``world > 1`` ranks (training: shuffled), ``batch_size`` is the global batch and each
    rank gets its disjoint share: its slice of every global batch in memory, its row groups
    streamed; every rank yields :func:`num_batches` (n, batch_size, world) batches.
    """
    from esmm.data.batches import iter_batches, num_batches

    if isinstance(split, ParquetStream):
        if world > 1:
            return split.rank_batches(batch_size, rank=rank, world=world,
                                      steps=num_batches(split.n, batch_size, world), seed=seed,
                                      epoch=epoch, start_batch=start_batch, block=block)
        return split.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                             start_batch=start_batch, block=block)
    return iter_batches(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                        start_batch=start_batch, block=block, rank=rank, world=world)


# ----------------------------------------------------------------------------- chunk algebra


def _cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    if arrays[0] is None:
        return None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _cat_ragged(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    values = np.concatenate([v for v, _ in parts])
    shift = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    offsets = np.concatenate([parts[0][1][:1]] + [o[1:] + s for (_, o), s in zip(parts, shift,
                                                                                    strict=True)])
    return values, offsets


def concat_encoded(parts: list[EncodedData]) -> EncodedData:
    """Rows of several chunks of one split as one :class:`EncodedData` (users shared)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    out = EncodedData(source=first.source, n=sum(p.n for p in parts), n_users=first.n_users,
                      user_ids=first.user_ids, user_bags=first.user_bags)
    out.ids = {k: np.concatenate([p.ids[k] for p in parts]) for k in first.ids}
    out.bags = {k: _cat_ragged([p.bags[k] for p in parts]) for k in first.bags}
    out.dense = _cat([p.dense for p in parts])
    out.user_row = _cat([p.user_row for p in parts])
    out.click = _cat([p.click for p in parts])
    out.conversion = _cat([p.conversion for p in parts])
    out.weight = _cat([p.weight for p in parts])
    out.groups = _cat([p.groups for p in parts])
    out.row_ids = _cat([p.row_ids if p.row_ids is not None else np.arange(p.n) for p in parts])
    out.ground_truth = {k: np.concatenate([p.ground_truth[k] for p in parts])
                        for k in first.ground_truth}
    return out


def take_encoded(data: EncodedData, rows: np.ndarray) -> EncodedData:
    """Rows ``rows`` (K,) of ``data`` as a new :class:`EncodedData` (users shared)."""
    def tk(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[rows]

    out = EncodedData(source=data.source, n=len(rows), n_users=data.n_users,
                      user_ids=data.user_ids, user_bags=data.user_bags)
    out.ids = {k: v[rows] for k, v in data.ids.items()}
    out.bags = {k: take_ragged(v, o, rows) for k, (v, o) in data.bags.items()}
    out.dense, out.user_row = tk(data.dense), tk(data.user_row)
    out.click, out.conversion, out.weight = tk(data.click), tk(data.conversion), tk(data.weight)
    out.groups = tk(data.groups)
    out.row_ids = data.row_ids[rows] if data.row_ids is not None else rows.astype(np.int64)
    out.ground_truth = {k: v[rows] for k, v in data.ground_truth.items()}
    return out


__all__ = ["GROUND_TRUTH_COLUMNS", "ParquetStream", "Split", "concat_encoded", "open_split",
           "resolve_loader", "split_batches", "take_encoded"]
