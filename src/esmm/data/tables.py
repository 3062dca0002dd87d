"""Reading tables (Parquet, CSV, or a normalized impressions + users folder) and encoding them.

Everything here is column-wise: Arrow columns go to numpy arrays without a per-row Python loop.
A normalized folder (``impressions.parquet`` + ``users.parquet``, joined by ``data.user_key``)
stays normalized: user fields are encoded once per user and joined to impressions at batch
time, so a user's behaviour bags are stored and embedded once per batch, not once per impression.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import xxhash

from esmm.config import DataConfig
from esmm.errors import ConfigError, DataError
from esmm.features import (
    F32_MAX,
    FeatureSpec,
    Rows,
    canonical_bags,
    canonical_ids,
    encode_bag,
    encode_categorical,
    encode_dense,
)

log = logging.getLogger(__name__)

GROUND_TRUTH_COLUMNS = ("p_click", "p_conversion", "conversion_if_clicked")
_ENCODERS = {"categorical": encode_categorical, "multi_categorical": encode_bag,
             "dense": encode_dense}


@dataclass
class RawTables:
    """Arrow tables of one split before encoding.

    ``rows`` / ``user_rows`` name the rows of ``impressions`` / ``users`` in error messages
    (which file, which row or line); None: rows of ``source`` from 0.
    """

    source: str
    impressions: pa.Table
    users: pa.Table | None = None
    # Every column the files hold, read or not (for error messages); None: the tables' own.
    available: tuple[str, ...] | None = None
    rows: Rows | None = None
    user_rows: Rows | None = None


@dataclass
class EncodedData:
    """One split, encoded and held in memory as numpy arrays.

    N impressions, U users (U = 0 for flat tables). ``ids``/``bags``/``dense`` are over the N
    impressions; ``user_ids``/``user_bags`` over the U users, joined by ``user_row`` (N,).
    """

    source: str
    n: int
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dense: np.ndarray | None = None  # (N, n_dense) float32
    user_ids: dict[str, np.ndarray] = field(default_factory=dict)
    user_bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    user_row: np.ndarray | None = None  # (N,) int64
    n_users: int = 0
    click: np.ndarray | None = None  # (N,) int8
    conversion: np.ndarray | None = None  # (N,) int8
    weight: np.ndarray | None = None  # (N,) float32
    groups: np.ndarray | None = None  # (N,) user ids for GAUC
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)
    # (N,) int64 positions of the rows in their split; None: 0..N-1 (a streamed chunk's rows
    # start further on).
    row_ids: np.ndarray | None = None
    # Raw Arrow columns carried beside the encoded ones (``esmm predict --keep``), (N,) each.
    extra: dict[str, pa.Array] = field(default_factory=dict)
    rows_read: int = 0
    dropped_conversion_without_click: int = 0
    kept_conversion_without_click: int = 0
    spec: FeatureSpec | None = None  # the spec the split was encoded with

    @property
    def has_labels(self) -> bool:
        return self.click is not None


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return files


def _csv_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.csv") if p.is_file())


def file_format(path: str | Path, cfg: DataConfig) -> str:
    """The format ``path`` is read as: ``data.format``, or for ``auto`` a ``.csv``/``.txt``
    file or a folder holding CSV files but no Parquet file is ``csv``, the rest ``parquet``."""
    p = Path(path)
    if cfg.format != "auto":
        return cfg.format
    if p.is_file():
        return "csv" if p.suffix.lower() in (".csv", ".txt") else "parquet"
    if p.is_dir() and normalized_parts(p)[0] is None and not _parquet_files(p) and _csv_files(p):
        return "csv"
    return "parquet"


def _parquet_schema(f: Path) -> pa.Schema:
    if f.stat().st_size == 0:
        raise DataError(f"{f}: the file is empty (0 bytes)")
    try:
        return pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f}: cannot read as Parquet: {e}") from None


def _id_family(t: pa.DataType) -> str:
    """``int`` or ``str``: how an id column of Arrow type ``t`` hashes (``other``: neither)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _id_family(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return "other"


def check_schemas(schemas: Sequence[tuple[str, pa.Schema]], columns: Sequence[str] | None,
                  spec: FeatureSpec | None = None) -> None:
    """Every file of a split (or of its users) holds the same wanted columns, and each id
    column of an ``auto`` field holds integers in every file or strings in every file.

    A column no file holds is left to the caller (a feature missing from the data is a config
    error, a missing label names its setting). Raises DataError naming the file, the
    column(s) it lacks, and a file that has them.
    """
    if len(schemas) < 2:
        return
    names = [set(s.names) for _, s in schemas]
    wanted = list(dict.fromkeys(columns)) if columns is not None else sorted(set().union(*names))
    somewhere = [c for c in wanted if any(c in n for n in names)]
    for (path, _), have in zip(schemas, names, strict=True):
        lacks = [c for c in somewhere if c not in have]
        if lacks:
            other = next(p for (p, _), h in zip(schemas, names, strict=True) if lacks[0] in h)
            raise DataError(f"{path}: lacks column(s) {lacks} that {other} holds; every file of a "
                            "split must hold the same columns")
    auto_ids = {f.name for f in (spec.sparse if spec else ()) if f.dtype == "auto"}
    for c in somewhere:
        if c not in auto_ids:
            continue
        fams = [(p, s.field(c).type) for p, s in schemas]
        p0, t0 = fams[0]
        for p, t in fams[1:]:
            if _id_family(t) != _id_family(t0):
                raise DataError(f"{p}: id column {c!r} has type {t} but {p0} has {t0}: ids would "
                                "hash differently across files; write one type, or declare the "
                                "field `dtype: str` (or `dtype: int`)")


def _canonical(t: pa.Table, spec: FeatureSpec | None, rows: Rows) -> pa.Table:
    """``t`` with every id column as int64 or string (lists of them for bags), and every dense
    column checked to be numeric, so that files of one split concatenate and ids hash alike."""
    if spec is None:
        return t
    for f in spec.fields:
        if f.name not in t.column_names:
            continue
        col = t.column(f.name)
        if f.kind == "dense":
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                encode_dense(col, f, rows)  # raises, naming the first value that is no number
            continue
        new = canonical_bags(col, f, rows) if f.kind == "multi_categorical" else \
            canonical_ids(col, f, rows)
        t = t.set_column(t.column_names.index(f.name), f.name, new)
    return t


def _read_parquet_file(f: Path, columns: list[str] | None) -> pa.Table:
    try:
        names = pq.read_schema(f).names
        cols = [c for c in columns if c in names] if columns is not None else None
        return pq.read_table(f, columns=cols)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f}: cannot read as Parquet: {e}") from None


def _concat(parts: list[tuple[Path, pa.Table, int]], spec: FeatureSpec | None, unit: str
            ) -> tuple[pa.Table, Rows]:
    """Tables of the files of one split, canonical and concatenated, with their :class:`Rows`.

    Each part is (file, table, number of its first row). A bad value in a file is named
    first (its line or row), then an id column whose type differs between files.
    """
    tables, spans, start = [], [], 0
    for f, t, first in parts:
        rows = Rows(((str(f), 0, first),), unit)
        tables.append(_canonical(t, spec, rows))
        spans.append((str(f), start, first))
        start += t.num_rows
    check_schemas([(str(f), t.schema) for (f, _, _), t in zip(parts, tables, strict=True)],
                  None, spec)
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(
            tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{parts[0][0].parent}: the files' columns have types that do not "
                        f"combine: {e}") from None
    return table, Rows(tuple(spans), unit)


def _read_parquet(path: Path, columns: list[str] | None, spec: FeatureSpec | None = None
                  ) -> tuple[pa.Table, Rows]:
    files = _parquet_files(path)
    if not files:
        raise DataError(f"{path}: no Parquet files found")
    check_schemas([(str(f), _parquet_schema(f)) for f in files], columns)
    return _concat([(f, _read_parquet_file(f, columns), 0) for f in files], spec, "row")


def _schema_names(path: Path) -> list[str]:
    files = _parquet_files(path)
    try:
        return list(pq.read_schema(files[0]).names) if files else []
    except (pa.ArrowInvalid, OSError):
        return []


def _read_csv_file(path: Path, cfg: DataConfig) -> pa.Table:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    read_opts = pacsv.ReadOptions(
        column_names=cfg.csv_columns if not cfg.csv_header else None,
        autogenerate_column_names=(not cfg.csv_header and cfg.csv_columns is None),
    )
    try:
        t = pacsv.read_csv(str(path), read_options=read_opts)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse as CSV: {e}") from None
    return t


def _read_csv(path: Path, cfg: DataConfig, columns: list[str] | None = None,
              spec: FeatureSpec | None = None) -> tuple[pa.Table, Rows, tuple[str, ...]]:
    """A CSV file, or every ``*.csv`` file of a folder, as one table whose rows are named by
    file line (a quoted value spanning lines shifts the count)."""
    files = _csv_files(path)
    if not files:
        raise DataError(f"{path}: no CSV files found")
    tables = [(f, _read_csv_file(f, cfg)) for f in files]
    names = tuple(dict.fromkeys(c for _, t in tables for c in t.column_names))
    if columns is not None:
        tables = [(f, t.select([c for c in dict.fromkeys(columns) if c in t.column_names]))
                  for f, t in tables]
    check_schemas([(str(f), t.schema) for f, t in tables], columns)
    first_line = 2 if cfg.csv_header else 1
    return (*_concat([(f, t, first_line) for f, t in tables], spec, "line"), names)


def normalized_parts(p: Path) -> tuple[Path | None, Path | None]:
    """(impressions, users) of a normalized folder, each a ``.parquet`` file or a folder of
    them; (None, None) for anything else."""
    if not p.is_dir():
        return None, None
    found: list[Path | None] = []
    for stem in ("impressions", "users"):
        hits = [p / n for n in (f"{stem}.parquet", stem) if (p / n).exists()]
        found.append(hits[-1] if hits else None)
    return found[0], found[1]


def read_tables(path: str | Path, cfg: DataConfig, columns: list[str] | None = None, *,
                spec: FeatureSpec | None = None) -> RawTables:
    """Read one split.

    ``path`` is a Parquet file, a folder of Parquet files, a CSV file or a folder of them, or a
    normalized folder with ``impressions.parquet`` (or ``impressions/``) and ``users.parquet``
    (or ``users/``). Every file of a split must hold the same ``columns`` (see
    :func:`check_schemas`). With ``spec``, id columns are read as the fields' ``dtype`` says
    (int64 or string, see :func:`esmm.features.canonical_ids`), file by file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    fmt = file_format(p, cfg)
    if fmt == "csv":
        t, rows, names = _read_csv(p, cfg, columns, spec)
        return RawTables(str(p), t, available=names, rows=rows)
    if fmt in ("rechub-csv", "aitm-csv", "paddle-esmm-txt"):
        from esmm.data.published import read_published

        return RawTables(str(p), read_published(p, fmt, columns))
    imp, users = normalized_parts(p)
    if imp is not None:
        imp_t, imp_rows = _read_parquet(imp, columns, spec)
        # The same column list applies: unused user columns (e.g. bag values) stay on disk.
        users_t, user_rows = _read_parquet(users, columns, spec) if users is not None else (
            None, None)
        names = _schema_names(imp) + (_schema_names(users) if users is not None else [])
        return RawTables(str(p), imp_t, users_t, tuple(names), imp_rows, user_rows)
    t, rows = _read_parquet(p, columns, spec)
    return RawTables(str(p), t, available=tuple(_schema_names(p)), rows=rows)


def _labels_array(t: pa.Table, col: str, source: str | Rows, what: str, row_offset: int = 0
                  ) -> np.ndarray:
    """(N,) int8 of a 0/1 label column; ``source`` (a name whose rows are numbered from
    ``row_offset``, or :class:`Rows`) names the first bad row."""
    rows = source if isinstance(source, Rows) else Rows(((str(source), 0, row_offset),))
    if col not in t.column_names:
        raise DataError(
            f"{rows.name}: the {what} label column {col!r} is missing; columns present: "
            f"{sorted(t.column_names)[:30]}. Set `data.labels.{what}` to the right name."
        )
    arr = t.column(col)
    if arr.null_count:
        name, pos = rows.at(int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]))
        raise DataError(f"{name}: label column {col!r} has {arr.null_count} missing value(s), "
                        f"first at {pos}; expected 0 or 1")
    a = arr.to_numpy()
    if a.dtype == bool:
        return a.astype(np.int8)
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{rows.name}: label column {col!r} has type {arr.type}; expected 0/1 "
                        "numbers")
    bad = (a != 0) & (a != 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        name, pos = rows.at(first)
        raise DataError(f"{name}: label column {col!r} must hold only 0 or 1; {pos} holds "
                        f"{a[first].item()!r} ({int(bad.sum())} bad row(s) in all)")
    return a.astype(np.int8)


def needed_columns(spec: FeatureSpec, cfg: DataConfig) -> list[str]:
    cols = [f.name for f in spec.fields]
    cols += [cfg.labels.click, cfg.labels.conversion, cfg.user_key]
    if cfg.user_column:
        cols.append(cfg.user_column)
    if cfg.weight_column:
        cols.append(cfg.weight_column)
    cols += list(GROUND_TRUTH_COLUMNS)
    return list(dict.fromkeys(cols))


def _key_kind(col: pa.ChunkedArray | pa.Array) -> str:
    """``int`` (numbers, compared by value), ``str``, or the type of a column of other keys."""
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return str(t)


def group_ids(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N,) int64 GAUC group ids of a user column: integers as they are, strings as their
    64-bit xxh64 (stable across chunks and files), missing values as 0."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if _key_kind(arr) == "str":
        enc = pc.dictionary_encode(arr)
        codes = np.fromiter((xxhash.xxh64_intdigest(s.encode("utf-8"))
                             for s in enc.dictionary.to_pylist()), dtype=np.uint64,
                            count=len(enc.dictionary)).view(np.int64)
        idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out = codes[idx] if len(codes) else np.zeros(len(arr), dtype=np.int64)
        if arr.null_count:
            out[~np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)] = 0
        return out
    if pa.types.is_floating(arr.type):
        return np.nan_to_num(arr.to_numpy(zero_copy_only=False), nan=0.0).astype(np.int64)
    return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)


@dataclass
class UserSide:
    """The users table of a normalized split, encoded once (U users).

    ``ids``/``bags``/``dense`` hold the user-side fields over the U users; ``keys`` (U,) holds
    the users' join keys (integers or strings) and ``key_kind`` says which; for integer keys
    ``keys_sorted`` (U,) and ``order`` (U,) map an impression's key to its user's row.
    """

    key: str
    keys: pa.Array
    key_kind: str
    keys_sorted: np.ndarray
    order: np.ndarray
    columns: frozenset[str]
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.keys)

    def rows_of(self, ikeys: pa.ChunkedArray | pa.Array, src: str | Rows, row_offset: int = 0
                ) -> np.ndarray:
        """(N,) user rows of impression keys ``ikeys`` (N,); an unknown key is an error."""
        rows = src if isinstance(src, Rows) else Rows(((str(src), 0, row_offset),))
        kind = _key_kind(ikeys)
        if kind != self.key_kind:
            raise DataError(f"{rows.name}: the impressions' join key {self.key!r} holds {kind} "
                            f"values but the users' holds {self.key_kind} values; write both "
                            "with one type")
        if kind == "str":
            # Exact string matching: a hash of the keys could join two users.
            idx = pc.index_in(ikeys, value_set=self.keys)
            missing = ~np.asarray(idx.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            found = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            k = np.asarray(ikeys.to_numpy(zero_copy_only=False))
            sk = self.keys_sorted
            pos = np.minimum(np.searchsorted(sk, k), len(sk) - 1)
            missing = sk[pos] != k
            found = self.order[pos].astype(np.int64)
        if ikeys.null_count:
            missing |= ~np.asarray(ikeys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            name, pos_s = rows.at(first)
            raise DataError(f"{name}: {int(missing.sum())} impression(s) have a {self.key!r} "
                            f"absent from the users table (first at {pos_s}: "
                            f"{ikeys[first].as_py()!r})")
        return found


def _user_keys(users: pa.Table, key: str, rows: Rows) -> tuple[pa.Array, str, np.ndarray,
                                                                np.ndarray]:
    """(keys, kind, keys_sorted, order) of a users table; a missing or repeated key is an
    error naming its row."""
    col = users.column(key)
    keys = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(keys.type):
        keys = keys.cast(keys.type.value_type)
    kind = _key_kind(keys)
    if kind not in ("int", "str"):
        raise DataError(f"{rows.name}: the join key {key!r} has type {keys.type}; expected "
                        "integers or strings")
    if keys.null_count:
        name, pos = rows.at(int(np.flatnonzero(
            ~np.asarray(keys.is_valid().to_numpy(zero_copy_only=False), dtype=bool))[0]))
        raise DataError(f"{name}: the users table's join key {key!r} is missing at {pos}")
    if kind == "str":
        keys = keys.cast(pa.string())
        if pc.count_distinct(keys).as_py() != len(keys):
            counts = pc.value_counts(keys)
            dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0]
            raise DataError(f"{rows.name}: users table has key {dup.as_py()!r} more than once")
        return keys, kind, np.zeros(0, dtype=np.int64), np.arange(len(keys), dtype=np.int64)
    ukeys = keys.to_numpy(zero_copy_only=False)
    order = np.argsort(ukeys, kind="stable")
    sk = ukeys[order]
    if len(sk) > 1 and np.any(sk[1:] == sk[:-1]):
        dup = sk[1:][sk[1:] == sk[:-1]][0]
        raise DataError(f"{rows.name}: users table has key {dup!r} more than once")
    return keys, kind, sk, order


def encode_users(users: pa.Table, impression_columns: Sequence[str], spec: FeatureSpec,
                 cfg: DataConfig, src: str, rows: Rows | None = None) -> UserSide:
    """Encode the user-side fields of a users table (the fields impressions do not carry).

    ``rows`` names the users table's rows in errors (default: rows of ``src (users)``).
    """
    key = cfg.user_key
    rows = rows or Rows(((f"{src} (users)", 0, 0),))
    if key not in users.column_names:
        raise DataError(f"{src}: the users table lacks the join key column {key!r} "
                        "(data.user_key)")
    if users.num_rows == 0:
        raise DataError(f"{src}: the users table has no rows")
    keys, kind, sk, order = _user_keys(users, key, rows)
    cols = frozenset(users.column_names) - {key}
    side = UserSide(key, keys, kind, sk, order, cols)
    for f in spec.fields:
        if f.name not in cols or f.name in impression_columns:
            continue
        sink = {"categorical": side.ids, "multi_categorical": side.bags, "dense": side.dense}
        sink[f.kind][f.name] = _ENCODERS[f.kind](users.column(f.name), f, rows)
    uc = cfg.user_column
    if uc and uc in cols and uc not in impression_columns:
        side.groups = group_ids(users.column(uc))
    return side


def _labels(imp: pa.Table, cfg: DataConfig, rows: Rows, quiet: bool, src: str
            ) -> tuple[pa.Table, np.ndarray, np.ndarray, Rows, int, int]:
    """Validate the labels and apply ``data.conversion_without_click``.

    Returns the kept impressions, their (N,) click and conversion, the kept rows' :class:`Rows`,
    and the counts of dropped and kept conversions without clicks.
    """
    click = _labels_array(imp, cfg.labels.click, rows, "click")
    conversion = _labels_array(imp, cfg.labels.conversion, rows, "conversion")
    bad = (conversion == 1) & (click == 0)
    n_bad = int(bad.sum())
    if not n_bad:
        return imp, click, conversion, rows, 0, 0
    policy = cfg.conversion_without_click
    if policy == "error":
        name, pos = rows.at(int(np.flatnonzero(bad)[0]))
        raise DataError(
            f"{name}: {n_bad} row(s) have conversion=1 with click=0 (first at {pos}); set "
            "`data.conversion_without_click: drop` (or keep) to go on"
        )
    if policy == "keep":
        if not quiet:
            log.warning("%s: kept %d row(s) with conversion=1 and click=0; they count "
                        "as CTCVR negatives", src, n_bad)
        return imp, click, conversion, rows, 0, n_bad
    keep = ~bad
    if not quiet:
        log.warning("%s: dropped %d row(s) with conversion=1 and click=0 "
                    "(data.conversion_without_click=drop)", src, n_bad)
    kept_rows = replace(rows, index=np.flatnonzero(keep) if rows.index is None
                        else rows.index[keep])
    return imp.filter(pa.array(keep)), click[keep], conversion[keep], kept_rows, n_bad, 0


def _encode_fields(out: EncodedData, imp: pa.Table, raw: RawTables, spec: FeatureSpec,
                   users: UserSide | None, rows: Rows) -> None:
    """Encode every field into ``out`` from the impressions, or from the users joined to them."""
    user_cols = users.columns if users is not None else frozenset()
    dense_cols = []
    for f in spec.fields:
        if f.name in imp.column_names:
            value = _ENCODERS[f.kind](imp.column(f.name), f, rows)
            if f.kind == "dense":
                dense_cols.append(value)
            else:
                (out.ids if f.kind == "categorical" else out.bags)[f.name] = value
        elif f.name in user_cols:
            if f.kind == "dense":
                dense_cols.append(users.dense[f.name][out.user_row])
        else:
            have = sorted(set(raw.available or ()) | set(imp.column_names) | user_cols)
            raise ConfigError(
                f"feature {f.name!r} named in the config is not in the data {raw.source}; "
                f"columns present: {have[:40]}"
            )
    if dense_cols:
        out.dense = np.stack(dense_cols, axis=1)  # (N, n_dense)


def _weights(imp: pa.Table, column: str, rows: Rows) -> np.ndarray:
    if column not in imp.column_names:
        raise DataError(f"{rows.name}: weight column {column!r} (data.weight_column) is missing")
    col = imp.column(column)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{rows.name}: weight column {column!r} has type {col.type}; expected "
                        "numbers")
    w = col.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0) | (w > F32_MAX)
    if bad.any():
        name, pos = rows.at(int(np.flatnonzero(bad)[0]))
        raise DataError(f"{name}: weight column {column!r} must hold finite values >= 0 "
                        f"(float32); {pos} holds {float(w[bad][0])!r}")
    return w.astype(np.float32)


def encode(raw: RawTables, spec: FeatureSpec, cfg: DataConfig, require_labels: bool = True,
           *, users: UserSide | None = None, row_offset: int = 0, quiet: bool = False
           ) -> EncodedData:
    """Validate and encode a split (or one chunk of it) into numpy arrays.

    Args:
        users: the split's users, already encoded (a streamed split encodes them once);
            None encodes ``raw.users`` here.
        row_offset: position of the chunk's first row in its file, for error messages
            (when ``raw.rows`` is None).
        quiet: do not log dropped rows (a streamed split reports them once for the split).
    """
    src = raw.source
    imp = raw.impressions
    rows = raw.rows or Rows(((src, 0, row_offset),))
    if imp.num_rows == 0:
        raise DataError(f"{src}: the table has no rows")
    rows_read = imp.num_rows

    # Labels first: rows may be dropped before any feature is encoded.
    click = conversion = None
    dropped = kept = 0
    if require_labels:
        imp, click, conversion, rows, dropped, kept = _labels(imp, cfg, rows, quiet, src)
        if imp.num_rows == 0 and not quiet:
            raise DataError(f"{src}: no rows left after dropping conversions without clicks")

    out = EncodedData(source=src, n=imp.num_rows, click=click, conversion=conversion,
                      rows_read=rows_read, dropped_conversion_without_click=dropped,
                      kept_conversion_without_click=kept, spec=spec)

    # Join impressions to users by key.
    if users is None and raw.users is not None:
        users = encode_users(raw.users, imp.column_names, spec, cfg, src, raw.user_rows)
    if users is not None:
        if users.key not in imp.column_names:
            raise DataError(f"{src}: the impressions table lacks the join key column "
                            f"{users.key!r} (data.user_key)")
        out.user_row = users.rows_of(imp.column(users.key), rows)
        out.n_users = users.n
        out.user_ids, out.user_bags = users.ids, users.bags

    _encode_fields(out, imp, raw, spec, users, rows)
    if cfg.weight_column:
        out.weight = _weights(imp, cfg.weight_column, rows)

    uc = cfg.user_column
    if uc:
        if uc in imp.column_names:
            out.groups = group_ids(imp.column(uc))
        elif users is not None and users.groups is not None:
            out.groups = users.groups[out.user_row]
        elif not quiet:
            log.info("%s: user column %r not found; GAUC metrics are skipped", src, uc)
    for g in GROUND_TRUTH_COLUMNS:
        if g in imp.column_names:
            out.ground_truth[g] = imp.column(g).to_numpy(zero_copy_only=False)
    return out


def load_split(path: str | Path, spec: FeatureSpec, cfg: DataConfig,
               require_labels: bool = True) -> EncodedData:
    """Read and encode one split (see :func:`read_tables` and :func:`encode`)."""
    raw = read_tables(path, cfg, columns=needed_columns(spec, cfg), spec=spec)
    return encode(raw, spec, cfg, require_labels=require_labels)
