"""Typed configuration: one YAML file drives train, evaluate and predict.

The YAML is validated by pydantic models that reject unknown keys, so a typo such as
``train.optimiser`` fails with its path instead of being ignored. Values are strict: a boolean
is not a number (``batch_size: true`` is refused, not read as 1), a number is not a string, and
floats are finite. Every field has a valid range, and an error names the full key path
(``train.optimizer.eps``), the value given and what was expected, on one line.

Any key can be overridden from the command line with ``--set path.to.key=value`` (values are
parsed as YAML scalars, so ``--set train.optimizer.lr=0.01`` gives a float and
``--set model.tower=[64,32]`` a list). The YAML reader refuses duplicate keys and reads
``1e-3`` as a float (as YAML 1.2 does; PyYAML's YAML 1.1 would read it as a string).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from esmm.errors import ConfigError
from esmm.fsio import write_text

ALICCP_USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
ALICCP_USER_BAGS = ("109_14", "110_14", "127_14", "150_14")
ALICCP_ITEM_FIELDS = ("205", "206", "207", "216")
ALICCP_ITEM_BAGS = ("210",)
ALICCP_COMBO_FIELDS = ("508", "509", "702", "853")
ALICCP_CONTEXT_FIELDS = ("301",)

# Hash-bucket sizes for the `aliccp` feature preset, roughly the distinct-id counts of the
# real train split (user ids ~0.4M, items ~4.3M are cut to keep tables in memory on a laptop).
_ALICCP_BUCKETS = {
    "101": 200_000, "121": 100, "122": 20, "124": 5, "125": 10, "126": 5, "127": 5,
    "128": 5, "129": 10, "109_14": 20_000, "110_14": 200_000, "127_14": 100_000,
    "150_14": 50_000, "205": 500_000, "206": 10_000, "207": 200_000, "216": 100_000,
    "210": 100_000, "508": 50_000, "509": 200_000, "702": 100_000, "853": 100_000, "301": 10,
}


class _Strict(BaseModel):
    # Strict: YAML `true` is not the integer 1 and `101` is not the string "101" unless a field
    # says so; NaN and infinities are no valid setting of any float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)


NonEmptyStr = Annotated[str, Field(min_length=1)]
_F32_MAX = 3.4028234663852886e38  # a fill value must be a float32 number
# Adam's moment decay rates: torch needs 0 <= beta < 1.
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _int_to_str(v: Any) -> Any:
    # Ali-CCP field ids look like integers; YAML would read `101` as an int.
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class LabelsConfig(_Strict):
    """Names of the label columns in the data."""

    click: NonEmptyStr = "click"
    conversion: NonEmptyStr = "conversion"

    @field_validator("click", "conversion", mode="before")
    @classmethod
    def _names_to_str(cls, v: Any) -> Any:
        return _int_to_str(v)

    @model_validator(mode="after")
    def _distinct(self) -> LabelsConfig:
        if self.click == self.conversion:
            raise ValueError(f"click and conversion name the same column {self.click!r}; "
                             "expected two different label columns")
        return self


class DataConfig(_Strict):
    """Where the data lives and how to read it.

    ``train`` / ``eval`` / ``test`` are a Parquet file, a folder of Parquet files, a CSV file, or a
    normalized folder holding ``impressions.parquet`` and ``users.parquet`` joined by ``user_key``.

    ``loader``: ``memory`` reads a split whole and shuffles every row; ``stream`` reads Parquet
    ``chunk_rows`` rows at a time and shuffles row groups, then rows within ``shuffle_buffer``
    rows, so memory does not grow with the data (``auto``: stream Parquet, read other formats
    whole). ``read_ahead`` batches are prepared in a background thread while the model trains.
    """

    train: NonEmptyStr | None = None
    eval: NonEmptyStr | None = None
    test: NonEmptyStr | None = None
    format: Literal["auto", "parquet", "csv", "rechub-csv", "aitm-csv", "paddle-esmm-txt"] = "auto"
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    user_column: NonEmptyStr | None = "101"
    user_key: NonEmptyStr = "common_key"
    weight_column: NonEmptyStr | None = None
    conversion_without_click: Literal["drop", "error", "keep"] = "drop"
    csv_header: bool = True
    csv_columns: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    loader: Literal["memory", "stream", "auto"] = "memory"
    chunk_rows: int = Field(default=65_536, gt=0)
    shuffle_buffer: int = Field(default=262_144, gt=0)
    # Each batch read ahead is held in memory; past a few there is nothing left to overlap.
    read_ahead: int = Field(default=2, ge=0, le=64)

    @field_validator("user_column", "user_key", "weight_column", mode="before")
    @classmethod
    def _columns_to_str(cls, v: Any) -> Any:
        return _int_to_str(v)

    @field_validator("csv_columns", mode="before")
    @classmethod
    def _int_column_names(cls, v: Any) -> Any:
        return [_int_to_str(c) for c in v] if isinstance(v, list) else v

    @field_validator("csv_columns")
    @classmethod
    def _unique_columns(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            dup = sorted({c for c in v if v.count(c) > 1})
            if dup:
                raise ValueError(f"columns listed more than once: {dup}; expected unique names")
        return v

    @model_validator(mode="after")
    def _check_columns(self) -> DataConfig:
        if self.csv_columns is not None and self.csv_header:
            raise ValueError("csv_columns names the columns of a CSV without a header row; "
                             "set csv_header: false with it, or remove csv_columns")
        if self.weight_column is not None and self.weight_column in (
                self.labels.click, self.labels.conversion):
            raise ValueError(f"weight_column {self.weight_column!r} is a label column; "
                             "expected a separate column of sample weights")
        return self


class AttentionConfig(_Strict):
    """The attention unit of a ``pooling: attention`` bag (DIN, Zhou et al., KDD 2018).

    ``hidden``: widths of the MLP (PReLU after each layer) that scores each bag element from
    [query, key, query - key, query * key]; the paper's [80, 40] by default. ``weights``:
    ``none`` uses the scores as they are (the paper: no softmax, so the pooled vector keeps
    how strongly a user's behaviours match the item); ``softmax`` normalises them over the
    bag. ``chunk``: at most this many (impression, bag element) pairs are scored at once in
    training and evaluation (plus one impression's bag), each chunk recomputed in the
    backward pass rather than kept, which bounds the attention's memory.
    """

    hidden: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)] = Field(
        default_factory=lambda: [80, 40])
    weights: Literal["none", "softmax"] = "none"
    chunk: int = Field(default=65536, gt=0)


class FeatureConfig(_Strict):
    """One input field.

    ``categorical``: one id per row, hashed into ``buckets`` rows of an embedding table.
    ``multi_categorical``: a list of ids per row (a bag), pooled by ``pooling``: ``sum``,
    ``mean``, or ``attention`` (DIN target attention: each element weighted by an MLP of the
    element and the ``query`` field's embedding, see :class:`AttentionConfig` and
    docs/models.md).
    ``dense``: one float per row, fed to the towers beside the embeddings.

    ``dtype`` (id fields): ``auto`` hashes what the data holds, integers as integers and
    strings as strings, and refuses a column that mixes integer-looking values with other
    strings (a stray string in a CSV id column) or is integer in one file and string in
    another; ``str`` hashes every value as a string, integers as their decimal string (in
    training, evaluation, prediction and serving alike); ``int`` requires integer ids, and
    reads strings of decimal digits as those integers.
    """

    name: str
    kind: Literal["categorical", "multi_categorical", "dense"] = "categorical"
    # Ids are hashed to int64 bucket numbers, so a table cannot have more rows than that.
    buckets: int | None = Field(default=None, gt=0, lt=2**63)
    dim: int | None = Field(default=None, gt=0)
    pooling: Literal["sum", "mean", "attention"] = "mean"
    dtype: Literal["auto", "int", "str"] = "auto"
    # Dense fields only; see docs/config.md (statistics are fitted on data.train).
    transform: Literal["none", "zscore", "minmax", "log1p", "bucketize"] = "none"
    fill: float | Literal["mean", "error"] = "error"
    boundaries: list[float] | None = Field(default=None, min_length=1, max_length=1_000_000)
    quantiles: int | None = Field(default=None, ge=2, le=1_000_000)
    # `pooling: attention` only; left out of the dump when unset, so configs written before
    # these keys existed read back unchanged.
    query: NonEmptyStr | None = Field(default=None, exclude_if=lambda v: v is None)
    attention: AttentionConfig | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("name", mode="before")
    @classmethod
    def _int_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check_kind(self) -> FeatureConfig:
        if self.kind != "dense" and self.buckets is None:
            raise ValueError(f"feature {self.name!r} of kind {self.kind!r} needs `buckets` (> 0)")
        if self.kind == "dense" and self.dtype != "auto":
            raise ValueError(f"feature {self.name!r} is dense: `dtype` applies to id fields only")
        return self

    @field_validator("fill", mode="before")
    @classmethod
    def _check_fill(cls, v: Any) -> Any:
        if isinstance(v, str) and v in ("mean", "error"):
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("expected a number, 'mean' or 'error'")
        if not abs(v) <= _F32_MAX:  # NaN fails too
            raise ValueError("expected a finite float32 number")
        return float(v)

    @model_validator(mode="after")
    def _check_transform(self) -> FeatureConfig:
        _check_dense_keys(self)
        return self

    @field_validator("query", mode="before")
    @classmethod
    def _query_int_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check_attention(self) -> FeatureConfig:
        if self.pooling == "attention":
            if self.kind != "multi_categorical":
                raise ValueError(f"feature {self.name!r} is {self.kind}: `pooling: attention` "
                                 "applies to multi_categorical fields only")
            if self.query is None:
                raise ValueError(f"feature {self.name!r} has `pooling: attention` but no "
                                 "`query`; expected the name of a categorical field (the "
                                 "impression's item, e.g. `query: '205'`)")
        else:
            for key in ("query", "attention"):
                if getattr(self, key) is not None:
                    raise ValueError(f"feature {self.name!r} sets `{key}` but its pooling is "
                                     f"{self.pooling!r}; `{key}` applies to `pooling: "
                                     "attention` only")
        return self

    @model_serializer(mode="wrap")
    def _omit_auto_dtype(self, handler: Any) -> dict[str, Any]:
        # The default is left out, so a config (and a checkpoint's copy of it) reads as it did
        # before `dtype` existed: runs started earlier resume with an unchanged config.
        out = handler(self)
        if out.get("dtype") == "auto":
            del out["dtype"]
        _omit_dense_defaults(out)
        return out


_DENSE_DEFAULTS: dict[str, Any] = {"transform": "none", "fill": "error", "boundaries": None,
                                   "quantiles": None}


def _omit_dense_defaults(out: dict[str, Any]) -> None:
    # As `dtype`: a config without transforms reads as before they existed.
    for key, default in _DENSE_DEFAULTS.items():
        if key in out and out[key] == default and type(out[key]) is type(default):
            del out[key]


def _check_dense_keys(f: FeatureConfig) -> None:
    """``transform``/``fill`` belong to dense fields, ``boundaries``/``quantiles`` (exactly
    one of them) to ``transform: bucketize``."""
    given = f.model_fields_set
    if f.kind != "dense":
        for key in ("transform", "fill", "boundaries", "quantiles"):
            if key in given:
                raise ValueError(f"feature {f.name!r} is {f.kind}: `{key}` applies to dense "
                                 "fields only")
        return
    for key in ("boundaries", "quantiles"):
        if key in given and f.transform != "bucketize":
            raise ValueError(f"feature {f.name!r} has `{key}` but `transform: {f.transform}`; "
                             "`boundaries` and `quantiles` go with `transform: bucketize`")
    if f.transform == "bucketize" and (f.boundaries is None) == (f.quantiles is None):
        raise ValueError(f"feature {f.name!r} has `transform: bucketize`: give either "
                         "`boundaries: [...]` (ascending cut points) or `quantiles: N` "
                         "(N buckets fitted on data.train), not both or neither")
    b = f.boundaries or []
    down = next((i for i in range(1, len(b)) if not b[i] > b[i - 1]), None)
    if down is not None:
        raise ValueError(f"feature {f.name!r}: boundaries[{down}] = {b[down]!r} does not exceed "
                         f"boundaries[{down - 1}] = {b[down - 1]!r}; expected strictly "
                         "ascending cut points")


Widths = Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1)]


class NoBackboneConfig(_Strict):
    """No backbone: each task tower reads the embeddings directly (ESMM, BASE)."""

    name: Literal["none"] = "none"


class SharedBottomConfig(_Strict):
    """One MLP of widths ``bottom`` over the embeddings, shared by both task towers."""

    name: Literal["shared_bottom"] = "shared_bottom"
    bottom: Widths = Field(default_factory=lambda: [256, 128])


class MMoEConfig(_Strict):
    """``experts`` MLPs of widths ``expert``; one softmax gate per task mixes them."""

    name: Literal["mmoe"] = "mmoe"
    experts: int = Field(default=4, ge=1)
    expert: Widths = Field(default_factory=lambda: [256, 128])


class PLEConfig(_Strict):
    """``levels`` CGC layers, each with ``task_experts`` experts per task and
    ``shared_experts`` shared ones, all MLPs of widths ``expert``."""

    name: Literal["ple"] = "ple"
    levels: int = Field(default=2, ge=1)
    task_experts: int = Field(default=2, ge=1)
    shared_experts: int = Field(default=2, ge=1)
    expert: Widths = Field(default_factory=lambda: [128, 64])


class DBMTLConfig(_Strict):
    """A shared ``bottom`` MLP (empty list: none), then the CVR tower's hidden output joined
    with the CTR tower's through a ``relation`` MLP."""

    name: Literal["dbmtl"] = "dbmtl"
    bottom: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256])
    relation: Widths = Field(default_factory=lambda: [64])


class AITMConfig(_Strict):
    """Attention transfer from the click tower to the conversion tower; ``calibrator`` is the
    weight alpha of the behavioural-expectation calibrator loss."""

    name: Literal["aitm"] = "aitm"
    calibrator: float = Field(default=0.6, ge=0.0)


BackboneConfig = Annotated[
    NoBackboneConfig | SharedBottomConfig | MMoEConfig | PLEConfig | DBMTLConfig | AITMConfig,
    Field(discriminator="name"),
]


class HeadConfig(_Strict):
    """How per-task logits become probabilities and losses.

    ``independent``: loss_ctr over all impressions, loss_cvr over clicked ones.
    ``entire_space``: ESMM's loss_ctr + loss_ctcvr over all impressions, pCTCVR = pCTR * pCVR.
    ``ctcvr``: loss_ctr + loss_ctcvr over all impressions with pCTCVR from its own tower and
    pCVR = min(pCTCVR / pCTR, 1).
    """

    name: Literal["independent", "entire_space", "ctcvr"] = "entire_space"


class AmanConfig(_Strict):
    """AMAN: ``rate``, the share of unclicked impressions used as CVR negatives, in (0, 1]."""

    rate: float = Field(default=1.0, gt=0.0, le=1.0)


class OversamplingConfig(_Strict):
    """OVERSAMPLING: ``k`` copies of each clicked-and-converted impression in the CVR loss
    (>= 1; 1 is BASE)."""

    k: int = Field(default=5, ge=1)


class UnbiasConfig(_Strict):
    """UNBIAS: ``clip``, the lower bound on the click propensity in the weights 1 / pCTR, in
    (0, 1]; weights are at most 1 / clip."""

    clip: float = Field(default=0.01, gt=0.0, le=1.0)


class DivisionConfig(_Strict):
    """DIVISION: ``clip``, the upper bound on pCVR = pCTCVR / pCTR, in (0, 1]."""

    clip: float = Field(default=1.0, gt=0.0, le=1.0)


class Escm2Config(_Strict):
    """ESCM2-IPS / ESCM2-DR: ``lambda_c``, the weight of the counterfactual CVR risk (the
    paper's lambda_c, >= 0; 0 is ESMM), and ``clip``, the lower bound on the click propensity
    in the weights 1 / pCTR, in (0, 1)."""

    lambda_c: float = Field(default=1.0, ge=0.0)
    clip: float = Field(default=0.05, gt=0.0, lt=1.0)


class DcmtConfig(_Strict):
    """DCMT: ``lambda_prior``, the weight of the counterfactual prior |1 - (pCVR + pCVR*)|
    (>= 0), and ``clip``: propensities pCTR and 1 - pCTR are bounded below by it, in (0, 0.5]."""

    lambda_prior: float = Field(default=1.0, ge=0.0)
    clip: float = Field(default=0.05, gt=0.0, le=0.5)


# The flat method keys of earlier configs (and checkpoints) -> (method section, key).
_FLAT_METHOD_KEYS = {"aman_rate": ("aman", "rate"), "oversample_k": ("oversampling", "k"),
                     "unbias_clip": ("unbias", "clip"), "division_clip": ("division", "clip")}


class ModelConfig(_Strict):
    """Which model and its shape. Every tower is ``tower`` hidden layers then one logit.

    ``backbone`` and ``head`` (null: the model's own, see docs/models.md) put any backbone
    under any head, e.g. ``--set model.backbone.name=mmoe`` turns ``esmm`` into ESMM over MMoE.

    Method options sit under the method they belong to and are read only by it:
    ``aman: {rate}``, ``oversampling: {k}``, ``unbias: {clip}``, ``division: {clip}``,
    ``escm2: {lambda_c, clip}``, ``dcmt: {lambda_prior, clip}``. The flat
    keys of earlier configs (``aman_rate``, ``oversample_k``, ``unbias_clip``,
    ``division_clip``) are still read and set the same options (null: not given).
    """

    name: str = "esmm"
    tower: list[int] = Field(default_factory=lambda: [360, 200, 80])
    embedding_dim: int = Field(default=18, gt=0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    backbone: BackboneConfig | None = None
    head: HeadConfig | None = None
    aman: AmanConfig = Field(default_factory=AmanConfig)
    oversampling: OversamplingConfig = Field(default_factory=OversamplingConfig)
    unbias: UnbiasConfig = Field(default_factory=UnbiasConfig)
    division: DivisionConfig = Field(default_factory=DivisionConfig)
    escm2: Escm2Config = Field(default_factory=Escm2Config)
    dcmt: DcmtConfig = Field(default_factory=DcmtConfig)
    aman_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    oversample_k: int | None = Field(default=None, ge=1)
    unbias_clip: float | None = Field(default=None, gt=0.0, le=1.0)
    division_clip: float | None = Field(default=None, gt=0.0, le=1.0)
    # Embedding tables sharded across the ranks (docs/scaling.md): ``none`` replicates them on
    # every rank; ``torchrec`` shards them with TorchRec (the ``torchrec`` extra), row by row
    # (``row_wise``: every table split in contiguous row ranges, one per rank) or whole tables
    # placed on ranks (``table_wise``).
    sharding: Literal["none", "torchrec"] = "none"
    sharding_type: Literal["row_wise", "table_wise"] = "row_wise"

    @field_validator("tower")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(h <= 0 for h in v):
            raise ValueError(f"tower must be a non-empty list of positive widths, got {v}")
        return v

    @model_validator(mode="after")
    def _flat_method_keys(self) -> ModelConfig:
        for flat, (section, key) in _FLAT_METHOD_KEYS.items():
            value = getattr(self, flat)
            if value is None:
                continue
            sub = getattr(self, section)
            if key in sub.model_fields_set and getattr(sub, key) != value:
                raise ValueError(f"{flat}={value} and {section}.{key}={getattr(sub, key)} "
                                 f"disagree; give only {section}.{key}")
            # Bypass validate_assignment, which would rerun this validator recursively.
            object.__setattr__(sub, key, value)
        return self


class OptimizerConfig(_Strict):
    """Optimizer of the dense weights (towers; embeddings too with ``sparse_optimizer: dense``)."""

    name: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    # adam/adamw only. null: the fused kernel when the embedding tables are dense weights
    # (about 8x faster than the per-tensor loop on a 2M x 16 table on 2 CPU cores) and this
    # torch build has one; the per-tensor loop otherwise. true: always fused; false: never.
    fused: bool | None = None

    @field_validator("betas", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        # YAML (and a config stored as JSON) gives a list.
        if isinstance(v, list | tuple) and len(v) != 2:
            raise ValueError(f"expected two numbers [beta1, beta2], each in [0, 1), got {len(v)}")
        return tuple(v) if isinstance(v, list) else v


class SparseOptimizerConfig(_Strict):
    """Optimizer for embedding tables. ``sparse_adam``/``adagrad``/``sgd`` update only the rows a
    batch touches; ``dense`` hands embeddings to the dense optimizer (every row every step)."""

    name: Literal["sparse_adam", "adagrad", "sgd", "dense"] = "sparse_adam"
    lr: float | None = Field(default=None, gt=0)


# The tasks every model reports (esmm.metrics.DEFAULT_SPACES); a model's own are checked by
# resolve_monitor.
_TASKS = ("ctr", "cvr", "ctcvr")

# Metric-name suffixes and which way each improves, longest first (`_auc` ends several).
# None: refused as a monitor, for the reason given.
_METRIC_KINDS: tuple[tuple[str, str | None, str], ...] = (
    ("_auc_entire_space_oracle", None, "it scores the true probabilities, so no model "
     "changes it"),
    ("_auc_entire_space", "max", "AUC: higher is better"),
    ("_logloss", "min", "log loss: lower is better"),
    ("_gauc", "max", "GAUC: higher is better"),
    ("_auc", "max", "AUC: higher is better"),
    ("_pcoc", None, "PCOC is best at 1, neither higher nor lower, so it has no direction to "
     "optimise; monitor an AUC or a log loss and read PCOC in the report"),
)


def metric_kind(name: str) -> tuple[str, str]:
    """``(task, suffix)`` of a metric name such as ``ctr_logloss`` -> ``("ctr", "_logloss")``.

    Raises:
        ValueError: not a per-task metric name (``n_clicks`` and other counts included).
    """
    for suffix, _, _ in _METRIC_KINDS:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], suffix
    near = difflib.get_close_matches(name, [f"{t}{s}" for t in _TASKS for s, d, _ in _METRIC_KINDS
                                            if d is not None], n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"{name!r} is not a metric to monitor; {hint}expected TASK_auc, TASK_gauc, "
                     f"TASK_logloss or cvr_auc_entire_space with TASK one of {list(_TASKS)} "
                     "(e.g. ctr_logloss, cvr_auc), or a sum of them written with +")


def monitor_terms(monitor: str) -> list[str]:
    """The metric names a monitor adds up (``ctr_logloss+ctcvr_logloss`` -> two names)."""
    terms = [t.strip() for t in monitor.split("+")]
    if any(not t for t in terms):
        raise ValueError(f"{monitor!r} has an empty term; expected metric names joined by +")
    return terms


def monitor_direction(monitor: str) -> Literal["max", "min"]:
    """Which way a monitor improves: ``max`` for AUCs, ``min`` for log losses and their sums.

    Raises:
        ValueError: an unknown name, a metric with no direction (PCOC, the oracle AUC), or a
            sum that mixes the two directions.
    """
    directions: dict[str, list[str]] = {}
    for term in monitor_terms(monitor):
        _, suffix = metric_kind(term)
        direction, why = next((d, w) for s, d, w in _METRIC_KINDS if s == suffix)
        if direction is None:
            raise ValueError(f"{term!r} cannot be monitored: {why}")
        directions.setdefault(direction, []).append(term)
    if len(directions) > 1:
        raise ValueError(f"{monitor!r} adds metrics that improve in opposite directions "
                         f"(higher is better: {directions['max']}; lower is better: "
                         f"{directions['min']}), so their sum has no direction; monitor one "
                         "kind")
    return "max" if "max" in directions else "min"


def _direction_words(direction: str) -> str:
    return "higher is better" if direction == "max" else "lower is better"


class EarlyStopConfig(_Strict):
    """Stop when ``metric`` on the eval split has not improved for ``patience`` evaluations.

    ``metric: auto`` uses the model's declared monitor: the validation log loss of the tasks it
    is trained on (e.g. ``ctr_logloss+ctcvr_logloss`` for ESMM), which stays informative when
    an eval split holds only a few dozen conversions and an AUC on them is mostly noise. A sum
    of metrics is written with ``+``. ``mode`` is the metric's own direction unless set
    (``auto``/null: maximise AUCs, minimise log losses); a mode against it is refused.
    """

    metric: NonEmptyStr = "auto"
    mode: Literal["auto", "max", "min"] = "auto"
    patience: int | None = Field(default=3, ge=1)

    # The metric's name and the mode's agreement with it are checked by resolve_monitor when
    # training starts, against the model's metrics; not here, so that a run trained under
    # older rules still loads for evaluate, predict and export.

    @field_validator("mode", mode="before")
    @classmethod
    def _null_is_auto(cls, v: Any) -> Any:
        return "auto" if v is None else v


def check_mode(mode: str, monitor: str, direction: str) -> None:
    """Refuse an early-stopping ``mode`` that contradicts its monitor's direction."""
    if mode not in ("auto", direction):
        raise ValueError(
            f"{mode!r} contradicts the monitor {monitor!r} ({_direction_words(direction)}): "
            f"best.pt would keep the worst evaluation; set mode: {direction}, or auto (or "
            "null) to follow the metric's direction"
        )


class LossWeightingConfig(_Strict):
    """How task losses are weighted during training (see :mod:`esmm.loss_weighting`).

    ``fixed``: ``train.loss_weights`` only. ``uncertainty``: learned log-variances (Kendall et
    al., CVPR 2018). ``dwa``: Dynamic Weight Average (Liu et al., CVPR 2019) over windows of
    ``window`` steps at temperature ``temperature``.
    """

    name: Literal["fixed", "uncertainty", "dwa"] = "fixed"
    window: int = Field(default=100, ge=1)
    temperature: float = Field(default=2.0, gt=0.0)


class TrainConfig(_Strict):
    """How to train: batches, epochs, optimizers, evaluation, early stopping, device."""

    batch_size: int = Field(default=1024, gt=0)
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    sparse_optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    # numpy seeds must be >= 0; torch.manual_seed takes up to 64 bits.
    seed: int = Field(default=7, ge=0, le=2**63 - 1)
    # Blocks of consecutive rows, shuffled: a user's impressions stay together, so their bags
    # are embedded once per batch. No accuracy cost measured at 64 (docs/config.md).
    shuffle_block: int = Field(default=64, ge=1)
    eval_every: int | None = Field(default=None, gt=0)
    eval_batch_size: int = Field(default=8192, gt=0)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    # Weight per named loss, e.g. {loss_ctcvr: 2.0} (unnamed losses weigh 1).
    loss_weights: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)
    loss_weighting: LossWeightingConfig = Field(default_factory=LossWeightingConfig)
    num_threads: int | None = Field(default=None, gt=0)
    progress: Literal["auto", "on", "off"] = "auto"
    checkpoint_interval_s: float = Field(default=60.0, ge=0.0)
    # cpu, cuda, cuda:N, or auto (cuda when torch sees a GPU, else cpu).
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")
    # Autocast dtype of the forward pass; losses and weights stay float32. fp16 adds gradient
    # scaling and needs a CUDA device.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # none, or mlflow (the `tracking` extra): see esmm.tracking and docs/tracking.md.
    tracking: Literal["none", "mlflow"] = "none"

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_bool(cls, v: Any) -> Any:
        # YAML reads a bare `on`/`off` as a boolean; accept it as the word it was meant to be.
        if isinstance(v, bool):
            return "on" if v else "off"
        return v

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: Any) -> dict[str, Any]:
        # Defaults of keys added after 0.2 are left out, so configs and checkpoints written
        # before they existed compare equal and their runs resume.
        out = handler(self)
        if out.get("precision") == "fp32":
            del out["precision"]
        if out.get("tracking") == "none":
            del out["tracking"]
        return out


class Config(_Strict):
    """The whole configuration: ``data``, ``features``, ``model`` and ``train``."""

    data: DataConfig = Field(default_factory=DataConfig)
    features: list[FeatureConfig] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("features", mode="before")
    @classmethod
    def _expand_preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            return feature_preset(v)
        return v

    @model_validator(mode="after")
    def _check_features(self) -> Config:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"features are listed more than once: {dup}")
        labels = {self.data.labels.click, self.data.labels.conversion}
        leak = sorted(labels & set(names))
        if leak:
            raise ValueError(
                f"label column(s) {leak} are listed as features: a model would see its own label. "
                "Remove them from `features`."
            )
        return self

    @model_validator(mode="after")
    def _check_attention_queries(self) -> Config:
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.pooling != "attention":
                continue
            q = by_name.get(str(f.query))
            if q is None:
                close = difflib.get_close_matches(str(f.query), list(by_name), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"feature {f.name!r}: `query` {f.query!r} is not a feature"
                                 f"{hint}; expected the name of a categorical feature")
            if q.kind != "categorical":
                raise ValueError(f"feature {f.name!r}: `query` {q.name!r} is {q.kind}; "
                                 "expected a categorical feature (one id per row)")
            dim, qdim = (x.dim or self.model.embedding_dim for x in (f, q))
            if dim != qdim:
                raise ValueError(f"feature {f.name!r} (dim {dim}) and its `query` {q.name!r} "
                                 f"(dim {qdim}) have different embedding dims; expected the "
                                 "same dim (set `dim` on one of them)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def feature_preset(name: str, buckets_scale: float = 1.0) -> list[dict[str, Any]]:
    """Expand a named feature preset (``aliccp``: every Ali-CCP field) into feature dicts."""
    if name not in ("aliccp", "all"):
        raise ValueError(f"unknown feature preset {name!r}; "
                         "expected 'aliccp' or a list of features")
    out: list[dict[str, Any]] = []
    singles = ALICCP_USER_FIELDS + ALICCP_ITEM_FIELDS + ALICCP_COMBO_FIELDS + ALICCP_CONTEXT_FIELDS
    for f in singles:
        out.append({"name": f, "kind": "categorical",
                    "buckets": max(1, int(_ALICCP_BUCKETS[f] * buckets_scale))})
    for f in ALICCP_USER_BAGS + ALICCP_ITEM_BAGS:
        out.append({"name": f, "kind": "multi_categorical",
                    "buckets": max(1, int(_ALICCP_BUCKETS[f] * buckets_scale)), "pooling": "mean"})
    return out


# ----------------------------------------------------------------------------- reading YAML


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and reading ``1e-3`` as a float.

    YAML 1.1 (PyYAML) needs a dot in a float, so ``lr: 1e-3`` would be the string "1e-3",
    which strict types refuse; YAML 1.2 and most users read it as a number.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                # Merge keys (<<) may legitimately repeat keys; only explicit keys are checked.
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                        key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]}); "
                        "expected each key once", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(e: yaml.YAMLError, where: str) -> str:
    """One line for a YAML error: where, line and column, and the problem."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem is None:
        return f"{where}: not valid YAML: {' '.join(str(e).split())}"
    context = getattr(e, "context", None)
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = f"{context}: {problem}" if context and "duplicate key" not in problem else problem
    return f"{where}{at}: not valid YAML: {' '.join(what.split())}"


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with the strict loader; any problem is a one-line :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(e, where)) from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None


def _read_text(p: Path) -> str:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {p} is not UTF-8 text: byte 0x{data[e.start]:02x} at "
                          f"offset {e.start} (line {line}); save it as UTF-8") from None


# ----------------------------------------------------------------------------- errors

_MAX_ERRORS = 5
_MAX_VALUE_CHARS = 60


def _printable(text: str) -> str:
    # A message stays one line whatever a file name or --set value holds.
    return text if text.isprintable() else repr(text)


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[:_MAX_VALUE_CHARS - 3] + "..."
    return text


def _error_text(e: Any) -> str:
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = " ".join(str(e["msg"]).split())
    if e["type"] == "extra_forbidden":
        return f"{path}: unknown key (check the spelling; see docs/config.md)"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = e.get("input")
    if isinstance(got, bool) and e["type"] in ("int_type", "float_type"):
        msg += " (a boolean is not a number)"
    got_s = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
    return f"{path}: {msg}{got_s}"


def _format_validation_error(err: ValidationError, source: str) -> str:
    """Every problem on one line, each naming its full key path."""
    errors = err.errors()
    parts = [_error_text(e) for e in errors[:_MAX_ERRORS]]
    more = len(errors) - _MAX_ERRORS
    tail = f"; and {more} more" if more > 0 else ""
    return f"invalid configuration in {source}: " + "; ".join(parts) + tail


# ----------------------------------------------------------------------------- --set overrides


def _set_path(tree: dict[str, Any], path: str, value: Any, source: str) -> None:
    parts = path.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(
                    f"{source}: `{path}`: `{p}` is not an index of the {len(node)}-item list "
                    f"at `{'.'.join(parts[:i])}`"
                )
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: `{path}`: `{'.'.join(parts[:i])}` is not a mapping")
        if last:
            node[p] = value
        else:
            node = node.setdefault(p, {})


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=v`` overrides to a raw config tree (values parsed as YAML)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected the form path.to.key=value")
        path, raw = item.split("=", 1)
        path = path.strip()
        if not path:
            raise ConfigError(f"--set {item!r}: the key path is empty")
        value = parse_yaml(raw, f"--set {item!r}") if raw != "" else ""
        if path.startswith("features.") and isinstance(tree.get("features"), str):
            # A preset's fields are addressed like listed ones (features.0.buckets).
            try:
                tree["features"] = feature_preset(tree["features"])
            except ValueError as e:
                raise ConfigError(f"--set {item!r}: features: {e}") from None
        _set_path(tree, path, value, f"--set {item!r}")
    return tree


# ----------------------------------------------------------------------------- loading


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a raw config tree; any problem is a one-line :class:`ConfigError`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at the top "
                          f"level, got {type(tree).__name__}")
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    except RecursionError:
        raise ConfigError(f"invalid configuration in {source}: nested too deeply") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = _printable(str(p))
        if not p.is_file():
            what = "is a folder, not a file" if p.is_dir() else "does not exist"
            raise ConfigError(f"config file {p} {what}")
        loaded = parse_yaml(_read_text(p), f"config file {p}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, "
                              f"got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " with --set " + " ".join(_printable(o) for o in overrides)
    return config_from_dict(tree, source)


def dump_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- before training


def resolve_monitor(cfg: Config) -> tuple[str, Literal["max", "min"]]:
    """The early-stopping monitor and its direction, checked against the model's metrics.

    ``metric: auto`` is the model's declared monitor. Every metric named must be one the model
    reports (its metric spaces: ``ctr``, ``cvr``, ``ctcvr``), GAUCs need ``data.user_column``,
    and an explicit ``mode`` must agree with the metric's direction. Cheap: the model is built
    on the meta device (no weights are allocated), before any data is read.

    Raises:
        ConfigError: naming ``train.early_stop.metric`` or ``train.early_stop.mode``.
    """
    import torch

    from esmm.features import spec_from_config
    from esmm.models import build_model

    es = cfg.train.early_stop
    with torch.device("meta"):
        model = build_model(cfg, spec_from_config(cfg))
    monitor = model.monitor if es.metric == "auto" else es.metric
    tasks = [s.name for s in model.metric_spaces]
    known = [f"{t}{s}" for t in tasks for s in ("_auc", "_gauc", "_logloss")]
    if "cvr" in tasks:
        known.append("cvr_auc_entire_space")
    try:
        direction = monitor_direction(monitor)
        for term in monitor_terms(monitor):
            if term not in known:
                near = difflib.get_close_matches(term, known, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"{term!r} is not a metric of model {cfg.model.name!r}; "
                                 f"{hint}expected one of {known}")
            if term.endswith("_gauc") and cfg.data.user_column is None:
                raise ValueError(f"{term!r} groups by user, but data.user_column is null; "
                                 "set data.user_column or monitor another metric")
    except ValueError as e:
        raise ConfigError(f"train.early_stop.metric: {e}") from None
    try:
        check_mode(es.mode, monitor, direction)
    except ValueError as e:
        raise ConfigError(f"train.early_stop.mode: {e}") from None
    return monitor, direction


def check_data_paths(cfg: Config, keys: Iterable[str]) -> None:
    """Refuse, before any work, a data path (``data.train``, ...) that does not exist."""
    for key in keys:
        value = getattr(cfg.data, key)
        if value is None:
            continue
        try:
            found = Path(value).exists()
        except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system
            raise ConfigError(f"data.{key}: {value!r} is not a usable path ({e}); expected a "
                              f"path to the {key} split") from None
        if not found:
            raise ConfigError(f"data.{key}: {_printable(value)} does not exist (no such file or "
                              f"folder); expected a path to the {key} split")
