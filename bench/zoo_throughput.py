"""Training throughput of the multi-task zoo: samples/s and peak RSS per backbone, and the same
MMoE and PLE in torch-rechub 0.9.0 on the same rows and shapes.

    python bench/zoo_throughput.py --rows 40000 --steps 30 --out zoo_throughput.json

Every measurement runs in a fresh process, so its peak RSS is its own, on ``--threads``
threads. The rows are simulated once (preset ``aliccp``, every Ali-CCP field, the feature
preset's hash buckets) and encoded once by esmm; both libraries train on those encoded rows.

``esmm``: ESMM over each backbone (the entire-space head), esmm's batches and optimizers
(Adam on the dense weights, row-sparse Adam on the tables), one step = forward, losses,
backward, optimizer steps. torch-rechub: its ``MMOE`` and ``PLE`` with the same embedding
width, tables, experts and towers, trained by its ``MTLTrainer.train_one_epoch`` on its
``DataGenerator`` loader; its inputs are esmm's hashed ids, its bags padded to the mean bag
length of the rows (as bench/train_throughput.py does for its ESMM), its two tasks click and
click * conversion over all impressions. Both are timed over ``--steps`` steps after
``--warmup`` steps; samples/s = timed rows / timed seconds.

These runs are defined here once; ``python bench/train_throughput.py --sizes zoo`` times the
same runs at several thread counts, with the median over windows of steps, load and setup
times and peak RSS beside the other sizes (the figures in docs/models.md come from it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

BACKBONES = ("none", "shared_bottom", "mmoe", "ple", "dbmtl", "aitm")
RECHUB = ("mmoe", "ple")
BATCH = 2048
EMBEDDING_DIM = 16
TOWER = [128, 64]
MMOE = {"experts": 4, "expert": [256, 128]}
PLE = {"levels": 2, "task_experts": 2, "shared_experts": 2, "expert": [128, 64]}


def _config(data_dir: Path, backbone: str, batch: int) -> dict[str, Any]:
    """The esmm config of one measurement (a plain dict, validated by esmm.config)."""
    extra = {"mmoe": MMOE, "ple": PLE}.get(backbone, {})
    return {
        "data": {"train": str(data_dir / "train"), "user_column": "101"},
        "features": "aliccp",
        "model": {"name": "esmm", "tower": TOWER, "embedding_dim": EMBEDDING_DIM,
                  "backbone": {"name": backbone, **extra}, "head": {"name": "entire_space"}},
        "train": {"batch_size": batch, "seed": 0, "progress": "off",
                  "optimizer": {"name": "adam", "lr": 0.001}},
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def esmm_steps(data_dir: Path, backbone: str, batch: int, steps: int | None,
               device: str = "cpu") -> dict[str, Any]:
    """ESMM over ``backbone``: esmm's own training step (forward, losses, backward, optimizer
    steps) over ``steps`` batches (None: one epoch), every step's end timestamped.

    Returns ``stamps`` (end of step i + 1), ``samples`` (its rows), ``start`` (when the first
    batch was asked for), ``load_s`` (reading and encoding the rows), ``rows``, ``params``.
    """
    import torch

    from esmm.config import config_from_dict
    from esmm.data.stream import split_batches
    from esmm.data.tables import load_split
    from esmm.features import spec_from_config
    from esmm.models import build_model
    from esmm.train import build_optimizers

    cfg = config_from_dict(_config(data_dir, backbone, batch))
    spec = spec_from_config(cfg)
    t = time.perf_counter()
    data = load_split(cfg.data.train, spec, cfg.data)
    load_s = time.perf_counter() - t
    torch.manual_seed(0)
    model = build_model(cfg, spec).to(device)
    opts = build_optimizers(model, cfg)
    model.train()
    stamps: list[float] = []
    samples: list[int] = []
    start = time.perf_counter()
    for b in split_batches(data, batch, shuffle=True, seed=0, epoch=0):
        if steps is not None and len(stamps) == steps:
            break
        b = b.to(device)
        out = model(b)
        total = model.total_loss(model.losses(out, b))
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in opts:
            o.step()
        _sync(device)
        stamps.append(time.perf_counter())
        samples.append(b.size)
    return {"stamps": stamps, "samples": samples, "start": start, "load_s": load_s,
            "rows": data.n, "params": sum(p.numel() for p in model.parameters())}


def timed_rate(r: dict[str, Any], warmup: int) -> float:
    """Samples/s over the steps after the first ``warmup`` (from the end of the last warm-up
    step, or from the first request for a batch when there is none)."""
    t0 = r["stamps"][warmup - 1] if warmup > 0 else r["start"]
    return sum(r["samples"][warmup:]) / (r["stamps"][-1] - t0)


def measure_esmm(data_dir: Path, backbone: str, batch: int, warmup: int, steps: int
                 ) -> dict[str, Any]:
    """ESMM over ``backbone``: ``warmup`` steps, then ``steps`` timed."""
    r = esmm_steps(data_dir, backbone, batch, warmup + steps)
    return {"samples_per_s": timed_rate(r, warmup), "timed_rows": sum(r["samples"][warmup:]),
            "params": r["params"], "peak_rss_mib": _peak_rss_mib()}


def rechub_inputs(data_dir: Path, batch: int) -> tuple[dict[str, Any], Any, list[Any]]:
    """esmm's encoded rows as torch-rechub inputs and features: {field: (N,) ids or (N, L)
    padded bags (ids + 1; 0 pads)}, labels (N, 2) = (click, click * conversion)."""
    import numpy as np
    from torch_rechub.basic.features import SequenceFeature, SparseFeature

    from esmm.config import config_from_dict
    from esmm.data.tables import load_split
    from esmm.features import spec_from_config

    cfg = config_from_dict(_config(data_dir, "none", batch))
    spec = spec_from_config(cfg)
    data = load_split(cfg.data.train, spec, cfg.data)
    user = data.user_row
    x: dict[str, Any] = {}
    features: list[Any] = []
    for f in cfg.features:
        if f.kind == "categorical":
            ids = data.ids[f.name] if f.name in data.ids else data.user_ids[f.name][user]
            x[f.name] = ids.astype(np.int64)
            features.append(SparseFeature(f.name, vocab_size=f.buckets, embed_dim=EMBEDDING_DIM))
            continue
        values, offsets = data.bags[f.name] if f.name in data.bags else data.user_bags[f.name]
        rows = np.arange(data.n) if f.name in data.bags else user
        sizes = np.diff(offsets)
        length = max(1, math.ceil(float(sizes[rows].mean())))
        padded = np.zeros((len(sizes), length), dtype=np.int64)
        take = np.minimum(sizes, length)
        col = np.arange(length)
        mask = col[None, :] < take[:, None]
        src = offsets[:-1, None] + col[None, :]
        padded[mask] = values[src[mask]] + 1
        x[f.name] = padded[rows]
        features.append(SequenceFeature(f.name, vocab_size=f.buckets + 1,
                                        embed_dim=EMBEDDING_DIM, pooling="mean",
                                        padding_idx=0))
    click = np.asarray(data.click, dtype=np.float32)
    y = np.stack([click, click * np.asarray(data.conversion, dtype=np.float32)], axis=1)
    return x, y, features


class _Timed:
    """A loader that stops after ``cap`` batches (None: all) and stamps each request for the
    next batch (the trainer asks once its previous step is done): ``stamps[0]`` is the first
    request, ``stamps[i]`` the end of step i."""

    def __init__(self, loader: Any, cap: int | None, device: str) -> None:
        self.loader, self.cap, self.device = loader, cap, device
        self.stamps: list[float] = []
        self.rows: list[int] = []

    def __len__(self) -> int:
        return len(self.loader) if self.cap is None else min(len(self.loader), self.cap)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            _sync(self.device)
            self.stamps.append(time.perf_counter())
            if self.cap is not None and len(self.rows) == self.cap:
                return
            try:
                xb, yb = next(batches)
            except StopIteration:
                return
            self.rows.append(int(yb.shape[0]))
            yield xb, yb


def rechub_steps(data_dir: Path, backbone: str, batch: int, steps: int | None,
                 device: str = "cpu") -> dict[str, Any]:
    """torch-rechub's MMOE or PLE trained by its MTLTrainer over ``steps`` batches (None: one
    epoch); the same keys as :func:`esmm_steps` (``load_s``: making its inputs from esmm's
    encoded rows)."""
    import torch
    from torch_rechub.models.multi_task import MMOE as RMMOE
    from torch_rechub.models.multi_task import PLE as RPLE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    t = time.perf_counter()
    x, y, features = rechub_inputs(data_dir, batch)
    load_s = time.perf_counter() - t
    loader = DataGenerator(x, y).generate_dataloader(
        x_val=x, y_val=y, x_test=x, y_test=y, batch_size=batch)[0]
    torch.manual_seed(0)
    towers = [{"dims": TOWER}, {"dims": TOWER}]
    tasks = ["classification", "classification"]
    if backbone == "mmoe":
        model = RMMOE(features, tasks, MMOE["experts"], {"dims": MMOE["expert"]}, towers)
    else:
        model = RPLE(features, tasks, PLE["levels"], PLE["task_experts"],
                     PLE["shared_experts"], {"dims": PLE["expert"]}, towers)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(model, task_types=tasks, optimizer_fn=torch.optim.Adam,
                             optimizer_params={"lr": 0.001}, n_epoch=1, device=device,
                             model_path=tmp)
        timed = _Timed(loader, steps, device)
        # The trainer prints losses and draws a progress bar; keep them out of the output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.train_one_epoch(timed)
    return {"stamps": timed.stamps[1:], "samples": timed.rows, "start": timed.stamps[0],
            "load_s": load_s, "rows": len(y),
            "params": sum(p.numel() for p in model.parameters())}


def measure_rechub(data_dir: Path, backbone: str, batch: int, warmup: int, steps: int
                   ) -> dict[str, Any]:
    """torch-rechub's MMOE or PLE: ``warmup`` steps, then ``steps`` timed."""
    r = rechub_steps(data_dir, backbone, batch, warmup + steps)
    return {"samples_per_s": timed_rate(r, warmup), "timed_rows": sum(r["samples"][warmup:]),
            "params": r["params"], "peak_rss_mib": _peak_rss_mib()}


def _child(queue: Any, fn: Callable[..., dict[str, Any]], args: tuple, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        queue.put(fn(*args))
    except Exception as e:  # noqa: BLE001 - reported in the results, the others still run
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run(fn: Callable[..., dict[str, Any]], args: tuple, threads: int) -> dict[str, Any]:
    """``fn(*args)`` (a module-level function) in a fresh process on ``threads`` threads: its
    result, or ``{"error": ...}`` when it raised or the process died without a result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, threads))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():  # died before reporting (killed, out of memory)
                result = {"error": f"the measuring process ended with exit code "
                                   f"{proc.exitcode} and no result"}
                break
    proc.join()
    return result


def simulate(data_dir: Path, rows: int) -> None:
    from esmm.data.simulate import get_preset, write_simulation

    if not (data_dir / "train").exists():
        write_simulation(data_dir, get_preset("aliccp"), {"train": rows}, 2018)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=40_000, help="simulated training rows")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=None, help="folder for the simulated rows "
                   "(default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    a = p.parse_args(argv)
    if (a.warmup + a.steps) * a.batch > a.rows:
        p.error(f"--rows {a.rows} is too few for {a.warmup + a.steps} steps of {a.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = a.data or Path(tmp)
        simulate(data_dir, a.rows)
        shape = (a.batch, a.warmup, a.steps)
        results: dict[str, Any] = {"setup": vars(a) | {"data": str(a.data), "out": str(a.out)}}
        for b in BACKBONES:
            results[f"esmm {b}"] = run(measure_esmm, (data_dir, b, *shape), a.threads)
        for b in RECHUB:
            results[f"torch-rechub {b}"] = run(measure_rechub, (data_dir, b, *shape), a.threads)
    for b in RECHUB:
        mine, theirs = results[f"esmm {b}"], results[f"torch-rechub {b}"]
        if "error" not in mine and "error" not in theirs:
            results[f"ratio {b}"] = mine["samples_per_s"] / theirs["samples_per_s"]
    print("| run | samples/s | peak RSS (MiB) | parameters |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        if isinstance(r, dict) and "samples_per_s" in r:
            print(f"| {name} | {r['samples_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                  f"{r['params']:,} |")
        elif isinstance(r, dict) and "error" in r:
            print(f"| {name} | error: {r['error']} | | |")
    for b in RECHUB:
        if f"ratio {b}" in results:
            print(f"esmm / torch-rechub, {b}: {results[f'ratio {b}']:.2f}x")
    if a.out is not None:
        from esmm.fsio import write_text

        write_text(a.out, json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
