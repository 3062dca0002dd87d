"""Typed configuration: one YAML file drives train, evaluate and predict.

The YAML is validated by pydantic models that reject unknown keys, so a typo such as
``train.optimiser`` fails with its path instead of being ignored. Any key can be overridden
from the command line with ``--set path.to.key=value`` (values are parsed as YAML scalars, so
``--set train.optimizer.lr=0.01`` gives a float and ``--set model.tower=[64,32]`` a list).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esmm.errors import ConfigError

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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelsConfig(_Strict):
    """Names of the label columns in the data."""

    click: str = "click"
    conversion: str = "conversion"


class DataConfig(_Strict):
    """Where the data lives and how to read it.

    ``train`` / ``eval`` / ``test`` are a Parquet file, a folder of Parquet files, a CSV file, or a
    normalized folder holding ``impressions.parquet`` and ``users.parquet`` joined by ``user_key``.

    ``loader``: ``memory`` reads a split whole and shuffles every row; ``stream`` reads Parquet
    ``chunk_rows`` rows at a time and shuffles row groups, then rows within ``shuffle_buffer``
    rows, so memory does not grow with the data (``auto``: stream Parquet, read other formats
    whole). ``read_ahead`` batches are prepared in a background thread while the model trains.
    """

    train: str | None = None
    eval: str | None = None
    test: str | None = None
    format: Literal["auto", "parquet", "csv", "rechub-csv", "aitm-csv", "paddle-esmm-txt"] = "auto"
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    user_column: str | None = "101"
    user_key: str = "common_key"
    weight_column: str | None = None
    conversion_without_click: Literal["drop", "error", "keep"] = "drop"
    csv_header: bool = True
    csv_columns: list[str] | None = None
    loader: Literal["memory", "stream", "auto"] = "memory"
    chunk_rows: int = Field(default=65_536, gt=0)
    shuffle_buffer: int = Field(default=262_144, gt=0)
    read_ahead: int = Field(default=2, ge=0)

    @field_validator("user_column", "user_key", "weight_column", mode="before")
    @classmethod
    def _int_to_str(cls, v: Any) -> Any:
        # Ali-CCP field ids look like integers; YAML would read `101` as an int.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class FeatureConfig(_Strict):
    """One input field.

    ``categorical``: one id per row, hashed into ``buckets`` rows of an embedding table.
    ``multi_categorical``: a list of ids per row (a bag), pooled by ``pooling``.
    ``dense``: one float per row, fed to the towers beside the embeddings.
    """

    name: str
    kind: Literal["categorical", "multi_categorical", "dense"] = "categorical"
    buckets: int | None = Field(default=None, gt=0)
    dim: int | None = Field(default=None, gt=0)
    pooling: Literal["sum", "mean"] = "mean"

    @field_validator("name", mode="before")
    @classmethod
    def _int_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check_kind(self) -> FeatureConfig:
        if self.kind != "dense" and self.buckets is None:
            raise ValueError(f"feature {self.name!r} of kind {self.kind!r} needs `buckets` (> 0)")
        return self


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


# The flat method keys of earlier configs (and checkpoints) -> (method section, key).
_FLAT_METHOD_KEYS = {"aman_rate": ("aman", "rate"), "oversample_k": ("oversampling", "k"),
                     "unbias_clip": ("unbias", "clip"), "division_clip": ("division", "clip")}


class ModelConfig(_Strict):
    """Which model and its shape. Every tower is ``tower`` hidden layers then one logit.

    ``backbone`` and ``head`` (null: the model's own, see docs/models.md) put any backbone
    under any head, e.g. ``--set model.backbone.name=mmoe`` turns ``esmm`` into ESMM over MMoE.

    Method options sit under the method they belong to and are read only by it:
    ``aman: {rate}``, ``oversampling: {k}``, ``unbias: {clip}``, ``division: {clip}``. The flat
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
    aman_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    oversample_k: int | None = Field(default=None, ge=1)
    unbias_clip: float | None = Field(default=None, gt=0.0, le=1.0)
    division_clip: float | None = Field(default=None, gt=0.0, le=1.0)

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
    name: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = Field(default=0.0, ge=0)
    # adam/adamw only. null: the fused kernel when the embedding tables are dense weights
    # (about 8x faster than the per-tensor loop on a 2M x 16 table on 2 CPU cores) and this
    # torch build has one; the per-tensor loop otherwise. true: always fused; false: never.
    fused: bool | None = None


class SparseOptimizerConfig(_Strict):
    """Optimizer for embedding tables. ``sparse_adam``/``adagrad``/``sgd`` update only the rows a
    batch touches; ``dense`` hands embeddings to the dense optimizer (every row every step)."""

    name: Literal["sparse_adam", "adagrad", "sgd", "dense"] = "sparse_adam"
    lr: float | None = Field(default=None, gt=0)


class EarlyStopConfig(_Strict):
    """Stop when ``metric`` on the eval split has not improved for ``patience`` evaluations.

    ``metric: auto`` uses the model's declared monitor: the validation log loss of the tasks it
    is trained on (e.g. ``ctr_logloss+ctcvr_logloss`` for ESMM), which stays informative when
    an eval split holds only a few dozen conversions and an AUC on them is mostly noise. A sum
    of metrics is written with ``+``. ``mode: auto`` minimises log losses and maximises the rest.
    """

    metric: str = "auto"
    mode: Literal["auto", "max", "min"] = "auto"
    patience: int | None = Field(default=3, ge=1)


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
    batch_size: int = Field(default=1024, gt=0)
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    sparse_optimizer: SparseOptimizerConfig = Field(default_factory=SparseOptimizerConfig)
    seed: int = 7
    shuffle_block: int = Field(default=1, ge=1)
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

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_bool(cls, v: Any) -> Any:
        # YAML reads a bare `on`/`off` as a boolean; accept it as the word it was meant to be.
        if isinstance(v, bool):
            return "on" if v else "off"
        return v


class Config(_Strict):
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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `esmm train --help` and docs/config.md)"
        got = e.get("input")
        got_s = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{got_s}")
    return "\n".join(lines)


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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
        _set_path(tree, path, value, f"--set {item}")
    return tree


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, "
                              f"got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " with --set " + " ".join(overrides)
    return config_from_dict(tree, source)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
