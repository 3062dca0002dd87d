"""The ``esmm`` command line. Each command is a thin call into the library.

Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure (bad data, I/O).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import typer

from esmm.errors import EsmmError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Entire-space multi-task conversion modelling: simulate, train, evaluate, predict.",
    pretty_exceptions_enable=False,
)

log = logging.getLogger("esmm")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _errors(fn):
    """Turn library errors into one clear line and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
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

    return wrapper


SET_HELP = ("Override a config key, e.g. --set train.optimizer.lr=0.01 or "
            "--set model.name=base (repeatable; values parsed as YAML).")


@app.command()
@_errors
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/train, OUT/valid, "
                             "OUT/test each get impressions.parquet and users.parquet."),
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
    fmt: str = typer.Option("parquet", "--format", help="Output format: parquet."),
) -> None:
    """Simulate impressions with ground truth (p_click, p_conversion, conversion_if_clicked)."""
    from esmm.data.simulate import get_preset, write_simulation

    if fmt != "parquet":
        raise UsageError(f"--format {fmt!r}: expected 'parquet'")
    cfg = get_preset(preset, **_parse_knobs(knob))
    split_rows = {"train": rows, "valid": valid_rows if valid_rows is not None else rows // 4,
                  "test": test_rows if test_rows is not None else rows // 2}
    split_rows = {k: v for k, v in split_rows.items() if v > 0}
    info = write_simulation(out, cfg, split_rows, seed, progress=sys.stderr.isatty())
    typer.echo(json.dumps(info.get("splits", info), indent=2, default=str))


def _parse_knobs(items: list[str]) -> dict:
    import yaml

    knobs = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--set {it!r}: expected knob=value")
        k, v = it.split("=", 1)
        knobs[k.strip()] = yaml.safe_load(v)
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
    from esmm.config import load_config
    from esmm.metrics import format_table
    from esmm.train import train as run_train

    cfg = load_config(config, overrides)
    res = run_train(cfg, out, resume=resume)
    if res.metrics:
        typer.echo(format_table({cfg.model.name: res.metrics}))
    typer.echo(f"run directory: {res.run_dir} (best {res.monitor}={res.best_metric} at step "
               f"{res.best_step})")


@app.command()
@_errors
def evaluate(
    run: Path = typer.Argument(..., help="Run directory (uses checkpoints/best.pt) or a "
                               "checkpoint file."),
    data: Path = typer.Option(None, "--data", help="Data to evaluate (default: the run's "
                              "data.test, else data.eval)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write metrics as JSON here."),
    batch_size: int = typer.Option(8192, min=1, help="Rows per forward pass."),
) -> None:
    """Evaluate a trained model: prints a table of every metric and writes metrics.json."""
    from esmm.data.tables import load_split
    from esmm.evaluate import evaluate as run_eval
    from esmm.metrics import format_table
    from esmm.train import load_model

    model, cfg, spec, ck = load_model(run)
    path = data or cfg.data.test or cfg.data.eval
    if path is None:
        raise UsageError("no data to evaluate: pass --data PATH")
    split = load_split(path, spec, cfg.data)
    metrics = run_eval(model, split, batch_size)
    typer.echo(format_table({cfg.model.name: metrics}))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"data": str(path), "model": cfg.model.name,
                                   "step": ck.get("step"), "metrics": metrics}, indent=2))
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
) -> None:
    """Score rows with a trained model and write p_ctr, p_cvr, p_ctcvr as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from esmm.data.tables import encode, needed_columns, read_tables
    from esmm.evaluate import predict_arrays
    from esmm.train import load_model

    model, cfg, spec, _ = load_model(run)
    raw = read_tables(data, cfg.data, columns=needed_columns(spec, cfg.data) + list(keep))
    split = encode(raw, spec, cfg.data, require_labels=False)
    preds = predict_arrays(model, split, batch_size)
    cols = {}
    for k in keep:
        if k not in raw.impressions.column_names:
            raise UsageError(f"--keep {k!r}: no such column in {data}")
        cols[k] = raw.impressions.column(k)
    cols.update({k: pa.array(v) for k, v in preds.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out)
    typer.echo(f"wrote {split.n} rows to {out}")


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

    report = run_demo(out, preset=preset, rows=rows, seeds=seeds,
                      models=[m.strip() for m in models.split(",") if m.strip()],
                      knobs=_parse_knobs(knob), overrides=overrides)
    typer.echo(report)
    typer.echo(f"report written to {out / 'report.md'}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
