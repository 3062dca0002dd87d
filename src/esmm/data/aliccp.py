"""Ali-CCP raw files to a normalized Parquet dataset, streamed with bounded memory.

Input: the two files of one Ali-CCP split, as downloaded (see ``docs/aliccp.md``):

* ``sample_skeleton_{split}.csv``: ``sample_id,click,conversion,common_feature_index,
  num_features,feature_list``, one impression per line;
* ``common_features_{split}.csv``: ``common_feature_index,num_features,feature_list``, one
  common key (a user context) per line.

A feature list is entries joined by ``\\x01``; an entry is ``field \\x02 feature_id \\x03 value``.

Output, readable by :func:`esmm.data.tables.read_tables` as a normalized folder::

    OUT/impressions/part-00000.parquet ...   one row per kept skeleton line
    OUT/users/part-00000.parquet ...         one row per kept common line
    OUT/summary.json                         counts, rates, per-field statistics

Every field ``F`` becomes two columns: ``F`` (the feature ids) and ``F__v`` (their values). A
single-valued field is ``int64`` / ``float32`` (null where the line lacks the field); a bag field
(``bag_fields``, by default 210, 853 and the ``*_14`` user fields) is ``list<int64>`` /
``list<float32>`` in file order (an empty list where absent). Nothing is truncated.

The 16-hex-digit ``common_feature_index`` becomes the int64 column ``common_key``: the key read
as an unsigned 64-bit integer and stored with the same 64 bits as a signed int64, so joins run
on integers. :func:`key_to_int` and :func:`int_to_key` convert one key either way.

Both files are read in fixed-size byte blocks cut at line ends. A block is parsed with
vectorised Arrow and numpy operations: the separators are remapped in one ``bytes.translate``
pass so that Arrow's CSV reader parses every entry as a ``field,id,value`` row. A block that
does not parse is bisected down to a few lines, and only those lines are explained one by one
in Python, to name the line and the reason. Memory is bounded by the block size (or the longest
line) and one output row group, whatever the size of the files, plus the common keys (about 18
bytes each) and the per-field distinct-id bitmaps (one bit per id value, see
:class:`_DistinctIds`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esmm.errors import DataError, UsageError
from esmm.fsio import atomic_path, prepare_dir_output, write_text

log = logging.getLogger(__name__)

__all__ = [
    "COMMON_FIELDS",
    "DEFAULT_BAG_FIELDS",
    "GROUND_TRUTH_COLUMNS",
    "SKELETON_FIELDS",
    "VALUE_SUFFIX",
    "ingest",
    "int_to_key",
    "key_to_int",
    "simulate_raw",
    "write_raw",
]

SKELETON_FIELDS = ("205", "206", "207", "216", "301", "508", "509", "702", "853", "210")
COMMON_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129",
                 "109_14", "110_14", "127_14", "150_14")
DEFAULT_BAG_FIELDS = ("210", "853", "109_14", "110_14", "127_14", "150_14")
VALUE_SUFFIX = "__v"
GROUND_TRUTH_COLUMNS = ("p_click", "p_conversion", "conversion_if_clicked")

DEFAULT_BLOCK_BYTES = 8 << 20
DEFAULT_SHARD_ROWS = 1_000_000
_DISTINCT_BITMAP_LIMIT = 1 << 30  # ids in [0, 2**30) are counted in a bitmap (<= 128 MiB)
_DISTINCT_SET_LIMIT = 1 << 20  # other ids: an exact set up to this many, then a lower bound
_ROW_GROUP_ROWS = 1 << 17  # Parquet row groups: at most this many rows
_ROW_GROUP_BYTES = 32 << 20  # or about this many bytes
_FALLBACK_LINES = 16  # a failing chunk of at most this many lines is parsed line by line
_LOGGED_BAD_LINES = 20

# Reasons a line is refused, in the order they are checked (summary.json uses these names).
REASONS = (
    "empty_line", "encoding", "columns", "sample_id", "label", "key", "num_features_value",
    "entry", "field", "id", "value", "num_features", "repeated_field", "unknown_key",
    "duplicate_key", "unparsable",
)
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}

# One pass turns a line into CSV rows of ``field,id,value``: entries end at \x01 (now \n),
# \x02 and \x03 become the CSV delimiter, and the line's own commas become \x02, so the first
# row of a line carries the line's leading columns glued to its first field.
_TRANSLATE = bytes.maketrans(b",\x01\x02\x03", b"\x02\n,,")
_PARSE = pacsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False,
                            double_quote=False, newlines_in_values=False,
                            ignore_empty_lines=False)
_HEAD_PARSE = pacsv.ParseOptions(delimiter="\x02", quote_char=False, escape_char=False,
                                 double_quote=False, newlines_in_values=False,
                                 ignore_empty_lines=False)
_EMPTY_LIST_ENTRY = b"\x7f\x02-1\x030"  # stands for an empty feature list while parsing
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_INT_RE = re.compile(rb"^[ \t]*-?[0-9]+[ \t]*$")
_FLOAT_RE = re.compile(rb"^[ \t]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?[ \t]*$")


# --------------------------------------------------------------------------------------------
# Keys


def key_to_int(key: str | bytes) -> int:
    """The int64 ``common_key`` of a 16-hex-digit ``common_feature_index``."""
    text = key.decode("ascii") if isinstance(key, bytes) else key
    if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"common_feature_index {text!r} is not 16 hex digits")
    return int(np.array([int(text, 16)], dtype=np.uint64).view(np.int64)[0])


def int_to_key(value: int) -> str:
    """The 16-hex-digit ``common_feature_index`` of an int64 ``common_key``."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


def _binary_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n + 1, absolute into the data buffer) and data bytes of a binary array."""
    bufs = arr.buffers()
    large = pa.types.is_large_binary(arr.type) or pa.types.is_large_string(arr.type)
    off = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32)
    off = off[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    buf = bufs[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    return off, data


def _parse_keys(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse 16-hex-digit keys. Returns (int64 keys, ok mask); keys are 0 where not ok."""
    off, data = _binary_parts(arr)
    n = len(arr)
    keys = np.zeros(n, dtype=np.uint64)
    ok = np.diff(off) == 16
    rows = np.flatnonzero(ok)
    if len(rows):
        nib = _HEX[data[off[:-1][rows][:, None] + np.arange(16)]]
        good = (nib < 16).all(axis=1)
        packed = (nib[:, 0::2] << 4) | (nib[:, 1::2] & 15)  # (k, 8) bytes, big-endian
        keys[rows] = np.ascontiguousarray(packed).view(">u8")[:, 0].astype(np.uint64)
        ok[rows[~good]] = False
        keys[rows[~good]] = 0
    return keys.view(np.int64), ok


def _format_keys(keys: np.ndarray) -> pa.Array:
    """16-hex-digit strings of int64 keys (vectorised)."""
    u = np.asarray(keys, dtype=np.int64).view(np.uint64)
    mat = np.empty((len(u), 16), dtype=np.uint8)
    for i in range(16):
        mat[:, i] = _HEX_DIGITS[((u >> np.uint64(4 * (15 - i))) & np.uint64(15)).astype(np.intp)]
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(u),
                                                 [None, pa.py_buffer(mat.tobytes())])
    return fixed.cast(pa.binary()).cast(pa.string())


# --------------------------------------------------------------------------------------------
# File layouts


@dataclass(frozen=True)
class _Spec:
    kind: str  # "skeleton" | "common"
    head: tuple[tuple[str, pa.DataType], ...]  # the columns before the feature list
    fields: tuple[str, ...]
    bags: frozenset[str]

    @property
    def ncols(self) -> int:
        return len(self.head) + 1

    @property
    def column_names(self) -> str:
        shown = {"key": "common_feature_index", "num": "num_features"}
        return ",".join([shown.get(n, n) for n, _ in self.head] + ["feature_list"])

    def field_set(self) -> pa.Array:
        return pa.array([f.encode() for f in self.fields], type=pa.binary())


def _spec(kind: str, fields: Sequence[str], bags: Iterable[str]) -> _Spec:
    if kind == "skeleton":
        head = (("sample_id", pa.int64()), ("click", pa.binary()), ("conversion", pa.binary()),
                ("key", pa.binary()), ("num", pa.int64()))
    else:
        head = (("key", pa.binary()), ("num", pa.int64()))
    return _Spec(kind, head, tuple(fields), frozenset(b for b in bags if b in fields))


def _schema(spec: _Spec, extra: Sequence[tuple[str, pa.DataType]] = ()) -> pa.Schema:
    cols: list[tuple[str, pa.DataType]] = []
    if spec.kind == "skeleton":
        cols += [("sample_id", pa.int64()), ("common_key", pa.int64()), ("click", pa.int8()),
                 ("conversion", pa.int8())]
    else:
        cols += [("common_key", pa.int64())]
    for f in spec.fields:
        cols.append((f, pa.list_(pa.int64()) if f in spec.bags else pa.int64()))
    for f in spec.fields:
        cols.append((f + VALUE_SUFFIX,
                     pa.list_(pa.float32()) if f in spec.bags else pa.float32()))
    cols += list(extra)
    return pa.schema(cols)


# --------------------------------------------------------------------------------------------
# Parsing a block of complete lines


class _Unparsable(Exception):
    """The vectorised parser cannot take this chunk as a whole."""


@dataclass
class _Lines:
    """Parsed lines of a chunk. ``status`` is 0 for a good line, else a reason code; ``detail``
    holds the messages already known (lines explained one by one)."""

    n: int
    status: np.ndarray  # (n,) uint8
    head: dict[str, np.ndarray]  # (n,) int64 each: sample_id, click, conversion, key, num
    e_line: np.ndarray  # (M,) int64 line of each entry
    e_field: np.ndarray  # (M,) int8 index into spec.fields
    e_id: np.ndarray  # (M,) int64
    e_val: np.ndarray  # (M,) float32
    detail: dict[int, str] = field(default_factory=dict)

    @staticmethod
    def bad(spec: _Spec, code: int, message: str) -> _Lines:
        return _Lines(1, np.array([code], dtype=np.uint8),
                      {n: np.zeros(1, dtype=np.int64) for n, _ in spec.head},
                      np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64),
                      np.zeros(0, np.float32), {0: message})

    @staticmethod
    def concat(parts: list[_Lines]) -> _Lines:
        if len(parts) == 1:
            return parts[0]
        base = np.cumsum([0] + [p.n for p in parts])
        detail = {int(b) + i: m for p, b in zip(parts, base, strict=False)
                  for i, m in p.detail.items()}
        return _Lines(
            int(base[-1]), np.concatenate([p.status for p in parts]),
            {k: np.concatenate([p.head[k] for p in parts]) for k in parts[0].head},
            np.concatenate([p.e_line + b for p, b in zip(parts, base, strict=False)]),
            np.concatenate([p.e_field for p in parts]), np.concatenate([p.e_id for p in parts]),
            np.concatenate([p.e_val for p in parts]), detail)


def _read_csv(data: bytes, names: list[str], types: dict[str, pa.DataType],
              parse: pacsv.ParseOptions) -> pa.Table:
    ro = pacsv.ReadOptions(column_names=names, block_size=max(1 << 22, min(len(data) + 1,
                                                                             1 << 24)))
    co = pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                              quoted_strings_can_be_null=False)
    try:
        return pacsv.read_csv(pa.BufferReader(data), read_options=ro, parse_options=parse,
                              convert_options=co)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise _Unparsable(str(e)) from None


def _parse_fast(data: bytes, n_lines: int, spec: _Spec) -> _Lines:
    """Parse ``n_lines`` complete lines (each ending with \\n) without a per-line loop.

    Raises _Unparsable when the chunk does not have the expected shape somewhere; lines that
    parse but break a rule (labels, key, counts, fields, values) get a status code instead."""
    if b"\r" in data:  # Arrow's CSV reader would take a lone \r for a line end
        raise _Unparsable("carriage return inside a line")
    types = {"f": pa.binary(), "id": pa.int64(), "v": pa.float32()}
    try:
        ent = _read_csv(data.translate(_TRANSLATE), ["f", "id", "v"], types, _PARSE)
    except _Unparsable:
        if b",\n" not in data:
            raise
        # An empty feature list: parse a placeholder entry instead, removed below.
        data = data.replace(b",\n", b"," + _EMPTY_LIST_ENTRY + b"\n")
        ent = _read_csv(data.translate(_TRANSLATE), ["f", "id", "v"], types, _PARSE)
    total = ent.num_rows
    # Every row has two delimiters, each an \x02 or an \x03 of the line: as many \x02 as
    # rows means one of each per entry.
    if data.count(b"\x02") != total:
        raise _Unparsable("an entry does not have one \\x02 and one \\x03")
    f = ent.column("f").combine_chunks()
    # Rows holding \x02 (a line's own commas) start the lines.
    head_rows = pc.indices_nonzero(pc.match_substring(f, "\x02")).to_numpy().astype(np.int64)
    if len(head_rows) != n_lines or (n_lines and head_rows[0] != 0):
        raise _Unparsable("a line does not start with its leading columns")
    heads = f.take(pa.array(head_rows))
    joined = pc.binary_join_element_wise(heads, pa.scalar(b"\n"), pa.scalar(b""))
    off, buf = _binary_parts(joined)
    head_bytes = buf[off[0]:off[-1]].tobytes()
    names = [n for n, _ in spec.head] + ["field"]
    types = {**dict(spec.head), "field": pa.binary()}
    head = _read_csv(head_bytes, names, types, _HEAD_PARSE)
    if head.num_rows != n_lines:
        raise _Unparsable("leading columns do not match the lines")

    # Field of each entry; the first entry's field name ends the leading columns.
    value_set = spec.field_set()
    fidx = pc.fill_null(pc.index_in(f, value_set=value_set), -1).to_numpy().astype(np.int8)
    head_field = head.column("field").combine_chunks()
    fidx[head_rows] = pc.fill_null(pc.index_in(head_field, value_set=value_set),
                                   -1).to_numpy()
    counts = np.diff(np.append(head_rows, total))
    e_line = np.repeat(np.arange(n_lines, dtype=np.int64), counts)
    e_id = ent.column("id").to_numpy()
    e_val = ent.column("v").to_numpy()
    status = np.zeros(n_lines, dtype=np.uint8)
    placeholder = None
    if b"\x7f" in data:
        ph = (pc.equal(head_field, pa.scalar(b"\x7f")).to_numpy(zero_copy_only=False)
              & (e_id[head_rows] == -1))
        if ph.any():
            placeholder = np.zeros(total, dtype=bool)
            placeholder[head_rows[ph]] = True
            ph_lines = np.flatnonzero(ph)
            # A placeholder stands for a whole (empty) list; anything beside it is malformed.
            status[ph_lines[counts[ph_lines] != 1]] = _CODE["entry"]
            counts = counts.copy()
            counts[ph_lines] -= 1
            keep = ~placeholder
            e_line, e_id, e_val, fidx = e_line[keep], e_id[keep], e_val[keep], fidx[keep]

    h: dict[str, np.ndarray] = {}
    for name, typ in spec.head:
        if name == "key":
            continue
        col = head.column(name)
        if typ == pa.binary():  # a label: exactly "0" or "1"; 2 marks anything else
            one = pc.equal(col, pa.scalar(b"1")).to_numpy(zero_copy_only=False)
            zero = pc.equal(col, pa.scalar(b"0")).to_numpy(zero_copy_only=False)
            h[name] = np.where(one, 1, np.where(zero, 0, 2)).astype(np.int64)
        else:
            h[name] = col.to_numpy()
    keys, key_ok = _parse_keys(head.column("key").combine_chunks())
    h["key"] = keys

    # Rule checks, least important first: the last assignment wins.
    width = len(spec.fields)
    single = np.array([f not in spec.bags for f in spec.fields], dtype=bool)
    unknown = fidx < 0
    any_unknown = bool(unknown.any())
    if single.any() and len(e_line):
        code = e_line * width + (np.maximum(fidx, 0) if any_unknown else fidx)
        per = np.bincount(code, minlength=n_lines * width).reshape(n_lines, width)
        status[(per[:, single] > 1).any(axis=1)] = _CODE["repeated_field"]
    status[h["num"] != counts] = _CODE["num_features"]
    bad_val = ~np.isfinite(e_val)
    if bad_val.any():
        status[np.bincount(e_line[bad_val], minlength=n_lines) > 0] = _CODE["value"]
    if any_unknown:
        status[np.bincount(e_line[unknown], minlength=n_lines) > 0] = _CODE["field"]
    status[~key_ok] = _CODE["key"]
    for lab in ("click", "conversion"):
        if lab in h:
            status[(h[lab] != 0) & (h[lab] != 1)] = _CODE["label"]
    return _Lines(n_lines, status, h, e_line, fidx, e_id, e_val.astype(np.float32, copy=False))


def _parse(data: bytes, n_lines: int, spec: _Spec) -> _Lines:
    """Parse a chunk; where the vectorised parser fails, bisect and explain single lines."""
    try:
        return _parse_fast(data, n_lines, spec)
    except _Unparsable as err:
        if n_lines <= _FALLBACK_LINES:
            parts = []
            for line in data.split(b"\n")[:n_lines]:
                try:
                    parts.append(_parse_fast(line + b"\n", 1, spec))
                except _Unparsable as e:
                    why = diagnose(line, spec) or (_CODE["unparsable"],
                                                   f"cannot be parsed ({e})")
                    parts.append(_Lines.bad(spec, *why))
            return _Lines.concat(parts)
        cut = data.rfind(b"\n", 0, len(data) // 2) + 1
        if cut <= 0:
            cut = data.find(b"\n") + 1
        left = data[:cut]
        n_left = left.count(b"\n")
        if n_left in (0, n_lines):  # pragma: no cover - cannot happen with n_lines >= 2
            raise DataError(f"internal error while parsing: {err}") from None
        return _Lines.concat([_parse(left, n_left, spec),
                              _parse(data[cut:], n_lines - n_left, spec)])


def _is_int(tok: bytes) -> bool:
    if not _INT_RE.match(tok):
        return False
    return -(1 << 63) <= int(tok) < (1 << 63)


def _finite32(tok: bytes) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(float(tok))))


def diagnose(line: bytes, spec: _Spec) -> tuple[int, str] | None:
    """Why a line is malformed: (reason code, message), or None when it is well formed.

    Slow (plain Python): only used to explain lines the vectorised parser refused."""
    if not line:
        return _CODE["empty_line"], "empty line"
    if b"\r" in line:
        return _CODE["encoding"], "carriage return (\\r) inside the line"
    parts = line.split(b",")
    if len(parts) != spec.ncols:
        return _CODE["columns"], (f"{len(parts)} comma-separated columns, expected "
                                  f"{spec.ncols} ({spec.column_names})")
    head = dict(zip([n for n, _ in spec.head], parts, strict=False))
    if "sample_id" in head and not _is_int(head["sample_id"]):
        return _CODE["sample_id"], f"sample_id {_show(head['sample_id'])} is not an integer"
    for lab in ("click", "conversion"):
        if lab in head and head[lab] not in (b"0", b"1"):
            return _CODE["label"], f"{lab} is {_show(head[lab])}, expected 0 or 1"
    key = head["key"]
    if len(key) != 16 or any(_HEX[c] > 15 for c in key):
        return _CODE["key"], f"common_feature_index {_show(key)} is not 16 hex digits"
    if not _is_int(head["num"]):
        return _CODE["num_features_value"], (f"num_features {_show(head['num'])} is not an "
                                             "integer")
    fl = parts[-1]
    entries = fl.split(b"\x01") if fl else []
    seen: dict[bytes, int] = {}
    for i, e in enumerate(entries, 1):
        name, sep, rest = e.partition(b"\x02")
        fid, sep2, val = rest.partition(b"\x03")
        if not sep or not sep2 or b"\x02" in rest or b"\x03" in val:
            return _CODE["entry"], (f"entry {i} {_show(e)} is not field\\x02id\\x03value")
        if name.decode("utf-8", "replace") not in spec.fields:
            return _CODE["field"], (f"entry {i}: unknown field {_show(name)} (a {spec.kind} "
                                    f"field is one of {', '.join(spec.fields)})")
        if not _is_int(fid):
            return _CODE["id"], (f"entry {i} (field {name.decode()}): feature id {_show(fid)} "
                                 "is not an integer")
        if not _FLOAT_RE.match(val) or not _finite32(val):
            return _CODE["value"], (f"entry {i} (field {name.decode()}): value {_show(val)} is "
                                    "not a finite number")
        seen[name] = seen.get(name, 0) + 1
    if int(head["num"]) != len(entries):
        return _CODE["num_features"], (f"num_features is {int(head['num'])} but the feature "
                                       f"list holds {len(entries)} entries")
    for name, k in seen.items():
        if k > 1 and name.decode() not in spec.bags:
            return _CODE["repeated_field"], (
                f"field {name.decode()} appears {k} times but is read as single-valued (add it "
                "to the bag fields to keep every value)")
    return None


def _show(tok: bytes, limit: int = 40) -> str:
    text = repr(tok[:limit])[1:]
    return text + ("..." if len(tok) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading blocks of lines


@dataclass
class _FileStats:
    path: str
    bytes: int = 0
    lines: int = 0
    crlf_lines: int = 0
    last_line_without_newline: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "lines": self.lines,
                "crlf_lines": self.crlf_lines,
                "last_line_without_newline": self.last_line_without_newline,
                "seconds": round(self.seconds, 3),
                "mb_per_s": round(self.bytes / 1e6 / self.seconds, 1) if self.seconds else None}


def _blocks(path: Path, block_bytes: int, stats: _FileStats
            ) -> Iterator[tuple[bytes, int, int, bool]]:
    """Complete lines of ``path`` in chunks of about ``block_bytes`` bytes.

    Yields (data, number of the first line (1-based), number of lines, whether the last line
    lacked its newline); ``data`` ends with \\n. A last line without a newline gets one (and is
    flagged in ``stats``); CRLF becomes LF."""
    line_no = 1
    carry = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block_bytes)
            stats.bytes += len(chunk)
            if not chunk:
                if not carry:
                    return
                stats.last_line_without_newline = True
                log.warning("%s: the last line has no newline (the file may be truncated); "
                            "it is read as a line", path)
                data = carry + b"\n"
                carry = b""
                open_end = True
            else:
                open_end = False
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    carry += chunk  # a line longer than the block: read on
                    continue
                if not carry and cut == len(chunk):
                    data = chunk
                else:
                    data = b"".join((carry, memoryview(chunk)[:cut]))
                carry = chunk[cut:]
            if b"\r" in data:
                stats.crlf_lines += data.count(b"\r\n")
                data = data.replace(b"\r\n", b"\n")
            n = data.count(b"\n")
            stats.lines += n
            yield data, line_no, n, open_end
            line_no += n


# --------------------------------------------------------------------------------------------
# Statistics


class _DistinctIds:
    """Exact distinct-id count of one field in bounded memory.

    Ids in [0, 2**30) set bits of a bitmap that grows to the largest id seen (at most 128 MiB;
    1.25 MiB for ids below 10**7, as in Ali-CCP). Other ids go to a sorted set of at most
    2**20 ids; past that the count is reported as a lower bound (``distinct_exact: false``)."""

    def __init__(self) -> None:
        self.bits = np.zeros(0, dtype=np.uint8)
        self.others = np.zeros(0, dtype=np.int64)
        self.exact = True

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        small = (ids >= 0) & (ids < _DISTINCT_BITMAP_LIMIT)
        s = ids[small] if not small.all() else ids
        if len(s):
            need = int(s.max() >> 3) + 1
            if need > len(self.bits):
                grown = np.zeros(max(need, 2 * len(self.bits)), dtype=np.uint8)
                grown[:len(self.bits)] = self.bits
                self.bits = grown
            np.bitwise_or.at(self.bits, s >> 3, np.left_shift(1, s & 7).astype(np.uint8))
        if not small.all() and self.exact:
            o = np.sort(np.concatenate([self.others, ids[~small]]))
            o = o[np.concatenate([[True], o[1:] != o[:-1]])]
            if len(o) > _DISTINCT_SET_LIMIT:
                self.exact = False
                o = o[:_DISTINCT_SET_LIMIT]
            self.others = o

    def count(self) -> int:
        bits = int(np.unpackbits(self.bits).sum()) if len(self.bits) else 0
        return bits + len(self.others)


class _TableStats:
    """Counts of one output table (impressions or users)."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        self.rows_in = 0
        self.rows_written = 0
        self.malformed: dict[str, int] = {}
        self.dropped_cwc = 0
        self.kept_cwc = 0
        self.clicks = 0
        self.conversions = 0
        self.shards = 0
        self.present = dict.fromkeys(spec.fields, 0)
        self.entries = dict.fromkeys(spec.fields, 0)
        self.not_one = dict.fromkeys(spec.fields, 0)
        self.distinct = {f: _DistinctIds() for f in spec.fields}
        self.extra: dict[str, Any] = {}

    @property
    def n_malformed(self) -> int:
        return sum(self.malformed.values())

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 8) if b else None

        dropped = {"malformed": self.n_malformed}
        if self.spec.kind == "skeleton":
            dropped["conversion_without_click"] = self.dropped_cwc
        out: dict[str, Any] = {
            "rows_in": self.rows_in,
            "rows_written": self.rows_written,
            "rows_dropped": sum(dropped.values()),
            "dropped": dropped,
            "malformed_by_reason": dict(sorted(self.malformed.items())),
        }
        if self.spec.kind == "skeleton":
            out.update({
                "kept_conversion_without_click": self.kept_cwc,
                "clicks": self.clicks,
                "conversions": self.conversions,
                "ctr": ratio(self.clicks, self.rows_written),
                "conversions_per_click": ratio(self.conversions, self.clicks),
                "ctcvr": ratio(self.conversions, self.rows_written),
            })
        out.update(self.extra)
        out["shards"] = self.shards
        fields = {}
        for f in self.spec.fields:
            d = self.distinct[f]
            fields[f] = {
                "kind": "bag" if f in self.spec.bags else "single",
                "rows_present": self.present[f],
                "presence": ratio(self.present[f], self.rows_written),
                "entries": self.entries[f],
                "entries_per_row": ratio(self.entries[f], self.rows_written),
                "values_not_1": self.not_one[f],
                "distinct_ids": d.count(),
                "distinct_exact": d.exact,
            }
        out["fields"] = fields
        return out


# --------------------------------------------------------------------------------------------
# Writing shards


class _Background:
    """Runs write calls on one background thread (Parquet encoding overlaps with parsing);
    at most two calls wait in line, so memory stays bounded."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="esmm-aliccp-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    item[0](*item[1])
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                    self.error = e

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, args))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _ShardWriter:
    """Parquet files of at most ``shard_rows`` rows each: ``part-00000.parquet``, ...

    Small tables are gathered into row groups of up to ``_ROW_GROUP_ROWS`` rows or
    ``_ROW_GROUP_BYTES`` bytes before they are written."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int):
        self.folder = folder
        self.schema = schema
        self.shard_rows = shard_rows
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_shard = 0
        self.shards = 0
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            room = self.shard_rows - self.rows_in_shard - self.pending_rows
            piece = table.slice(0, room)
            table = table.slice(piece.num_rows)
            self.pending.append(piece)
            self.pending_rows += piece.num_rows
            self.pending_bytes += piece.nbytes
            if (self.rows_in_shard + self.pending_rows >= self.shard_rows
                    or self.pending_rows >= _ROW_GROUP_ROWS
                    or self.pending_bytes >= _ROW_GROUP_BYTES):
                self._flush()

    def _flush(self) -> None:
        if not self.pending_rows:
            return
        if self.writer is None:
            path = self.folder / f"part-{self.shards:05d}.parquet"
            self.writer = pq.ParquetWriter(path, self.schema)
            self.shards += 1
        group = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.writer.write_table(group, row_group_size=max(1, group.num_rows))
        self.rows_in_shard += group.num_rows
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        if self.rows_in_shard >= self.shard_rows:
            self.writer.close()
            self.writer = None
            self.rows_in_shard = 0

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.shards == 0:  # no rows: one empty file keeps the folder readable
            pq.write_table(self.schema.empty_table(), self.folder / "part-00000.parquet")
            self.shards = 1


# --------------------------------------------------------------------------------------------
# Assembling tables


def _columns(lines: _Lines, keep: np.ndarray, spec: _Spec, stats: _TableStats
             ) -> dict[str, pa.Array]:
    """Field columns of the kept lines; per-field statistics are updated on the way."""
    m = int(np.count_nonzero(keep))
    if m == lines.n:
        e_line, e_field, e_id, e_val = lines.e_line, lines.e_field, lines.e_id, lines.e_val
    else:
        new = np.cumsum(keep) - 1
        ek = keep[lines.e_line]
        e_line = new[lines.e_line[ek]]
        e_field = lines.e_field[ek]
        e_id = lines.e_id[ek]
        e_val = lines.e_val[ek]
    order = np.argsort(e_field, kind="stable")  # by field; line and file order kept within
    bounds = np.searchsorted(e_field[order], np.arange(len(spec.fields) + 1))
    e_line, e_id, e_val = e_line[order], e_id[order], e_val[order]
    ids: dict[str, pa.Array] = {}
    vals: dict[str, pa.Array] = {}
    for j, f in enumerate(spec.fields):
        sl = slice(bounds[j], bounds[j + 1])
        li, fid, fv = e_line[sl], e_id[sl], e_val[sl]
        stats.entries[f] += len(li)
        stats.not_one[f] += int(np.count_nonzero(fv != 1.0))
        stats.distinct[f].add(fid)
        if f in spec.bags:
            off = np.zeros(m + 1, dtype=np.int32)
            cnt = np.bincount(li, minlength=m)
            np.cumsum(cnt, out=off[1:])
            stats.present[f] += int(np.count_nonzero(cnt))
            offsets = pa.array(off)
            ids[f] = pa.ListArray.from_arrays(offsets, pa.array(fid, type=pa.int64()))
            vals[f] = pa.ListArray.from_arrays(offsets, pa.array(fv, type=pa.float32()))
        else:
            stats.present[f] += len(li)
            col = np.zeros(m, dtype=np.int64)
            col[li] = fid
            vcol = np.zeros(m, dtype=np.float32)
            vcol[li] = fv
            if len(li) == m:
                ids[f], vals[f] = pa.array(col), pa.array(vcol)
            else:
                missing = np.ones(m, dtype=bool)
                missing[li] = False
                ids[f] = pa.array(col, mask=missing)
                vals[f] = pa.array(vcol, mask=missing)
    out = dict(ids)
    out.update({f + VALUE_SUFFIX: v for f, v in vals.items()})
    return out


class _GroundTruth:
    """Ground-truth rows streamed from a Parquet file in skeleton line order."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise DataError(f"{path}: no such ground-truth file")
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from None
        names = self.file.schema_arrow.names
        need = ["sample_id", *GROUND_TRUTH_COLUMNS]
        lacking = [c for c in need if c not in names]
        if lacking:
            raise DataError(f"{path}: ground-truth file lacks column(s) {lacking}")
        self.path = path
        self.schema = pa.schema([self.file.schema_arrow.field(c) for c in need])
        self.batches = self.file.iter_batches(batch_size=1 << 16, columns=need)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows_read = 0

    def take(self, n: int) -> pa.Table:
        while self.pending_rows < n:
            b = next(self.batches, None)
            if b is None:
                have = self.rows_read + self.pending_rows
                raise DataError(f"{self.path}: the ground-truth file has {have} rows, fewer "
                                "than the skeleton's lines")
            self.pending.append(b)
            self.pending_rows += b.num_rows
        t = pa.Table.from_batches(self.pending, schema=self.schema)
        out, rest = t.slice(0, n), t.slice(n)
        self.pending = rest.to_batches()
        self.pending_rows = rest.num_rows
        self.rows_read += n
        return out

    def finish(self) -> None:
        left = self.pending_rows + sum(b.num_rows for b in self.batches)
        if left:
            raise DataError(f"{self.path}: the ground-truth file has {left} more rows than the "
                            "skeleton has lines")


class _Ingest:
    """State of one ingestion: options, common keys, statistics, writers."""

    def __init__(self, skeleton: Path, common: Path, out: Path, on_error: str,
                 conversion_without_click: str, shard_rows: int, block_bytes: int,
                 bag_fields: Sequence[str], ground_truth: Path | None, workers: int):
        self.skeleton, self.common, self.out = skeleton, common, out
        self.workers = workers
        self.on_error = on_error
        self.cwc = conversion_without_click
        self.shard_rows = shard_rows
        self.block_bytes = block_bytes
        self.skel_spec = _spec("skeleton", SKELETON_FIELDS, bag_fields)
        self.common_spec = _spec("common", COMMON_FIELDS, bag_fields)
        self.gt = _GroundTruth(ground_truth) if ground_truth is not None else None
        # Common keys, sorted, with the line each came from.
        self.keys = np.zeros(0, dtype=np.int64)
        self.key_lines = np.zeros(0, dtype=np.int64)
        self.used: np.ndarray | None = None  # per sorted key: referenced by an impression
        self.closed: np.ndarray | None = None  # per sorted key: its run of lines has ended
        self.open_run = -1
        self.runs_reopened = 0
        self.logged_bad = 0

    def _parsed(self, path: Path, spec: _Spec, fstats: _FileStats
                ) -> Iterator[tuple[bytes, int, int, bool, _Lines]]:
        """Blocks of ``path`` with their parsed lines, in file order. With ``workers`` > 1,
        the next blocks are parsed on worker threads while this one is handled."""
        blocks = _blocks(path, self.block_bytes, fstats)
        if self.workers <= 1:
            for data, first, n, open_end in blocks:
                yield data, first, n, open_end, _parse(data, n, spec)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="esmm-aliccp-parse") as ex:
            window: deque = deque()
            for block in blocks:
                window.append((block, ex.submit(_parse, block[0], block[2], spec)))
                if len(window) > self.workers:
                    done, fut = window.popleft()
                    yield (*done, fut.result())
            while window:
                done, fut = window.popleft()
                yield (*done, fut.result())

    # -- refusing lines --

    def _refuse(self, path: Path, spec: _Spec, lines: _Lines, data: bytes, first: int,
                bad: np.ndarray, stats: _TableStats, context: dict[int, str],
                open_end: bool) -> None:
        """Count (skip mode) or raise (stop mode) the bad lines ``bad`` of a block."""
        if not len(bad):
            return
        texts: list[bytes] | None = None
        limit = 1 if self.on_error == "stop" else max(0, _LOGGED_BAD_LINES - self.logged_bad)
        for i in bad[:limit] if limit else []:
            i = int(i)
            if i in context:
                msg = context[i]
            elif i in lines.detail:
                msg = lines.detail[i]
            else:
                if texts is None:
                    texts = data.split(b"\n")
                why = diagnose(texts[i], spec)
                msg = why[1] if why else f"{REASONS[lines.status[i] - 1]} check failed"
            if open_end and i == lines.n - 1:
                msg += " (the last line has no newline: the file may be truncated)"
            where = f"{path}, line {first + i}"
            if self.on_error == "stop":
                raise DataError(f"{where}: {msg}. Use --on-error skip (on_error='skip') to skip "
                                "and count malformed lines")
            log.warning("%s: %s (skipped)", where, msg)
            self.logged_bad += 1
            if self.logged_bad == _LOGGED_BAD_LINES:
                log.warning("further malformed lines are skipped without a message; "
                            "summary.json counts them by reason")
        codes = np.bincount(lines.status[bad], minlength=len(REASONS) + 1)
        for code in np.flatnonzero(codes):
            k = codes[code]
            name = REASONS[int(code) - 1]
            stats.malformed[name] = stats.malformed.get(name, 0) + int(k)

    # -- common file --

    def run_common(self, bg: _Background, writer: _ShardWriter, stats: _TableStats) -> None:
        spec, path = self.common_spec, self.common
        fstats = _FileStats(str(path))
        t0 = time.perf_counter()
        for data, first, n, open_end, lines in self._parsed(path, spec, fstats):
            stats.rows_in += n
            status = lines.status
            keys = lines.head["key"]
            context: dict[int, str] = {}
            cand = np.flatnonzero(status == 0)
            if len(cand):
                ck = keys[cand]
                order = np.argsort(ck, kind="stable")
                sk = ck[order]
                dup_in_block = np.zeros(len(cand), dtype=bool)
                dup_in_block[order[1:][sk[1:] == sk[:-1]]] = True
                pos = np.searchsorted(self.keys, ck)
                pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
                dup_before = (self.keys[pos_c] == ck) if len(self.keys) else \
                    np.zeros(len(cand), dtype=bool)
                dup = dup_in_block | dup_before
                for i in np.flatnonzero(dup)[:1 if self.on_error == "stop" else
                                             _LOGGED_BAD_LINES]:
                    k = int(ck[i])
                    if dup_before[i]:
                        prev = int(self.key_lines[pos_c[i]])
                    else:
                        prev = first + int(cand[np.flatnonzero(ck == k)[0]])
                    context[int(cand[i])] = (f"common_feature_index {int_to_key(k)} appears "
                                             f"again (first on line {prev})")
                status[cand[dup]] = _CODE["duplicate_key"]
            bad = np.flatnonzero(status != 0)
            self._refuse(path, spec, lines, data, first, bad, stats, context, open_end)
            keep = status == 0
            good = np.flatnonzero(keep)
            if len(good):
                o = np.argsort(keys[good], kind="stable")
                gk = keys[good][o]
                ins = np.searchsorted(self.keys, gk)
                self.keys = np.insert(self.keys, ins, gk)
                self.key_lines = np.insert(self.key_lines, ins, first + good[o])
            table = self._table(lines, keep, spec, stats, {"common_key": pa.array(keys[keep])})
            stats.rows_written += table.num_rows
            bg.submit(writer.write, table)
        fstats.seconds = time.perf_counter() - t0
        if fstats.lines == 0:
            raise DataError(f"{path}: the file is empty")
        self.common_file = fstats
        self.used = np.zeros(len(self.keys), dtype=bool)
        self.closed = np.zeros(len(self.keys), dtype=bool)

    # -- skeleton file --

    def run_skeleton(self, bg: _Background, writer: _ShardWriter, stats: _TableStats) -> None:
        spec, path = self.skel_spec, self.skeleton
        fstats = _FileStats(str(path))
        t0 = time.perf_counter()
        assert self.used is not None and self.closed is not None
        for data, first, n, open_end, lines in self._parsed(path, spec, fstats):
            stats.rows_in += n
            status = lines.status
            h = lines.head
            keys = h["key"]
            context: dict[int, str] = {}
            pos = np.searchsorted(self.keys, keys)
            pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
            found = (self.keys[pos_c] == keys) if len(self.keys) else np.zeros(n, dtype=bool)
            unknown = (status == 0) & ~found
            for i in np.flatnonzero(unknown)[:1 if self.on_error == "stop" else
                                            _LOGGED_BAD_LINES]:
                context[int(i)] = (f"common_feature_index {int_to_key(int(keys[i]))} is not in "
                                   f"{self.common}")
            status[unknown] = _CODE["unknown_key"]
            self._refuse(path, spec, lines, data, first, np.flatnonzero(status != 0), stats,
                         context, open_end)
            ok = status == 0
            click, conv = h["click"], h["conversion"]
            cwc = ok & (conv == 1) & (click == 0)
            n_cwc = int(np.count_nonzero(cwc))
            keep = ok
            if n_cwc:
                line = first + int(np.flatnonzero(cwc)[0])
                if self.cwc == "error":
                    raise DataError(
                        f"{path}, line {line}: conversion=1 with click=0. Use "
                        "--conversion-without-click drop (or keep) to go on")
                if self.cwc == "drop":
                    keep = ok & ~cwc
                    stats.dropped_cwc += n_cwc
                else:
                    stats.kept_cwc += n_cwc
            self._track_runs(pos_c[ok])
            self.used[pos_c[keep]] = True
            base = {
                "sample_id": pa.array(h["sample_id"][keep]),
                "common_key": pa.array(keys[keep]),
                "click": pa.array(click[keep].astype(np.int8)),
                "conversion": pa.array(conv[keep].astype(np.int8)),
            }
            gt = None
            if self.gt is not None:
                gt = self.gt.take(n).filter(pa.array(keep))
                sid = gt.column("sample_id").to_numpy()
                mism = np.flatnonzero(sid != h["sample_id"][keep])
                if len(mism):
                    i = int(np.flatnonzero(keep)[mism[0]])
                    raise DataError(f"{self.gt.path}: row for skeleton line {first + i} has "
                                    f"sample_id {int(sid[mism[0]])}, the line has "
                                    f"{int(h['sample_id'][i])}; the ground-truth file must "
                                    "list the skeleton's lines in order")
            table = self._table(lines, keep, spec, stats, base, gt)
            stats.rows_written += table.num_rows
            stats.clicks += int(np.count_nonzero(click[keep]))
            stats.conversions += int(np.count_nonzero(conv[keep]))
            bg.submit(writer.write, table)
        fstats.seconds = time.perf_counter() - t0
        if fstats.lines == 0:
            raise DataError(f"{path}: the file is empty")
        if self.gt is not None:
            self.gt.finish()
        self.skeleton_file = fstats

    def _track_runs(self, idx: np.ndarray) -> None:
        """Count runs of lines whose common key already had an earlier, ended run."""
        assert self.closed is not None
        if not len(idx):
            return
        change = np.empty(len(idx), dtype=bool)
        change[0] = idx[0] != self.open_run
        change[1:] = idx[1:] != idx[:-1]
        runs = idx[change]
        if not len(runs):  # the open run goes on
            return
        if change[0] and self.open_run >= 0:
            self.closed[self.open_run] = True
        order = np.argsort(runs, kind="stable")
        sr = runs[order]
        earlier = np.zeros(len(runs), dtype=bool)
        earlier[order[1:][sr[1:] == sr[:-1]]] = True
        self.runs_reopened += int(np.count_nonzero(self.closed[runs] | earlier))
        self.closed[runs[:-1]] = True
        self.open_run = int(runs[-1])

    def _table(self, lines: _Lines, keep: np.ndarray, spec: _Spec, stats: _TableStats,
               base: dict[str, pa.Array], gt: pa.Table | None = None) -> pa.Table:
        cols = dict(base)
        cols.update(_columns(lines, keep, spec, stats))
        if gt is not None:
            for c in GROUND_TRUTH_COLUMNS:
                cols[c] = gt.column(c).combine_chunks()
        extra = [(c, self.gt.schema.field(c).type) for c in GROUND_TRUTH_COLUMNS] \
            if self.gt is not None and spec.kind == "skeleton" else []
        schema = _schema(spec, extra)
        return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


def ingest(skeleton: str | Path, common: str | Path, out: str | Path, *,
           on_error: str = "stop", conversion_without_click: str = "drop",
           shard_rows: int = DEFAULT_SHARD_ROWS, block_bytes: int = DEFAULT_BLOCK_BYTES,
           bag_fields: Sequence[str] = DEFAULT_BAG_FIELDS,
           ground_truth: str | Path | None = None, overwrite: bool = False,
           workers: int = 1) -> dict[str, Any]:
    """Ingest one Ali-CCP split into ``out`` (see the module docstring for the layout).

    Args:
        skeleton, common: the split's ``sample_skeleton_*.csv`` and ``common_features_*.csv``.
        out: output folder; gets ``impressions/``, ``users/`` and ``summary.json``.
        on_error: ``stop`` raises :class:`DataError` naming the file, line and reason of the
            first malformed line; ``skip`` skips and counts malformed lines by reason.
        conversion_without_click: lines with conversion=1 and click=0: ``drop`` (counted),
            ``keep`` (counted) or ``error``.
        shard_rows: rows per Parquet file (impressions and users alike).
        block_bytes: bytes read and parsed at a time (memory grows with it, not the files).
        bag_fields: fields stored as lists; any other field may occur once per line.
        ground_truth: optional Parquet file with ``sample_id`` and the simulator's ground-truth
            columns, one row per skeleton line in line order (``esmm simulate --format
            aliccp-raw`` writes it); its columns are attached to the impressions.
        overwrite: replace an existing ingestion in ``out``.
        workers: threads parsing blocks ahead of the one being written (1: parse in line).

    Returns the content of ``summary.json``.
    """
    if on_error not in ("stop", "skip"):
        raise UsageError(f"on_error {on_error!r}: expected 'stop' or 'skip'")
    if conversion_without_click not in ("drop", "keep", "error"):
        raise UsageError(f"conversion_without_click {conversion_without_click!r}: expected "
                         "'drop', 'keep' or 'error'")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise UsageError(f"shard_rows {shard_rows!r}: expected an integer >= 1")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers {workers!r}: expected an integer >= 1")
    if not isinstance(block_bytes, int) or block_bytes < 1:
        raise UsageError(f"block_bytes {block_bytes!r}: expected an integer >= 1")
    known = set(SKELETON_FIELDS) | set(COMMON_FIELDS)
    unknown = sorted(set(bag_fields) - known)
    if unknown:
        raise UsageError(f"bag fields {unknown} are not Ali-CCP fields: expected some of "
                         f"{', '.join(SKELETON_FIELDS + COMMON_FIELDS)}")
    skeleton, common, out = Path(skeleton), Path(common), Path(out)
    for p, what in ((skeleton, "skeleton"), (common, "common features")):
        if not p.is_file():
            raise DataError(f"{p}: no such {what} file")
    prepare_dir_output(out, "--out")
    for name in ("impressions", "users"):
        target = out / name
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise UsageError(f"{target} already holds data: remove it, choose another "
                                 "--out or pass --overwrite")
    t0 = time.perf_counter()
    job = _Ingest(skeleton, common, out, on_error, conversion_without_click, shard_rows,
                  block_bytes, bag_fields, Path(ground_truth) if ground_truth else None,
                  workers)
    work = Path(tempfile.mkdtemp(prefix=".ingest-", dir=out))
    imp_stats = _TableStats(job.skel_spec)
    user_stats = _TableStats(job.common_spec)
    try:
        gt_cols = ([(c, job.gt.schema.field(c).type) for c in GROUND_TRUTH_COLUMNS]
                   if job.gt is not None else [])
        users_w = _ShardWriter(work / "users", _schema(job.common_spec), shard_rows)
        imp_w = _ShardWriter(work / "impressions", _schema(job.skel_spec, gt_cols), shard_rows)
        bg = _Background()
        try:
            log.info("reading common features %s", common)
            job.run_common(bg, users_w, user_stats)
            log.info("%s: %d common keys", common, len(job.keys))
            log.info("reading skeleton %s", skeleton)
            job.run_skeleton(bg, imp_w, imp_stats)
            bg.submit(users_w.close)
            bg.submit(imp_w.close)
        finally:
            bg.close()
        for name in ("impressions", "users"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            (work / name).rename(out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    imp_stats.shards = imp_w.shards
    user_stats.shards = users_w.shards
    assert job.used is not None
    imp_stats.extra["key_runs_not_consecutive"] = job.runs_reopened
    user_stats.extra["keys_without_impressions"] = int(np.count_nonzero(~job.used))
    summary = _summary(job, imp_stats, user_stats, time.perf_counter() - t0)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _log_summary(summary)
    return summary


def _summary(job: _Ingest, imp: _TableStats, users: _TableStats, seconds: float
             ) -> dict[str, Any]:
    for s in (imp, users):
        if s.rows_in != s.rows_written + s.n_malformed + s.dropped_cwc:  # pragma: no cover
            raise DataError(f"internal error: {s.rows_in} rows in but {s.rows_written} written "
                            f"and {s.n_malformed + s.dropped_cwc} dropped")
    text = job.skeleton_file.bytes + job.common_file.bytes
    return {
        "format": "aliccp-raw",
        "out": str(job.out),
        "options": {
            "on_error": job.on_error,
            "conversion_without_click": job.cwc,
            "shard_rows": job.shard_rows,
            "block_bytes": job.block_bytes,
            "workers": job.workers,
            "bag_fields": sorted(job.skel_spec.bags | job.common_spec.bags),
            "ground_truth": str(job.gt.path) if job.gt is not None else None,
        },
        "common_key": "the 16-hex-digit common_feature_index read as uint64, stored as int64",
        "files": {"skeleton": job.skeleton_file.as_dict(),
                  "common": job.common_file.as_dict()},
        "impressions": imp.as_dict(),
        "users": users.as_dict(),
        "seconds": round(seconds, 3),
        "mb_per_s": round(text / 1e6 / seconds, 1) if seconds else None,
    }


def _log_summary(s: dict[str, Any]) -> None:
    for name in ("impressions", "users"):
        t = s[name]
        log.info("%s: %d rows in, %d written, %d dropped %s%s", name, t["rows_in"],
                 t["rows_written"], t["rows_dropped"], t["dropped"],
                 f" (malformed by reason: {t['malformed_by_reason']})"
                 if t["malformed_by_reason"] else "")
    imp = s["impressions"]
    log.info("impressions: %d clicks (ctr %s), %d conversions (%s per click), %d kept "
             "conversions without click", imp["clicks"], imp["ctr"], imp["conversions"],
             imp["conversions_per_click"], imp["kept_conversion_without_click"])
    for name in ("impressions", "users"):
        for f, d in s[name]["fields"].items():
            log.info("  %s %s: present in %s of rows, %.2f entries per row, %d distinct ids%s",
                     name, f, d["presence"], d["entries_per_row"] or 0.0, d["distinct_ids"],
                     "" if d["distinct_exact"] else " (lower bound)")
    log.info("ingested %.1f MB of text in %.1f s (%s MB/s); summary in %s/summary.json",
             (s["files"]["skeleton"]["bytes"] + s["files"]["common"]["bytes"]) / 1e6,
             s["seconds"], s["mb_per_s"], s["out"])


# --------------------------------------------------------------------------------------------
# Writing the raw layout


def _entries(table: pa.Table, f: str) -> tuple[pa.Array, np.ndarray]:
    """Per row: the field's entries joined by \\x01 (null where none) and their count."""
    col = table.column(f).combine_chunks()
    vname = f + VALUE_SUFFIX
    prefix = pa.scalar(f"{f}\x02")
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten()
        off = np.asarray(col.offsets).astype(np.int64)
        if col.null_count:
            counts = np.where(np.asarray(col.is_null()), 0, np.diff(off))
        else:
            counts = np.diff(off)
        if vname in table.column_names:
            v = pc.cast(table.column(vname).combine_chunks().flatten(), pa.string())
        else:
            v = pa.scalar("1.0")
        ent = pc.binary_join_element_wise(prefix, pc.cast(flat, pa.string()), pa.scalar("\x03"),
                                          v, "")
        off32 = np.zeros(len(col) + 1, dtype=np.int32)
        np.cumsum(counts, out=off32[1:])
        lists = pa.ListArray.from_arrays(pa.array(off32), ent)
        joined = pc.binary_join(lists, "\x01")
        joined = pc.if_else(pa.array(counts > 0), joined, pa.scalar(None, pa.string()))
        return joined, counts
    if vname in table.column_names:
        v = pc.cast(table.column(vname).combine_chunks(), pa.string())
    else:
        v = pa.scalar("1.0")
    ent = pc.binary_join_element_wise(prefix, pc.cast(col, pa.string()), pa.scalar("\x03"), v,
                                      "")
    counts = (~np.asarray(col.is_null())).astype(np.int64) if col.null_count else \
        np.ones(len(col), dtype=np.int64)
    return ent, counts


def _raw_lines(table: pa.Table, fields: Sequence[str], head: Sequence[pa.Array]) -> pa.Array:
    parts = []
    total = np.zeros(table.num_rows, dtype=np.int64)
    for f in fields:
        if f in table.column_names:
            ent, counts = _entries(table, f)
            parts.append(ent)
            total += counts
    if parts:
        fl = pc.binary_join_element_wise(*parts, "\x01", null_handling="skip")
    else:
        fl = pa.array([""] * table.num_rows)
    fl = pc.binary_join_element_wise(fl, pa.scalar("\n"), "")
    return pc.binary_join_element_wise(*head, pa.array(total).cast(pa.string()), fl, ",")


def _write_text(fh: Any, arr: pa.Array | pa.ChunkedArray) -> int:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    off, data = _binary_parts(arr)
    chunk = data[off[0]:off[-1]]
    fh.write(memoryview(chunk))
    return len(chunk)


def write_raw(impressions: Iterable[pa.Table], users: Iterable[pa.Table],
              skeleton_path: str | Path, common_path: str | Path,
              ground_truth_path: str | Path | None = None) -> dict[str, int]:
    """Write tables in the raw Ali-CCP layout (vectorised, batch by batch).

    ``impressions`` batches need ``sample_id``, ``common_key``, ``click``, ``conversion`` and any
    skeleton fields; ``users`` batches need ``common_key`` and any common fields. Columns
    ``F__v`` give the values of field ``F``; without one every value is written as ``1.0``.
    Null single ids and empty lists write no entry. With ``ground_truth_path``, ``sample_id``
    and the ground-truth columns of the impressions are written there as Parquet.
    """
    counts = {"skeleton_lines": 0, "common_lines": 0, "skeleton_bytes": 0, "common_bytes": 0}
    # Each file is written under a temporary name and renamed when complete.
    with atomic_path(common_path) as tmp, open(tmp, "wb") as fh:
        for t in users:
            if t.num_rows == 0:
                continue
            keys = _format_keys(t.column("common_key").to_numpy())
            counts["common_bytes"] += _write_text(fh, _raw_lines(t, COMMON_FIELDS, [keys]))
            counts["common_lines"] += t.num_rows
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(skeleton_path))
        fh = stack.enter_context(open(tmp, "wb"))
        gt_writer = None
        try:
            for t in impressions:
                if t.num_rows == 0:
                    continue
                head = [pc.cast(t.column(c), pa.string()) for c in ("sample_id", "click",
                                                                      "conversion")]
                head.insert(3, _format_keys(t.column("common_key").to_numpy()))
                counts["skeleton_bytes"] += _write_text(fh, _raw_lines(t, SKELETON_FIELDS, head))
                counts["skeleton_lines"] += t.num_rows
                if ground_truth_path is not None:
                    gt = t.select(["sample_id", *GROUND_TRUTH_COLUMNS])
                    if gt_writer is None:  # entered here: no rows, no file (as before)
                        gt_tmp = stack.enter_context(atomic_path(ground_truth_path))
                        gt_writer = pq.ParquetWriter(gt_tmp, gt.schema)
                    gt_writer.write_table(gt)
        finally:
            if gt_writer is not None:
                gt_writer.close()
        fh.flush()
    return counts


def simulate_raw(out_dir: str | Path, cfg: Any, rows: dict[str, int], seed: int,
                 progress: bool = False, ground_truth: bool = True) -> dict[str, Any]:
    """Simulate splits and write them in the raw Ali-CCP layout.

    Per split: ``sample_skeleton_{split}.csv``, ``common_features_{split}.csv`` and (unless
    ``ground_truth`` is False) ``ground_truth_{split}.parquet`` with ``sample_id``, ``p_click``,
    ``p_conversion`` and ``conversion_if_clicked`` (not part of raw Ali-CCP). Also
    ``simulation.json``. Every value is written as 1.0. Memory stays bounded: the simulator
    writes Parquet chunk by chunk, which is then converted batch by batch.
    """
    from esmm.data.simulate import write_simulation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".simulate-", dir=out))
    try:
        info = write_simulation(tmp, cfg, rows, seed, progress=progress)
        files: dict[str, Any] = {}
        for split in rows:
            imp = pq.ParquetFile(tmp / split / "impressions.parquet")
            users = pq.ParquetFile(tmp / split / "users.parquet")
            skel = out / f"sample_skeleton_{split}.csv"
            comm = out / f"common_features_{split}.csv"
            gt = out / f"ground_truth_{split}.parquet" if ground_truth else None
            t0 = time.perf_counter()
            counts = write_raw(
                (pa.Table.from_batches([b]) for b in imp.iter_batches(batch_size=1 << 18)),
                (pa.Table.from_batches([b]) for b in users.iter_batches(batch_size=1 << 11)),
                skel, comm, gt)
            files[split] = {"skeleton": skel.name, "common": comm.name,
                            "ground_truth": gt.name if gt else None, **counts}
            log.info("wrote %s and %s (%.1f MB, %.1f s)", skel, comm,
                     (counts["skeleton_bytes"] + counts["common_bytes"]) / 1e6,
                     time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["format"] = "aliccp-raw"
    info["files"] = files
    write_text(out / "simulation.json", json.dumps(info, indent=2) + "\n")
    return info
