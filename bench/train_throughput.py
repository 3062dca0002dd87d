"""Training throughput and peak memory of esmm's ESMM, against a plain loop and torch-rechub.

Up to five measurements per size, each in a child process of its own (so its peak resident memory,
VmHWM from /proc/self/status, is its own), on the same simulated rows:

(a) ``esmm.train.train`` as a user runs it: the config points at Parquet files written by the
    simulator, ``train()`` reads and encodes them, then trains one epoch (capped by
    ``--steps``) with the progress bar off and no evaluation split. ``load s`` is the time spent
    inside ``open_split`` (read Parquet + encode); every step is timestamped by ``on_step``.
(a') the same with ``data.loader: stream``: Parquet read and encoded chunk by chunk while
    training (``load s`` is then only the label pass and the users table), two-level shuffle.
(b) a plain PyTorch loop over the same model (``build_model``), optimizers (``build_optimizers``),
    malloc settings (:mod:`esmm.allocator`, as ``train()`` applies them) and batches, the
    batches pre-made in memory with ``esmm.data.batches.iter_batches`` before the clock starts;
    the loop is forward, loss, backward, step and nothing else: the ceiling of (a) for this
    model on this machine.
(a'') for the shipped config: (a) on a copy of the training split whose bags are cut to
    the lengths (c) pads to (each field's mean length per impression, rounded up), keeping a
    bag's last ids as rechub's ``pad_sequences`` does: both then train on the same ids, and
    (c) pads short bags without cutting any.
(c) torch-rechub 0.9.0's ESMM and ``MTLTrainer.train_one_epoch`` over its ``DataGenerator``
    loader (``TorchDataset`` + ``DataLoader``, shuffled, no workers), on the same rows, fields,
    vocabulary sizes (ids hashed with esmm's own hash so the tables are identical), embedding
    dim, tower widths, batch size and Adam learning rate. ``load s`` is reading Parquet with
    pandas, joining users, hashing ids and padding bags with ``pad_sequences`` to ``--seq-len``.
    Skipped, with a line in the table, when the ``bench`` extra (torch-rechub) is not installed.

Columns:
    step samples/s: the median, over windows of ``--window`` steps after ``--warmup`` steps, of
        samples per second between step timestamps, with the slowest and fastest window in
        brackets. For (a) and (c) a step includes waiting for its batch (esmm makes batches in
        a read-ahead thread, rechub calls its per-row ``__getitem__`` + collate in the loop);
        for (b) it does not.
    end-to-end samples/s: trained samples / (last step's end - the call that starts training),
        so reading, encoding and model construction are included (not for (b): nothing to load).
    load s: reading and encoding the training rows (for (b) too, though outside its rate);
        setup s: the rest of the time before the first batch is asked for (model, optimizers,
        writers; torch imports its compiler stack on the first optimizer built).
    batching share: the share of step time, after the warm-up, spent waiting for batches.
    A second table splits a step of (b) into its phases (median ms after the warm-up):
    making the batch (``iter_batches``, done before the clock starts), forward with the loss,
    backward (sparse embedding gradients included), optimizer steps.
    peak RSS MiB: the child's VmHWM: data in memory, model, optimizer state, batches.
    a / b and a / c rows: ratios of (a) to (b) and to (c) (above 1: (a) is faster or, for
        memory, larger); for the shipped config the comparison with (c) is a'' / c, and
        ``a(shipped-rows) / a`` is the shipped config's speed with single rows shuffled over
        its speed as shipped (users grouped), at the same thread count.

Sizes (every size at each of ``--threads``, default 1 and 2):
    shipped: ``configs/esmm_sim.yaml`` as a user runs it (the paper's 360-200-80 towers,
        embedding 18, blocks of 64 rows shuffled so a user's impressions stay together, no
        batch norm) on the ``aliccp`` preset, one epoch capped by ``--steps``; (c) keeps its
        towers' batch norm.
    shipped-rows: the same with ``train.shuffle_block: 1`` (single impressions shuffled: every
        impression carries its user's bags into the batch).
    shipped-base: the same config with ``model.name=base`` (two nets, two embedding sets).
    shipped-attention: the same config with the four user behaviour bags pooled by DIN
        target attention (``pooling: attention``, the default unit: MLP 80-40, unnormalised
        weights) instead of mean, each attended with the item field it describes (categories
        109_14 by 206, shops 110_14 by 207, brands 127_14 by 216, intention nodes 150_14 by
        the item 205); (a) only, and ``a / a(shipped)``, its speed and memory over the
        shipped config's (mean pooling) in the same call, when ``shipped`` runs too.
    small: the simulator's ``dense`` preset, single-valued categorical fields only (vocabularies
        cut at 400k), embedding 16, towers 256-128-64 with batch norm, batch 4096, Adam; about
        10M parameters.
    aliccp: the simulator's ``aliccp`` preset (long user behaviour bags) with ``features:
        aliccp`` (every Ali-CCP field, vocabularies summing to about 2M rows) and the demo's
        model and training settings (``esmm.demo.demo_config``), one epoch.
    zoo (only when named in ``--sizes``): the multi-task zoo on the aliccp size's rows, as
        bench/zoo_throughput.py defines it: ESMM (entire-space head) over every backbone
        (``none``, shared-bottom, MMoE, PLE, DBMTL, AITM), embedding 16, towers 128-64,
        batch 2048, Adam, esmm's own training step over batches made while training; and
        torch-rechub 0.9.0's ``MMOE`` and ``PLE`` with the same tables, experts and towers,
        trained by its ``MTLTrainer`` on its ``DataGenerator`` loader, bags padded to their
        mean length. A row per run (step samples/s, peak RSS), and the ratio ``esmm /
        torch-rechub`` for MMoE and PLE; ``load s`` is reading and encoding the rows (for
        rechub, making its inputs from them).
    Every size trains on the demo's number of rows unless ``--rows`` is given.
    torch-rechub's towers always carry batch norm, so (a) and (b) turn it on at the small and
    aliccp sizes (the shipped config runs as is, without).

Evaluation (a second table, ``--eval-rows`` impressions, default 10M, of ``--eval-size``'s
preset, default ``small``, at the last thread count): the model of (a) scores a freshly
simulated test split as ``esmm evaluate`` does, with ``--loader stream`` and ``--loader
memory``, each in its own child: seconds to open the split,
to predict every row, to compute every metric (exact AUC, GAUC, log loss, PCOC per task, from
the sorted scores), rows/s over the whole, and peak RSS. A third table splits each run into
phases: reading Parquet (decoding; a streamed split's label pass and users table), encoding
(hashing ids, labels), batching (gathering rows into batches), forward (the model and its
probabilities), other (copying outputs and keeping labels) and metrics.

Differences that remain, by design of each library: esmm keeps the fields of one embedding
width in one table, which takes sparse gradients and a row-wise SparseAdam (its default),
rechub has a table per field, dense and updated by Adam in full every step; esmm embeds a
user's behaviour bags once per batch, rechub once per impression from arrays padded to a fixed
length, and its ESMM runs the user-side embedding twice per forward.
With ``--device cuda`` every run uses the GPU (``train.device`` for (a) and (a')); CPU
threads still read and batch the data.

Read ``a / b`` as the share of the model's own speed that esmm's training path delivers (data
batching, loss logging, bookkeeping), and ``a / c`` as esmm against a common open-source
implementation on the same work. The machine's load average is printed under the table; on a
shared machine run it twice before trusting a difference of a few percent.

    python bench/train_throughput.py --markdown
    python bench/train_throughput.py --sizes shipped,shipped-rows --rows 100000 --steps 25 \
        --threads 1,2 --eval-rows 0
    python bench/train_throughput.py --sizes small --rows 200000 --steps 60 --eval-rows 0
    python bench/train_throughput.py --sizes aliccp --threads 4 --device cuda
    python bench/train_throughput.py --sizes zoo --rows 100000 --steps 30 --threads 1,2 \
        --eval-rows 0 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

log = logging.getLogger("train_throughput")

RESULT_PREFIX = "RESULT "
RECHUB = "torch_rechub"
RECHUB_DIST = "torch-rechub"
RECHUB_PINNED = "0.9.0"
SMALL_MAX_VOCAB = 400_000
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "esmm_sim.yaml"
SIZE_NAMES = ("small", "aliccp", "shipped", "shipped-rows", "shipped-base",
              "shipped-attention", "zoo")
DEFAULT_SIZES = ("shipped", "shipped-rows", "shipped-base", "small", "aliccp")
# The zoo size: ESMM over every backbone, torch-rechub's MMoE and PLE (bench/zoo_throughput.py
# defines these runs; this script times them like the other sizes).
ZOO_BACKBONES = ("none", "shared_bottom", "mmoe", "ple", "dbmtl", "aitm")
ZOO_RECHUB = ("mmoe", "ple")
ZOO_ESMM = tuple(f"zoo-esmm-{b}" for b in ZOO_BACKBONES)
ZOO_RECHUB_KINDS = tuple(f"zoo-rechub-{b}" for b in ZOO_RECHUB)
KINDS = ("esmm", "stream", "plain", "cut", "rechub", *ZOO_ESMM, *ZOO_RECHUB_KINDS)
# What each size measures: the shipped config's rechub comparison runs on bags cut alike.
SIZE_KINDS = {"small": ("esmm", "stream", "plain", "rechub"),
              "aliccp": ("esmm", "stream", "plain", "rechub"),
              "shipped": ("esmm", "plain", "cut", "rechub"),
              "shipped-rows": ("esmm", "plain"), "shipped-base": ("esmm", "plain"),
              "shipped-attention": ("esmm",),
              "zoo": (*ZOO_ESMM, *ZOO_RECHUB_KINDS)}
# shipped-attention: each user behaviour bag and the item field its ids describe.
ATTENTION_QUERIES = {"109_14": "206", "110_14": "207", "127_14": "216", "150_14": "205"}
LABELS = {"esmm": "(a) esmm.train", "stream": "(a') esmm.train, data.loader=stream",
          "plain": "(b) plain loop", "cut": "(a'') esmm.train, bags cut as (c)'s",
          "rechub": "(c) torch-rechub",
          **{f"zoo-esmm-{b}": f"esmm, backbone {b}" for b in ZOO_BACKBONES},
          **{f"zoo-rechub-{b}": f"torch-rechub {b.upper()}" for b in ZOO_RECHUB}}
EVAL_LOADERS = ("stream", "memory")


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Job:
    """What one child process measures."""

    kind: str  # esmm | plain | rechub
    size: str
    data_dir: str
    run_dir: str
    steps: int | None
    threads: int
    device: str
    warmup: int
    window: int
    seq_len: int  # rechub bag length; 0: the field's mean length per impression, rounded up
    loader: str = "memory"  # data.loader of (a) and of the evaluation runs
    eval_dir: str = ""  # evaluation runs: the split to evaluate
    bag_lengths: dict[str, int] = dataclasses.field(default_factory=dict)  # rechub, per field

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def sim_preset(size: str) -> str:
    """The simulator preset of a size."""
    return "dense" if size == "small" else "aliccp"


def shipped_overrides(size: str) -> list[str]:
    """``--set`` overrides of configs/esmm_sim.yaml for a shipped size: none for ``shipped``
    (the config as is: ESMM, blocks of 64 rows shuffled), single rows shuffled, or BASE."""
    return {"shipped": [], "shipped-rows": ["train.shuffle_block=1"],
            "shipped-base": ["model.name=base"], "shipped-attention": []}[size]


def attention_features() -> list[dict[str, Any]]:
    """The ``aliccp`` preset's fields with the user behaviour bags pooled by attention."""
    from esmm.config import feature_preset

    out = feature_preset("aliccp")
    for f in out:
        if f["name"] in ATTENTION_QUERIES:
            f.update(pooling="attention", query=ATTENTION_QUERIES[f["name"]])
    return out


def default_rows() -> int:
    """Training impressions per size unless --rows says otherwise: the demo's."""
    from esmm.demo import DEMO_ROWS

    return DEMO_ROWS


def small_features() -> list[dict[str, Any]]:
    """Single-valued categorical fields of the simulated data, vocabularies cut at 400k."""
    from esmm.data.simulate import CONTEXT_FIELD, PROFILE_CARDINALITY, get_preset

    sim = get_preset(sim_preset("small"))
    cardinality = {"101": sim.n_users, **PROFILE_CARDINALITY, "205": sim.n_items,
                   "206": sim.n_categories, "207": sim.n_shops, "216": sim.n_brands,
                   CONTEXT_FIELD: sim.n_contexts}
    return [{"name": name, "kind": "categorical", "buckets": min(n, SMALL_MAX_VOCAB)}
            for name, n in cardinality.items()]


def config_tree(size: str, data_dir: Path, steps: int | None, threads: int,
                loader: str = "memory", device: str = "cpu") -> dict[str, Any]:
    """The esmm training config of a size: one epoch, no evaluation, progress bar off."""
    tree = _config_tree(size, data_dir, steps, threads)
    tree["data"]["loader"] = loader
    tree["train"]["device"] = device
    return tree


def _config_tree(size: str, data_dir: Path, steps: int | None, threads: int) -> dict[str, Any]:
    from esmm.demo import demo_config

    train = {"epochs": 1, "max_steps": steps, "num_threads": threads, "progress": "off",
             "seed": 0}
    if size.startswith("shipped"):
        import yaml

        from esmm.config import apply_overrides

        tree = apply_overrides(yaml.safe_load(SHIPPED_CONFIG.read_text()),
                               shipped_overrides(size))
        tree["data"] = {**{k: v for k, v in tree["data"].items() if k not in ("eval", "test")},
                        "train": str(data_dir / "train")}
        tree["train"] = {**tree["train"], **train}
        tree["train"].pop("early_stop", None)
        if size == "shipped-attention":
            tree["features"] = attention_features()
        return tree
    if size == "small":
        return {
            "data": {"train": str(data_dir / "train"), "user_column": "101"},
            "features": small_features(),
            "model": {"name": "esmm", "tower": [256, 128, 64], "embedding_dim": 16,
                      "batch_norm": True},
            "train": {"batch_size": 4096, "optimizer": {"name": "adam", "lr": 0.001}, **train},
        }
    tree = demo_config(data_dir)
    tree["data"] = {k: v for k, v in tree["data"].items() if k not in ("eval", "test")}
    tree["model"]["batch_norm"] = True
    keep = ("batch_size", "optimizer", "shuffle_block")
    tree["train"] = {**{k: v for k, v in tree["train"].items() if k in keep}, **train}
    return tree


def load_config(job: Job) -> Any:
    from esmm.config import config_from_dict

    tree = config_tree(job.size, Path(job.data_dir), job.steps, job.threads, job.loader,
                       job.device)
    return config_from_dict(tree, f"train_throughput {job.size}")


# ----------------------------------------------------------------------------- timing helpers


def peak_rss_mib() -> float | None:
    """This process's peak resident set size (VmHWM), MiB."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    m = re.search(r"VmHWM:\s*(\d+)\s*kB", status.read_text())
    return int(m.group(1)) / 1024 if m else None


def window_rates(stamps: list[float], samples: list[int], warmup: int, window: int
                 ) -> list[float]:
    """Samples/s over consecutive windows of ``window`` steps after ``warmup`` steps.

    ``stamps[i]`` is the end of step i + 1 and ``samples[i]`` its batch size. The first window
    starts at the end of the last warm-up step; a trailing partial window is dropped unless it
    is the only one.
    """
    n = len(stamps)
    if n < 2:
        return []
    warmup = max(1, min(warmup, n - 1))
    start = warmup - 1
    rates = []
    while start + window < n:
        end = start + window
        rates.append(sum(samples[start + 1:end + 1]) / (stamps[end] - stamps[start]))
        start = end
    if not rates:
        rates.append(sum(samples[start + 1:]) / (stamps[-1] - stamps[start]))
    return rates


def summarize(stamps: list[float], samples: list[int], job: Job, *,
              t_call: float | None = None, t_loop: float | None = None,
              fetch_s: list[float] | None = None) -> dict[str, Any]:
    """Rates from step timestamps (see :func:`window_rates`).

    ``t_call``: when the run was started (end-to-end rate); ``t_loop``: when the first batch
    was asked for (setup time); ``fetch_s[i]``: seconds spent making the batch of step i + 1,
    summed after the warm-up into the share of step time that goes to batching.
    """
    rates = window_rates(stamps, samples, job.warmup, job.window)
    out: dict[str, Any] = {"steps": len(stamps), "samples": sum(samples),
                           "windows": len(rates)}
    if rates:
        out.update(step_rate=statistics.median(rates), step_rate_min=min(rates),
                   step_rate_max=max(rates))
    if t_call is not None and stamps:
        out["end_to_end_rate"] = sum(samples) / (stamps[-1] - t_call)
    if t_call is not None and t_loop is not None:
        out["to_loop_s"] = t_loop - t_call
    warm = max(1, min(job.warmup, len(stamps) - 1))
    if fetch_s and len(stamps) > warm:
        out["batching_share"] = sum(fetch_s[warm:]) / (stamps[-1] - stamps[warm - 1])
    return out


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (a) esmm.train


def measure_esmm(job: Job) -> dict[str, Any]:
    """esmm.train.train on Parquet, with load_split timed and every step timestamped."""
    import esmm.train as esmm_train
    from esmm.data.batches import num_batches
    from esmm.features import spec_from_config
    from esmm.models import build_model

    set_threads(job.threads)
    cfg = load_config(job)
    loaded: dict[str, Any] = {"seconds": 0.0}
    real_open_split = esmm_train.open_split

    def timed_open_split(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        data = real_open_split(*args, **kwargs)
        loaded["seconds"] += time.perf_counter() - t
        loaded["rows"] = data.n
        return data

    real_read_ahead = esmm_train.read_ahead
    loop_start: list[float] = []
    fetch_s: list[float] = []

    def timed_read_ahead(*args: Any, **kwargs: Any) -> Iterator[Any]:
        # The time the training loop waits for its next batch (made in the background thread).
        batches = real_read_ahead(*args, **kwargs)
        try:
            while True:
                t = time.perf_counter()
                if not loop_start:
                    loop_start.append(t)
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                fetch_s.append(time.perf_counter() - t)
                yield batch
        finally:
            batches.close()

    # Wrapped in this child only (src/ is untouched): they time, and change nothing else.
    esmm_train.open_split = timed_open_split
    esmm_train.read_ahead = timed_read_ahead
    stamps: list[float] = []
    t_call = time.perf_counter()
    esmm_train.train(cfg, job.run_dir, on_step=lambda step: stamps.append(time.perf_counter()))
    t_return = time.perf_counter()
    peak = peak_rss_mib()

    n, bs = loaded["rows"], cfg.train.batch_size
    assert len(stamps) <= num_batches(n, bs)
    samples = [min(bs, n - i * bs) for i in range(len(stamps))]
    model = build_model(cfg, spec_from_config(cfg))
    return {**summarize(stamps, samples, job, t_call=t_call, t_loop=loop_start[0],
                        fetch_s=fetch_s),
            "load_s": loaded["seconds"], "rows": n, "after_last_step_s": t_return - stamps[-1],
            "peak_rss_mib": peak, "params": sum(p.numel() for p in model.parameters()),
            "device": cfg.train.device, "loader": cfg.data.loader}


# ----------------------------------------------------------------------------- (b) plain loop


def measure_plain(job: Job) -> dict[str, Any]:
    """forward / loss / backward / step over batches made in memory beforehand, each phase
    timed (``phases_ms``: the median over the steps after the warm-up, ms; ``batch`` is the
    time ``iter_batches`` took to make one batch, outside the loop)."""
    import torch

    from esmm.allocator import keep_large_buffers
    from esmm.data.batches import iter_batches
    from esmm.data.tables import load_split
    from esmm.features import spec_from_config
    from esmm.models import build_model
    from esmm.train import build_optimizers

    set_threads(job.threads)
    keep_large_buffers()  # the malloc settings esmm.train uses: (b) stays (a)'s ceiling
    cfg = load_config(job)
    tc = cfg.train
    spec = spec_from_config(cfg)
    t = time.perf_counter()
    data = load_split(cfg.data.train, spec, cfg.data)
    load_s = time.perf_counter() - t
    rows = data.n
    batches, make_s = [], []
    made = iter_batches(data, tc.batch_size, shuffle=True, seed=tc.seed, block=tc.shuffle_block)
    while not job.steps or len(batches) < job.steps:
        t = time.perf_counter()
        b = next(made, None)
        if b is None:
            break
        make_s.append(time.perf_counter() - t)
        batches.append(b.to(job.device))
    del data, made
    log.info("%d batches made in memory", len(batches))
    torch.manual_seed(tc.seed)
    model = build_model(cfg, spec).to(job.device)
    opts = build_optimizers(model, cfg)
    model.train()
    stamps, phases = plain_loop(model, opts, batches, job.device)
    warm = max(1, min(job.warmup, len(batches) - 1))
    phases["batch"] = make_s
    return {**summarize(stamps, [b.size for b in batches], job), "load_s": load_s,
            "rows": rows, "peak_rss_mib": peak_rss_mib(),
            "phases_ms": {k: 1000 * statistics.median(v[warm:] or v) for k, v in phases.items()},
            "params": sum(p.numel() for p in model.parameters()), "device": job.device}


def plain_loop(model: Any, opts: list[Any], batches: list[Any], device: str
               ) -> tuple[list[float], dict[str, list[float]]]:
    """Train on ``batches``: each step's end time, and per phase the seconds of each step."""
    stamps: list[float] = []
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for b in batches:
        t0 = time.perf_counter()
        out = model(b)
        loss = sum(model.losses(out, b).values())
        sync(device)
        t1 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        for o in opts:
            o.step()
        sync(device)
        stamps.append(time.perf_counter())
        phases["forward"].append(t1 - t0)
        phases["backward"].append(t2 - t1)
        phases["step"].append(stamps[-1] - t2)
    return stamps, phases


# ----------------------------------------------------------------------------- (c) torch-rechub


class TimedLoader:
    """Wraps a DataLoader: stops after ``cap`` batches and timestamps each request for the next
    batch, which the trainer makes once the previous step (and its loss logging) is done."""

    def __init__(self, loader: Any, cap: int | None, device: str) -> None:
        self.loader = loader
        self.cap = cap
        self.device = device
        self.stamps: list[float] = []
        self.samples: list[int] = []
        self.fetch_s: list[float] = []
        self.started: float | None = None

    def __len__(self) -> int:
        return min(len(self.loader), self.cap) if self.cap else len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.started = time.perf_counter()
        batches = iter(self.loader)
        while True:
            if self.samples:  # the trainer is done with the previous batch
                sync(self.device)
                self.stamps.append(time.perf_counter())
            if self.cap and len(self.samples) >= self.cap:
                return
            t = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                return
            self.fetch_s.append(time.perf_counter() - t)
            self.samples.append(int(y.shape[0]))
            yield x, y


def rechub_inputs(cfg: Any, seq_len: int, bag_lengths: dict[str, int] | None = None
                  ) -> tuple[dict[str, Any], Any, dict[str, int]]:
    """Rows of ``cfg.data.train`` as rechub inputs: {field: ids (N,) or padded (N, L)}, labels
    (N, 3) = (conversion, click, click * conversion), and the padded length of each bag field.

    Ids are hashed with esmm's hash into the same buckets as esmm's tables; bag ids are shifted
    by one so that 0 is rechub's padding index.
    """
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    from torch_rechub.utils.data import pad_sequences

    from esmm.features import hash_int_ids

    path = Path(cfg.data.train)
    key = cfg.data.user_key
    feats = {f.name: f for f in cfg.features}
    imp_cols = pq.read_schema(path / "impressions.parquet").names
    on_imp = [n for n in feats if n in imp_cols]
    on_user = [n for n in feats if n not in imp_cols]
    labels = [cfg.data.labels.click, cfg.data.labels.conversion]
    imp = pd.read_parquet(path / "impressions.parquet", columns=[key, *on_imp, *labels])
    users = pd.read_parquet(path / "users.parquet", columns=[key, *on_user])
    click = imp[labels[0]].to_numpy()
    conv = imp[labels[1]].to_numpy()
    imp = imp[~((conv == 1) & (click == 0))].reset_index(drop=True)
    users["_user_row"] = np.arange(len(users))
    df = imp.merge(users[[key, "_user_row", *(n for n in on_user
                                               if feats[n].kind == "categorical")]],
                   on=key, how="left", validate="many_to_one")
    x: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for name, f in feats.items():
        if f.kind == "categorical":
            x[name] = hash_int_ids(df[name].to_numpy(), name, f.buckets)
            continue
        lists = (users if name in on_user else df)[name].to_numpy()
        sizes = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
        flat = np.concatenate(lists).astype(np.int64) if sizes.sum() else sizes[:0]
        bags = np.split(hash_int_ids(flat, name, f.buckets) + 1, np.cumsum(sizes)[:-1])
        rows = df["_user_row"].to_numpy() if name in on_user else np.arange(len(df))
        per_impression = sizes[rows]
        lengths[name] = ((bag_lengths or {}).get(name) or seq_len
                         or mean_length(per_impression))
        padded = pad_sequences(bags, maxlen=lengths[name], value=0)
        x[name] = padded[rows]
    click = df[labels[0]].to_numpy().astype(np.float32)
    conv = df[labels[1]].to_numpy().astype(np.float32)
    y = np.stack([conv, click, click * conv], axis=1)
    return x, y, lengths


def mean_length(per_impression: Any) -> int:
    """A bag field's padded length by default: its mean length per impression, rounded up."""
    return max(1, math.ceil(float(per_impression.mean())))


def bag_lengths_of(train_dir: Path) -> dict[str, int]:
    """:func:`mean_length` of every list column of a normalized split (impressions.parquet
    joined to users.parquet by ``common_key``), as :func:`rechub_inputs` computes it."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    imp = pq.read_table(train_dir / "impressions.parquet")
    users = pq.read_table(train_dir / "users.parquet")
    row = pc.index_in(imp.column("common_key"), value_set=users.column("common_key"))
    row = row.to_numpy(zero_copy_only=False)
    out = {}
    for table, rows in ((users, row), (imp, None)):
        for name in table.column_names:
            col = table.column(name)
            if not str(col.type).startswith("list"):
                continue
            lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            out[name] = mean_length(lens[rows] if rows is not None else lens)
    return out


def cut_bags(src: Path, dst: Path, lengths: dict[str, int]) -> None:
    """Copy the normalized split ``src`` to ``dst`` with every bag of a field in ``lengths``
    cut to its last ``lengths[field]`` ids: what torch-rechub's ``pad_sequences`` (truncating
    ``pre``) keeps, so (a'') and (c) train on the same ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from esmm.fsio import atomic_path

    dst.mkdir(parents=True, exist_ok=True)
    for part in ("impressions.parquet", "users.parquet"):
        table = pq.read_table(src / part)
        for name in table.column_names:
            if name not in lengths:
                continue
            col = table.column(name).combine_chunks()
            offsets = col.offsets.to_numpy()
            ends = offsets[1:]
            starts = np.maximum(offsets[:-1], ends - lengths[name])
            new_off = np.zeros(len(col) + 1, dtype=np.int64)
            np.cumsum(ends - starts, out=new_off[1:])
            taken = np.repeat(starts - new_off[:-1], ends - starts) + np.arange(new_off[-1])
            cut = pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)),
                                           col.values.take(pa.array(taken)),
                                           mask=col.is_null())
            table = table.set_column(table.column_names.index(name), name, cut)
        with atomic_path(dst / part) as tmp:
            pq.write_table(table, tmp)


def measure_rechub(job: Job) -> dict[str, Any]:
    """torch-rechub's ESMM trained by its MTLTrainer on its DataGenerator loader."""
    import torch
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import ESMM
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    from esmm.config import ALICCP_USER_BAGS, ALICCP_USER_FIELDS

    set_threads(job.threads)
    cfg = load_config(job)
    tc, mc = cfg.train, cfg.model
    t_call = time.perf_counter()
    x, y, lengths = rechub_inputs(cfg, job.seq_len, job.bag_lengths)
    loader = DataGenerator(x, y).generate_dataloader(
        x_val=x, y_val=y, x_test=x, y_test=y, batch_size=tc.batch_size)[0]
    load_s = time.perf_counter() - t_call
    log.info("rechub bag lengths (padded): %s", lengths)

    user_side = set(ALICCP_USER_FIELDS) | set(ALICCP_USER_BAGS)
    user_features, item_features = [], []
    for f in cfg.features:
        dim = f.dim or mc.embedding_dim
        feat: Any
        if f.kind == "multi_categorical":
            feat = SequenceFeature(f.name, vocab_size=f.buckets + 1, embed_dim=dim,
                                   pooling=f.pooling, padding_idx=0)
        else:
            feat = SparseFeature(f.name, vocab_size=f.buckets, embed_dim=dim)
        (user_features if f.name in user_side else item_features).append(feat)
    torch.manual_seed(tc.seed)
    tower = {"dims": list(mc.tower), "activation": mc.activation, "dropout": mc.dropout}
    model = ESMM(user_features, item_features, cvr_params=dict(tower), ctr_params=dict(tower))
    oc = tc.optimizer
    trainer = MTLTrainer(model, task_types=["classification"] * 3, optimizer_fn=torch.optim.Adam,
                         optimizer_params={"lr": oc.lr, "betas": oc.betas, "eps": oc.eps,
                                           "weight_decay": oc.weight_decay},
                         n_epoch=1, device=job.device, model_path=job.run_dir)
    timed = TimedLoader(loader, job.steps, job.device)
    # The trainer prints its losses and draws a tqdm bar; keep them off this process's output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.train_one_epoch(timed)
    return {**summarize(timed.stamps, timed.samples, job, t_call=t_call, t_loop=timed.started,
                        fetch_s=timed.fetch_s),
            "load_s": load_s,
            "rows": len(y), "peak_rss_mib": peak_rss_mib(), "seq_len": lengths,
            "params": sum(p.numel() for p in model.parameters()), "device": job.device}


# ----------------------------------------------------------------------------- evaluation


def measure_eval(job: Job) -> dict[str, Any]:
    """``esmm evaluate``'s path on ``job.eval_dir`` with ``job.loader``: open, predict, metrics,
    with the time of each phase (``phases_s``, see :func:`timed_eval_phases`)."""
    import esmm.evaluate as ev
    from esmm.data.stream import open_split
    from esmm.train import load_model

    set_threads(job.threads)
    model, cfg, spec, _ = load_model(job.run_dir)
    model.to(job.device)
    phases = timed_eval_phases(model)
    t0 = time.perf_counter()
    split = open_split(job.eval_dir, spec, cfg.data, loader=job.loader)
    t1 = time.perf_counter()
    chunks_at_open = phases["chunks"]
    preds, labels = ev.predict_split(model, split, cfg.train.eval_batch_size)
    t2 = time.perf_counter()
    metrics = ev.evaluate_arrays(model, labels, preds)
    t3 = time.perf_counter()
    # Reading is what opening and chunking took beyond encoding (Parquet decoding, a streamed
    # split's label pass and users table); "other" is the rest of predict_split (copying the
    # outputs and the labels kept for the metrics).
    chunks = phases.pop("chunks") - chunks_at_open
    phases["read"] = (t1 - t0) + chunks - phases["encode"]
    phases["other"] = (t2 - t1) - chunks - phases["batching"] - phases["forward"]
    phases["metrics"] = t3 - t2
    return {"rows": labels.n, "open_s": t1 - t0, "predict_s": t2 - t1, "metrics_s": t3 - t2,
            "total_s": t3 - t0, "rate": labels.n / (t3 - t0), "peak_rss_mib": peak_rss_mib(),
            "phases_s": phases,
            "metrics": {k: metrics[k] for k in ("ctr_auc", "ctr_gauc", "cvr_auc", "ctcvr_auc",
                                                "cvr_auc_entire_space") if k in metrics},
            "n_metrics": len(metrics)}


def measure_zoo(job: Job) -> dict[str, Any]:
    """A zoo run (``zoo-esmm-<backbone>`` or ``zoo-rechub-<backbone>``): the training loop of
    bench/zoo_throughput.py on the aliccp rows, timed like the other runs."""
    import zoo_throughput  # beside this file, which runs as a script: bench/ is on the path

    set_threads(job.threads)
    library, backbone = job.kind.split("-", 2)[1:]
    steps = zoo_throughput.rechub_steps if library == "rechub" else zoo_throughput.esmm_steps
    t_call = time.perf_counter()
    r = steps(Path(job.data_dir), backbone, zoo_throughput.BATCH, job.steps, job.device)
    return {**summarize(r["stamps"], r["samples"], job, t_call=t_call, t_loop=r["start"]),
            "load_s": r["load_s"], "rows": r["rows"], "params": r["params"],
            "peak_rss_mib": peak_rss_mib(), "device": job.device}


def timed_eval_phases(model: Any) -> dict[str, float]:
    """Seconds spent, from now on in this child, encoding (``encode``: hashing ids, labels),
    reading and encoding chunks of a streamed split (``chunks``), making batches
    (``make_batch``, and the concatenation of a stream's chunks) and in the model's forward
    pass with its probabilities (``forward``). Wraps those functions; changes nothing else."""
    import esmm.data.batches as batches_mod
    import esmm.data.stream as stream_mod
    import esmm.data.tables as tables_mod

    spent = {"encode": 0.0, "chunks": 0.0, "batching": 0.0, "forward": 0.0}

    def timer(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        return timed

    def timed_chunks(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        it = real_chunks(self, *args, **kwargs)
        while True:
            t = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                return
            finally:
                spent["chunks"] += time.perf_counter() - t
            yield chunk

    real_chunks = stream_mod.ParquetStream.chunks
    stream_mod.ParquetStream.chunks = timed_chunks
    for mod in (tables_mod, stream_mod):
        mod.encode = timer(mod.encode, "encode")
    for mod in (batches_mod, stream_mod):
        mod.make_batch = timer(mod.make_batch, "batching")
    stream_mod.concat_encoded = timer(stream_mod.concat_encoded, "batching")
    model.forward = timer(model.forward, "forward")
    model.predict = timer(model.predict, "forward")
    return spent


MEASURES: dict[str, Callable[[Job], dict[str, Any]]] = {
    "esmm": measure_esmm, "stream": measure_esmm, "cut": measure_esmm, "plain": measure_plain,
    "rechub": measure_rechub, "eval": measure_eval,
    **{kind: measure_zoo for kind in (*ZOO_ESMM, *ZOO_RECHUB_KINDS)},
}


def child_main(job_json: str) -> None:
    job = Job.from_json(job_json)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {job.size}/{job.kind} %(name)s: %(message)s")
    result = MEASURES[job.kind](job)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def rechub_status() -> str | None:
    """None when torch-rechub can be measured, else why not."""
    if util.find_spec(RECHUB) is None:
        return (f"skipped: torch-rechub is not installed (the `bench` extra: pip install "
                f"{RECHUB_DIST}=={RECHUB_PINNED} --no-deps)")
    return None


def rechub_label() -> str:
    try:
        version = metadata.version(RECHUB_DIST)
    except metadata.PackageNotFoundError:
        return LABELS["rechub"]
    suffix = "" if version == RECHUB_PINNED else f" (not the pinned {RECHUB_PINNED})"
    return f"(c) torch-rechub {version}{suffix}"


def data_key(size: str) -> str:
    """The folder of a size's data: the shipped sizes share theirs, zoo uses aliccp's."""
    if size == "zoo":
        return "aliccp"
    return "shipped" if size.startswith("shipped") else size


def simulate(size: str, rows: int, work: Path, split: str = "train") -> Path:
    """Write ``rows`` simulated impressions of the size's preset: the training split to
    ``work/<data_key>/data`` (returned), another split to ``work/<data_key>/eval-data/<split>``
    (that folder returned)."""
    from esmm.data.simulate import get_preset, write_simulation
    from esmm.demo import SIM_SEED

    data_dir = work / data_key(size) / ("data" if split == "train" else "eval-data")
    meta = data_dir / "simulation.json"
    want = {"preset": sim_preset(size), "rows": {split: rows}, "seed": SIM_SEED}
    if meta.is_file():
        got = json.loads(meta.read_text())
        if all(got.get(k) == v for k, v in want.items()):
            log.info("%s: reusing %s", size, data_dir)
            return data_dir if split == "train" else data_dir / split
    shutil.rmtree(data_dir, ignore_errors=True)
    log.info("%s: simulating %d impressions (preset %s)", size, rows, sim_preset(size))
    write_simulation(data_dir, get_preset(sim_preset(size)), {split: rows}, SIM_SEED)
    return data_dir if split == "train" else data_dir / split


def run_child(job: Job) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its result or {"error": ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads),
           "MKL_NUM_THREADS": str(job.threads)}
    log.info("%s: measuring %s", job.size, LABELS.get(job.kind, f"evaluate, {job.loader}"))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           job.to_json()], stdout=subprocess.PIPE, text=True, env=env,
                          check=False)
    results = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        log.error("%s/%s failed with exit status %d", job.size, job.kind, proc.returncode)
        return {"error": f"failed (exit status {proc.returncode}; see the log above)"}
    log.info("%s: %s done in %.0f s", job.size, job.kind, time.perf_counter() - t)
    return json.loads(results[-1])


def fmt_rate(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:,.0f}" if key in r else "n/a"


def fmt_step(r: dict[str, Any]) -> str:
    if "step_rate" not in r:
        return "n/a"
    return f"{r['step_rate']:,.0f} [{r['step_rate_min']:,.0f}-{r['step_rate_max']:,.0f}]"


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    if key in a and key in b and a[key] and b[key]:
        return f"{a[key] / b[key]:.2f}"
    return "n/a"


COLUMNS = ("size", "threads", "run", "device", "params", "rows", "steps", "load s", "setup s",
           "end-to-end samples/s", "step samples/s median [min-max]", "batching share",
           "peak RSS MiB")
# Ratio rows: (numerator kind, denominator kind, name).
RATIOS = (("esmm", "plain", "a / b"), ("stream", "plain", "a' / b"),
          ("esmm", "rechub", "a / c"), ("stream", "rechub", "a' / c"),
          ("cut", "rechub", "a'' / c"),
          *((f"zoo-esmm-{b}", f"zoo-rechub-{b}", f"esmm / torch-rechub, {b}")
            for b in ZOO_RECHUB))


def table_rows(size: str, threads: int, results: dict[str, dict[str, Any]],
               labels: dict[str, str]) -> list[list[str]]:
    rows = []
    for kind in SIZE_KINDS[size]:
        r = results[kind]
        if "error" in r or "skipped" in r:
            why = r.get("error") or r["skipped"]
            rows.append([size, str(threads), labels[kind], *[""] * 6, why, *[""] * 3])
            continue
        e2e = fmt_rate(r, "end_to_end_rate") if kind != "plain" else "-"
        setup = f"{r['to_loop_s'] - r['load_s']:.1f}" if "to_loop_s" in r else "-"
        share = f"{r['batching_share']:.0%}" if "batching_share" in r else "-"
        rss = f"{r['peak_rss_mib']:,.0f}" if r.get("peak_rss_mib") else "n/a"
        rows.append([size, str(threads), labels[kind], r["device"],
                     f"{r['params'] / 1e6:.1f}M", f"{r['rows']:,}",
                     f"{r['steps']} ({r['windows']} windows)", f"{r['load_s']:.1f}", setup, e2e,
                     fmt_step(r), share, rss])
    for mine, other, name in RATIOS:
        if mine not in results or other not in results:
            continue
        if mine == "esmm" and other == "rechub" and "cut" in results:
            continue  # the rechub comparison of this size is the one on cut bags
        a, o = results[mine], results[other]
        e2e = ratio(a, o, "end_to_end_rate") if "rechub" in other else "-"
        rows.append([size, str(threads), name, *[""] * 6, e2e, ratio(a, o, "step_rate"), "",
                     ratio(a, o, "peak_rss_mib")])
    return rows


def grouping_rows(threads: int, details: dict[str, dict[str, Any]]) -> list[list[str]]:
    """(a) of the shipped config with single rows shuffled over (a) as shipped, when both ran."""
    a, r = details.get("shipped", {}).get("esmm"), details.get("shipped-rows", {}).get("esmm")
    if not a or not r:
        return []
    return [["shipped-rows", str(threads), "a(shipped-rows) / a", *[""] * 6,
             ratio(r, a, "end_to_end_rate"), ratio(r, a, "step_rate"), "",
             ratio(r, a, "peak_rss_mib")]]


def attention_rows(threads: int, details: dict[str, dict[str, Any]]) -> list[list[str]]:
    """(a) with the behaviour bags attended over (a) of the shipped config (mean pooling)."""
    a = details.get("shipped-attention", {}).get("esmm")
    m = details.get("shipped", {}).get("esmm")
    if not a or not m:
        return []
    return [["shipped-attention", str(threads), "a / a(shipped)", *[""] * 6,
             ratio(a, m, "end_to_end_rate"), ratio(a, m, "step_rate"), "",
             ratio(a, m, "peak_rss_mib")]]


PHASE_COLUMNS = ("size", "threads", "batch ms", "forward + loss ms", "backward ms",
                 "optimizer step ms", "step ms (forward to step)")


def phase_rows(size: str, threads: int, results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Where a step of (b) goes, median ms per phase (batching is done before the loop)."""
    ph = results.get("plain", {}).get("phases_ms")
    if not ph:
        return []
    step = ph["forward"] + ph["backward"] + ph["step"]
    return [[size, str(threads), f"{ph['batch']:.1f}", f"{ph['forward']:.1f}",
             f"{ph['backward']:.1f}", f"{ph['step']:.1f}", f"{step:.1f}"]]


EVAL_COLUMNS = ("size", "loader", "rows", "open s", "predict s", "AUC + GAUC s", "total s",
                "rows/s", "peak RSS MiB", "metrics")


def eval_rows(size: str, results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for loader, r in results.items():
        if "error" in r:
            rows.append([size, loader, *[""] * 6, r["error"], ""])
            continue
        m = r["metrics"]
        rows.append([size, loader, f"{r['rows']:,}", f"{r['open_s']:.1f}", f"{r['predict_s']:.1f}",
                     f"{r['metrics_s']:.1f}", f"{r['total_s']:.1f}", f"{r['rate']:,.0f}",
                     f"{r['peak_rss_mib']:,.0f}" if r.get("peak_rss_mib") else "n/a",
                     f"{r['n_metrics']} (ctr_auc {m.get('ctr_auc', float('nan')):.4f})"])
    return rows


EVAL_PHASES = ("read", "encode", "batching", "forward", "other", "metrics")
EVAL_PHASE_COLUMNS = ("loader", *(f"{p} s" for p in EVAL_PHASES), "total s")


def eval_phase_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Where each evaluation run's seconds went (:func:`measure_eval`'s ``phases_s``)."""
    return [[loader, *(f"{r['phases_s'][p]:.1f}" for p in EVAL_PHASES), f"{r['total_s']:.1f}"]
            for loader, r in results.items() if "phases_s" in r]


def render(rows: list[list[str]], markdown: bool, columns: tuple[str, ...] = COLUMNS) -> str:
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, width, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, width, strict=True)) for r in rows]
    return "\n".join(lines)


def crowding(load: float, threads: int) -> str | None:
    """A warning when other work already keeps CPUs busy that the torch threads would need:
    a thread descheduled inside a parallel region stalls the others at every barrier, and
    steps can slow down by orders of magnitude, not by the share of CPU lost."""
    cpus = len(os.sched_getaffinity(0))
    if threads > 1 and load + threads > cpus + 0.5:
        return (f"Load average {load:.2f} before the run on {cpus} CPUs with {threads} torch "
                "threads: the CPUs are shared, rates may collapse; compare with --threads 1.")
    return None


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        m = re.search(r"model name\s*:\s*(.+)", info.read_text())
        if m:
            return m.group(1).strip()
    return "unknown CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                    help=f"comma-separated, of {', '.join(SIZE_NAMES)}")
    ap.add_argument("--rows", type=int, default=None,
                    help="simulated training impressions per size (default: the demo's)")
    ap.add_argument("--steps", type=int, default=None,
                    help="at most this many training steps per run (default: one epoch)")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated torch intra-op thread counts; every size is measured "
                    "at each (the evaluation at the last)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="device of every run (esmm.train through train.device)")
    ap.add_argument("--eval-rows", type=int, default=10_000_000,
                    help="impressions of the evaluation measurement (0: skip it); it scores "
                    "them with the --eval-size (a) model, streamed and in memory")
    ap.add_argument("--eval-size", default="small",
                    choices=[s for s in SIZE_NAMES if "esmm" in SIZE_KINDS[s]],
                    help="the size whose model and preset the evaluation uses")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every kind, interleaved (a, b, ..., a, b, ...); the run with "
                    "the median step rate is shown (on a shared machine two runs a minute "
                    "apart can differ by a fifth)")
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    ap.add_argument("--window", type=int, default=10, help="steps per timed window")
    ap.add_argument("--seq-len", type=int, default=0,
                    help="torch-rechub padded bag length (0: each field's mean length)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep --work (data is reused)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in args.size_list if s not in SIZE_NAMES]
    if bad or not args.size_list:
        ap.error(f"--sizes: unknown {bad}; expected some of {', '.join(SIZE_NAMES)}")
    try:
        args.thread_list = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads: expected comma-separated integers, got {args.threads!r}")
    if not args.thread_list or min(args.thread_list) < 1:
        ap.error(f"--threads: expected positive integers, got {args.threads!r}")
    for name in ("rows", "steps", "warmup", "window", "eval_rows", "repeat"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("warmup", "eval_rows") else 1):
            ap.error(f"--{name} must be positive")
    return args


def measure_sizes(args: argparse.Namespace, work: Path, threads: int, labels: dict[str, str]
                  ) -> tuple[list[list[str]], list[list[str]], dict[str, dict[str, Any]]]:
    """Every kind of every size at ``threads`` threads: the table rows, the phase rows and
    the results."""
    skip_rechub = rechub_status()
    rows: list[list[str]] = []
    phases: list[list[str]] = []
    details: dict[str, dict[str, Any]] = {}
    for size in args.size_list:
        data_dir = simulate(size, args.rows or default_rows(), work)
        results: dict[str, dict[str, Any]] = {}
        cut_dir, lengths = data_dir, {}
        if "cut" in SIZE_KINDS[size]:
            lengths = bag_lengths_of(data_dir / "train")
            cut_dir = work / data_key(size) / "data-cut"
            if not (cut_dir / "train" / "users.parquet").is_file():
                cut_bags(data_dir / "train", cut_dir / "train", lengths)
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeat):
            for kind in SIZE_KINDS[size]:
                if "rechub" in kind and skip_rechub:
                    runs[kind] = [{"skipped": skip_rechub}]
                    continue
                run_dir = work / size / f"run-{kind}-{threads}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                on_cut = kind in ("cut", "rechub") and "cut" in SIZE_KINDS[size]
                job = Job(kind=kind, size=size, data_dir=str(cut_dir if on_cut else data_dir),
                          run_dir=str(run_dir), steps=args.steps, threads=threads,
                          device=args.device, warmup=args.warmup, window=args.window,
                          seq_len=args.seq_len,
                          loader="stream" if kind == "stream" else "memory",
                          bag_lengths=lengths if on_cut else {})
                runs.setdefault(kind, []).append(run_child(job))
        results = {kind: median_run(r) for kind, r in runs.items()}
        rows += table_rows(size, threads, results, labels)
        phases += phase_rows(size, threads, results)
        details[size] = results
    return (rows + grouping_rows(threads, details) + attention_rows(threads, details), phases,
            details)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one kind, the one with the median step rate (the lower middle of
    an even count), with every step rate in ``repeat_rates``; a failed run is shown when
    every run failed."""
    ok = sorted((r for r in runs if "step_rate" in r), key=lambda r: r["step_rate"])
    if not ok:
        return runs[0]
    pick = dict(ok[(len(ok) - 1) // 2])
    pick["repeat_rates"] = [r.get("step_rate") for r in runs]
    return pick


def measure_evaluation(args: argparse.Namespace, work: Path, details: dict[str, Any]
                       ) -> tuple[list[list[str]], list[list[str]]]:
    """The evaluation table and its phase table: the (a) model of ``--eval-size`` at the
    last thread count."""
    size, threads = args.eval_size, args.thread_list[-1]
    if size not in details:
        log.warning("no evaluation: --eval-size %s is not among --sizes", size)
        return [], []
    eval_dir = simulate(size, args.eval_rows, work, split="test")
    results: dict[str, dict[str, Any]] = {}
    for loader in EVAL_LOADERS:
        job = Job(kind="eval", size=size, data_dir=str(work / data_key(size) / "data"),
                  run_dir=str(work / size / f"run-esmm-{threads}"), steps=None,
                  threads=threads, device=args.device, warmup=0, window=1, seq_len=0,
                  loader=loader, eval_dir=str(eval_dir))
        if "error" in details[size]["esmm"]:
            results[loader] = {"error": "no model: (a) failed"}
            continue
        results[loader] = run_child(job)
    return eval_rows(size, results), eval_phase_rows(results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    work = args.work or Path(tempfile.mkdtemp(prefix="esmm-train-bench-"))
    load_before = os.getloadavg()
    crowded = crowding(load_before[0], max(args.thread_list))
    if crowded:
        log.warning("%s", crowded)
    t_start = time.perf_counter()
    labels = {**LABELS, "rechub": rechub_label(),
              **{f"zoo-rechub-{b}": rechub_label()[4:] + f", {b.upper()}" for b in ZOO_RECHUB}}
    rows: list[list[str]] = []
    phases: list[list[str]] = []
    details: dict[str, dict[str, Any]] = {}
    eval_table: list[list[str]] = []
    eval_phases: list[list[str]] = []
    try:
        for threads in args.thread_list:
            more, more_phases, details = measure_sizes(args, work, threads, labels)
            rows += more
            phases += more_phases
        if args.eval_rows:
            eval_table, eval_phases = measure_evaluation(args, work, details)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    print(render(rows, args.markdown))
    if phases:
        print()
        print(render(phases, args.markdown, PHASE_COLUMNS))
    if eval_table:
        print()
        print(render(eval_table, args.markdown, EVAL_COLUMNS))
    if eval_phases:
        print()
        print(render(eval_phases, args.markdown, EVAL_PHASE_COLUMNS))
    print()
    print("\n".join(run_notes(args, details, t_start, load_before, load_after, crowded)))


def run_notes(args: argparse.Namespace, details: dict[str, dict[str, Any]], t_start: float,
              load_before: tuple[float, ...], load_after: tuple[float, ...],
              crowded: str | None) -> list[str]:
    """The lines printed under the tables (machine, load, what each run did besides steps)."""
    notes = [
        f"{os.cpu_count()} CPUs ({cpu_model()}), torch threads: {args.threads}, "
        f"device: {args.device}; warm-up {args.warmup} steps, windows of {args.window} steps; "
        f"total {time.perf_counter() - t_start:.0f} s.",
        "Load average (1, 5, 15 min) before: " + " ".join(f"{x:.2f}" for x in load_before)
        + "; after: " + " ".join(f"{x:.2f}" for x in load_after) + ".",
    ]
    if args.repeat > 1:
        notes.append(f"Every kind ran {args.repeat} times, interleaved; each row is the run with "
                     "the median step rate.")
    if crowded:
        notes.append(crowded)
    for size, results in details.items():
        a = results.get("esmm", {})
        if "after_last_step_s" in a:
            notes.append(f"{size}: esmm.train spent {a['after_last_step_s']:.1f} s after its "
                         "last step (final checkpoints, metrics.json), outside both rates.")
        c = results.get("rechub", {})
        if c.get("seq_len"):
            how = ("esmm (a'') and rechub both cut to the last" if "cut" in results
                   else "torch-rechub bags padded/truncated to")
            notes.append(f"{size}: {how} {c['seq_len']} ids per bag.")
    return notes


if __name__ == "__main__":
    main()
