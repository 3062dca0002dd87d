"""Export a trained run to one self-contained artifact file, and load it back for serving.

An artifact holds the model graph, the feature spec (hashing, bag pooling) and metadata (the
resolved config, training metrics, esmm version, export time, the fields and their kinds):

* ``torchscript``: a traced TorchScript module; the metadata is the JSON extra file
  ``esmm.json``.
* ``onnx``: an ONNX model (opset 17) that runs under onnxruntime; the metadata is the JSON
  string under the key ``esmm.json`` of the model's ``metadata_props``.

The metadata's ``sha256`` holds the SHA-256 of the ``weights`` and of the ``graph`` (see
:func:`torchscript_digests`, :func:`onnx_digests`), computed from the artifact as loaded back at
export; :func:`load_artifact` (and so ``esmm serve`` at start-up) recomputes both and refuses a
file where either differs.

The graph takes flat tensors. For every sparse field, in spec order, either ``ids__NAME``
(R,) int64 bucket ids, or ``values__NAME`` (nnz,) int64 bucket ids with ``offsets__NAME``
(R + 1,) int64 (row r owns ``values[offsets[r]:offsets[r + 1]]``). R is N (one row per
impression) or U (one row per user). Then ``dense`` (N, n_dense) float32 when the spec has dense
fields, ``user_index`` (N,) int64 (the user row of each impression) and ``user_side`` (S,) int64
over the S sparse fields (1: the field's rows are users, gathered by ``user_index``; 0: the
field's rows are the N impressions). Outputs are ``p_ctr``, ``p_cvr``, ``p_ctcvr``, each (N,)
float32.

Raw values are hashed into buckets outside the graph, by :mod:`esmm.features` (the code used
in training), in :class:`Predictor`. Bag pooling inside the graph is a float64 cumulative sum
read at the offsets (an empty bag pools to zeros, as ``F.embedding_bag`` does), which exports
to plain ONNX operators.

Every export is checked: the artifact is loaded back and run on held-out rows (the run's eval
data when it can be read, plus synthetic rows with empty bags, unknown ids and shared user
fields) and compared with the eager model; a difference above ``1e-5`` in any output fails the
export and leaves no file behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

import esmm
from esmm.config import Config, DataConfig
from esmm.data.batches import Batch, make_batch
from esmm.data.tables import RawTables, encode, needed_columns, read_tables
from esmm.errors import DataError, EsmmError, UsageError
from esmm.evaluate import predict_arrays
from esmm.features import (
    F32_MAX,
    FeatureSpec,
    FieldSpec,
    Rows,
    encode_bag,
    encode_categorical,
    encode_dense,
    hash_int_ids,
)
from esmm.models.base import OUTPUT_NAMES, MultiTaskModel
from esmm.nn.embedding import EmbeddingCollection

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FORMAT_VERSION = 1
METADATA_KEY = "esmm.json"
DIGEST_KEY = "sha256"
ONNX_OPSET = 17
PARITY_TOL = 1e-5

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def require(module: str) -> Any:
    """Import an optional dependency of export/serve, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed; install the serving extras with "
                         "`pip install 'esmm[serve]'`") from None


# ----------------------------------------------------------------------------- the graph


class FlatEmbedding(nn.Module):
    """An export-friendly :class:`EmbeddingCollection` with the same weights (dense tables).

    Lookups are plain gathers and bag pooling is a float64 cumulative sum read at the offsets,
    so the module traces to TorchScript and exports to ONNX without ``embedding_bag``.

    ``forward(batch)`` takes a :class:`FlatBatch` and returns (N, spec.input_dim) float32.
    """

    def __init__(self, src: EmbeddingCollection) -> None:
        super().__init__()
        self.spec = src.spec
        self.weights = nn.ParameterList(
            nn.Parameter(src.field_weight(f.name).detach().clone(), requires_grad=False)
            for f in self.spec.sparse
        )
        self.output_dim = src.output_dim
        self.attended = list(src.attended)
        self.attention = src.attention  # the trained units (TargetAttention.padded here)

    def forward(self, batch: FlatBatch) -> torch.Tensor:
        by_field: dict[str, torch.Tensor] = {}
        for i, f in enumerate(self.spec.sparse):
            if f.attention is not None:
                continue  # needs its query's embedding: below
            w = self.weights[i]
            rows = batch.rows[f.name]
            if len(rows) == 1:
                e = F.embedding(rows[0], w)  # (R, D)
            else:
                e = pool_bags(rows[0], rows[1], w, f.pooling)  # (R, D)
            by_field[f.name] = e.index_select(0, batch.gather[f.name])  # (N, D)
        for i, f in enumerate(self.spec.sparse):
            if f.attention is not None:
                values, offsets = batch.rows[f.name]
                unit = self.attention[self.attended.index(f.name)]
                by_field[f.name] = unit.padded(by_field[f.attention.query],
                                               F.embedding(values, self.weights[i]), offsets,
                                               batch.gather[f.name])  # (N, D)
        parts = [by_field[f.name] for f in self.spec.sparse]
        if batch.dense is not None:
            parts.append(batch.dense)
        return torch.cat(parts, dim=1)  # (N, input_dim)


def pool_bags(values: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
              pooling: str) -> torch.Tensor:
    """Sum or mean of the embedding rows of each bag.

    Args:
        values: (nnz,) int64 bucket ids; offsets: (R + 1,) int64 bag boundaries;
        weight: (buckets, D) table; pooling: ``sum`` or ``mean``.
    Returns:
        (R, D) float32; an empty bag gives zeros.
    """
    e = F.embedding(values, weight).double()  # (nnz, D)
    cs = torch.cat([e.new_zeros(1, e.shape[1]), e.cumsum(0)], dim=0)  # (nnz + 1, D)
    pooled = cs.index_select(0, offsets[1:]) - cs.index_select(0, offsets[:-1])  # (R, D)
    if pooling == "mean":
        counts = (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)  # (R, 1)
        pooled = pooled / counts.double()
    return pooled.float()


class FlatBatch:
    """What :class:`FlatEmbedding` reads: per sparse field its row inputs and a gather index.

    rows: field -> (ids,) or (values, offsets); gather: field -> (N,) int64 row of each
    impression in that field's rows; dense: (N, n_dense) float32 or None.
    """

    def __init__(self, rows: dict[str, tuple[torch.Tensor, ...]], gather: dict[str, torch.Tensor],
                 dense: torch.Tensor | None) -> None:
        self.rows = rows
        self.gather = gather
        self.dense = dense


def input_names(spec: FeatureSpec) -> list[str]:
    """Names of the graph inputs, in positional order (see the module docstring)."""
    names: list[str] = []
    for f in spec.sparse:
        if f.kind == "categorical":
            names.append(f"ids__{f.name}")
        else:
            names += [f"values__{f.name}", f"offsets__{f.name}"]
    if spec.dense:
        names.append("dense")
    names += ["user_index", "user_side"]
    return names


class ExportModule(nn.Module):
    """Flat tensors in, ``(p_ctr, p_cvr, p_ctcvr)`` out, each (N,) float32.

    Wraps a copy of a trained model whose embedding collections are replaced by
    :class:`FlatEmbedding` (dense tables, same weights), so models trained with sparse
    gradients export too.
    """

    def __init__(self, model: MultiTaskModel, spec: FeatureSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.names = input_names(spec)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        named = dict(zip(self.names, inputs, strict=True))
        user_index = named["user_index"]  # (N,)
        user_side = named["user_side"]  # (S,)
        own = torch.cumsum(torch.ones_like(user_index), 0) - 1  # (N,) 0..N-1
        rows: dict[str, tuple[torch.Tensor, ...]] = {}
        gather: dict[str, torch.Tensor] = {}
        for i, f in enumerate(self.spec.sparse):
            if f.kind == "categorical":
                rows[f.name] = (named[f"ids__{f.name}"],)
            else:
                rows[f.name] = (named[f"values__{f.name}"], named[f"offsets__{f.name}"])
            gather[f.name] = torch.where(user_side[i] > 0, user_index, own)
        batch = FlatBatch(rows, gather, named.get("dense"))
        probs = self.model.predict(self.model(batch))
        return probs["p_ctr"], probs["p_cvr"], probs["p_ctcvr"]


def build_export_module(model: MultiTaskModel, spec: FeatureSpec) -> ExportModule:
    """A copy of ``model`` (eval mode) with every embedding collection made export-friendly."""
    import copy

    m = copy.deepcopy(model).eval()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, EmbeddingCollection):
                setattr(parent, name, FlatEmbedding(child))
            else:
                replace(child)

    replace(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return ExportModule(m, spec).eval()


# ----------------------------------------------------------------------------- encoding


def _int_ids(values: Sequence[Any], field: FieldSpec, source: str | Rows) -> np.ndarray:
    """Hash a Python sequence of ids that may mix ints, integral floats, strings and None.

    Values are hashed as the field's ``dtype`` says, as in training (see
    :mod:`esmm.features`): with ``auto`` integers as integers and strings as strings, with
    ``str`` an integer as its decimal string, with ``int`` a string of digits as its integer.

    Returns:
        (N,) int64 bucket ids; None hashes as the missing id.
    """
    rows = Rows.of(source)
    ints: list[int | None] = []
    kinds = np.zeros(len(values), dtype=np.int8)  # 0: missing, 1: integer, 2: string
    for i, v in enumerate(values):
        if v is None:
            ints.append(None)
        elif isinstance(v, str):
            ints.append(None)
            kinds[i] = 2
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            if not _INT64_MIN <= int(v) <= _INT64_MAX:
                name, pos = rows.at(i)
                raise DataError(f"{name}: id field {field.name!r} {pos}: id {v} is outside "
                                "the 64-bit integer range")
            ints.append(int(v))
            kinds[i] = 1
        elif (isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer()
              and _INT64_MIN <= v < 2.0**63):
            ints.append(int(v))
            kinds[i] = 1
        else:
            name, pos = rows.at(i)
            raise DataError(f"{name}: id field {field.name!r} {pos}: {v!r} is not an id "
                            "(expected an integer or a string)")
    out = encode_categorical(pa.array(ints, type=pa.int64()), field, rows, typed=True)
    strings = np.flatnonzero(kinds == 2)
    if len(strings):
        strs = pa.array([values[i] for i in strings], type=pa.string())
        out[strings] = encode_categorical(strs, field, replace(rows, index=strings), typed=True)
    return out


def _as_arrow(values: Any) -> pa.Array | None:
    """An Arrow array of ``values``, or None when they do not form one typed column."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return None


def _plain_ints(values: Any) -> np.ndarray | None:
    """(N,) int64 of a Python list holding only ints in the int64 range, else None."""
    if not isinstance(values, list) or not values or set(map(type, values)) != {int}:
        return None
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return None


def _int_array(values: Any) -> bool:
    """A numpy array of integers that fit int64 as they are."""
    return (isinstance(values, np.ndarray) and values.ndim == 1
            and (values.dtype.kind == "i" or (values.dtype.kind == "u"
                                              and values.dtype.itemsize < 8)))


def encode_ids(values: Any, field: FieldSpec, source: str | Rows) -> np.ndarray:
    """Raw ids of a categorical field -> (N,) int64 bucket ids (hashing as in training).

    ``source`` names the request or file in errors (or is the :class:`Rows` naming each row).
    A bucketized dense field takes numbers (see :func:`encode_numbers`).
    """
    if field.transform == "bucketize":
        return encode_numbers(values, field, source)
    if field.dtype != "str" and field.id_type != "str":  # common cases, no trip through Arrow
        if _int_array(values):
            return hash_int_ids(values.astype(np.int64), field.name, field.buckets)
        ints = _plain_ints(values)
        if ints is not None:
            return hash_int_ids(ints, field.name, field.buckets)
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        return encode_categorical(pa.array(values), field, source, typed=True)
    arr = _as_arrow(values)
    if arr is not None and (pa.types.is_integer(arr.type) or pa.types.is_string(arr.type)
                            or pa.types.is_large_string(arr.type)
                            or pa.types.is_floating(arr.type) or pa.types.is_null(arr.type)
                            or pa.types.is_dictionary(arr.type)):
        return encode_categorical(arr, field, source, typed=True)
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return encode_categorical(values, field, source, typed=True)
    return _int_ids(list(values), field, source)


def encode_bags(values: Any, field: FieldSpec, source: str | Rows
                ) -> tuple[np.ndarray, np.ndarray]:
    """Raw id lists of a bag field -> ((nnz,) int64 bucket ids, (N + 1,) int64 offsets).

    A None bag is an empty bag, as in training.
    """
    if isinstance(values, list) and values and set(map(type, values)) == {list}:
        flat = list(itertools.chain.from_iterable(values))
        ints = _plain_ints(flat) if field.dtype != "str" and field.id_type != "str" else None
        if ints is not None or not flat:
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)),
                      out=offsets[1:])
            if ints is None:
                return np.zeros(0, dtype=np.int64), offsets
            return hash_int_ids(ints, field.name, field.buckets), offsets
    arr = _as_arrow(values)
    if arr is not None and (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        inner = arr.type.value_type
        if (pa.types.is_integer(inner) or pa.types.is_string(inner)
                or pa.types.is_floating(inner) or pa.types.is_null(inner)):
            return encode_bag(arr, field, source, typed=True)
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return encode_bag(values, field, source, typed=True)
    rows = Rows.of(source)
    bags = list(values)
    lengths = np.zeros(len(bags), dtype=np.int64)
    flat = []
    for i, b in enumerate(bags):
        if b is None:
            continue
        if isinstance(b, (str, bytes, dict)) or not hasattr(b, "__len__"):
            name, pos = rows.at(i)
            raise DataError(f"{name}: bag field {field.name!r} {pos}: a bag must be a list of "
                            f"ids, got {type(b).__name__}")
        lengths[i] = len(b)
        flat.extend(b)
    offsets = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    inner = replace(field, kind="categorical")
    ids = _int_ids(flat, inner, rows.values_of(offsets)) if flat else np.zeros(0, dtype=np.int64)
    return ids, offsets


def encode_numbers(values: Any, field: FieldSpec, source: str | Rows) -> np.ndarray:
    """Raw values of a dense field -> (N,) float32 (a bucketized one: (N,) int64 buckets),
    filled and transformed as in training (:func:`esmm.features.encode_dense`).

    A missing value without a ``fill``, NaN, an infinity, a value beyond float32's range or a
    non-number is a DataError naming the row.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        return encode_dense(pa.array(values.astype(np.float64, copy=False)), field, source)
    arr = _as_arrow(values)
    if arr is not None and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                            or pa.types.is_null(arr.type)):
        return encode_dense(arr, field, source)
    rows = Rows.of(source)
    for i, v in enumerate(values):
        name, pos = rows.at(i)
        if v is None and field.fill == "error":
            raise DataError(f"{name}: dense field {field.name!r} {pos} is missing")
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
            raise DataError(f"{name}: dense field {field.name!r} {pos}: {v!r} is not a number")
        if isinstance(v, int) and not abs(v) <= F32_MAX:
            raise DataError(f"{name}: dense field {field.name!r} {pos}: {v} is beyond "
                            "float32's range")
    raise DataError(f"{rows.name}: dense field {field.name!r} holds values that are not "
                    "numbers")


# ----------------------------------------------------------------------------- the predictor


class _TorchScriptRunner:
    def __init__(self, module: torch.jit.ScriptModule, names: list[str]) -> None:
        self.module = module
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.names]
        with torch.inference_mode():
            outs = self.module(*args)
        return [o.numpy() for o in outs]


class _OnnxRunner:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.outputs = list(OUTPUT_NAMES)

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, {n: inputs[n] for n in self.names})


class Predictor:
    """A loaded artifact: raw feature values in, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` out.

    Thread-safe: one predictor can serve concurrent requests.

    Attributes:
        metadata: the artifact's metadata (see :func:`export_run`); spec: its feature spec;
        format: ``torchscript`` or ``onnx``; path: the artifact file; digests: the SHA-256
        of its ``weights`` and ``graph`` as loaded.
    """

    def __init__(self, runner: Any, metadata: dict[str, Any], fmt: str, path: Path) -> None:
        self._run = runner
        self.metadata = metadata
        self.spec = FeatureSpec.from_dict(metadata["feature_spec"])
        self.format = fmt
        self.path = path
        self.digests: dict[str, str] = {}
        self.fields = {f.name: f for f in self.spec.fields}
        self._sparse_pos = {f.name: i for i, f in enumerate(self.spec.sparse)}
        # Attention-pooled bags: a graph call scores about this many (row, bag element) pairs
        # at most (the fields' smallest `attention.chunk`), see :meth:`row_chunks`.
        chunks = [f.attention.chunk for f in self.spec.sparse if f.attention is not None]
        self.attention_pairs = min(chunks) if chunks else None

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("model", "unknown"))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on flat inputs (see the module docstring). Returns (N,) float64 each.

        With attention-pooled bags the rows are scored in runs of at most
        ``attention_pairs`` (row, bag element) pairs (:meth:`row_chunks`): the graph pads each
        call's bags to its longest one, and a call's memory grows with rows x longest bag.
        """
        parts = [self._run(chunk) for chunk in self.row_chunks(inputs)]
        return {k: np.concatenate([np.asarray(p[i], dtype=np.float64) for p in parts])
                for i, k in enumerate(OUTPUT_NAMES)}

    def row_chunks(self, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """``inputs`` cut into runs of consecutive rows holding at most ``attention_pairs``
        (row, attention-bag element) pairs each (plus one row's bags); ``[inputs]`` when
        the spec has no attention-pooled bag or they fit."""
        if self.attention_pairs is None:
            return [inputs]
        user_index, side = inputs["user_index"], inputs["user_side"]
        n = len(user_index)
        pairs = np.zeros(n, dtype=np.int64)
        for i, f in enumerate(self.spec.sparse):
            if f.attention is not None:
                lengths = np.diff(inputs[f"offsets__{f.name}"])
                pairs += lengths[user_index] if side[i] else lengths
        ends = np.cumsum(pairs)
        if not n or ends[-1] <= self.attention_pairs:
            return [inputs]
        group = (ends - pairs) // self.attention_pairs
        edges = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), n]
        return [self._rows(inputs, a, b) for a, b in itertools.pairwise(edges)]

    def _rows(self, inputs: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
        """Rows ``a:b`` of flat inputs; user-side fields stay whole (``user_index`` picks)."""
        out = dict(inputs)
        for i, f in enumerate(self.spec.sparse):
            if inputs["user_side"][i]:
                continue
            if f.kind == "categorical":
                out[f"ids__{f.name}"] = inputs[f"ids__{f.name}"][a:b]
            else:
                v, o = inputs[f"values__{f.name}"], inputs[f"offsets__{f.name}"]
                out[f"values__{f.name}"] = v[o[a]:o[b]]
                out[f"offsets__{f.name}"] = o[a:b + 1] - o[a]
        if "dense" in inputs:
            out["dense"] = inputs["dense"][a:b]
        out["user_index"] = inputs["user_index"][a:b]
        return out

    def encode_columns(self, columns: Mapping[str, Any], user: Mapping[str, Any] | None = None,
                       source: str = "request", n: int | None = None) -> dict[str, np.ndarray]:
        """Hash raw columns into the graph's flat inputs.

        Args:
            columns: field -> N raw values (a list, numpy array or Arrow array): ids (int or
                str) for categorical fields, lists of ids for bags, numbers for dense fields.
                Columns that are not fields are ignored.
            user: field -> one raw value shared by all N rows (a user's fields), encoded once.
                A field is given in ``columns`` or in ``user``, not both.
            n: the row count when every field is in ``user`` (else read from ``columns``).
        Returns:
            name -> array, for every graph input.
        """
        user = dict(user or {})
        given = n
        n = None
        for f in self.spec.fields:
            if f.name in columns:
                ln = len(columns[f.name])
                if n is None:
                    n = ln
                elif ln != n:
                    raise DataError(f"{source}: column {f.name!r} has {ln} values but other "
                                    f"columns have {n}")
        if n is None:
            n = given
        elif given is not None and given != n:
            raise DataError(f"{source}: the columns have {n} rows, not {given}")
        if not n:
            raise DataError(f"{source}: no rows to score (give at least one value per field)")
        inputs: dict[str, np.ndarray] = {}
        side = np.zeros(len(self.spec.sparse), dtype=np.int64)
        dense: list[np.ndarray] = []
        # Errors name the row (the item) of a bad value, or the user.
        items, shared = Rows.of(source), Rows.of(f"{source} (user)")
        for f in self.spec.fields:
            in_cols, in_user = f.name in columns, f.name in user
            if in_cols and in_user:
                raise DataError(f"{source}: field {f.name!r} is given both for the user and "
                                "per row; give it once")
            if not (in_cols or in_user):
                raise DataError(f"{source}: field {f.name!r} is missing")
            vals = [user[f.name]] if in_user else columns[f.name]
            where = shared if in_user else items
            if in_user and f.kind != "dense":
                side[self._sparse_pos[f.name]] = 1
            if f.kind == "categorical":
                inputs[f"ids__{f.name}"] = encode_ids(vals, f, where)
            elif f.kind == "multi_categorical":
                v, o = encode_bags(vals, f, where)
                inputs[f"values__{f.name}"], inputs[f"offsets__{f.name}"] = v, o
            else:
                d = encode_numbers(vals, f, where)
                dense.append(np.full(n, d[0], dtype=np.float32) if in_user else d)
        if dense:
            inputs["dense"] = np.ascontiguousarray(np.stack(dense, axis=1))  # (N, n_dense)
        inputs["user_index"] = np.zeros(n, dtype=np.int64)
        inputs["user_side"] = side
        return inputs

    def predict_columns(self, columns: Mapping[str, Any], user: Mapping[str, Any] | None = None,
                        n: int | None = None) -> dict[str, np.ndarray]:
        """Score N rows given as raw columns (see :meth:`encode_columns`), in one graph call.

        Returns:
            ``p_ctr``, ``p_cvr``, ``p_ctcvr``: each (N,) float64.
        """
        return self.run(self.encode_columns(columns, user, n=n))

    def batch_inputs(self, batch: Batch) -> dict[str, np.ndarray]:
        """Flat inputs of an encoded :class:`~esmm.data.batches.Batch` (already hashed)."""
        inputs: dict[str, np.ndarray] = {}
        side = np.zeros(len(self.spec.sparse), dtype=np.int64)
        for i, f in enumerate(self.spec.sparse):
            on_user = f.name not in batch.ids and f.name not in batch.bags
            side[i] = int(on_user)
            ids = batch.user_ids if on_user else batch.ids
            bags = batch.user_bags if on_user else batch.bags
            if f.kind == "categorical":
                inputs[f"ids__{f.name}"] = ids[f.name].numpy()
            else:
                v, o = bags[f.name]
                inputs[f"values__{f.name}"], inputs[f"offsets__{f.name}"] = v.numpy(), o.numpy()
        if self.spec.dense:
            inputs["dense"] = batch.dense.numpy().astype(np.float32)
        ui = batch.user_index
        inputs["user_index"] = (ui.numpy() if ui is not None
                                else np.zeros(batch.size, dtype=np.int64))
        inputs["user_side"] = side
        return inputs

    def predict_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        """Score an encoded batch. Returns ``p_ctr``, ``p_cvr``, ``p_ctcvr``: each (B,)."""
        return self.run(self.batch_inputs(batch))


def _read_metadata_torchscript(path: Path) -> tuple[Any, dict[str, Any]]:
    extra = {METADATA_KEY: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_KEY]:
        raise EsmmError(f"{path}: a TorchScript file without esmm metadata; "
                        "export it with `esmm export`")
    return module, json.loads(extra[METADATA_KEY])


def torchscript_digests(module: Any) -> dict[str, str]:
    """SHA-256 of a loaded TorchScript module: ``weights`` (every parameter and buffer, by
    name) and ``graph`` (the code of every submodule with its constants)."""
    from esmm.checkpoint import tensors_digest

    graph = hashlib.sha256()
    for name, sub in sorted(module.named_modules(), key=lambda t: t[0]):
        graph.update(f"module {name}\n".encode())
        try:
            code, consts = sub.code_with_constants
        except (AttributeError, RuntimeError):  # a container without a forward of its own
            continue
        graph.update(code.encode())
        graph.update(tensors_digest(dict(consts.const_mapping)).encode())
    return {"weights": tensors_digest(dict(module.state_dict())), "graph": graph.hexdigest()}


def onnx_digests(proto: Any) -> dict[str, str]:
    """SHA-256 of an ONNX model: ``weights`` (every initializer: name, type, dims, values) and
    ``graph`` (the graph without its initializers, serialized deterministically)."""
    from onnx import numpy_helper

    weights = hashlib.sha256()
    for init in sorted(proto.graph.initializer, key=lambda t: t.name):
        weights.update(f"{init.name}:{init.data_type}:{list(init.dims)}\n".encode())
        weights.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    graph = type(proto.graph)()
    graph.CopyFrom(proto.graph)
    del graph.initializer[:]
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
    return {"weights": weights.hexdigest(), "graph": digest}


def _verify_digests(path: Path, meta: dict[str, Any], got: dict[str, str]) -> None:
    """Compare an artifact's digests with the ones its metadata was written with."""
    want = meta.get(DIGEST_KEY)
    if not isinstance(want, dict):
        log.warning("%s carries no SHA-256 of its weights and graph (exported by esmm %s); "
                    "loaded unverified", path, meta.get("esmm_version", "0.2.0 or earlier"))
        return
    for part in ("weights", "graph"):
        if want.get(part) != got[part]:
            raise EsmmError(f"{path}: the SHA-256 of its {part} is {got[part][:16]}..., it was "
                            f"exported as {str(want.get(part))[:16]}...: the artifact is corrupt "
                            "or was altered; export it again")


def _load_onnx(path: Path, threads: int | None) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The onnxruntime session, metadata and digests of an ONNX artifact, from one read of the
    file (what is checked is what runs)."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    data = path.read_bytes()
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise EsmmError(f"{path}: an ONNX model without esmm metadata; "
                        "export it with `esmm export`")
    meta = json.loads(props[METADATA_KEY])
    digests = onnx_digests(proto)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # The arena keeps the high-water mark of every run for good: one large request would pin
    # hundreds of MB of a server worker (bench/serve.py --hostile).
    opts.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return _OnnxRunner(sess), meta, digests


def load_artifact(path: str | Path, threads: int | None = None, *, verify: bool = True
                  ) -> Predictor:
    """Load an artifact written by :func:`export_run` (the format is read from the file).

    The SHA-256 of its weights and graph are computed from what was loaded and compared with
    the ones in its metadata (artifacts of esmm 0.2 and earlier have none: a warning).

    Args:
        threads: intra-op threads of the runtime (default: the runtime's own choice).
        verify: compare the digests (export turns it off while the metadata is unfinished).
    Raises:
        EsmmError: the file is not an esmm artifact, or a digest does not match.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such artifact file; write one with `esmm export`")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    try:
        if magic == b"PK\x03\x04":
            module, meta = _read_metadata_torchscript(p)
            digests = torchscript_digests(module)
            if threads:
                torch.set_num_threads(threads)
            runner: Any = _TorchScriptRunner(module, meta["inputs"])
            fmt = "torchscript"
        else:
            runner, meta, digests = _load_onnx(p, threads)
            fmt = "onnx"
    except EsmmError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure means an unreadable artifact
        first = next((s for s in str(e).splitlines() if s.strip()), "")
        raise EsmmError(f"{p}: cannot load as an esmm artifact (TorchScript or ONNX): "
                        f"{type(e).__name__}: {first}") from None
    if not isinstance(meta, dict):
        raise EsmmError(f"{p}: its esmm metadata is a {type(meta).__name__}, not an object")
    if "feature_spec" not in meta:
        raise EsmmError(f"{p}: its esmm metadata has no 'feature_spec'; export it again with "
                        "`esmm export`")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise EsmmError(f"{p}: artifact format {meta['format_version']} is newer than this esmm "
                        f"supports ({FORMAT_VERSION}); upgrade esmm")
    if verify:
        _verify_digests(p, meta, digests)
    predictor = Predictor(runner, meta, fmt, p)
    predictor.digests = digests
    return predictor


# ----------------------------------------------------------------------------- export


def synthetic_columns(spec: FeatureSpec, n: int, seed: int = 0, strings: bool = False
                      ) -> dict[str, Any]:
    """N random valid rows of raw values: ids over the whole 64-bit range (unknown ids), bags of
    0-6 ids (about one in five empty), dense values around and beyond the training range
    (:func:`_synthetic_numbers`). With ``strings``, categorical ids are strings; an ``auto``
    field keeps the id type it was trained on."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    for f in spec.fields:
        as_str = f.id_type == "str" or (strings and f.id_type != "int")
        if f.numeric:
            cols[f.name] = _synthetic_numbers(f, rng, n)
        elif f.kind == "categorical":
            ids = rng.integers(-(2**62), 2**62, n)
            ids[: n // 2] = rng.integers(0, 1000, n // 2)  # small, training-like ids too
            cols[f.name] = [f"id{v}" for v in ids] if as_str else ids.tolist()
        else:
            lengths = rng.integers(0, 7, n)
            lengths[rng.random(n) < 0.2] = 0
            bags = [rng.integers(0, 10_000, k).tolist() for k in lengths]
            cols[f.name] = [[f"id{v}" for v in b] for b in bags] if f.id_type == "str" else bags
    return cols


def _synthetic_numbers(f: FieldSpec, rng: np.random.Generator, n: int) -> list[float | None]:
    """N values of a dense field: ~ N(0, 1), or spread over 1.5 times the training range when
    statistics were fitted, non-negative for ``log1p``, about each boundary for ``bucketize``
    (boundaries themselves included), and one in ten missing when the field has a ``fill``."""
    x = rng.normal(size=n)
    st = f.stats
    if f.boundaries:
        b = np.asarray(f.boundaries)
        width = max(float(b[-1] - b[0]), 1.0)
        x = rng.uniform(b[0] - width / 2, b[-1] + width / 2, n)
        x[: n // 4] = rng.choice(b, n // 4)
    elif st is not None:
        x = st.mean + 1.5 * (st.std or 1.0) * x
    if f.transform == "log1p":
        x = np.abs(x)
    out: list[float | None] = x.tolist()
    if f.fill != "error":
        for i in np.flatnonzero(rng.random(n) < 0.1):
            out[i] = None
    return out


def _arrow_table(spec: FeatureSpec, cols: Mapping[str, Any]) -> pa.Table:
    arrays = {}
    for f in spec.fields:
        if f.kind == "multi_categorical":
            inner = pa.string() if f.id_type == "str" else pa.int64()
            arrays[f.name] = pa.array(cols[f.name], type=pa.list_(inner))
        elif f.numeric:
            arrays[f.name] = pa.array(cols[f.name], type=pa.float64())
        else:
            arrays[f.name] = pa.array(cols[f.name])
    return pa.table(arrays)


def _eager(model: MultiTaskModel, spec: FeatureSpec, raw: RawTables, data_cfg: DataConfig
           ) -> tuple[dict[str, np.ndarray], Any]:
    data = encode(raw, spec, data_cfg, require_labels=False)
    return predict_arrays(model, data, batch_size=8192), data


def _read_eval_rows(cfg: Config, spec: FeatureSpec, rows: int) -> RawTables | None:
    path = cfg.data.eval
    if not path or not Path(path).exists():
        return None
    p = Path(path)
    cols = needed_columns(spec, cfg.data)
    try:
        if p.is_file() and cfg.data.format != "csv" and p.suffix.lower() not in (".csv", ".txt"):
            pf = pq.ParquetFile(p)
            names = [c for c in cols if c in pf.schema_arrow.names]
            first = next(pf.iter_batches(batch_size=rows, columns=names), None)
            if first is None:
                return None
            return RawTables(str(p), pa.Table.from_batches([first]))
        raw = read_tables(p, cfg.data, columns=cols)
        return RawTables(raw.source, raw.impressions.slice(0, rows), raw.users)
    except (EsmmError, OSError, pa.ArrowException) as e:
        log.warning("parity check: cannot read the eval data %s (%s); using synthetic rows only",
                    path, e)
        return None


def _diffs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k in OUTPUT_NAMES:
        d = np.abs(np.asarray(got[k], dtype=np.float64) - ref[k])
        out[k] = float(d.max()) if d.size and np.all(np.isfinite(d)) else (
            0.0 if not d.size else float("inf"))
    return out


def check_parity(model: MultiTaskModel, cfg: Config, spec: FeatureSpec, predictor: Predictor,
                 rows: int = 512, tol: float = PARITY_TOL, seed: int = 0) -> dict[str, Any]:
    """Compare the artifact with the eager model on held-out and synthetic rows.

    Sets of rows: the first ``rows`` rows of the run's eval data (when readable), scored from
    their encoded batch (and from raw columns for flat tables); ``rows`` synthetic rows with
    unknown ids and empty bags; and the same count with string ids and every other sparse field
    given once as a shared user.

    Returns:
        a report: per output the max absolute difference, the row sets and the tolerance.
    Raises:
        EsmmError naming the output, the row set and the max difference when one exceeds
        ``tol``.
    """
    syn_cfg = DataConfig(user_column=None, weight_column=None)
    checks: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    raw = _read_eval_rows(cfg, spec, rows)
    if raw is not None:
        ref, data = _eager(model, spec, raw, cfg.data)
        got = predictor.predict_batch(make_batch(data, np.arange(data.n, dtype=np.int64)))
        checks.append((f"{data.n} eval rows of {raw.source}", ref, got))
        if raw.users is None:
            cols = {f.name: raw.impressions.column(f.name) for f in spec.fields}
            got = predictor.predict_columns(cols)
            checks.append((f"{data.n} raw eval rows of {raw.source}", ref, got))

    cols = synthetic_columns(spec, rows, seed)
    ref, _ = _eager(model, spec, RawTables("synthetic", _arrow_table(spec, cols)), syn_cfg)
    checks.append((f"{rows} synthetic rows", ref, predictor.predict_columns(cols)))

    cols = synthetic_columns(spec, rows, seed + 1, strings=True)
    user_fields = [f.name for f in spec.sparse[::2]]
    user = {name: cols[name][0] for name in user_fields}
    shared = {k: ([v[0]] * rows if k in user else v) for k, v in cols.items()}
    ref, _ = _eager(model, spec, RawTables("synthetic", _arrow_table(spec, shared)), syn_cfg)
    got = predictor.predict_columns({k: v for k, v in cols.items() if k not in user}, user)
    checks.append((f"{rows} synthetic rows with shared user fields {user_fields}", ref, got))

    report: dict[str, Any] = {"tolerance": tol, "max_abs_diff": dict.fromkeys(OUTPUT_NAMES, 0.0),
                              "row_sets": []}
    for what, ref, got in checks:
        d = _diffs(ref, got)
        report["row_sets"].append(what)
        for k, v in d.items():
            report["max_abs_diff"][k] = max(report["max_abs_diff"][k], v)
            if not v <= tol:
                raise EsmmError(
                    f"parity check failed: {k} of the {predictor.format} artifact differs from "
                    f"the eager model by up to {v:.3g} (tolerance {tol:g}) on {what}; "
                    "no artifact written")
    return report


def _example_inputs(spec: FeatureSpec) -> tuple[torch.Tensor, ...]:
    """Small trace inputs: 3 rows, bags of 2, 0 and 1 ids, no shared user fields."""
    vals: list[torch.Tensor] = []
    for f in spec.sparse:
        if f.kind == "categorical":
            vals.append(torch.tensor([0, 1, 2], dtype=torch.int64) % f.buckets)
        else:
            vals += [torch.tensor([0, 1, 2], dtype=torch.int64) % f.buckets,
                     torch.tensor([0, 2, 2, 3], dtype=torch.int64)]
    if spec.dense:
        vals.append(torch.zeros(3, len(spec.dense), dtype=torch.float32))
    vals.append(torch.zeros(3, dtype=torch.int64))
    vals.append(torch.zeros(len(spec.sparse), dtype=torch.int64))
    return tuple(vals)


def _dynamic_axes(spec: FeatureSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for f in spec.sparse:
        if f.kind == "categorical":
            axes[f"ids__{f.name}"] = {0: f"rows_{f.name}"}
        else:
            axes[f"values__{f.name}"] = {0: f"nnz_{f.name}"}
            axes[f"offsets__{f.name}"] = {0: f"rows1_{f.name}"}
    if spec.dense:
        axes["dense"] = {0: "N"}
    axes["user_index"] = {0: "N"}
    for k in OUTPUT_NAMES:
        axes[k] = {0: "N"}
    return axes


def _write_graph(fmt: str, module: ExportModule, spec: FeatureSpec, meta: dict[str, Any],
                 path: Path) -> None:
    example = _example_inputs(spec)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})
            return
        onnx = require("onnx")
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=module.names, output_names=list(OUTPUT_NAMES),
                          dynamic_axes=_dynamic_axes(spec), do_constant_folding=True)
        proto = onnx.load(str(path))
        _set_onnx_metadata(proto, meta)
        onnx.save_model(proto, str(path))


def _set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta)


def _rewrite_metadata(fmt: str, path: Path, meta: dict[str, Any]) -> None:
    """Replace the metadata of an artifact file in place (the graph is untouched)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
            torch.jit.save(module, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})
        return
    onnx = require("onnx")
    proto = onnx.load(str(path))
    _set_onnx_metadata(proto, meta)
    onnx.save_model(proto, str(path))


def _run_metrics(run: Path) -> dict[str, Any] | None:
    d = run if run.is_dir() else run.parent.parent
    m = d / "metrics.json"
    if m.is_file():
        try:
            return json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s cannot be read; the artifact carries no training metrics", m)
    return None


def field_list(spec: FeatureSpec) -> list[dict[str, Any]]:
    """Fields with kinds, for metadata: name, kind, buckets, dim, pooling (bags only)."""
    out = []
    for f in spec.fields:
        d: dict[str, Any] = {"name": f.name, "kind": f.kind}
        if f.kind != "dense":
            d.update(buckets=f.buckets, dim=f.dim)
        if f.kind == "multi_categorical":
            d["pooling"] = f.pooling
        if f.transform != "none":
            d["transform"] = f.transform
        if f.attention is not None:
            d["query"] = f.attention.query
        out.append(d)
    return out


def export_run(run: str | Path, fmt: str, out: str | Path, *, parity_rows: int = 512,
               tol: float = PARITY_TOL) -> dict[str, Any]:
    """Export the best checkpoint of ``run`` to one artifact file at ``out``.

    The artifact is written to a temporary file beside ``out``, loaded back and checked
    against the eager model (:func:`check_parity`); only then is it moved to ``out``.

    Returns:
        the artifact's metadata (including the parity report).
    """
    from esmm.checkpoint import load_model
    from esmm.fsio import atomic_path, prepare_file_output

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    if parity_rows < 1:
        raise UsageError("parity rows must be at least 1")
    if fmt == "onnx":
        require("onnx")
        require("onnxruntime")
    run = Path(run)
    out = prepare_file_output(out)
    model, cfg, spec, ck = load_model(run)
    if not spec.fields:
        raise UsageError(f"{run}: the model has no input fields")
    module = build_export_module(model, spec)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "model": cfg.model.name,
        "esmm_version": esmm.__version__,
        "torch_version": torch.__version__,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run),
        "checkpoint_step": ck.get("step"),
        "fields": field_list(spec),
        "inputs": input_names(spec),
        "outputs": list(OUTPUT_NAMES),
        "feature_spec": spec.to_dict(),
        "config": cfg.to_dict(),
        "metrics": _run_metrics(run),
    }
    if fmt == "onnx":
        meta["onnx_opset"] = ONNX_OPSET
    # Written under a temporary name, checked, sealed, loaded back and verified; only then
    # renamed to ``out``: a failure at any step leaves no file and the previous ``out`` intact.
    with atomic_path(out) as tmp:
        _write_graph(fmt, module, spec, meta, tmp)
        predictor = load_artifact(tmp, verify=False)
        meta["parity"] = check_parity(model, cfg, spec, predictor, rows=parity_rows, tol=tol)
        meta[DIGEST_KEY] = predictor.digests
        del predictor
        _rewrite_metadata(fmt, tmp, meta)
        load_artifact(tmp)
    log.info("exported %s (%s) to %s; parity max abs diff %s", run, fmt, out,
             {k: f"{v:.2g}" for k, v in meta["parity"]["max_abs_diff"].items()})
    return meta
