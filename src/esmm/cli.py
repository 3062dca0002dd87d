"""The ``esmm`` command line. Each command is a thin call into the library.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure (bad data, I/O).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

import esmm
from esmm.errors import EsmmError, UsageError
from esmm.fsio import prepare_dir_output

if TYPE_CHECKING:
    from esmm.config import Config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Entire-space multi-task conversion modelling: simulate, train, evaluate, predict.",
    pretty_exceptions_enable=False,
)

log = logging.getLogger("esmm")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
VERBOSE_HELP = "Log debug messages too."
QUIET_HELP = "Log warnings and errors only; no progress bars."


@dataclasses.dataclass
class _Verbosity:
    """The global -v/-q given before the command (the callback sets it for one call)."""

    verbose: bool = False
    quiet: bool = False


_GLOBAL = _Verbosity()


def _setup_logging(verbose: bool = False, quiet: bool = False) -> int:
    """Log to stderr: esmm at DEBUG (-v), WARNING (-q) or INFO. Returns the esmm logger's
    previous level, restored when the command ends (a command run twice in one process, as
    tests do, starts from the same state)."""
    if verbose and quiet:
        raise UsageError("-v/--verbose and -q/--quiet: give one of them, not both")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT,
                        datefmt="%H:%M:%S", stream=sys.stderr)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    previous = log.level
    log.setLevel(level)
    return previous


def _bars() -> bool:
    """Whether to draw progress bars: on a terminal, unless -q."""
    return sys.stderr.isatty() and log.level <= logging.INFO


def _with_verbosity(fn: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Give ``wrapper`` the signature of ``fn`` plus -v/--verbose and -q/--quiet, so that
    every command takes them after its name too (typer reads the signature)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    for name, flags, text in (("verbose", ("-v", "--verbose"), VERBOSE_HELP),
                              ("quiet", ("-q", "--quiet"), QUIET_HELP)):
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation="bool",
                                        default=typer.Option(False, *flags, help=text)))
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, "verbose": "bool", "quiet": "bool"}


def _errors(fn):
    """Turn library errors into one clear line and the documented exit code; set up logging
    from -v/-q (given before or after the command's name)."""

    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, quiet: bool = False, **kwargs):
        previous = log.level
        try:
            previous = _setup_logging(verbose or _GLOBAL.verbose, quiet or _GLOBAL.quiet)
            log.debug("esmm %s: %s", esmm.__version__, " ".join(sys.argv[1:]))
            return fn(*args, **kwargs)
        except UsageError as e:
            typer.echo(f"esmm: error: {e}", err=True)
            raise typer.Exit(2) from None
        except EsmmError as e:
            typer.echo(f"esmm: error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("esmm: interrupted", err=True)
            raise typer.Exit(130) from None
        finally:
            log.setLevel(previous)

    _with_verbosity(fn, wrapper)
    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"esmm {esmm.__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help=VERBOSE_HELP),
    quiet: bool = typer.Option(False, "-q", "--quiet", help=QUIET_HELP),
) -> None:
    """Options for every command; each command also takes -v/-q after its name."""
    _GLOBAL.verbose, _GLOBAL.quiet = verbose, quiet


SET_HELP = ("Override a config key, e.g. --set train.optimizer.lr=0.01 or "
            "--set model.name=base (repeatable; values parsed as YAML).")


@app.command()
@_errors
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/train, OUT/valid, "
                             "OUT/test each get impressions.parquet and users.parquet "
                             "(--format aliccp-raw: OUT/sample_skeleton_SPLIT.csv, "
                             "OUT/common_features_SPLIT.csv, OUT/ground_truth_SPLIT.parquet)."),
    preset: str = typer.Option("aliccp", help="Simulator preset: 'aliccp' (Ali-CCP rates: CTR "
                               "~4%, 0.5% conversions per click, long user bags) or 'dense' "
                               "(~10% conversions per click, short bags)."),
    rows: int = typer.Option(1_000_000, min=1, help="Training impressions."),
    valid_rows: int = typer.Option(None, min=0, help="Validation impressions "
                                   "(default: rows / 4)."),
    test_rows: int = typer.Option(None, min=0, help="Test impressions (default: rows / 2)."),
    seed: int = typer.Option(7, help="Seed: fixes the simulated world and every draw."),
    knob: list[str] = typer.Option([], "--set", help="Override a simulator knob, e.g. "
                                   "--set selection=1.0 --set cvr=0.05 (see docs/simulator.md)."),
    fmt: str = typer.Option("parquet", "--format", help="Output format: parquet, or "
                            "aliccp-raw (the raw Ali-CCP text files, for `esmm data aliccp`; "
                            "ground truth goes to a side Parquet file)."),
) -> None:
    """Simulate impressions with ground truth (p_click, p_conversion, conversion_if_clicked)."""
    from esmm.data.simulate import get_preset, write_simulation

    if fmt not in ("parquet", "aliccp-raw"):
        raise UsageError(f"--format {fmt!r}: expected 'parquet' or 'aliccp-raw'")
    cfg = get_preset(preset, **_parse_knobs(knob))
    prepare_dir_output(out)
    split_rows = {"train": rows, "valid": valid_rows if valid_rows is not None else rows // 4,
                  "test": test_rows if test_rows is not None else rows // 2}
    split_rows = {k: v for k, v in split_rows.items() if v > 0}
    if fmt == "aliccp-raw":
        from esmm.data.aliccp import simulate_raw

        info = simulate_raw(out, cfg, split_rows, seed, progress=_bars())
    else:
        info = write_simulation(out, cfg, split_rows, seed, progress=_bars())
    typer.echo(json.dumps(info.get("splits", info), indent=2, default=str))


def _parse_knobs(items: list[str]) -> dict:
    from esmm.config import parse_yaml

    knobs = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--set {it!r}: expected knob=value")
        k, v = it.split("=", 1)
        knobs[k.strip()] = parse_yaml(v, f"--set {it!r}")
    return knobs


@app.command()
@_errors
def train(
    config: Path = typer.Argument(..., help="YAML config (see configs/ and docs/config.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: config.yaml, "
                             "checkpoints/, history.csv, metrics.json, tb/."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                "latest checkpoint (same config); the result equals an "
                                "uninterrupted run."),
    nproc: int = typer.Option(None, "--nproc", min=1, help="Train data-parallel in this many "
                              "processes on this machine (launches torchrun; gloo on CPU, NCCL "
                              "on GPUs). train.batch_size is the global batch. Several machines: "
                              "see docs/scaling.md."),
) -> None:
    """Train a model; evaluates on data.eval, early-stops and keeps the best checkpoint."""
    from esmm.api import fit
    from esmm.config import load_config
    from esmm.metrics import format_table

    cfg = load_config(config, overrides)
    if nproc is not None:
        _launch_ranks(cfg, nproc, [str(config), "--out", str(out),
                                   *[a for o in overrides for a in ("--set", o)],
                                   *(["--resume"] if resume else [])])
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        # Under torchrun rank 0 reports; the others speak only of problems.
        logging.getLogger("esmm").setLevel(logging.WARNING)
    run = fit(cfg, out=out, resume=resume)
    if rank:
        return
    if run.metrics:
        typer.echo(format_table({cfg.model.name: run.metrics}))
    typer.echo(f"run directory: {run.path} (best {run.monitor}={run.best_metric} at step "
               f"{run.best_step})")


def _launch_ranks(cfg: Config, nproc: int, train_args: list[str]) -> None:
    """Run ``esmm train TRAIN_ARGS`` as ``nproc`` torchrun ranks; exit with their status.

    The config and data paths are checked here first, so a mistake is one line with exit
    code 2, not one report per rank.
    """
    import subprocess

    from esmm.config import check_data_paths, resolve_monitor
    from esmm.distributed import launched_by_torchrun, torchrun_command

    if launched_by_torchrun():
        raise UsageError("--nproc: this process is already a torchrun rank; drop --nproc")
    resolve_monitor(cfg)
    check_data_paths(cfg, ["train", "eval"])
    if cfg.model.sharding != "none":
        from esmm.sharding import check_sharding

        check_sharding(cfg)
    cmd = torchrun_command(nproc, ["train", *train_args])
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    code = subprocess.call(cmd)
    if code:
        raise typer.Exit(code)


def _check_input(data: Path | None) -> None:
    """A ``--data`` path that does not exist is a usage error (exit 2), as a config's is."""
    if data is not None and not data.exists():
        raise UsageError(f"--data {data}: no such file or folder; expected a Parquet file or "
                         "folder, a CSV file or a normalized folder")


@app.command()
@_errors
def evaluate(
    run: Path = typer.Argument(..., help="Run directory (uses checkpoints/best.pt) or a "
                               "checkpoint file."),
    data: Path = typer.Option(None, "--data", help="Data to evaluate (default: the run's "
                              "data.test, else data.eval)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write metrics as JSON here."),
    batch_size: int = typer.Option(8192, min=1, help="Rows per forward pass."),
    loader: str = typer.Option("auto", help="'stream': read Parquet chunk by chunk (memory "
                               "holds scores and labels, not features); 'memory': read the "
                               "split whole; 'auto': stream Parquet, read CSV whole."),
) -> None:
    """Evaluate a trained model: prints a table of every metric and writes metrics.json."""
    from esmm.api import load_run
    from esmm.fsio import prepare_file_output, write_text
    from esmm.metrics import format_table

    if out is not None:
        prepare_file_output(out)
    _check_input(data)
    r = load_run(run)
    path = data or r.default_data()
    metrics = r.evaluate(path, batch_size=batch_size, loader=loader)
    typer.echo(format_table({r.config.model.name: metrics}))
    if out is not None:
        write_text(out, json.dumps({"data": str(path), "model": r.config.model.name,
                                    "step": r.checkpoint_step, "metrics": metrics}, indent=2))
        typer.echo(f"wrote {out}")


@app.command()
@_errors
def predict(
    run: Path = typer.Argument(..., help="Run directory or checkpoint file."),
    data: Path = typer.Option(..., "--data", help="Rows to score (labels not needed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file with p_ctr, p_cvr, "
                             "p_ctcvr, one row per input row in input order."),
    batch_size: int = typer.Option(8192, min=1, help="Rows per forward pass."),
    keep: list[str] = typer.Option([], "--keep", help="Input columns to copy to the output "
                                   "beside the predictions (repeatable), e.g. --keep sample_id."),
    loader: str = typer.Option("auto", help="'stream': read and write Parquet chunk by chunk "
                               "(memory does not grow with the rows); 'memory': read the input "
                               "whole; 'auto': stream Parquet, read CSV whole."),
) -> None:
    """Score rows with a trained model and write p_ctr, p_cvr, p_ctcvr as Parquet."""
    from esmm.api import load_run
    from esmm.fsio import prepare_file_output

    prepare_file_output(out)
    _check_input(data)
    n = load_run(run).predict_to_file(data, out, keep=keep, batch_size=batch_size,
                                      loader=loader)
    typer.echo(f"wrote {n} rows to {out}")


@app.command()
@_errors
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for data, runs and "
                             "report.md."),
    preset: str = typer.Option("aliccp", help="Simulator preset (see `esmm simulate --help`)."),
    rows: int = typer.Option(None, min=1000, help="Training impressions (default: the demo's "
                             "size, chosen to finish in minutes on 2 cores)."),
    seeds: int = typer.Option(1, min=1, help="Seeds per model; with more than one the report "
                              "adds mean +- std and paired differences against the reference "
                              "model (BASE)."),
    models: str = typer.Option(None, help="Comma-separated models to train (default: BASE, "
                               "ESMM-NS and ESMM; `esmm models` lists every model)."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override a simulator knob "
                                   "(repeatable), e.g. --sim-set selection=1.0."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Simulate data, train BASE, ESMM-NS and ESMM, print one table and write report.md."""
    from esmm.benchmark import parse_methods
    from esmm.demo import DEMO_MODELS, run_demo

    chosen, knobs = parse_methods(models, DEMO_MODELS), _parse_knobs(knob)
    prepare_dir_output(out)
    report = run_demo(out, preset=preset, rows=rows, seeds=seeds, models=chosen, knobs=knobs,
                      overrides=overrides)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'}")


@app.command("models")
@_errors
def models_cmd() -> None:
    """List every model (`model.name`): its backbone, head, idea and source, as Markdown."""
    from esmm.models.catalog import models_table

    typer.echo(models_table())


@app.command()
@_errors
def export(
    run: Path = typer.Argument(..., help="Run directory (uses checkpoints/best.pt) or a "
                               "checkpoint file."),
    fmt: str = typer.Option("torchscript", "--format", help="Artifact format: 'torchscript' "
                            "(TorchScript file) or 'onnx' (ONNX model for onnxruntime)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact file to write: the model graph, "
                             "the feature spec and metadata in one file."),
    parity_rows: int = typer.Option(512, min=1, help="Rows per set in the parity check against "
                                    "the eager model (eval rows, synthetic rows)."),
) -> None:
    """Export a trained model to one artifact file, checked against the eager model."""
    from esmm.api import load_run

    meta = load_run(run).export(out, fmt, parity_rows=parity_rows)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in meta["parity"]["max_abs_diff"].items())
    typer.echo(f"wrote {out} ({fmt}, model {meta['model']}); parity max abs diff: {diffs}")


@app.command()
@_errors
def serve(
    artifact: Path = typer.Argument(..., help="Artifact file written by `esmm export`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, min=0, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="Worker processes (each loads the artifact)."),
    max_items: int = typer.Option(10_000, min=1, help="Most impressions or candidates in one "
                                  "request; larger requests get HTTP 413."),
    max_body_bytes: int = typer.Option(None, min=1, help="Largest request body in bytes, "
                                       "counted as it arrives (chunked bodies too); larger "
                                       "bodies get HTTP 413 before any parsing. Default: 1 KiB "
                                       "per --max-items item, at least 1 MiB."),
    max_bag_len: int = typer.Option(10_000, min=1, help="Most ids in one bag (a "
                                    "multi_categorical value); longer bags get HTTP 413."),
    max_in_flight: int = typer.Option(4, min=1, help="Requests with a body one worker decodes "
                                      "and scores at once; more wait their turn (bounds a "
                                      "worker's memory)."),
    show_paths: bool = typer.Option(False, "--show-paths", help="Publish the artifact's, run's "
                                    "and data's paths in /metadata (default: names only)."),
    threads: int = typer.Option(1, min=0, help="Intra-op threads per worker (0: CPU cores "
                                "divided by workers)."),
    log_level: str = typer.Option("info", help="uvicorn log level: critical, error, warning, "
                                  "info, debug."),
) -> None:
    """Serve an artifact over HTTP: POST /predict, POST /rank, GET /health, /metadata, /metrics.

    Listens on loopback (127.0.0.1) unless --host says otherwise.
    """
    from esmm.export import require

    require("fastapi")
    require("uvicorn")
    from esmm.serve import serve as run_serve

    run_serve(artifact, host=host, port=port, workers=workers, max_items=max_items,
              threads=threads, log_level=log_level, max_body_bytes=max_body_bytes,
              max_bag_len=max_bag_len, max_in_flight=max_in_flight, show_paths=show_paths)


@app.command()
@_errors
def tune(
    config: Path = typer.Argument(..., help="Base YAML config; data.eval scores the trials."),
    space: Path = typer.Option(..., "--space", help="YAML search space: each config key "
                               "mapped to log_uniform, uniform or int_uniform bounds, or to a "
                               "choice of values (see docs/tracking.md)."),
    trials: int = typer.Option(..., "--trials", min=1, help="Finished trials the study should "
                               "hold; a study in --out continues up to this count."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: study.db (SQLite, "
                             "resumable), trials/NNNN run folders, best_config.yaml, "
                             "trials.csv, trials.md, history.png, importances.png."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every "
                                        "trial."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Worker processes running trials in "
                             "parallel."),
    metric: str = typer.Option(None, "--metric", help="Objective on data.eval, e.g. cvr_auc "
                               "or ctr_logloss+ctcvr_logloss; its direction follows the metric "
                               "(default: the config's early-stopping monitor)."),
    pruner: str = typer.Option("median", "--pruner", help="'median': stop a trial behind the "
                               "median of earlier trials at an evaluation; 'none'."),
    startup_trials: int = typer.Option(5, "--startup-trials", min=0, help="Trials sampled at "
                                       "random, and never pruned, before the search models "
                                       "the space."),
    seed: int = typer.Option(None, "--seed", min=0, help="Seed of the sampler."),
) -> None:
    """Search hyper-parameters with Optuna: pruned, resumable, parallel trials."""
    from esmm.tune import tune as run_tune

    res = run_tune(config, space, trials, out, overrides=overrides, jobs=jobs, metric=metric,
                   pruner=pruner, startup_trials=startup_trials, seed=seed)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(res.counts.items()))
    typer.echo(f"trials: {counts}")
    typer.echo(f"best: trial {res.best_trial}, {res.metric}={res.best_value:.6g} "
               f"({res.direction}) with {json.dumps(res.best_params)}")
    typer.echo("wrote " + ", ".join(str(f) for f in res.files))


@app.command()
@_errors
def report(
    run: Path = typer.Argument(..., help="Run directory (esmm train --out)."),
    data: str = typer.Option(None, "--data", help="Split to score: train, eval or test (the "
                             "run config's data.train/eval/test) or a path (default: "
                             "data.test, else data.eval)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.html (one "
                             "self-contained page, plots embedded)."),
    batch_size: int = typer.Option(8192, min=1, help="Rows per forward pass."),
) -> None:
    """Write an HTML report of a run: curves, ROC, calibration, histograms, per-user AUC."""
    from esmm.report import build_report

    page = build_report(run, out, data=data, batch_size=batch_size)
    typer.echo(f"wrote {page}")


benchmark_app = typer.Typer(
    no_args_is_help=True,
    help="Compare models: `paper` (the ESMM paper's Table 2), `bias-sweep`, `zoo` (the "
    "multi-task seesaw) and `counterfactual` (every CVR method where selection is not "
    "ignorable).",
)
app.add_typer(benchmark_app, name="benchmark")

BUDGET_HELP = ("Epoch cap of one method, METHOD=EPOCHS (repeatable), e.g. --budget base=20. "
               "Default: train.epochs for every method, 3x for the methods whose CVR net "
               "learns from clicked impressions only (base, oversampling, unbias); early "
               "stopping on the valid split applies to all. ctr_net=EPOCHS sets the cap of the "
               "reference CTR net.")
FRESH_HELP = ("Retrain every run; by default runs finished by an earlier call with the same "
              "config and data are reused, so an interrupted benchmark continues.")
WORLD_HELP = ("Simulated worlds: world w is simulated with data seed 2018 + w and trains every "
              "seed (not with --data). Paired differences pair runs of the same world and "
              "seed.")
BOOT_HELP = ("Bootstrap replicates over test users for the tables with intervals (written when "
             "the test split has simulator ground truth).")
REPORTS_HELP = ("Also write each run's `esmm report` page on the test split "
                "(runs/.../report/report.html) and link them all from report.md. Off by default: "
                "a page re-scores the test split and draws its plots, 8 s or more per run at "
                "10k test rows, longer than training on a 20k-row epoch (docs/models.md). A "
                "run reused from a call "
                "without --reports has no checkpoint left to report on unless it was kept "
                "(--keep-checkpoints); --fresh retrains it.")
KEEP_HELP = ("Keep each run's checkpoints/ (by default they are deleted once the run's test "
             "metrics are written: with the Ali-CCP feature set a checkpoint is hundreds of MB).")


@benchmark_app.command("paper")
@_errors
def benchmark_paper(
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: results.csv (one row "
                             "per method and seed), report.md, auc.png, runs/ (and data/ "
                             "when simulating)."),
    data: Path = typer.Option(None, "--data", help="Folder with train/, valid/ and test/ (as "
                              "`esmm simulate --out DIR` writes). Default: simulate one into "
                              "OUT/data."),
    seeds: int = typer.Option(3, min=1, help="Runs per method (the paper: 10); seed k changes "
                              "the initialisation and shuffling, never the data."),
    methods: str = typer.Option(None, help="Comma-separated methods, in report order "
                                "(default: the paper's seven, BASE to ESMM). Any model of "
                                "`esmm models` can join, e.g. --methods "
                                "base,esmm,esmm_mmoe,esmm_ple to set ESMM over MMoE and PLE "
                                "beside the paper's numbers."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every "
                                        "method, e.g. --set model.oversampling.k=3."),
    rows: int = typer.Option(None, min=1000, help="Training impressions when simulating "
                             "(default 500000; valid rows/4, test rows/2)."),
    preset: str = typer.Option("aliccp", help="Simulator preset when simulating (see `esmm "
                               "simulate --help`)."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override a simulator knob when "
                                   "simulating (repeatable), e.g. --sim-set selection=1.0."),
    budget: list[str] = typer.Option([], "--budget", help=BUDGET_HELP),
    world_seeds: int = typer.Option(1, "--world-seeds", min=1, help=WORLD_HELP),
    boot: int = typer.Option(200, min=1, help=BOOT_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
    reports: bool = typer.Option(False, "--reports", help=REPORTS_HELP),
) -> None:
    """Reproduce the paper's Table 2 (every method, several seeds).

    Writes mean +- std per method beside the published Ali-CCP numbers, paired per-seed
    differences from BASE, results.csv and a chart.
    """
    from esmm.benchmark import PAPER_METHODS, parse_budgets, parse_methods, run_paper

    chosen, knobs, budgets = (parse_methods(methods, PAPER_METHODS), _parse_knobs(knob),
                              parse_budgets(budget))
    prepare_dir_output(out)
    report = run_paper(out, data=data, seeds=seeds, methods=chosen, overrides=overrides,
                       rows=rows, preset=preset, knobs=knobs, budgets=budgets, fresh=fresh,
                       keep_checkpoints=keep_checkpoints, world_seeds=world_seeds,
                       n_boot=boot, reports=reports)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'} (results.csv, auc.png beside it)")


@benchmark_app.command("zoo")
@_errors
def benchmark_zoo(
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: results.csv (one row "
                             "per model and seed), report.md, seesaw.png, runs/ (and data/ "
                             "when simulating)."),
    data: Path = typer.Option(None, "--data", help="Folder with train/, valid/ and test/ (as "
                              "`esmm simulate --out DIR` writes). Default: simulate one into "
                              "OUT/data."),
    seeds: int = typer.Option(3, min=1, help="Runs per model; seed k changes the "
                              "initialisation and shuffling, never the data."),
    methods: str = typer.Option(None, help="Comma-separated models, in report order "
                                "(default: BASE as the single-task reference, every zoo "
                                "backbone under its own head and under ESMM's, ESMM-NS, ESMM; "
                                "`esmm models` lists them)."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every "
                                        "model."),
    rows: int = typer.Option(None, min=1000, help="Training impressions when simulating "
                             "(default 500000; valid rows/4, test rows/2)."),
    preset: str = typer.Option("aliccp", help="Simulator preset when simulating."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override a simulator knob when "
                                   "simulating (repeatable)."),
    budget: list[str] = typer.Option([], "--budget", help="Epoch cap of one model, "
                                     "METHOD=EPOCHS (repeatable); default train.epochs for "
                                     "every model."),
    world_seeds: int = typer.Option(1, "--world-seeds", min=1, help=WORLD_HELP),
    boot: int = typer.Option(200, min=1, help=BOOT_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
    reports: bool = typer.Option(False, "--reports", help=REPORTS_HELP),
) -> None:
    """The seesaw benchmark: does a multi-task model move CTR and CVR AUC together?

    Every model on the same splits and seeds, the same epoch cap and early stopping (the sum
    of the validation CTR and CVR AUCs); a table of every AUC (mean +- std, paired difference
    from the single-task reference and wins) and a CTR-against-CVR chart.
    """
    from esmm.benchmark import ZOO_METHODS, parse_budgets, parse_methods, run_zoo

    chosen, knobs, budgets = (parse_methods(methods, ZOO_METHODS), _parse_knobs(knob),
                              parse_budgets(budget))
    prepare_dir_output(out)
    report = run_zoo(out, data=data, seeds=seeds, methods=chosen, overrides=overrides,
                     rows=rows, preset=preset, knobs=knobs, budgets=budgets, fresh=fresh,
                     keep_checkpoints=keep_checkpoints, world_seeds=world_seeds,
                     n_boot=boot, reports=reports)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'} (results.csv, seesaw.png beside it)")


@benchmark_app.command("bias-sweep")
@_errors
def benchmark_bias_sweep(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for sweep.csv, summary.csv, "
                             "report.md, one PNG per metric, data/ and runs/."),
    selection: str = typer.Option("0,0.5,1", help="Values of the simulator's `selection` knob "
                                  "(how much clicking selects on conversion-relevant "
                                  "factors), comma-separated."),
    cvr: str = typer.Option("0.1,0.02,0.005", help="Values of the `cvr` knob (conversions "
                            "per click), comma-separated."),
    seeds: int = typer.Option(2, min=1, help="Runs per method and cell."),
    rows: int = typer.Option(200_000, min=1000, help="Training impressions per cell "
                             "(valid rows/4, test rows/2)."),
    methods: str = typer.Option(None, help="Comma-separated methods (default: BASE, "
                                "DIVISION, ESMM-NS and ESMM)."),
    preset: str = typer.Option("dense", help="Simulator preset the grid modifies."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override another simulator knob in "
                                   "every cell (repeatable), e.g. --sim-set "
                                   "clickbait_fraction=0.2."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    budget: list[str] = typer.Option([], "--budget", help=BUDGET_HELP),
    world_seeds: int = typer.Option(1, "--world-seeds", min=1, help=WORLD_HELP),
    boot: int = typer.Option(200, min=1, help=BOOT_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
    reports: bool = typer.Option(False, "--reports", help=REPORTS_HELP),
) -> None:
    """Map where each method wins over a grid of the simulator's selection and cvr knobs.

    Writes tables (Markdown, CSV) and line charts of cvr_auc_entire_space, cvr_auc and
    ctcvr_auc.
    """
    from esmm.benchmark import (
        SWEEP_METHODS,
        parse_budgets,
        parse_floats,
        parse_methods,
        run_bias_sweep,
    )

    sel, cvrs = parse_floats(selection, "--selection"), parse_floats(cvr, "--cvr")
    chosen, knobs, budgets = (parse_methods(methods, SWEEP_METHODS), _parse_knobs(knob),
                              parse_budgets(budget))
    prepare_dir_output(out)
    report = run_bias_sweep(out, selection=sel, cvr=cvrs, seeds=seeds, rows=rows,
                            methods=chosen, preset=preset, knobs=knobs, overrides=overrides,
                            budgets=budgets, fresh=fresh, keep_checkpoints=keep_checkpoints,
                            world_seeds=world_seeds, n_boot=boot, reports=reports)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'}")


@benchmark_app.command("counterfactual")
@_errors
def benchmark_counterfactual(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for results.csv, summary.csv, "
                             "report.md, one PNG per metric, data/ and runs/."),
    selection: str = typer.Option("0,0.5,1", help="Values of the simulator's `selection` knob "
                                  "(observed selection: how much clicking selects on "
                                  "conversion-relevant features), comma-separated."),
    hidden_confounder: str = typer.Option("0,1", help="Values of the `hidden_confounder` knob "
                                          "(an unobserved factor raising both click and "
                                          "conversion: selection not ignorable), "
                                          "comma-separated."),
    cvr: str = typer.Option("0.1,0.02", help="Values of the `cvr` knob (conversions per "
                            "click), comma-separated."),
    world_seeds: int = typer.Option(3, "--world-seeds", min=1, help=WORLD_HELP),
    seeds: int = typer.Option(2, min=1, help="Training seeds per method and world."),
    rows: int = typer.Option(100_000, min=1000, help="Training impressions per world "
                             "(valid rows/4, test rows/2)."),
    methods: str = typer.Option(None, help="Comma-separated methods (default: every CVR "
                                "method: BASE, the paper's baselines, ESMM-NS, ESMM, "
                                "ESCM2-IPS, ESCM2-DR, DCMT); BASE is always added."),
    preset: str = typer.Option("dense", help="Simulator preset the grid modifies."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override another simulator knob in "
                                   "every cell (repeatable)."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    budget: list[str] = typer.Option([], "--budget", help="Epoch cap of one method, "
                                     "METHOD=EPOCHS (repeatable); default train.epochs for "
                                     "every method."),
    boot: int = typer.Option(500, min=1, help=BOOT_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
    reports: bool = typer.Option(False, "--reports", help=REPORTS_HELP),
) -> None:
    """Every CVR method where selection is not ignorable: a grid of observed selection x
    hidden confounder x conversion rate, several worlds and seeds per cell.

    Writes tables with intervals over runs and over test users, paired differences from
    BASE, the pCTR-as-pCVR control and the p_conversion oracle, and line charts.
    """
    from esmm.benchmark import (
        COUNTERFACTUAL_METHODS,
        parse_budgets,
        parse_floats,
        parse_methods,
        run_counterfactual,
    )

    grid = (parse_floats(selection, "--selection"),
            parse_floats(hidden_confounder, "--hidden-confounder"), parse_floats(cvr, "--cvr"))
    chosen, knobs, budgets = (parse_methods(methods, COUNTERFACTUAL_METHODS),
                              _parse_knobs(knob), parse_budgets(budget))
    prepare_dir_output(out)
    report = run_counterfactual(out, selection=grid[0], hidden_confounder=grid[1],
                                cvr=grid[2], world_seeds=world_seeds, seeds=seeds, rows=rows,
                                methods=chosen, preset=preset, knobs=knobs,
                                overrides=overrides, budgets=budgets, n_boot=boot,
                                fresh=fresh, keep_checkpoints=keep_checkpoints,
                                reports=reports)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'}")


data_app = typer.Typer(
    no_args_is_help=True,
    help="Turn downloaded data sets into the tables `esmm train` reads.",
)
app.add_typer(data_app, name="data")


@data_app.command("aliccp")
@_errors
def data_aliccp(
    skeleton: Path = typer.Option(..., "--skeleton", help="sample_skeleton_{train,test}.csv "
                                  "of one split, as downloaded."),
    common: Path = typer.Option(..., "--common", help="common_features_{train,test}.csv of "
                                "the same split."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: impressions/ and users/ "
                             "(Parquet shards) and summary.json; use it as data.train, "
                             "data.eval or data.test."),
    on_error: str = typer.Option("stop", "--on-error", help="Malformed line: 'stop' (exit 1 "
                                 "naming the file, line and reason) or 'skip' (skip it and "
                                 "count it by reason in summary.json)."),
    conversion_without_click: str = typer.Option(
        "drop", "--conversion-without-click", help="Lines with conversion=1 and click=0: "
        "'drop' (counted), 'keep' (counted) or 'error'."),
    shard_rows: int = typer.Option(1_000_000, "--shard-rows", min=1, help="Rows per Parquet "
                                   "file (impressions and users)."),
    bag_fields: str = typer.Option("210,853,109_14,110_14,127_14,150_14", "--bag-fields",
                                   help="Comma-separated fields stored as lists (every entry "
                                   "kept, in file order); any other field may appear once "
                                   "per line."),
    ground_truth: Path = typer.Option(None, "--ground-truth", help="Parquet file with "
                                      "sample_id and the simulator's ground truth in skeleton "
                                      "line order (`esmm simulate --format aliccp-raw` "
                                      "writes ground_truth_SPLIT.parquet); attached to the "
                                      "impressions."),
    block_mb: float = typer.Option(8.0, "--block-mb", min=0.001, help="MB read and parsed at "
                                   "a time; memory grows with it, not with the files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier ingestion "
                                   "in --out."),
    workers: int = typer.Option(1, "--workers", min=1, help="Threads parsing the next blocks "
                                "while one is written (more memory; helps on idle cores)."),
) -> None:
    """Ingest one raw Ali-CCP split (skeleton + common features) into Parquet, streaming."""
    from esmm.data.aliccp import ingest

    for option, path in (("--skeleton", skeleton), ("--common", common)):
        if not path.is_file():  # a missing input named here is a usage error, as --data's is
            raise UsageError(f"{option} {path}: no such file; expected a raw Ali-CCP CSV file")
    bags = tuple(b.strip() for b in bag_fields.split(",") if b.strip())
    summary = ingest(skeleton, common, out, on_error=on_error,
                     conversion_without_click=conversion_without_click, shard_rows=shard_rows,
                     block_bytes=max(1, int(block_mb * (1 << 20))), bag_fields=bags,
                     ground_truth=ground_truth, overwrite=overwrite, workers=workers)
    imp, users = summary["impressions"], summary["users"]
    typer.echo(json.dumps({
        "impressions": {k: imp[k] for k in ("rows_in", "rows_written", "dropped",
                                            "malformed_by_reason", "clicks", "conversions",
                                            "ctr", "conversions_per_click")},
        "users": {k: users[k] for k in ("rows_in", "rows_written", "dropped",
                                        "malformed_by_reason")},
        "seconds": summary["seconds"], "mb_per_s": summary["mb_per_s"],
    }, indent=2))
    typer.echo(f"wrote {out / 'impressions'}, {out / 'users'} and {out / 'summary.json'}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
