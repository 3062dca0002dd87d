"""Training speed with and without esmm's malloc settings (:mod:`esmm.allocator`).

The same measurements as bench/train_throughput.py's ``shipped`` size (``configs/esmm_sim.yaml``
as a user runs it, users' impressions grouped in blocks of 64, on the ``aliccp`` preset) and
``shipped-rows`` (single impressions shuffled), each in a child process of its own, once with
glibc's defaults (``ESMM_MALLOC=system``) and once with esmm's settings:

(a) ``esmm.train``: step samples/s (median over windows), the share of step time spent
    waiting for batches, peak RSS;
(b) the plain loop over batches made beforehand: step samples/s, and the median ms of making
    one batch (``iter_batches``) and of the backward pass.

Rows per size, thread count and setting, then ``tuned / system`` (above 1: faster, or for memory,
larger), and ``a / b`` per setting.

    python bench/allocator.py --threads 1,2 --rows 100000 --steps 25 --markdown
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS = ("system", "tuned")
COLUMNS = ("size", "threads", "malloc", "(a) step samples/s", "(a) batching share",
           "(a) peak RSS MiB", "(b) step samples/s", "(b) batch ms", "(b) backward ms")


def throughput_module() -> Any:
    spec = importlib.util.spec_from_file_location("train_throughput", HERE /
                                                  "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="shipped,shipped-rows")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    try:
        args.thread_list = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads: expected comma-separated integers, got {args.threads!r}")
    return args


def measure(tt: Any, args: argparse.Namespace, work: Path, size: str, threads: int,
            setting: str) -> dict[str, dict[str, Any]]:
    """(a) and (b) at ``threads`` threads with one malloc ``setting``."""
    if setting == "system":
        os.environ["ESMM_MALLOC"] = "system"  # inherited by the child processes
    else:
        os.environ.pop("ESMM_MALLOC", None)
    out = {}
    data_dir = tt.simulate(size, args.rows, work)
    for kind in ("esmm", "plain"):
        run_dir = work / f"run-{size}-{kind}-{threads}-{setting}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        job = tt.Job(kind=kind, size=size, data_dir=str(data_dir), run_dir=str(run_dir),
                     steps=args.steps, threads=threads, device="cpu", warmup=args.warmup,
                     window=args.window, seq_len=0)
        out[kind] = tt.run_child(job)
    return out


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def row(size: str, threads: int, setting: str, r: dict[str, dict[str, Any]]) -> list[str]:
    a, b = r["esmm"], r["plain"]
    ph = b.get("phases_ms", {})
    return [size, str(threads), setting, _num(a.get("step_rate"), ",.0f"),
            _num(a.get("batching_share"), ".0%"), _num(a.get("peak_rss_mib"), ",.0f"),
            _num(b.get("step_rate"), ",.0f"), _num(ph.get("batch"), ".1f"),
            _num(ph.get("backward"), ".1f")]


def ratio_rows(size: str, threads: int, res: dict[str, dict[str, dict[str, Any]]]
               ) -> list[list[str]]:
    def q(x: float | None, y: float | None) -> str:
        return "-" if not x or not y else f"{x / y:.2f}"

    t, s = res["tuned"], res["system"]
    tp, sp = t["plain"].get("phases_ms", {}), s["plain"].get("phases_ms", {})
    rows = [[size, str(threads), "tuned / system",
             q(t["esmm"].get("step_rate"), s["esmm"].get("step_rate")), "",
             q(t["esmm"].get("peak_rss_mib"), s["esmm"].get("peak_rss_mib")),
             q(t["plain"].get("step_rate"), s["plain"].get("step_rate")),
             q(tp.get("batch"), sp.get("batch")), q(tp.get("backward"), sp.get("backward"))]]
    for setting in SETTINGS:
        r = res[setting]
        rows.append([size, str(threads), f"a / b, {setting}",
                     q(r["esmm"].get("step_rate"), r["plain"].get("step_rate")),
                     "", "", "", "", ""])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tt = throughput_module()
    load0 = os.getloadavg()[0]
    body: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="esmm-allocator-") as tmp:
        work = Path(tmp)
        for size in args.sizes.split(","):
            for threads in args.thread_list:
                res = {s: measure(tt, args, work, size, threads, s) for s in SETTINGS}
                body += [row(size, threads, s, res[s]) for s in SETTINGS]
                body += ratio_rows(size, threads, res)
    print(tt.render(body, args.markdown, COLUMNS))
    print(f"\n{args.rows:,} rows of the aliccp preset, configs/esmm_sim.yaml, {args.steps} "
          f"steps per run; load average {load0:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end; {tt.cpu_model()}.")


if __name__ == "__main__":
    main()
