"""Write MMoE and PLE checkpoints whose experts are one MLP each (``experts.I.net.J.*``).

Run with an esmm whose ``ExpertGroup`` holds an ``nn.ModuleList`` of per-expert MLPs:

    git archive 41d74ec^ src | tar -x -C /tmp/esmm-per-expert
    PYTHONPATH=/tmp/esmm-per-expert/src python tests/files/zoo-per-expert/make.py

A tiny model per backbone (two categorical fields, one bag, one dense field, embedding dim 2,
towers of 4, experts of widths 6-4 with batch norm), three steps of Adam, so the files hold
trained weights and running statistics. ``expected.json`` keeps that esmm's predictions of
every row of ``train.parquet`` in eval mode, which the loaded checkpoints must reproduce.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import esmm
from esmm.config import config_from_dict
from esmm.data.tables import load_split
from esmm.evaluate import predict_arrays
from esmm.train import load_model, train

here = Path(__file__).resolve().parent
BACKBONES = {
    "mmoe": {"name": "mmoe", "experts": 3, "expert": [6, 4]},
    "ple": {"name": "ple", "levels": 2, "task_experts": 1, "shared_experts": 2,
            "expert": [6, 4]},
}
work = Path(tempfile.mkdtemp())
os.chdir(work)  # data.train is relative: the checkpoints name no machine's folders
rng = np.random.default_rng(0)
n = 400
click = rng.random(n) < 0.3
pq.write_table(pa.table({
    "101": rng.integers(0, 50, n), "205": rng.integers(0, 80, n),
    "109_14": pa.array([rng.integers(0, 30, rng.integers(0, 4)).tolist() for _ in range(n)],
                       type=pa.list_(pa.int64())),
    "d1": rng.random(n), "click": click.astype(np.int8),
    "conversion": (click & (rng.random(n) < 0.3)).astype(np.int8),
}), work / "train.parquet")
shutil.copy(work / "train.parquet", here / "train.parquet")
expected = {}
for name, backbone in BACKBONES.items():
    cfg = config_from_dict({
        "data": {"train": "train.parquet"},
        "features": [{"name": "101", "kind": "categorical", "buckets": 16},
                     {"name": "205", "kind": "categorical", "buckets": 24},
                     {"name": "109_14", "kind": "multi_categorical", "buckets": 8},
                     {"name": "d1", "kind": "dense"}],
        "model": {"name": "esmm", "tower": [4], "embedding_dim": 2, "batch_norm": True,
                  "backbone": backbone, "head": {"name": "entire_space"}},
        "train": {"batch_size": 100, "epochs": 1, "max_steps": 3, "progress": "off", "seed": 1,
                  "optimizer": {"name": "adam", "lr": 0.01}},
    })
    train(cfg, work / name)
    shutil.copy(work / name / "checkpoints" / "best.pt", here / f"{name}.pt")
    model, cfg, spec, _ = load_model(work / name)
    preds = predict_arrays(model, load_split("train.parquet", spec, cfg.data))
    expected[name] = {k: v.tolist() for k, v in preds.items()}
(here / "expected.json").write_text(json.dumps(expected))
print(f"wrote {here}/mmoe.pt, ple.pt, train.parquet and expected.json with esmm "
      f"{esmm.__version__}")
shutil.rmtree(work)
