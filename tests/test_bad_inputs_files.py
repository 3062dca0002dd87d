"""Hostile or damaged files and output paths, through the command line.

Every case asserts the exit code, one ``esmm: error:`` line naming the file or key, no
traceback, and that nothing was lost or half-written.
"""

import hashlib
import pickle
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

import esmm.export as ex
from esmm.checkpoint import load_checkpoint, save_atomic, seal
from esmm.cli import app
from esmm.config import config_from_dict
from esmm.errors import EsmmError
from esmm.train import train
from tests.conftest import cli_output, make_rows, small_config, write_flat
from tests.test_checkpoint import Marker, flip_weight_byte

runner = CliRunner()


def one_error(res, code, *needles):
    """Assert the exit code and a single one-line error holding every needle."""
    text = cli_output(res)
    assert res.exit_code == code, text
    assert "Traceback" not in text and not isinstance(res.exception, AssertionError), text
    try:
        err = res.stderr
    except ValueError:  # a runner that mixes stderr into output
        err = res.output
    errors = [line for line in err.splitlines() if line.startswith("esmm: error:")]
    assert len(errors) == 1, text
    for n in needles:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def run(flat_data, tmp_path_factory):
    cfg = config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=12,
                                        eval_every=6, checkpoint_interval_s=0))
    out = tmp_path_factory.mktemp("bad") / "run"
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def artifacts(run, tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    for fmt in ex.FORMATS:
        ex.export_run(run, fmt, d / f"model.{fmt}", parity_rows=32)
    return {fmt: d / f"model.{fmt}" for fmt in ex.FORMATS}


def _copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# ----------------------------------------------------------------------------- checkpoints


def _evil(run, tmp_path, which):
    """A copy of ``run`` whose ``which`` checkpoint carries a pickled os.system call."""
    bad = _copy_run(run, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    path = bad / "checkpoints" / which
    ck = load_checkpoint(path)
    ck["monitor"] = Marker(marker)
    torch.save(ck, path)
    return bad, path, marker


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(run, flat_data, tmp_path,
                                                               command):
    bad, path, marker = _evil(run, tmp_path, "best.pt")
    out = tmp_path / "out.bin"
    args = {"evaluate": ["evaluate", str(bad), "--out", str(out)],
            "export": ["export", str(bad), "--out", str(out)],
            "predict": ["predict", str(bad), "--data", str(flat_data["valid"]),
                        "--out", str(out)]}[command]
    before = digest(path)
    res = runner.invoke(app, args)
    one_error(res, 1, f"checkpoint {path} is refused", "posix.system", "written by esmm")
    assert not marker.exists() and not out.exists()
    assert digest(path) == before


def test_resume_from_a_checkpoint_carrying_code_is_refused(run, tmp_path):
    bad, path, marker = _evil(run, tmp_path, "latest.pt")
    before = {p.name: digest(p) for p in (bad / "checkpoints").iterdir()}
    res = runner.invoke(app, ["train", str(bad / "config.yaml"), "--out", str(bad), "--resume"])
    one_error(res, 1, f"checkpoint {path} is refused", "posix.system")
    assert not marker.exists()
    assert {p.name: digest(p) for p in (bad / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_a_run_that_does_not_exist_is_a_usage_error(flat_data, tmp_path, command):
    gone = tmp_path / "no_such_run"
    out = tmp_path / "out.file"
    extra = {"evaluate": [], "export": ["--format", "onnx"], "predict": []}[command]
    data = [] if command == "export" else ["--data", str(flat_data["valid"])]
    res = runner.invoke(app, [command, str(gone), *data, *extra, "--out", str(out)])
    one_error(res, 2, f"{gone}: no such run directory or checkpoint file")
    assert not out.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_carrying_code_is_refused_in_one_line(run, tmp_path, protocol):
    # Not a torch zip but a bare pickle: torch warns about protocols other than 2 on stderr
    # before refusing, which would make the refusal a three-line message.
    bad = _copy_run(run, tmp_path / "plain")
    marker = tmp_path / "code-ran"
    path = bad / "checkpoints" / "best.pt"
    path.write_bytes(pickle.dumps({"model": Marker(marker)}, protocol=protocol))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(EsmmError, match="is refused: it "):
            load_checkpoint(path)
    assert [str(w.message) for w in seen] == []
    res = runner.invoke(app, ["evaluate", str(bad)])
    one_error(res, 1, f"checkpoint {path} is refused",
              "posix.system" if protocol == 2 else "the safe loader does not accept")
    assert not marker.exists()


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive: "
                  "failed finding central directory); it is not a complete esmm checkpoint"),
    ("text", "is refused: it is not a checkpoint esmm writes (its pickle uses opcode 103"),
    ("empty", "is empty (0 bytes)"),
])
def test_a_damaged_or_foreign_best_pt_gets_one_line_saying_what_it_is(run, tmp_path, damage,
                                                                      needle):
    bad = _copy_run(run, tmp_path / damage)
    path = bad / "checkpoints" / "best.pt"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "text": b"garbage\n", "empty": b""}
    path.write_bytes(damaged[damage])
    res = runner.invoke(app, ["evaluate", str(bad)])
    line = one_error(res, 1, f"checkpoint {path} ", needle)
    assert "If you are seeing this error" not in line and "which loading would run" not in line


def test_a_flipped_weight_byte_in_best_pt_is_refused(run, tmp_path):
    bad = _copy_run(run, tmp_path / "flipped")
    path = bad / "checkpoints/best.pt"
    flip_weight_byte(path)
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", str(bad), "--out", str(out)])
    one_error(res, 1, f"checkpoint {path} is corrupt", "SHA-256")
    assert not out.exists()


@pytest.mark.parametrize("change,needle", [
    ("drop", "weight 'cvr_tower.net.2.weight' is missing"),
    ("shape", "weight 'cvr_tower.net.2.weight' has shape (16, 31), the model its config builds "
              "expects (16, 32)"),
    ("no_spec", "has no 'feature_spec' entry"),
])
def test_checkpoint_missing_a_key_or_misshapen_names_it(run, tmp_path, change, needle):
    ck = load_checkpoint(run / "checkpoints/best.pt")
    if change == "drop":
        del ck["model"]["cvr_tower.net.2.weight"]
    elif change == "shape":
        ck["model"]["cvr_tower.net.2.weight"] = torch.zeros(16, 31)
    else:
        del ck["feature_spec"]
    path = tmp_path / "x.pt"
    save_atomic(seal(ck), path)
    for cmd in (["evaluate", str(path)], ["export", str(path), "--out", str(tmp_path / "a")]):
        one_error(runner.invoke(app, cmd), 1, f"checkpoint {path}", needle)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- artifacts


def _flip_onnx_weight(path):
    import onnx

    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    data = bytearray(path.read_bytes())
    pos = bytes(data).find(init.raw_data) + len(init.raw_data) // 2
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    return init.name


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_a_flipped_weight_byte_in_an_artifact_is_refused_at_serve_start(artifacts, tmp_path,
                                                                       fmt):
    path = tmp_path / artifacts[fmt].name
    shutil.copy(artifacts[fmt], path)
    ex.load_artifact(path)  # intact: loads and verifies
    if fmt == "onnx":
        _flip_onnx_weight(path)
    else:
        flip_weight_byte(path)
    with pytest.raises(ex.EsmmError, match="the SHA-256 of its weights"):
        ex.load_artifact(path)
    res = runner.invoke(app, ["serve", str(path), "--port", "0"])
    one_error(res, 1, str(path), "SHA-256 of its weights", "export it again")


def test_an_altered_onnx_graph_is_refused(artifacts, tmp_path):
    import onnx

    proto = onnx.load(str(artifacts["onnx"]))
    node = next(n for n in proto.graph.node if n.op_type == "Sigmoid")
    node.op_type = "Tanh"  # still a valid model, with every weight unchanged
    path = tmp_path / "altered.onnx"
    onnx.save_model(proto, str(path))
    res = runner.invoke(app, ["serve", str(path), "--port", "0"])
    one_error(res, 1, str(path), "SHA-256 of its graph")


def test_artifacts_carry_the_digests_they_are_checked_against(artifacts):
    for fmt, path in artifacts.items():
        pred = ex.load_artifact(path)
        assert pred.metadata["sha256"] == pred.digests, fmt
        assert set(pred.digests) == {"weights", "graph"}


def test_a_failed_export_keeps_the_previous_artifact(run, artifacts, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    shutil.copy(artifacts["onnx"], out)
    before = digest(out)

    def broken(*args, **kwargs):
        raise ex.EsmmError("parity check failed: p_cvr differs (simulated)")
    monkeypatch.setattr(ex, "check_parity", broken)
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(out)])
    one_error(res, 1, "parity check failed")
    assert digest(out) == before and listing(tmp_path) == ["model.onnx"]


# ----------------------------------------------------------------------------- outputs


def test_a_predict_failing_in_a_later_chunk_keeps_the_previous_out(run, tmp_path):
    data = tmp_path / "rows"
    data.mkdir()
    write_flat(data / "part-0.parquet", make_rows(3000, seed=7))
    t = pq.read_table(write_flat(data / "part-1.parquet", make_rows(3000, seed=8)))
    d1 = t.column("d1").to_numpy().copy()
    d1[2500] = np.nan
    pq.write_table(t.set_column(t.column_names.index("d1"), "d1", pa.array(d1)),
                   data / "part-1.parquet")
    earlier = write_flat(tmp_path / "earlier.parquet", make_rows(1000, seed=9))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "pred.parquet"
    ok = runner.invoke(app, ["predict", str(run), "--data", str(earlier), "--out", str(out)])
    assert ok.exit_code == 0, cli_output(ok)
    before = digest(out)
    # part-0 is scored (and was written, before outputs went through a temporary file)
    # before part-1 fails.
    res = runner.invoke(app, ["predict", str(run), "--data", str(data), "--out", str(out),
                              "--loader", "stream"])
    one_error(res, 1, "part-1.parquet", "'d1'")
    assert digest(out) == before
    assert listing(out_dir) == ["pred.parquet"]


@pytest.mark.parametrize("command", ["predict", "export", "evaluate"])
def test_out_naming_a_folder_where_a_file_is_expected(run, flat_data, tmp_path, command):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    args = {"predict": ["predict", str(run), "--data", str(flat_data["valid"])],
            "export": ["export", str(run)],
            "evaluate": ["evaluate", str(run)]}[command]
    res = runner.invoke(app, [*args, "--out", str(folder)])
    one_error(res, 2, f"--out {folder}: is a folder; expected a file name")
    assert listing(folder) == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"


def test_out_under_a_file_is_refused(run, flat_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    out = blocker / "pred.parquet"
    res = runner.invoke(app, ["predict", str(run), "--data", str(flat_data["valid"]),
                              "--out", str(out)])
    one_error(res, 2, f"--out {out}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("command", ["data aliccp", "train", "simulate", "demo",
                                     "benchmark paper", "benchmark bias-sweep"])
def test_out_naming_a_file_where_a_folder_is_expected(flat_data, tmp_path, command):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    skel, common, cfg = tmp_path / "skel.csv", tmp_path / "common.csv", tmp_path / "cfg.yaml"
    skel.write_text("")
    common.write_text("")
    cfg.write_text(yaml.safe_dump(small_config(flat_data["train"], max_steps=2)))
    args = {"data aliccp": ["--skeleton", str(skel), "--common", str(common)],
            "train": [str(cfg)], "simulate": ["--rows", "1000"], "demo": ["--rows", "1000"],
            "benchmark paper": [], "benchmark bias-sweep": []}[command]
    res = runner.invoke(app, [*command.split(), *args, "--out", str(taken)])
    one_error(res, 2, f"--out {taken}: is a file; expected a folder")
    assert taken.read_text() == "mine"
    assert listing(tmp_path) == ["cfg.yaml", "common.csv", "skel.csv", "taken.txt"]


def test_artifact_metadata_without_feature_spec_is_named(artifacts, tmp_path):
    import json

    import onnx

    proto = onnx.load(str(artifacts["onnx"]))
    entry = next(p for p in proto.metadata_props if p.key == ex.METADATA_KEY)
    meta = json.loads(entry.value)
    del meta["feature_spec"]
    entry.value = json.dumps(meta)
    path = tmp_path / "nospec.onnx"
    onnx.save_model(proto, str(path))
    res = runner.invoke(app, ["serve", str(path), "--port", "0"])
    one_error(res, 1, str(path), "metadata field feature_spec: missing")
