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
gloo), ``dense`` tables (``train.sparse_optimizer: dense``: the tables' gradients are dense
and ride in the one dense all-reduce), and tables sharded with TorchRec
(``model.sharding: torchrec``, ``torchrec-row_wise`` / ``torchrec-table_wise``: each rank holds
its share of the rows, ids and pooled rows go to and from their owners by all-to-all inside
the forward and backward passes, Adagrad fused into the backward pass, as FBGEMM's CPU kernels
have no Adam; a one-process row is one torchrun rank holding every row). The torchrec rows
need the ``torchrec`` extra; ``--only torchrec`` runs just them.

Columns:
    samples/s: global batch x timed steps / rank 0's wall time over them (after ``--warmup``).
    exchange ms/step: rank 0's time inside the gradient exchange, per step (with torchrec,
        the towers' all-reduce only: the tables' all-to-alls are inside the step's forward
        and backward).
    bytes/step/rank: what one rank puts into the gradient collectives per step (dense: the
        flat gradient buffer; sparse: the coalesced row ids and rows of every table;
        torchrec: the towers' buffer, plus its ids and bag lengths, 8 bytes each, and the
        pooled rows of its bags, 4 x D bytes per bag and table, forward and again backward). Gloo's
        ring all-reduce moves about 2 (N-1)/N times the dense buffer per rank; its sparse
        all-reduce and the all-gathers deliver every other rank's share to each rank.
    peak RSS MiB: VmHWM of each rank (data in memory, model, optimizer state, batches).

On a shared machine the rates move with the other processes' load (the load average is
printed under the table): report them as measured.

Planning model (``--plan``, from the measured ``2 procs x 1 thread, sparse`` row saved in
``WORK/distributed.json``): throughput at 8, 64 and 256 workers, each at the measured per-rank
batch, for tables replicated on every worker (dense ring all-reduce + all-gather of touched
rows: each worker receives every other worker's rows) and sharded (the same dense all-reduce,
then an all-to-all of ids and rows to and from the rows' owners, forward and backward: about
twice the touched rows per worker, whatever the number of workers), with no overlap of
exchange and compute, over an assumed network (``--gbps``, ``--latency-us``), and the memory
of the tables with Adam's two moments (x3) per worker, replicated or sharded. A model, not a
measurement.

    python bench/distributed.py --rows 200000 --steps 30
    python bench/distributed.py --markdown
    python bench/distributed.py --plan --gbps 25 --markdown
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
    ("1 proc x 1 thread", 1, 1, "torchrec-row_wise"),
    ("2 procs x 1 thread", 2, 1, "torchrec-row_wise"),
    ("2 procs x 1 thread", 2, 1, "torchrec-table_wise"),
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
    from esmm.sharding import sharded_collections
    from esmm.train import Trainer

    torch.set_num_threads(args.threads)
    tree = config_tree("small", Path(args.data), None, args.threads)
    tree["train"]["batch_size"] = args.batch
    if args.strategy == "dense":
        tree["train"]["sparse_optimizer"] = {"name": "dense"}
    if args.strategy.startswith("torchrec-"):
        tree["model"].update({"sharding": "torchrec",
                              "sharding_type": args.strategy.split("-", 1)[1]})
        tree["train"]["sparse_optimizer"] = {"name": "adagrad"}
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
    sharded = [m for _, m in sharded_collections(trainer.model)]
    ctx.bytes_sent, exchange["s"] = 0, 0.0
    for m in sharded:
        m.bytes_sent = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(next(batches))
    ctx.barrier()
    elapsed = time.perf_counter() - t0
    ctx.bytes_sent += sum(m.bytes_sent for m in sharded)
    if ctx.world == 1:
        ctx.bytes_sent = 0  # a one-rank group (sharded runs need one) exchanges nothing
    params = sum(p.numel() for p in trainer.model.parameters())
    rss = ctx.gather(peak_rss_mib())
    if ctx.is_main:
        print(RESULT + json.dumps({
            "samples_s": args.batch * args.steps / elapsed,
            "exchange_ms": 1000 * exchange["s"] / args.steps,
            "bytes_step": ctx.bytes_sent / args.steps, "rss": rss, "params": params,
            "dense_bytes": 4 * (sum(p.numel() for p in trainer.sync.dense)
                                + len(trainer.sync.dense)) if ctx.active else 0,
            "table_rows": sum(p.shape[0] for p in trainer.sync.sparse)
            + sum(r for m in sharded for r, _ in m._shapes.values()),
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
    # A sharded run needs a process group, even of one rank.
    cmd = [sys.executable, *me] if procs == 1 and "torchrec" not in strategy else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={procs}", *me]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    got = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not got:
        return {"error": f"exit status {proc.returncode}"}
    return json.loads(got[-1])


def plan(args: argparse.Namespace) -> None:
    """Print the planning model (see the module docstring) from the saved measurements."""
    saved = json.loads((args.work / "distributed.json").read_text())
    m = saved["2 procs x 1 thread/sparse"]
    per_rank = saved["batch"] / 2
    compute_s = (m["step_ms"] - m["exchange_ms"]) / 1000
    dense, sparse = m["dense_bytes"], m["bytes_step"] - m["dense_bytes"]
    bw, lat = args.gbps * 1e9 / 8, args.latency_us * 1e-6
    models = {"Ali-CCP-sized (1.93M rows x 16)": 1_930_170 * 16,
              "1B-row table (x 16)": 1_000_000_000 * 16,
              "measured model": m["table_rows"] * 16}
    # TorchRec's measured embedding bytes per rank and step (ids, bag lengths, pooled rows
    # forward and backward), when the torchrec row was measured: an all-to-all in which a
    # worker sends (n - 1) / n of them, whatever n.
    trec = saved.get("2 procs x 1 thread/torchrec-row_wise", {})
    trec_bytes = trec.get("bytes_step", 0) - trec.get("dense_bytes", 0) if "error" not in trec \
        else 0
    rows = []
    for n in (8, 64, 256):
        ring = 2 * (n - 1) / n * dense / bw + 2 * (n - 1) * lat
        replicated = compute_s + ring + (n - 1) * sparse / bw + (n - 1) * lat
        sharded = compute_s + ring + 2 * 2 * (n - 1) / n * sparse / bw + 2 * (n - 1) * lat
        mem = [f"{name}: {3 * 4 * v / 2**30:,.1f} / {3 * 4 * v / n / 2**30:,.2f} GiB"
               for name, v in models.items() if name != "measured model"]
        row = [str(n), f"{n * per_rank / replicated:,.0f}", f"{n * per_rank / sharded:,.0f}"]
        if trec_bytes:
            pooled = compute_s + ring + (n - 1) / n * trec_bytes / bw + 4 * (n - 1) * lat
            row.append(f"{n * per_rank / pooled:,.0f}")
        rows.append(row + [f"{(n - 1) * sparse / 2**20:,.1f}",
                           f"{4 * (n - 1) / n * sparse / 2**20:,.1f}", "; ".join(mem)])
    head = ["workers", "samples/s replicated", "samples/s sharded",
            *(["samples/s sharded, TorchRec bytes"] if trec_bytes else []),
            "MiB in/step/worker, replicated rows", "MiB in/step/worker, sharded rows",
            "tables + Adam per worker, replicated / sharded"]
    print(render(rows, args.markdown, head))
    if trec_bytes:
        print(f"\nTorchRec row-wise, measured: {trec_bytes / 2**20:.2f} MiB of ids and pooled "
              "rows per rank and step (forward and backward), a worker sending (n - 1) / n of "
              "them in all-to-alls, 4 messages per peer.")
    print(f"\nPLANNING MODEL, not a measurement: per worker {per_rank:.0f} rows/step, compute "
          f"{1000 * compute_s:.0f} ms/step, dense gradients {dense / 2**20:.2f} MiB, touched "
          f"embedding rows {sparse / 2**20:.2f} MiB per step (measured, {saved['when']}); "
          f"network {args.gbps:g} Gb/s, {args.latency_us:g} us per message (assumed); no "
          "overlap of exchange and compute.")
    cross = 1 + compute_s / (sparse / bw + lat)
    print(f"Replicated tables: receiving the other workers' touched rows takes as long as the "
          f"compute from about {cross:,.0f} workers on; a table with Adam (x3 float32) fits a "
          f"worker of {args.memory_gib:g} GiB up to {args.memory_gib * 2**30 / 12 / 16:,.0f} "
          "rows x 16.")


def render(rows: list[list[str]], markdown: bool, head: list[str] | None = None) -> str:
    head = head or ["processes x threads", "embeddings", "samples/s", "step ms",
                    "exchange ms/step", "bytes/step/rank", "peak RSS MiB per rank"]
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
    ap.add_argument("--plan", action="store_true", help="print the planning model from the "
                    "measurements saved in WORK/distributed.json")
    ap.add_argument("--gbps", type=float, default=25.0, help="--plan: network Gb/s (assumed)")
    ap.add_argument("--memory-gib", type=float, default=80.0,
                    help="--plan: memory of one worker for tables and Adam state (assumed)")
    ap.add_argument("--latency-us", type=float, default=20.0,
                    help="--plan: seconds per message, in microseconds (assumed)")
    ap.add_argument("--only", default="", help="run only the embedding strategies whose "
                    "name contains one of these comma-separated words (sparse, dense, "
                    "torchrec); their results update WORK/distributed.json")
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
    if args.plan:
        plan(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from train_throughput import simulate

    from esmm.fsio import write_text

    args.work.mkdir(parents=True, exist_ok=True)
    args.data_dir = simulate("small", args.rows, args.work)
    rows = []
    saved: dict[str, Any] = {}
    if args.only and (args.work / "distributed.json").exists():
        saved = json.loads((args.work / "distributed.json").read_text())
    saved.update({"batch": args.batch, "rows": args.rows, "steps": args.steps,
                  "when": time.strftime("%Y-%m-%d", time.gmtime())})
    for label, procs, threads, strategy in CASES:
        if args.only and not any(w in strategy for w in args.only.split(",")):
            continue
        log.info("%s, %s embeddings", label, strategy)
        r = run_case(args, procs, threads, strategy)
        saved[f"{label}/{strategy}"] = r
        if "error" in r:
            rows.append([label, strategy, r["error"], "", "", "", ""])
            continue
        rows.append([label, strategy, f"{r['samples_s']:,.0f}", f"{r['step_ms']:.0f}",
                     f"{r['exchange_ms']:.1f}", fmt_bytes(r["bytes_step"]),
                     " / ".join(f"{x:.0f}" for x in r["rss"])])
        log.info("%s", r)
    write_text(args.work / "distributed.json", json.dumps(saved, indent=1))
    print(render(rows, args.markdown))
    print(f"\nglobal batch {args.batch}, {args.steps} timed steps after {args.warmup}; "
          f"{args.rows} simulated rows; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
