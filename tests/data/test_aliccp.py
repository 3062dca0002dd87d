"""Tests for esmm.data.aliccp: raw Ali-CCP ingestion, the raw writer and the round trip."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.data import aliccp
from esmm.data.aliccp import (
    DEFAULT_BAG_FIELDS,
    VALUE_SUFFIX,
    diagnose,
    ingest,
    int_to_key,
    key_to_int,
    simulate_raw,
)
from esmm.data.simulate import get_preset, simulate
from esmm.data.tables import read_tables
from esmm.errors import ConfigError, DataError, UsageError
from tests.conftest import cli_output

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
RAW_COMMON = SHARED / "data" / "aliccp" / "lhtlht-ali-ccp-notebook" / "common_features_train.csv"

SMALL = dict(n_users=300, n_items=2_000, n_categories=40, n_shops=300, n_brands=200,
             n_intentions=100)
ROWS = {"train": 3000, "test": 1000}
SEED = 3
NO_853 = tuple(b for b in DEFAULT_BAG_FIELDS if b != "853")  # the simulator's 853 is single
runner = CliRunner()


_out = cli_output


def check_invariant(summary: dict) -> None:
    for name in ("impressions", "users"):
        t = summary[name]
        assert t["rows_in"] == t["rows_written"] + t["rows_dropped"]
        assert t["rows_dropped"] == sum(t["dropped"].values())
        assert t["dropped"]["malformed"] == sum(t["malformed_by_reason"].values())


# ---------------------------------------------------------------------------------------------
# Simulated raw files


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cfg = get_preset("dense", **SMALL)
    raw = tmp_path_factory.mktemp("raw")
    info = simulate_raw(raw, cfg, ROWS, SEED)
    return {"raw": raw, "info": info, "tables": simulate(cfg, ROWS, SEED)}


def raw_files(sim, split="train"):
    return (sim["raw"] / f"sample_skeleton_{split}.csv",
            sim["raw"] / f"common_features_{split}.csv")


@pytest.fixture(scope="module")
def ingested(sim, tmp_path_factory):
    """The train split ingested the way the simulator's tables are laid out (853 single)."""
    out = tmp_path_factory.mktemp("ing")
    skel, comm = raw_files(sim)
    summary = ingest(skel, comm, out, bag_fields=NO_853,
                     ground_truth=sim["raw"] / "ground_truth_train.parquet")
    return out, summary


def test_keys_read_as_uint64_and_stored_as_int64():
    assert key_to_int("0000000000000001") == 1
    assert key_to_int("ffffffffffffffff") == -1
    assert key_to_int("84dceed2e3a667f8") == 0x84DCEED2E3A667F8 - (1 << 64)
    assert key_to_int("bacff91692951881") == int("bacff91692951881", 16) - (1 << 64)
    for k in ("84dceed2e3a667f8", "0000350f0c2121e7", "7fffffffffffffff", "8000000000000000"):
        assert int_to_key(key_to_int(k)) == k
    with pytest.raises(ValueError):
        key_to_int("84dceed2e3a667")


def test_raw_layout_written_by_the_simulator(sim):
    raw = sim["raw"]
    assert {p.name for p in raw.iterdir()} >= {
        "sample_skeleton_train.csv", "common_features_train.csv", "ground_truth_train.parquet",
        "sample_skeleton_test.csv", "common_features_test.csv", "simulation.json"}
    meta = json.loads((raw / "simulation.json").read_text())
    assert meta["format"] == "aliccp-raw" and meta["rows"] == ROWS
    imp = sim["tables"]["train"].impressions
    first = (raw / "sample_skeleton_train.csv").read_bytes().split(b"\n")[0]
    sid, click, conv, key, num, fl = first.split(b",")
    assert (int(sid), int(click), int(conv)) == (1, imp["click"][0].as_py(),
                                                 imp["conversion"][0].as_py())
    assert key.decode() == int_to_key(imp["common_key"][0].as_py())
    entries = fl.split(b"\x01")
    assert int(num) == len(entries) == 9 + len(imp["210"][0])
    assert f"205\x02{imp['205'][0].as_py()}\x031.0".encode() in entries
    gt = pq.read_table(raw / "ground_truth_train.parquet")
    assert gt.column_names == ["sample_id", "p_click", "p_conversion", "conversion_if_clicked"]
    assert gt.num_rows == ROWS["train"]


def test_round_trip_reproduces_the_simulator_tables(sim, ingested):
    out, summary = ingested
    raw = read_tables(out, config_from_dict({}).data)  # readable as a normalized folder as is
    expect = sim["tables"]["train"]
    imp = raw.impressions.select(expect.impressions.column_names)
    users = raw.users.select(expect.users.column_names)
    assert imp.schema.equals(expect.impressions.schema)
    assert imp.equals(expect.impressions)  # ids, lists, labels and the attached ground truth
    assert users.equals(expect.users)
    for t in (raw.impressions, raw.users):
        for c in t.column_names:
            if c.endswith(VALUE_SUFFIX):
                v = t.column(c).combine_chunks()
                v = v.flatten() if pa.types.is_list(v.type) else v
                assert v.null_count == 0 and np.all(v.to_numpy() == 1.0), c
    assert raw.impressions.column("210" + VALUE_SUFFIX).type == pa.list_(pa.float32())
    assert raw.impressions.column("508" + VALUE_SUFFIX).type == pa.float32()


def test_summary_counts_rates_and_fields(sim, ingested):
    out, summary = ingested
    assert json.loads((out / "summary.json").read_text()) == summary
    check_invariant(summary)
    expect = sim["tables"]["train"]
    imp, users = summary["impressions"], summary["users"]
    click = expect.impressions["click"].to_numpy()
    conv = expect.impressions["conversion"].to_numpy()
    assert imp["rows_in"] == imp["rows_written"] == ROWS["train"]
    assert imp["clicks"] == int(click.sum()) and imp["conversions"] == int(conv.sum())
    assert imp["ctr"] == pytest.approx(click.mean())
    assert users["rows_written"] == expect.users.num_rows
    assert users["keys_without_impressions"] == 0
    assert imp["key_runs_not_consecutive"] == 0
    assert summary["files"]["skeleton"]["lines"] == ROWS["train"]
    for f in ("205", "206", "301", "853"):
        d = imp["fields"][f]
        assert d["kind"] == "single" and d["presence"] == 1.0
        assert d["distinct_ids"] == len(np.unique(expect.impressions[f].to_numpy()))
        assert d["distinct_exact"] and d["values_not_1"] == 0
    bag = expect.impressions["210"].combine_chunks()
    d = imp["fields"]["210"]
    assert d["kind"] == "bag" and d["entries"] == len(bag.values)
    assert d["distinct_ids"] == len(np.unique(bag.values.to_numpy()))
    ub = expect.users["110_14"].combine_chunks()
    assert users["fields"]["110_14"]["entries"] == len(ub.values)
    assert users["fields"]["110_14"]["rows_present"] == int(np.count_nonzero(
        np.diff(ub.offsets.to_numpy())))


def test_default_bags_keep_853_as_a_list(sim, tmp_path):
    skel, comm = raw_files(sim, "test")
    summary = ingest(skel, comm, tmp_path / "o")
    check_invariant(summary)
    t = pq.read_table(tmp_path / "o" / "impressions")
    col = t.column("853").combine_chunks()
    assert pa.types.is_list(col.type)
    assert np.all(np.diff(col.offsets.to_numpy()) == 1)
    assert np.array_equal(col.values.to_numpy(),
                          sim["tables"]["test"].impressions["853"].to_numpy())
    assert "ground_truth" not in "".join(t.column_names) and "p_click" not in t.column_names


def test_block_size_does_not_change_the_output(sim, ingested, tmp_path):
    out, summary = ingested
    skel, comm = raw_files(sim)
    # 2 KiB blocks: common lines longer than a block are read across several reads
    tiny = ingest(skel, comm, tmp_path / "tiny", bag_fields=NO_853, block_bytes=2048,
                  shard_rows=700, ground_truth=sim["raw"] / "ground_truth_train.parquet")
    for name in ("impressions", "users"):
        a = pq.read_table(out / name)
        b = pq.read_table(tmp_path / "tiny" / name)
        assert a.equals(b), name
    assert len(list((tmp_path / "tiny" / "impressions").glob("*.parquet"))) == 5  # 3000 / 700
    for name in ("impressions", "users"):
        assert tiny[name]["fields"] == summary[name]["fields"]
        assert tiny[name]["rows_written"] == summary[name]["rows_written"]
    # parsing ahead on two threads keeps the file order
    ingest(skel, comm, tmp_path / "threads", bag_fields=NO_853, block_bytes=4096, workers=2,
           ground_truth=sim["raw"] / "ground_truth_train.parquet")
    for name in ("impressions", "users"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "threads" / name))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_memory_stays_bounded_on_files_much_larger_than_the_buffers(sim, tmp_path):
    """Peak RSS of an ingestion with 64 KiB blocks does not move when the skeleton grows 4x
    (from 25 to 100 copies of the simulated lines: both far beyond every buffer)."""
    skel, comm = raw_files(sim)
    text = skel.read_bytes()
    # The peak RSS of the child's own address space (VmHWM): ru_maxrss would start from the
    # RSS of this process, which the child inherits at fork.
    script = ("import re, sys\nfrom pathlib import Path\nfrom esmm.data import aliccp\n"
              # small output row groups too, so that every buffer is full on both files
              "aliccp._ROW_GROUP_ROWS, aliccp._ROW_GROUP_BYTES = 4096, 1 << 20\n"
              "s = aliccp.ingest(sys.argv[1], sys.argv[2], sys.argv[3], block_bytes=1 << 16)\n"
              "hwm = re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text())\n"
              "print(s['impressions']['rows_written'], hwm.group(1))\n")
    bag_free = tmp_path / "c.csv"  # users without bags: the skeleton dominates
    keep = [line for line in comm.read_bytes().split(b"\n") if line]
    bag_free.write_bytes(b"".join(
        line.split(b",")[0] + b",1,101\x021\x031.0\n" for line in keep))
    peaks = {}
    for copies in (25, 100):
        path = tmp_path / f"s{copies}.csv"
        path.write_bytes(text * copies)
        res = subprocess.run([sys.executable, "-c", script, str(path), str(bag_free),
                              str(tmp_path / f"o{copies}")], capture_output=True, text=True,
                             check=True)
        rows, peak_kb = map(int, res.stdout.split())
        assert rows == ROWS["train"] * copies
        peaks[copies] = peak_kb / 1024
    grown_text = len(text) * 75 / 2**20
    assert grown_text > 30
    assert peaks[100] - peaks[25] < 10, (peaks, grown_text)


# ---------------------------------------------------------------------------------------------
# Hand-written raw files and every kind of bad line

K1, K2 = "84dceed2e3a667f8", "bacff91692951881"


def ent(f, i, v="1.0") -> str:
    return f"{f}\x02{i}\x03{v}"


def skel_line(sid, c, v, key, ents, num=None) -> str:
    return f"{sid},{c},{v},{key},{len(ents) if num is None else num},{chr(1).join(ents)}"


def common_line(key, ents, num=None) -> str:
    return f"{key},{len(ents) if num is None else num},{chr(1).join(ents)}"


COMMON = [common_line(K1, [ent(101, 5), ent("109_14", 7, "0.69315"), ent("109_14", 8, "1.09861")]),
          common_line(K2, [ent(101, 6), ent(121, 3)])]
GOOD = [skel_line(i, int(i % 3 == 0), int(i % 6 == 0), K1 if i < 5 else K2,
                  [ent(205, 100 + i), ent(210, 1), ent(210, 2), ent(508, 9, "0.69315")])
        for i in range(1, 9)]


def write(tmp_path, skeleton_lines, common_lines=COMMON, end="\n", tail="\n"):
    s, c = tmp_path / "skel.csv", tmp_path / "common.csv"
    s.write_bytes((end.join(skeleton_lines) + tail).encode())
    c.write_bytes((end.join(common_lines) + tail).encode())
    return s, c


BAD_SKELETON = {
    "too few columns": (f"9,0,0,{K1},1", "columns", "5 comma-separated columns, expected 6"),
    "too many columns": (skel_line(9, 0, 0, K1, [ent(205, 1)]) + ",x", "columns",
                         "7 comma-separated columns"),
    "entry without \\x03": (skel_line(9, 0, 0, K1, ["205\x021"]), "entry",
                            "is not field\\x02id\\x03value"),
    "empty entry": (skel_line(9, 0, 0, K1, [ent(205, 1), ""]), "entry", "entry 2"),
    "doubled separator": (skel_line(9, 0, 0, K1, ["205\x02\x021\x031.0"]), "entry", "entry 1"),
    "label 2": (skel_line(9, 2, 0, K1, [ent(205, 1)]), "label", "click is '2', expected 0 or 1"),
    "label text": (skel_line(9, 0, "1.0", K1, [ent(205, 1)]), "label", "conversion is '1.0'"),
    "short key": (skel_line(9, 0, 0, K1[:14], [ent(205, 1)]), "key", "not 16 hex digits"),
    "non-hex key": (skel_line(9, 0, 0, K1[:14] + "zz", [ent(205, 1)]), "key", "16 hex"),
    "unknown key": (skel_line(9, 0, 0, "0000000000000001", [ent(205, 1)]), "unknown_key",
                    "0000000000000001 is not in"),
    "num_features disagrees": (skel_line(9, 0, 0, K1, [ent(205, 1)], num=3), "num_features",
                               "num_features is 3 but the feature list holds 1 entries"),
    "num_features text": (skel_line(9, 0, 0, K1, [ent(205, 1)], num="x"),
                          "num_features_value", "num_features 'x' is not an integer"),
    "unknown field": (skel_line(9, 0, 0, K1, [ent(999, 1)]), "field", "unknown field '999'"),
    "user field in skeleton": (skel_line(9, 0, 0, K1, [ent(101, 1)]), "field", "'101'"),
    "bad id": (skel_line(9, 0, 0, K1, [ent(205, "x1")]), "id", "feature id 'x1'"),
    "nan value": (skel_line(9, 0, 0, K1, [ent(205, 1, "nan")]), "value", "not a finite"),
    "text value": (skel_line(9, 0, 0, K1, [ent(205, 1, "abc")]), "value", "value 'abc'"),
    "repeated single field": (skel_line(9, 0, 0, K1, [ent(205, 1), ent(205, 2)]),
                              "repeated_field", "field 205 appears 2 times"),
    "empty line": ("", "empty_line", "empty line"),
    "stray carriage return": (skel_line(9, 0, 0, K1, [ent(205, 1)]).replace(",0,0", ",0\r,0"),
                              "encoding", "carriage return"),
    "bad sample_id": (skel_line("a", 0, 0, K1, [ent(205, 1)]), "sample_id", "sample_id 'a'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SKELETON))
def test_bad_skeleton_line_stops_or_is_skipped_and_counted(tmp_path, case):
    bad, reason, words = BAD_SKELETON[case]
    s, c = write(tmp_path, GOOD[:4] + [bad] + GOOD[4:])
    with pytest.raises(DataError) as err:
        ingest(s, c, tmp_path / "stop")
    msg = str(err.value)
    assert f"{s}, line 5: " in msg and words in msg, msg
    assert not (tmp_path / "stop" / "impressions").exists()  # nothing half-written is left
    summary = ingest(s, c, tmp_path / "skip", on_error="skip")
    check_invariant(summary)
    imp = summary["impressions"]
    assert imp["rows_in"] == 9 and imp["rows_written"] == 8
    assert imp["malformed_by_reason"] == {reason: 1}
    ids = pq.read_table(tmp_path / "skip" / "impressions").column("205").to_pylist()
    assert ids == [100 + i for i in range(1, 9)]  # the good lines, in order


def test_tiny_blocks_report_the_same_line_numbers(tmp_path):
    bad = BAD_SKELETON["num_features disagrees"][0]
    s, c = write(tmp_path, GOOD[:6] + [bad] + GOOD[6:] + [bad])
    with pytest.raises(DataError, match=r"line 7: num_features is 3"):
        ingest(s, c, tmp_path / "a", block_bytes=13)
    summary = ingest(s, c, tmp_path / "b", block_bytes=13, on_error="skip")
    assert summary["impressions"]["malformed_by_reason"] == {"num_features": 2}
    assert summary["impressions"]["rows_written"] == 8


def test_bad_common_lines(tmp_path):
    dup = common_line(K1, [ent(101, 9)])
    bad = common_line("cafe", [ent(101, 9)])
    wrong_field = common_line("0000000000000002", [ent(205, 9)])
    s, c = write(tmp_path, GOOD, COMMON + [dup, bad, wrong_field])
    with pytest.raises(DataError, match=r"common.csv, line 3: common_feature_index "
                                        f"{K1} appears again \\(first on line 1\\)"):
        ingest(s, c, tmp_path / "a")
    summary = ingest(s, c, tmp_path / "b", on_error="skip")
    check_invariant(summary)
    assert summary["users"]["malformed_by_reason"] == {"duplicate_key": 1, "key": 1, "field": 1}
    assert summary["users"]["rows_written"] == 2
    users = pq.read_table(tmp_path / "b" / "users")
    assert users.column("101").to_pylist() == [5, 6]


def test_conversion_without_click_dropped_kept_or_refused(tmp_path):
    cwc = skel_line(9, 0, 1, K2, [ent(205, 1)])
    s, c = write(tmp_path, GOOD + [cwc])
    summary = ingest(s, c, tmp_path / "drop")
    check_invariant(summary)
    imp = summary["impressions"]
    assert imp["dropped"] == {"malformed": 0, "conversion_without_click": 1}
    assert imp["rows_written"] == 8
    summary = ingest(s, c, tmp_path / "keep", conversion_without_click="keep")
    assert summary["impressions"]["rows_written"] == 9
    assert summary["impressions"]["kept_conversion_without_click"] == 1
    with pytest.raises(DataError, match=r"line 9: conversion=1 with click=0"):
        ingest(s, c, tmp_path / "error", conversion_without_click="error")


def test_crlf_truncated_last_line_absent_fields_and_empty_lists(tmp_path):
    lines = GOOD[:2] + [skel_line(3, 1, 0, K1, [ent(206, 4)]),  # no 205, no bag
                        skel_line(4, 0, 0, K1, [], num=0)]  # no feature at all
    (tmp_path / "lf").mkdir()
    (tmp_path / "crlf").mkdir()
    s, c = write(tmp_path / "lf", lines)
    # CRLF line ends and no newline after the last line
    s2, c2 = write(tmp_path / "crlf", lines, end="\r\n", tail="")
    a = ingest(s, c, tmp_path / "a")
    b = ingest(s2, c2, tmp_path / "b")
    assert pq.read_table(tmp_path / "a" / "impressions").equals(
        pq.read_table(tmp_path / "b" / "impressions"))
    assert b["files"]["skeleton"]["crlf_lines"] == 3
    assert b["files"]["skeleton"]["last_line_without_newline"]
    assert not a["files"]["skeleton"]["last_line_without_newline"]
    t = pq.read_table(tmp_path / "a" / "impressions")
    assert t.column("205").to_pylist() == [101, 102, None, None]
    assert t.column("206").to_pylist() == [None, None, 4, None]
    assert t.column("210").to_pylist() == [[1, 2], [1, 2], [], []]
    v = t.column("508" + VALUE_SUFFIX).to_pylist()
    assert v[:2] == pytest.approx([0.69315, 0.69315]) and v[2:] == [None, None]
    assert a["impressions"]["fields"]["205"]["rows_present"] == 2
    assert a["impressions"]["fields"]["508"]["values_not_1"] == 2
    # A last line cut in the middle of an entry is malformed, and says so.
    s3, c3 = write(tmp_path, GOOD[:3] + [GOOD[3][:-8]], tail="")  # cut after "508\x029"
    with pytest.raises(DataError, match=r"line 4: .*the file may be truncated"):
        ingest(s3, c3, tmp_path / "c")


def test_empty_and_missing_files_and_bad_options(tmp_path):
    s, c = write(tmp_path, GOOD)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        ingest(empty, c, tmp_path / "a")
    with pytest.raises(DataError, match="no such"):
        ingest(tmp_path / "nope.csv", c, tmp_path / "a")
    with pytest.raises(UsageError, match="on_error"):
        ingest(s, c, tmp_path / "a", on_error="ignore")
    with pytest.raises(UsageError, match="not Ali-CCP fields"):
        ingest(s, c, tmp_path / "a", bag_fields=("999",))
    ingest(s, c, tmp_path / "b")
    with pytest.raises(UsageError, match="already holds data"):
        ingest(s, c, tmp_path / "b")
    ingest(s, c, tmp_path / "b", overwrite=True)


def test_fast_parser_and_line_explanations_agree():
    """Random corruptions of good lines: a line passes the vectorised parser exactly when the
    per-line explanation finds nothing wrong (swapped \\x02/\\x03 aside, see the docs)."""
    rng = random.Random(5)
    specs = {
        "skeleton": (aliccp._spec("skeleton", aliccp.SKELETON_FIELDS, DEFAULT_BAG_FIELDS),
                     GOOD[2].encode()),
        "common": (aliccp._spec("common", aliccp.COMMON_FIELDS, DEFAULT_BAG_FIELDS),
                   COMMON[0].encode()),
    }
    alphabet = b",\x01\x02\x030159a.-x _e"
    checked = 0
    for i in range(1500):
        spec, base = specs["skeleton" if i % 2 else "common"]
        s = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(s))
            c = alphabet[rng.randrange(len(alphabet))]
            op = rng.random()
            if op < 0.4:
                s[j] = c
            elif op < 0.7:
                s.insert(j, c)
            else:
                del s[j]
        line = bytes(s)
        entries = line.split(b",")[-1].split(b"\x01")
        if any(e.find(b"\x03") < e.find(b"\x02") for e in entries if b"\x02" in e):
            continue  # swapped separators: read as they come (documented)
        try:
            fast_ok = aliccp._parse_fast(line + b"\n", 1, spec).status[0] == 0
        except aliccp._Unparsable:
            fast_ok = False
        assert fast_ok == (diagnose(line, spec) is None), line
        checked += 1
    assert checked > 1000


# ---------------------------------------------------------------------------------------------
# The real common-features lines (no license: read from ../shared when it exists)


@pytest.mark.skipif(not RAW_COMMON.is_file(), reason=f"{RAW_COMMON} is not present (the raw "
                    "lines have no license and are not copied into the repository)")
def test_real_common_features_lines(tmp_path):
    text = RAW_COMMON.read_bytes()
    lines = [line for line in text.split(b"\n") if line]
    keys = [line.split(b",")[0].decode() for line in lines]
    assert keys == ["84dceed2e3a667f8", "0000350f0c2121e7"]
    s = tmp_path / "skel.csv"
    s.write_text("".join(skel_line(i + 1, 0, 0, k, [ent(205, 4186222)]) + "\n"
                         for i, k in enumerate(keys)))
    summary = ingest(s, RAW_COMMON, tmp_path / "o")
    check_invariant(summary)
    users = pq.read_table(tmp_path / "o" / "users").to_pylist()
    assert [u["common_key"] for u in users] == [key_to_int(k) for k in keys]
    bags = ("109_14", "110_14", "127_14", "150_14")
    singles = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
    for u, line in zip(users, lines, strict=True):
        # An independent reading of the text: field -> [(id, value), ...] in file order.
        parsed: dict[str, list] = {}
        for e in line.split(b",", 2)[2].split(b"\x01"):
            f, rest = e.split(b"\x02")
            i, v = rest.split(b"\x03")
            parsed.setdefault(f.decode(), []).append((int(i), float(v)))
        total = sum(len(u[f]) for f in bags) + sum(u[f] is not None for f in singles)
        assert total == int(line.split(b",")[1]) == sum(map(len, parsed.values()))
        for f in bags:
            assert u[f] == [i for i, _ in parsed[f]]
            assert u[f + VALUE_SUFFIX] == pytest.approx([v for _, v in parsed[f]], rel=1e-6)
        for f in singles:
            assert u[f] == (parsed[f][0][0] if f in parsed else None)
    first, second = users
    assert sum(len(first[f]) for f in bags) + 9 == 343
    assert sum(len(second[f]) for f in bags) + 9 == 811
    assert (first["101"], first["125"], first["126"]) == (31319, 3438774, 3438779)
    assert first["150_14"][0] == 3878882
    assert first["150_14" + VALUE_SUFFIX][0] == np.float32(3.28343)
    assert [len(first[f]) for f in bags] == [35, 107, 65, 127]
    assert [len(second[f]) for f in bags] == [99, 316, 190, 197]
    assert second["127_14"][:2] == [3716224, 3514627]
    assert second["127_14" + VALUE_SUFFIX][0] == np.float32(1.94591)
    fields = summary["users"]["fields"]
    assert fields["110_14"]["entries"] == 107 + 316
    assert fields["150_14"]["values_not_1"] > 0 and fields["101"]["values_not_1"] == 0


# ---------------------------------------------------------------------------------------------
# Command line and training on ingested data


def test_cli_simulate_raw_then_ingest(tmp_path):
    res = runner.invoke(app, ["simulate", "--format", "aliccp-raw", "--preset", "dense",
                              "--rows", "2000", "--seed", "4", "--out", str(tmp_path / "raw"),
                              "--set", "n_users=200", "--set", "n_items=1000"])
    assert res.exit_code == 0, _out(res)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "raw" / f"sample_skeleton_{split}.csv").is_file()
    args = ["data", "aliccp", "--skeleton", str(tmp_path / "raw" / "sample_skeleton_valid.csv"),
            "--common", str(tmp_path / "raw" / "common_features_valid.csv"),
            "--out", str(tmp_path / "valid"), "--shard-rows", "200",
            "--ground-truth", str(tmp_path / "raw" / "ground_truth_valid.parquet")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _out(res)
    assert '"rows_written": 500' in res.output
    assert len(list((tmp_path / "valid" / "impressions").glob("part-*.parquet"))) == 3
    res = runner.invoke(app, args)  # the folder holds data now
    assert res.exit_code == 2 and "--overwrite" in _out(res)
    res = runner.invoke(app, args + ["--overwrite", "--on-error", "maybe"])
    assert res.exit_code == 2 and "on_error" in _out(res)
    res = runner.invoke(app, ["simulate", "--format", "csv", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "aliccp-raw" in _out(res)


def test_cli_bad_line_exits_1_with_file_and_line(tmp_path):
    s, c = write(tmp_path, GOOD[:2] + [BAD_SKELETON["label 2"][0]])
    res = runner.invoke(app, ["data", "aliccp", "--skeleton", str(s), "--common", str(c),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert f"{s}, line 3: click is '2'" in _out(res) and "Traceback" not in _out(res)
    res = runner.invoke(app, ["data", "aliccp", "--skeleton", str(s), "--common", str(c),
                              "--out", str(tmp_path / "o"), "--on-error", "skip"])
    assert res.exit_code == 0, _out(res)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["impressions"][
        "malformed_by_reason"] == {"label": 1}


def _aliccp_config(train: Path, eval_: Path) -> dict:
    tree = yaml.safe_load((REPO / "configs" / "esmm_aliccp.yaml").read_text())
    tree["data"].update(train=str(train), eval=str(eval_), test=str(eval_))
    for f in tree["features"]:
        f["buckets"] = min(f["buckets"], 500)
    tree["model"]["tower"] = [16]
    tree["train"].update(batch_size=256, max_steps=3, progress="off")
    return tree


def test_ingested_data_trains_with_the_aliccp_config(sim, tmp_path):
    tree = yaml.safe_load((REPO / "configs" / "esmm_aliccp.yaml").read_text())
    cfg = config_from_dict(tree)
    assert cfg.model.embedding_dim == 18 and cfg.model.tower == [360, 200, 80]
    assert cfg.model.activation == "relu"
    assert cfg.data.loader == "stream"  # 42M impressions: never held whole
    assert (cfg.train.optimizer.name, cfg.train.optimizer.betas, cfg.train.optimizer.eps) == (
        "adam", (0.9, 0.999), 1e-8)
    names = {f.name for f in cfg.features}
    assert names == set(aliccp.SKELETON_FIELDS) | set(aliccp.COMMON_FIELDS)
    assert {f.name for f in cfg.features if f.kind == "multi_categorical"} == set(
        DEFAULT_BAG_FIELDS)

    data = {}
    for split in ("train", "test"):
        skel, comm = raw_files(sim, split)
        ingest(skel, comm, tmp_path / split)  # default bags: the config's bag fields
        data[split] = tmp_path / split
    small = _aliccp_config(data["train"], data["test"])
    for leak in ("click", "conversion"):  # a label among the features is refused
        bad = json.loads(json.dumps(small))
        bad["features"].append({"name": leak, "kind": "categorical", "buckets": 2})
        with pytest.raises(ConfigError, match="listed as features"):
            config_from_dict(bad)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(small))
    res = runner.invoke(app, ["train", str(p), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, _out(res)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_a_failed_raw_write_keeps_the_previous_files(tmp_path):
    from esmm.data.aliccp import write_raw

    skeleton, common, gt = tmp_path / "s.csv", tmp_path / "c.csv", tmp_path / "g.parquet"
    for p in (skeleton, common, gt):
        p.write_bytes(b"previous")
    users = [pa.table({"common_key": pa.array([1, 2], pa.int64())})]
    good = pa.table({"sample_id": [1], "common_key": [1], "click": [1], "conversion": [0],
                     "p_click": [0.5], "p_conversion": [0.1], "conversion_if_clicked": [0]})

    def impressions():
        yield good
        raise RuntimeError("the simulator died")

    with pytest.raises(RuntimeError, match="died"):
        write_raw(impressions(), users, skeleton, common, gt)
    assert skeleton.read_bytes() == b"previous" and gt.read_bytes() == b"previous"
    assert common.read_bytes() != b"previous"  # written whole before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "g.parquet", "s.csv"]
    write_raw([good], users, skeleton, common, gt)
    assert skeleton.read_text().startswith("1,1,0,")
    assert pq.read_table(gt).num_rows == 1
