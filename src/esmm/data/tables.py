"""Reading tables (Parquet, CSV, or a normalized impressions + users folder) and encoding them.

Everything here is column-wise: Arrow columns go to numpy arrays without a per-row Python loop.
A normalized folder (``impressions.parquet`` + ``users.parquet``, joined by ``data.user_key``)
stays normalized: user fields are encoded once per user and joined to impressions at batch
time, so a user's behaviour bags are stored and embedded once per batch, not once per impression.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from esmm.config import DataConfig
from esmm.errors import ConfigError, DataError
from esmm.features import FeatureSpec, encode_bag, encode_categorical, encode_dense

log = logging.getLogger(__name__)

GROUND_TRUTH_COLUMNS = ("p_click", "p_conversion", "conversion_if_clicked")
_ENCODERS = {"categorical": encode_categorical, "multi_categorical": encode_bag,
             "dense": encode_dense}


@dataclass
class RawTables:
    """Arrow tables of one split before encoding."""

    source: str
    impressions: pa.Table
    users: pa.Table | None = None
    # Every column the files hold, read or not (for error messages); None: the tables' own.
    available: tuple[str, ...] | None = None


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

    @property
    def has_labels(self) -> bool:
        return self.click is not None


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return files


def _read_parquet(path: Path, columns: list[str] | None) -> pa.Table:
    files = _parquet_files(path)
    if not files:
        raise DataError(f"{path}: no Parquet files found")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty (0 bytes)")
    try:
        if len(files) == 1:
            schema_names = pq.read_schema(files[0]).names
            cols = [c for c in columns if c in schema_names] if columns is not None else None
            return pq.read_table(files[0], columns=cols)
        ds = pads.dataset([str(f) for f in files], format="parquet")
        cols = [c for c in columns if c in ds.schema.names] if columns is not None else None
        return ds.to_table(columns=cols)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None


def _schema_names(path: Path) -> list[str]:
    files = _parquet_files(path)
    try:
        return list(pq.read_schema(files[0]).names) if files else []
    except (pa.ArrowInvalid, OSError):
        return []


def _read_csv(path: Path, cfg: DataConfig) -> pa.Table:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    read_opts = pacsv.ReadOptions(
        column_names=cfg.csv_columns if not cfg.csv_header else None,
        autogenerate_column_names=(not cfg.csv_header and cfg.csv_columns is None),
    )
    try:
        t = pacsv.read_csv(str(path), read_options=read_opts)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse as CSV: {e}") from None
    return t


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


def read_tables(path: str | Path, cfg: DataConfig, columns: list[str] | None = None) -> RawTables:
    """Read one split.

    ``path`` is a Parquet file, a folder of Parquet files, a CSV file, or a normalized folder
    with ``impressions.parquet`` (or ``impressions/``) and ``users.parquet`` (or ``users/``).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "csv" if p.is_file() and p.suffix.lower() in (".csv", ".txt") else "parquet"
    if fmt == "csv":
        return RawTables(str(p), _read_csv(p, cfg))
    if fmt in ("rechub-csv", "aitm-csv", "paddle-esmm-txt"):
        from esmm.data.published import read_published

        return RawTables(str(p), read_published(p, fmt, columns))
    imp, users = normalized_parts(p)
    if imp is not None:
        imp_t = _read_parquet(imp, columns)
        # The same column list applies: unused user columns (e.g. bag values) stay on disk.
        users_t = _read_parquet(users, columns) if users is not None else None
        names = _schema_names(imp) + (_schema_names(users) if users is not None else [])
        return RawTables(str(p), imp_t, users_t, tuple(names))
    return RawTables(str(p), _read_parquet(p, columns), available=tuple(_schema_names(p)))


def _labels_array(t: pa.Table, col: str, source: str, what: str, row_offset: int = 0
                  ) -> np.ndarray:
    if col not in t.column_names:
        raise DataError(
            f"{source}: the {what} label column {col!r} is missing; columns present: "
            f"{sorted(t.column_names)[:30]}. Set `data.labels.{what}` to the right name."
        )
    arr = t.column(col)
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{source}: label column {col!r} has {arr.null_count} missing value(s), "
                        f"first at row {row_offset + first}; expected 0 or 1")
    a = arr.to_numpy()
    if a.dtype == bool:
        return a.astype(np.int8)
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{source}: label column {col!r} has type {arr.type}; expected 0/1 numbers")
    bad = (a != 0) & (a != 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: label column {col!r} must hold only 0 or 1; row "
                        f"{row_offset + first} holds {a[first].item()!r} ({int(bad.sum())} bad "
                        "row(s) in all)")
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


@dataclass
class UserSide:
    """The users table of a normalized split, encoded once (U users).

    ``ids``/``bags``/``dense`` hold the user-side fields over the U users; ``keys_sorted`` (U,)
    and ``order`` (U,) map an impression's key to its user's row.
    """

    key: str
    keys_sorted: np.ndarray
    order: np.ndarray
    columns: frozenset[str]
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.order)

    def rows_of(self, ikeys: np.ndarray, src: str, row_offset: int = 0) -> np.ndarray:
        """(N,) user rows of impression keys ``ikeys`` (N,); an unknown key is an error."""
        sk = self.keys_sorted
        pos = np.minimum(np.searchsorted(sk, ikeys), len(sk) - 1)
        missing = sk[pos] != ikeys
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise DataError(f"{src}: {int(missing.sum())} impression(s) have a {self.key!r} "
                            f"absent from the users table (first at row {row_offset + first}: "
                            f"{ikeys[first]!r})")
        return self.order[pos].astype(np.int64)


def encode_users(users: pa.Table, impression_columns: Sequence[str], spec: FeatureSpec,
                 cfg: DataConfig, src: str) -> UserSide:
    """Encode the user-side fields of a users table (the fields impressions do not carry)."""
    key = cfg.user_key
    if key not in users.column_names:
        raise DataError(f"{src}: the users table lacks the join key column {key!r} "
                        "(data.user_key)")
    ukeys = users.column(key).to_numpy(zero_copy_only=False)
    order = np.argsort(ukeys, kind="stable")
    sk = ukeys[order]
    if len(sk) == 0:
        raise DataError(f"{src}: the users table has no rows")
    if len(sk) > 1 and np.any(sk[1:] == sk[:-1]):
        dup = sk[1:][sk[1:] == sk[:-1]][0]
        raise DataError(f"{src}: users table has key {dup!r} more than once")
    cols = frozenset(users.column_names) - {key}
    side = UserSide(key, sk, order, cols)
    where = f"{src} (users)"
    for f in spec.fields:
        if f.name not in cols or f.name in impression_columns:
            continue
        sink = {"categorical": side.ids, "multi_categorical": side.bags, "dense": side.dense}
        sink[f.kind][f.name] = _ENCODERS[f.kind](users.column(f.name), f, where)
    uc = cfg.user_column
    if uc and uc in cols and uc not in impression_columns:
        side.groups = pc.fill_null(users.column(uc), 0).to_numpy()
    return side


def encode(raw: RawTables, spec: FeatureSpec, cfg: DataConfig, require_labels: bool = True,
           *, users: UserSide | None = None, row_offset: int = 0, quiet: bool = False
           ) -> EncodedData:
    """Validate and encode a split (or one chunk of it) into numpy arrays.

    Args:
        users: the split's users, already encoded (a streamed split encodes them once);
            None encodes ``raw.users`` here.
        row_offset: position of the chunk's first row in its file, for error messages.
        quiet: do not log dropped rows (a streamed split reports them once for the split).
    """
    src = raw.source
    imp = raw.impressions
    if imp.num_rows == 0:
        raise DataError(f"{src}: the table has no rows")
    rows_read = imp.num_rows

    # Labels first: rows may be dropped before any feature is encoded.
    click = conversion = None
    dropped = kept = 0
    if require_labels:
        click = _labels_array(imp, cfg.labels.click, src, "click", row_offset)
        conversion = _labels_array(imp, cfg.labels.conversion, src, "conversion", row_offset)
        bad = (conversion == 1) & (click == 0)
        n_bad = int(bad.sum())
        if n_bad:
            policy = cfg.conversion_without_click
            if policy == "error":
                first = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{src}: {n_bad} row(s) have conversion=1 with click=0 (first at row "
                    f"{row_offset + first}); set `data.conversion_without_click: drop` (or keep) "
                    "to go on"
                )
            if policy == "drop":
                keep = ~bad
                imp = imp.filter(pa.array(keep))
                click, conversion = click[keep], conversion[keep]
                dropped = n_bad
                if not quiet:
                    log.warning("%s: dropped %d row(s) with conversion=1 and click=0 "
                                "(data.conversion_without_click=drop)", src, n_bad)
            else:
                kept = n_bad
                if not quiet:
                    log.warning("%s: kept %d row(s) with conversion=1 and click=0; they count "
                                "as CTCVR negatives", src, n_bad)
        if imp.num_rows == 0 and not quiet:
            raise DataError(f"{src}: no rows left after dropping conversions without clicks")

    out = EncodedData(source=src, n=imp.num_rows, click=click, conversion=conversion,
                      rows_read=rows_read, dropped_conversion_without_click=dropped,
                      kept_conversion_without_click=kept)

    # Join impressions to users by key.
    if users is None and raw.users is not None:
        users = encode_users(raw.users, imp.column_names, spec, cfg, src)
    user_cols: frozenset[str] = frozenset()
    if users is not None:
        if users.key not in imp.column_names:
            raise DataError(f"{src}: the impressions table lacks the join key column "
                            f"{users.key!r} (data.user_key)")
        out.user_row = users.rows_of(imp.column(users.key).to_numpy(zero_copy_only=False), src,
                                     row_offset)
        out.n_users = users.n
        out.user_ids, out.user_bags = users.ids, users.bags
        user_cols = users.columns

    dense_cols = []
    where = f"{src} (impressions)" if users is not None else src
    if row_offset:
        where += f", rows from {row_offset}"
    for f in spec.fields:
        if f.name in imp.column_names:
            value = _ENCODERS[f.kind](imp.column(f.name), f, where)
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
                f"feature {f.name!r} named in the config is not in the data {src}; "
                f"columns present: {have[:40]}"
            )
    if dense_cols:
        out.dense = np.stack(dense_cols, axis=1)  # (N, n_dense)

    if cfg.weight_column:
        if cfg.weight_column not in imp.column_names:
            raise DataError(f"{src}: weight column {cfg.weight_column!r} (data.weight_column) "
                            "is missing")
        w = imp.column(cfg.weight_column).to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise DataError(f"{src}: weight column {cfg.weight_column!r} must hold finite "
                            "values >= 0")
        out.weight = w

    uc = cfg.user_column
    if uc:
        if uc in imp.column_names:
            out.groups = pc.fill_null(imp.column(uc), 0).to_numpy()
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
    raw = read_tables(path, cfg, columns=needed_columns(spec, cfg))
    return encode(raw, spec, cfg, require_labels=require_labels)
