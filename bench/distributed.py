"""Data-parallel training speed: samples/s, bytes exchanged per step and peak RSS per rank.

Each configuration runs in fresh processes on the same simulated rows (the ``small`` size of
``bench/train_throughput.py``: single-valued categorical fields of the simulator's ``dense``
preset, vocabularies cut at 400k, embedding 16, towers 256-128-64 with batch norm, Adam), at
the same global batch (``--batch``), one training step after another with the trainer of
``esmm.train`` (``Trainer.step``: forward, loss, backward, gradient exchange, optimizer):

    1 proc x 1 thread     one process, the baseline
    1 proc x 2 threads    one process with the threads the two-process run has in total
    2 procs x 1 thread    ``torchrun --nproc-per-node 2``, gloo, each rank half of each batch

per embedding strategy: ``sparse`` tables (sparse gradients, RowSparseAdam) exchanged by a
sparse all-reduce (gloo's) or by all-gathers of row ids and rows (NCCL's way, run here on
gloo), and ``dense`` tables (``train.sparse_optimizer: dense``: the tables' gradients are dense
and ride in the one dense all-reduce).

Columns:
    samples/s: global batch x timed steps / rank 0's wall time over them (after ``--warmup``).
    exchange ms/step: rank 0's time inside the gradient exchange, per step.
    bytes/step/rank: what one rank puts into the gradient collectives per step (dense: the
        flat gradient buffer; sparse: the coalesced row ids and rows of every table). Gloo's
        ring all-reduce moves about 2 (N-1)/N times the dense buffer per rank; its sparse
        all-reduce and the all-gathers deliver every other rank's share to each rank.
    peak RSS MiB: VmHWM of each rank (data in memory, model, optimizer state, batches).

On a shared machine the rates move with the other processes' load (the load average is
printed under the table): report them as measured.

    python bench/distributed.py --rows 200000 --steps 30
    python bench/distributed.py --markdown
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

log = logging.getLogger("bench.distributed")

RESULT = "RESULT "
CASES = [  # (label, processes, threads, strategy)
    ("1 proc x 1 thread", 1, 1, "sparse"),
    ("1 proc x 2 threads", 1, 2, "sparse"),
    ("2 procs x 1 thread", 2, 1, "sparse"),
    ("2 procs x 1 thread", 2, 1, "sparse-allgather"),
    ("1 proc x 1 thread", 1, 1, "dense"),
    ("1 proc x 2 threads", 1, 2, "dense"),
    ("2 procs x 1 thread", 2, 1, "dense"),
]


def worker(args: argparse.Namespace) -> None:
    """One process (or rank) of a case: train ``--warmup`` + ``--steps`` steps, then print
    rank 0's measurements and every rank's peak RSS."""
    import torch
    from train_throughput import config_tree, peak_rss_mib

    from esmm.config import config_from_dict
    from esmm.data.stream import open_split, split_batches
    from esmm.distributed import DistContext
    from esmm.features import spec_from_config
    from esmm.train import Trainer

    torch.set_num_threads(args.threads)
    tree = config_tree("small", Path(args.data), None, args.threads)
    tree["train"]["batch_size"] = args.batch
    if args.strategy == "dense":
        tree["train"]["sparse_optimizer"] = {"name": "dense"}
    cfg = config_from_dict(tree, "bench distributed")
    ctx = DistContext.from_env(torch.device("cpu"))
    spec = spec_from_config(cfg)
    data = open_split(cfg.data.train, spec, cfg.data)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, spec, Path(args.work) / "run", data, None, ctx.device, None, ctx)
    if args.strategy == "sparse-allgather":
        trainer.sync.sparse_exchange = "all_gather"
    exchange = _timed(trainer)
    batches = split_batches(data, args.batch, shuffle=True, seed=0, rank=ctx.rank,
                            world=ctx.world)
    for _ in range(args.warmup):
        trainer.step(next(batches))
    ctx.barrier()
    ctx.bytes_sent, exchange["s"] = 0, 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(next(batches))
    ctx.barrier()
    elapsed = time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.model.parameters())
    rss = ctx.gather(peak_rss_mib())
    if ctx.is_main:
        print(RESULT + json.dumps({
            "samples_s": args.batch * args.steps / elapsed,
            "exchange_ms": 1000 * exchange["s"] / args.steps,
            "bytes_step": ctx.bytes_sent / args.steps, "rss": rss, "params": params,
            "step_ms": 1000 * elapsed / args.steps}), flush=True)
    ctx.close()


def _timed(trainer: Any) -> dict[str, float]:
    """Wrap the trainer's gradient exchange to add up its seconds into the returned dict."""
    spent = {"s": 0.0}
    sync = trainer.sync

    class Timed:
        def __getattr__(self, name: str) -> Any:
            return getattr(sync, name)

        def __call__(self) -> None:
            t = time.perf_counter()
            sync()
            spent["s"] += time.perf_counter() - t

    trainer.sync = Timed()
    return spent


def run_case(args: argparse.Namespace, procs: int, threads: int, strategy: str
             ) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    me = [str(Path(__file__).resolve()), "--worker", "--data", str(args.data_dir),
          "--work", str(args.work), "--threads", str(threads), "--strategy", strategy,
          "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd = [sys.executable, *me] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={procs}", *me]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    got = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not got:
        return {"error": f"exit status {proc.returncode}"}
    return json.loads(got[-1])


def render(rows: list[list[str]], markdown: bool) -> str:
    head = ["processes x threads", "embeddings", "samples/s", "step ms", "exchange ms/step",
            "bytes/step/rank", "peak RSS MiB per rank"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True))
                     for r in [head, *rows])


def fmt_bytes(b: float) -> str:
    return "0" if not b else f"{b / 2**20:.2f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="simulated training rows")
    ap.add_argument("--batch", type=int, default=4096, help="global batch")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("bench-work"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="sparse", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from train_throughput import simulate

    args.work.mkdir(parents=True, exist_ok=True)
    args.data_dir = simulate("small", args.rows, args.work)
    rows = []
    for label, procs, threads, strategy in CASES:
        log.info("%s, %s embeddings", label, strategy)
        r = run_case(args, procs, threads, strategy)
        if "error" in r:
            rows.append([label, strategy, r["error"], "", "", "", ""])
            continue
        rows.append([label, strategy, f"{r['samples_s']:,.0f}", f"{r['step_ms']:.0f}",
                     f"{r['exchange_ms']:.1f}", fmt_bytes(r["bytes_step"]),
                     " / ".join(f"{x:.0f}" for x in r["rss"])])
        log.info("%s", r)
    print(render(rows, args.markdown))
    print(f"\nglobal batch {args.batch}, {args.steps} timed steps after {args.warmup}; "
          f"{args.rows} simulated rows; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
