"""The feature spec: how raw column values become embedding rows and dense inputs.

The same code encodes rows for training, evaluation and serving, so a model sees identical ids
everywhere. Hashing is stable across processes and machines:

* integer ids: ``bucket = splitmix64(id XOR field_seed) mod buckets``,
* string ids: ``bucket = xxh64(utf-8 bytes, seed=field_seed) mod buckets``,

with ``field_seed = xxh64(field name)``. Python's salted ``hash()`` is never used. Missing values
(nulls) hash like the sentinel id ``-1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from esmm.config import Config
from esmm.errors import DataError

HASH_VERSION = "splitmix64-xxh64-v1"
MISSING_ID = -1

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


@dataclass(frozen=True)
class FieldSpec:
    """One input field after config resolution."""

    name: str
    kind: str  # categorical | multi_categorical | dense
    buckets: int
    dim: int
    pooling: str


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
        return {"fields": [asdict(f) for f in self.fields], "hash_version": self.hash_version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(tuple(FieldSpec(**f) for f in d["fields"]), d.get("hash_version", HASH_VERSION))


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
        ))
    return FeatureSpec(tuple(fields))


# --------------------------------------------------------------------------------------------
# Column encoders: Arrow column -> numpy arrays, vectorised.


def _flat(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def encode_categorical(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str
                       ) -> np.ndarray:
    """Encode a single-valued id column.

    Returns:
        (N,) int64 bucket ids.
    """
    arr = _flat(col)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_integer(t):
        vals = arr.fill_null(MISSING_ID).to_numpy(zero_copy_only=False)
        return hash_int_ids(vals, field.name, field.buckets)
    if pa.types.is_floating(t):
        f = arr.to_numpy(zero_copy_only=False)
        ok = ~np.isnan(f)
        if np.any(ok & (f != np.round(f))):
            bad = int(np.flatnonzero(ok & (f != np.round(f)))[0])
            raise DataError(f"{source}: column {field.name!r} is a categorical id field but row "
                            f"{bad} holds the non-integer value {f[bad]!r}")
        vals = np.where(ok, f, MISSING_ID).astype(np.int64)
        return hash_int_ids(vals, field.name, field.buckets)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return hash_str_ids(arr, field.name, field.buckets)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        raise DataError(f"{source}: column {field.name!r} holds lists but the config declares it "
                        "`kind: categorical`; declare it `kind: multi_categorical`")
    raise DataError(f"{source}: column {field.name!r} has type {t}; expected integer or string ids")


def encode_bag(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Encode a multi-valued id column (a list per row).

    Returns:
        values: (nnz,) int64 bucket ids; offsets: (N + 1,) int64, row i owns
        ``values[offsets[i]:offsets[i + 1]]``. A null list is an empty bag.
    """
    arr = _flat(col)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        # A single id per row is a bag of one.
        ids = encode_categorical(arr, field, source)
        return ids, np.arange(len(ids) + 1, dtype=np.int64)
    if arr.null_count:
        arr = pc.if_else(arr.is_null(), pa.scalar([], type=t), arr)
        arr = _flat(arr)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values
    if offsets[0] != 0 or offsets[-1] != len(values):
        values = values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets = offsets - offsets[0]
    inner = FieldSpec(field.name, "categorical", field.buckets, field.dim, field.pooling)
    return encode_categorical(values, inner, source), offsets


def encode_dense(col: pa.ChunkedArray | pa.Array, field: FieldSpec, source: str) -> np.ndarray:
    """Encode a dense column. NaN or null is an error naming the row (no silent imputation)."""
    arr = _flat(col)
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise DataError(f"{source}: dense field {field.name!r} has type {arr.type}; "
                        "expected numbers")
    vals = arr.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = np.isnan(vals)
    if arr.null_count:
        bad |= np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: dense field {field.name!r} has {int(bad.sum())} NaN or missing "
                        f"value(s), first at row {first}; fill or drop them before training")
    return vals


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
