"""Readers of published, already preprocessed Ali-CCP layouts.

Three layouts other projects publish are read into one flat table (one row per impression)
with esmm's label names, ``click`` and ``conversion``; feature columns keep their names:

``rechub-csv``
    torch-rechub's ``ali_ccp_{train,val,test}*.csv``: a header, ``click,purchase``, 23 sparse
    columns named by field id (vocabulary indices; 0 = missing or rare; a multi-valued field
    keeps only its last value) and 8 ``D<field>`` columns (the raw value, MinMax-scaled).
    Sparse columns are read as int64 ids, ``D*`` columns as float32.
``aitm-csv``
    AITM / PaddleRec ``ctr_cvr.*`` CSV: ``click,purchase`` and 18 sparse columns (vocabulary
    indices; field 210 and the ``*_14`` fields are not present). The header is optional: the
    published ``test.csv`` has none, and a file whose first line does not start with
    ``click,`` is read with the standard column names.
``paddle-esmm-txt``
    PaddleRec's ESMM ``small.txt``: ``sample_id,click,conversion,`` then ``field:id`` tokens,
    one per feature (ids re-numbered, values dropped; user features repeated on every line).
    Bag fields (210, 853, the ``*_14`` fields) become ``list<int64>`` columns in file order
    (empty where absent); other fields ``int64`` (null where absent). Every Ali-CCP field gets
    a column, present in the file or not. Every token is read, the first included.

``purchase`` is renamed ``conversion``. Labels are checked (0/1) when the table is encoded.
A path is a file or a folder of ``.csv`` / ``.txt`` files read in name order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from esmm.data.aliccp import COMMON_FIELDS, DEFAULT_BAG_FIELDS, SKELETON_FIELDS
from esmm.errors import DataError, UsageError

log = logging.getLogger(__name__)

__all__ = ["AITM_COLUMNS", "PUBLISHED_FORMATS", "RECHUB_COLUMNS", "read_aitm_csv",
           "read_paddle_esmm_txt", "read_published", "read_rechub_csv"]

PUBLISHED_FORMATS = ("rechub-csv", "aitm-csv", "paddle-esmm-txt")

RECHUB_COLUMNS = (
    "click", "purchase", "101", "121", "122", "124", "125", "126", "127", "128", "129", "205",
    "206", "207", "210", "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14",
    "150_14", "D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853",
)
AITM_COLUMNS = (
    "click", "purchase", "101", "121", "122", "124", "125", "126", "127", "128", "129", "205",
    "206", "207", "216", "508", "509", "702", "853", "301",
)
_LABELS = {"click": "click", "purchase": "conversion"}
_KNOWN_FIELDS = COMMON_FIELDS + SKELETON_FIELDS


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in (".csv", ".txt"))
        if not files:
            raise DataError(f"{path}: no .csv or .txt files in the folder")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty (0 bytes)")
    return files


def _first_bad_csv_line(path: Path, names: Sequence[str], header: bool,
                        kinds: dict[str, str]) -> str:
    """Find the first line that breaks the layout (slow: only after Arrow refused the file)."""
    with open(path, "rb") as fh:
        for no, raw in enumerate(fh, 1):
            if header and no == 1:
                continue
            cells = raw.rstrip(b"\r\n").split(b",")
            if len(cells) != len(names):
                return f"line {no}: {len(cells)} columns, expected {len(names)}"
            for name, cell in zip(names, cells, strict=True):
                try:
                    (float if kinds[name] == "float" else int)(cell)
                except ValueError:
                    return (f"line {no}, column {name!r}: {cell[:40]!r} is not "
                            f"{'a number' if kinds[name] == 'float' else 'an integer'}")
    return "cannot parse the file"


def _read_plain_csv(path: Path, names: Sequence[str], header: bool,
                    float_columns: Sequence[str] = ()) -> pa.Table:
    kinds = {n: "float" if n in float_columns else "int" for n in names}
    types = {n: pa.float32() if kinds[n] == "float" else pa.int64() for n in names}
    ro = pacsv.ReadOptions(column_names=list(names), skip_rows=1 if header else 0)
    co = pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False)
    try:
        t = pacsv.read_csv(path, read_options=ro, convert_options=co)
    except pa.ArrowInvalid:
        raise DataError(f"{path}: {_first_bad_csv_line(path, names, header, kinds)}") from None
    for lab in ("click", "purchase"):
        t = t.set_column(t.column_names.index(lab), _LABELS[lab], t.column(lab).cast(pa.int8()))
    return t


def _header(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        return fh.readline().decode("utf-8", "replace").strip().split(",")


def read_rechub_csv(path: str | Path) -> pa.Table:
    """torch-rechub's Ali-CCP CSV (a header is required)."""
    tables = []
    for f in _files(Path(path)):
        names = _header(f)
        lacking = [c for c in ("click", "purchase") if c not in names]
        if lacking:
            raise DataError(f"{f}, line 1: the header lacks {lacking}; a torch-rechub Ali-CCP "
                            f"file starts with {','.join(RECHUB_COLUMNS[:4])},...")
        dense = [n for n in names if n.startswith("D")]
        tables.append(_read_plain_csv(f, names, header=True, float_columns=dense))
    return _concat(tables, path)


def read_aitm_csv(path: str | Path) -> pa.Table:
    """AITM / PaddleRec ``ctr_cvr`` CSV, with or without its header line."""
    tables = []
    for f in _files(Path(path)):
        first = _header(f)
        header = bool(first) and first[0] == "click"
        names = first if header else list(AITM_COLUMNS)
        if header and [c for c in ("click", "purchase") if c not in names]:
            raise DataError(f"{f}, line 1: the header lacks 'purchase'")
        tables.append(_read_plain_csv(f, names, header=header))
    return _concat(tables, path)


def read_paddle_esmm_txt(path: str | Path,
                         bag_fields: Sequence[str] = DEFAULT_BAG_FIELDS) -> pa.Table:
    """PaddleRec's ESMM text layout: ``sample_id,click,conversion,field:id,...`` per line."""
    return _concat([_read_paddle_file(f, set(bag_fields)) for f in _files(Path(path))], path)


def _read_paddle_file(path: Path, bags: set[str]) -> pa.Table:
    text = path.read_bytes().replace(b"\r\n", b"\n")
    if text.endswith(b"\n"):
        text = text[:-1]
    lines = pc.split_pattern(pa.array([text], type=pa.large_binary()), "\n").flatten()
    n = len(lines)
    parts = pc.split_pattern(lines, ",")
    lens = pc.list_value_length(parts).to_numpy()
    short = np.flatnonzero(lens < 4)
    if len(short):
        raise DataError(f"{path}, line {int(short[0]) + 1}: expected sample_id,click,conversion "
                        "and at least one field:id token")
    flat = parts.flatten()
    starts = np.asarray(parts.offsets)[:-1].astype(np.int64)
    head = {}
    for j, name in enumerate(("sample_id", "click", "conversion")):
        col = flat.take(pa.array(starts + j)).cast(pa.string())
        ok = pc.match_substring_regex(col, r"^-?[0-9]+$").to_numpy(zero_copy_only=False)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DataError(f"{path}, line {i + 1}: {name} {col[i].as_py()[:40]!r} is not an "
                            "integer")
        head[name] = col.cast(pa.int64()).to_numpy()
    # Tokens: every list element after the first three of its line.
    tok_mask = np.ones(len(flat), dtype=bool)
    tok_mask[starts] = tok_mask[starts + 1] = tok_mask[starts + 2] = False
    tok_line = np.repeat(np.arange(n, dtype=np.int64), lens)[tok_mask]
    toks = flat.filter(pa.array(tok_mask)).cast(pa.string())
    ok = pc.match_substring_regex(toks, r"^[0-9A-Za-z_]+:-?[0-9]+$").to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{path}, line {int(tok_line[i]) + 1}: token {toks[i].as_py()[:40]!r} "
                        "is not field:id")
    fv = pc.split_pattern(toks, ":").flatten()
    m = len(toks)
    field_tok = fv.take(pa.array(np.arange(m, dtype=np.int64) * 2))
    ids = fv.take(pa.array(np.arange(m, dtype=np.int64) * 2 + 1)).cast(pa.int64()).to_numpy()
    enc = pc.dictionary_encode(field_tok)
    names = [str(v) for v in enc.dictionary.to_pylist()]
    codes = enc.indices.to_numpy()
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(head["sample_id"]),
        "click": pa.array(head["click"].astype(np.int8)),
        "conversion": pa.array(head["conversion"].astype(np.int8)),
    }
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    where = {name: order[bounds[k]:bounds[k + 1]] for k, name in enumerate(names)}
    extra = sorted(set(names) - set(_KNOWN_FIELDS))
    for name in (*_KNOWN_FIELDS, *extra):  # every Ali-CCP field, absent ones included
        sl = where.get(name, np.zeros(0, dtype=np.int64))
        li, fid = tok_line[sl], ids[sl]
        cnt = np.bincount(li, minlength=n)
        if name in bags:
            off = np.zeros(n + 1, dtype=np.int32)
            np.cumsum(cnt, out=off[1:])
            cols[name] = pa.ListArray.from_arrays(pa.array(off), pa.array(fid, type=pa.int64()))
        else:
            rep = np.flatnonzero(cnt > 1)
            if len(rep):
                raise DataError(f"{path}, line {int(rep[0]) + 1}: field {name} appears "
                                f"{int(cnt[rep[0]])} times but is single-valued")
            col = np.zeros(n, dtype=np.int64)
            col[li] = fid
            cols[name] = pa.array(col, mask=cnt == 0) if (cnt == 0).any() else pa.array(col)
    return pa.table(cols)


def _concat(tables: list[pa.Table], path: str | Path) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: the files do not share one layout: {e}") from None


def read_published(path: str | Path, fmt: str, columns: Sequence[str] | None = None
                   ) -> pa.Table:
    """Read ``path`` in the published layout ``fmt`` (one of :data:`PUBLISHED_FORMATS`).

    ``columns``: keep only these columns (those present)."""
    readers = {"rechub-csv": read_rechub_csv, "aitm-csv": read_aitm_csv,
               "paddle-esmm-txt": read_paddle_esmm_txt}
    if fmt not in readers:
        raise UsageError(f"unknown published format {fmt!r}: expected one of "
                         f"{', '.join(PUBLISHED_FORMATS)}")
    t = readers[fmt](path)
    log.info("%s: read %d rows in the %s layout", path, t.num_rows, fmt)
    if columns is not None:
        t = t.select([c for c in columns if c in t.column_names])
    return t
