"""The training loop: optimizers, evaluation, early stopping, checkpoints, logging.

Run directory layout::

    RUN/config.yaml            resolved config
    RUN/checkpoints/latest.pt  resumable; at an evaluation (atomically, at most once per
                               ``train.checkpoint_interval_s``) and at the end
    RUN/checkpoints/best.pt    the best evaluation so far by the monitored metric (weights only)
    RUN/history.csv            one row per evaluation
    RUN/metrics.json           final metrics of the best checkpoint, with the split they came from
    RUN/tb/                    TensorBoard events

A checkpoint carries the config, the feature spec, the step, the best metric and the package
version; ``latest.pt`` also holds optimizer and data-order state, so ``resume=True`` continues a
killed run to the same result as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import esmm
from esmm.config import Config, config_from_dict, dump_config
from esmm.data.batches import num_batches, read_ahead
from esmm.data.stream import Split, open_split, split_batches
from esmm.errors import ConfigError, EsmmError, UsageError
from esmm.evaluate import evaluate
from esmm.features import FeatureSpec, spec_from_config
from esmm.models import MultiTaskModel, build_model
from esmm.nn.embedding import EmbeddingCollection
from esmm.optim import RowSparseAdam

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_step: int | None
    best_metric: float | None
    monitor: str
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


# ----------------------------------------------------------------------------- optimizers


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, sparse-gradient embedding parameters)."""
    sparse_ids = set()
    sparse: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, EmbeddingCollection) and m.sparse:
            tables = list(m.tables())
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
            tables = [m.weight]
        else:
            continue
        for w in tables:
            if id(w) not in sparse_ids:
                sparse_ids.add(id(w))
                sparse.append(w)
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return dense, sparse


def build_optimizers(model: nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """Dense weights get ``train.optimizer``; embedding tables ``train.sparse_optimizer``."""
    oc = cfg.train.optimizer
    dense, sparse = split_parameters(model)
    opts: list[torch.optim.Optimizer] = []
    if dense:
        if oc.name in ("adam", "adamw"):
            cls = torch.optim.Adam if oc.name == "adam" else torch.optim.AdamW
            kw = dict(lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay)
            # null: fused where it pays, i.e. when the embedding tables are among the dense
            # weights (sparse_optimizer: dense); towers alone are too small to gain from it.
            fused = oc.fused if oc.fused is not None else cfg.train.sparse_optimizer.name == "dense"
            if not fused:
                opts.append(cls(dense, foreach=True, **kw))
            else:
                try:
                    opts.append(cls(dense, fused=True, **kw))
                except RuntimeError as e:
                    if oc.fused:
                        raise ConfigError(f"train.optimizer.fused=true: this torch build has no "
                                          f"fused {oc.name} for these parameters ({e}); set "
                                          "it to null or false") from None
                    opts.append(cls(dense, foreach=True, **kw))
        elif oc.name == "adagrad":
            opts.append(torch.optim.Adagrad(dense, lr=oc.lr, weight_decay=oc.weight_decay))
        else:
            opts.append(torch.optim.SGD(dense, lr=oc.lr, weight_decay=oc.weight_decay))
    if sparse:
        sc = cfg.train.sparse_optimizer
        lr = sc.lr or oc.lr
        if sc.name == "sparse_adam":
            opts.append(RowSparseAdam(sparse, lr=lr, betas=oc.betas, eps=oc.eps))
        elif sc.name == "adagrad":
            opts.append(torch.optim.Adagrad(sparse, lr=lr))
        else:
            opts.append(torch.optim.SGD(sparse, lr=lr))
    return opts


# ----------------------------------------------------------------------------- checkpoints


def save_atomic(obj: Any, path: Path) -> None:
    """Write with torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise EsmmError(f"checkpoint {p} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise EsmmError(f"checkpoint {p} cannot be read: {e}") from None


def find_checkpoint(run: str | Path, which: str = "best") -> Path:
    """The checkpoint of a run directory (``best``, falling back to ``latest``), or a file."""
    p = Path(run)
    if p.is_file():
        return p
    for name in (which, "latest"):
        c = p / "checkpoints" / f"{name}.pt"
        if c.is_file():
            return c
    raise UsageError(f"{p}: not a run directory (no checkpoints/{which}.pt); "
                     "pass the --out folder of `esmm train`")


def load_model(run: str | Path, which: str = "best"
               ) -> tuple[MultiTaskModel, Config, FeatureSpec, dict[str, Any]]:
    """Rebuild a trained model from a run directory or checkpoint file (eval mode)."""
    ck = load_checkpoint(find_checkpoint(run, which))
    cfg = config_from_dict(ck["config"], source=f"checkpoint of {run}")
    spec = FeatureSpec.from_dict(ck["feature_spec"])
    model = build_model(cfg, spec)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg, spec, ck


# ----------------------------------------------------------------------------- the loop


def resolve_device(setting: str) -> torch.device:
    """The torch device of ``train.device`` (``auto``: cuda when available, else cpu)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={setting}: this torch build or machine has no CUDA "
                              "device (torch.cuda.is_available() is False); set train.device=cpu "
                              "or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={setting}: only {torch.cuda.device_count()} CUDA "
                              "device(s) here")
    return device


def _progress_enabled(setting: str) -> bool:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 or setting == "off":
        return False
    return setting == "on" or sys.stderr.isatty()


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def monitor_value(metrics: dict[str, float], monitor: str) -> float:
    """The monitored value: one metric, or a ``+``-separated sum of metrics."""
    total = 0.0
    for name in monitor.split("+"):
        name = name.strip()
        if name not in metrics:
            raise ConfigError(f"train.early_stop.metric: {name!r} is not a metric; "
                              f"available: {sorted(metrics)}")
        total += float(metrics[name])
    return total


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False,
          train_data: Split | None = None, eval_data: Split | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data.train``, evaluating on ``cfg.data.eval``.

    Args:
        out_dir: the run directory (created).
        resume: continue from ``out_dir/checkpoints/latest.pt``; the config must match.
        train_data / eval_data: already-opened splits (skips reading ``cfg.data``).
        on_step: called after every optimizer step with the global step.
    """
    run = Path(out_dir)
    ck_dir = run / "checkpoints"
    latest = ck_dir / "latest.pt"
    if resume:
        if not latest.is_file():
            raise UsageError(f"--resume: {latest} does not exist; nothing to resume")
    elif ck_dir.exists() and any(ck_dir.iterdir()):
        raise UsageError(f"{run} already holds a run (checkpoints/ is not empty); "
                         "pass --resume to continue it or choose another --out")
    ck_dir.mkdir(parents=True, exist_ok=True)

    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(latest)
        if state["config"] != cfg.to_dict():
            old, new = state["config"], cfg.to_dict()
            diff = [k for k in new if old.get(k) != new.get(k)]
            raise ConfigError(f"--resume: the config differs from the run's in section(s) {diff}; "
                              "resume with the same config (see RUN/config.yaml)")
    dump_config(cfg, run / "config.yaml")

    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    spec = spec_from_config(cfg)
    if train_data is None:
        if not cfg.data.train:
            raise ConfigError("data.train is not set: give the training data path in the config "
                              "or with --set data.train=PATH")
        train_data = open_split(cfg.data.train, spec, cfg.data)
    if eval_data is None and cfg.data.eval:
        eval_data = open_split(cfg.data.eval, spec, cfg.data)
    log.info("train rows: %d (dropped %d conversion-without-click)", train_data.n,
             train_data.dropped_conversion_without_click)

    device = resolve_device(tc.device)
    model = build_model(cfg, spec).to(device)
    opts = build_optimizers(model, cfg)
    monitor = tc.early_stop.metric if tc.early_stop.metric != "auto" else model.monitor
    mode = tc.early_stop.mode
    if mode == "auto":
        if tc.early_stop.metric == "auto":
            mode = model.monitor_mode
        else:
            mode = "min" if "logloss" in monitor else "max"

    steps_per_epoch = num_batches(train_data.n, tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    eval_every = tc.eval_every or steps_per_epoch

    step = 0
    samples = 0
    epoch = 0
    batch_in_epoch = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals = 0
    elapsed_before = 0.0
    loss_sums: dict[str, float] = {}
    loss_count = 0
    if state is not None:
        model.load_state_dict(state["model"])
        try:
            for o, s in zip(opts, state["optimizers"], strict=True):
                o.load_state_dict(s)
        except ValueError as e:
            raise EsmmError(f"--resume: the optimizer state in {latest} does not fit this "
                            f"model's parameters ({e}); it was written by esmm "
                            f"{state.get('version', '?')} (this is {esmm.__version__}): resume "
                            "with that version, or start a new run from its weights") from None
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        samples = state.get("samples", 0)
        best, best_step, bad_evals = state["best_metric"], state["best_step"], state["bad_evals"]
        elapsed_before = state.get("elapsed_s", 0.0)
        log.info("resuming %s at step %d (epoch %d, batch %d)", run, step, epoch, batch_in_epoch)

    history_path = run / "history.csv"
    history_rows: list[dict[str, Any]] = []
    if state is not None and history_path.exists():
        with open(history_path, newline="") as f:
            history_rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run / "tb"), purge_step=step if state is not None else None)

    def checkpoint(path: Path, resumable: bool = True) -> None:
        # Only latest.pt needs optimizer state (to resume); best.pt carries weights and metadata,
        # which keeps it at about a third of the size with Adam-family optimizers.
        extra: dict[str, Any] = {}
        if resumable:
            extra = {"optimizers": [o.state_dict() for o in opts],
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": (torch.cuda.get_rng_state(device) if device.type == "cuda"
                                  else None)}
        save_atomic({
            "model": model.state_dict(),
            **extra,
            "config": cfg.to_dict(),
            "feature_spec": spec.to_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "samples": samples,
            "best_metric": best, "best_step": best_step, "bad_evals": bad_evals,
            "monitor": monitor, "version": esmm.__version__,
            "elapsed_s": elapsed_before + (time.perf_counter() - t0),
        }, path)

    def write_history() -> None:
        names: list[str] = []
        for r in history_rows:
            for k in r:
                if k not in names:
                    names.append(k)
        tmp = history_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(history_rows)
        os.replace(tmp, history_path)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps * tc.batch_size, initial=min(step * tc.batch_size,
               total_steps * tc.batch_size), unit="samples", unit_scale=True,
               desc=f"train {cfg.model.name}", disable=not _progress_enabled(tc.progress),
               dynamic_ncols=True)
    t0 = time.perf_counter()
    stopped_early = False
    latest_at = (step, time.perf_counter())  # (step, time) of the newest latest.pt
    model.train()
    try:
        while step < total_steps and epoch < tc.epochs:
            with closing(read_ahead(split_batches(train_data, tc.batch_size, shuffle=True,
                                                seed=tc.seed, epoch=epoch,
                                                start_batch=batch_in_epoch,
                                                block=tc.shuffle_block),
                                  cfg.data.read_ahead)) as batches:
                for batch in batches:
                    batch = batch.to(device)
                    out = model(batch)
                    losses = model.losses(out, batch)
                    total = model.total_loss(losses)
                    if not torch.isfinite(total):
                        raise EsmmError(f"loss became {total.item()} at step {step + 1} "
                                        f"({ {k: v.item() for k, v in losses.items()} }); "
                                        "lower train.optimizer.lr or check the data")
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    total.backward()
                    for o in opts:
                        o.step()
                    step += 1
                    samples += batch.size
                    batch_in_epoch += 1
                    for k, v in losses.items():
                        loss_sums[k] = loss_sums.get(k, 0.0) + v.item()
                    loss_count += 1
                    bar.update(batch.size)
                    if step % 20 == 0:
                        bar.set_postfix(loss=f"{total.item():.4f}", refresh=False)
                    if on_step is not None:
                        on_step(step)
                    end_of_epoch = batch_in_epoch >= steps_per_epoch
                    if end_of_epoch:
                        epoch += 1
                        batch_in_epoch = 0
                    if step % eval_every == 0 or step >= total_steps or end_of_epoch:
                        row: dict[str, Any] = {
                            "step": step, "epoch": epoch, "samples": samples,
                            "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 3),
                        }
                        for k, v in loss_sums.items():
                            row[k] = v / max(loss_count, 1)
                            tb.add_scalar(f"train/{k}", row[k], step)
                        loss_sums, loss_count = {}, 0
                        for k, w in model.loss_weights().items():
                            row[f"weight_{k}"] = w
                            tb.add_scalar(f"weight/{k}", w, step)
                        if eval_data is not None:
                            metrics = evaluate(model, eval_data, tc.eval_batch_size)
                            row.update(metrics)
                            row["monitor"] = monitor_value(metrics, monitor)
                            value = row["monitor"]
                            for k, v in metrics.items():
                                if isinstance(v, float) and not math.isnan(v):
                                    tb.add_scalar(f"eval/{k}", v, step)
                            if _is_better(value, best, mode):
                                best, best_step, bad_evals = value, step, 0
                                checkpoint(ck_dir / "best.pt", resumable=False)
                            else:
                                bad_evals += 1
                            log.info("step %d: %s=%.5f (best %.5f at step %s)", step, monitor,
                                     value, best if best is not None else float("nan"), best_step)
                        history_rows.append(row)
                        write_history()
                        # latest.pt holds optimizer state (3x the weights with Adam), so writing it
                        # at every evaluation can cost more than the evaluation; it is throttled.
                        if time.perf_counter() - latest_at[1] >= tc.checkpoint_interval_s:
                            checkpoint(latest)
                            latest_at = (step, time.perf_counter())
                        tb.flush()
                        if (eval_data is not None and tc.early_stop.patience
                                and bad_evals >= tc.early_stop.patience):
                            stopped_early = True
                            log.info("early stop at step %d: %s has not improved for %d "
                                     "evaluations", step, monitor, bad_evals)
                            break
                    if step >= total_steps:
                        break
                    if end_of_epoch:
                        break
            if stopped_early:
                break
    finally:
        bar.close()
        tb.close()

    if latest_at[0] != step:
        checkpoint(latest)
    if eval_data is None:
        checkpoint(ck_dir / "best.pt", resumable=False)
        best_step = step
    final_metrics: dict[str, float] = {}
    best_ck = load_checkpoint(ck_dir / "best.pt")
    model.load_state_dict(best_ck["model"])
    if eval_data is not None:
        final_metrics = evaluate(model, eval_data, tc.eval_batch_size)
    report = {
        "split": "eval" if eval_data is not None else None,
        "data": cfg.data.eval if eval_data is not None else None,
        "model": cfg.model.name,
        "step": best_step,
        "monitor": monitor,
        "best_metric": best,
        "stopped_early": stopped_early,
        "metrics": final_metrics,
        "version": esmm.__version__,
    }
    (run / "metrics.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return TrainResult(run, step, best_step, best, monitor, final_metrics, stopped_early)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)
