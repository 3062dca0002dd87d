"""Data-parallel training: rank sharding, global-batch losses, gradient exchange, equality with
one process, exact evaluation across ranks, resume, mixed precision.

The multi-process tests start real ranks with ``torchrun`` (gloo, CPU). This file is also the
worker those tests start: ``python -m torch.distributed.run ... tests/test_distributed.py MODE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import subprocess_env  # tests/ is on sys.path under pytest and as a script

from esmm.config import config_from_dict
from esmm.data.batches import batch_bounds, iter_batches, num_batches, rank_slice
from esmm.data.stream import ParquetStream, open_split, split_batches
from esmm.errors import ConfigError, DataError, UsageError
from esmm.evaluate import evaluate
from esmm.features import spec_from_config
from esmm.losses import bce_with_logits, global_batch
from esmm.models import build_model
from esmm.train import load_checkpoint, load_weights, train

HERE = Path(__file__).resolve()


def _torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def _esmm(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esmm", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def _weights(run: Path, name: str = "latest.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / name)["model"]


def _write_cfg(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 3), (23, 8, 2), (24, 8, 3),
                                                   (1000, 256, 4), (9, 4, 2)])
def test_global_batches_use_every_row_once_and_leave_no_rank_empty(n, batch, world):
    bounds = batch_bounds(n, batch, world)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n and (sizes > 0).all()
    assert (sizes >= world).all()  # every rank holds a row of every batch
    assert (sizes[:-1] == batch).all() and sizes[-1] < batch + world
    shares = [[rank_slice(int(s), r, world) for r in range(world)] for s in sizes]
    for s, sl in zip(sizes, shares, strict=True):
        got = np.concatenate([np.arange(s)[x] for x in sl])
        assert np.array_equal(got, np.arange(s))
    assert num_batches(n, batch, world) == len(sizes)
    assert num_batches(n, batch) == -(-n // batch)  # one process: unchanged


def test_in_memory_ranks_take_their_slice_of_the_one_process_batches(flat_data, cfg_factory):
    cfg = cfg_factory(flat_data["train"], overrides={"data.loader": "memory"})
    data = open_split(cfg.data.train, spec_from_config(cfg), cfg.data)
    batch, world = 1000, 3  # 12000 rows: 12 batches of 1000
    one = [b.rows.numpy() for b in iter_batches(data, batch, shuffle=True, seed=5, epoch=1)]
    per_rank = [[b.rows.numpy() for b in split_batches(data, batch, shuffle=True, seed=5,
                                                         epoch=1, rank=r, world=world)]
                for r in range(world)]
    assert {len(p) for p in per_rank} == {len(one)}
    for k, rows in enumerate(one):
        assert np.array_equal(np.concatenate([p[k] for p in per_rank]), rows)
    # resuming mid-epoch gives the same later batches
    later = [b.rows.numpy() for b in split_batches(data, batch, shuffle=True, seed=5, epoch=1,
                                                     start_batch=7, rank=1, world=world)]
    assert all(np.array_equal(a, b) for a, b in zip(later, per_rank[1][7:], strict=True))


@pytest.fixture(scope="module")
def row_groups(flat_data, tmp_path_factory) -> Path:
    """The training rows as a Parquet file of 24 row groups of 500 rows."""
    out = tmp_path_factory.mktemp("rg") / "train.parquet"
    pq.write_table(pq.read_table(flat_data["train"]), out, row_group_size=500)
    return out


@pytest.mark.parametrize("world", [2, 3, 5])
def test_streamed_ranks_read_disjoint_row_groups_and_take_equal_steps(row_groups, cfg_factory,
                                                                      world):
    cfg = cfg_factory(row_groups, overrides={"data.shuffle_buffer": 1500,
                                                "data.loader": "stream"})
    stream = open_split(row_groups, spec_from_config(cfg), cfg.data)
    assert isinstance(stream, ParquetStream)
    batch = 700
    steps = num_batches(stream.n, batch, world)
    seen = []
    for epoch in (0, 1):
        units = [set(stream.rank_units(r, world, 3, epoch)[0]) for r in range(world)]
        assert set().union(*units) == set(stream.units)
        assert sum(len(u) for u in units) == len(stream.units)  # disjoint
        rows = []
        for r in range(world):
            got = [b.rows.numpy() for b in split_batches(stream, batch, shuffle=True, seed=3,
                                                         epoch=epoch, rank=r, world=world)]
            assert len(got) == steps and all(len(g) for g in got)
            rows.extend(got)
        everything = np.sort(np.concatenate(rows))
        assert np.array_equal(everything, np.arange(stream.n))  # each row exactly once
        seen.append(np.concatenate(rows))
    assert not np.array_equal(seen[0], seen[1])  # a new order every epoch


def test_a_stream_with_too_few_row_groups_for_the_ranks_is_refused(flat_data, cfg_factory):
    cfg = cfg_factory(flat_data["train"], overrides={"data.loader": "stream"})  # 1 row group
    stream = open_split(flat_data["train"], spec_from_config(cfg), cfg.data)
    with pytest.raises(DataError, match=r"1 row group\(s\) cannot be shared among 2 ranks .*"
                                        r"rank 1 gets 0 rows.*smaller row groups"):
        next(split_batches(stream, 500, shuffle=True, rank=0, world=2))


# ----------------------------------------------------------------------------- losses


def test_global_batch_shares_add_up_to_the_one_process_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(10, generator=g).requires_grad_()
    label = (torch.rand(10, generator=g) < 0.4).float()
    weight = torch.rand(10, generator=g)
    for w in (None, weight):
        full = bce_with_logits(logit, label, w)
        (grad_full,) = torch.autograd.grad(full, logit)
        parts, grads = [], []
        cuts = [(0, 3), (3, 10)]  # uneven shares
        totals = [(w[a:b].sum() if w is not None else torch.tensor(float(b - a)))
                  for a, b in cuts]
        for (a, b), own in zip(cuts, totals, strict=True):
            other = sum(totals) - own
            with global_batch(lambda t, other=other: t + other):
                part = bce_with_logits(logit[a:b], label[a:b], None if w is None else w[a:b])
            parts.append(part)
            grads.append(torch.autograd.grad(part, logit)[0])
        assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)
        torch.testing.assert_close(sum(grads), grad_full, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- gradient exchange


def _worker_gradient_exchange() -> None:
    """Every rank makes a different sparse and dense gradient; both sparse exchanges must give
    every rank the sum of all of them."""
    import torch.distributed as dist

    from esmm.distributed import DistContext, GradientSync

    ctx = DistContext.from_env(torch.device("cpu"))
    world, rank = ctx.world, ctx.rank

    def grads(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + r)
        ids = torch.randint(0, 50, (7 + 5 * r,), generator=g)  # repeats, different counts
        vals = torch.randn(len(ids), 4, generator=g)
        return ids, vals

    want_sparse = torch.zeros(50, 4)
    for r in range(world):
        ids, vals = grads(r)
        want_sparse.index_add_(0, ids, vals)
    want_dense = sum(torch.full((3,), float(r + 1)) for r in range(world))
    for how in ("all_reduce", "all_gather"):
        table = torch.nn.Parameter(torch.zeros(50, 4))
        dense = torch.nn.Parameter(torch.zeros(3))
        unused = torch.nn.Parameter(torch.zeros(2))
        ids, vals = grads(rank)
        table.grad = torch.sparse_coo_tensor(ids[None], vals, (50, 4))
        dense.grad = torch.full((3,), float(rank + 1))
        ctx.bytes_sent = 0
        GradientSync(ctx, [dense, unused], [table], sparse_exchange=how)()
        torch.testing.assert_close(table.grad.to_dense(), want_sparse)
        torch.testing.assert_close(dense.grad, want_dense)
        assert unused.grad is None and ctx.bytes_sent > 0
    dist.barrier()
    print(f"rank {rank}: gradient exchange ok")
    ctx.close()


def test_both_sparse_exchanges_sum_the_ranks_gradients():
    res = _torchrun(3, str(HERE), "gradient-exchange")
    _ok(res)
    assert res.stdout.count("gradient exchange ok") == 3


# ----------------------------------------------------------------------------- whole runs


def _tree(train_path: Path, eval_path: Path, **train_kw) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from conftest import small_config

    tree = small_config(train_path, eval_path, **train_kw)
    tree["train"].update({"batch_size": 512, "checkpoint_interval_s": 0.0})
    return tree


@pytest.fixture(scope="module")
def equal_runs(flat_data, tmp_path_factory) -> dict[str, Path]:
    """The same config trained by one process and by two (``esmm train --nproc 2``).

    12000 rows at a global batch of 512: 23 full batches and one of 224, so an epoch ends on an
    uneven batch, and the second epoch begins; 30 steps, evaluated every 10.
    """
    d = tmp_path_factory.mktemp("equal")
    tree = _tree(flat_data["train"], flat_data["valid"], max_steps=30, eval_every=10)
    tree["data"]["loader"] = "memory"
    cfg_path = _write_cfg(tree, d / "cfg.yaml")
    one, two = d / "one", d / "two"
    train(config_from_dict(tree), one)
    res = _esmm("train", str(cfg_path), "--out", str(two), "--nproc", "2")
    _ok(res)
    return {"one": one, "two": two, "cfg": cfg_path, "stdout": res.stdout}


def test_two_ranks_at_half_batch_equal_one_process_at_the_global_batch(equal_runs):
    one, two = equal_runs["one"], equal_runs["two"]
    a, b = _weights(one), _weights(two)
    assert load_checkpoint(two / "checkpoints" / "latest.pt")["world_size"] == 2
    assert load_checkpoint(two / "checkpoints" / "latest.pt")["step"] == 30
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # not trivially equal: the weights moved from their start
    start = build_model(config_from_dict(yaml.safe_load(equal_runs["cfg"].read_text())),
                        spec_from_config(config_from_dict(
                            yaml.safe_load(equal_runs["cfg"].read_text()))))
    assert any(not torch.allclose(a[k], v) for k, v in start.state_dict().items())
    ma = json.loads((one / "metrics.json").read_text())
    mb = json.loads((two / "metrics.json").read_text())
    assert ma["step"] == mb["step"]
    for k, v in ma["metrics"].items():
        assert mb["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    ha = (one / "history.csv").read_text().splitlines()
    hb = (two / "history.csv").read_text().splitlines()
    assert len(ha) == len(hb) == 5 and ha[0] == hb[0]  # steps 10, 20, 24 (epoch), 30
    # samples counted over all ranks
    assert [r.split(",")[2] for r in ha] == [r.split(",")[2] for r in hb]
    # rank 0 alone reports
    assert equal_runs["stdout"].count("run directory:") == 1


def test_resuming_with_another_number_of_processes_names_both(equal_runs, tmp_path):
    cfg = config_from_dict(yaml.safe_load(equal_runs["cfg"].read_text()))
    with pytest.raises(UsageError, match=r"written by a run on 2 process\(es\) and this one "
                                         r"has 1; resume with --nproc 2"):
        train(cfg, equal_runs["two"], resume=True)


def _worker_killed_run(cfg_path: str, out: str, kill_at: str) -> None:
    """Train under torchrun and stop rank 1 abruptly at step ``kill_at``."""
    from esmm.config import load_config

    rank = int(os.environ["RANK"])

    def on_step(step: int) -> None:
        if rank == 1 and step == int(kill_at):
            os._exit(9)

    train(load_config(cfg_path, []), out, on_step=on_step)


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_result(row_groups, flat_data,
                                                                   tmp_path):
    # Streamed training and evaluation: each rank reads its own row groups.
    tree = _tree(row_groups, flat_data["valid"], max_steps=16, eval_every=4)
    tree["data"].update({"loader": "stream", "shuffle_buffer": 1000})
    tree["model"]["dropout"] = 0.2  # per-rank random streams must resume too
    cfg_path = _write_cfg(tree, tmp_path / "cfg.yaml")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(_esmm("train", str(cfg_path), "--out", str(whole), "--nproc", "2"))
    res = _torchrun(2, str(HERE), "killed-run", str(cfg_path), str(killed), "10")
    assert res.returncode != 0
    assert load_checkpoint(killed / "checkpoints" / "latest.pt")["step"] == 8
    _ok(_esmm("train", str(cfg_path), "--out", str(killed), "--nproc", "2", "--resume"))
    a, b = _weights(whole), _weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Evaluation across ranks is exact: the metrics equal one process scoring best.pt.
    cfg = config_from_dict(tree)
    spec = spec_from_config(cfg)
    model = build_model(cfg, spec)
    best = whole / "checkpoints" / "best.pt"
    load_weights(model, load_checkpoint(best)["model"], best)
    want = evaluate(model, open_split(flat_data["valid"], spec, cfg.data))
    got = json.loads((whole / "metrics.json").read_text())["metrics"]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k


# ----------------------------------------------------------------------------- precision


def test_bf16_trains_close_to_fp32_and_fp16_is_refused_on_the_cpu(flat_data, cfg_factory,
                                                                   tmp_path):
    runs = {}
    for prec in ("fp32", "bf16"):
        cfg = cfg_factory(flat_data["train"], flat_data["valid"], max_steps=20, eval_every=20,
                          precision=prec)
        runs[prec] = train(cfg, tmp_path / prec)
    a, b = _weights(tmp_path / "fp32"), _weights(tmp_path / "bf16")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast changed the arithmetic
    assert all(v.dtype == torch.float32 for v in b.values())  # weights stay float32
    for k in ("ctr_auc", "ctcvr_auc"):
        assert runs["bf16"].metrics[k] == pytest.approx(runs["fp32"].metrics[k], abs=0.02)
    assert runs["bf16"].metrics["ctr_auc"] > 0.6
    cfg = cfg_factory(flat_data["train"], max_steps=2, precision="fp16")
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a CUDA device.*bf16"):
        train(cfg, tmp_path / "fp16")


def test_an_unknown_precision_is_a_config_error(flat_data, cfg_factory):
    with pytest.raises(ConfigError, match="precision"):
        cfg_factory(flat_data["train"], precision="fp8")


# ----------------------------------------------------------------------------- --nproc


def test_nproc_checks_the_config_before_starting_processes(flat_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from esmm.cli import app

    tree = _tree(tmp_path / "missing.parquet", flat_data["valid"])
    cfg_path = _write_cfg(tree, tmp_path / "cfg.yaml")
    launched = []
    monkeypatch.setattr("subprocess.call", lambda cmd: launched.append(cmd) or 0)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run"),
                              "--nproc", "2"])
    assert res.exit_code == 2 and "data.train" in res.output and "does not exist" in res.output
    assert not launched
    # a good config launches torchrun with the same arguments
    tree["data"]["train"] = str(flat_data["train"])
    _write_cfg(tree, cfg_path)
    res = runner.invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run"),
                              "--nproc", "3", "--set", "train.max_steps=4", "--resume"])
    assert res.exit_code == 0, res.output
    (cmd,) = launched
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    assert cmd[5:] == ["-m", "esmm", "train", str(cfg_path), "--out", str(tmp_path / "run"),
                       "--set", "train.max_steps=4", "--resume"]
    # inside a rank, --nproc is a mistake
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    res = runner.invoke(app, ["train", str(cfg_path), "--out", str(tmp_path / "run"),
                              "--nproc", "2"])
    assert res.exit_code == 2 and "already a torchrun rank" in res.output


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL path)")
def test_cuda_nccl_rank_trains_and_matches_the_cpu_run(equal_runs, tmp_path):
    """GPU only: one NCCL rank on cuda:LOCAL_RANK, exercising the all-gather sparse exchange."""
    out = tmp_path / "cuda"
    res = _torchrun(1, "-m", "esmm", "train", str(equal_runs["cfg"]), "--out", str(out),
                    "--set", "train.device=cuda")
    _ok(res)
    a, b = _weights(equal_runs["one"]), _weights(out)
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-3, atol=1e-4, msg=k)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "gradient-exchange":
        _worker_gradient_exchange()
    elif mode == "killed-run":
        _worker_killed_run(*rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
