"""Streaming splits: the same rows and batches as in memory, every row once, bounded buffers."""

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import config_from_dict
from esmm.data.batches import iter_batches, num_batches, read_ahead
from esmm.data.stream import ParquetStream, open_split
from esmm.data.tables import load_split
from esmm.errors import ConfigError, DataError
from esmm.evaluate import evaluate
from esmm.features import spec_from_config
from esmm.models import build_model
from esmm.train import load_checkpoint, train
from tests.conftest import cli_output, small_config


def _with_row_groups(src, dst, rows_per_group, files=1):
    """Rewrite a Parquet file (or a normalized folder's impressions) with small row groups."""
    t = pq.read_table(src)
    dst.mkdir(parents=True, exist_ok=True)
    cut = np.linspace(0, t.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(t.slice(cut[i], cut[i + 1] - cut[i]), dst / f"part-{i}.parquet",
                       row_group_size=rows_per_group)
    return dst


@pytest.fixture(scope="module")
def streams(flat_data, normalized_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    flat_dir = _with_row_groups(flat_data["train"], d / "flat", 1000, files=3)
    norm_dir = d / "norm"
    _with_row_groups(normalized_data["train"] / "impressions.parquet", norm_dir / "impressions",
                     700, files=2)
    (norm_dir / "users.parquet").write_bytes(
        (normalized_data["train"] / "users.parquet").read_bytes())
    tree = small_config(flat_data["train"])
    tree["data"].update(chunk_rows=333, shuffle_buffer=2000)
    cfg = config_from_dict(tree)
    spec = spec_from_config(cfg)
    return {
        "cfg": cfg, "spec": spec,
        "flat": (load_split(flat_data["train"], spec, cfg.data),
                 ParquetStream(flat_dir, spec, cfg.data)),
        "norm": (load_split(normalized_data["train"], spec, cfg.data),
                 ParquetStream(norm_dir, spec, cfg.data)),
    }


def _assert_same_batch(a, b):
    assert a.size == b.size
    assert torch.equal(a.rows, b.rows)
    for name in a.ids:
        assert torch.equal(a.ids[name], b.ids[name]), name
    for name in a.bags:
        for x, y in zip(a.bags[name], b.bags[name], strict=True):
            assert torch.equal(x, y), name
    assert torch.equal(a.dense, b.dense)
    assert torch.equal(a.click, b.click) and torch.equal(a.conversion, b.conversion)
    if a.user_index is not None:
        # The same users per impression (their row numbers in the batch may differ).
        for name in a.user_ids:
            assert torch.equal(a.user_ids[name][a.user_index], b.user_ids[name][b.user_index])


@pytest.mark.parametrize("layout", ["flat", "norm"])
@pytest.mark.parametrize("batch_size", [256, 1000, 5000])
def test_unshuffled_stream_gives_the_in_memory_batches(streams, layout, batch_size):
    memory, stream = streams[layout]
    assert stream.n == memory.n
    got = list(stream.batches(batch_size))
    want = list(iter_batches(memory, batch_size))
    assert len(got) == len(want) == num_batches(memory.n, batch_size)
    for a, b in zip(got, want, strict=True):
        _assert_same_batch(a, b)


@pytest.mark.parametrize("layout", ["flat", "norm"])
def test_shuffled_epoch_yields_every_row_once_within_bounded_buffers(streams, layout):
    memory, stream = streams[layout]
    cfg = streams["cfg"].data
    batches = list(stream.batches(512, shuffle=True, seed=4, epoch=1))
    assert len(batches) == num_batches(memory.n, 512)
    assert all(b.size == 512 for b in batches[:-1])
    rows = np.concatenate([b.rows.numpy() for b in batches])
    assert np.array_equal(np.sort(rows), np.arange(memory.n))
    # Each row keeps its own labels and bags through the shuffle.
    for b in batches[:3]:
        r = b.rows.numpy()
        assert np.array_equal(b.click.numpy(), memory.click[r])
        assert np.array_equal(b.ids["205"].numpy(), memory.ids["205"][r])
    assert rows[:2000].max() - rows[:2000].min() > 2000  # row groups are mixed, not in order
    assert 0 < stream.max_buffer_rows <= cfg.shuffle_buffer + cfg.chunk_rows + 512
    again = np.concatenate([b.rows.numpy() for b in stream.batches(512, shuffle=True, seed=4,
                                                                    epoch=1)])
    other = np.concatenate([b.rows.numpy() for b in stream.batches(512, shuffle=True, seed=4,
                                                                    epoch=2)])
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_stream_resumes_at_a_batch_in_the_same_order(streams):
    _, stream = streams["flat"]
    full = [b.rows.numpy() for b in stream.batches(300, shuffle=True, seed=2, epoch=0)]
    rest = [b.rows.numpy() for b in stream.batches(300, shuffle=True, seed=2, epoch=0,
                                                   start_batch=11)]
    assert len(rest) == len(full) - 11
    assert all(np.array_equal(a, b) for a, b in zip(full[11:], rest, strict=True))


@pytest.mark.parametrize("layout", ["flat", "norm"])
def test_streamed_evaluation_equals_in_memory_evaluation(streams, layout):
    memory, stream = streams[layout]
    torch.manual_seed(0)
    model = build_model(streams["cfg"], streams["spec"])
    a = evaluate(model, memory, batch_size=1024)
    b = evaluate(model, stream, batch_size=1024)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    assert a["n_impressions"] == memory.n and "cvr_auc_entire_space" in a and "ctr_gauc" in a


def test_conversion_without_click_is_counted_as_in_memory(tmp_path, flat_data, streams):
    t = pq.read_table(flat_data["train"])
    conv = t.column("conversion").to_numpy().copy()
    no_click = np.flatnonzero(t.column("click").to_numpy() == 0)
    conv[no_click[[3, 1500, 9000]]] = 1
    t = t.set_column(t.column_names.index("conversion"), "conversion", pa.array(conv))
    pq.write_table(t, tmp_path / "bad.parquet", row_group_size=1000)
    cfg, spec = streams["cfg"], streams["spec"]
    s = ParquetStream(tmp_path / "bad.parquet", spec, cfg.data)
    m = load_split(tmp_path / "bad.parquet", spec, cfg.data)
    assert s.n == m.n == t.num_rows - 3
    assert s.dropped_conversion_without_click == m.dropped_conversion_without_click == 3
    assert s.rows_read == t.num_rows
    rows = np.concatenate([b.rows.numpy() for b in s.batches(700, shuffle=True, seed=1)])
    assert np.array_equal(np.sort(rows), np.arange(s.n))
    strict = cfg.data.model_copy(update={"conversion_without_click": "error"})
    with pytest.raises(DataError, match=rf"bad.parquet: row {no_click[3]} has conversion=1"):
        ParquetStream(tmp_path / "bad.parquet", spec, strict)


def test_bad_input_names_the_file_and_the_row_in_the_file(tmp_path, flat_data, streams):
    t = pq.read_table(flat_data["train"])
    click = t.column("click").to_numpy().astype(np.int64)
    click[5432] = 3
    t = t.set_column(t.column_names.index("click"), "click", pa.array(click))
    pq.write_table(t, tmp_path / "labels.parquet", row_group_size=1000)
    cfg, spec = streams["cfg"], streams["spec"]
    with pytest.raises(DataError, match=r"labels.parquet.*row 5432 holds 3"):
        ParquetStream(tmp_path / "labels.parquet", spec, cfg.data)
    t = pq.read_table(flat_data["train"]).drop_columns(["206"])
    pq.write_table(t, tmp_path / "nofield.parquet")
    with pytest.raises(ConfigError, match=r"feature '206'.*not in the data"):
        ParquetStream(tmp_path / "nofield.parquet", spec, cfg.data)
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        ParquetStream(tmp_path / "empty.parquet", spec, cfg.data)
    csv = tmp_path / "rows.csv"
    csv.write_text("click,conversion\n1,0\n")
    with pytest.raises(ConfigError, match="data.loader=stream reads Parquet"):
        open_split(csv, spec, cfg.data, loader="stream")


def test_read_ahead_keeps_order_raises_errors_and_stops_when_closed():
    assert list(read_ahead(iter(range(100)), 3)) == list(range(100))
    assert list(read_ahead(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield 1
        raise ValueError("bad row")
    it = read_ahead(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1
    it = read_ahead(endless(), 2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5 + 2 + 1  # the producer stopped, at most `depth` ahead
    assert not any(t.name == "esmm-read-ahead" for t in threading.enumerate())


def test_training_on_a_stream_learns_and_resumes_to_the_same_weights(streams, flat_data,
                                                                      tmp_path, cfg_factory):
    _, stream = streams["flat"]
    train_dir = stream.source
    cfg = cfg_factory(train_dir, flat_data["valid"], eval_every=15, epochs=2,
                      checkpoint_interval_s=0,
                      overrides={"data.loader": "stream", "data.chunk_rows": 333,
                                 "data.shuffle_buffer": 2000})
    full = train(cfg, tmp_path / "full")
    assert full.metrics["ctr_auc"] > 0.7 and full.metrics["ctcvr_auc"] > 0.7

    class Killed(Exception):
        pass

    def kill(step):
        if step == 37:
            raise Killed
    with pytest.raises(Killed):
        train(cfg, tmp_path / "part", on_step=kill)
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed.step == full.step
    a = load_checkpoint(tmp_path / "full/checkpoints/latest.pt")["model"]
    b = load_checkpoint(tmp_path / "part/checkpoints/latest.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_predict_streams_parquet_and_writes_what_the_in_memory_path_writes(streams, flat_data,
                                                                             tmp_path,
                                                                             cfg_factory):
    cfg = cfg_factory(flat_data["train"], max_steps=3)
    train(cfg, tmp_path / "run")
    _, stream = streams["flat"]  # 3 files, row groups of 1000 rows
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for f in sorted(Path(stream.source).glob("*.parquet")):
        t = pq.read_table(f).drop_columns(["click", "conversion"])
        pq.write_table(t, unlabeled / f.name, row_group_size=1000)
    runner = CliRunner()
    outs = {}
    for loader in ("stream", "memory"):
        outs[loader] = tmp_path / f"{loader}.parquet"
        res = runner.invoke(app, ["predict", str(tmp_path / "run"), "--data", str(unlabeled),
                                  "--out", str(outs[loader]), "--keep", "sample_id",
                                  "--loader", loader, "--batch-size", "700"])
        assert res.exit_code == 0, cli_output(res)
    a, b = pq.read_table(outs["stream"]), pq.read_table(outs["memory"])
    assert a.column_names == b.column_names == ["sample_id", "p_ctr", "p_cvr", "p_ctcvr"]
    assert a.column("sample_id").to_pylist() == list(range(stream.n))
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(a.column(k).to_numpy(), b.column(k).to_numpy(),
                                   rtol=1e-6, atol=1e-9)
    assert pq.ParquetFile(outs["stream"]).num_row_groups > 1  # written chunk by chunk
    res = runner.invoke(app, ["predict", str(tmp_path / "run"), "--data", str(unlabeled),
                              "--out", str(tmp_path / "x.parquet"), "--keep", "nope"])
    assert res.exit_code == 1 and "no column 'nope'" in cli_output(res)
