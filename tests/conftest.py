"""Shared fixtures: small learnable datasets written to disk in the layouts esmm reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esmm.config import config_from_dict

SRC = Path(__file__).resolve().parents[1] / "src"


def subprocess_env() -> dict[str, str]:
    """The environment of a child esmm or torchrun process: this checkout's sources, one thread
    per process, and no distributed variables inherited from a launcher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def make_rows(n: int, seed: int = 0, n_users: int = 300, n_items: int = 1500) -> dict:
    """Impressions with a clear click and conversion signal; users own a bag and a profile id."""
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(0, n_users, n))  # impressions of a user are consecutive
    item = rng.integers(0, n_items, n)
    item_click = (item % 5 == 0) * 2.5 - (item % 11 == 0) * 1.0
    user_click = (user % 4 == 0) * 1.0
    p_click = 1 / (1 + np.exp(-(-3.0 + item_click + user_click)))
    p_conv = 1 / (1 + np.exp(-(-1.5 + ((item % 50) % 3 == 0) * 2.5 - (user % 7 == 0) * 1.0)))
    click = (rng.random(n) < p_click).astype(np.int8)
    conv_if = (rng.random(n) < p_conv).astype(np.int8)
    conv = (conv_if & click).astype(np.int8)
    return {"user": user, "item": item, "click": click, "conversion": conv,
            "p_click": p_click, "p_conversion": p_conv, "conversion_if_clicked": conv_if,
            "dense": rng.random(n).astype(np.float64), "n_users": n_users, "rng": rng}


def _user_tables(r: dict) -> tuple[np.ndarray, list, np.ndarray]:
    rng = np.random.default_rng(99)
    uids = np.arange(r["n_users"])
    bags = [list(((u % 7) * 10 + rng.integers(0, 10, rng.integers(0, 8))).tolist()) for u in uids]
    prof = uids % 6
    return uids, bags, prof


def write_flat(path: Path, r: dict) -> Path:
    uids, bags, prof = _user_tables(r)
    t = pa.table({
        "sample_id": np.arange(len(r["user"])),
        "101": r["user"], "205": r["item"], "206": r["item"] % 50,
        "121": prof[r["user"]],
        "109_14": pa.array([bags[u] for u in r["user"]], type=pa.list_(pa.int64())),
        "d1": r["dense"],
        "click": r["click"], "conversion": r["conversion"],
        "p_click": r["p_click"], "p_conversion": r["p_conversion"],
        "conversion_if_clicked": r["conversion_if_clicked"],
    })
    pq.write_table(t, path)
    return path


def write_normalized(folder: Path, r: dict) -> Path:
    """The same rows as :func:`write_flat`, with user fields in a users table."""
    uids, bags, prof = _user_tables(r)
    folder.mkdir(parents=True, exist_ok=True)
    key = uids * 10 + 3  # a key that is not the user id
    pq.write_table(pa.table({
        "sample_id": np.arange(len(r["user"])), "common_key": key[r["user"]],
        "205": r["item"], "206": r["item"] % 50, "d1": r["dense"],
        "click": r["click"], "conversion": r["conversion"],
        "p_click": r["p_click"], "p_conversion": r["p_conversion"],
        "conversion_if_clicked": r["conversion_if_clicked"],
    }), folder / "impressions.parquet")
    # Users in a different order than their keys, to exercise the join.
    perm = np.random.default_rng(5).permutation(len(uids))
    pq.write_table(pa.table({
        "common_key": key[perm], "101": uids[perm], "121": prof[perm],
        "109_14": pa.array([bags[u] for u in perm], type=pa.list_(pa.int64())),
    }), folder / "users.parquet")
    return folder


FEATURES = [
    {"name": "101", "kind": "categorical", "buckets": 1000},
    {"name": "205", "kind": "categorical", "buckets": 3000},
    {"name": "206", "kind": "categorical", "buckets": 100},
    {"name": "121", "kind": "categorical", "buckets": 10},
    {"name": "109_14", "kind": "multi_categorical", "buckets": 200, "pooling": "mean"},
    {"name": "d1", "kind": "dense"},
]

# The same fields with the behaviour bag pooled by DIN target attention on the item.
ATTENTION_FEATURES = [*FEATURES[:4], {**FEATURES[4], "pooling": "attention", "query": "205",
                                      "attention": {"hidden": [16, 8]}}, FEATURES[5]]


def small_config(train: Path, eval_: Path | None = None, **train_kw) -> dict:
    return {
        "data": {"train": str(train), "eval": str(eval_) if eval_ else None},
        "features": FEATURES,
        "model": {"name": "esmm", "tower": [32, 16], "embedding_dim": 8},
        "train": {"batch_size": 256, "epochs": 2, "seed": 3, "progress": "off",
                  "optimizer": {"name": "adam", "lr": 0.005}, **train_kw},
    }


@pytest.fixture(scope="session")
def flat_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("flat")
    return {"train": write_flat(d / "train.parquet", make_rows(12000, seed=1)),
            "valid": write_flat(d / "valid.parquet", make_rows(4000, seed=2))}


@pytest.fixture(scope="session")
def normalized_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("norm")
    return {"train": write_normalized(d / "train", make_rows(12000, seed=1)),
            "valid": write_normalized(d / "valid", make_rows(4000, seed=2))}


@pytest.fixture()
def cfg_factory():
    def make(train, eval_=None, overrides=None, **train_kw):
        tree = small_config(train, eval_, **train_kw)
        for k, v in (overrides or {}).items():
            node = tree
            parts = k.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = v
        return config_from_dict(tree)
    return make


def cli_output(res) -> str:
    """stdout and, where the runner keeps it apart, stderr of a typer CliRunner result."""
    text = res.output
    try:
        text += res.stderr
    except (ValueError, AttributeError):
        pass
    return text


# A small Ali-CCP-shaped world and its fields, for model tests that train on the simulator.
TINY_FEATURES = [
    {"name": "101", "kind": "categorical", "buckets": 500},
    {"name": "205", "kind": "categorical", "buckets": 3000},
    {"name": "206", "kind": "categorical", "buckets": 100},
    {"name": "301", "kind": "categorical", "buckets": 10},
    {"name": "109_14", "kind": "multi_categorical", "buckets": 100},
]


def tiny_world(ctr: float, cvr: float) -> dict:
    """Simulator knobs of a world small enough to train on in a test."""
    return {"n_users": 300, "n_items": 3000, "n_shops": 500, "n_brands": 300,
            "n_intentions": 200, "n_categories": 50, "ctr": ctr, "cvr": cvr}
