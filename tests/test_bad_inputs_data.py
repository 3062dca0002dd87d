"""Bad data on every path: each case gets the documented exit code and one line naming the file,
the row or line and the field, never a traceback; good data in unusual shapes is read correctly.

Paths: ``esmm train`` (in-memory and streamed loaders), ``esmm evaluate``, ``esmm predict``
(both loaders) and the encoding the HTTP server uses (:meth:`Predictor.encode_columns`, and
``POST /predict`` on an exported artifact).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.data.stream import ParquetStream, concat_encoded
from esmm.data.tables import load_split
from esmm.errors import ConfigError, DataError
from esmm.export import load_artifact
from esmm.features import hash_int_ids, hash_str_ids, spec_from_config
from tests.conftest import cli_output, make_rows, small_config, write_flat, write_normalized

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def _cli(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, cli_output(res)


def _one_line_error(code: int, text: str, expect_code: int, *needles: str) -> str:
    """The error line of a failed command: the exit code, one ``esmm: error:`` line holding
    every needle, and no traceback."""
    assert code == expect_code, text
    assert "Traceback" not in text, text
    # The runner may hand back stderr both mixed into the output and apart: one line, once.
    lines = list(dict.fromkeys(ln for ln in text.splitlines() if ln.startswith("esmm: error:")))
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _config(tmp_path, train, eval_=None, name="cfg.yaml", features=None, **data):
    tree = small_config(train, eval_, max_steps=4)
    tree["data"].update(data)
    if features is not None:
        tree["features"] = features
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def _features(**dtypes):
    tree = small_config("x")["features"]
    return [f | ({"dtype": dtypes[f["name"]]} if f["name"] in dtypes else {}) for f in tree]


def _table(n: int = 3000, seed: int = 4, tmp_path=None) -> pa.Table:
    path = tmp_path / f"base-{n}-{seed}.parquet"
    if not path.exists():
        write_flat(path, make_rows(n, seed=seed))
    return pq.read_table(path)


def _set(t: pa.Table, col: str, values) -> pa.Table:
    return t.set_column(t.column_names.index(col), col, values)


def _folder(tmp_path, t: pa.Table, name: str, parts: int = 3, fmt: str = "parquet") -> list:
    """``t`` cut into ``parts`` files of a folder; returns the files."""
    d = tmp_path / name
    d.mkdir()
    step = -(-t.num_rows // parts)
    files = []
    for i in range(parts):
        f = d / f"part-{i}.{fmt}"
        piece = t.slice(i * step, step)
        if fmt == "parquet":
            pq.write_table(piece, f)
        else:
            pacsv.write_csv(piece, f)
        files.append(f)
    return files


def _csv_table(t: pa.Table) -> pa.Table:
    """The columns a CSV file can hold (a bag of one id per row)."""
    return _set(t, "109_14", pa.array(t.column("206").to_numpy()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small trained run (flat Parquet data, every field kind)."""
    d = tmp_path_factory.mktemp("run")
    train = write_flat(d / "train.parquet", make_rows(3000, seed=1))
    code, text = _cli("train", _config(d, train), "--out", d / "run")
    assert code == 0, text
    return d / "run"


# ----------------------------------------------------------------------------- 3. columns


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_parquet_folder_with_a_file_lacking_a_feature_column(tmp_path, loader):
    files = _folder(tmp_path, _table(tmp_path=tmp_path), "train")
    t = pq.read_table(files[1]).drop_columns(["206", "d1"])
    pq.write_table(t, files[1])
    code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader),
                      "--out", tmp_path / "r")
    # Both the file and exactly the columns it lacks (not the other files' listing).
    _one_line_error(code, text, 1, str(files[1]), "lacks column(s) ['206', 'd1']",
                    str(files[0]))
    assert not list((tmp_path / "r").rglob("*.pt"))


def test_parquet_folder_with_a_file_lacking_a_label_or_the_user_column(tmp_path):
    files = _folder(tmp_path, _table(tmp_path=tmp_path), "train")
    pq.write_table(pq.read_table(files[2]).drop_columns(["conversion"]), files[2])
    for loader in ("memory", "stream"):
        code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader),
                          "--out", tmp_path / "r")
        _one_line_error(code, text, 1, str(files[2]), "['conversion']")
    # An optional column too: GAUC groups would silently be nulls for one file's rows.
    pq.write_table(_table(tmp_path=tmp_path).slice(2000).drop_columns(["101"]), files[2])
    cfg = config_from_dict(small_config(files[0].parent) | {"features": _features()[1:]})
    spec = spec_from_config(cfg)
    with pytest.raises(DataError, match=r"part-2.parquet: lacks column\(s\) \['101'\]"):
        load_split(files[0].parent, spec, cfg.data)
    with pytest.raises(DataError, match=r"part-2.parquet: lacks column\(s\) \['101'\]"):
        ParquetStream(files[0].parent, spec, cfg.data)


def test_csv_folder_with_a_file_lacking_a_column(tmp_path):
    files = _folder(tmp_path, _csv_table(_table(tmp_path=tmp_path)), "train", fmt="csv")
    good = _cli("train", _config(tmp_path, files[0].parent), "--out", tmp_path / "ok")
    assert good[0] == 0, good[1]
    t = pacsv.read_csv(files[2]).drop_columns(["121"])
    pacsv.write_csv(t, files[2])
    code, text = _cli("train", _config(tmp_path, files[0].parent), "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(files[2]), "['121']")


def test_a_feature_no_file_holds_is_a_config_error(tmp_path):
    files = _folder(tmp_path, _table(tmp_path=tmp_path).drop_columns(["206"]), "train")
    for loader in ("memory", "stream"):
        code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader),
                          "--out", tmp_path / "r")
        _one_line_error(code, text, 2, "feature '206'", "not in the data", "'205'")


# ----------------------------------------------------------------------------- 4. dense values

BAD_DENSE = {"+inf": np.inf, "-inf": -np.inf, "NaN": np.nan, "1e+39": 1e39}


def _bad_dense_folder(tmp_path, value: float) -> list:
    t = _table(tmp_path=tmp_path)
    d = t.column("d1").to_numpy().copy()
    d[2000 + 7] = value  # row 7 of the third file
    return _folder(tmp_path, _set(t, "d1", pa.array(d)), "bad")


def _dense_needles(files, what):
    return [str(files[2]), "'d1'", "row 7", what if what != "1e+39" else "beyond float32"]


@pytest.mark.parametrize("what", list(BAD_DENSE))
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_train_refuses_non_finite_dense_values(tmp_path, what, loader):
    files = _bad_dense_folder(tmp_path, BAD_DENSE[what])
    code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader),
                      "--out", tmp_path / "r")
    _one_line_error(code, text, 1, *_dense_needles(files, what))
    assert not list((tmp_path / "r").rglob("*.pt"))  # refused before the first step


@pytest.mark.parametrize("what", ["+inf", "1e+39"])
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_evaluate_and_predict_refuse_non_finite_dense_values(tmp_path, run_dir, what, loader):
    files = _bad_dense_folder(tmp_path, BAD_DENSE[what])
    code, text = _cli("evaluate", run_dir, "--data", files[0].parent, "--loader", loader)
    _one_line_error(code, text, 1, *_dense_needles(files, what))
    out = tmp_path / "p.parquet"
    code, text = _cli("predict", run_dir, "--data", files[0].parent, "--out", out,
                      "--loader", loader)
    _one_line_error(code, text, 1, *_dense_needles(files, what))
    assert not out.exists()


@pytest.mark.parametrize("column,value,what", [
    ("205", 1.5, "holds the non-integer value 1.5"),
    ("109_14", [1.0, 2.5], "holds the non-integer value 2.5"),
    ("d1", float("inf"), "(+inf)"),
])
def test_a_stream_checks_every_row_group_before_the_first_step(tmp_path, column, value, what):
    t = _table(tmp_path=tmp_path)
    vals = t.column(column).to_pylist()
    vals = [[float(x) for x in v] for v in vals] if column == "109_14" else [
        float(v) for v in vals]
    vals[2900] = value  # in the last row group, far past what 4 steps of 256 rows read
    path = tmp_path / "late.parquet"
    pq.write_table(_set(t, column, pa.array(vals)), path, row_group_size=500)
    code, text = _cli("train", _config(tmp_path, path, loader="stream", chunk_rows=256),
                      "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(path), f"'{column}'", "row 2900", what)
    assert not list((tmp_path / "r").rglob("*.pt"))


def test_csv_dense_values_are_named_by_file_line(tmp_path, run_dir):
    t = _csv_table(_table(tmp_path=tmp_path))
    path = tmp_path / "rows.csv"
    pacsv.write_csv(t, path)
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    cells = lines[101].split(",")  # data row 100
    cells[cols.index('"d1"')] = "-inf"
    lines[101] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    code, text = _cli("predict", run_dir, "--data", path, "--out", tmp_path / "p.parquet")
    _one_line_error(code, text, 1, str(path), "'d1'", "line 102", "-inf")


def test_serving_encoding_refuses_non_finite_dense_values(run_dir, tmp_path):
    art = tmp_path / "m.pt"
    code, text = _cli("export", run_dir, "--format", "torchscript", "--out", art,
                      "--parity-rows", "16")
    assert code == 0, text
    pred = load_artifact(art)
    cols = {f.name: [1, 2, 3] for f in pred.spec.fields if f.kind == "categorical"}
    cols["109_14"] = [[1], [], [2, 3]]
    for value, what in ((float("inf"), "+inf"), (1e39, "beyond float32"),
                        (float("nan"), "NaN"), (-np.inf, "-inf")):
        with pytest.raises(DataError, match=rf"'d1' .*first at row 2 \(.*{what.replace('+', '.')}"):
            pred.encode_columns(cols | {"d1": [0.5, 0.25, value]})
        with pytest.raises(DataError, match="'d1'"):
            pred.encode_columns(cols | {"d1": np.array([0.5, 0.25, value])})
    with pytest.raises(DataError, match=r"'d1' row 1: 10{40} is beyond float32"):
        pred.encode_columns(cols | {"d1": [0.5, 10**40, 1.0]})
    from fastapi.testclient import TestClient

    from esmm.serve import create_app

    client = TestClient(create_app(pred))
    item = {"101": 1, "205": 2, "206": 3, "121": 1, "109_14": [1], "d1": 0.5}
    for bad in (1e39, float("inf"), float("-inf"), float("nan")):
        body = json.dumps({"impressions": [item, item | {"d1": bad}]})
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "d1" and r.json()["index"] == 1, r.text
    assert client.post("/predict", json={"impressions": [item]}).status_code == 200


# ----------------------------------------------------------------------------- 5. id types


def _late_abc_csv(tmp_path, n: int = 60_000, row: int = 45_000):
    """A CSV whose id column 205 holds integers but ``abc`` at data row ``row``, far past the
    CSV reader's first block (the reader then turns the whole column into strings)."""
    t = _csv_table(_rows_table(tmp_path, n))
    ids = t.column("205").to_numpy().astype(object).astype(str)
    ids[row] = "abc"
    t = _set(t, "205", pa.array(ids))
    path = tmp_path / "late_abc.csv"
    pacsv.write_csv(t, path, pacsv.WriteOptions(quoting_style="none"))
    assert path.stat().st_size > 2 * (1 << 20)  # past the reader's 1 MiB first block
    assert pacsv.read_csv(path).schema.field("205").type == pa.string()  # the premise
    return path, t


def _rows_table(tmp_path, n: int) -> pa.Table:
    p = tmp_path / f"rows-{n}.parquet"
    write_flat(p, make_rows(n, seed=7))
    return pq.read_table(p)


def test_a_stray_string_in_a_csv_id_column_is_refused_with_its_line(tmp_path, run_dir):
    path, _ = _late_abc_csv(tmp_path)
    code, text = _cli("train", _config(tmp_path, path), "--out", tmp_path / "r")
    line = _one_line_error(code, text, 1, str(path), "'205'", "line 45002", "'abc'", "dtype: str")
    assert "line 2 holds" in line  # the value the rest of the column looks like
    code, text = _cli("predict", run_dir, "--data", path, "--out", tmp_path / "p.parquet")
    _one_line_error(code, text, 1, str(path), "'205'", "line 45002", "'abc'")


def test_a_string_typed_field_hashes_every_value_as_a_string_everywhere(tmp_path):
    path, t = _late_abc_csv(tmp_path)
    cfg = _config(tmp_path, path, features=_features(**{"205": "str"}))
    code, text = _cli("train", cfg, "--out", tmp_path / "run")
    assert code == 0, text
    run = tmp_path / "run"
    # The same rows: the CSV (205 read as strings), Parquet with 205 as strings, and Parquet
    # with 205 as integers (the `abc` row left out) score alike.
    strs = tmp_path / "strs.parquet"
    pq.write_table(t, strs)
    keep = np.ones(t.num_rows, dtype=bool)
    keep[45_000] = False
    ints = tmp_path / "ints.parquet"
    t_int = t.filter(pa.array(keep))
    pq.write_table(_set(t_int, "205", t_int.column("205").cast(pa.int64())), ints)
    preds = {}
    for name, data in (("csv", path), ("strs", strs), ("ints", ints)):
        code, text = _cli("predict", run, "--data", data, "--out", tmp_path / f"{name}.parquet")
        assert code == 0, text
        preds[name] = pq.read_table(tmp_path / f"{name}.parquet").column("p_ctcvr").to_numpy()
    np.testing.assert_array_equal(preds["csv"], preds["strs"])
    np.testing.assert_array_equal(preds["csv"][keep], preds["ints"])
    # Export (its parity check runs string and integer ids) and serve: integers are hashed as
    # their decimal strings.
    art = tmp_path / "m.pt"
    code, text = _cli("export", run, "--format", "torchscript", "--out", art, "--parity-rows", "16")
    assert code == 0, text
    pred = load_artifact(art)
    head = t_int.slice(0, 50)
    cols = {f.name: head.column(f.name).to_pylist() for f in pred.spec.fields}
    cols["109_14"] = [[v] for v in cols["109_14"]]  # the CSV's bag of one id per row
    as_ints = pred.predict_columns(cols | {"205": [int(v) for v in cols["205"]]})
    as_strs = pred.predict_columns(cols | {"205": [str(v) for v in cols["205"]]})
    np.testing.assert_array_equal(as_ints["p_ctcvr"], as_strs["p_ctcvr"])
    np.testing.assert_allclose(as_ints["p_ctcvr"], preds["ints"][:50], atol=1e-6)


def test_an_int_typed_field_reads_digit_strings_and_refuses_others(tmp_path):
    path, _ = _late_abc_csv(tmp_path)
    cfg = _config(tmp_path, path, features=_features(**{"205": "int"}))
    code, text = _cli("train", cfg, "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(path), "'205'", "line 45002", "'abc'", "dtype: int")


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_an_id_column_integer_in_one_file_and_string_in_another(tmp_path, loader):
    files = _folder(tmp_path, _table(tmp_path=tmp_path), "train")
    t = pq.read_table(files[1])
    pq.write_table(_set(t, "205", t.column("205").cast(pa.string())), files[1])
    code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader),
                      "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(files[1]), "'205'", "string", "int64", "dtype: str")
    cfg = _config(tmp_path, files[0].parent, loader=loader, features=_features(**{"205": "str"}))
    code, text = _cli("train", cfg, "--out", tmp_path / "ok")
    assert code == 0, text


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_integer_strings_in_one_chunk_and_other_strings_in_a_later_one(tmp_path, loader):
    t = _table(tmp_path=tmp_path)
    ids = [str(v) for v in t.column("205").to_pylist()]
    ids[2500:] = [f"item{v}" for v in ids[2500:]]  # each row group holds one kind
    path = tmp_path / "chunks.parquet"
    pq.write_table(_set(t, "205", pa.array(ids)), path, row_group_size=500)
    code, text = _cli("train", _config(tmp_path, path, loader=loader, chunk_rows=500),
                      "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(path), "'205' row 2500", f"{ids[2500]!r}", "row 0",
                    "dtype: str")


def test_a_csv_folder_names_the_line_of_a_stray_string_before_the_type_clash(tmp_path):
    t = _csv_table(_table(tmp_path=tmp_path))
    files = _folder(tmp_path, t, "train", parts=2, fmt="csv")
    lines = files[1].read_text().splitlines()
    cols = lines[0].split(",")
    cells = lines[30].split(",")
    cells[cols.index('"205"')] = "abc"
    lines[30] = ",".join(cells)
    files[1].write_text("\n".join(lines) + "\n")
    code, text = _cli("train", _config(tmp_path, files[0].parent), "--out", tmp_path / "r")
    _one_line_error(code, text, 1, str(files[1]), "'205' line 31", "'abc'")


def test_string_and_integer_files_hash_alike_under_dtype_str_in_both_loaders(tmp_path):
    t = _table(tmp_path=tmp_path)
    files = _folder(tmp_path, t, "mixed")
    pq.write_table(_set(pq.read_table(files[1]), "205",
                        pq.read_table(files[1]).column("205").cast(pa.string())), files[1])
    cfg = config_from_dict(small_config(files[0].parent) | {"features": _features(
        **{"205": "str"})})
    spec = spec_from_config(cfg)
    mem = load_split(files[0].parent, spec, cfg.data)
    stream = ParquetStream(files[0].parent, spec, cfg.data)
    streamed = np.concatenate([c.ids["205"] for c in stream.chunks()])
    np.testing.assert_array_equal(mem.ids["205"], streamed)
    oracle = hash_str_ids(pa.array([str(v) for v in t.column("205").to_pylist()]), "205", 3000)
    np.testing.assert_array_equal(mem.ids["205"], oracle)


# ----------------------------------------------------------------------------- 6. string keys


def _string_keys(tmp_path, name="norm", users_key_type=pa.string()):
    folder = write_normalized(tmp_path / name, make_rows(3000, seed=1))
    for part, key_type in (("impressions", pa.string()), ("users", users_key_type)):
        t = pq.read_table(folder / f"{part}.parquet")
        t = _set(t, "common_key", pa.array([f"u{v}" if key_type == pa.string() else v
                                            for v in t.column("common_key").to_pylist()],
                                           type=key_type))
        if part == "users":
            t = _set(t, "101", t.column("101").cast(pa.string()))
        pq.write_table(t, folder / f"{part}.parquet")
    return folder


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_string_join_keys_and_string_user_ids_train_evaluate_and_predict(tmp_path, loader):
    folder = _string_keys(tmp_path)
    ref = write_normalized(tmp_path / "ints", make_rows(3000, seed=1))
    cfg = _config(tmp_path, folder, folder, loader=loader)
    code, text = _cli("train", cfg, "--out", tmp_path / "run")
    assert code == 0, text
    code, text = _cli("evaluate", tmp_path / "run", "--out", tmp_path / "m.json",
                      "--loader", loader)
    assert code == 0, text
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert 0 < metrics["ctcvr_gauc"] <= 1, metrics
    out = tmp_path / "p.parquet"
    code, text = _cli("predict", tmp_path / "run", "--data", folder, "--out", out,
                      "--loader", loader)
    assert code == 0, text
    assert pq.read_table(out).num_rows == 3000
    # The string keys join every impression to the user its integer key joins it to.
    c = config_from_dict(small_config(folder))
    spec = spec_from_config(c)
    got, want = load_split(folder, spec, c.data), load_split(ref, spec, c.data)
    assert got.user_row is not None and got.n == want.n
    np.testing.assert_array_equal(got.user_bags["109_14"][1][got.user_row + 1]
                                  - got.user_bags["109_14"][1][got.user_row],
                                  want.user_bags["109_14"][1][want.user_row + 1]
                                  - want.user_bags["109_14"][1][want.user_row])
    # GAUC groups: the same partition of impressions as integer user ids give.
    pairs = np.unique(np.stack([got.groups, want.groups]), axis=1).shape[1]
    assert pairs == len(np.unique(got.groups)) == len(np.unique(want.groups)) > 100


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_join_keys_of_two_types_are_refused_in_one_line(tmp_path, loader):
    folder = _string_keys(tmp_path, users_key_type=pa.int64())
    code, text = _cli("train", _config(tmp_path, folder, loader=loader), "--out", tmp_path / "r")
    _one_line_error(code, text, 1, "'common_key'", "str values", "int values")


# ----------------------------------------------------------------------------- skip modes


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_dropped_rows_are_counted_across_files(tmp_path, loader):
    t = _table(tmp_path=tmp_path)
    conv = t.column("conversion").to_numpy().copy()
    unclicked = np.flatnonzero(t.column("click").to_numpy() == 0)
    picks = unclicked[[3, 400, 1500]]
    conv[picks] = 1
    files = _folder(tmp_path, _set(t, "conversion", pa.array(conv)), "train")
    cfg = config_from_dict(small_config(files[0].parent) | {"data": {
        "train": str(files[0].parent), "loader": loader}})
    spec = spec_from_config(cfg)
    split = (load_split if loader == "memory" else ParquetStream)(files[0].parent, spec,
                                                                  cfg.data)
    assert split.rows_read == t.num_rows == split.n + split.dropped_conversion_without_click
    assert split.dropped_conversion_without_click == 3
    code, text = _cli("train", _config(tmp_path, files[0].parent, loader=loader,
                                       conversion_without_click="error"),
                      "--out", tmp_path / "r")
    first = int(picks[0])
    _one_line_error(code, text, 1, str(files[0]), f"row {first}", "conversion=1 with click=0")


# ----------------------------------------------------------------------------- fuzz

# Cells of every kind a file may hold: integers (some beyond int64), floats (integral or not,
# infinite, NaN, beyond float32), strings (some integer-looking), and missing values.
CELLS = st.one_of(
    st.integers(-(2**64), 2**64), st.integers(0, 50),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e39, -1e300, 2.0, 7.0]),
    st.text(alphabet="ab1-9 ,\"", max_size=4), st.sampled_from(["12", "-3", "x", "inf", ""]),
    st.none(),
)
N_ROWS = 6
_INTS = st.one_of(st.integers(-5, 10**12), st.none())
_WORDS = st.one_of(st.sampled_from(["a", "bb", "x1", "-"]), st.none())


def _column_of(good: st.SearchStrategy, wild: st.SearchStrategy = CELLS) -> st.SearchStrategy:
    """N_ROWS cells: mostly a clean column of ``good`` cells (so that reading is exercised as
    often as refusing), else wild cells."""
    return st.one_of(st.lists(good, min_size=N_ROWS, max_size=N_ROWS),
                     st.lists(good, min_size=N_ROWS, max_size=N_ROWS),
                     st.lists(wild, min_size=N_ROWS, max_size=N_ROWS))


ID_COLUMNS = st.one_of(_column_of(_INTS), _column_of(_WORDS))
BAG_COLUMNS = _column_of(st.one_of(st.none(), st.lists(_INTS, max_size=3)),
                         st.one_of(st.none(), st.lists(CELLS, max_size=3)))
DENSE_COLUMNS = _column_of(st.one_of(st.floats(-1e30, 1e30), st.integers(-10**6, 10**6)))


_FUZZ_FEATURES = [{"name": "205", "kind": "categorical", "buckets": 97},
                  {"name": "109_14", "kind": "multi_categorical", "buckets": 31},
                  {"name": "d1", "kind": "dense"}]


def _fuzz_spec_and_cfg(tmp_path, fmt):
    cfg = config_from_dict({"data": {"train": str(tmp_path), "format": fmt,
                                     "user_column": None}, "features": _FUZZ_FEATURES})
    return spec_from_config(cfg), cfg.data


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """A run trained on the fuzzed fields, to push fuzzed files through ``esmm predict``."""
    d = tmp_path_factory.mktemp("fuzz_run")
    rng = np.random.default_rng(0)
    n = 512
    pq.write_table(pa.table({
        "205": rng.integers(0, 50, n), "d1": rng.random(n),
        "109_14": pa.array([rng.integers(0, 9, k).tolist() for k in rng.integers(0, 4, n)]),
        "click": rng.integers(0, 2, n), "conversion": np.zeros(n, dtype=np.int64)}),
        d / "train.parquet")
    tree = small_config(d / "train.parquet", max_steps=2)
    tree["data"]["user_column"] = None
    tree["features"] = _FUZZ_FEATURES
    (d / "cfg.yaml").write_text(yaml.safe_dump(tree))
    code, text = _cli("train", d / "cfg.yaml", "--out", d / "run")
    assert code == 0, text
    return d / "run"


def _string_ids(col: pa.ChunkedArray) -> bool:
    """Whether a column (or its bags) holds string ids."""
    t = col.type
    vals = pc.list_flatten(col) if pa.types.is_list(t) or pa.types.is_large_list(t) else col
    return pa.types.is_string(vals.type) and vals.null_count < len(vals)


def _predict_outcome(run, path, want: dict, t: pa.Table) -> None:
    """``esmm predict`` on the fuzzed file: every row scored, or exit 1 with one line naming
    the file, exactly when a cell is bad or an id column holds strings (``t``: the columns as
    the file's reader types them), as the run was trained on integer ids; never a
    traceback."""
    out = path.with_suffix(".out.parquet")
    code, text = _cli("predict", run, "--data", path, "--out", out)
    if all(v is not None for v in want.values()) and not any(
            _string_ids(t.column(c)) for c in ("205", "109_14")):
        assert code == 0, text
        assert pq.read_table(out).num_rows == N_ROWS
    else:
        _one_line_error(code, text, 1, str(path))


def _oracle_id(v, name: str, buckets: int) -> int | None:
    """The bucket an id cell must get under ``dtype: auto``, or None where the cell is no id."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return int(hash_int_ids(np.array([-1]), name, buckets)[0])
    if isinstance(v, bool):
        return None
    if isinstance(v, float):
        if not (np.isfinite(v) and v.is_integer() and abs(v) < 2.0**63):
            return None
        v = int(v)
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            return None
        return int(hash_int_ids(np.array([v]), name, buckets)[0])
    return int(hash_str_ids(pa.array([v]), name, buckets)[0])


def _is_int_like(v) -> bool:
    return isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v) is not None


def _expected_ids(values: list, name: str, buckets: int) -> np.ndarray | None:
    """The buckets a column of id cells must get under ``dtype: auto``, or None where the
    column must be refused (a cell that is no id, or integer-looking strings mixed with
    other strings)."""
    strs = [v for v in values if isinstance(v, str)]
    if len({_is_int_like(v) for v in strs}) > 1:
        return None
    out = [_oracle_id(v, name, buckets) for v in values]
    return None if None in out else np.array(out, dtype=np.int64)


def _expected(t: pa.Table) -> dict:
    """What loading ``t`` (the columns as the file holds them) must give, from first
    principles; None for a column that must be refused."""
    bags = t.column("109_14")
    if pa.types.is_list(bags.type):
        flat = [v for b in bags.to_pylist() if b is not None for v in b]
    else:
        flat = bags.to_pylist()
    d = t.column("d1")
    dense = None
    if pa.types.is_floating(d.type) or pa.types.is_integer(d.type) or pa.types.is_null(d.type):
        vals = np.array([np.nan if v is None else float(v) for v in d.to_pylist()])
        if np.all(np.isfinite(vals) & (np.abs(vals) <= np.finfo(np.float32).max)):
            dense = vals.astype(np.float32)
    return {"ids": _expected_ids(t.column("205").to_pylist(), "205", 97),
            "bags": _expected_ids(flat, "109_14", 31), "dense": dense}


def _check(load, path, want: dict) -> str:
    """Either the split loads and every value is what the cells say, or it is refused with
    one line naming the file, exactly when a cell is bad; nothing else (no other exception)."""
    ok = all(v is not None for v in want.values())
    try:
        data = load()
    except (DataError, ConfigError) as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        assert not ok, f"good cells refused: {msg}"
        return "refused"
    assert ok, f"bad cells read: {want}"
    assert data.n == N_ROWS
    np.testing.assert_array_equal(data.ids["205"], want["ids"])
    np.testing.assert_array_equal(data.bags["109_14"][0], want["bags"])
    np.testing.assert_array_equal(data.dense[:, 0], want["dense"])
    return "read"


def _whole(split):
    if isinstance(split, ParquetStream):
        return concat_encoded(list(split.chunks()))
    return split


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # Arrow cannot type it (integers and strings, say), so no file can hold it so either.
        return pa.array([None if v is None else str(v) for v in values])


FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(ids=ID_COLUMNS, bags=BAG_COLUMNS, dense=DENSE_COLUMNS)
def test_fuzzed_parquet_cells_are_read_exactly_or_refused_in_one_line(tmp_path, fuzz_run, ids,
                                                                      bags, dense):
    spec, data_cfg = _fuzz_spec_and_cfg(tmp_path, "parquet")
    t = pa.table({"205": _column(ids), "109_14": _column(bags), "d1": _column(dense),
                  "click": [0] * N_ROWS, "conversion": [0] * N_ROWS})
    path = tmp_path / "fuzz.parquet"
    pq.write_table(t, path)
    want = _expected(t)
    event(_check(lambda: load_split(path, spec, data_cfg), path, want))
    _check(lambda: _whole(ParquetStream(path, spec, data_cfg)), path, want)
    _predict_outcome(fuzz_run, path, want, t)


@FUZZ
@given(ids=ID_COLUMNS, bags=ID_COLUMNS, dense=DENSE_COLUMNS)
def test_fuzzed_csv_cells_are_read_exactly_or_refused_in_one_line(tmp_path, fuzz_run, ids, bags,
                                                                  dense):
    spec, data_cfg = _fuzz_spec_and_cfg(tmp_path, "csv")
    out = io.StringIO()
    out.write("205,109_14,d1,click,conversion\n")
    for a, b, c in zip(ids, bags, dense, strict=True):
        out.write(",".join(_csv_cell(v) for v in (a, b, c)) + ",0,0\n")
    path = tmp_path / "fuzz.csv"
    path.write_text(out.getvalue())
    # The oracle starts from the cells as the CSV reader types them.
    read = pacsv.read_csv(path)
    want = _expected(read)
    event(_check(lambda: load_split(path, spec, data_cfg), path, want))
    _predict_outcome(fuzz_run, path, want, read)


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return '"' + v.replace('"', '""') + '"'
    return repr(v) if isinstance(v, float) else str(v)


@pytest.mark.parametrize("missing", ["--skeleton", "--common"])
def test_data_aliccp_with_a_missing_input_is_a_usage_error(tmp_path, missing):
    present = tmp_path / "present.csv"
    present.write_text("", encoding="utf-8")
    gone = tmp_path / "gone.csv"
    args = {"--skeleton": present, "--common": present, missing: gone}
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["data", "aliccp", "--skeleton", str(args["--skeleton"]),
                                   "--common", str(args["--common"]), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().count("\n") == 0, res.output
    assert f"{missing} {gone}: no such file" in res.output
    assert not out.exists()
