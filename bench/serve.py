"""Latency and throughput of `esmm serve` for POST /rank.

Starts `esmm serve` on a free loopback port, for a given artifact or for a model it trains in a
minute on simulated Ali-CCP-like data (every Ali-CCP field, the demo's towers), then sends /rank
requests of one user with 1, 10, 100 and 1000 candidates at concurrency 1 and 8 (keep-alive
connections, one client thread per connection), each cell for --seconds, and prints p50 / p99
latency and candidates scored per second.

    python bench/serve.py                      # train, export (onnx), serve, measure
    python bench/serve.py --format torchscript
    python bench/serve.py --artifact model.onnx --seconds 5 --markdown

With --hostile it measures memory instead: it sends rounds of requests at and past every limit
(bodies far over --max-body-bytes, declared and chunked; a body at the limit holding one huge
bag, or tiny items by the hundred thousand, or deep nesting; bags at --max-bag-len) and prints
the server's resident memory (VmRSS) and its peak (VmHWM) from /proc after each round.

    python bench/serve.py --hostile --rounds 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

USER_FIELDS = {"101", "121", "122", "124", "125", "126", "127", "128", "129",
               "109_14", "110_14", "127_14", "150_14"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(work: Path, fmt: str, rows: int) -> tuple[Path, Path]:
    """Simulate data, train the demo's ESMM briefly and export it. Returns (artifact, data)."""
    from esmm.config import config_from_dict
    from esmm.data.simulate import get_preset, write_simulation
    from esmm.demo import demo_config
    from esmm.export import export_run
    from esmm.train import train

    data = work / "sim"
    if not (data / "test" / "impressions.parquet").is_file():
        print(f"simulating {rows} rows into {data} ...", file=sys.stderr)
        write_simulation(data, get_preset("aliccp"), {"train": rows, "test": 5000}, seed=1)
    run = work / "run"
    if not (run / "checkpoints" / "best.pt").is_file():
        print("training ...", file=sys.stderr)
        tree = demo_config(data)
        tree["data"].update(eval=None, test=None)
        tree["train"].update(max_steps=30, progress="off", epochs=1)
        train(config_from_dict(tree), run)
    artifact = work / f"model.{fmt}"
    if not artifact.is_file():
        print(f"exporting {fmt} ...", file=sys.stderr)
        export_run(run, fmt, artifact, parity_rows=256)
    return artifact, data / "test"


def requests_from_data(data: Path, sizes: list[int]) -> dict[int, bytes]:
    """Bodies of /rank requests: one simulated user and the first N test impressions."""
    imp = pq.read_table(data / "impressions.parquet")
    users = pq.read_table(data / "users.parquet").slice(0, 1).to_pylist()[0]
    user = {k: v for k, v in users.items() if k in USER_FIELDS}
    keep = [c for c in imp.column_names
            if c not in {"sample_id", "common_key", "click", "conversion", "p_click",
                         "p_conversion", "conversion_if_clicked"}]
    cands = imp.select(keep).slice(0, max(sizes)).to_pylist()
    return {n: json.dumps({"user": user, "candidates": cands[:n]}).encode() for n in sizes}


def requests_from_metadata(meta: dict, sizes: list[int]) -> dict[int, bytes]:
    """Bodies of /rank requests built from an artifact's field list (synthetic values)."""
    from esmm.export import synthetic_columns
    from esmm.features import FeatureSpec

    spec = FeatureSpec.from_dict(meta["feature_spec"])
    cols = synthetic_columns(spec, max(sizes), seed=3)
    user = {f.name: cols[f.name][0] for f in spec.fields if f.name in USER_FIELDS}
    names = [f.name for f in spec.fields if f.name not in user]
    cands = [{k: cols[k][i] for k in names} for i in range(max(sizes))]
    return {n: json.dumps({"user": user, "candidates": cands[:n]}).encode() for n in sizes}


def start_server(artifact: Path, port: int, workers: int, threads: int, max_items: int | None,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    limit = ["--max-items", str(max_items)] if max_items else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "esmm", "serve", str(artifact), "--port", str(port),
         "--workers", str(workers), "--threads", str(threads), *limit, *extra,
         "--log-level", "warning"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"esmm serve exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("esmm serve did not become healthy in 120 s")


def run_cell(port: int, body: bytes, concurrency: int, seconds: float, warmup: float = 0.5
             ) -> tuple[list[float], float, int]:
    """Latencies (s) of requests sent for ``seconds`` after a warm-up, elapsed time, errors."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = time.perf_counter() + warmup
    stop = start + seconds
    headers = {"content-type": "application/json"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                break
            conn.request("POST", "/rank", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            t1 = time.perf_counter()
            if resp.status != 200:
                errors[i] += 1
            if t0 >= start:
                lat[i].append(t1 - t0)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(time.perf_counter() - start, 1e-9)
    return [x for w in lat for x in w], elapsed, sum(errors)


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process ``pid`` in MiB: resident memory now and its peak so far."""
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) / 1024
    return got["VmRSS"], got["VmHWM"]


def hostile_bodies(meta: dict, limits: dict) -> list[tuple[str, dict, bytes]]:
    """(what, extra headers, body) of requests at and past every limit of the server."""
    from esmm.export import synthetic_columns
    from esmm.features import FeatureSpec

    spec = FeatureSpec.from_dict(meta["feature_spec"])
    cols = synthetic_columns(spec, 1, seed=5)
    row = {f.name: cols[f.name][0] for f in spec.fields}
    bag = next(f.name for f in spec.fields if f.kind == "multi_categorical")
    body_max, bag_max, items_max = (limits["max_body_bytes"], limits["max_bag_len"],
                                    limits["max_items"])
    others = json.dumps({k: v for k, v in row.items() if k != bag}).encode()[:-1]

    def one_bag(ids: bytes, n: int) -> bytes:  # a whole row whose bag holds n ids
        return b'{"impressions": [%s, "%s": [' % (others, bag.encode()) + b",".join(
            [ids] * n) + b"]}]}"

    huge_bag = one_bag(b"123456", 3_000_000)
    n_bag = (body_max - len(others) - 60) // 2
    at_limit_bag = one_bag(b"1", n_bag)
    tiny = b'{"impressions": [' + b",".join([b"{}"] * (body_max // 3 - 10)) + b"]}"
    deep = b'{"impressions": ' + b"[" * (body_max // 2 - 20) + b"]" * (body_max // 2 - 20) + b"}"
    full = row | {bag: list(range(bag_max))}
    n_full = max(1, min(items_max, body_max // len(json.dumps(full))))
    at_limit_items = json.dumps({"impressions": [full] * n_full}).encode()
    return [
        (f"{len(huge_bag) >> 20} MiB body, one bag of 3M ids (Content-Length)", {}, huge_bag),
        (f"{len(huge_bag) >> 20} MiB body, one bag of 3M ids (chunked)",
         {"transfer-encoding": "chunked"}, huge_bag),
        (f"{len(at_limit_bag) >> 10} KiB body, one bag of {n_bag} ids", {}, at_limit_bag),
        (f"{len(tiny) >> 10} KiB body, {body_max // 3 - 10} empty items", {}, tiny),
        (f"{len(deep) >> 10} KiB body, nested {body_max // 2 - 20} deep", {}, deep),
        (f"{len(at_limit_items) >> 10} KiB body, {n_full} items with bags of {bag_max} ids",
         {}, at_limit_items),
    ]


def send_raw(port: int, headers: dict, body: bytes) -> int:
    """POST /predict on a fresh connection (chunked when asked); the answer's status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        if headers.get("transfer-encoding") == "chunked":
            conn.putrequest("POST", "/predict")
            conn.putheader("content-type", "application/json")
            conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            try:
                for i in range(0, len(body), 1 << 16):
                    part = body[i:i + (1 << 16)]
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                conn.send(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed the connection: read its answer
        else:
            try:
                conn.request("POST", "/predict", body=body,
                             headers={"content-type": "application/json"})
            except OSError:
                pass
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def run_hostile(artifact: Path, args: argparse.Namespace) -> None:
    """Rounds of hostile requests; the server's memory after each."""
    port = free_port()
    proc = start_server(artifact, port, 1, args.threads, None)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/metadata")
        limits = json.loads(c.getresponse().read())
        from esmm.export import load_artifact

        bodies = hostile_bodies(load_artifact(artifact).metadata, limits)
        print(f"artifact: {artifact}; limits: " + ", ".join(
            f"{k} {limits[k]}" for k in ("max_body_bytes", "max_items", "max_bag_len",
                                         "max_in_flight")))
        rss, hwm = memory_mib(proc.pid)
        print("| after | requests | statuses | RSS MiB | peak RSS MiB |")
        print("|---|---:|---|---:|---:|")
        print(f"| start (model loaded, warmed up) | 0 | | {rss:.0f} | {hwm:.0f} |")
        for r in range(1, args.rounds + 1):
            statuses = [send_raw(port, h, b) for _, h, b in bodies]
            time.sleep(0.5)  # the server frees a request's memory after sending its answer
            rss, hwm = memory_mib(proc.pid)
            print(f"| round {r} | {len(bodies)} | {' '.join(map(str, statuses))} | {rss:.0f} "
                  f"| {hwm:.0f} |")
        print("requests of a round: " + "; ".join(w for w, _, _ in bodies))
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="Serve this artifact instead of training one.")
    ap.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                    help="Format of the artifact the bench exports (without --artifact).")
    ap.add_argument("--workdir", type=Path, help="Folder for the simulated data, the run and "
                    "the artifact (reused when present; default: a temporary folder).")
    ap.add_argument("--rows", type=int, default=40_000, help="Simulated training rows.")
    ap.add_argument("--seconds", type=float, default=3.0, help="Measured seconds per cell.")
    ap.add_argument("--sizes", default="1,10,100,1000", help="Candidates per request.")
    ap.add_argument("--concurrency", default="1,8", help="Concurrent connections.")
    ap.add_argument("--workers", type=int, default=1, help="esmm serve --workers.")
    ap.add_argument("--threads", type=int, default=1, help="esmm serve --threads.")
    ap.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    ap.add_argument("--hostile", action="store_true", help="Measure the server's memory under "
                    "requests at and past every limit instead of latency.")
    ap.add_argument("--rounds", type=int, default=5, help="Rounds of hostile requests.")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    concs = [int(c) for c in args.concurrency.split(",")]

    tmp = None
    if args.artifact is not None:
        from esmm.export import load_artifact

        artifact = args.artifact
        bodies = requests_from_metadata(load_artifact(artifact).metadata, sizes)
    else:
        if args.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="esmm-bench-")
            work = Path(tmp.name)
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        artifact, data = build_model(work, args.format, args.rows)
        bodies = requests_from_data(data, sizes)

    if args.hostile:
        try:
            run_hostile(artifact, args)
        finally:
            if tmp is not None:
                tmp.cleanup()
        return

    port = free_port()
    proc = start_server(artifact, port, args.workers, args.threads, max(sizes))
    results = []
    try:
        for n in sizes:
            for c in concs:
                lat, elapsed, errors = run_cell(port, bodies[n], c, args.seconds)
                a = np.asarray(lat) * 1e3
                results.append({
                    "candidates": n, "concurrency": c, "requests": len(lat), "errors": errors,
                    "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
                    "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan"),
                    "req_s": len(lat) / elapsed, "cand_s": len(lat) * n / elapsed,
                })
    finally:
        proc.terminate()
        proc.wait(10)
        if tmp is not None:
            tmp.cleanup()

    head = ["candidates", "concurrency", "requests", "p50 ms", "p99 ms", "req/s",
            "candidates/s"]
    rows = [[str(r["candidates"]), str(r["concurrency"]), str(r["requests"]),
             f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['req_s']:.0f}",
             f"{r['cand_s']:.0f}"] for r in results]
    print(f"artifact: {artifact} ({args.seconds:g} s per cell, workers {args.workers}, "
          f"threads {args.threads or 'auto'})")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---:" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    if any(r["errors"] for r in results):
        print(f"errors: {sum(r['errors'] for r in results)} non-200 answers", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
