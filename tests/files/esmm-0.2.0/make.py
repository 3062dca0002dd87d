"""Write best.pt and latest.pt beside this file with the esmm on the path (run under 0.2.0).

    git archive <0.2.0 commit> src | tar -x -C /tmp/esmm-0.2.0
    PYTHONPATH=/tmp/esmm-0.2.0/src python tests/files/esmm-0.2.0/make.py

A tiny model (two categorical fields, one bag, one dense field, embedding dim 2, towers of 4),
three steps of sparse Adam, so the files are small and hold every kind of entry a 0.2.0
checkpoint holds (weights, config, feature spec, dense and sparse optimizer states, RNG).
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import esmm
from esmm.config import config_from_dict
from esmm.train import train

here = Path(__file__).resolve().parent
work = Path(tempfile.mkdtemp())
os.chdir(work)  # data.train is relative: the checkpoints name no machine's folders
rng = np.random.default_rng(0)
n = 600
pq.write_table(pa.table({
    "101": rng.integers(0, 50, n), "205": rng.integers(0, 80, n),
    "109_14": pa.array([rng.integers(0, 30, rng.integers(0, 4)).tolist() for _ in range(n)],
                       type=pa.list_(pa.int64())),
    "d1": rng.random(n), "click": (rng.random(n) < 0.3).astype(np.int8),
    "conversion": np.zeros(n, dtype=np.int8),
}), work / "train.parquet")
cfg = config_from_dict({
    "data": {"train": "train.parquet"},
    "features": [{"name": "101", "kind": "categorical", "buckets": 16},
                 {"name": "205", "kind": "categorical", "buckets": 24},
                 {"name": "109_14", "kind": "multi_categorical", "buckets": 8},
                 {"name": "d1", "kind": "dense"}],
    "model": {"name": "esmm", "tower": [4], "embedding_dim": 2},
    "train": {"batch_size": 200, "epochs": 1, "max_steps": 3, "progress": "off", "seed": 1},
})
train(cfg, work / "run")
for name in ("best.pt", "latest.pt"):
    shutil.copy(work / "run" / "checkpoints" / name, here / name)
print(f"wrote {here}/best.pt and latest.pt with esmm {esmm.__version__}")
shutil.rmtree(work)
