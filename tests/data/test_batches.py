"""Batching: every row once per epoch, bags intact across batch boundaries, users shared."""

import numpy as np
import pytest

from esmm.config import config_from_dict
from esmm.data.batches import epoch_order, iter_batches, num_batches
from esmm.data.tables import load_split
from esmm.features import spec_from_config
from tests.conftest import small_config


@pytest.fixture(scope="module")
def splits(flat_data, normalized_data):
    cfg = config_from_dict(small_config(flat_data["train"]))
    spec = spec_from_config(cfg)
    return (load_split(flat_data["train"], spec, cfg.data),
            load_split(normalized_data["train"], spec, cfg.data))


@pytest.mark.parametrize("n,block", [(1, 1), (1000, 1), (1000, 7), (1001, 64), (50, 100)])
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(n, block):
    a = epoch_order(n, seed=3, epoch=0, shuffle=True, block=block)
    assert np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, epoch_order(n, seed=3, epoch=0, shuffle=True, block=block))
    if n >= 1000:
        assert not np.array_equal(a, epoch_order(n, seed=3, epoch=1, shuffle=True, block=block))
        assert not np.array_equal(a, epoch_order(n, seed=4, epoch=0, shuffle=True, block=block))
    if block > 1 and n > block:
        # Rows stay in runs of `block` consecutive positions (except the ragged last block).
        runs = np.flatnonzero(np.diff(a) != 1) + 1
        assert np.all(np.diff(np.r_[0, runs, n]) <= block)
        assert np.median(np.diff(np.r_[0, runs, n])) == block


@pytest.mark.parametrize("batch_size,block", [(256, 1), (1000, 64), (4096, 7)])
def test_an_epoch_yields_every_row_once_with_its_bags(splits, batch_size, block):
    flat, _ = splits
    batches = list(iter_batches(flat, batch_size, shuffle=True, seed=5, epoch=2, block=block))
    assert len(batches) == num_batches(flat.n, batch_size)
    rows = np.concatenate([b.rows.numpy() for b in batches])
    assert np.array_equal(np.sort(rows), np.arange(flat.n))
    for name, (vals, offs) in flat.bags.items():
        for b in batches:
            v, o = (x.numpy() for x in b.bags[name])
            assert len(o) == b.size + 1 and o[0] == 0 and o[-1] == len(v)
            assert np.array_equal(np.diff(o), np.diff(offs)[b.rows.numpy()])
        # Concatenated over the epoch, the bags are exactly the rows' bags in epoch order.
        got = np.concatenate([b.bags[name][0].numpy() for b in batches])
        want = np.concatenate([vals[offs[r]:offs[r + 1]] for r in rows])
        assert np.array_equal(got, want)


def test_resuming_at_a_batch_continues_the_same_order(splits):
    flat, _ = splits
    full = [b.rows.numpy() for b in iter_batches(flat, 500, shuffle=True, seed=1, epoch=3)]
    rest = [b.rows.numpy() for b in iter_batches(flat, 500, shuffle=True, seed=1, epoch=3,
                                                 start_batch=7)]
    assert len(rest) == len(full) - 7
    assert all(np.array_equal(a, b) for a, b in zip(full[7:], rest, strict=True))


def test_user_fields_are_gathered_once_per_user_and_map_back(splits):
    flat, norm = splits
    for b in iter_batches(norm, 1000, shuffle=True, seed=0, block=64):
        rows = b.rows.numpy()
        users = norm.user_row[rows]
        assert len(b.user_ids["101"]) == len(np.unique(users)) < b.size
        # Each impression's user row, through user_index, gives the flat table's values.
        for name, arr in b.user_ids.items():
            assert np.array_equal(arr.numpy()[b.user_index.numpy()], flat.ids[name][rows])
        for name, (v, o) in b.user_bags.items():
            v, o = v.numpy(), o.numpy()
            fv, fo = flat.bags[name]
            for i in (0, b.size // 2, b.size - 1):
                u = b.user_index[i].item()
                assert np.array_equal(v[o[u]:o[u + 1]], fv[fo[rows[i]]:fo[rows[i] + 1]])
