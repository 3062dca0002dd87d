"""The scoring server, run as a real `esmm serve` process on a loopback port."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.export import export_run
from esmm.models import model_names
from esmm.serve import hide_paths, run_name
from esmm.train import train
from tests.conftest import ATTENTION_FEATURES, small_config

FIELDS = ["101", "205", "206", "121", "109_14", "d1"]
USER_FIELDS = ["101", "121", "109_14"]
MAX_ITEMS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(artifact, *args):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "esmm", "serve", str(artifact), "--port", str(port),
         "--threads", "1", "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()}")
        try:
            if client.get("/health").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.2)


def _stop(proc, client):
    client.close()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def run_dir(flat_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "run"
    train(config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=30)), d)
    return d


@pytest.fixture(scope="module")
def onnx_path(run_dir):
    p = run_dir.parent / "model.onnx"
    export_run(run_dir, "onnx", p, parity_rows=64)
    return p


@pytest.fixture(scope="module")
def server(onnx_path):
    proc, client = _start(onnx_path, "--max-items", str(MAX_ITEMS))
    yield client
    _stop(proc, client)


@pytest.fixture(scope="module")
def rows_and_reference(run_dir, flat_data, tmp_path_factory):
    """40 validation rows as JSON impressions and their `esmm predict` output."""
    d = tmp_path_factory.mktemp("pred")
    head = pq.read_table(flat_data["valid"]).slice(0, 40)
    pq.write_table(head, d / "rows.parquet")
    res = CliRunner().invoke(app, ["predict", str(run_dir), "--data", str(d / "rows.parquet"),
                                   "--out", str(d / "preds.parquet")])
    assert res.exit_code == 0, res.output
    ref = pq.read_table(d / "preds.parquet").to_pydict()
    rows = head.select(FIELDS).to_pylist()
    return rows, {k: np.asarray(v) for k, v in ref.items()}


def _probs(items):
    return {k: np.array([it[k] for it in items]) for k in ("p_ctr", "p_cvr", "p_ctcvr")}


def test_predict_matches_esmm_predict(server, rows_and_reference):
    rows, ref = rows_and_reference
    r = server.post("/predict", json={"impressions": rows})
    assert r.status_code == 200, r.text
    got = _probs(r.json()["predictions"])
    for k, v in got.items():
        np.testing.assert_allclose(v, ref[k], atol=1e-5, rtol=0)


def test_torchscript_server_agrees_and_shows_paths_when_asked(run_dir, rows_and_reference,
                                                             flat_data):
    rows, ref = rows_and_reference
    path = run_dir.parent / "model.pt"
    export_run(run_dir, "torchscript", path, parity_rows=32)
    proc, client = _start(path, "--show-paths")
    try:
        got = _probs(client.post("/predict", json={"impressions": rows}).json()["predictions"])
        meta = client.get("/metadata").json()
        description = client.get("/openapi.json").json()["info"]["description"]
    finally:
        _stop(proc, client)
    np.testing.assert_allclose(got["p_ctcvr"], ref["p_ctcvr"], atol=1e-5, rtol=0)
    assert meta["format"] == "torchscript"
    # --show-paths: the operator asked for the paths, so they are there, in full
    assert meta["paths"]["run"] == str(run_dir) and str(run_dir) in description
    assert meta["paths"]["artifact"] == str(path.resolve())
    assert meta["paths"]["data"]["eval"] == str(flat_data["valid"])
    assert meta["metrics"]["data"] == str(flat_data["valid"])


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_metadata_and_openapi_publish_names_not_paths(server, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    for url in ("/metadata", "/openapi.json"):
        r = server.get(url)
        assert r.status_code == 200
        for root in {str(base), str(base.resolve()), "/tmp/"}:
            assert root not in r.text, (url, root)
        for text in _strings(r.json()):
            assert not text.startswith("/") or text in ("/predict", "/rank", "/health",
                                                        "/metadata", "/metrics"), (url, text)
    meta = server.get("/metadata").json()
    assert "paths" not in meta
    assert all("/" not in s for s in meta["parity"]["row_sets"])
    assert "64 eval rows of valid.parquet" in meta["parity"]["row_sets"]
    assert "the run `run`" in server.get("/openapi.json").json()["info"]["description"]


def _listening(port):
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    raw = bytes.fromhex(addr)
                    if len(raw) == 4:
                        found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:  # four little-endian 32-bit words
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
def test_binds_loopback_by_default(server):
    # the `server` fixture starts `esmm serve` without --host
    assert _listening(server.base_url.port) == ["127.0.0.1"]


def _rank_request(rows, user_row=0, **kw):
    user = {k: rows[user_row][k] for k in USER_FIELDS}
    cands = [{k: v for k, v in r.items() if k not in USER_FIELDS} for r in rows]
    return {"user": user, "candidates": cands, **kw}, [r | user for r in rows]


def test_rank_orders_by_ctcvr_and_equals_predict(server, rows_and_reference):
    rows, _ = rows_and_reference
    req, full = _rank_request(rows[:30], user_row=3)
    r = server.post("/rank", json=req)
    assert r.status_code == 200, r.text
    ranked = r.json()["candidates"]
    assert sorted(c["index"] for c in ranked) == list(range(30))
    scores = [c["score"] for c in ranked]
    assert scores == sorted(scores, reverse=True)
    pred = server.post("/predict", json={"impressions": full}).json()["predictions"]
    for c in ranked:
        for k in ("p_ctr", "p_cvr", "p_ctcvr"):
            assert c[k] == pytest.approx(pred[c["index"]][k], abs=1e-6)
        assert c["score"] == c["p_ctcvr"]


def test_rank_weights_and_top_k(server, rows_and_reference):
    rows, _ = rows_and_reference
    req, _ = _rank_request(rows[:20], score={"p_ctr": 1.0, "p_cvr": 0.5}, top_k=5)
    ranked = server.post("/rank", json=req).json()["candidates"]
    assert len(ranked) == 5
    for c in ranked:
        assert c["score"] == pytest.approx(c["p_ctr"] + 0.5 * c["p_cvr"], abs=1e-12)
    full, _ = _rank_request(rows[:20], score={"p_ctr": 1.0, "p_cvr": 0.5})
    every = server.post("/rank", json=full).json()["candidates"]
    assert [c["index"] for c in every[:5]] == [c["index"] for c in ranked]
    assert min(c["score"] for c in ranked) >= max(c["score"] for c in every[5:])


def _good():
    return {"101": 1, "205": 17, "206": 4, "121": 2, "109_14": [1, 2], "d1": 0.5}


BAD_PREDICT = [
    ({"impressions": []}, 422, "impressions", None),
    ({"impressions": [_good()] * (MAX_ITEMS + 1)}, 413, "impressions", None),
    ({"impressions": [_good(), {k: v for k, v in _good().items() if k != "206"}]},
     422, "206", 1),
    ({"impressions": [_good(), _good(), _good() | {"101": {"id": 1}}]}, 422, "101", 2),
    ({"impressions": [_good() | {"d1": "0.5"}]}, 422, "d1", 0),
    ({"impressions": [_good(), _good() | {"d1": None}]}, 422, "d1", 1),
    ({"impressions": [_good() | {"109_14": 5}]}, 422, "109_14", 0),
    ({"impressions": [_good(), _good() | {"109_14": [1, [2]]}]}, 422, "109_14", 1),
    ({"impressions": [_good() | {"121": 2**64}]}, 422, "121", 0),
    ({"impressions": [_good() | {"205": True}]}, 422, "205", 0),
    ({"impressions": [_good() | {"205": 1.5}]}, 422, "205", 0),
    ({"impressions": [_good(), 7]}, 422, "impressions", 1),
    ({"impressions": {"101": 1}}, 422, "impressions", None),
    ({"rows": []}, 422, "impressions", None),
]

BAD_RANK = [
    ({"user": {"101": 1}, "candidates": []}, 422, "candidates", None),
    ({"user": {"101": [1]}, "candidates": [_good()]}, 422, "101", None),
    ({"user": {"101": 1}, "candidates": [{"205": 1}]}, 422, "206", 0),
    ({"user": {"101": 1}, "candidates": [{k: v for k, v in _good().items() if k != "101"},
                                         _good()]}, 422, "101", 1),
    ({"candidates": [_good()], "score": {"p_click": 1.0}}, 422, "p_click", None),
    ({"candidates": [_good()], "top_k": 0}, 422, "top_k", None),
    ({"candidates": [_good()], "score": {"p_ctr": 1.7e308, "p_cvr": 1.7e308}}, 422, "p_ctr",
     None),
    ({"candidates": [_good()] * (MAX_ITEMS + 1)}, 413, "candidates", None),
]


@pytest.mark.parametrize("endpoint,body,status,field,index",
                         [("/predict", *c) for c in BAD_PREDICT]
                         + [("/rank", *c) for c in BAD_RANK])
def test_bad_input_gets_4xx_naming_field_and_index(server, endpoint, body, status, field, index):
    r = server.post(endpoint, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["index"] == index, err
    assert field in err["error"]
    if index is not None:
        assert f"[{index}]" in err["error"]
    assert server.get("/health").status_code == 200


def test_not_json_and_good_requests_after_bad_ones(server):
    r = server.post("/predict", content=b"{not json", headers={"content-type":
                                                               "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = server.post("/predict", json={"impressions": [_good(), _good() | {"109_14": None}]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_unknown_ids_are_scored_and_string_ids_of_an_integer_field_refused(server):
    good = _good()
    r = server.post("/predict", json={"impressions": [
        good, good | {"101": -(2**63), "205": 10**15, "109_14": []}]})
    assert r.status_code == 200
    p = r.json()["predictions"]
    assert all(0 < x["p_ctcvr"] <= x["p_ctr"] for x in p)
    # "17" would hash to another bucket than the 17 of training: refused, not scored wrong.
    r = server.post("/predict", json={"impressions": [good, good | {"205": "17"}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("impressions[1].205: expected an integer id, got a "
                                        "string ('17')"), r.text


def test_health_metadata_metrics_docs(server, run_dir):
    meta = server.get("/metadata").json()
    assert meta["model"] == "esmm" and meta["format"] == "onnx"
    assert [f["kind"] for f in meta["fields"]][4] == "multi_categorical"
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert meta["metrics"] == trained | {"data": "valid.parquet"}  # the file's name, not path
    assert meta["esmm_version"]
    assert meta["run"] == "run" and meta["artifact"] == "model.onnx"
    assert (meta["max_items"], meta["max_bag_len"]) == (MAX_ITEMS, 10_000)
    assert meta["max_body_bytes"] == 1 << 20  # 1 KiB per item, at least 1 MiB
    server.post("/predict", json={"impressions": []})
    text = server.get("/metrics").text
    assert 'esmm_requests_total{endpoint="/predict",status="422"}' in text
    assert 'esmm_requests_total{endpoint="/predict",status="200"}' in text
    assert "# TYPE esmm_request_duration_seconds histogram" in text
    assert 'esmm_request_duration_seconds_bucket{endpoint="/rank",le="+Inf"}' in text
    assert server.get("/docs").status_code == 200
    spec = server.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"PredictRequest", "PredictResponse", "RankRequest", "RankResponse"} <= set(schemas)
    body = spec["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]
    example = next(iter(body["examples"].values()))["value"]
    assert set(example["user"]) | set(example["candidates"][0]) == set(FIELDS)


_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5))
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8)
_item = st.dictionaries(st.sampled_from(FIELDS + ["x"]), _json, max_size=7) | st.fixed_dictionaries(
    {"101": _json, "205": _json, "206": _json, "121": _json, "109_14": _json, "d1": _json})
_body = (st.fixed_dictionaries({"impressions": st.lists(_item, max_size=4)}) | _json
         | st.fixed_dictionaries({"impressions": _json}))


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=_body)
def test_random_json_never_5xx(server, body):
    r = server.post("/predict", json=body)
    assert r.status_code < 500, (body, r.text)
    assert r.status_code in (200, 413, 422), r.text


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_is_served_as_esmm_predict_scores(flat_data, tmp_path, name):
    from fastapi.testclient import TestClient

    from esmm.export import load_artifact
    from esmm.serve import create_app

    cfg = small_config(flat_data["train"], max_steps=3)
    cfg["model"]["name"] = name
    cfg["features"] = ATTENTION_FEATURES  # every model over an attention-pooled bag too
    train(config_from_dict(cfg), tmp_path / "run")
    export_run(tmp_path / "run", "onnx", tmp_path / "m.onnx", parity_rows=32)
    head = pq.read_table(flat_data["valid"]).slice(0, 20)
    pq.write_table(head, tmp_path / "rows.parquet")
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--data",
                                   str(tmp_path / "rows.parquet"), "--out",
                                   str(tmp_path / "preds.parquet")])
    assert res.exit_code == 0, res.output
    ref = pq.read_table(tmp_path / "preds.parquet").to_pydict()
    with TestClient(create_app(load_artifact(tmp_path / "m.onnx"))) as client:
        r = client.post("/predict", json={"impressions": head.select(FIELDS).to_pylist()})
        assert r.status_code == 200, r.text
        assert client.get("/metadata").json()["model"] == name
    got = _probs(r.json()["predictions"])
    for k, v in got.items():
        np.testing.assert_allclose(v, ref[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.parametrize("run,name", [
    ("/data/runs/esmm", "esmm"), ("runs/esmm/", "esmm"), ("runs/esmm/checkpoints/best.pt", "esmm"),
    ("C:\\runs\\esmm\\checkpoints\\best.pt", "esmm"), ("esmm", "esmm"), (None, None),
    ("/data/model.pt", "model.pt"),
])
def test_run_name(run, name):
    assert run_name(run) == name


def test_hide_paths_cuts_known_and_absolute_paths_to_names():
    known = ["data/sim/valid", "/abs/runs/r1"]
    value = {"data": "data/sim/valid", "sets": ["512 eval rows of data/sim/valid",
                                                "rows of /srv/x/test.parquet, and more",
                                                "C:\\Users\\me\\train.csv", "~/d/v.parquet"],
             "metric": "ctr_logloss+ctcvr_logloss", "ratio": "a/b", "n": 3}
    assert hide_paths(value, known) == {
        "data": "valid", "sets": ["512 eval rows of valid", "rows of test.parquet, and more",
                                  "train.csv", "v.parquet"],
        "metric": "ctr_logloss+ctcvr_logloss", "ratio": "a/b", "n": 3}
