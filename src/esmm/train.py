"""The training loop: optimizers, evaluation, early stopping, checkpoints, logging.

Run directory layout::

    RUN/.lock                  held (fcntl.flock) while a training writes the folder
    RUN/config.yaml            resolved config
    RUN/checkpoints/latest.pt  resumable; at an evaluation (at most once per
                               ``train.checkpoint_interval_s``) and at the end
    RUN/checkpoints/best.pt    the best evaluation so far by the monitored metric (weights only)
    RUN/history.csv            one row per evaluation
    RUN/metrics.json           final metrics of the best checkpoint, with the split they came from
    RUN/tb/                    TensorBoard events

Every file is written atomically (:mod:`esmm.fsio`). A checkpoint carries the config, the
feature spec, the step, the best metric and the package version as plain values, and a SHA-256
of its tensors (:mod:`esmm.checkpoint`); ``latest.pt`` also holds optimizer and data-order
state, so ``resume=True`` continues a killed run to the same result as an uninterrupted one. A
run killed before its first ``latest.pt`` starts again from step 0.

Under ``torchrun`` (:mod:`esmm.distributed`) every rank trains on its share of each global batch
of ``train.batch_size`` rows and applies the same update; rank 0 alone holds the lock and writes
the folder, and ``latest.pt`` records the number of ranks (a resume needs the same number) and
every rank's RNG state.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import esmm
from esmm.allocator import keep_large_buffers
from esmm.checkpoint import (
    checkpoint_entry,
    find_checkpoint,
    load_checkpoint,
    load_model,
    load_weights,
    prepare_run,
    read_history,
    run_lock,
    save_atomic,
    save_checkpoint,
    write_history,
)
from esmm.config import Config, check_data_paths, dump_config, resolve_monitor
from esmm.data.batches import Batch, num_batches, read_ahead
from esmm.data.fit import training_spec
from esmm.data.stream import Split, open_split, split_batches, take_encoded
from esmm.data.tables import EncodedData
from esmm.distributed import DistContext, GradientSync, shard_bounds
from esmm.errors import ConfigError, DataError, EsmmError, UsageError
from esmm.evaluate import evaluate, evaluate_arrays, predict_split
from esmm.features import FeatureSpec
from esmm.fsio import write_text
from esmm.losses import check_gradients, global_batch
from esmm.models import build_model
from esmm.nn.embedding import EmbeddingCollection
from esmm.optim import RowSparseAdam
from esmm.tracking import require_tracking, tracking_run

log = logging.getLogger(__name__)

__all__ = ["Progress", "TrainResult", "Trainer", "build_optimizers", "find_checkpoint",
           "load_checkpoint", "load_model", "monitor_value", "resolve_device", "save_atomic",
           "split_parameters", "train"]


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
    if setting == "on":
        return True
    # auto: a terminal or a notebook, unless esmm's own logger was set above INFO (esmm -q).
    from esmm.api import in_notebook

    quiet = logging.getLogger("esmm").level > logging.INFO
    return not quiet and (sys.stderr.isatty() or in_notebook())


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
          on_step: Callable[[int], None] | None = None,
          on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data.train``, evaluating on ``cfg.data.eval``.

    Args:
        out_dir: the run directory (created; held with a lock file while training, see
            :mod:`esmm.checkpoint`).
        resume: continue from ``out_dir/checkpoints/latest.pt``; the config must match. A run
            stopped before its first ``latest.pt`` starts again from step 0.
        train_data / eval_data: already-opened splits (skips reading ``cfg.data``).
        on_step: called after every optimizer step with the global step.
        on_eval: called at the end of every logging interval with the step and its
            ``history.csv`` row (interval losses; eval metrics and ``monitor`` when data.eval
            is set); an exception it raises ends the run (a pruned trial).
    """
    # A misspelt monitor, a mode against its direction or a missing path fails before any work.
    resolve_monitor(cfg)
    check_data_paths(cfg, [k for k, given in (("train", train_data), ("eval", eval_data))
                           if given is None])
    run = Path(out_dir)
    require_tracking(cfg, run)
    if resume and not run.exists():
        raise UsageError(f"--resume: {run} does not exist; nothing to resume")
    check_precision(cfg.train.precision, resolve_device(cfg.train.device))
    if cfg.model.sharding != "none":
        from esmm.sharding import check_sharding

        check_sharding(cfg)
    ctx = DistContext.from_env(resolve_device(cfg.train.device))
    finished = False
    try:
        with run_lock(run) if ctx.is_main else nullcontext():
            result = _train_locked(cfg, run, resume, train_data, eval_data, on_step, ctx,
                                   on_eval)
        finished = True
        return result
    finally:
        ctx.close(synchronize=finished)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a ``train.precision`` this device cannot train in."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device (train.device={device}): "
                          "gradient scaling for float16 is a GPU path here; use bf16 on the CPU")


def _prepare_ranks(run: Path, resume: bool, cfg: Config, ctx: DistContext
                   ) -> tuple[dict[str, Any] | None, bool]:
    """Rank 0 prepares the folder (:func:`prepare_run`); the others learn the outcome, an
    error included, and load the same ``latest.pt``. Returns (state to resume, restarted)."""
    outcome: tuple[str, Any] = ("ok", None)
    state, restarted = None, False
    if ctx.is_main:
        try:
            state, restarted = prepare_run(run, resume, cfg.to_dict())
            (run / "checkpoints").mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run / "config.yaml")
            outcome = ("ok", (state is not None, restarted))
        except EsmmError as e:
            ctx.broadcast((type(e).__name__, str(e)))
            raise
    outcome = ctx.broadcast(outcome)
    if outcome[0] != "ok":
        error = UsageError if outcome[0] in ("UsageError", "ConfigError") else EsmmError
        raise error(outcome[1])
    if not ctx.is_main:
        has_state, restarted = outcome[1]
        if has_state:
            state = load_checkpoint(run / "checkpoints" / "latest.pt")
    return state, restarted


def _train_locked(cfg: Config, run: Path, resume: bool, train_data: Split | None,
                  eval_data: Split | None, on_step: Callable[[int], None] | None,
                  ctx: DistContext,
                  on_eval: Callable[[int, dict[str, Any]], None] | None = None
                  ) -> TrainResult:
    state, restarted = _prepare_ranks(run, resume, cfg, ctx)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    keep_large_buffers()  # a step's large buffers are reused, not page-faulted anew each step
    torch.manual_seed(tc.seed)
    spec = training_spec(cfg, state, train_data)
    if train_data is None:
        if not cfg.data.train:
            raise ConfigError("data.train is not set: give the training data path in the config "
                              "or with --set data.train=PATH")
        train_data = open_split(cfg.data.train, spec, cfg.data)
    if eval_data is None and cfg.data.eval:
        eval_data = open_split(cfg.data.eval, spec, cfg.data)
    log.info("train rows: %d (dropped %d conversion-without-click)", train_data.n,
             train_data.dropped_conversion_without_click)
    trainer = Trainer(cfg, spec, run, train_data, eval_data, ctx.device, on_step, ctx)
    if state is not None:
        trainer.load_state_dict(state, run / "checkpoints" / "latest.pt")
        log.info("resuming %s at step %d (epoch %d, batch %d)", run, trainer.progress.step,
                 trainer.progress.epoch, trainer.progress.batch_in_epoch)
    if on_eval is not None:
        trainer.eval_hooks.append(on_eval)
    with tracking_run(cfg, run, resume=state is not None) as tracker:
        trainer.eval_hooks.insert(0, tracker.log_evaluation)
        result = trainer.fit(purge_tensorboard=state is not None or restarted)
        tracker.log_result(run)
    return result


@dataclass
class Progress:
    """Where a run stands: what ``latest.pt`` records beside the weights and optimizer state."""

    step: int = 0
    samples: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    elapsed_s: float = 0.0  # training time before this process took over


class Trainer:
    """One model, its optimizers and data, trained step by step into a run folder.

    Read top to bottom: :meth:`step` is one optimizer step on a batch (no host sync: the
    losses are summed on the device); :meth:`end_interval` closes a logging interval (mean
    losses, the finiteness check, evaluation, best and latest checkpoints, history);
    :meth:`fit` runs epochs of steps until the step budget, the epochs or early stopping end
    it; :meth:`state_dict` / :meth:`load_state_dict` are the checkpoint contents.
    """

    def __init__(self, cfg: Config, spec: FeatureSpec, run: Path, train_data: Split,
                 eval_data: Split | None, device: torch.device,
                 on_step: Callable[[int], None] | None = None,
                 ctx: DistContext | None = None) -> None:
        self.cfg, self.tc, self.spec, self.run = cfg, cfg.train, spec, run
        self.train_data, self.eval_data, self.device, self.on_step = (
            train_data, eval_data, device, on_step)
        self.ctx = ctx or DistContext(device=device)
        if cfg.model.sharding == "none":
            self.model = build_model(cfg, spec).to(device)
        else:
            from esmm.sharding import build_sharded_model

            self.model = build_sharded_model(cfg, spec, self.ctx)
        self.opts = build_optimizers(self.model, cfg)
        self.monitor, self.mode = resolve_monitor(cfg)
        world = self.ctx.world
        if train_data.n < world:
            raise DataError(f"{train_data.source}: {train_data.n} training rows cannot be "
                            f"shared among {world} ranks")
        self.steps_per_epoch = num_batches(train_data.n, self.tc.batch_size, world)
        self.sync = GradientSync(self.ctx, *split_parameters(self.model))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.tc.precision)
        self.scaler = (torch.amp.GradScaler(device.type) if self.tc.precision == "fp16"
                       else None)
        if self.ctx.active:
            self._start_ranks()
        total = self.steps_per_epoch * self.tc.epochs
        self.total_steps = min(total, self.tc.max_steps) if self.tc.max_steps else total
        self.eval_every = self.tc.eval_every or self.steps_per_epoch
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        # Called with (step, history row) at the end of every logging interval.
        self.eval_hooks: list[Callable[[int, dict[str, Any]], None]] = []
        # Per-loss sums of the current logging interval, float64 on the device: adding a
        # float32 loss to them is exact as a Python float sum would be, without a sync.
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self._interval_start = 0
        self._t0 = time.perf_counter()
        self._latest_at = (0, self._t0)  # (step, time) of the newest latest.pt
        self._local_samples = 0  # this rank's rows since the interval began (several ranks)

    def _start_ranks(self) -> None:
        """Make the ranks start alike: rank 0's weights everywhere, the same row count, and
        each rank its own random stream (dropout) from then on."""
        self.ctx.check_same("the training rows", self.train_data.n)
        with torch.no_grad():
            for t in self.model.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        if self.ctx.rank:
            torch.manual_seed(self.tc.seed + self.ctx.rank)

    # ------------------------------------------------------------------------- state

    @property
    def ck_dir(self) -> Path:
        return self.run / "checkpoints"

    def elapsed(self) -> float:
        """Training seconds of the run, across resumes."""
        return self.progress.elapsed_s + (time.perf_counter() - self._t0)

    def state_dict(self, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint payload: tensors and plain values only.

        ``resumable`` adds the optimizer and RNG states that ``latest.pt`` needs; ``best.pt``
        holds weights and metadata, about a third of the size with Adam-family optimizers.
        """
        p = self.progress
        extra: dict[str, Any] = {}
        if resumable:
            extra = {"optimizers": [o.state_dict() for o in self.opts],
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": (torch.cuda.get_rng_state(self.device)
                                  if self.device.type == "cuda" else None)}
        return {
            "model": self.model.state_dict(), **extra,
            "config": self.cfg.to_dict(), "feature_spec": self.spec.to_dict(),
            "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch,
            "samples": p.samples, "best_metric": p.best_metric, "best_step": p.best_step,
            "bad_evals": p.bad_evals, "monitor": self.monitor, "version": esmm.__version__,
            "elapsed_s": self.elapsed(), "world_size": self.ctx.world,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        """Continue from a ``latest.pt`` payload (weights, optimizers, RNG, progress)."""
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ctx.world:
            raise UsageError(f"--resume: {source} was written by a run on {saved_world} "
                             f"process(es) and this one has {self.ctx.world}; resume with "
                             f"--nproc {saved_world} (torchrun --nproc-per-node x nodes = "
                             f"{saved_world})")
        load_weights(self.model, checkpoint_entry(state, "model", source), source)
        try:
            for o, s in zip(self.opts, checkpoint_entry(state, "optimizers", source),
                            strict=True):
                o.load_state_dict(s)
        except ValueError as e:
            raise EsmmError(f"--resume: the optimizer state in {source} does not fit this "
                            f"model's parameters ({e}); it was written by esmm "
                            f"{state.get('version', '?')} (this is {esmm.__version__}): resume "
                            "with that version, or start a new run from its weights") from None
        rng = state.get("torch_rng_ranks") or [checkpoint_entry(state, "torch_rng", source)]
        torch.set_rng_state(rng[self.ctx.rank])
        cuda_rng = state.get("cuda_rng_ranks") or [state.get("cuda_rng")]
        if self.device.type == "cuda" and cuda_rng[self.ctx.rank] is not None:
            torch.cuda.set_rng_state(cuda_rng[self.ctx.rank], self.device)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.cfg.model.sharding != "none":
            from esmm.sharding import load_sharded_optimizer

            load_sharded_optimizer(self.model, state.get("sharded_optimizer") or {})
        self.progress = Progress(
            step=state["step"], samples=state.get("samples", 0), epoch=state["epoch"],
            batch_in_epoch=state["batch_in_epoch"], best_metric=state["best_metric"],
            best_step=state["best_step"], bad_evals=state["bad_evals"],
            elapsed_s=state.get("elapsed_s", 0.0))
        self.history = read_history(self.run / "history.csv", self.progress.step)
        self._interval_start = self.progress.step

    def save(self, name: str, resumable: bool = True) -> None:
        """Write a checkpoint (rank 0). With several ranks, a resumable one is a collective
        (every rank's RNG state is gathered into it): all ranks call it together."""
        rngs = None
        if resumable and self.ctx.active:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            rngs = self.ctx.gather((torch.get_rng_state(), cuda))
        sharded: dict[str, Any] = {}
        if self.cfg.model.sharding != "none":
            from esmm.sharding import gather_sharded

            sharded = gather_sharded(self.model, self.ctx.rank, optimizer=resumable)
        if not self.ctx.is_main:
            return
        state = self.state_dict(resumable)
        if sharded:
            state["model"] = {**state["model"], **sharded["model"]}
            if resumable:
                state["sharded_optimizer"] = sharded["optimizer"]
        if rngs is not None:
            state["torch_rng_ranks"] = [r[0] for r in rngs]
            state["cuda_rng_ranks"] = [r[1] for r in rngs]
        if resumable and self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(state, self.ck_dir / name)

    # ------------------------------------------------------------------------- one step

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on ``batch`` (this rank's share of the global batch). Returns
        the total loss, a 0-d tensor (not synced; this rank's share with several ranks)."""
        batch = batch.to(self.device)
        losses = self.losses(batch)
        total = self.model.total_loss(losses)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        self.sync()
        if self.scaler is not None:
            # Unscaled before the step; a step whose gradients overflowed float16 is skipped
            # by the scaler (identically on every rank: the gradients are already summed).
            for o in self.opts:
                self.scaler.unscale_(o)
        elif self.device.type == "cpu":
            # Names a non-finite gradient before it reaches the weights. On the CPU the check
            # is only arithmetic; on an accelerator it would sync every step, so there the
            # interval's loss check catches the divergence instead.
            check_gradients(self.model, self.progress.step + 1)
        for o in self.opts:
            if self.scaler is not None:
                self.scaler.step(o)
            else:
                o.step()
        if self.scaler is not None:
            self.scaler.update()
        for k, v in losses.items():
            d = v.detach().double()
            self._loss_sums[k] = self._loss_sums[k] + d if k in self._loss_sums else d
        self._loss_count += 1
        p = self.progress
        p.step += 1
        if self.ctx.active:
            self._local_samples += batch.size  # summed over the ranks at the interval's end
        else:
            p.samples += batch.size
        p.batch_in_epoch += 1
        return total.detach()

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's float32 losses on a batch on the device: the forward pass under
        autocast (``train.precision``), each loss over the global batch with several ranks."""
        share = global_batch(self.ctx.sum_) if self.ctx.active else nullcontext()
        with share:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.model(batch)
            out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in out.items()}
            return self.model.losses(out, batch)

    # ------------------------------------------------------------------------- an interval

    def mean_losses(self) -> dict[str, float]:
        """Mean losses of the interval (one host sync); a non-finite one is an error."""
        if not self._loss_sums:
            return {}
        names = list(self._loss_sums)
        sums = torch.stack([self._loss_sums[k] for k in names])  # (L,) float64
        if self.ctx.active:
            # The ranks' losses are shares of the global batch's: their sum is its loss.
            sums = self.ctx.sum_(torch.cat([sums, sums.new_tensor([self._local_samples])]))
            self.progress.samples += int(sums[-1].item())
            self._local_samples, sums = 0, sums[:-1]
        means = (sums / self._loss_count).tolist()
        out = dict(zip(names, means, strict=True))
        if not all(math.isfinite(v) for v in means):
            raise EsmmError(f"loss became non-finite between steps {self._interval_start + 1} "
                            f"and {self.progress.step} (interval means {out}); lower "
                            "train.optimizer.lr or check the data")
        self._loss_sums, self._loss_count = {}, 0
        self._interval_start = self.progress.step
        return out

    def evaluate(self) -> dict[str, float]:
        """Metrics of the model on the eval split."""
        if self.eval_data is None:
            raise ConfigError("data.eval is not set: there is no split to evaluate on")
        if self.ctx.active:
            return self._evaluate_ranks(self.eval_data)
        return evaluate(self.model, self.eval_data, self.tc.eval_batch_size)

    def _evaluate_ranks(self, data: Split) -> dict[str, float]:
        """Exact metrics with several ranks: each scores a contiguous share of the eval rows,
        rank 0 computes the metrics on all the scores in row order and every rank gets them."""
        share = _eval_share(data, self.ctx.rank, self.ctx.world)
        preds: dict[str, np.ndarray] = {}
        keep = None
        if share.n:
            preds, labels = predict_split(self.model, share, self.tc.eval_batch_size)
            # In memory every rank holds the labels; a stream's come with the scores.
            if not isinstance(data, EncodedData):
                keep = _label_arrays(labels)
        if self.cfg.model.sharding != "none":
            from esmm.sharding import finish_forwards

            finish_forwards(self.model)  # sharded forwards are collectives: shares differ
        parts = self.ctx.gather((share.n, preds, keep))
        metrics: dict[str, float] | None = None
        if parts is not None:
            parts = [q for q in parts if q[0]]
            full = {k: np.concatenate([q[1][k] for q in parts]) for k in parts[0][1]}
            if isinstance(data, EncodedData):
                metrics = evaluate_arrays(self.model, data, full)
            else:
                metrics = evaluate_arrays(self.model, _join_labels(
                    data.source, [q[2] for q in parts]), full)
        return self.ctx.broadcast(metrics)

    def end_interval(self, tb: Any) -> bool:
        """Log, evaluate and checkpoint at the end of a logging interval.

        Returns:
            whether early stopping ends the run here.
        """
        p = self.progress
        losses = self.mean_losses()  # with several ranks, also the interval's samples
        row: dict[str, Any] = {"step": p.step, "epoch": p.epoch, "samples": p.samples,
                               "elapsed_s": round(self.elapsed(), 3)}
        for k, v in losses.items():
            row[k] = v
            tb.add_scalar(f"train/{k}", v, p.step)
        for k, w in self.model.loss_weights().items():
            row[f"weight_{k}"] = w
            tb.add_scalar(f"weight/{k}", w, p.step)
        if self.eval_data is not None:
            self._evaluate_into(row, tb)
        self.history.append(row)
        if self.ctx.is_main:
            write_history(self.run / "history.csv", self.history)
        # latest.pt holds optimizer state (3x the weights with Adam), so writing it at every
        # evaluation can cost more than the evaluation; it is throttled (rank 0's clock decides
        # for every rank: writing it is a collective).
        due = time.perf_counter() - self._latest_at[1] >= self.tc.checkpoint_interval_s
        if self.ctx.broadcast(due):
            self.save("latest.pt")
            self._latest_at = (p.step, time.perf_counter())
        tb.flush()
        for hook in self.eval_hooks:
            hook(p.step, row)
        patience = self.tc.early_stop.patience
        if self.eval_data is not None and patience and p.bad_evals >= patience:
            log.info("early stop at step %d: %s has not improved for %d evaluations", p.step,
                     self.monitor, p.bad_evals)
            return True
        return False

    def _evaluate_into(self, row: dict[str, Any], tb: Any) -> None:
        p = self.progress
        metrics = self.evaluate()
        row.update(metrics)
        value = row["monitor"] = monitor_value(metrics, self.monitor)
        for k, v in metrics.items():
            if isinstance(v, float) and not math.isnan(v):
                tb.add_scalar(f"eval/{k}", v, p.step)
        if _is_better(value, p.best_metric, self.mode):
            p.best_metric, p.best_step, p.bad_evals = value, p.step, 0
            self.save("best.pt", resumable=False)
        else:
            p.bad_evals += 1
        log.info("step %d: %s=%.5f (best %.5f at step %s)", p.step, self.monitor, value,
                 p.best_metric if p.best_metric is not None else float("nan"), p.best_step)

    # ------------------------------------------------------------------------- the run

    def fit(self, purge_tensorboard: bool = False) -> TrainResult:
        """Train to the end (steps, epochs or early stopping), then score the best checkpoint
        and write ``metrics.json``."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        tc, p = self.tc, self.progress
        total = self.total_steps * tc.batch_size
        bar = tqdm(total=total, initial=min(p.step * tc.batch_size, total), unit="samples",
                   unit_scale=True, desc=f"train {self.cfg.model.name}",
                   disable=not _progress_enabled(tc.progress), dynamic_ncols=True)
        # purge_step hides the events a killed run logged past the step this run starts from.
        tb: Any = _NullWriter()
        if self.ctx.is_main:
            tb = SummaryWriter(str(self.run / "tb"),
                               purge_step=p.step if purge_tensorboard else None)
        self._t0 = time.perf_counter()
        self._latest_at = (p.step, self._t0)
        self.model.train()
        try:
            stopped_early = self._run_epochs(bar, tb)
        finally:
            bar.close()
            tb.close()
        return self._finish(stopped_early)

    def _run_epochs(self, bar: Any, tb: Any) -> bool:
        """Epochs of steps from where the run stands. Returns whether it stopped early."""
        tc, p = self.tc, self.progress
        while p.step < self.total_steps and p.epoch < tc.epochs:
            batches = read_ahead(split_batches(self.train_data, tc.batch_size, shuffle=True,
                                               seed=tc.seed, epoch=p.epoch,
                                               start_batch=p.batch_in_epoch,
                                               block=tc.shuffle_block, rank=self.ctx.rank,
                                               world=self.ctx.world), self.cfg.data.read_ahead)
            with closing(batches):
                for batch in batches:
                    total = self.step(batch)
                    bar.update(batch.size * self.ctx.world)
                    if not bar.disable and p.step % 20 == 0:
                        bar.set_postfix(loss=f"{total.item():.4f}", refresh=False)
                    if self.on_step is not None:
                        self.on_step(p.step)
                    end_of_epoch = p.batch_in_epoch >= self.steps_per_epoch
                    if end_of_epoch:
                        p.epoch += 1
                        p.batch_in_epoch = 0
                    if (p.step % self.eval_every == 0 or p.step >= self.total_steps
                            or end_of_epoch) and self.end_interval(tb):
                        return True
                    if p.step >= self.total_steps or end_of_epoch:
                        break
        return False

    def _finish(self, stopped_early: bool) -> TrainResult:
        """Final checkpoints, the best checkpoint's metrics and ``metrics.json``."""
        p = self.progress
        if self._latest_at[0] != p.step:
            self.save("latest.pt")
        if self.eval_data is None:
            p.best_step = p.step
            self.save("best.pt", resumable=False)
        best_path = self.ck_dir / "best.pt"
        self.ctx.barrier()  # rank 0 has written best.pt
        load_weights(self.model, checkpoint_entry(load_checkpoint(best_path), "model",
                                                  best_path), best_path)
        metrics = self.evaluate() if self.eval_data is not None else {}
        report = {
            "split": "eval" if self.eval_data is not None else None,
            "data": self.cfg.data.eval if self.eval_data is not None else None,
            "model": self.cfg.model.name, "step": p.best_step, "monitor": self.monitor,
            "best_metric": p.best_metric, "stopped_early": stopped_early, "metrics": metrics,
            "version": esmm.__version__,
        }
        if self.ctx.is_main:
            write_text(self.run / "metrics.json",
                       json.dumps(report, indent=2, default=_json_default))
        return TrainResult(self.run, p.step, p.best_step, p.best_metric, self.monitor, metrics,
                           stopped_early)


class _NullWriter:
    """The TensorBoard writer of ranks other than 0: they log nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _eval_share(data: Split, rank: int, world: int) -> Split:
    """Rank ``rank``'s contiguous share of an eval split: rows in memory; whole row groups
    (by their first row) of a stream, so each rank reads only its own."""
    if isinstance(data, EncodedData):
        lo, hi = shard_bounds(data.n, world)[rank:rank + 2]
        return take_encoded(data, np.arange(lo, hi, dtype=np.int64))
    share = copy.copy(data)
    share.units = [u for u in data.units if u.first_kept * world // data.n == rank]
    share.n = sum(u.kept for u in share.units)
    return share


def _label_arrays(labels: EncodedData) -> dict[str, Any]:
    """What exact metrics need of a share of a stream: labels, groups, ground truth."""
    return {"click": labels.click, "conversion": labels.conversion, "groups": labels.groups,
            "ground_truth": labels.ground_truth}


def _join_labels(source: str, parts: list[dict[str, Any]]) -> EncodedData:
    """The labels of a whole split from its shares' (:func:`_label_arrays`), in row order."""
    def cat(key: str) -> np.ndarray | None:
        got = [q[key] for q in parts]
        return None if any(g is None for g in got) else np.concatenate(got)

    out = EncodedData(source=source, n=sum(len(q["click"]) for q in parts),
                      click=cat("click"), conversion=cat("conversion"), groups=cat("groups"))
    out.ground_truth = {k: np.concatenate([q["ground_truth"][k] for q in parts])
                        for k in parts[0]["ground_truth"]}
    return out


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)
