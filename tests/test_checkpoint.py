"""Checkpoints: plain data read with weights_only=True, sealed with a SHA-256 of every tensor;
run folders: one writer at a time, and a stopped run is always resumable or restartable."""

import logging
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import esmm
from esmm.checkpoint import (
    DIGEST_KEY,
    FORMAT_KEY,
    load_checkpoint,
    load_model,
    save_atomic,
    seal,
    tensors_digest,
)
from esmm.config import config_from_dict
from esmm.errors import ConfigError, EsmmError, UsageError
from esmm.train import build_optimizers, train


class _Killed(Exception):
    pass


def _kill_at(step_to_kill):
    def kill(step):
        if step == step_to_kill:
            raise _Killed
    return kill


class Marker:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def flip_weight_byte(path, pattern="/data/"):
    """Flip one bit in the middle of the largest tensor stored in a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if pattern in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))
    return info.filename


@pytest.fixture(scope="module")
def run(flat_data, tmp_path_factory):
    from tests.conftest import small_config

    cfg = config_from_dict(small_config(flat_data["train"], flat_data["valid"], max_steps=12,
                                        eval_every=6))
    out = tmp_path_factory.mktemp("ck") / "run"
    train(cfg, out)
    return out


def test_checkpoints_are_plain_data_and_sealed(run):
    for name in ("best.pt", "latest.pt"):
        path = run / "checkpoints" / name
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert ck[FORMAT_KEY] == 1 and ck["version"] == esmm.__version__
        assert ck[DIGEST_KEY] == tensors_digest({k: v for k, v in ck.items() if k != DIGEST_KEY})
        assert isinstance(ck["config"], dict) and isinstance(ck["feature_spec"], dict)
    assert "optimizers" in torch.load(run / "checkpoints/latest.pt", weights_only=True)


def test_digest_covers_every_tensor_byte_and_ignores_dict_order():
    a = {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                   "b": torch.zeros(3, dtype=torch.bfloat16)},
         "rng": torch.tensor([1, 2], dtype=torch.uint8), "step": 3}
    b = {"step": 3, "rng": a["rng"].clone(),
         "model": {"b": a["model"]["b"].clone(), "w": a["model"]["w"].clone()}}
    assert tensors_digest(a) == tensors_digest(b)
    b["model"]["w"].view(torch.int32)[1, 2] ^= 1  # one bit of one float
    assert tensors_digest(a) != tensors_digest(b)
    c = {**a, "model": {**a["model"], "w": a["model"]["w"].reshape(3, 2)}}
    assert tensors_digest(a) != tensors_digest(c)  # same bytes, another shape


def test_a_flipped_weight_byte_is_refused(run, tmp_path):
    path = tmp_path / "best.pt"
    shutil.copy(run / "checkpoints/best.pt", path)
    member = flip_weight_byte(path)
    # torch itself reads the altered file without complaint: only the digest catches it.
    torch.load(path, weights_only=True)
    with pytest.raises(EsmmError, match=rf"checkpoint {path} is corrupt: the SHA-256") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value), member


def test_a_checkpoint_with_a_pickled_callable_is_refused_unrun(run, tmp_path):
    marker = tmp_path / "ran"
    ck = load_checkpoint(run / "checkpoints/best.pt")
    ck["monitor"] = Marker(marker)
    path = tmp_path / "evil.pt"
    torch.save(ck, path)
    with pytest.raises(EsmmError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert not marker.exists()
    assert f"checkpoint {path} is refused" in msg and "posix.system" in msg
    assert f"written by esmm {esmm.__version__}" in msg and "\n" not in msg


def test_a_checkpoint_of_0_2_without_digest_loads_unverified(run, tmp_path, caplog):
    ck = load_checkpoint(run / "checkpoints/best.pt")
    legacy = {k: v for k, v in ck.items() if k not in (DIGEST_KEY, FORMAT_KEY)}
    legacy["version"] = "0.2.0"
    path = tmp_path / "old.pt"
    save_atomic(legacy, path)
    with caplog.at_level(logging.WARNING, logger="esmm.checkpoint"):
        model, *_ = load_model(path)
    assert "no weights digest (written by esmm 0.2.0)" in caplog.text
    ref, *_ = load_model(run)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # A sealed file that lost its digest is not a legacy one.
    path2 = tmp_path / "stripped.pt"
    save_atomic({k: v for k, v in ck.items() if k != DIGEST_KEY}, path2)
    with pytest.raises(EsmmError, match="has lost its 'sha256' entry"):
        load_checkpoint(path2)


@pytest.mark.parametrize("change,expect", [
    ("drop", r"weight 'ctr_tower\.net\.0\.bias' is missing"),
    ("shape", r"weight 'ctr_tower\.net\.0\.bias' has shape \(5,\), the model its config "
              r"builds expects \(32,\)"),
    ("extra", r"weight 'ghost\.weight' is not in the model"),
    ("no_config", r"has no 'config' entry"),
])
def test_missing_or_misshapen_weights_are_named(run, tmp_path, change, expect):
    ck = load_checkpoint(run / "checkpoints/best.pt")
    state = dict(ck["model"])
    assert "ctr_tower.net.0.bias" in state
    if change == "drop":
        del state["ctr_tower.net.0.bias"]
    elif change == "shape":
        state["ctr_tower.net.0.bias"] = torch.zeros(5)
    elif change == "extra":
        state["ghost.weight"] = torch.zeros(2)
    else:
        del ck["config"]
    ck["model"] = state
    path = tmp_path / "x.pt"
    save_atomic(seal(ck), path)
    with pytest.raises(EsmmError, match=expect) as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- run folders


def _cfg(cfg_factory, flat_data, **kw):
    base = dict(eval_every=15, epochs=1, checkpoint_interval_s=3600)
    return cfg_factory(flat_data["train"], flat_data["valid"], **{**base, **kw})


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_stopped_before_its_first_latest_starts_again(flat_data, cfg_factory, tmp_path,
                                                           caplog, resume):
    cfg = _cfg(cfg_factory, flat_data)
    full = train(cfg, tmp_path / "full")
    run = tmp_path / "part"
    with pytest.raises(_Killed):
        train(cfg, run, on_step=_kill_at(20))
    assert (run / "checkpoints/best.pt").is_file()  # an evaluation at step 15 kept a best
    assert not (run / "checkpoints/latest.pt").exists()
    with caplog.at_level(logging.INFO, logger="esmm.checkpoint"):
        res = train(cfg, run, resume=resume)
    assert "the run was stopped before its first resumable checkpoint; starting it again " \
           "from step 0" in caplog.text
    assert res.step == full.step and res.best_step == full.best_step
    assert _same_weights(_weights(run / "checkpoints/latest.pt"),
                         _weights(tmp_path / "full/checkpoints/latest.pt"))
    steps = [line.split(",")[0] for line in (run / "history.csv").read_text().splitlines()]
    assert steps == ["step", *[str(s) for s in range(15, full.step + 1, 15)],
                     *([str(full.step)] if full.step % 15 else [])]


def test_resuming_a_stopped_run_with_another_config_is_refused(flat_data, cfg_factory,
                                                              tmp_path):
    cfg = _cfg(cfg_factory, flat_data)
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "run", on_step=_kill_at(3))
    other = _cfg(cfg_factory, flat_data, seed=4)
    with pytest.raises(ConfigError, match=r"config differs from the run's \(config\.yaml\) in "
                                          r"section\(s\) \['train'\]"):
        train(other, tmp_path / "run", resume=True)


def test_temporaries_of_an_interrupted_write_are_removed_and_the_run_resumes(
        flat_data, cfg_factory, tmp_path, caplog):
    cfg = _cfg(cfg_factory, flat_data, checkpoint_interval_s=0)
    full = train(cfg, tmp_path / "full")
    run = tmp_path / "part"
    with pytest.raises(_Killed):
        train(cfg, run, on_step=_kill_at(20))
    ck_dir = run / "checkpoints"
    # A write killed half-way: esmm's temporary name, and the name 0.2 used.
    left = [ck_dir / ".latest.pt.k2j4h.tmp", ck_dir / "latest.pt.tmp", run / ".history.csv.x.tmp"]
    for p in left:
        p.write_bytes(b"PK\x03\x04 half a checkpoint")
    other = run / "notes.tmp"  # not a file esmm writes: left alone
    other.write_text("mine")
    with caplog.at_level(logging.INFO, logger="esmm"):
        res = train(cfg, run, resume=True)
    assert "resuming" in caplog.text and "left by an interrupted write" in caplog.text
    assert not any(p.exists() for p in left)
    assert other.read_text() == "mine"
    assert res.step == full.step
    assert _same_weights(_weights(ck_dir / "latest.pt"),
                         _weights(tmp_path / "full/checkpoints/latest.pt"))


def test_finished_runs_are_not_restarted(flat_data, cfg_factory, tmp_path):
    cfg = _cfg(cfg_factory, flat_data, max_steps=3)
    train(cfg, tmp_path / "run")
    with pytest.raises(UsageError, match="already holds a run .*pass --resume"):
        train(cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "run/checkpoints")  # as the benchmark leaves a finished run
    with pytest.raises(UsageError, match=r"holds a finished run \(metrics\.json\)"):
        train(cfg, tmp_path / "run")
    with pytest.raises(UsageError, match="nothing to resume"):
        train(cfg, tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_training_into_one_folder_is_refused_by_the_lock(flat_data, cfg_factory,
                                                                  tmp_path):
    cfg = _cfg(cfg_factory, flat_data, max_steps=3)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(EsmmError) as e:
            train(cfg, run)
        msg = str(e.value)
        assert f"{run} is in use: another training (process {holder.pid}) holds" in msg
        assert "\n" not in msg
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock file is still there; it blocks nothing.
    assert (run / ".lock").exists()
    res = train(cfg, run)
    assert res.step == 3


def test_the_lock_is_released_when_training_fails(flat_data, cfg_factory, tmp_path):
    cfg = _cfg(cfg_factory, flat_data, max_steps=30)
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "run", on_step=_kill_at(2))
    res = train(cfg, tmp_path / "run")  # not refused by its own earlier lock
    assert res.step == 30


# ----------------------------------------------------------------------------- esmm 0.2.0 files

LEGACY = Path(__file__).parent / "files" / "esmm-0.2.0"  # written by make.py beside them


def test_checkpoints_written_by_0_2_0_load_unverified(caplog):
    with caplog.at_level(logging.WARNING, logger="esmm.checkpoint"):
        model, cfg, spec, ck = load_model(LEGACY / "best.pt")
    assert ck["version"] == "0.2.0" and DIGEST_KEY not in ck
    assert "no weights digest (written by esmm 0.2.0)" in caplog.text
    latest = load_checkpoint(LEGACY / "latest.pt")
    for o, s in zip(build_optimizers(model, cfg), latest["optimizers"], strict=True):
        o.load_state_dict(s)
    assert [f.name for f in spec.fields] == ["101", "205", "109_14", "d1"]


def test_a_0_2_0_run_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's data.train is relative
    rng = np.random.default_rng(0)
    n = 600
    pq.write_table(pa.table({
        "101": rng.integers(0, 50, n), "205": rng.integers(0, 80, n),
        "109_14": pa.array([rng.integers(0, 30, rng.integers(0, 4)).tolist() for _ in range(n)],
                           type=pa.list_(pa.int64())),
        "d1": rng.random(n), "click": (rng.random(n) < 0.3).astype(np.int8),
        "conversion": np.zeros(n, dtype=np.int8)}), tmp_path / "train.parquet")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY / "latest.pt", run / "checkpoints" / "latest.pt")
    cfg = config_from_dict(load_checkpoint(LEGACY / "latest.pt")["config"])
    res = train(cfg, run, resume=True)
    assert res.step == 3
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best[FORMAT_KEY] == 1 and best["step"] == 3  # rewritten sealed
