"""The feature spec: how raw column values become embedding rows and dense inputs.

The same code encodes rows for training, evaluation and serving, so a model sees identical ids
everywhere. Hashing is stable across processes and machines:

* integer ids: ``bucket = splitmix64(id XOR field_seed) mod buckets``,
* string ids: ``bucket = xxh64(utf-8 bytes, seed=field_seed) mod buckets``,

with ``field_seed = xxh64(field name)``. Python's salted ``hash()`` is never used. Missing values
(nulls) hash like the sentinel id ``-1``.

Which of the two a value takes is fixed by the field's ``dtype`` (see
:class:`esmm.config.FeatureConfig`): ``str`` hashes every value as a string (an integer as its
decimal string), ``int`` requires integers (reading strings of decimal digits as integers), and
``auto`` hashes what the data holds but refuses a column that mixes integer-looking strings with
other strings: one stray string in a CSV id column makes the CSV reader turn the whole column
into strings, which would silently move every id to another bucket.

Training records the id type an ``auto`` field saw (``FieldSpec.id_type``, see
:mod:`esmm.data.fit`); ids of the other type are then refused wherever the spec encodes.

Dense fields are filled and transformed here too (:func:`encode_dense`), with the statistics
fitted on the training split that the spec carries, so every path encodes alike.

Every error names the field, the file (or request) and the row or line, through :class:`Rows`.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from esmm.config import Config
from esmm.errors import DataError

HASH_VERSION = "splitmix64-xxh64-v1"
MISSING_ID = -1
ID_DTYPES = ("auto", "int", "str")
# What the CSV reader infers as an integer, and what an Arrow cast to int64 parses.
INT_PATTERN = r"^-?[0-9]+$"
F32_MAX = float(np.finfo(np.float32).max)
_INT64_LIMIT = 2.0**63

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def field_seed(name: str) -> int:
    """A 64-bit seed derived from the field name (stable everywhere)."""
    return xxhash.xxh64_intdigest(name.encode("utf-8"))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 arrays (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        z = x + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def hash_int_ids(ids: np.ndarray, name: str, buckets: int) -> np.ndarray:
    """Hash integer ids of field ``name`` into ``[0, buckets)``.

    Args:
        ids: (N,) integer array.
    Returns:
        (N,) int64 bucket indices.
    """
    seed = np.uint64(field_seed(name))
    u = np.asarray(ids).astype(np.int64, copy=False).view(np.uint64)
    return (splitmix64(u ^ seed) % np.uint64(buckets)).astype(np.int64)


def hash_str_ids(values: pa.Array, name: str, buckets: int) -> np.ndarray:
    """Hash string ids: each distinct string is hashed once (dictionary encoding), not per row."""
    seed = field_seed(name)
    enc = pc.dictionary_encode(values)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    uniq = enc.dictionary.to_pylist()
    table = np.fromiter(
        (xxhash.xxh64_intdigest(s.encode("utf-8"), seed) % buckets for s in uniq),
        dtype=np.int64,
        count=len(uniq),
    )
    idx = enc.indices
    missing = hash_int_ids(np.array([MISSING_ID]), name, buckets)[0]
    idx_np = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = table[idx_np] if len(table) else np.full(len(idx_np), missing, dtype=np.int64)
    if idx.null_count:
        out[np.asarray(idx.is_null())] = missing
    return out


TRANSFORMS = ("none", "zscore", "minmax", "log1p", "bucketize")


@dataclass(frozen=True)
class FieldStats:
    """Statistics of a dense field's present values on the training split.

    ``count`` values were present and ``missing`` were null or NaN; ``std`` is the population
    standard deviation (ddof 0), as a z-score divides by it.
    """

    count: int
    missing: int
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class AttentionSpec:
    """The target attention of a ``pooling: attention`` bag (see
    :class:`esmm.config.AttentionConfig`): the ``query`` field, the scoring MLP's ``hidden``
    widths, ``weights`` (``none`` | ``softmax``) and the ``chunk`` of pairs scored at once."""

    query: str
    hidden: tuple[int, ...] = (80, 40)
    weights: str = "none"
    chunk: int = 65536

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionSpec:
        return cls(**{**d, "hidden": tuple(d.get("hidden", (80, 40)))})


@dataclass(frozen=True)
class FieldSpec:
    """One input field after config resolution, with the state fitted on the training split.

    A ``bucketize`` dense field is resolved to ``kind: categorical`` with one bucket per
    interval of its ``boundaries``: the model embeds the bucket index like any id, and only
    its encoder (:func:`encode_dense`) knows it came from numbers.
    """

    name: str
    kind: str  # categorical | multi_categorical | dense
    buckets: int
    dim: int
    pooling: str
    dtype: str = "auto"  # id fields: auto | int | str (see the module docstring)
    # Dense fields (and bucketized ones): see :class:`esmm.config.FeatureConfig`.
    transform: str = "none"
    fill: float | str = "error"  # a number, "error", or "mean" until fitted
    boundaries: tuple[float, ...] | None = None  # bucketize: ascending cut points
    quantiles: int | None = None  # bucketize: boundaries fitted as N quantiles
    stats: FieldStats | None = None  # fitted on the training split
    id_type: str | None = None  # auto id fields: "int" or "str", the ids seen in training
    attention: AttentionSpec | None = None  # pooling: attention only

    @property
    def numeric(self) -> bool:
        """Whether the field's raw values are numbers (a dense field, bucketized or not)."""
        return self.kind == "dense" or self.transform == "bucketize"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict; the fitted-state keys are left out at their defaults, so the spec of
        a model without transforms reads as it did before they existed."""
        d = asdict(self)
        for key, default in _OPTIONAL_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        if d.get("boundaries") is not None:
            d["boundaries"] = list(d["boundaries"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FieldSpec:
        d = dict(d)
        if d.get("boundaries") is not None:
            d["boundaries"] = tuple(float(b) for b in d["boundaries"])
        if d.get("stats") is not None:
            d["stats"] = FieldStats(**d["stats"])
        if d.get("attention") is not None:
            d["attention"] = AttentionSpec.from_dict(d["attention"])
        return cls(**d)


_OPTIONAL_DEFAULTS: dict[str, Any] = {"transform": "none", "fill": "error", "boundaries": None,
                                      "quantiles": None, "stats": None, "id_type": None,
                                      "attention": None}


@dataclass(frozen=True)
class FeatureSpec:
    """All input fields of a model, in a fixed order (the order of the config)."""

    fields: tuple[FieldSpec, ...]
    hash_version: str = HASH_VERSION

    @property
    def sparse(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind != "dense")

    @property
    def dense(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == "dense")

    @property
    def input_dim(self) -> int:
        """Width of the concatenated tower input: sum of embedding dims plus dense fields."""
        return sum(f.dim for f in self.sparse) + len(self.dense)

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [f.to_dict() for f in self.fields], "hash_version": self.hash_version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(tuple(FieldSpec.from_dict(f) for f in d["fields"]),
                   d.get("hash_version", HASH_VERSION))


def spec_from_config(cfg: Config) -> FeatureSpec:
    """Resolve feature defaults (embedding dim from ``model.embedding_dim``)."""
    if not cfg.features:
        from esmm.errors import ConfigError

        raise ConfigError("config has no `features`: list the input fields, or use "
                          "`features: aliccp` for every Ali-CCP field")
    fields = []
    for f in cfg.features:
        fields.append(FieldSpec(
            name=f.name,
            kind=f.kind,
            buckets=int(f.buckets or 0),
            dim=int(f.dim or cfg.model.embedding_dim) if f.kind != "dense" else 1,
            pooling=f.pooling,
            dtype=f.dtype,
            attention=_attention_spec(f),
        ))
        if f.kind == "dense":
            fields[-1] = _dense_spec(fields[-1], f, cfg.model.embedding_dim)
    return FeatureSpec(tuple(fields))


def _dense_spec(spec: FieldSpec, f: Any, embedding_dim: int) -> FieldSpec:
    """A dense field's transform and fill; a bucketized field becomes an embedded id field
    with one bucket per interval (``quantiles`` buckets at most, until fitted)."""
    spec = replace(spec, transform=f.transform, fill=f.fill)
    if f.transform != "bucketize":
        return spec
    bounds = tuple(f.boundaries) if f.boundaries is not None else None
    return replace(spec, kind="categorical", dim=int(f.dim or embedding_dim),
                   buckets=len(bounds) + 1 if bounds is not None else int(f.quantiles),
                   boundaries=bounds, quantiles=f.quantiles)


def _attention_spec(f: Any) -> AttentionSpec | None:
    """The :class:`AttentionSpec` of a ``pooling: attention`` feature config, else None."""
    if f.pooling != "attention":
        return None
    if f.attention is None:
        return AttentionSpec(query=str(f.query))
    a = f.attention
    return AttentionSpec(query=str(f.query), hidden=tuple(a.hidden), weights=a.weights,
                         chunk=a.chunk)


# --------------------------------------------------------------------------------------------
# Where rows come from, for error messages.


@dataclass(frozen=True)
class Rows:
    """How an error names a row of a column: the source it came from and its number there.

    Attributes:
        parts: ``(name, start, first)`` per source, in column order: rows from position
            ``start`` of the column on came from ``name``, and the first of them is numbered
            ``first`` there (a 0-based row index, or the file line of a CSV's first data row).
        unit: ``row`` or ``line``.
        index: (N,) positions of the column's rows among the sources' rows when rows were
            dropped before encoding; None: the identity.
        offsets: (N + 1,) bag offsets when the column is a bag's flattened values, so that a
            value is named by its bag's row.
    """

    parts: tuple[tuple[str, int, int], ...]
    unit: str = "row"
    index: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @classmethod
    def of(cls, source: str | Rows) -> Rows:
        """``source`` itself, or a single source named ``source`` numbered from row 0."""
        return source if isinstance(source, Rows) else cls(((str(source), 0, 0),))

    @property
    def name(self) -> str:
        """The sources' names, for a message about a whole column."""
        names = list(dict.fromkeys(p[0] for p in self.parts))
        return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"

    def at(self, i: int) -> tuple[str, str]:
        """(source name, ``row N`` or ``line N``) of position ``i`` of the column."""
        if self.offsets is not None:
            i = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if self.index is not None:
            i = int(self.index[i])
        k = max(bisect.bisect_right([p[1] for p in self.parts], i) - 1, 0)
        name, start, first = self.parts[k]
        return name, f"{self.unit} {first + i - start}"

    def values_of(self, offsets: np.ndarray) -> Rows:
        """These rows, for the flattened values of bags with ``offsets`` (N + 1,)."""
        return replace(self, offsets=offsets)


def _flat(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _decoded(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = _flat(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _bool_np(a: pa.Array) -> np.ndarray:
    """(N,) bool of an Arrow boolean array, nulls as False."""
    return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), dtype=bool)


def _id_error(rows: Rows, i: int, field: FieldSpec, what: str) -> DataError:
    name, pos = rows.at(i)
    return DataError(f"{name}: id field {field.name!r} {pos} {what}")


# --------------------------------------------------------------------------------------------
# Column encoders: Arrow column -> numpy arrays, vectorised.


def _ints_of_floats(arr: pa.Array, field: FieldSpec, rows: Rows) -> pa.Array:
    """Integral floats -> int64 (NaN and null: null); anything else is a DataError."""
    f = arr.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
    nan = np.isnan(f)
    with np.errstate(invalid="ignore"):
        integral = f == np.round(f)  # False for NaN; True for inf, refused by the range
    bad = ~nan & ~(integral & (np.abs(f) < _INT64_LIMIT))
    if bad.any():
        i = _first(bad)
        what = ("the non-integer value" if not integral[i] else
                "a number outside the 64-bit integer range:")
        raise _id_error(rows, i, field, f"holds {what} {float(f[i])!r}; expected integer ids "
                        f"({int(bad.sum())} such row(s) in all)")
    ints = np.where(nan, 0, f).astype(np.int64)
    return pa.array(ints, mask=nan)


def _ints_of_strings(arr: pa.Array, field: FieldSpec, rows: Rows) -> pa.Array:
    """Strings of decimal digits -> int64 (``dtype: int``); any other string is a DataError."""
    s = pc.utf8_trim_whitespace(arr)
    ok = _bool_np(pc.match_substring_regex(s, INT_PATTERN)) | ~_bool_np(s.is_valid())
    if not ok.all():
        i = _first(~ok)
        raise _id_error(rows, i, field, f"holds {_short(arr[i].as_py())}, not an integer id "
                        "(the field is declared `dtype: int`; declare `dtype: str` to hash "
                        "strings)")
    try:
        return pc.cast(s, pa.int64())
    except pa.ArrowInvalid:
        big = _bool_np(pc.greater(pc.abs(pc.cast(s, pa.float64())), 9.2e18))
        i = _first(big) if big.any() else 0
        raise _id_error(rows, i, field, f"holds {_short(arr[i].as_py())}, outside the 64-bit "
                        "integer range") from None


def integer_like(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(N,) bool masks of a string column: values that look like integers, and other values
    (nulls are neither)."""
    valid = _bool_np(arr.is_valid())
    like = _bool_np(pc.match_substring_regex(arr, INT_PATTERN))
    return like, valid & ~like


def mixed_error(field: FieldSpec, odd: tuple[str, str, Any], first: tuple[str, str, Any],
                count: int) -> DataError:
    """The error for an ``auto`` id column mixing integer-looking strings with others: ``odd``
    and ``first`` are (source, position, value) of a value of each kind."""
    at0 = first[1] if first[0] == odd[0] else f"{first[0]}, {first[1]}"
    return DataError(f"{odd[0]}: id field {field.name!r} {odd[1]} holds {_short(odd[2])} but "
                     f"{at0} holds {_short(first[2])}: the column mixes integers and strings "
                     f"({count} odd row(s)); fix the value, or declare the field `dtype: str` "
                     "to hash every value as a string")


def _refuse_mixed(arr: pa.Array, field: FieldSpec, rows: Rows) -> None:
    """A string column that mixes integer-looking values with other strings is an error.

    The CSV reader turns a whole column into strings for one stray value; hashing the
    others as strings would silently move them away from the buckets their integers use.
    """
    like, other = integer_like(arr)
    if not (like.any() and other.any()):
        return
    i0 = _first(like | other)
    odd = other if like[i0] else like
    i = _first(odd)
    raise mixed_error(field, (*rows.at(i), arr[i].as_py()), (*rows.at(i0), arr[i0].as_py()),
                      int(odd.sum()))


def canonical_ids(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows,
                  *, typed: bool = False) -> pa.Array:
    """An id column as it is hashed: int64 or string, nulls kept, as ``field.dtype`` says.

    Args:
        col: (N,) ids: integers, integral floats or strings (dictionary-encoded or not).
        source: the file or request (or its :class:`Rows`), for error messages.
        typed: the values' types were given one by one (a request's JSON), not read from a
            column whose type a reader may have guessed: a string is then a string even where
            it looks like an integer, and ``auto`` does not refuse mixed strings.
    Returns:
        (N,) int64 or string Arrow array (a bucketized dense field: (N,) float64 numbers).
        Raises DataError naming the row of a value that is not an id of the field's type (see
        the module docstring), or, for an ``auto`` field whose training id type is recorded
        (``field.id_type``), ids of the other type.
    """
    if field.transform == "bucketize":
        return canonical_numbers(col, field, source)
    out = _canonical_ids(col, field, source, typed)
    if field.dtype == "auto" and field.id_type is not None:
        _refuse_other_type(out, field, Rows.of(source))
    return out


def _refuse_other_type(ids: pa.Array, field: FieldSpec, rows: Rows) -> None:
    """Ids of an ``auto`` field must be of the type seen in training: integer 7 and string
    "7" hash to different buckets, so the model would silently score other ids."""
    got = "str" if pa.types.is_string(ids.type) else "int"
    if got == field.id_type or ids.null_count == len(ids):
        return
    i = _first(_bool_np(ids.is_valid()))
    name, pos = rows.at(i)
    words = {"int": "integer", "str": "string"}
    raise DataError(
        f"{name}: id field {field.name!r} holds {words[got]} ids ({pos}: "
        f"{_short(ids[i].as_py())}) but the model was trained on {words[field.id_type]} ids "
        f"(`dtype: auto`), and the two hash to different buckets; give {words[field.id_type]} "
        "ids, or train with `dtype: str` on the field so that integers and strings hash alike")


def _canonical_ids(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows,
                   typed: bool) -> pa.Array:
    rows = Rows.of(source)
    arr = _decoded(col)
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        raise DataError(f"{rows.name}: column {field.name!r} holds lists but the config declares "
                        "it `kind: categorical`; declare it `kind: multi_categorical`")
    if pa.types.is_null(t):
        ints = pa.nulls(len(arr), pa.int64())
    elif pa.types.is_integer(t):
        if t == pa.uint64() and len(arr) and (pc.max(arr).as_py() or 0) >= 2**63:
            big = _bool_np(pc.greater_equal(arr, pa.scalar(2**63, pa.uint64())))
            raise _id_error(rows, _first(big), field, f"holds {arr[_first(big)].as_py()}, "
                            "outside the 64-bit integer range")
        ints = arr.cast(pa.int64())
    elif pa.types.is_floating(t):
        ints = _ints_of_floats(arr, field, rows)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        strings = arr.cast(pa.string())
        if field.dtype == "int":
            return _ints_of_strings(strings, field, rows)
        if field.dtype == "auto" and not typed:
            _refuse_mixed(strings, field, rows)
        return strings
    else:
        raise DataError(f"{rows.name}: column {field.name!r} has type {t}; expected integer or "
                        "string ids")
    return ints.cast(pa.string()) if field.dtype == "str" else ints


def canonical_bags(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows
                   ) -> pa.Array:
    """A bag column with its ids as :func:`canonical_ids` makes them: (N,) list<int64> or
    list<string>, null bags kept; a column of single ids is returned as :func:`canonical_ids`
    makes it (a bag of one per row)."""
    arr = _decoded(col)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return canonical_ids(arr, field, source)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = canonical_ids(pc.list_flatten(arr), replace(field, kind="categorical"),
                           Rows.of(source).values_of(offsets))
    mask = arr.is_null() if arr.null_count else None
    return pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=mask)


def hash_ids(ids: pa.Array, field: FieldSpec) -> np.ndarray:
    """Hash a canonical id column (:func:`canonical_ids`). Returns (N,) int64 buckets."""
    if pa.types.is_string(ids.type):
        return hash_str_ids(ids, field.name, field.buckets)
    vals = ids.fill_null(MISSING_ID).to_numpy(zero_copy_only=False)
    return hash_int_ids(vals, field.name, field.buckets)


def encode_categorical(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows,
                       *, typed: bool = False) -> np.ndarray:
    """Encode a single-valued id column (``typed``: see :func:`canonical_ids`).

    Returns:
        (N,) int64 bucket ids; of a bucketized dense field, its bucket indices.
    """
    if field.transform == "bucketize":
        return encode_dense(col, field, source)
    return hash_ids(canonical_ids(col, field, source, typed=typed), field)


def encode_bag(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows,
               *, typed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encode a multi-valued id column (a list per row; ``typed``: see :func:`canonical_ids`).

    Returns:
        values: (nnz,) int64 bucket ids; offsets: (N + 1,) int64, row i owns
        ``values[offsets[i]:offsets[i + 1]]``. A null list is an empty bag.
    """
    arr = _decoded(col)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        # A single id per row is a bag of one.
        ids = encode_categorical(arr, field, source, typed=typed)
        return ids, np.arange(len(ids) + 1, dtype=np.int64)
    if arr.null_count:
        arr = _flat(pc.if_else(arr.is_null(), pa.scalar([], type=t), arr))
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values
    if offsets[0] != 0 or offsets[-1] != len(values):
        values = values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets = offsets - offsets[0]
    inner = replace(field, kind="categorical")
    return encode_categorical(values, inner, Rows.of(source).values_of(offsets),
                              typed=typed), offsets


_NUMBER = r"(?i)^\s*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|inf|infinity|nan)\s*$"


def _dense_values(arr: pa.Array, field: FieldSpec, rows: Rows) -> np.ndarray:
    """(N,) float64 of a numeric column (nulls as NaN); another type is a DataError."""
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr.to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_null(t):  # every value missing
        return np.full(len(arr), np.nan)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = _bool_np(pc.match_substring_regex(arr, _NUMBER)) | ~_bool_np(arr.is_valid())
        if not ok.all():
            i = _first(~ok)
            name, pos = rows.at(i)
            raise DataError(f"{name}: dense field {field.name!r} {pos} holds "
                            f"{_short(arr[i].as_py())}, not a number")
    raise DataError(f"{rows.name}: dense field {field.name!r} has type {t}; expected numbers")


def dense_values(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A dense column's raw values, checked: (N,) float64 (missing as NaN) and (N,) bool
    missing (null or NaN).

    An infinity or a value beyond float32's range is an error naming the field and the first
    such row, and so is a missing value unless the field has a ``fill``: nothing may turn the
    towers' inputs into inf or NaN.
    """
    rows = Rows.of(source)
    arr = _decoded(col)
    vals = _dense_values(arr, field, rows)
    missing = np.isnan(vals)
    if arr.null_count:
        missing |= ~_bool_np(arr.is_valid())
    infinite = np.isinf(vals)
    with np.errstate(invalid="ignore"):
        over = ~missing & ~infinite & (np.abs(vals) > F32_MAX)
    bad = infinite | over
    if field.fill == "error":
        bad = bad | missing
    if bad.any():
        i = _first(bad)
        name, pos = rows.at(i)
        what = ("a NaN or missing value" if missing[i] else
                f"{'+' if vals[i] > 0 else '-'}inf" if infinite[i] else
                f"{float(vals[i])!r}, beyond float32's range (|x| <= {F32_MAX:.4g})")
        raise DataError(
            f"{name}: dense field {field.name!r} has {int(bad.sum())} NaN, missing, infinite or "
            f"float32-overflowing value(s), first at {pos} ({what}); fill or drop them: a dense "
            "value must be a finite float32 number")
    return vals, missing


def _unfitted(field: FieldSpec, rows: Rows, what: str) -> DataError:
    return DataError(f"{rows.name}: dense field {field.name!r} needs {what} fitted on the "
                     "training split, and this feature spec has none; encode with the spec of "
                     "a trained run (its checkpoint or artifact), not one made from the config")


def _filled(vals: np.ndarray, missing: np.ndarray, field: FieldSpec, rows: Rows) -> np.ndarray:
    if not missing.any():
        return vals
    if isinstance(field.fill, str):  # "mean" before fitting ("error" has raised already)
        raise _unfitted(field, rows, "the mean to fill missing values with")
    return np.where(missing, field.fill, vals)


def _scaled(vals: np.ndarray, field: FieldSpec, rows: Rows) -> np.ndarray:
    """zscore / minmax / log1p of (N,) float64 values. Returns (N,) float64."""
    if field.transform == "log1p":
        low = vals <= -1.0
        if low.any():
            name, pos = rows.at(_first(low))
            raise DataError(f"{name}: dense field {field.name!r} {pos} holds "
                            f"{float(vals[low][0])!r}; `transform: log1p` needs values > -1 "
                            "(shift the column, or use `transform: zscore`)")
        return np.log1p(vals)
    st = field.stats
    if st is None:
        raise _unfitted(field, rows, f"the statistics of `transform: {field.transform}`")
    # A constant training column carries no information: it maps to 0, not to 0/0.
    if field.transform == "zscore":
        return (vals - st.mean) / (st.std if st.std > 0 else 1.0)
    span = st.max - st.min
    return (vals - st.min) / (span if span > 0 else 1.0)


def encode_dense(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows
                 ) -> np.ndarray:
    """Encode a dense column: check it (:func:`dense_values`), fill missing values with the
    field's ``fill``, then apply its ``transform`` with the statistics fitted on the training
    split. Training, evaluation, prediction, export and serving all encode through here.

    Returns:
        (N,) float32; for a ``bucketize`` field (N,) int64 bucket indices in
        ``[0, len(boundaries)]``: ``searchsorted(boundaries, x, side="right")``, so a value
        equal to a boundary falls in the bucket above it.
    """
    rows = Rows.of(source)
    vals, missing = dense_values(col, field, rows)
    vals = _filled(vals, missing, field, rows)
    if field.transform == "bucketize":
        if field.boundaries is None:
            raise _unfitted(field, rows, "the quantile boundaries of `transform: bucketize`")
        return np.searchsorted(np.asarray(field.boundaries), vals, side="right").astype(np.int64)
    if field.transform == "none":
        return vals.astype(np.float32)
    out = _scaled(vals, field, rows)
    over = ~(np.abs(out) <= F32_MAX)
    if over.any():
        name, pos = rows.at(_first(over))
        raise DataError(f"{name}: dense field {field.name!r} {pos} holds {float(vals[over][0])!r}"
                        f", which `transform: {field.transform}` takes beyond float32's range; "
                        "the value is far outside the training split's range")
    return out.astype(np.float32)


def canonical_numbers(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str | Rows
                      ) -> pa.Array:
    """A bucketized field's column, checked (:func:`dense_values`): (N,) float64, nulls kept."""
    arr = _decoded(col)
    dense_values(arr, field, source)
    return arr.cast(pa.float64())


def take_ragged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Gather rows of a ragged array without a Python loop.

    Args:
        values: (nnz,) flat values; offsets: (N + 1,); rows: (K,) row indices.
    Returns:
        (values', offsets') for the K gathered rows, offsets' of shape (K + 1,).
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_off[1:])
    total = int(new_off[-1])
    if total == 0:
        return values[:0], new_off
    pos = np.repeat(starts - new_off[:-1], lengths) + np.arange(total, dtype=np.int64)
    return values[pos], new_off
