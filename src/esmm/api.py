"""The Python API: train, evaluate, predict and export from a notebook or a script.

    import esmm

    run = esmm.fit("configs/esmm_sim.yaml", train=train_df, eval=valid_df,
                   train__batch_size=512, model__name="base")
    run.metrics                      # the best checkpoint's metrics on ``eval``
    run.evaluate(test_df)            # every metric on another split
    run.predict(test_df, keep=["sample_id"])   # pandas DataFrame, input order
    run.export("model.onnx", "onnx")
    scorer = esmm.load("model.onnx")            # an :class:`esmm.export.Predictor`

Data is given as a path (anything ``data.train`` takes), a pandas DataFrame, an Arrow table,
or a normalized ``(impressions, users)`` pair of either, joined by ``data.user_key``. Tables in
memory are validated and encoded exactly as files are, so a DataFrame and the Parquet file it
came from give the same run (with ``data.loader: memory``, the default; a streamed file is
shuffled by row group and buffer instead of row by row).

Config overrides are keyword arguments whose double underscores stand for the dots of a
config key (``train__optimizer__lr=0.01`` sets ``train.optimizer.lr``); their values are
Python values, not YAML text. The command line (``esmm train/evaluate/predict/export``) calls
the functions of this module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from esmm.errors import ArgumentError, DataError, EsmmError, UsageError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from esmm.config import Config
    from esmm.data.stream import Split
    from esmm.data.tables import RawTables
    from esmm.export import Predictor
    from esmm.features import FeatureSpec
    from esmm.models import MultiTaskModel

log = logging.getLogger(__name__)

__all__ = ["Data", "Run", "fit", "load", "load_run", "simulate"]

#: What a data argument takes: a path, a pandas DataFrame, an Arrow table, or an
#: ``(impressions, users)`` pair of tables.
Data = Union[str, os.PathLike, "pd.DataFrame", "pa.Table", tuple[Any, Any]]

LOADERS = ("auto", "stream", "memory")


# ----------------------------------------------------------------------------- arguments


def _is_dataframe(obj: Any) -> bool:
    # Checked by type name so that pandas is imported only by those who pass a DataFrame.
    return any(c.__module__.startswith("pandas") and c.__name__ == "DataFrame"
               for c in type(obj).__mro__)


def _as_table(obj: Any, arg: str) -> pa.Table:
    """An Arrow table of a DataFrame, Arrow table or record batch; else an ArgumentError."""
    import pyarrow as pa

    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if _is_dataframe(obj):
        try:
            return pa.Table.from_pandas(obj, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            first = next((s for s in str(e).splitlines() if s.strip()), "")
            raise DataError(f"{arg}: the DataFrame does not convert to Arrow: {first}") from None
    raise ArgumentError(f"{arg}: got {type(obj).__name__}; expected a path, a pandas DataFrame, "
                        "an Arrow table, or an (impressions, users) pair of them")


def _is_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _raw_tables(data: Any, arg: str) -> RawTables:
    """The :class:`RawTables` of in-memory data (a table, or an (impressions, users) pair)."""
    from esmm.data.tables import RawTables

    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ArgumentError(f"{arg}: a sequence of {len(data)} items; expected an "
                                "(impressions, users) pair")
        imp = _as_table(data[0], f"{arg}[0] (impressions)")
        users = _as_table(data[1], f"{arg}[1] (users)")
        return RawTables(f"{arg} (in memory)", imp, users)
    return RawTables(f"{arg} (in memory)", _as_table(data, arg))


def _open(data: Any, arg: str, spec: FeatureSpec, cfg: Config, *, require_labels: bool = True,
          loader: str | None = None) -> Split:
    """An in-memory or streamed split of ``data`` (a path or tables), encoded with ``spec``."""
    from esmm.data.stream import open_split
    from esmm.data.tables import RawTables, encode

    if _is_path(data):
        return open_split(Path(data), spec, cfg.data, require_labels, loader=loader)
    raw = data if isinstance(data, RawTables) else _raw_tables(data, arg)
    return encode(raw, spec, cfg.data, require_labels=require_labels)


def _set_key(tree: dict[str, Any], path: str, value: Any, source: str) -> None:
    from esmm.config import _set_path, feature_preset

    if path.startswith("features.") and isinstance(tree.get("features"), str):
        tree["features"] = feature_preset(tree["features"])  # a preset's fields by index
    _set_path(tree, path, value, source)


def override_keys(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys of keyword overrides: ``train__optimizer__lr`` -> ``train.optimizer.lr``.

    Raises:
        ArgumentError: a keyword without a double underscore (most likely a misspelt
            argument of :func:`fit`).
    """
    out = {}
    for k, v in overrides.items():
        if "__" not in k:
            raise ArgumentError(
                f"fit() got an unexpected keyword argument {k!r}; config overrides are keys "
                "with double underscores for dots, e.g. train__batch_size=512")
        out[k.replace("__", ".")] = v
    return out


def resolve_config(config: Any, overrides: Mapping[str, Any] | None = None) -> Config:
    """A validated :class:`~esmm.config.Config` from a YAML path, a dict or a Config, with
    ``overrides`` (dotted key -> Python value) applied.

    Raises:
        ArgumentError: ``config`` is of another type. ConfigError: the result is invalid.
    """
    from esmm.config import Config, config_from_dict, load_config

    if isinstance(config, Config):
        tree, source = config.to_dict(), "the Config given"
    elif isinstance(config, Mapping):
        tree, source = copy.deepcopy(dict(config)), "the dict given"
    elif _is_path(config):
        tree, source = load_config(config).to_dict(), str(config)
    else:
        raise ArgumentError(f"config: got {type(config).__name__}; expected a YAML path, a "
                            "dict or an esmm Config")
    if not overrides:
        return config_from_dict(tree, source) if not isinstance(config, Config) else config
    for key, value in overrides.items():
        _set_key(tree, key, value, f"override {key}={value!r}")
    return config_from_dict(tree, f"{source} with overrides {sorted(overrides)}")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where stderr is no terminal, yet a progress
    bar is wanted)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    get = getattr(shell, "get_ipython", None)
    ip = get() if get is not None else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


# ----------------------------------------------------------------------------- fit


def fit(config: Any, train: Data | None = None, eval: Data | None = None,
        out: str | os.PathLike | None = None, *, resume: bool = False,
        **overrides: Any) -> Run:
    """Train a model and return its :class:`Run`.

    Args:
        config: a YAML config path, a dict of the same tree, or a
            :class:`~esmm.config.Config`.
        train: the training data (see :data:`Data`); None: ``data.train`` of the config.
        eval: the split evaluated for early stopping and ``Run.metrics``; None:
            ``data.eval`` of the config (none at all: no evaluation, the last step is kept).
        out: the run folder; None: a new temporary folder (``Run.path``; it is kept).
        resume: continue the run in ``out`` from its latest checkpoint (same config).
        **overrides: config keys with ``__`` for dots and Python values, e.g.
            ``train__batch_size=512, model__name="base"``.

    Returns:
        the run, with the best checkpoint's metrics on ``eval``.

    Raises:
        ArgumentError (a UsageError and a TypeError): an argument of the wrong type.
        ConfigError: the config with its overrides is invalid. DataError: bad data.
    """
    from esmm.train import train as run_train

    keys = override_keys(overrides)
    raws: dict[str, RawTables] = {}
    for name, data in (("train", train), ("eval", eval)):
        if _is_path(data):
            keys[f"data.{name}"] = os.fspath(data)
        elif data is not None:
            raws[name] = _raw_tables(data, name)
            keys[f"data.{name}"] = None  # the config records no path it did not read
    if resume and out is None:
        raise ArgumentError("resume=True needs out: the run folder to continue")
    cfg = resolve_config(config, keys)
    # Data given as tables is encoded here, so the statistics are fitted here; paths are left
    # to training, which fits them after checking they exist.
    spec = _fit_spec(cfg, raws.get("train"), out if resume else None) if raws else None
    opened = {name: _open(raw, name, spec, cfg) for name, raw in raws.items()}
    run_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="esmm-run-"))
    if out is None:
        log.info("run folder: %s", run_dir)
    res = run_train(cfg, run_dir, resume=resume, train_data=opened.get("train"),
                    eval_data=opened.get("eval"))
    run = Run(res.run_dir, res.run_dir / "checkpoints" / "best.pt", metrics=dict(res.metrics),
              step=res.step, best_step=res.best_step, best_metric=res.best_metric,
              monitor=res.monitor, stopped_early=res.stopped_early)
    run._config = cfg
    return run


def _fit_spec(cfg: Config, train: RawTables | None, resumed: Any) -> FeatureSpec:
    """The spec to encode in-memory data with: a resumed run's stored one, else fitted on the
    training split (tables or ``data.train``), as training fits it."""
    from esmm.config import check_data_paths
    from esmm.data.fit import fit_spec, stored_spec
    from esmm.features import spec_from_config

    stored = stored_spec(resumed) if resumed is not None else None
    if stored is not None:
        return stored
    spec = spec_from_config(cfg)
    if train is None:
        check_data_paths(cfg, ["train"])
    source = train if train is not None else cfg.data.train
    return fit_spec(spec, source, cfg.data) if source is not None else spec


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(eq=False)
class Run:
    """A trained run: its folder, its best checkpoint and what it scored.

    Attributes:
        path: the run folder (or, for a bare checkpoint file, the file).
        checkpoint: the checkpoint file the model is loaded from (``checkpoints/best.pt``).
        metrics: the best checkpoint's metrics on the evaluation split (``metrics.json``);
            empty when the run had none.
        step: the last training step; best_step / best_metric / monitor: where and by which
            metric the best checkpoint was chosen; stopped_early: whether early stopping
            ended the run.
    """

    path: Path
    checkpoint: Path
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    step: int | None = None
    best_step: int | None = None
    best_metric: float | None = None
    monitor: str | None = None
    stopped_early: bool = False
    # Filled on first use (or by fit, which has the config at hand).
    _config: Config | None = dataclasses.field(default=None, init=False, repr=False)
    _loaded: tuple[Any, ...] | None = dataclasses.field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        best = (f"best {self.monitor}={self.best_metric:.6g} at step {self.best_step}"
                if self.best_metric is not None else "not evaluated")
        return f"Run({str(self.path)!r}, {best})"

    # ------------------------------------------------------------------------- the model

    def _load(self) -> tuple[MultiTaskModel, Config, FeatureSpec, dict[str, Any]]:
        if self._loaded is None:
            from esmm.checkpoint import load_model

            self._loaded = load_model(self.checkpoint)
            self._config = self._loaded[1]
        return self._loaded  # type: ignore[return-value]

    @property
    def model(self) -> MultiTaskModel:
        """The trained model (eval mode), loaded from :attr:`checkpoint` on first use."""
        return self._load()[0]

    @property
    def config(self) -> Config:
        """The run's resolved config."""
        return self._config if self._config is not None else self._load()[1]

    @property
    def checkpoint_step(self) -> int | None:
        """The training step :attr:`checkpoint` was written at."""
        return self._load()[3].get("step")

    @property
    def spec(self) -> FeatureSpec:
        """The feature spec the model was trained with."""
        return self._load()[2]

    @property
    def history(self) -> pd.DataFrame:
        """One row per evaluation (``history.csv``): step, epoch, losses, metrics."""
        import pandas as pd

        f = self.path / "history.csv"
        if not f.is_file():
            raise UsageError(f"{self.path}: no history.csv (a checkpoint file has none; load "
                             "the run folder)")
        return pd.read_csv(f)

    def default_data(self) -> Path:
        """The split the run evaluates by default: its ``data.test``, else ``data.eval``.

        Raises:
            UsageError: the config names neither; ConfigError: the split does not exist.
        """
        from esmm.config import check_data_paths

        cfg = self.config
        path = cfg.data.test or cfg.data.eval
        if path is None:
            raise UsageError("no data to evaluate: the run's config has no data.test or "
                             "data.eval; pass the data")
        check_data_paths(cfg, ["test" if cfg.data.test else "eval"])
        return Path(path)

    # ------------------------------------------------------------------------- scoring

    def evaluate(self, data: Data | None = None, *, batch_size: int = 8192,
                 loader: str = "auto") -> dict[str, float]:
        """Every metric of the model on ``data`` (default: :meth:`default_data`).

        Args:
            data: a path, DataFrame, Arrow table or (impressions, users) pair, with labels.
            loader: for a path: ``stream`` (Parquet chunk by chunk), ``memory`` or ``auto``.
        Returns:
            metric name -> value, as ``esmm evaluate`` prints them.
        """
        from esmm.evaluate import evaluate

        _check_loader(loader)
        _check_batch_size(batch_size)
        if data is None:
            data = self.default_data()
        model, cfg, spec, _ = self._load()
        split = _open(data, "data", spec, cfg, loader=loader)
        return evaluate(model, split, batch_size)

    def predict(self, data: Data, *, keep: Sequence[str] = (), batch_size: int = 8192,
                loader: str = "auto") -> pd.DataFrame:
        """Score rows (labels not needed).

        Args:
            keep: input columns copied beside the predictions, e.g. ``["sample_id"]``.
        Returns:
            one row per input row in input order: the ``keep`` columns, then ``p_ctr``,
            ``p_cvr``, ``p_ctcvr`` (float64).
        """
        import pyarrow as pa

        tables = list(self._predict_tables(data, keep, batch_size, loader))
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.to_pandas()

    def predict_to_file(self, data: Data, out: str | os.PathLike, *, keep: Sequence[str] = (),
                        batch_size: int = 8192, loader: str = "auto") -> int:
        """Score rows into a Parquet file (as :meth:`predict`), chunk by chunk for a streamed
        path; the file is replaced only when every row is written.

        Returns:
            the number of rows written.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        from esmm.fsio import atomic_path, prepare_file_output
        from esmm.models.base import OUTPUT_NAMES

        out = prepare_file_output(out)
        n = 0
        with atomic_path(out) as tmp:
            writer = None
            try:
                for table in self._predict_tables(data, keep, batch_size, loader):
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    n += table.num_rows
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:  # no rows: still a valid (empty) Parquet file
                pq.write_table(pa.table({k: pa.array([], pa.float64()) for k in OUTPUT_NAMES}),
                               tmp)
        return n

    def _predict_tables(self, data: Data, keep: Sequence[str], batch_size: int, loader: str
                        ) -> Iterator[pa.Table]:
        """Arrow tables of the ``keep`` columns and the predictions, in input order: one per
        streamed chunk, or one for the whole input."""
        from esmm.data.stream import ParquetStream, resolve_loader
        from esmm.data.tables import needed_columns, read_tables

        _check_loader(loader)
        _check_batch_size(batch_size)
        keep = _keep_list(keep)
        model, cfg, spec, _ = self._load()
        if not _is_path(data):
            raw = _raw_tables(data, "data")
            yield _scored(model, spec, cfg, raw, keep, batch_size)
            return
        path = Path(data)
        if resolve_loader(path, cfg.data, loader) == "stream":
            stream = ParquetStream(path, spec, cfg.data, require_labels=False, keep=keep)
            yield from _scored_chunks(model, stream, batch_size)
            return
        raw = read_tables(path, cfg.data, columns=needed_columns(spec, cfg.data) + keep,
                          spec=spec)
        yield _scored(model, spec, cfg, raw, keep, batch_size)

    # ------------------------------------------------------------------------- export

    def export(self, path: str | os.PathLike, format: str = "torchscript",
               *, parity_rows: int = 512) -> dict[str, Any]:
        """Export the model to one artifact file, checked against the eager model.

        Args:
            format: ``torchscript`` or ``onnx`` (the ``serve`` extra).
            parity_rows: rows per set in the parity check (eval rows, synthetic rows).
        Returns:
            the artifact's metadata, with the parity report under ``parity``. Load the
            artifact with :func:`esmm.load`.
        """
        from esmm.export import export_run

        return export_run(self.path, format, path, parity_rows=parity_rows)


def _check_loader(loader: str) -> None:
    if loader not in LOADERS:
        raise UsageError(f"loader {loader!r}: expected 'auto', 'stream' or 'memory'")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size: got {batch_size!r}; expected an integer >= 1")


def _keep_list(keep: Sequence[str]) -> list[str]:
    if isinstance(keep, str):
        return [keep]
    bad = [k for k in keep if not isinstance(k, str)]
    if bad:
        raise ArgumentError(f"keep: got {bad[0]!r}; expected column names (strings)")
    return list(keep)


def _scored(model: MultiTaskModel, spec: FeatureSpec, cfg: Config, raw: RawTables,
            keep: list[str], batch_size: int) -> pa.Table:
    """The ``keep`` columns of ``raw``'s impressions and their predictions, (N,) each."""
    import pyarrow as pa

    from esmm.data.tables import encode
    from esmm.evaluate import predict_arrays

    cols: dict[str, Any] = {}
    for k in keep:
        if k not in raw.impressions.column_names:
            raise UsageError(f"keep {k!r}: no such column in {raw.source}; columns present: "
                             f"{sorted(raw.impressions.column_names)[:30]}")
        cols[k] = raw.impressions.column(k)
    split = encode(raw, spec, cfg.data, require_labels=False)
    preds = predict_arrays(model, split, batch_size)
    cols.update({k: pa.array(v) for k, v in preds.items()})
    return pa.table(cols)


def _scored_chunks(model: MultiTaskModel, stream: Any, batch_size: int) -> Iterator[pa.Table]:
    import pyarrow as pa

    from esmm.evaluate import predict_arrays

    for chunk in stream.chunks():
        preds = predict_arrays(model, chunk, batch_size)
        yield pa.table({**chunk.extra, **{k: pa.array(v) for k, v in preds.items()}})


# ----------------------------------------------------------------------------- loading


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds ``code/``; a ``torch.save`` checkpoint does not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_run(path: str | os.PathLike) -> Run:
    """The :class:`Run` of a run folder (its best checkpoint) or of a checkpoint file.

    The model is loaded on first use; ``metrics`` comes from the folder's ``metrics.json``.
    """
    from esmm.checkpoint import find_checkpoint

    p = Path(path)
    ck = find_checkpoint(p)
    folder = ck.parent.parent if ck.parent.name == "checkpoints" else None
    info: dict[str, Any] = {}
    if folder is not None and (folder / "metrics.json").is_file():
        try:
            info = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EsmmError(f"{folder / 'metrics.json'}: cannot read ({e})") from None
        if not isinstance(info, dict):
            info = {}
    return Run(p, ck,
               metrics=dict(info.get("metrics") or {}), best_step=info.get("step"),
               best_metric=info.get("best_metric"), monitor=info.get("monitor"),
               stopped_early=bool(info.get("stopped_early", False)))


def load(path: str | os.PathLike, *, threads: int | None = None) -> Run | Predictor:
    """Load a run folder or checkpoint (a :class:`Run`) or an exported artifact (an
    :class:`esmm.export.Predictor` scoring raw columns with ``predict_columns``).

    Args:
        threads: intra-op threads of an artifact's runtime (default: the runtime's choice).
    Raises:
        ArgumentError: ``path`` is not a path. UsageError: nothing is there.
        EsmmError: the file is neither a checkpoint nor an artifact.
    """
    if not _is_path(path):
        raise ArgumentError(f"path: got {type(path).__name__}; expected a run folder, a "
                            "checkpoint or an artifact file")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such run folder, checkpoint or artifact file")
    if p.is_dir():
        return load_run(p)
    if zipfile.is_zipfile(p) and not _is_torchscript(p):
        return load_run(p)
    from esmm.export import load_artifact

    return load_artifact(p, threads)


# ----------------------------------------------------------------------------- data


def simulate(rows: Mapping[str, int] | int, *, preset: str = "aliccp", seed: int = 7,
             out: str | os.PathLike | None = None, **knobs: Any
             ) -> dict[str, tuple[pa.Table, pa.Table]] | dict[str, Path]:
    """Simulated splits with ground truth (see ``docs/simulator.md``).

    Args:
        rows: impressions per split, e.g. ``{"train": 20_000, "valid": 5_000}``; an int is
            ``{"train": rows, "valid": rows // 4, "test": rows // 2}`` as ``esmm simulate``.
        preset: ``aliccp`` or ``dense``; knobs: simulator knobs, e.g. ``selection=1.0``.
        out: a folder to write the splits to (as ``esmm simulate --out``); None: in memory.
    Returns:
        split -> (impressions, users) Arrow tables, a pair every data argument takes; with
        ``out``, split -> its folder.
    """
    from esmm.data.simulate import get_preset, write_simulation
    from esmm.data.simulate import simulate as draw

    if isinstance(rows, bool) or not isinstance(rows, (int, Mapping)):
        raise ArgumentError(f"rows: got {type(rows).__name__}; expected an int or a mapping "
                            "of split name to rows")
    if isinstance(rows, int):
        rows = {"train": rows, "valid": rows // 4, "test": rows // 2}
    split_rows = {str(k): v for k, v in rows.items() if v}
    cfg = get_preset(preset, **knobs)
    if out is not None:
        from esmm.fsio import prepare_dir_output

        folder = prepare_dir_output(out, "out")
        write_simulation(folder, cfg, split_rows, seed)
        return {name: folder / name for name in split_rows}
    return {name: (s.impressions, s.users) for name, s in draw(cfg, split_rows, seed).items()}
