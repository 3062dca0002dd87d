"""Tests for esmm.data.published: torch-rechub, AITM and PaddleRec ESMM layouts.

The files under tests/data/files/ are copies of the published extracts (see the README there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.data.published import (
    AITM_COLUMNS,
    RECHUB_COLUMNS,
    read_aitm_csv,
    read_paddle_esmm_txt,
    read_published,
    read_rechub_csv,
)
from esmm.data.tables import encode, read_tables
from esmm.errors import DataError, UsageError
from esmm.features import spec_from_config
from tests.conftest import cli_output

FILES = Path(__file__).resolve().parent / "files"
RECHUB = FILES / "torch-rechub"
AITM = FILES / "paddlerec-aitm"
PADDLE = FILES / "paddlerec-esmm"
runner = CliRunner()


_out = cli_output


def test_rechub_csv_values_and_counts():
    t = read_rechub_csv(RECHUB / "ali_ccp_train_sample.csv")
    assert t.num_rows == 100
    assert t.column_names == ["click", "conversion", *RECHUB_COLUMNS[2:]]
    assert t.schema.field("click").type == pa.int8()
    assert t.schema.field("205").type == pa.int64()
    assert t.schema.field("D109_14").type == pa.float32()
    row0 = t.slice(0, 1).to_pylist()[0]
    assert (row0["click"], row0["conversion"], row0["101"], row0["205"], row0["206"]) == (
        0, 0, 1, 0, 1)
    assert row0["D109_14"] == np.float32(0.4734) and row0["D508"] == np.float32(0.07556)
    row2 = t.slice(2, 1).to_pylist()[0]  # raw sample 3: click=1; its purchase was set by hand
    assert (row2["click"], row2["conversion"]) == (1, 1)
    assert int(t["click"].to_numpy().sum()) == 7 and int(t["conversion"].to_numpy().sum()) == 1
    for name in ("ali_ccp_val_sample.csv", "ali_ccp_test_sample.csv"):
        v = read_rechub_csv(RECHUB / name)
        assert v.num_rows == 50 and int(v["conversion"].to_numpy().sum()) == 1
        assert set(v["101"].to_pylist()) == {1}
    assert read_rechub_csv(RECHUB).num_rows == 200  # a folder: every file, in name order


def test_aitm_csv_with_and_without_header():
    train = read_aitm_csv(AITM / "train" / "train.csv")
    assert train.num_rows == 48
    assert train.column_names == ["click", "conversion", *AITM_COLUMNS[2:]]
    assert train.slice(0, 1).to_pylist()[0] == dict(zip(
        train.column_names, [0, 0, 85077, 60, 5, 2, 5, 0, 1, 2, 1, 303983, 3751, 249750, 4124,
                             5565, 0, 0, 6260, 2], strict=True))
    test = read_aitm_csv(AITM / "test" / "test.csv")  # the published file has no header
    assert test.num_rows == 50
    assert test.slice(0, 1).to_pylist()[0] == dict(zip(
        test.column_names, [0, 0, 180467, 4, 1, 2, 3, 1, 1, 2, 1, 157266, 5673, 164308, 73943,
                            753, 0, 0, 32454, 2], strict=True))
    for t, clicks, conversions, without_click in ((train, 3, 3, 2), (test, 3, 3, 3)):
        c, v = t["click"].to_numpy(), t["conversion"].to_numpy()
        assert (c.sum(), v.sum(), ((v == 1) & (c == 0)).sum()) == (clicks, conversions,
                                                                    without_click)


def test_paddle_esmm_txt():
    t = read_paddle_esmm_txt(PADDLE / "test" / "small.txt")
    assert t.num_rows == 10
    assert t["sample_id"].to_pylist() == list(range(1, 11))
    assert t["click"].to_pylist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert t["conversion"].to_pylist() == [0] * 10
    train = read_paddle_esmm_txt(PADDLE / "train" / "small.txt")
    assert (train["click"][0].as_py(), train["conversion"][0].as_py()) == (1, 1)  # edited
    assert train.drop_columns(["click", "conversion"]).equals(
        t.drop_columns(["click", "conversion"]))
    # Every token is read, the first one of each line included.
    lines = (PADDLE / "test" / "small.txt").read_text().splitlines()
    for i, line in enumerate(lines):
        tokens = line.split(",")[3:]
        got = sum(len(v) if isinstance(v, list) else v is not None
                  for k, v in t.slice(i, 1).to_pylist()[0].items()
                  if k not in ("sample_id", "click", "conversion"))
        assert got == len(tokens)
    assert t["210"][0].as_py() == [1, 2, 3] and t["216"][0].as_py() == 4
    assert [len(t[f][0]) for f in ("109_14", "110_14", "127_14", "150_14")] == [117, 342, 209,
                                                                              191]
    assert set(t["101"].to_pylist()) == {12}
    assert t["126"].null_count == 10  # this user has no field 126: the column is all null


def test_bad_files_name_the_line(tmp_path):
    bad = tmp_path / "a.csv"
    lines = (AITM / "test" / "test.csv").read_text().splitlines()
    lines[6] = lines[6] + ",7"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a.csv: line 7: 21 columns, expected 20"):
        read_aitm_csv(bad)
    lines = (AITM / "test" / "test.csv").read_text().splitlines()
    lines[2] = lines[2].replace("180467", "x")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3, column '101': b'x' is not an integer"):
        read_aitm_csv(bad)
    nohead = tmp_path / "r.csv"
    nohead.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"r.csv, line 1: the header lacks"):
        read_rechub_csv(nohead)
    txt = tmp_path / "p.txt"
    txt.write_text("1,0,0,210:1,210:2\n2,0,0,210:3,bogus\n")
    with pytest.raises(DataError, match=r"p.txt, line 2: token 'bogus' is not field:id"):
        read_paddle_esmm_txt(txt)
    txt.write_text("1,0,0,205:1,205:2\n")
    with pytest.raises(DataError, match=r"line 1: field 205 appears 2 times"):
        read_paddle_esmm_txt(txt)
    with pytest.raises(UsageError, match="unknown published format"):
        read_published(txt, "nope")


@pytest.mark.parametrize("fmt,path", [("rechub-csv", RECHUB / "ali_ccp_train_sample.csv"),
                                      ("aitm-csv", AITM / "test" / "test.csv"),
                                      ("paddle-esmm-txt", PADDLE / "test" / "small.txt")])
def test_read_tables_dispatches_published_formats(fmt, path):
    cfg = config_from_dict({"data": {"format": fmt}, "features": [
        {"name": "205", "kind": "categorical", "buckets": 100},
        {"name": "101", "kind": "categorical", "buckets": 100}]})
    raw = read_tables(path, cfg.data, columns=["205", "101", "click", "conversion", "nope"])
    assert set(raw.impressions.column_names) == {"click", "conversion", "101", "205"}
    enc = encode(raw, spec_from_config(cfg), cfg.data)
    assert enc.n == raw.impressions.num_rows - enc.dropped_conversion_without_click
    if fmt == "aitm-csv":
        assert enc.dropped_conversion_without_click == 3


def _train(tmp_path, fmt, train, features):
    tree = {
        "data": {"train": str(train), "eval": str(train), "format": fmt},
        "features": features,
        "model": {"name": "esmm", "tower": [8], "embedding_dim": 4},
        "train": {"batch_size": 16, "max_steps": 2, "progress": "off"},
    }
    p = tmp_path / f"{fmt}.yaml"
    p.write_text(yaml.safe_dump(tree))
    return runner.invoke(app, ["train", str(p), "--out", str(tmp_path / fmt)])


def test_train_accepts_published_layouts(tmp_path):
    sparse = [{"name": c, "kind": "categorical", "buckets": 50} for c in RECHUB_COLUMNS[2:25]
              if c not in ("210", "109_14", "110_14", "127_14", "150_14")]
    rechub = sparse + [{"name": c, "kind": "dense"} for c in RECHUB_COLUMNS[25:]]
    res = _train(tmp_path, "rechub-csv", RECHUB / "ali_ccp_train_sample.csv", rechub)
    assert res.exit_code == 0, _out(res)
    aitm = [{"name": c, "kind": "categorical", "buckets": 50} for c in AITM_COLUMNS[2:]]
    res = _train(tmp_path, "aitm-csv", AITM / "train" / "train.csv", aitm)
    assert res.exit_code == 0, _out(res)
    paddle = [f for f in aitm if f["name"] != "853"] + [
        {"name": c, "kind": "multi_categorical", "buckets": 50}
        for c in ("210", "853", "109_14", "110_14", "127_14", "150_14")]
    res = _train(tmp_path, "paddle-esmm-txt", PADDLE / "test" / "small.txt", paddle)
    assert res.exit_code == 0, _out(res)
