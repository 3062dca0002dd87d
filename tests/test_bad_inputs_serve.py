"""Hostile and malformed input to `esmm serve`: request limits, a fuzz of the HTTP API with the
server's memory measured, and artifacts whose metadata was tampered with.

The server runs as a real `esmm serve` process on a loopback port with small limits, so the
limits are reached with small requests.
"""

import json
import os
import socket
import subprocess
import sys
import time

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.export import export_run
from esmm.serve import read_artifact_metadata
from esmm.train import train
from tests.conftest import small_config
from tests.test_serve import _free_port, _start, _stop

FIELDS = ["101", "205", "206", "121", "109_14", "d1"]
MAX_ITEMS, MAX_BODY, MAX_BAG = 20, 256 * 1024, 100
OK_STATUSES = {200, 400, 413, 422}


def _good(**kw):
    return {"101": 1, "205": 17, "206": 4, "121": 2, "109_14": [1, 2], "d1": 0.5} | kw


@pytest.fixture(scope="module")
def run_dir(flat_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_bad") / "run"
    train(config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=20)), d)
    return d


@pytest.fixture(scope="module")
def artifacts(run_dir):
    out = {}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        out[fmt] = run_dir.parent / name
        export_run(run_dir, fmt, out[fmt], parity_rows=32)
    return out


@pytest.fixture(scope="module")
def served(artifacts):
    proc, client = _start(artifacts["onnx"], "--max-items", str(MAX_ITEMS), "--max-body-bytes",
                          str(MAX_BODY), "--max-bag-len", str(MAX_BAG))
    yield proc, client
    _stop(proc, client)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


# ----------------------------------------------------------------------------- raw HTTP


def _closes(s):
    """Whether the server closes the connection within 2 s (an idle keep-alive one lasts 5)."""
    s.settimeout(2.0)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _raw(port, head, chunks=(), timeout=20.0):
    """Send ``head`` and ``chunks`` on one connection, then read a response; returns (status,
    body bytes, whether the server closed the connection after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        data, closed = b"", False
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not part:
                closed = True
                break
            data += part
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = [int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(data) >= head_end + 4 + length[0]:
                    closed = _closes(s)
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data[data.find(b"\r\n\r\n") + 4:], closed


def _head(port, extra):
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def test_declared_length_over_the_limit_is_refused_before_the_body(server):
    port = server.base_url.port
    t0 = time.monotonic()
    status, body, _ = _raw(port, _head(port, "Content-Length: 80000000\r\n"))
    # answered at once, although not one byte of the 80 MB body was sent
    assert status == 413 and time.monotonic() - t0 < 10
    err = json.loads(body)
    assert err["field"] == "body" and "80000000 bytes" in err["error"]
    assert f"limit of {MAX_BODY} bytes (--max-body-bytes)" in err["error"]
    # with Expect: 100-continue the client is told no before it sends anything
    status, _, closed = _raw(port, _head(port, "Content-Length: 80000000\r\n"
                                               "Expect: 100-continue\r\n"))
    assert status == 413 and closed
    # a GET is no way round: its body is held to the same limit
    head = "GET /metadata HTTP/1.1\r\nHost: x\r\nContent-Length: 80000000\r\n\r\n"
    assert _raw(port, head.encode())[0] == 413


def test_chunked_body_is_counted_as_it_streams(server):
    port = server.base_url.port
    chunk = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB of JSON whitespace per chunk
    n = MAX_BODY // 0x2000 + 1
    t0 = time.monotonic()
    # one chunk past the limit and no final chunk: the server must answer without the end
    status, body, closed = _raw(port, _head(port, "Transfer-Encoding: chunked\r\n"),
                                [chunk] * n)
    assert status == 413 and closed and time.monotonic() - t0 < 10
    assert "--max-body-bytes" in json.loads(body)["error"]
    # a chunked body under the limit is read to its end and scored
    doc = json.dumps({"impressions": [_good()]}).encode()
    chunks = [f"{len(doc):x}\r\n".encode() + doc + b"\r\n", b"0\r\n\r\n"]
    status, body, _ = _raw(port, _head(port, "Transfer-Encoding: chunked\r\n"
                                             "Connection: close\r\n"), chunks)
    assert status == 200 and len(json.loads(body)["predictions"]) == 1


def test_body_limit_boundary(server):
    doc = json.dumps({"impressions": [_good()]}).encode()
    at_limit = doc + b" " * (MAX_BODY - len(doc))
    headers = {"content-type": "application/json"}
    assert server.post("/predict", content=at_limit, headers=headers).status_code == 200
    r = server.post("/predict", content=at_limit + b" ", headers=headers)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert server.get("/health").status_code == 200
    metrics = server.get("/metrics").text
    assert 'esmm_requests_total{endpoint="/predict",status="413"}' in metrics


# ----------------------------------------------------------------------------- items and bags


def test_item_count_is_checked_before_any_item(server):
    # every item is invalid, yet the answer is about their count: nothing else was looked at
    r = server.post("/predict", json={"impressions": [7] * (MAX_ITEMS + 1)})
    assert r.status_code == 413, r.text
    assert r.json() == {"error": f"impressions: {MAX_ITEMS + 1} items is over the limit of "
                                 f"{MAX_ITEMS} per request (--max-items)",
                        "field": "impressions", "index": None}
    r = server.post("/rank", json={"candidates": [None] * (MAX_ITEMS + 5)})
    assert r.status_code == 413 and r.json()["field"] == "candidates"
    schema = server.get("/openapi.json").json()["components"]["schemas"]
    assert schema["PredictRequest"]["properties"]["impressions"]["maxItems"] == MAX_ITEMS
    assert schema["RankRequest"]["properties"]["candidates"]["maxItems"] == MAX_ITEMS


def test_bag_length_limit(server):
    at_limit = list(range(MAX_BAG))
    r = server.post("/predict", json={"impressions": [_good(**{"109_14": at_limit})] * 2})
    assert r.status_code == 200
    over = at_limit + [0]
    # checked before the values: the over-long bag's bad element is not what is reported
    r = server.post("/predict", json={"impressions": [_good(), _good(**{"109_14": over + ["x",
                                                                                          []]})]})
    assert r.status_code == 413
    assert r.json() == {"error": f"impressions[1].109_14: a bag of {MAX_BAG + 3} ids is over "
                                 f"the limit of {MAX_BAG} ids per bag (--max-bag-len)",
                        "field": "109_14", "index": 1}
    cand = {k: v for k, v in _good().items() if k != "109_14"}
    r = server.post("/rank", json={"user": {"109_14": over}, "candidates": [cand]})
    assert r.status_code == 413 and r.json()["field"] == "109_14"
    assert r.json()["error"].startswith("user.109_14: a bag of 101 ids")
    r = server.post("/rank", json={"candidates": [_good(), _good(**{"109_14": over})]})
    assert r.status_code == 413 and r.json()["index"] == 1


def test_limits_are_published(server):
    meta = server.get("/metadata").json()
    assert (meta["max_items"], meta["max_body_bytes"], meta["max_bag_len"]) == (
        MAX_ITEMS, MAX_BODY, MAX_BAG)
    assert meta["max_in_flight"] == 4  # the default


@pytest.mark.parametrize("option", ["--max-body-bytes", "--max-bag-len", "--max-items",
                                    "--max-in-flight"])
def test_limit_options_must_be_positive(option, artifacts):
    res = CliRunner().invoke(app, ["serve", str(artifacts["onnx"]), option, "0"])
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- fuzz


_scalars = (st.none() | st.booleans() | st.integers(-(2**80), 2**80)
            | st.integers(-(2**63), 2**63 - 1)
            | st.floats() | st.floats(min_value=1e30) | st.text(max_size=30)
            | st.just("x" * 200_000))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=8)
                       | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)
_bags = st.lists(st.integers(-(2**63), 2**63 - 1) | st.text(max_size=4), min_size=0,
                 max_size=MAX_BAG + 3)
_item = st.fixed_dictionaries({k: _values for k in FIELDS}) | st.fixed_dictionaries(
    {k: (_bags if k == "109_14" else _values) for k in FIELDS}) | st.dictionaries(
    st.sampled_from([*FIELDS, "x"]), _values, max_size=7)
_items = st.lists(_item, max_size=MAX_ITEMS + 2)
_predict = st.fixed_dictionaries({"impressions": _items | _values})
_rank = st.fixed_dictionaries({"candidates": _items | _values},
                              optional={"user": _item | _values, "score": _values,
                                        "top_k": _values})


def _nested(depth, kind):
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1"
                                                              + "}" * depth)


_raw_bodies = (
    st.binary(max_size=300)
    | st.builds(lambda d, k: f'{{"impressions": {_nested(d, k)}}}'.encode(),
                st.integers(1, 100_000), st.sampled_from(["list", "dict"]))
    | st.builds(lambda n: ('{"impressions": [{"101": ' + "9" * n + "}]}").encode(),
                st.integers(1, 100_000))
    | st.builds(lambda n: ('{"impressions": [' + ",".join(["{}"] * n) + "]}").encode(),
                st.integers(0, 100_000))
)


def test_fuzz_never_5xx_and_memory_stays_bounded(served):
    proc, server = served
    before, _ = _memory(proc.pid)

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(endpoint=st.sampled_from(["/predict", "/rank"]),
           body=_predict | _rank | _values, raw=st.none() | _raw_bodies)
    def fuzz(endpoint, body, raw):
        if raw is None:
            raw = json.dumps(body).encode()  # NaN and Infinity too, as Python writes them
        r = server.post(endpoint, content=raw, headers={"content-type": "application/json"})
        assert r.status_code in OK_STATUSES, (r.status_code, r.text[:300])
        err = r.json().get("error") if r.status_code != 200 else None
        assert err is None or ("\n" not in err and len(err) < 1000)

    fuzz()
    after, _ = _memory(proc.pid)
    # bodies of at most MAX_BODY (256 KiB): what stays after 120 of them is allocator noise
    assert after - before < 30 << 20, (before >> 20, after >> 20)


def _memory(pid):
    """(VmRSS, VmHWM) of ``pid`` in bytes: resident memory now, and its peak so far."""
    time.sleep(0.5)  # the server frees a request's memory after it has sent the answer
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got[key] = int(value.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]


def _heavy_bodies(limit):
    """Bodies at ``limit`` bytes that cost the server the most: hundreds of thousands of
    objects to decode, a deep nesting, or as many bag ids as fit, scored."""
    tiny_items = b'{"impressions": [' + b",".join([b"{}"] * (limit // 3 - 10)) + b"]}"
    deep = b'{"impressions": ' + b"[" * (limit // 2 - 20) + b"]" * (limit // 2 - 20) + b"}"
    row = _good(**{"109_14": list(range(1000, 10_000))})
    n = limit // len(json.dumps(row))
    bags = json.dumps({"impressions": [row] * n}).encode()
    return [tiny_items, deep, bags]


def test_memory_comes_back_after_hostile_requests(artifacts):
    limit = 4 << 20
    proc, server = _start(artifacts["onnx"], "--max-body-bytes", str(limit))
    try:
        bodies = _heavy_bodies(limit)
        headers = {"content-type": "application/json"}
        start, _ = _memory(proc.pid)
        rounds = []
        for _ in range(4):
            statuses = [server.post("/predict", content=b, headers=headers).status_code
                        for b in bodies]
            assert statuses == [413, 400, 200], statuses
            rounds.append(_memory(proc.pid))
        # a body of a byte more than the limit, 900 MB declared: refused unread
        port = server.base_url.port
        assert _raw(port, _head(port, "Content-Length: 900000000\r\n"))[0] == 413
    finally:
        _stop(proc, server)
    (first, _), (last, peak) = rounds[0], rounds[-1]
    mib = {k: v >> 20 for k, v in dict(start=start, first=first, last=last, peak=peak).items()}
    print(f"server RSS MiB: {mib}")
    # each round took its hundreds of MB (the peak) and gave most of them back (kept, without
    # the trimming: three quarters), and later rounds add little (without: 40 MiB a round)
    assert peak - start > 100 << 20, mib
    assert last - start < (peak - start) / 2, mib
    assert last - first < 40 << 20, mib


# ----------------------------------------------------------------------------- artifacts


def _edit_metadata(src, dst, edit):
    """Copy artifact ``src`` to ``dst`` with its esmm metadata passed through ``edit``."""
    if src.suffix == ".onnx":
        proto = onnx.load(str(src))
        entry = next(p for p in proto.metadata_props if p.key == "esmm.json")
        entry.value = edit(entry.value)
        onnx.save_model(proto, str(dst))
    else:
        extra = {"esmm.json": ""}
        module = torch.jit.load(str(src), _extra_files=extra)
        torch.jit.save(module, str(dst), _extra_files={"esmm.json": edit(extra["esmm.json"])})
    return dst


def _meta_edit(fn):
    def edit(text):
        meta = json.loads(text)
        fn(meta)
        return json.dumps(meta)
    return edit


def _set_buckets(meta, value, i=3):
    meta["feature_spec"]["fields"][i]["buckets"] = value


BAD_METADATA = [
    ("huge buckets", _meta_edit(lambda m: _set_buckets(m, 10**12)),
     "metadata field feature_spec.fields[3].buckets: 1000000000000 buckets for field '121'"),
    ("bag buckets", _meta_edit(lambda m: _set_buckets(m, 10**9, i=4)),
     "feature_spec.fields[4].buckets: 1000000000 buckets for field '109_14'"),
    ("buckets past int64", _meta_edit(lambda m: _set_buckets(m, 2**70)),
     "feature_spec.fields[3].buckets: expected an integer from 1 to 9223372036854775807"),
    ("buckets a string", _meta_edit(lambda m: _set_buckets(m, "10")),
     "feature_spec.fields[3].buckets: expected an integer from 1"),
    ("buckets zero", _meta_edit(lambda m: _set_buckets(m, 0)),
     "feature_spec.fields[3].buckets: expected an integer from 1"),
    ("unknown dtype", _meta_edit(lambda m: m["feature_spec"]["fields"][3].update(dtype="float")),
     "feature_spec.fields[3].dtype: expected one of ['auto', 'int', 'str'], got 'float'"),
    ("no feature_spec", _meta_edit(lambda m: m.pop("feature_spec")),
     "metadata field feature_spec: missing"),
    ("feature_spec a list", _meta_edit(lambda m: m.update(feature_spec=[])),
     "metadata field feature_spec: expected an object, got array"),
    ("no fields", _meta_edit(lambda m: m["feature_spec"].update(fields=[])),
     "metadata field feature_spec.fields: expected a non-empty list"),
    ("field missing a key", _meta_edit(lambda m: m["feature_spec"]["fields"][0].pop("dim")),
     "metadata field feature_spec.fields[0].dim: missing"),
    ("unknown kind", _meta_edit(lambda m: m["feature_spec"]["fields"][1].update(kind="text")),
     "metadata field feature_spec.fields[1].kind: expected one of"),
    ("duplicate name", _meta_edit(lambda m: m["feature_spec"]["fields"][1].update(name="101")),
     "metadata field feature_spec.fields[1].name: expected a new, non-empty field name"),
    ("other hashing", _meta_edit(lambda m: m["feature_spec"].update(hash_version="md5")),
     "metadata field feature_spec.hash_version: 'md5' is not this esmm's"),
    ("inputs differ", _meta_edit(lambda m: m["inputs"].pop(0)),
     "metadata field inputs:"),
    ("newer format", _meta_edit(lambda m: m.update(format_version=99)),
     "metadata field format_version: 99 is newer than this esmm supports"),
    ("metrics a string", _meta_edit(lambda m: m.update(metrics="good")),
     "metadata field metrics: expected an object, got string"),
    ("not an object", lambda text: "[1, 2]", "the esmm metadata is array, expected an object"),
    ("not JSON", lambda text: text[:-5], "metadata esmm.json is not valid JSON"),
]


# Every case on ONNX; on TorchScript (whose metadata is read by another reader, then checked by
# the same code) the cases that reach the reader, the checks and the graph probe.
_TS_CASES = ("huge buckets", "no feature_spec", "not JSON")
_METADATA_CASES = [pytest.param("onnx", *c, id=f"onnx-{c[0]}") for c in BAD_METADATA] + [
    pytest.param("torchscript", *c, id=f"torchscript-{c[0]}") for c in BAD_METADATA
    if c[0] in _TS_CASES]


@pytest.mark.parametrize("fmt,case,edit,expected", _METADATA_CASES)
def test_malformed_metadata_stops_serve_with_one_line(artifacts, tmp_path, fmt, case, edit,
                                                      expected):
    src = artifacts[fmt]
    bad = _edit_metadata(src, tmp_path / f"bad{src.suffix}", edit)
    res = CliRunner().invoke(app, ["serve", str(bad), "--port", str(_free_port())])
    out = res.output.strip()
    assert res.exit_code == 1, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith(f"esmm: error: {bad}: ") and expected in out, out


def test_huge_buckets_stop_the_real_process(artifacts, tmp_path):
    bad = _edit_metadata(artifacts["onnx"], tmp_path / "bad.onnx",
                         _meta_edit(lambda m: _set_buckets(m, 10**12)))
    res = subprocess.run([sys.executable, "-m", "esmm", "serve", str(bad), "--port",
                          str(_free_port())], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.onnx" in lines[0] and "fields[3].buckets" in lines[0], lines


def test_artifact_that_is_not_one(tmp_path, artifacts):
    cases = {"empty.onnx": b"", "text.onnx": b"hello world\n" * 10,
             "half.onnx": artifacts["onnx"].read_bytes()[:5000],
             "zip.pt": b"PK\x03\x04" + b"\0" * 100}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        res = CliRunner().invoke(app, ["serve", str(tmp_path / name), "--port",
                                       str(_free_port())])
        out = res.output.strip()
        assert res.exit_code == 1 and len(out.splitlines()) == 1, (name, out)
        assert str(tmp_path / name) in out and "Traceback" not in out, (name, out)


def test_onnx_metadata_reader_agrees_with_onnx(artifacts):
    proto = onnx.load(str(artifacts["onnx"]))
    expected = json.loads({p.key: p.value for p in proto.metadata_props}["esmm.json"])
    assert read_artifact_metadata(artifacts["onnx"]) == expected
    extra = {"esmm.json": ""}
    torch.jit.load(str(artifacts["torchscript"]), _extra_files=extra)
    assert read_artifact_metadata(artifacts["torchscript"]) == json.loads(extra["esmm.json"])


@pytest.mark.parametrize("raw,reason", [
    (b'{"impressions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError"),
    (b'{"impressions": [{"101": ' + b"9" * 10_000 + b"}]}", "digits"),
])
def test_json_the_decoder_refuses_gets_400_naming_the_reason(server, raw, reason):
    r = server.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["field"] == "body" and err["error"].startswith("body: the body cannot be decoded")
    assert reason in err["error"] and "\n" not in err["error"]


def test_in_flight_slots_bound_the_requests_in_the_app():
    import asyncio

    from esmm.serve import _BodyLimitMiddleware

    state = {"now": 0, "peak": 0}

    async def inner(scope, receive, send):
        body = (await receive())["body"]
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)  # every other request arrives while this one is in the app
        state["now"] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    limited = _BodyLimitMiddleware(inner, max_bytes=100, max_in_flight=2)

    async def request(body, method="POST"):
        chunks = [body[:3], body[3:]]
        sent = []

        async def receive():
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        await limited({"type": "http", "method": method, "headers": []}, receive, send)
        return sent[0]["status"], sent[-1]["body"]

    async def main():
        return await asyncio.gather(*(request(b"x" * i) for i in range(10)),
                                    request(b"y" * 101))

    answers = asyncio.run(main())
    assert state["peak"] == 2
    assert answers[:10] == [(200, b"x" * i) for i in range(10)]  # each body replayed whole
    assert answers[10][0] == 413


@pytest.mark.parametrize("weight, bound", [(1e308, "less than or equal to 1e+300"),
                                           (-1e301, "greater than or equal to -1e+300")])
def test_an_oversized_score_weight_gets_a_short_answer(server, weight, bound):
    user = {"101": 7, "121": 2, "109_14": [1]}
    body = {"user": user, "candidates": [{"205": 1, "206": 4, "d1": 0.5}],
            "score": {"p_ctr": weight}}
    r = server.post("/rank", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"] == f"score.p_ctr: Input should be {bound}", err["error"]
    assert err["field"] == "p_ctr" and len(err["error"]) < 80
