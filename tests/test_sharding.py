"""Embedding tables sharded across ranks with TorchRec (``model.sharding: torchrec``).

The multi-process tests start two real ranks (gloo, CPU) with ``esmm train --nproc 2`` or
``torchrun``; this file is also the worker those start: ``python -m torch.distributed.run ...
tests/test_sharding.py budget CFG OUT``. They are skipped when the ``torchrec`` extra is not
installed (docs/scaling.md has the install line).

"Matches" means: a sharded run and an unsharded one-process run at the same global batch,
started from the same weights (:func:`esmm.sharding.initial_state`) and reading the same
batches, hold the same weights and Adagrad accumulators after 30 steps (rtol 1e-4, atol 1e-5:
only the order of float additions differs) and report the same metrics.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env  # tests/ is on sys.path under pytest and as a script

from esmm.checkpoint import load_checkpoint, load_model, load_weights
from esmm.config import config_from_dict
from esmm.data.stream import open_split
from esmm.errors import ConfigError
from esmm.evaluate import evaluate
from esmm.features import spec_from_config
from esmm.sharding import INSTALL, check_sharding, initial_state
from esmm.train import Trainer, train

HERE = Path(__file__).resolve()

try:
    import fbgemm_gpu  # noqa: F401
    import torchrec  # noqa: F401

    HAVE_TORCHREC = True
except (ImportError, OSError):
    HAVE_TORCHREC = False

needs_torchrec = pytest.mark.skipif(
    not HAVE_TORCHREC, reason=f"the torchrec extra is not installed ({INSTALL})")


def _run(*args: str, timeout: int = 300) -> None:
    res = subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def _esmm_train(cfg: Path, out: Path, *extra: str) -> None:
    _run("-m", "esmm", "train", str(cfg), "--out", str(out), "--nproc", "2", *extra)


def _tree(flat_data, **model) -> dict:
    """Two tables (fields of width 8, and of width 4) so table-wise sharding places one on
    each rank; Adagrad for the tables (FBGEMM's CPU kernels have no Adam)."""
    sys.path.insert(0, str(HERE.parent))
    from conftest import small_config

    tree = small_config(flat_data["train"], flat_data["valid"], max_steps=30, eval_every=10)
    for f in tree["features"]:
        if f["name"] in ("206", "121"):
            f["dim"] = 4
    tree["data"]["loader"] = "memory"
    tree["model"].update(model)
    # Single rows shuffled: blocks of a user's rows repeat an id many times per batch, and with
    # accumulators near 1e-7 Adagrad's step (lr * g / sqrt(sum g^2)) turns the summation-order
    # rounding of those repeats (torch's coalesce against FBGEMM's dedup) into differences
    # above this test's 1e-5 tolerance: up to 9e-3 on one row of 4,200 with blocks of 64.
    tree["train"].update({"batch_size": 512, "checkpoint_interval_s": 0.0, "shuffle_block": 1,
                          "sparse_optimizer": {"name": "adagrad", "lr": 0.05}})
    return tree


def _write(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def _reference(tree: dict, out: Path) -> None:
    """The unsharded one-process run from the sharded run's initial weights."""
    sharded = config_from_dict(tree)
    plain = copy.deepcopy(tree)
    plain["model"]["sharding"] = "none"
    plain["model"].pop("sharding_type", None)
    cfg = config_from_dict(plain)
    spec = spec_from_config(cfg)
    (out / "checkpoints").mkdir(parents=True)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, spec, out, open_split(cfg.data.train, spec, cfg.data),
                      open_split(cfg.data.eval, spec, cfg.data), torch.device("cpu"))
    load_weights(trainer.model, initial_state(sharded, spec), "initial_state")
    trainer.fit()


@pytest.fixture(scope="module")
def runs(flat_data, tmp_path_factory) -> dict[str, Path]:
    """The reference, and the same config sharded row-wise and table-wise on two ranks."""
    if not HAVE_TORCHREC:
        pytest.skip(f"the torchrec extra is not installed ({INSTALL})")
    d = tmp_path_factory.mktemp("sharded")
    out = {"d": d}
    for kind in ("row_wise", "table_wise"):
        cfg = _write(_tree(flat_data, sharding="torchrec", sharding_type=kind),
                     d / f"{kind}.yaml")
        _esmm_train(cfg, d / kind)
        out[kind], out[f"{kind}.yaml"] = d / kind, cfg
    _reference(_tree(flat_data, sharding="torchrec"), d / "ref")
    out["ref"] = d / "ref"
    return out


def _latest(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "latest.pt")


@needs_torchrec
@pytest.mark.parametrize("kind", ["row_wise", "table_wise"])
def test_sharded_two_ranks_match_the_unsharded_run(runs, kind):
    ref, got = _latest(runs["ref"]), _latest(runs[kind])
    assert got["step"] == ref["step"] == 30 and got["world_size"] == 2
    assert set(got["model"]) == set(ref["model"])
    for k, v in ref["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # Adagrad's accumulators: torch's (unsharded, sparse gradients) against FBGEMM's (fused).
    ref_model = load_model(runs["ref"], "latest")[0]
    table_keys = [f"embedding.weights.{k}" for k in ref_model.embedding.weights]
    sums = ref["optimizers"][-1]["state"]
    for i, key in enumerate(table_keys):
        (acc,) = got["sharded_optimizer"][key].values()
        torch.testing.assert_close(acc, sums[i]["sum"], rtol=1e-4, atol=1e-6, msg=key)
    # not trivially equal: the tables and towers moved from their start
    start = initial_state(config_from_dict(yaml.safe_load(runs[f"{kind}.yaml"].read_text())),
                          ref_model.embedding.spec)
    for k in table_keys + [k for k in start if k.startswith("ctr_tower.")][:1]:
        assert not torch.allclose(start[k], got["model"][k]), k
    ma = json.loads((runs["ref"] / "metrics.json").read_text())
    mb = json.loads((runs[kind] / "metrics.json").read_text())
    assert ma["step"] == mb["step"]
    for k, v in ma["metrics"].items():
        assert mb["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@needs_torchrec
def test_a_sharded_checkpoint_loads_and_evaluates_in_one_process(runs):
    """best.pt is an ordinary checkpoint: one process without torch.distributed scores it as
    the two ranks did (the metrics of metrics.json, to float tolerance)."""
    model, cfg, spec, _ = load_model(runs["row_wise"])
    assert cfg.model.sharding == "torchrec"
    assert model.embedding.weights["dim8"].shape == (4200, 8)
    got = evaluate(model, open_split(cfg.data.eval, spec, cfg.data))
    want = json.loads((runs["row_wise"] / "metrics.json").read_text())["metrics"]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


@needs_torchrec
def test_uneven_evaluation_shares_of_a_two_collection_model_score_every_row(flat_data,
                                                                          tmp_path):
    """esmm_ns (a CTR and a CVR embedding collection, each sharded) evaluated on 2001 rows in
    batches of 1000: rank 0 scores 1000 rows in one batch, rank 1 1001 rows in two, so rank 0
    keeps rank 1 company with empty forwards; the metrics equal one process scoring best.pt."""
    import pyarrow.parquet as pq

    odd = tmp_path / "odd.parquet"
    pq.write_table(pq.read_table(flat_data["valid"]).slice(0, 2001), odd)
    tree = _tree(flat_data, sharding="torchrec", name="esmm_ns")
    tree["data"]["eval"] = str(odd)
    tree["train"].update({"max_steps": 4, "eval_every": 4, "eval_batch_size": 1000})
    run = tmp_path / "run"
    _esmm_train(_write(tree, tmp_path / "c.yaml"), run)
    model, cfg, spec, _ = load_model(run)
    assert sum(k.endswith(".weights.dim8") for k in model.state_dict()) == 2
    got = evaluate(model, open_split(odd, spec, cfg.data))
    want = json.loads((run / "metrics.json").read_text())["metrics"]
    assert want["n_impressions"] == 2001
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def _worker_killed_run(cfg_path: str, out: str, kill_at: str) -> None:
    """Train under torchrun and stop rank 1 abruptly at step ``kill_at``."""
    rank = int(os.environ["RANK"])

    def on_step(step: int) -> None:
        if rank == 1 and step == int(kill_at):
            os._exit(9)

    train(config_from_dict(yaml.safe_load(Path(cfg_path).read_text())), Path(out),
          on_step=on_step)


@needs_torchrec
def test_a_killed_sharded_run_resumes_to_the_uninterrupted_weights(runs):
    """Rank 1 dies at step 27; --resume continues from latest.pt (step 24): the tables and
    their Adagrad accumulators go back into the shards, so the result is the 30-step run's."""
    killed = runs["d"] / "killed"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", str(HERE), "killed-run",
                          str(runs["row_wise.yaml"]), str(killed), "27"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert _latest(killed)["step"] == 24  # the end of the first epoch
    _esmm_train(runs["row_wise.yaml"], killed, "--resume")
    a, b = _latest(runs["row_wise"]), _latest(killed)
    assert b["step"] == 30
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    for k, states in a["sharded_optimizer"].items():
        for name, v in states.items():
            torch.testing.assert_close(b["sharded_optimizer"][k][name], v, rtol=1e-6,
                                       atol=1e-8, msg=f"{k} {name}")


# ----------------------------------------------------------------------------- memory

# The large table: 4M rows x 8 float32 = 128 MiB, and Adagrad keeps as much again, so a rank
# that replicates it adds 256 MiB; sharded over two ranks, each holds 128 MiB of it.
BIG_ROWS, BIG_DIM = 4_000_000, 8
TABLE_MIB = BIG_ROWS * BIG_DIM * 4 / 2**20
# The budget: what a rank may add to its RSS while training, 3/4 of what replication needs.
BUDGET_MIB = 0.75 * 2 * TABLE_MIB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker_budget(cfg_path: str, out: str) -> None:
    """One rank: train, recording RSS before the model exists and after every step."""
    # The libraries train() loads are not the tables: loaded before the baseline.
    import fbgemm_gpu  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import torchrec.distributed.model_parallel  # noqa: F401
    import tqdm.auto  # noqa: F401

    cfg = config_from_dict(yaml.safe_load(Path(cfg_path).read_text()))
    base, peak = _rss_mib(), [0.0]

    def on_step(step: int) -> None:
        peak[0] = max(peak[0], _rss_mib())

    train(cfg, Path(out), on_step=on_step)
    rank = int(os.environ["RANK"])
    Path(out, f"rss-{rank}.json").write_text(json.dumps({"base": base, "peak": peak[0]}))


def _big_tree(flat_data, sharding: str, rows: int = BIG_ROWS) -> dict:
    """One table of ``rows`` x BIG_DIM: field 205 takes what the other fields leave."""
    tree = _tree(flat_data, sharding=sharding, embedding_dim=BIG_DIM)
    for f in tree["features"]:
        f.pop("dim", None)
        if f["name"] == "205":
            f["buckets"] = rows - 1310  # 1310: the other fields' rows
    tree["data"]["eval"] = None
    tree["train"].update({"max_steps": 6, "eval_every": 6})
    if sharding == "none":
        del tree["model"]["sharding"]
    return tree


def _rss_growth(flat_data, tmp_path: Path, name: str, tree: dict) -> list[float]:
    """Each rank's RSS added while training (MiB), two ranks."""
    cfg = _write(tree, tmp_path / f"{name}.yaml")
    out = tmp_path / name
    _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
         "budget", str(cfg), str(out))
    rss = [json.loads((out / f"rss-{r}.json").read_text()) for r in range(2)]
    return [r["peak"] - r["base"] for r in rss]


@needs_torchrec
@pytest.mark.slow
def test_a_table_too_large_to_replicate_in_the_budget_trains_sharded(flat_data, tmp_path):
    """The budget: a rank may add BUDGET_MIB (192 MiB) of RSS for the tables while training,
    3/4 of what a rank replicating the 128 MiB table and its Adagrad state adds (256 MiB).

    A rank's RSS added for the tables is what it adds from before the model is built to its
    largest value after a training step, less what the same run adds with a 4310-row table
    (the fixed costs: process group, data, buffers; about 80 MiB here). Sharded over two
    ranks (64 MiB of rows and 64 MiB of accumulator each) the run stays within the budget; the
    same run replicating the table does not."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("RSS is read from /proc (Linux)")
    fixed = _rss_growth(flat_data, tmp_path, "small", _big_tree(flat_data, "torchrec", 4310))
    sharded = _rss_growth(flat_data, tmp_path, "sharded", _big_tree(flat_data, "torchrec"))
    replicated = _rss_growth(flat_data, tmp_path, "replicated", _big_tree(flat_data, "none"))
    tables = {k: [g - f for g, f in zip(v, fixed, strict=True)]
              for k, v in (("sharded", sharded), ("replicated", replicated))}
    assert max(tables["sharded"]) <= BUDGET_MIB, (tables, fixed)
    assert min(tables["replicated"]) > BUDGET_MIB, (tables, fixed)
    # the sharded run's checkpoint holds the whole table
    ck = _latest(tmp_path / "sharded")
    assert ck["model"]["embedding.weights.dim8"].shape == (BIG_ROWS, BIG_DIM)


# ----------------------------------------------------------------------------- errors


def test_sharding_without_the_extra_exits_2_with_the_install_line(flat_data, tmp_path,
                                                                  monkeypatch):
    from typer.testing import CliRunner

    from esmm.cli import app

    monkeypatch.setitem(sys.modules, "torchrec", None)  # import torchrec raises ImportError
    tree = _tree(flat_data, sharding="torchrec")
    cfg = config_from_dict(tree)
    with pytest.raises(ConfigError, match="pip install --no-deps torchrec==1.8.0"):
        check_sharding(cfg)
    res = CliRunner().invoke(app, ["train", str(_write(tree, tmp_path / "c.yaml")), "--out",
                                   str(tmp_path / "run"), "--nproc", "2"])
    assert res.exit_code == 2, res.output
    assert INSTALL in res.output.replace("\n", "")


@needs_torchrec
@pytest.mark.parametrize(("opt", "device", "msg"), [
    ("sparse_adam", "cpu", "FBGEMM's CPU kernels have no Adam"),
    ("dense", "cpu", "TorchRec's fused optimizer"),
])
def test_an_embedding_optimizer_sharding_cannot_run_is_a_config_error(flat_data, opt, device,
                                                                      msg):
    tree = _tree(flat_data, sharding="torchrec")
    tree["train"].update({"sparse_optimizer": {"name": opt}, "device": device})
    with pytest.raises(ConfigError, match=msg):
        check_sharding(config_from_dict(tree))


@needs_torchrec
def test_sharding_in_one_process_without_torchrun_is_a_config_error(flat_data, tmp_path):
    with pytest.raises(ConfigError, match="--nproc N"):
        train(config_from_dict(_tree(flat_data, sharding="torchrec")), tmp_path / "run")


def test_an_unknown_sharding_is_a_config_error(flat_data):
    tree = _tree(flat_data, sharding="torchrec", sharding_type="column_wise")
    with pytest.raises(ConfigError, match="sharding_type"):
        config_from_dict(tree)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "budget":
        _worker_budget(*rest)
    elif mode == "killed-run":
        _worker_killed_run(*rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
