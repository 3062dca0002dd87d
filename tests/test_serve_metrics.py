"""/metrics through prometheus_client: one set of counters over every worker of `esmm serve`,
read back with Prometheus' own text parser."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from esmm.config import config_from_dict
from esmm.export import export_run, load_artifact
from esmm.serve import Limits, create_app
from esmm.train import train
from tests.conftest import small_config

MAX_ITEMS = 5
ROWS = 3  # impressions per /predict request


def _good(i=0):
    return {"101": i, "205": 17, "206": 4, "121": 2, "109_14": [1, 2], "d1": 0.5}


BODY = {"impressions": [_good(i) for i in range(ROWS)]}


@pytest.fixture(scope="module")
def artifact(flat_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics")
    train(config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=3)),
          d / "run")
    export_run(d / "run", "onnx", d / "model.onnx", parity_rows=16)
    return d / "model.onnx"


def _samples(text):
    """{(sample name, frozenset of labels): value} of a /metrics answer, parsed by Prometheus'
    own parser (a malformed exposition raises)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


# ----------------------------------------------------------------------------- one process


def test_one_process_counts_requests_items_and_each_refusal(artifact):
    limits = Limits(max_items=MAX_ITEMS, max_body_bytes=4096, max_bag_len=4)
    client = TestClient(create_app(load_artifact(artifact), limits))
    assert client.post("/predict", json=BODY).status_code == 200
    assert client.post("/predict", json={"impressions": [_good()] * 6}).status_code == 413
    assert client.post("/rank", json={"candidates": [_good()] * 6}).status_code == 413
    long_bag = {"impressions": [_good() | {"109_14": [1] * 5}]}
    assert client.post("/predict", json=long_bag).status_code == 413
    assert client.post("/predict", content=b" " * 5000).status_code == 413
    assert client.post("/predict", json={"impressions": []}).status_code == 422
    s = _samples(client.get("/metrics").text)
    assert _value(s, "esmm_requests_total", endpoint="/predict", status="200") == 1
    assert _value(s, "esmm_requests_total", endpoint="/predict", status="413") == 3
    assert _value(s, "esmm_requests_total", endpoint="/rank", status="413") == 1
    assert _value(s, "esmm_requests_total", endpoint="/predict", status="422") == 1
    assert _value(s, "esmm_request_duration_seconds_count", endpoint="/predict") == 5
    assert _value(s, "esmm_items_scored_total", endpoint="/predict") == ROWS
    assert _value(s, "esmm_requests_refused_total", limit="max_items") == 2
    assert _value(s, "esmm_requests_refused_total", limit="max_bag_len") == 1
    assert _value(s, "esmm_requests_refused_total", limit="max_body_bytes") == 1
    assert _value(s, "esmm_workers") == 1 and _value(s, "esmm_requests_in_flight") == 0
    # the first /metrics read is counted once it is answered
    s = _samples(client.get("/metrics").text)
    assert _value(s, "esmm_requests_total", endpoint="/metrics", status="200") == 1
    om = client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")


# ----------------------------------------------------------------------------- esmm serve --workers


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(artifact, env, workers=2):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "esmm", "serve", str(artifact), "--port", str(port),
         "--workers", str(workers), "--threads", "1", "--max-items", str(MAX_ITEMS),
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.2)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                         env.get("PYTHONPATH", "")])
    return env | extra


def _predict(url):
    # a new connection per request, so the kernel hands each to whichever worker accepts
    r = httpx.post(f"{url}/predict", json=BODY, headers={"connection": "close"}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _per_worker(folder):
    """{pid: /predict requests that worker answered}, read from each worker's own file."""
    counts = {}
    for f in Path(folder).glob("counter_*.db"):
        pid = int(f.stem.rpartition("_")[2])
        for metric in MultiProcessCollector.merge([str(f)]):
            for s in metric.samples:
                if s.name == "esmm_requests_total" and s.labels["endpoint"] == "/predict":
                    counts[pid] = counts.get(pid, 0) + s.value
    return counts


def _until_both_workers_served(url, folder, pool, max_rounds=40):
    """Send /predict requests 8 at a time until both workers have answered some; the number
    sent."""
    sent = 0
    for _ in range(max_rounds):
        list(pool.map(lambda _: _predict(url), range(8)))
        sent += 8
        per_worker = _per_worker(folder)
        if len(per_worker) == 2 and min(per_worker.values()) > 0:
            return sent, per_worker
    raise AssertionError(f"/predict answers by worker after {sent} requests: {per_worker}")


def test_workers_report_one_set_of_counters(artifact, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, url = _start(artifact, _env(TMPDIR=str(tmp)))
    try:
        # the private folder: made by the parent before the workers started, owner only
        (folder,) = tmp.glob("esmm-metrics-*")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        with ThreadPoolExecutor(8) as pool:
            sent, per_worker = _until_both_workers_served(url, folder, pool)
            assert sum(per_worker.values()) == sent
            reads = 0
            for _ in range(3):
                list(pool.map(lambda _: _predict(url), range(4)))
                sent += 4
                text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
                s = _samples(text)
                assert _value(s, "esmm_requests_total", endpoint="/predict",
                              status="200") == sent
                assert _value(s, "esmm_request_duration_seconds_count",
                              endpoint="/predict") == sent
                assert _value(s, "esmm_items_scored_total", endpoint="/predict") == sent * ROWS
                assert _value(s, "esmm_requests_total", endpoint="/metrics",
                              status="200") == reads
                assert _value(s, "esmm_requests_total", endpoint="/health", status="200") == 1
                assert _value(s, "esmm_workers") == 2
                reads += 1
        over = httpx.post(f"{url}/predict", json={"impressions": [_good()] * (MAX_ITEMS + 1)})
        assert over.status_code == 413
        s = _samples(httpx.get(f"{url}/metrics").text)
        assert _value(s, "esmm_requests_refused_total", limit="max_items") == 1
        assert _value(s, "esmm_requests_total", endpoint="/predict", status="413") == 1
        info = [k for k in s if k[0] == "esmm_model_info"]
        assert len(info) == 1 and ("format", "onnx") in info[0][1]  # one series, not one a worker
    finally:
        rc = _stop(proc)
    assert rc == 0, proc.stderr.read().decode()
    assert not folder.exists()  # removed at exit


def test_operator_folder_kept_and_killed_worker_marked_dead(artifact, tmp_path):
    folder = tmp_path / "prom"
    folder.mkdir()
    proc, url = _start(artifact, _env(PROMETHEUS_MULTIPROC_DIR=str(folder)))
    try:
        with ThreadPoolExecutor(8) as pool:
            sent, per_worker = _until_both_workers_served(url, folder, pool)
        victim = min(per_worker)
        os.kill(victim, signal.SIGKILL)
        # uvicorn starts a replacement; the dead worker's live gauges leave, its counts stay
        deadline = time.monotonic() + 40
        while True:
            s = _samples(httpx.get(f"{url}/metrics", headers={"connection": "close"}).text)
            live = list(folder.glob(f"gauge_live*_{victim}.db"))
            pids = {int(f.stem.rpartition("_")[2]) for f in folder.glob("gauge_livesum_*.db")}
            if not live and len(pids) == 2 and _value(s, "esmm_workers") == 2:
                break
            assert time.monotonic() < deadline, (live, pids, _value(s, "esmm_workers"))
            time.sleep(0.5)
        assert victim not in pids
        assert _value(s, "esmm_requests_total", endpoint="/predict", status="200") == sent
    finally:
        rc = _stop(proc)
    assert rc == 0, proc.stderr.read().decode()
    assert folder.is_dir() and list(folder.glob("counter_*.db"))  # the operator's: kept
    assert not list(folder.glob("gauge_live*.db"))  # every worker marked dead at exit


def test_unusable_multiproc_dir_is_refused_before_loading(artifact, tmp_path):
    missing = tmp_path / "nope"
    res = subprocess.run(
        [sys.executable, "-m", "esmm", "serve", str(artifact), "--port", str(_free_port()),
         "--workers", "2"], env=_env(PROMETHEUS_MULTIPROC_DIR=str(missing)),
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"esmm: error: PROMETHEUS_MULTIPROC_DIR={missing}: not a folder; create it "
                     "or unset the variable (esmm serve then uses a private temporary folder)"]


def test_one_worker_uses_the_operator_folder_and_leaves_it_marked_dead(artifact, tmp_path):
    folder = tmp_path / "prom"
    folder.mkdir()
    proc, url = _start(artifact, _env(PROMETHEUS_MULTIPROC_DIR=str(folder)), workers=1)
    try:
        _predict(url)
        s = _samples(httpx.get(f"{url}/metrics").text)
        assert _value(s, "esmm_requests_total", endpoint="/predict", status="200") == 1
        assert _value(s, "esmm_workers") == 1
        assert list(folder.glob(f"gauge_livesum_{proc.pid}.db"))  # the server's own files
    finally:
        _stop(proc)
    assert list(folder.glob(f"counter_{proc.pid}.db"))
    assert not list(folder.glob("gauge_live*.db"))
