"""The Trainer's parts: a step, an interval's losses and their finiteness check, its state."""

import dataclasses
import itertools

import pytest
import torch

from esmm.data.stream import open_split, split_batches
from esmm.errors import EsmmError
from esmm.features import spec_from_config
from esmm.train import Trainer, load_checkpoint, train


def _trainer(cfg, run):
    spec = spec_from_config(cfg)
    data = open_split(cfg.data.train, spec, cfg.data)
    torch.manual_seed(cfg.train.seed)
    return Trainer(cfg, spec, run, data, None, torch.device("cpu")), data


def _batches(data, n, start=0):
    return list(itertools.islice(split_batches(data, 256, shuffle=True, seed=3, epoch=0,
                                               start_batch=start), n))


def test_interval_mean_losses_are_the_mean_of_the_steps(flat_data, cfg_factory, tmp_path):
    trainer, data = _trainer(cfg_factory(flat_data["train"]), tmp_path)
    totals = [float(trainer.step(b)) for b in _batches(data, 4)]
    means = trainer.mean_losses()
    assert set(means) == {"loss_ctr", "loss_ctcvr"}
    assert sum(means.values()) == pytest.approx(sum(totals) / 4, rel=1e-6)
    assert trainer.progress.step == 4 and trainer.progress.samples == 4 * 256
    assert trainer.mean_losses() == {}  # the interval was reset


def test_state_dict_round_trip_continues_identically(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"])
    a, data = _trainer(cfg, tmp_path / "a")
    for b in _batches(data, 5):
        a.step(b)
    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    a.save("latest.pt")
    path = tmp_path / "a" / "checkpoints" / "latest.pt"
    state = load_checkpoint(path)
    assert state["step"] == 5 and len(state["optimizers"]) == len(a.opts)
    b_, _ = _trainer(cfg, tmp_path / "b")
    b_.load_state_dict(state, path)
    assert b_.progress == dataclasses.replace(a.progress, elapsed_s=state["elapsed_s"])
    for batch in _batches(data, 3, start=5):
        a.step(batch)
        b_.step(batch)
    for (k, x), y in zip(a.model.state_dict().items(), b_.model.state_dict().values(),
                         strict=True):
        assert torch.equal(x, y), k


def test_a_diverging_loss_is_reported_once_per_interval(flat_data, cfg_factory, tmp_path,
                                                         monkeypatch):
    # On an accelerator the per-step gradient check is off; the interval's loss check remains.
    monkeypatch.setattr("esmm.train.check_gradients", lambda model, step: None)
    cfg = cfg_factory(flat_data["train"], eval_every=4, max_steps=12,
                      optimizer={"name": "sgd", "lr": 1e38})
    with pytest.raises(EsmmError, match=r"loss became non-finite between steps 1 and 4 .*"
                                        r"lower train\.optimizer\.lr") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()


def test_a_diverging_step_on_the_cpu_names_its_gradients(flat_data, cfg_factory, tmp_path):
    cfg = cfg_factory(flat_data["train"], eval_every=4, max_steps=12,
                      optimizer={"name": "sgd", "lr": 1e38})
    with pytest.raises(EsmmError, match=r"non-finite gradient at step \d+ in parameter\(s\) "
                                        r".*ctr_tower") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
