"""What keeping a user's impressions together costs in accuracy: ``train.shuffle_block``.

With ``shuffle_block: 1`` every epoch shuffles single impressions; with ``K > 1`` it shuffles
blocks of K consecutive impressions (a user's impressions are consecutive in Ali-CCP-shaped
logs), so a batch holds fewer distinct users and their long behaviour bags are embedded once
for many impressions (faster), at the price of batches that are less independent.

This script trains the shipped config (``configs/esmm_sim.yaml`` as is, but for its data
paths, the block and the seed) on ``--worlds`` simulated ``aliccp``-preset worlds of
``--rows`` training impressions (valid rows/4, test rows/2), once per block, and scores each
run on its world's test split. World ``w`` uses data seed ``SIM_SEED + w`` and training seed
``train.seed + w``: the worlds vary the data as well as the initialisation, and the runs of one
world differ only in the block, so the differences from row shuffle are paired by world.

Prints, per metric: row shuffle's mean and sample std over worlds, and for every other block
the paired difference from row shuffle (mean, 95% t interval over worlds, and how many worlds
it was above), then the epoch of the checkpoint early stopping kept. Finished runs in
``--out/runs`` are reused when their config and data are unchanged.

    python bench/grouping_accuracy.py --rows 1000000 --worlds 3 --blocks 1,8,64,512 --markdown
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from esmm.benchmark import Job, ensure_simulation, run_jobs
from esmm.config import apply_overrides, config_from_dict
from esmm.demo import SIM_SEED
from esmm.metrics import METRIC_ORDER

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "esmm_sim.yaml"
# Two-sided 95% quantiles of Student's t by degrees of freedom (worlds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}
TIMING = ("best_epoch",)  # wall time is bench/train_throughput.py's job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="training impressions per world")
    p.add_argument("--worlds", type=int, default=3, help="simulated worlds (>= 2)")
    p.add_argument("--blocks", default="1,8,64,512", help="shuffle blocks; the first is "
                   "the reference the others are compared with")
    p.add_argument("--preset", default="aliccp")
    p.add_argument("--config", type=Path, default=SHIPPED)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override a config key for every run, e.g. train.epochs=2")
    p.add_argument("--out", type=Path, default=Path("bench-out/grouping"))
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",")]
    if args.worlds < 2 or args.worlds - 1 not in T95:
        p.error(f"--worlds must be 2 to {max(T95) + 1} (intervals need a spread), "
                f"got {args.worlds}")
    if min(args.blocks) < 1 or len(set(args.blocks)) != len(args.blocks):
        p.error(f"--blocks must be distinct integers >= 1, got {args.blocks}")
    return args


def run_tree(config: Path, data_dir: Path, block: int, seed: int,
             overrides: list[str]) -> dict[str, Any]:
    """The config of one run: ``config`` with the world's data, the block and the seed."""
    tree = yaml.safe_load(config.read_text())
    tree["data"].update(train=str(data_dir / "train"), eval=str(data_dir / "valid"),
                        test=str(data_dir / "test"))
    sets = [*overrides, f"train.shuffle_block={block}", f"train.seed={seed}",
            'train.progress="off"']
    tree = apply_overrides(tree, sets)
    config_from_dict(tree, f"{config} with --set")  # fail early, naming the key
    return tree


def make_groups(args: argparse.Namespace) -> list[tuple[Path, list[Job]]]:
    seed0 = config_from_dict(yaml.safe_load(args.config.read_text()), str(args.config)
                             ).train.seed
    groups = []
    for w in range(args.worlds):
        data_dir = args.out / "data" / f"world{w}"
        ensure_simulation(data_dir, args.preset, {}, args.rows, seed=SIM_SEED + w)
        jobs = []
        for block in args.blocks:
            tree = run_tree(args.config, data_dir, block, seed0 + w, args.overrides)
            name = tree["model"]["name"]
            jobs.append(Job(name, seed0 + w, tree, args.out / "runs" / f"world{w}" /
                            f"block{block}", {"world": w, "block": block}))
        groups.append((data_dir, jobs))
    return groups


def interval(d: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t interval of ``d`` (one value per world)."""
    m = float(d.mean())
    half = T95[len(d) - 1] * float(d.std(ddof=1)) / math.sqrt(len(d))
    return m, m - half, m + half


def table(rows: list[dict[str, Any]], blocks: list[int]) -> tuple[list[str], list[list[str]]]:
    ref = blocks[0]
    by = {(r["world"], r["block"]): r for r in rows}
    worlds = sorted({r["world"] for r in rows})
    present = set().union(*(r.keys() for r in rows))
    metrics = [k for k in METRIC_ORDER if k in present] + sorted(
        k for k in present if k.startswith(("cvr_", "ctr_", "ctcvr_", "p_cvr"))
        and k not in METRIC_ORDER)
    head = ["metric", f"block {ref}: mean ± sd"] + [f"block {b} - block {ref} [95% CI] (above)"
                                                    for b in blocks[1:]]
    body = []
    for k in [*metrics, *TIMING]:
        if k.startswith("n_") or k.endswith("_oracle"):
            continue  # properties of the test split, the same for every block
        x = np.array([float(by[w, ref][k]) for w in worlds])
        if np.isnan(x).all():
            continue
        line = [k, f"{x.mean():.4f} ± {x.std(ddof=1):.4f}"]
        for b in blocks[1:]:
            d = np.array([float(by[w, b][k]) for w in worlds]) - x
            m, lo, hi = interval(d)
            line.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] ({int((d > 0).sum())}/{len(d)})")
        body.append(line)
    return head, body


def render(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [head, *body])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    groups = make_groups(args)
    rows = run_jobs(groups, fresh=False, progress=sys.stderr.isatty())
    batch = config_from_dict(groups[0][1][0].tree, "config").train.batch_size
    for r in rows:
        r["best_epoch"] = r["best_step"] / math.ceil(args.rows / batch)  # steps -> epochs
    head, body = table(rows, args.blocks)
    print(render(head, body, args.markdown))
    counts = {k: np.mean([r[k] for r in rows]) for k in ("n_impressions", "n_clicks",
                                                         "n_conversions") if k in rows[0]}
    print("\ntest split, mean over worlds: " + ", ".join(f"{v:,.0f} {k[2:]}"
                                                       for k, v in counts.items()))
    print(f"\n{args.worlds} worlds of the {args.preset!r} preset, {args.rows:,} training "
          f"impressions each; {args.config.name} with {args.overrides or 'no overrides'}; "
          f"{time.perf_counter() - t0:.0f} s in all.")


if __name__ == "__main__":
    main()
