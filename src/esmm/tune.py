"""Hyper-parameter search with Optuna: ``esmm tune CONFIG --space SPACE.yaml --trials N``.

The search space is a YAML mapping from config keys to distributions::

    train.optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}
    train.optimizer.weight_decay: {uniform: [0.0, 0.001]}
    model.embedding_dim: {int_uniform: [8, 32]}          # [low, high] or [low, high, step]
    model.tower: {choice: [[64, 32], [128, 64, 32]]}

Every key is checked against the config's schema and every bound or choice is validated as a
value of its key before the first trial, so a typo or an impossible value is a one-line error
naming the key. Each trial is a full training (:func:`esmm.train.train`) in ``OUT/trials/NNNN``;
its objective is a metric of its best checkpoint on ``data.eval`` (by default the config's
early-stopping monitor), maximised or minimised as the metric says
(:func:`esmm.config.monitor_direction`). The trials also early-stop and keep their best
checkpoint on that metric. Every evaluation reports the metric to Optuna, whose median pruner
stops a trial that is behind the median of earlier trials at the same step.

The study lives in ``OUT/study.db`` (SQLite): a study that was interrupted (Ctrl-C, a killed
process) continues where it stopped when the same command is run again. ``--trials N`` is the
number of finished trials the study should hold (complete, pruned or failed); a trial that was
running when its process died is marked failed and not counted, so it is run again.
``--jobs J`` runs J worker processes that share the study.

Outputs in ``OUT``: ``best_config.yaml`` (the config of the best trial, ready for
``esmm train``), ``trials.csv`` and ``trials.md`` (one row per trial), ``history.png``
(optimisation history) and ``importances.png`` (parameter importances, from two complete
trials on).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import fcntl
import io
import json
import logging
import math
import multiprocessing
import os
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from esmm.config import (
    Config,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    monitor_direction,
    parse_yaml,
    resolve_monitor,
)
from esmm.errors import ConfigError, EsmmError, UsageError
from esmm.fsio import atomic_path, atomic_write, prepare_dir_output, write_text
from esmm.tracking import require_tracking

log = logging.getLogger(__name__)

__all__ = ["ParamSpec", "TuneResult", "load_space", "tune"]

STUDY_NAME = "esmm"
KINDS = ("log_uniform", "uniform", "int_uniform", "choice")


def require_optuna() -> None:
    """Refuse ``esmm tune`` without Optuna, naming the extra that installs it."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UsageError("esmm tune needs the package 'optuna', which is not installed; "
                         "install it with `pip install esmm[tune]`")


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key and its distribution.

    Attributes:
        key: the dotted config key, e.g. ``train.optimizer.lr``.
        kind: ``log_uniform``, ``uniform``, ``int_uniform`` or ``choice``.
        args: ``(low, high)`` or ``(low, high, step)``; the choices for ``choice``.
    """

    key: str
    kind: Literal["log_uniform", "uniform", "int_uniform", "choice"]
    args: tuple[Any, ...]

    def suggest(self, trial: Any) -> Any:
        """The value a trial takes (a list choice is passed to Optuna as JSON text)."""
        if self.kind == "choice":
            if all(_scalar(c) for c in self.args):
                return trial.suggest_categorical(self.key, list(self.args))
            return json.loads(trial.suggest_categorical(
                self.key, [json.dumps(c) for c in self.args]))
        if self.kind == "int_uniform":
            step = self.args[2] if len(self.args) == 3 else 1
            return trial.suggest_int(self.key, self.args[0], self.args[1], step=step)
        return trial.suggest_float(self.key, float(self.args[0]), float(self.args[1]),
                                   log=self.kind == "log_uniform")

    def examples(self) -> list[Any]:
        """Values that must each be valid for the key: the bounds, or every choice."""
        return list(self.args) if self.kind == "choice" else list(self.args[:2])

    def to_dict(self) -> dict[str, Any]:
        return {self.key: {self.kind: list(self.args)}}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_bounds(where: str, kind: str, args: Any) -> tuple[Any, ...]:
    """The validated ``[low, high(, step)]`` of a numeric distribution."""
    n = "[low, high] or [low, high, step]" if kind == "int_uniform" else "[low, high]"
    if not isinstance(args, list) or len(args) not in ((2, 3) if kind == "int_uniform" else (2,)):
        raise ConfigError(f"{where}: {kind} takes {n}, got {args!r}")
    if kind == "int_uniform":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: int_uniform takes integers {n}, got {args!r}")
        if len(args) == 3 and args[2] <= 0:
            raise ConfigError(f"{where}: int_uniform step must be > 0, got {args[2]}")
    elif not all(_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} takes two finite numbers {n}, got {args!r}")
    if not args[0] < args[1]:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "log_uniform" and args[0] <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0, got {args[0]!r}")
    return tuple(args)


def _parse_spec(where: str, key: str, spec: Any) -> ParamSpec:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: expected one of {{log_uniform: [low, high]}}, "
                          "{uniform: [low, high]}, {int_uniform: [low, high]} or "
                          f"{{choice: [a, b, ...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice takes a non-empty list of values, got {args!r}")
        texts = [json.dumps(a, sort_keys=True) for a in args]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{where}: choice lists a value more than once: {args!r}")
        return ParamSpec(key, "choice", tuple(args))
    return ParamSpec(key, kind, _check_bounds(where, kind, args))


def _is_section(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _schema_child(node: Any, part: str, prefix: str, where: str) -> Any:
    """The schema node one key part below ``node``: a section (a pydantic model), a list
    annotation, or ``"value"``."""
    if typing.get_origin(node) is list:
        if not part.isdigit():
            raise ConfigError(f"{where}: `{prefix}` is a list; expected an index, got `{part}`")
        inner = typing.get_args(node)[0]
        return inner if _is_section(inner) else "value"
    if not _is_section(node):
        raise ConfigError(f"{where}: `{prefix}` is a value, not a section; it has no `{part}`")
    fields = node.model_fields
    if part not in fields:
        near = difflib.get_close_matches(part, list(fields), n=1)
        hint = f"did you mean `{prefix + '.' if prefix else ''}{near[0]}`? " if near else ""
        raise ConfigError(f"{where}: `{part}` is not a key of `{prefix or 'the config'}`; "
                          f"{hint}expected one of {sorted(fields)}")
    annotation = fields[part].annotation
    return annotation if _is_section(annotation) or typing.get_origin(
        annotation) is list else "value"


def check_key(key: str, where: str) -> None:
    """Refuse a key that names no config value (``train.optimizer.lrr``, ``model``)."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        node = _schema_child(node, part, ".".join(parts[:i]), where)
    if _is_section(node):
        raise ConfigError(f"{where}: `{key}` is a section; expected a key inside it, one of "
                          f"{sorted(node.model_fields)}")


def _with_values(tree: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    # JSON is YAML, so the config's own --set parser reads each value back exactly.
    return apply_overrides(tree, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def load_space(path: str | Path, tree: dict[str, Any]) -> list[ParamSpec]:
    """Read a search space and check it against a config tree.

    Raises:
        ConfigError: naming the file and the key: not a config key, not a distribution, bad
            bounds, or a bound or choice the config refuses for that key.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--space {p}: {'is a folder' if p.is_dir() else 'does not exist'}; "
                         "expected a YAML file")
    raw = parse_yaml(p.read_text(encoding="utf-8"), f"--space {p}")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--space {p}: expected a mapping of config keys to distributions, "
                          f"got {type(raw).__name__ if raw is not None else 'an empty file'}")
    space = []
    for key, spec in raw.items():
        where = f"--space {p}: {key}"
        if not isinstance(key, str):
            raise ConfigError(f"{where}: expected a dotted config key such as "
                              "train.optimizer.lr")
        check_key(key, where)
        space.append(_parse_spec(where, key, spec))
    for ps in space:
        for value in ps.examples():
            try:
                config_from_dict(_with_values(tree, {ps.key: value}), "the config")
            except ConfigError as e:
                why = str(e).removeprefix("invalid configuration in the config: ")
                raise ConfigError(f"--space {p}: {ps.key}: the value {value!r} is refused "
                                  f"for this config: {why}") from None
    return space


# ----------------------------------------------------------------------------- the study


@dataclass
class Study:
    """What every worker of one study needs (plain values: it is sent to worker processes)."""

    tree: dict[str, Any]
    space: list[ParamSpec]
    metric: str
    out: Path
    trials: int
    pruner: str = "median"
    startup_trials: int = 5
    seed: int | None = None
    threads: int | None = None

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.out / 'study.db').resolve().as_posix()}"

    def config(self, values: Mapping[str, Any]) -> Config:
        return config_from_dict(_with_values(self.tree, values), "a trial's config")


@dataclass
class TuneResult:
    out: Path
    metric: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _open_study(st: Study, worker: int = 0) -> Any:
    import optuna

    storage = optuna.storages.RDBStorage(
        st.storage_url, engine_kwargs={"connect_args": {"timeout": 60}})
    seed = None if st.seed is None else st.seed + worker
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=st.startup_trials)
    pruner: Any = (optuna.pruners.MedianPruner(n_startup_trials=st.startup_trials)
                   if st.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, sampler=sampler,
                               pruner=pruner, direction=_direction(st.metric),
                               load_if_exists=True)


def _direction(metric: str) -> str:
    return "maximize" if monitor_direction(metric) == "max" else "minimize"


def _counted(study: Any) -> int:
    """Trials that count towards ``--trials``: finished ones and those running now."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted"))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (waits for it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _ask(st: Study, study: Any) -> Any | None:
    """A new trial, or None once the study holds ``--trials`` (exact across workers)."""
    with _lock(st.out / ".ask.lock"):
        if _counted(study) >= st.trials:
            return None
        return study.ask()


def _pruning_hook(st: Study, trial: Any) -> Any:
    """The on_eval hook that reports each evaluation's metric and prunes a lagging trial."""
    import optuna

    from esmm.train import monitor_value

    def report(step: int, row: dict[str, Any]) -> None:
        if "monitor" not in row:  # an interval without evaluation
            return
        value = monitor_value(row, st.metric)
        if not math.isfinite(value):
            return
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{st.metric}={value:.6g} at step {step} is behind the "
                                     "median of earlier trials")

    return report


def _run_trial(st: Study, study: Any, trial: Any) -> None:
    """Train one trial and tell the study how it ended."""
    import optuna
    from optuna.trial import TrialState

    from esmm.train import monitor_value, train

    run = st.out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run", str(run))
    try:
        cfg = st.config({ps.key: ps.suggest(trial) for ps in st.space})
        result = train(cfg, run, on_eval=_pruning_hook(st, trial))
        value = monitor_value(result.metrics, st.metric)
    except optuna.TrialPruned as e:
        log.info("trial %d pruned: %s", trial.number, e)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except EsmmError as e:
        log.warning("trial %d failed: %s", trial.number, e)
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        return
    except BaseException:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("best_step", result.best_step)
    if not math.isfinite(value):
        # An AUC on a split without both classes, say: no value to rank the trial by.
        log.warning("trial %d failed: %s is %s on data.eval", trial.number, st.metric, value)
        trial.set_user_attr("error", f"{st.metric} is {value} on data.eval")
        study.tell(trial, state=TrialState.FAIL)
        return
    log.info("trial %d: %s=%.6g", trial.number, st.metric, value)
    study.tell(trial, value)


def _work(st: Study, worker: int = 0) -> None:
    """One worker: trials until the study holds ``--trials``."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if st.threads:
        torch.set_num_threads(st.threads)
    study = _open_study(st, worker)
    while (trial := _ask(st, study)) is not None:
        _run_trial(st, study, trial)


def _worker_main(st: Study, worker: int, level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _work(st, worker)


def _run_workers(st: Study, jobs: int) -> None:
    if jobs == 1:
        _work(st)
        return
    # spawn, not fork: a forked copy of a process that already ran torch threads can hang.
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_worker_main, args=(st, i, level), name=f"esmm-tune-{i}")
             for i in range(jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
            p.join()
        raise
    bad = [p.name for p in procs if p.exitcode != 0]
    if bad:
        raise EsmmError(f"tuning worker(s) {bad} stopped with an error (see the log above); "
                        "run the same command again to continue the study")


# ----------------------------------------------------------------------------- set-up


def _prepare_study(st: Study) -> None:
    """Create or reopen the study; refuse one of another metric or space; fail stale trials."""
    from optuna.trial import TrialState

    db = st.out / "study.db"
    trials_dir = st.out / "trials"
    if not db.is_file() and trials_dir.is_dir() and any(p.name != "mlruns"
                                                        for p in trials_dir.iterdir()):
        raise UsageError(f"--out {st.out}: holds trial runs (trials/) but no study.db; choose "
                         "another --out")
    study = _open_study(st)
    space = json.dumps([ps.to_dict() for ps in st.space])
    known = study.user_attrs
    if not known:
        study.set_user_attr("metric", st.metric)
        study.set_user_attr("space", space)
    elif known.get("metric") != st.metric:
        raise UsageError(f"--out {st.out}: its study optimises {known.get('metric')!r}, not "
                         f"{st.metric!r}; use the same --metric to continue it, or another "
                         "--out")
    elif known.get("space") != space:
        raise UsageError(f"--out {st.out}: its study searched another space; use the same "
                         "--space file to continue it, or another --out")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # The study is locked for this process: a running trial belongs to a dead process.
        log.info("trial %d was running when its process stopped; marking it failed and "
                 "running another in its place", t.number)
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    done = _counted(study)
    if not done:
        log.info("study in %s: %d trials, %s %s", db, st.trials, _direction(st.metric),
                 st.metric)
    else:
        log.info("continuing the study in %s: %d of %d trials done", db, done, st.trials)


def _resolve_metric(cfg: Config, metric: str | None) -> str:
    if cfg.data.eval is None:
        raise ConfigError("data.eval is not set: each trial is scored on data.eval; set it in "
                          "the config or with --set data.eval=PATH")
    if metric is None:
        return resolve_monitor(cfg)[0]
    probe = cfg.model_copy(deep=True)
    probe.train.early_stop.metric = metric
    probe.train.early_stop.mode = "auto"
    try:
        return resolve_monitor(probe)[0]
    except ConfigError as e:
        msg = str(e).removeprefix("train.early_stop.metric: ")
        raise UsageError(f"--metric {metric!r}: {msg}") from None


def tune(config: str | Path, space: str | Path, trials: int, out: str | Path, *,
         overrides: Sequence[str] = (), jobs: int = 1, metric: str | None = None,
         pruner: str = "median", startup_trials: int = 5, seed: int | None = None
         ) -> TuneResult:
    """Run (or continue) a study and write its best config, trials table and plots.

    Args:
        config: the base YAML config; ``overrides`` are ``--set`` items applied to it.
        space: the search-space YAML (see the module docstring).
        trials: finished trials the study should hold.
        out: the study folder (``study.db``, ``trials/``, outputs).
        jobs: worker processes sharing the study.
        metric: the objective on ``data.eval`` (default: the config's early-stopping monitor).
        pruner: ``median`` or ``none``.
        startup_trials: trials before the sampler models the space and the pruner prunes.
        seed: seeds the sampler (worker k uses seed + k).

    Raises:
        UsageError/ConfigError: bad arguments, config or space, before the first trial.
        EsmmError: no trial completed.
    """
    require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials < 1 or jobs < 1 or startup_trials < 0:
        raise UsageError("--trials and --jobs must be >= 1 and --startup-trials >= 0, got "
                         f"{trials}, {jobs} and {startup_trials}")
    if pruner not in ("median", "none"):
        raise UsageError(f"--pruner {pruner!r}: expected 'median' or 'none'")
    base = load_config(config, overrides)
    resolved = _resolve_metric(base, metric)
    tree = base.to_dict()
    if metric is not None:
        tree["train"]["early_stop"].update(metric=resolved, mode="auto")
    if jobs > 1:
        tree["train"]["progress"] = "off"
    specs = load_space(space, tree)
    out_dir = prepare_dir_output(out)
    threads = None if base.train.num_threads or jobs == 1 else max(1, (os.cpu_count() or 1)
                                                                   // jobs)
    st = Study(tree, specs, resolved, out_dir, trials, pruner, startup_trials, seed, threads)
    (out_dir / "trials").mkdir(exist_ok=True)
    with _held(out_dir):
        _prepare_study(st)
        # Tracked trials share one MLflow store: created here once, not raced by the workers.
        require_tracking(base, out_dir / "trials" / "0000")
        _run_workers(st, jobs)
        return write_outputs(st)


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    """One ``esmm tune`` per study folder at a time."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EsmmError(f"{out} is in use: another `esmm tune` holds {out / '.lock'}; "
                            "wait for it to end or choose another --out") from None
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- outputs


def _trial_rows(st: Study, study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.duration.total_seconds() if t.duration is not None else None)
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(),
                               st.metric: t.value,
                               "best_step": t.user_attrs.get("best_step"),
                               "last_step": t.last_step,
                               "seconds": round(duration, 2) if duration is not None else None}
        for ps in st.space:
            row[ps.key] = t.params.get(ps.key)
        row["run"] = t.user_attrs.get("run")
        row["note"] = ("interrupted" if t.user_attrs.get("interrupted")
                       else t.user_attrs.get("error", ""))
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _write_tables(st: Study, rows: list[dict[str, Any]], best: int | None) -> list[Path]:
    names = list(rows[0]) if rows else ["trial", "state", st.metric]
    csv_path, md_path = st.out / "trials.csv", st.out / "trials.md"
    with atomic_write(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Trials: {st.metric} ({_direction(st.metric)})", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        mark = " (best)" if r["trial"] == best else ""
        lines.append("| " + " | ".join(_fmt(r[k]) + (mark if k == "trial" else "")
                                       for k in names) + " |")
    write_text(md_path, "\n".join(lines) + "\n")
    return [csv_path, md_path]


def _save_axes(ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = ax.figure if not hasattr(ax, "__len__") else ax.flat[0].figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def _write_plots(st: Study, study: Any, complete: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = ovm.plot_optimization_history(study, target_name=st.metric)
        files.append(_save_axes(ax, st.out / "history.png"))
        if complete >= 2:
            try:
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=st.seed or 0)
                ax = ovm.plot_param_importances(study, evaluator=evaluator,
                                                 target_name=st.metric)
            except (ValueError, RuntimeError) as e:
                log.warning("no parameter importances: %s", e)
            else:
                files.append(_save_axes(ax, st.out / "importances.png"))
        else:
            log.info("importances.png needs two complete trials; the study has %d", complete)
    return files


def write_outputs(st: Study) -> TuneResult:
    """best_config.yaml, trials.csv, trials.md and the plots, from the study as stored."""
    from optuna.trial import TrialState

    study = _open_study(st)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if complete else None
    rows = _trial_rows(st, study)
    files = _write_tables(st, rows, best.number if best else None)
    files += _write_plots(st, study, len(complete))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    if best is None:
        raise EsmmError(f"no trial of the study in {st.out} completed ({counts}); see "
                        f"{st.out / 'trials.md'} for why")
    params = {ps.key: ps.suggest(_FixedTrial(best.params)) for ps in st.space}
    dump_config(st.config(params), st.out / "best_config.yaml")
    files.insert(0, st.out / "best_config.yaml")
    return TuneResult(st.out, st.metric, _direction(st.metric), best.value, params,
                      best.number, counts, files)


class _FixedTrial:
    """Replays stored params through :meth:`ParamSpec.suggest` (list choices are JSON)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.params[name]

    def suggest_int(self, name: str, *args: Any, **kw: Any) -> Any:
        return self.params[name]

    def suggest_float(self, name: str, *args: Any, **kw: Any) -> Any:
        return self.params[name]
