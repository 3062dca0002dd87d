import csv
import json

import pytest
import torch

import esmm
from esmm.errors import ConfigError, EsmmError, UsageError
from esmm.train import load_checkpoint, load_model, save_atomic, train


def _history(run):
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_directory_contents_and_learning(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=20)
    res = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "history.csv", "metrics.json", "checkpoints/latest.pt",
                 "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    ck = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ck["config"] == cfg.to_dict()
    assert ck["feature_spec"]["fields"][0]["name"] == "101"
    assert ck["version"] == esmm.__version__ and ck["step"] == res.best_step
    assert ck["best_metric"] == res.best_metric
    m = json.loads((run / "metrics.json").read_text())
    assert m["split"] == "eval" and m["monitor"] == "ctr_logloss+ctcvr_logloss"
    # The signal in the fixture is strong: a trained model ranks clearly better than chance.
    assert m["metrics"]["ctr_auc"] > 0.7
    assert m["metrics"]["ctcvr_auc"] > 0.7
    assert m["metrics"]["cvr_auc_entire_space"] > 0.55


def test_best_checkpoint_is_the_best_evaluation(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=10, epochs=3,
                      early_stop={"metric": "ctcvr_auc", "patience": 2})
    res = train(cfg, tmp_path / "run")
    hist = _history(tmp_path / "run")
    best_row = max(hist, key=lambda r: float(r["ctcvr_auc"]))
    assert int(best_row["step"]) == res.best_step
    assert res.metrics["ctcvr_auc"] == pytest.approx(float(best_row["ctcvr_auc"]), abs=1e-12)
    if res.stopped_early:
        tail = [float(r["ctcvr_auc"]) for r in hist if int(r["step"]) > res.best_step]
        assert len(tail) == 2 and max(tail) <= res.best_metric


class _Killed(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=15, epochs=2,
                      checkpoint_interval_s=0)
    full = train(cfg, tmp_path / "full")

    def kill(step):
        if step == 37:  # between checkpoints (taken at steps 15 and 30)
            raise _Killed
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "part", on_step=kill)
    assert load_checkpoint(tmp_path / "part/checkpoints/latest.pt")["step"] == 30
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed.step == full.step and resumed.best_step == full.best_step
    a = load_checkpoint(tmp_path / "full/checkpoints/latest.pt")["model"]
    b = load_checkpoint(tmp_path / "part/checkpoints/latest.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _history(tmp_path / "full") == [
        {k: v for k, v in r.items() if k != "elapsed_s"} | {"elapsed_s": f["elapsed_s"]}
        for r, f in zip(_history(tmp_path / "part"), _history(tmp_path / "full"), strict=True)
    ]


def test_latest_checkpoint_is_throttled_but_always_written_at_the_end(
        flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=15, epochs=2,
                      checkpoint_interval_s=3600)
    res = train(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run/checkpoints/latest.pt")["step"] == res.step
    # Killed before the first interval has passed: nothing resumable was written.

    def kill(step):
        if step == 37:
            raise _Killed
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "part", on_step=kill)
    assert not (tmp_path / "part/checkpoints/latest.pt").exists()


def test_refuses_to_overwrite_and_resume_needs_checkpoint(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], max_steps=3)
    train(cfg, tmp_path / "run")
    with pytest.raises(UsageError, match="--resume"):
        train(cfg, tmp_path / "run")
    with pytest.raises(UsageError, match="nothing to resume"):
        train(cfg, tmp_path / "other", resume=True)


@pytest.mark.parametrize("sparse", ["sparse_adam", "adagrad", "dense"])
def test_sparse_and_dense_embedding_optimizers_train(flat_data, cfg_factory, tmp_path, sparse):
    lr = 0.05 if sparse == "adagrad" else None
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], epochs=2,
                      sparse_optimizer={"name": sparse, "lr": lr})
    res = train(cfg, tmp_path / "run")
    assert res.metrics["ctr_auc"] > 0.7
    model, *_ = load_model(tmp_path / "run")
    assert model.embedding.sparse == (sparse != "dense")


@pytest.mark.parametrize("fused,sparse,expect", [
    (None, "dense", True), (None, "sparse_adam", False), (True, "sparse_adam", True),
    (False, "dense", False)])
def test_fused_adam_where_it_pays_and_it_matches_the_loop(flat_data, cfg_factory, tmp_path,
                                                          fused, sparse, expect):
    from esmm.features import spec_from_config
    from esmm.models import build_model
    from esmm.train import build_optimizers

    cfg = cfg_factory(flat_data["train"], flat_data["valid"], epochs=1,
                      sparse_optimizer={"name": sparse},
                      overrides={"train.optimizer.fused": fused})
    torch.manual_seed(0)
    model = build_model(cfg, spec_from_config(cfg))
    opt = build_optimizers(model, cfg)[0]
    assert bool(opt.param_groups[0]["fused"]) == expect
    # One step of each kernel from the same weights and gradients lands on the same weights.
    params = opt.param_groups[0]["params"]
    ref = torch.optim.Adam([p.detach().clone().requires_grad_() for p in params],
                           lr=opt.param_groups[0]["lr"], foreach=False)
    g = torch.Generator().manual_seed(1)
    for p, q in zip(params, ref.param_groups[0]["params"], strict=True):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for p, q in zip(params, ref.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_save_atomic_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_atomic({"a": 1}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"a": 1}


def test_early_stopping_stops_after_patience_and_keeps_best(flat_data, cfg_factory, tmp_path,
                                                           monkeypatch):
    # A metric that never improves after the first evaluation (the real evaluation with its
    # ctr_auc pinned): the run must stop after exactly `patience` further evaluations and keep
    # the first checkpoint as best.
    import esmm.train as train_module

    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda *a, **k: {**real(*a, **k), "ctr_auc": 0.5})
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=5, epochs=5,
                      early_stop={"metric": "ctr_auc", "mode": "max", "patience": 3})
    res = train(cfg, tmp_path / "run")
    assert res.stopped_early and res.best_step == 5 and res.step == 20
    assert [int(r["step"]) for r in _history(tmp_path / "run")] == [5, 10, 15, 20]
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt")["step"] == 5


def test_progress_bar_only_on_rank0_and_terminal(monkeypatch):
    from esmm.train import _progress_enabled

    monkeypatch.delenv("RANK", raising=False)
    assert _progress_enabled("on") and not _progress_enabled("off")
    assert _progress_enabled("auto") == __import__("sys").stderr.isatty()
    monkeypatch.setenv("RANK", "1")
    assert not _progress_enabled("on")


def test_default_monitor_is_validation_logloss(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], eval_every=10, epochs=2,
                      overrides={"model.name": "base"})
    res = train(cfg, tmp_path / "run")
    assert res.monitor == "ctr_logloss+cvr_logloss"
    hist = _history(tmp_path / "run")
    sums = [float(r["ctr_logloss"]) + float(r["cvr_logloss"]) for r in hist]
    assert [float(r["monitor"]) for r in hist] == pytest.approx(sums)
    assert int(hist[sums.index(min(sums))]["step"]) == res.best_step


def test_device_setting_is_checked_before_training(flat_data, cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match=r"train.device"):
        cfg_factory(flat_data["train"], max_steps=2, device="gpu")
    if not torch.cuda.is_available():
        cfg = cfg_factory(flat_data["train"], max_steps=2, device="cuda")
        with pytest.raises(ConfigError, match=r"train.device=cuda: .*no CUDA device"):
            train(cfg, tmp_path / "cuda")
    # auto resolves to what this machine has, and the run trains there.
    cfg = cfg_factory(flat_data["train"], flat_data["valid"], max_steps=5, device="auto")
    res = train(cfg, tmp_path / "auto")
    assert res.step == 5 and res.metrics["n_impressions"] == 4000


def test_resume_with_optimizer_state_of_another_layout_names_the_versions(flat_data,
                                                                          cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], max_steps=3, epochs=1)
    train(cfg, tmp_path / "run")
    latest = tmp_path / "run/checkpoints/latest.pt"
    ck = torch.load(latest, weights_only=True)
    # As a 0.1 checkpoint holds it: one SparseAdam parameter per field, not one per table.
    group = ck["optimizers"][-1]["param_groups"][0]
    group["params"] = list(range(100, 105))
    ck["version"] = "0.1.0"
    torch.save(ck, latest)
    with pytest.raises(EsmmError, match=r"written by esmm 0\.1\.0.*this is"):
        train(cfg, tmp_path / "run", resume=True)
