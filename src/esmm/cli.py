"""The ``esmm`` command line. Each command is a thin call into the library.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure (bad data, I/O).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

import esmm
from esmm.errors import EsmmError, UsageError
from esmm.fsio import prepare_dir_output

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
) -> None:
    """Train a model; evaluates on data.eval, early-stops and keeps the best checkpoint."""
    from esmm.api import fit
    from esmm.config import load_config
    from esmm.metrics import format_table

    cfg = load_config(config, overrides)
    run = fit(cfg, out=out, resume=resume)
    if run.metrics:
        typer.echo(format_table({cfg.model.name: run.metrics}))
    typer.echo(f"run directory: {run.path} (best {run.monitor}={run.best_metric} at step "
               f"{run.best_step})")


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
                              "adds mean +- std and paired differences against BASE."),
    models: str = typer.Option("base,esmm_ns,esmm", help="Comma-separated models to train."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override a simulator knob "
                                   "(repeatable), e.g. --sim-set selection=1.0."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Simulate data, train BASE, ESMM-NS and ESMM, print one table and write report.md."""
    from esmm.demo import run_demo

    prepare_dir_output(out)
    report = run_demo(out, preset=preset, rows=rows, seeds=seeds,
                      models=[m.strip() for m in models.split(",") if m.strip()],
                      knobs=_parse_knobs(knob), overrides=overrides)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'}")


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
    threads: int = typer.Option(1, min=0, help="Intra-op threads per worker (0: CPU cores "
                                "divided by workers)."),
    log_level: str = typer.Option("info", help="uvicorn log level: critical, error, warning, "
                                  "info, debug."),
) -> None:
    """Serve an artifact over HTTP: POST /predict, POST /rank, GET /health, /metadata, /metrics."""
    from esmm.export import require

    require("fastapi")
    require("uvicorn")
    from esmm.serve import serve as run_serve

    run_serve(artifact, host=host, port=port, workers=workers, max_items=max_items,
              threads=threads, log_level=log_level)


benchmark_app = typer.Typer(
    no_args_is_help=True,
    help="Compare ESMM with the paper's baselines: `paper` (Table 2) and `bias-sweep`.",
)
app.add_typer(benchmark_app, name="benchmark")

BUDGET_HELP = ("Epoch cap of one method, METHOD=EPOCHS (repeatable), e.g. --budget base=20. "
               "Default: train.epochs for every method, 3x for the methods whose CVR net "
               "learns from clicked impressions only (base, oversampling, unbias); early "
               "stopping on the valid split applies to all. ctr_net=EPOCHS sets the cap of the "
               "reference CTR net.")
FRESH_HELP = ("Retrain every run; by default runs finished by an earlier call with the same "
              "config and data are reused, so an interrupted benchmark continues.")
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
    methods: str = typer.Option(",".join(("base", "aman", "oversampling", "unbias",
                                          "division", "esmm_ns", "esmm")),
                                help="Comma-separated methods, in report order."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " Applies to every "
                                        "method, e.g. --set model.oversample_k=3."),
    rows: int = typer.Option(None, min=1000, help="Training impressions when simulating "
                             "(default 500000; valid rows/4, test rows/2)."),
    preset: str = typer.Option("aliccp", help="Simulator preset when simulating (see `esmm "
                               "simulate --help`)."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override a simulator knob when "
                                   "simulating (repeatable), e.g. --sim-set selection=1.0."),
    budget: list[str] = typer.Option([], "--budget", help=BUDGET_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
) -> None:
    """Reproduce the paper's Table 2 (every method, several seeds).

    Writes mean +- std per method beside the published Ali-CCP numbers, paired per-seed
    differences from BASE, results.csv and a chart.
    """
    from esmm.benchmark import parse_budgets, parse_methods, run_paper

    prepare_dir_output(out)
    report = run_paper(out, data=data, seeds=seeds,
                       methods=parse_methods(methods, ()), overrides=overrides, rows=rows,
                       preset=preset, knobs=_parse_knobs(knob), budgets=parse_budgets(budget),
                       fresh=fresh, keep_checkpoints=keep_checkpoints)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'} (results.csv, auc.png beside it)")


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
    methods: str = typer.Option("base,division,esmm_ns,esmm",
                                help="Comma-separated methods."),
    preset: str = typer.Option("dense", help="Simulator preset the grid modifies."),
    knob: list[str] = typer.Option([], "--sim-set", help="Override another simulator knob in "
                                   "every cell (repeatable), e.g. --sim-set "
                                   "clickbait_fraction=0.2."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    budget: list[str] = typer.Option([], "--budget", help=BUDGET_HELP),
    fresh: bool = typer.Option(False, "--fresh", help=FRESH_HELP),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help=KEEP_HELP),
) -> None:
    """Map where each method wins over a grid of the simulator's selection and cvr knobs.

    Writes tables (Markdown, CSV) and line charts of cvr_auc_entire_space, cvr_auc and
    ctcvr_auc.
    """
    from esmm.benchmark import parse_budgets, parse_floats, parse_methods, run_bias_sweep

    prepare_dir_output(out)
    report = run_bias_sweep(out, selection=parse_floats(selection, "--selection"),
                            cvr=parse_floats(cvr, "--cvr"), seeds=seeds, rows=rows,
                            methods=parse_methods(methods, ()), preset=preset,
                            knobs=_parse_knobs(knob), overrides=overrides,
                            budgets=parse_budgets(budget), fresh=fresh,
                            keep_checkpoints=keep_checkpoints)
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
