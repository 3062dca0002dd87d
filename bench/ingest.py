"""Throughput and memory of `esmm data aliccp` on raw Ali-CCP files of several sizes.

For each size (GB of raw text, skeleton + common features) the simulator writes one split in
the raw layout (`esmm simulate --format aliccp-raw`), then a separate process ingests it; its
wall time, CPU time and peak resident memory (VmHWM of that process) are measured. Prints one
table: MB/s of skeleton text and of all text, rows/s and peak RSS per size, so that memory can
be seen not to grow with the input.

    python bench/ingest.py                         # 0.5 and 2 GB
    python bench/ingest.py --sizes 0.1,0.5 --markdown
    python bench/ingest.py --work /data/tmp --keep  # keep the files
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, re, sys, time
from pathlib import Path
from esmm.data.aliccp import ingest

t0 = time.perf_counter()
s = ingest(sys.argv[1], sys.argv[2], sys.argv[3], block_bytes=int(sys.argv[4]),
           overwrite=True)
wall = time.perf_counter() - t0
hwm = re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text())
print(json.dumps({"wall": wall, "peak_kb": int(hwm.group(1)) if hwm else None,
                  "rows": s["impressions"]["rows_written"], "users": s["users"]["rows_written"],
                  "skeleton_s": s["files"]["skeleton"]["seconds"],
                  "common_s": s["files"]["common"]["seconds"]}))
"""


def bytes_per_row(work: Path, preset: str, seed: int) -> float:
    """Raw text per impression for the preset, from a small pilot simulation."""
    from esmm.data.aliccp import simulate_raw
    from esmm.data.simulate import get_preset

    pilot = work / "pilot"
    rows = 50_000
    simulate_raw(pilot, get_preset(preset), {"train": rows}, seed, ground_truth=False)
    size = sum((pilot / f).stat().st_size for f in ("sample_skeleton_train.csv",
                                                    "common_features_train.csv"))
    shutil.rmtree(pilot)
    return size / rows


def run_size(work: Path, gb: float, per_row: float, preset: str, seed: int,
             block_bytes: int, keep: bool) -> dict:
    from esmm.data.aliccp import simulate_raw
    from esmm.data.simulate import get_preset

    rows = max(1000, int(gb * 1e9 / per_row))
    raw = work / f"raw-{gb:g}GB"
    out = work / f"ingested-{gb:g}GB"
    skel, comm = raw / "sample_skeleton_train.csv", raw / "common_features_train.csv"
    if not (skel.is_file() and comm.is_file()):
        print(f"simulating {rows:,} impressions ({gb:g} GB of raw text) into {raw} ...",
              file=sys.stderr)
        t0 = time.perf_counter()
        simulate_raw(raw, get_preset(preset), {"train": rows}, seed, ground_truth=False)
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    skel_mb = skel.stat().st_size / 1e6
    comm_mb = comm.stat().st_size / 1e6
    print(f"ingesting {skel_mb + comm_mb:,.0f} MB ...", file=sys.stderr)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(skel), str(comm), str(out),
                             str(block_bytes)], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ingestion failed for {raw}")
    res = json.loads(stdout.strip().splitlines()[-1])
    cpu = usage.ru_utime + usage.ru_stime
    if not keep:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    wall = res["wall"]
    return {
        "GB": gb, "skeleton MB": skel_mb, "common MB": comm_mb, "impressions": res["rows"],
        "users": res["users"], "wall s": wall, "CPU s": cpu,
        "skeleton MB/s": skel_mb / res["skeleton_s"], "total MB/s": (skel_mb + comm_mb) / wall,
        "total MB/CPU-s": (skel_mb + comm_mb) / cpu, "rows/s": res["rows"] / wall,
        "peak RSS MB": (res["peak_kb"] or 0) / 1024,
    }


def table(rows: list[dict], markdown: bool) -> str:
    cols = list(rows[0])
    fmt = {"GB": "{:g}", "impressions": "{:,}", "users": "{:,}", "rows/s": "{:,.0f}"}
    cells = [[fmt.get(c, "{:,.1f}").format(r[c]) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, width, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, width, strict=True)) for r in cells]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,2", help="GB of raw text per run, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/esmm-bench-ingest"),
                    help="folder for the raw and ingested files")
    ap.add_argument("--preset", default="aliccp", help="simulator preset")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--block-mb", type=float, default=8.0, help="ingestion block size")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.work).free / 1e9
    if free_gb < 2.2 * max(sizes):
        raise SystemExit(f"{args.work}: {free_gb:.1f} GB free, need about "
                         f"{2.2 * max(sizes):.1f} GB")
    per_row = bytes_per_row(args.work, args.preset, args.seed)
    rows = [run_size(args.work, gb, per_row, args.preset, args.seed,
                     int(args.block_mb * (1 << 20)), args.keep) for gb in sizes]
    cpu = os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        m = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        model = m.group(1).strip() if m else ""
    print(f"esmm data aliccp, preset {args.preset}, block {args.block_mb:g} MB, {cpu} CPUs "
          f"{model}, load average {load}")
    print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
