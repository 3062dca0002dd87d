"""The feature spec's fitted state, computed on the training split before training starts.

Dense fields with ``transform: zscore | minmax``, ``fill: mean`` or ``transform: bucketize``
with ``quantiles: N`` need statistics of the training split; ``auto`` id fields record whether
training saw integer or string ids. :func:`fit_spec` computes both in one pass over the split
and returns a spec that carries them; the spec travels in every checkpoint and artifact, so
evaluation, prediction, export and serving encode with the training split's numbers, and a
resumed run reuses them (:func:`training_spec`).

The pass is streamed: Parquet files are read ``data.chunk_rows`` rows at a time, and only the
columns that need fitting (CSV and the published formats are read whole, as their loader
reads them). Statistics are exact:

* mean and variance merge each chunk's mean and sum of squared deviations into the running
  ones with the pairwise update of Chan, Golub and LeVeque (1979), which keeps float64 accuracy
  where a running sum of squares would cancel;
* min and max are exact by nature;
* quantiles are exact order statistics of the column, which is collected (present values
  only, float64): 8 bytes per training row for each ``quantiles`` field, twice that while it is
  sorted (80 MB, then 160 MB, for 10M rows).

Rows are those training uses: impressions dropped by ``data.conversion_without_click: drop``
are left out; a field of a normalized split's users table is fitted over that table's rows
(one per user), as it is encoded once per user.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esmm.config import Config, DataConfig
from esmm.errors import DataError, EsmmError
from esmm.features import FeatureSpec, FieldSpec, FieldStats, Rows, dense_values, spec_from_config

log = logging.getLogger(__name__)


@dataclass
class Moments:
    """Streaming count, mean, sum of squared deviations (``m2``), min and max of a column."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")

    def add(self, x: np.ndarray) -> None:
        """Merge a chunk of (K,) float64 values (Chan et al.'s pairwise update)."""
        k = len(x)
        if k == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n = self.n + k
        delta = mean_b - self.mean
        self.mean += delta * k / n
        self.m2 += m2_b + delta * delta * (self.n * k / n)
        self.n = n
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0)."""
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


def exact_quantiles(values: np.ndarray, n: int) -> np.ndarray:
    """Boundaries of ``n`` equal-count buckets: the order statistics at ranks ceil(k * M / n),
    k = 1..n-1, of the M values (the inverted empirical CDF, integer arithmetic), with repeats
    removed (ties merge buckets).

    Args:
        values: (M,) float64, sorted in place.
    Returns:
        (<= n - 1,) float64, strictly ascending, each one a value of the column.
    """
    values.sort()
    m = len(values)
    ranks = (np.arange(1, n, dtype=np.int64) * m + n - 1) // n - 1
    return np.unique(values[ranks])


@dataclass
class _FieldFit:
    """What one field accumulates over the pass."""

    spec: FieldSpec
    moments: Moments = field(default_factory=Moments)
    missing: int = 0
    collected: list[np.ndarray] = field(default_factory=list)

    def add(self, col: pa.ChunkedArray, rows: Rows, keep: np.ndarray | None) -> None:
        vals, missing = dense_values(col, self.spec, rows)
        if keep is not None:
            vals, missing = vals[keep], missing[keep]
        present = vals[~missing]
        self.missing += int(missing.sum())
        self.moments.add(present)
        if self.spec.quantiles is not None:
            self.collected.append(present)


def _needs_values(f: FieldSpec) -> bool:
    return f.numeric and (f.transform in ("zscore", "minmax") or f.fill == "mean"
                          or f.quantiles is not None)


def _auto_ids(f: FieldSpec) -> bool:
    return not f.numeric and f.dtype == "auto"


def _id_type(t: pa.DataType) -> str | None:
    """``int`` or ``str``: how ids of Arrow type ``t`` hash under ``dtype: auto`` (None:
    nothing to record, e.g. a column of nulls)."""
    while pa.types.is_dictionary(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


# ----------------------------------------------------------------------------- reading


@dataclass
class _Side:
    """One table of a split (impressions or users): its schema and its chunks' source."""

    schema: pa.Schema
    files: list[Path] | None = None  # Parquet, streamed
    table: pa.Table | None = None  # read whole
    rows: Rows | None = None
    impressions: bool = True
    # Columns whose type differs between the side's files: no id type is recorded for them,
    # and loading refuses them with the message that names both files.
    mixed: frozenset[str] = frozenset()


def _parquet_side(path: Path, impressions: bool) -> _Side:
    from esmm.data.tables import _parquet_files

    files = _parquet_files(path)
    if not files:
        raise DataError(f"{path}: no Parquet files found")
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot read as Parquet: {e}") from None
    mixed = frozenset(c for c in schemas[0].names if len({
        _id_type(s.field(c).type) for s in schemas if c in s.names}) > 1)
    return _Side(schemas[0], files=files, impressions=impressions, mixed=mixed)


def _sides(source: str | Path | Any, cfg: DataConfig, columns: list[str],
           spec: FeatureSpec) -> list[_Side]:
    """The impressions (and users) of a split: a path, or :class:`RawTables` in memory.

    Formats other than Parquet are read whole, as their loader reads them and with ``spec``,
    so that a bad file is refused with the loader's own message.
    """
    from esmm.data.tables import RawTables, file_format, normalized_parts, read_tables

    if isinstance(source, RawTables):
        sides = [_Side(source.impressions.schema, table=source.impressions, rows=source.rows)]
        if source.users is not None:
            sides.append(_Side(source.users.schema, table=source.users, rows=source.user_rows,
                               impressions=False))
        return sides
    p = Path(source)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if file_format(p, cfg) != "parquet":
        return _sides(read_tables(p, cfg, columns=columns, spec=spec), cfg, columns, spec)
    imp, users = normalized_parts(p)
    if imp is None:
        return [_parquet_side(p, True)]
    return [_parquet_side(imp, True)] + ([_parquet_side(users, False)] if users else [])


def _chunks(side: _Side, columns: list[str], chunk_rows: int
            ) -> Iterator[tuple[pa.Table, Rows]]:
    """The side's ``columns`` (those it holds), ``chunk_rows`` rows at a time for Parquet."""
    cols = [c for c in dict.fromkeys(columns) if c in side.schema.names]
    if side.table is not None:
        yield side.table.select(cols), side.rows or Rows(((_source_name(side), 0, 0),))
        return
    for f in side.files or ():
        try:
            pf = pq.ParquetFile(f)
            first = 0
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
                yield pa.Table.from_batches([batch]), Rows(((str(f), 0, first),))
                first += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot read as Parquet: {e}") from None


def _source_name(side: _Side) -> str:
    return "the training data (in memory)" if side.files is None else str(side.files[0])


def _kept(t: pa.Table, cfg: DataConfig) -> np.ndarray | None:
    """(K,) bool: rows training keeps (``conversion_without_click: drop``); None: all."""
    click, conv = cfg.labels.click, cfg.labels.conversion
    if cfg.conversion_without_click != "drop" or not {click, conv} <= set(t.column_names):
        return None
    try:
        c = np.asarray(t.column(click).fill_null(0).to_numpy(zero_copy_only=False), float)
        v = np.asarray(t.column(conv).fill_null(0).to_numpy(zero_copy_only=False), float)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None  # bad labels are refused, naming their row, when the split is loaded
    return ~((v == 1) & (c == 0))


# ----------------------------------------------------------------------------- fitting


def fit_spec(spec: FeatureSpec, source: str | Path | Any, cfg: DataConfig) -> FeatureSpec:
    """``spec`` with its fitted state: statistics of the dense fields that need them and the id
    type of every ``auto`` id field, from the training split ``source`` (a path, or
    :class:`~esmm.data.tables.RawTables`).

    Raises:
        DataError: a bad value (naming the file, field and row), or a field to fit that has no
        value in the split.
    """
    fits = {f.name: _FieldFit(f) for f in spec.fields if _needs_values(f)}
    auto = [f.name for f in spec.fields if _auto_ids(f)]
    if not fits and not auto:
        return spec
    labels = [cfg.labels.click, cfg.labels.conversion]
    sides = _sides(source, cfg, list(fits) + auto + labels, spec)
    owner = {}  # field -> the side encoding reads it from (impressions first, as the loaders)
    for name in list(fits) + auto:
        owner[name] = next((s for s in sides if name in s.schema.names), None)
    types = {n: _id_type(owner[n].schema.field(n).type) for n in auto
             if owner[n] is not None and n not in owner[n].mixed}
    for side in sides:
        mine = [n for n in fits if owner[n] is side]
        if not mine:
            continue
        for t, rows in _chunks(side, mine + (labels if side.impressions else []),
                               cfg.chunk_rows):
            keep = _kept(t, cfg) if side.impressions else None
            for n in mine:
                fits[n].add(t.column(n), rows, keep)
    where = str(source.source) if hasattr(source, "source") else str(source)
    fields = []
    for f in spec.fields:
        if f.name in fits:
            f = _fitted(fits[f.name], where)
        if types.get(f.name) is not None:
            f = replace(f, id_type=types[f.name])
        fields.append(f)
    return replace(spec, fields=tuple(fields))


def _fitted(fit: _FieldFit, where: str) -> FieldSpec:
    f, m = fit.spec, fit.moments
    if m.n == 0:
        raise DataError(f"{where}: dense field {f.name!r} has no value in the training split "
                        f"({fit.missing} missing) to fit its `transform: {f.transform}` / "
                        f"`fill: {f.fill}` on")
    stats = FieldStats(count=m.n, missing=fit.missing, mean=m.mean, std=m.std, min=m.lo,
                       max=m.hi)
    f = replace(f, stats=stats, fill=m.mean if f.fill == "mean" else f.fill)
    log.info("feature %r: %d values (%d missing) in %s: mean %.6g, std %.6g, min %.6g, "
             "max %.6g%s", f.name, m.n, fit.missing, where, m.mean, m.std, m.lo, m.hi,
             f"; missing values filled with {f.fill:.6g}" if fit.missing and
             not isinstance(f.fill, str) else "")
    if f.quantiles is not None:
        values = np.concatenate(fit.collected)
        fit.collected.clear()
        bounds = tuple(float(b) for b in exact_quantiles(values, f.quantiles))
        f = replace(f, boundaries=bounds, buckets=len(bounds) + 1)
        log.info("feature %r: %d quantile buckets -> boundaries %s%s", f.name, f.quantiles,
                 _short_list(bounds), "" if len(bounds) == f.quantiles - 1 else
                 f" ({len(bounds) + 1} buckets: tied values merged the others)")
    return f


def _short_list(xs: tuple[float, ...]) -> str:
    shown = ", ".join(f"{x:.6g}" for x in xs[:8])
    return f"[{shown}{', ...' if len(xs) > 8 else ''}]"


def training_spec(cfg: Config, state: Mapping[str, Any] | None, train_data: Any = None
                  ) -> FeatureSpec:
    """The feature spec a run trains with.

    A resumed run (``state``: its ``latest.pt``) reuses the spec stored there, statistics
    included, never fitting again on what may be other data. Otherwise a split the caller
    already encoded brings the spec it was encoded with, and ``data.train`` is fitted here.
    """
    if state is not None and state.get("feature_spec") is not None:
        stored = FeatureSpec.from_dict(state["feature_spec"])
        given = getattr(train_data, "spec", None)
        if given is not None and given != stored:
            raise EsmmError("--resume: the training data given was encoded with other feature "
                            "statistics than the run's checkpoint holds; encode it with the "
                            "run's stored feature spec")
        return stored
    given = getattr(train_data, "spec", None)
    if given is not None:
        return given
    spec = spec_from_config(cfg)
    if train_data is not None or not cfg.data.train:
        return spec
    return fit_spec(spec, cfg.data.train, cfg.data)


def stored_spec(run: str | Path) -> FeatureSpec | None:
    """The feature spec in ``run``'s ``checkpoints/latest.pt`` (None: no checkpoint yet)."""
    from esmm.checkpoint import load_checkpoint

    latest = Path(run) / "checkpoints" / "latest.pt"
    if not latest.exists():
        return None
    raw = load_checkpoint(latest).get("feature_spec")
    return FeatureSpec.from_dict(raw) if raw is not None else None
