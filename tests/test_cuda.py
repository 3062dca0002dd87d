"""The CUDA path: the same steps on a GPU as on the CPU. Skipped where torch sees no GPU.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py`` (bench/gpu_check.sh does).
"""

import itertools

import pytest
import torch

from esmm.data.stream import open_split, split_batches
from esmm.features import spec_from_config
from esmm.models import model_names
from esmm.train import Trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _trainer(cfg, run, device):
    spec = spec_from_config(cfg)
    data = open_split(cfg.data.train, spec, cfg.data)
    torch.manual_seed(cfg.train.seed)
    return Trainer(cfg, spec, run, data, None, torch.device(device)), data


def _batches(data, n):
    return list(itertools.islice(split_batches(data, 256, shuffle=True, seed=3, epoch=0), n))


@pytest.mark.parametrize("name", model_names())
def test_steps_on_cuda_equal_steps_on_the_cpu(flat_data, cfg_factory, tmp_path, name):
    # Same seed, same batches: the GPU's weights after a few steps (sparse embedding gradients,
    # RowSparseAdam, Adam on the towers) agree with the CPU's to float rounding.
    cfg = cfg_factory(flat_data["train"], overrides={"model.name": name})
    cpu, data = _trainer(cfg, tmp_path / "cpu", "cpu")
    gpu, _ = _trainer(cfg, tmp_path / "gpu", "cuda")
    for batch in _batches(data, 5):
        lc, lg = cpu.step(batch), gpu.step(batch)
        assert float(lg) == pytest.approx(float(lc), rel=1e-4, abs=1e-6)
    for (k, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values(),
                         strict=True):
        assert b.is_cuda or b.numel() == 0 or not b.is_floating_point(), k
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=k)


def test_a_run_on_cuda_trains_evaluates_and_exports(flat_data, cfg_factory, tmp_path):
    from esmm.export import export_run, load_artifact

    cfg = cfg_factory(flat_data["train"], flat_data["valid"], max_steps=40, eval_every=20,
                      device="cuda")
    res = train(cfg, tmp_path / "run")
    ref = train(cfg_factory(flat_data["train"], flat_data["valid"], max_steps=40, eval_every=20,
                            device="cpu"), tmp_path / "cpu")
    assert res.step == 40 and res.metrics["ctr_auc"] > 0.6
    assert res.metrics["ctr_auc"] == pytest.approx(ref.metrics["ctr_auc"], abs=5e-3)
    export_run(tmp_path / "run", "torchscript", tmp_path / "m.pt", parity_rows=64)
    assert load_artifact(tmp_path / "m.pt").metadata["model"] == "esmm"
