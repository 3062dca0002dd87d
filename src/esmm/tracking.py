"""Experiment tracking: a training's config, metrics and files in an MLflow store.

``train.tracking: mlflow`` (the ``tracking`` extra: ``pip install esmm[tracking]``) records one
MLflow run per training:

* params: the resolved config, flattened to dotted keys (``train.optimizer.lr``,
  ``features.0.buckets``);
* metrics: every evaluation's row of ``history.csv`` (interval losses, eval metrics, the
  monitor), each at its training step;
* artifacts, at the end: ``checkpoints/best.pt``, ``metrics.json``, ``config.yaml``,
  ``history.csv`` and the run report ``report/report.html`` (see :mod:`esmm.report`).

The store is ``MLFLOW_TRACKING_URI`` when set (a server, a database, or a file store), else a
local SQLite store in an ``mlruns/`` folder beside the run folder: ``runs/a`` and ``runs/b``
share ``runs/mlruns/mlflow.db`` and ``runs/mlruns/artifacts/``. The experiment is
``MLFLOW_EXPERIMENT_NAME`` or ``esmm``; the MLflow run is named after the run folder.
``RUN/mlflow.json`` records which MLflow run a folder belongs to, so ``train --resume``
continues the same MLflow run. Only the process of rank 0 (``RANK``) tracks.

A failure of the store during training is logged as a warning and stops the tracking, not the
training; a store that cannot be opened is a configuration error before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import esmm
from esmm.config import Config
from esmm.errors import ConfigError
from esmm.fsio import write_text

log = logging.getLogger(__name__)

__all__ = ["MlflowTracker", "NullTracker", "default_tracking_uri", "flatten",
           "require_tracking", "tracking_run"]

RUN_FILE = "mlflow.json"
EXPERIMENT = "esmm"
# MLflow's documented limits: 100 params per batch, 1000 metrics per batch; 500 characters
# is the shortest param-value limit any MLflow 2.x store enforces.
_PARAMS_PER_BATCH = 100
_PARAM_CHARS = 500
# Files of a finished run that are logged as artifacts, with the artifact folder they go to.
_ARTIFACTS = (("checkpoints/best.pt", "checkpoints"), ("metrics.json", None),
              ("config.yaml", None), ("history.csv", None))


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{dotted.key: value-as-text}``.

    Mappings and lists of mappings are walked (``features.0.name``); a list of plain values is
    one value (``model.tower: "[32, 16]"``); ``None`` is ``"null"`` as in YAML.
    """
    out: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list | tuple) and any(isinstance(v, Mapping) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = "null" if tree is None else json.dumps(tree) if isinstance(
            tree, list | tuple | bool) else str(tree)
    return out


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def default_tracking_uri(run: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in ``mlruns/`` beside the run folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(run.resolve().parent / 'mlruns' / 'mlflow.db').as_posix()}"


def require_tracking(cfg: Config, run: Path) -> None:
    """Refuse, before any work, ``train.tracking: mlflow`` without the packages it needs.

    Raises:
        ConfigError: naming ``train.tracking`` and the extra that installs the packages.
    """
    if cfg.train.tracking != "mlflow":
        return
    needed: tuple[str, ...] = ("mlflow",)
    if default_tracking_uri(run).startswith("sqlite:"):
        needed += ("sqlalchemy", "alembic")
    missing = _missing(needed)
    if missing:
        raise ConfigError(f"train.tracking=mlflow: the package(s) {missing} are not installed; "
                          "install them with `pip install esmm[tracking]`, or set "
                          "train.tracking=none")
    _open_client(default_tracking_uri(run), run)  # a store MLflow refuses fails here, early


def _open_client(uri: str, run: Path) -> Any:
    """An MLflow client of ``uri`` (the store is opened, and a SQLite one created, now)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if uri.startswith("sqlite:") and "MLFLOW_TRACKING_URI" not in os.environ:
            (run.resolve().parent / "mlruns").mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=uri)
    except MlflowException as e:
        raise ConfigError(_store_error(uri, e)) from None


def _store_error(uri: str, e: Exception) -> str:
    return (f"train.tracking=mlflow: the MLflow store {uri!r} cannot be used: "
            f"{' '.join(str(e).split())}")


class NullTracker:
    """``train.tracking: none``: every call does nothing."""

    def log_evaluation(self, step: int, row: Mapping[str, Any]) -> None:
        """Nothing to record."""

    def log_result(self, run: Path) -> None:
        """Nothing to record."""


class MlflowTracker:
    """One MLflow run fed by a training. Use through :func:`tracking_run`."""

    def __init__(self, cfg: Config, run: Path, resume: bool) -> None:
        from mlflow.exceptions import MlflowException

        self.run, self.cfg = run, cfg
        self.uri = default_tracking_uri(run)
        self.active = True
        self.client = _open_client(self.uri, run)
        try:
            self.run_id = self._reuse(resume) or self._create(cfg)
        except MlflowException as e:
            raise ConfigError(_store_error(self.uri, e)) from None
        log.info("tracking to MLflow run %s in %s", self.run_id, self.uri)

    def _experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and "MLFLOW_TRACKING_URI" not in os.environ:
            location = (self.run.resolve().parent / "mlruns" / "artifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _reuse(self, resume: bool) -> str | None:
        """The MLflow run of a resumed training, if the same store still holds it."""
        path = self.run / RUN_FILE
        if not resume or not path.is_file():
            return None
        from mlflow.exceptions import MlflowException

        try:
            known = json.loads(path.read_text(encoding="utf-8"))
            if known.get("tracking_uri") != self.uri:
                return None
            run_id = self.client.get_run(known["run_id"]).info.run_id
        except (OSError, ValueError, KeyError, TypeError, MlflowException):
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, cfg: Config) -> str:
        from mlflow.entities import Param

        tags = {"esmm.run_dir": str(self.run.resolve()), "esmm.version": esmm.__version__,
                "esmm.model": cfg.model.name}
        created = self.client.create_run(self._experiment_id(), run_name=self.run.name,
                                         tags=tags)
        run_id = created.info.run_id
        params = [Param(k, v[:_PARAM_CHARS]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + _PARAMS_PER_BATCH])
        write_text(self.run / RUN_FILE, json.dumps({"tracking_uri": self.uri,
                                                    "run_id": run_id}, indent=2))
        return run_id

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        # A store that fails mid-run (a server gone) must not cost the training.
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            self.active = False
            log.warning("MLflow tracking stopped: %s failed (%s: %s); the training goes on",
                        what, type(e).__name__, " ".join(str(e).split())[:300])

    def log_evaluation(self, step: int, row: Mapping[str, Any]) -> None:
        """One ``history.csv`` row: every finite number but the step, at ``step``."""
        self._guard(f"logging the metrics of step {step}", self._log_row, step, row)

    def _log_row(self, step: int, row: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in row.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
                   and math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_result(self, run: Path) -> None:
        """The files of a finished run, as artifacts, with its report on data.eval."""
        if not self.active:
            return
        if self.cfg.data.eval is not None:
            from esmm.report import build_report

            try:
                build_report(run, run / "report", data="eval",
                             batch_size=self.cfg.train.eval_batch_size)
            except Exception as e:  # noqa: BLE001 - the report is an extra; the run is done
                log.warning("the run's report was not written (%s: %s); its other files are "
                            "logged", type(e).__name__, " ".join(str(e).split())[:300])
        self._guard("logging the run's files", self._log_files, run)

    def _log_files(self, run: Path) -> None:
        for name, folder in _ARTIFACTS:
            if (run / name).is_file():
                self.client.log_artifact(self.run_id, str(run / name), folder)
        if (run / "report").is_dir():
            self.client.log_artifacts(self.run_id, str(run / "report"), "report")

    def end(self, status: str) -> None:
        self._guard("closing the run", self.client.set_terminated, self.run_id, status)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def tracking_run(cfg: Config, run: Path, resume: bool = False
                 ) -> Iterator[MlflowTracker | NullTracker]:
    """The tracker of one training; the MLflow run ends FINISHED, FAILED or KILLED with it.

    Args:
        resume: continue the MLflow run recorded in ``RUN/mlflow.json`` (``train --resume``).
    """
    if cfg.train.tracking != "mlflow" or _rank() != 0:
        yield NullTracker()
        return
    tracker = MlflowTracker(cfg, run, resume)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
