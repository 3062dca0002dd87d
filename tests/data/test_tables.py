"""Reading splits: which format a path is, the columns and types every file must share,
string keys, and errors that name the row of the file a bad value sits in."""

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from esmm.config import DataConfig, config_from_dict
from esmm.data.tables import (
    RawTables,
    check_schemas,
    encode,
    encode_users,
    file_format,
    group_ids,
    load_split,
    read_tables,
)
from esmm.errors import DataError
from esmm.features import FeatureSpec, FieldSpec, spec_from_config
from tests.conftest import make_rows, small_config, write_flat

SPEC = FeatureSpec((FieldSpec("205", "categorical", 100, 4, "mean"),
                    FieldSpec("d1", "dense", 0, 1, "sum")))


def test_file_format_of_files_and_folders(tmp_path):
    cfg = DataConfig()
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "a.csv").write_text("x\n1\n")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "pq" / "a.parquet")
    assert file_format(tmp_path / "csvs", cfg) == "csv"
    assert file_format(tmp_path / "csvs" / "a.csv", cfg) == "csv"
    assert file_format(tmp_path / "pq", cfg) == "parquet"
    assert file_format(tmp_path / "csvs", DataConfig(format="parquet")) == "parquet"


def test_check_schemas_names_the_file_and_exactly_what_it_lacks():
    a = pa.schema([("205", pa.int64()), ("d1", pa.float64()), ("x", pa.int64())])
    b = pa.schema([("d1", pa.float64())])
    with pytest.raises(DataError, match=r"^b: lacks column\(s\) \['205'\] that a holds"):
        check_schemas([("a", a), ("b", b)], ["205", "d1", "missing"])
    check_schemas([("a", a), ("b", b)], ["d1", "missing"])  # no file holds `missing`: fine
    c = pa.schema([("205", pa.string()), ("d1", pa.float64())])
    with pytest.raises(DataError, match=r"^c: id column '205' has type string but a has int64"):
        check_schemas([("a", a), ("c", c)], ["205"], SPEC)
    d = pa.schema([("205", pa.float64()), ("d1", pa.int32())])  # floats hash as integers
    check_schemas([("a", a), ("d", d)], ["205", "d1"], SPEC)


def test_errors_after_dropped_rows_name_the_row_of_the_file(tmp_path):
    n = 10
    t = pa.table({"205": list(range(n)), "d1": [0.5] * n, "click": [0] * n,
                  "conversion": [0, 1, 0, 1] + [0] * (n - 4)})
    d1 = [0.5] * n
    d1[6] = float("inf")
    t = t.set_column(1, "d1", pa.array(d1))
    pq.write_table(t, tmp_path / "x.parquet")
    cfg = DataConfig(user_column=None, conversion_without_click="drop")
    # Rows 1 and 3 are dropped first; the bad value is row 6 of the file all the same.
    with pytest.raises(DataError, match=r"x.parquet: dense field 'd1' .*first at row 6 \(\+inf"):
        load_split(tmp_path / "x.parquet", SPEC, cfg)


def test_a_csv_folder_is_one_split_with_rows_named_by_file_line(tmp_path):
    r = make_rows(600, seed=3)
    t = pq.read_table(write_flat(tmp_path / "x.parquet", r))
    t = t.set_column(t.column_names.index("109_14"), "109_14", t.column("206"))
    (tmp_path / "csv").mkdir()
    pacsv.write_csv(t.slice(0, 250), tmp_path / "csv" / "a.csv")
    pacsv.write_csv(t.slice(250), tmp_path / "csv" / "b.csv")
    cfg = config_from_dict(small_config(tmp_path / "csv"))
    spec = spec_from_config(cfg)
    split = load_split(tmp_path / "csv", spec, cfg.data)
    whole = load_split(tmp_path / "x.parquet", spec, cfg.data)
    assert split.n == whole.n
    np.testing.assert_array_equal(split.ids["205"], whole.ids["205"])
    np.testing.assert_allclose(split.dense, whole.dense)
    raw = read_tables(tmp_path / "csv", cfg.data, ["205"], spec=spec)
    assert raw.rows.at(251) == (str(tmp_path / "csv" / "b.csv"), "line 3")


def test_group_ids_of_strings_are_stable_and_missing_is_zero():
    a = group_ids(pa.chunked_array([pa.array(["u1", "u2", None]), pa.array(["u2"])]))
    b = group_ids(pa.array(["u2", "u1"]).dictionary_encode())
    assert a[1] == a[3] == b[0] and a[0] == b[1] and a[0] != a[1] and a[2] == 0
    np.testing.assert_array_equal(group_ids(pa.array([7, None, 9])), [7, 0, 9])


def test_string_join_keys_join_exactly_and_refuse_unknown_or_repeated_keys():
    spec = FeatureSpec((FieldSpec("121", "categorical", 10, 4, "mean"),))
    cfg = DataConfig(user_column=None)
    users = pa.table({"common_key": ["b", "a", "c"], "121": [2, 1, 3]})
    side = encode_users(users, ["205"], spec, cfg, "u.parquet")
    imp = pa.table({"common_key": ["a", "c", "a", "b"]})
    np.testing.assert_array_equal(side.rows_of(imp.column("common_key"), "i"), [1, 2, 1, 0])
    with pytest.raises(DataError, match=r"i: 1 impression\(s\) have a 'common_key' absent from "
                                        r"the users table \(first at row 1: 'zz'\)"):
        side.rows_of(pa.array(["a", "zz"]), "i")
    with pytest.raises(DataError, match="holds int values but the users' holds str values"):
        side.rows_of(pa.array([1, 2]), "i")
    with pytest.raises(DataError, match="has key 'a' more than once"):
        encode_users(pa.table({"common_key": ["a", "b", "a"], "121": [1, 2, 3]}), [], spec,
                     cfg, "u")
    raw = RawTables("n", pa.table({"common_key": ["c", "a"], "click": [0, 1],
                                   "conversion": [0, 0]}), users)
    data = encode(raw, spec, cfg)
    np.testing.assert_array_equal(data.user_row, [2, 1])


def test_numeric_join_keys_of_integer_and_float_columns_join_by_value():
    spec = FeatureSpec((FieldSpec("121", "categorical", 10, 4, "mean"),))
    users = pa.table({"common_key": [30, 10, 20], "121": [3, 1, 2]})
    side = encode_users(users, [], spec, DataConfig(user_column=None), "u")
    np.testing.assert_array_equal(side.rows_of(pa.array([10.0, 30.0]), "i"), [1, 0])
    with pytest.raises(DataError, match=r"first at row 1: 15.0"):
        side.rows_of(pa.array([10.0, 15.0]), "i")
