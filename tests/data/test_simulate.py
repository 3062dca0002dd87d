"""Tests for esmm.data.simulate: table contract, determinism, calibration and the world's shape."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esmm.data import simulate as sim
from esmm.data.simulate import (
    PRESETS,
    PROFILE_CARDINALITY,
    SimConfig,
    Split,
    get_preset,
    simulate,
    write_simulation,
)
from esmm.errors import UsageError

# A small world: fast to build, still large enough for stable rates.
SMALL = dict(n_users=5_000, n_items=50_000, n_categories=200, n_shops=5_000, n_brands=2_000,
             n_intentions=1_000)

ID_COLUMNS = ("sample_id", "common_key", "205", "206", "207", "216", "301", "508", "509", "702",
              "853")
USER_ID_COLUMNS = ("common_key", "101", "121", "122", "124", "125", "126", "127", "128", "129")
USER_BAGS = ("109_14", "110_14", "127_14", "150_14")


def small(preset: str = "dense", **overrides) -> SimConfig:
    return get_preset(preset, **{**SMALL, **overrides})


def one_split(cfg: SimConfig, n: int, seed: int = 1) -> Split:
    return simulate(cfg, {"train": n}, seed)["train"]


def col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def list_lengths(table: pa.Table, name: str) -> np.ndarray:
    return np.diff(table.column(name).combine_chunks().offsets.to_numpy())


@pytest.fixture(scope="module")
def dense_split() -> Split:
    return one_split(small("dense"), 100_000, seed=3)


# ---------------------------------------------------------------------------------------------
# Contract


def test_schema_and_dtypes(dense_split):
    imp, users = dense_split.impressions, dense_split.users
    expected_imp = pa.schema(
        [(c, pa.int64()) for c in ID_COLUMNS]
        + [("210", pa.list_(pa.int64())), ("click", pa.int8()), ("conversion", pa.int8()),
           ("p_click", pa.float64()), ("p_conversion", pa.float64()),
           ("conversion_if_clicked", pa.int8())]
    )
    assert imp.schema.equals(expected_imp), imp.schema
    expected_users = pa.schema(
        [(c, pa.int64()) for c in USER_ID_COLUMNS]
        + [(c, pa.list_(pa.int64())) for c in USER_BAGS]
    )
    assert users.schema.equals(expected_users), users.schema
    assert tuple(imp.column_names) == sim.IMPRESSION_COLUMNS
    assert tuple(users.column_names) == sim.USER_COLUMNS
    assert imp.num_rows == 100_000
    assert all(imp.column(c).null_count == 0 for c in imp.column_names)
    assert all(users.column(c).null_count == 0 for c in users.column_names)


def test_sample_ids_and_id_ranges(dense_split):
    imp, users = dense_split.impressions, dense_split.users
    cfg = small("dense")
    np.testing.assert_array_equal(col(imp, "sample_id"), np.arange(1, imp.num_rows + 1))
    for name, n in (("205", cfg.n_items), ("206", cfg.n_categories), ("207", cfg.n_shops),
                    ("216", cfg.n_brands), ("301", cfg.n_contexts),
                    ("508", cfg.cross_buckets), ("853", cfg.cross_buckets)):
        v = col(imp, name)
        assert v.min() >= 0 and v.max() < n, name
    tags = imp.column("210").combine_chunks().values.to_numpy()
    assert tags.min() >= 0 and tags.max() < cfg.n_intentions
    assert list_lengths(imp, "210").min() >= 1
    for name, card in PROFILE_CARDINALITY.items():
        v = col(users, name)
        assert v.min() >= 0 and v.max() < card, name
        assert len(np.unique(v)) == card, name  # every profile value is used
    np.testing.assert_array_equal(col(users, "101"), col(users, "common_key"))
    assert col(users, "101").max() < cfg.n_users


def test_item_fields_are_functions_of_the_item(dense_split):
    imp = dense_split.impressions
    item = col(imp, "205")
    for name in ("206", "207", "216"):
        v = col(imp, name)
        order = np.lexsort((v, item))
        a, b = item[order], v[order]
        same_item = a[1:] == a[:-1]
        assert (b[1:][same_item] == b[:-1][same_item]).all(), name


def test_labels_and_ground_truth_consistent(dense_split):
    imp = dense_split.impressions
    click, conv = col(imp, "click"), col(imp, "conversion")
    cic = col(imp, "conversion_if_clicked")
    p_c, p_v = col(imp, "p_click"), col(imp, "p_conversion")
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(cic)) <= {0, 1}
    assert (conv[click == 0] == 0).all()
    np.testing.assert_array_equal(conv[click == 1], cic[click == 1])
    assert ((p_c > 0) & (p_c < 1)).all() and ((p_v > 0) & (p_v < 1)).all()
    # The draws follow the probabilities: unclicked rows carry conversions too.
    assert cic[click == 0].sum() > 0
    assert abs(cic.mean() - p_v.mean()) < 0.01
    assert abs(click.mean() - p_c.mean()) < 0.004


def test_users_consecutive_and_keys_join(dense_split):
    imp, users = dense_split.impressions, dense_split.users
    keys = col(imp, "common_key")
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ukeys = col(users, "common_key")
    # One run per user: a user's impressions are consecutive.
    assert len(starts) == len(np.unique(keys)) == users.num_rows
    assert len(np.unique(ukeys)) == len(ukeys)
    # The users table lists the keys in order of first appearance: every key joins.
    np.testing.assert_array_equal(keys[starts], ukeys)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_tables_different_seed_differs():
    cfg = small("dense")
    rows = {"train": 20_000, "test": 10_000}
    a = simulate(cfg, rows, 11)
    b = simulate(cfg, rows, 11)
    c = simulate(cfg, rows, 12)
    for name in rows:
        assert a[name].impressions.equals(b[name].impressions)
        assert a[name].users.equals(b[name].users)
        assert not a[name].impressions.equals(c[name].impressions)


def test_splits_share_the_world_but_draw_independently():
    cfg = small("dense")
    both = simulate(cfg, {"train": 20_000, "test": 10_000}, 5)
    alone = simulate(cfg, {"test": 10_000}, 5)
    # A split depends only on (cfg, seed, its name, its rows), not on the other splits.
    assert both["test"].impressions.equals(alone["test"].impressions)
    tr, te = both["train"], both["test"]
    assert not np.array_equal(col(tr.impressions, "205")[:10_000], col(te.impressions, "205"))
    # Same world: a user and an item keep their profile and their ids across splits.
    shared = np.intersect1d(col(tr.users, "101"), col(te.users, "101"))
    assert len(shared) > 20
    ia = {u: i for i, u in enumerate(col(tr.users, "101"))}
    ib = {u: i for i, u in enumerate(col(te.users, "101"))}
    for f in PROFILE_CARDINALITY:
        va, vb = col(tr.users, f), col(te.users, f)
        assert all(va[ia[u]] == vb[ib[u]] for u in shared[:200]), f
    item_cat = {}
    for t in (tr.impressions, te.impressions):
        for i, c in zip(col(t, "205")[:5_000], col(t, "206")[:5_000], strict=True):
            assert item_cat.setdefault(i, c) == c


def test_world_depends_on_seed_only_not_on_rates():
    """Changing the conversion rate keeps the items, users and impressions drawn."""
    a = one_split(small("dense"), 10_000, seed=2)
    b = one_split(small("dense", cvr=0.02), 10_000, seed=2)
    for c in ("common_key", "205", "206", "301", "508", "click", "p_click"):
        np.testing.assert_array_equal(col(a.impressions, c), col(b.impressions, c))
    assert col(b.impressions, "p_conversion").mean() < col(a.impressions, "p_conversion").mean()


# ---------------------------------------------------------------------------------------------
# Rates and the mechanism


def test_dense_rates_hit_targets(dense_split):
    imp = dense_split.impressions
    click, conv = col(imp, "click"), col(imp, "conversion")
    assert abs(click.mean() - 0.04) < 0.006
    assert abs(conv.sum() / click.sum() - 0.10) < 0.02


def test_aliccp_rates_hit_targets():
    imp = one_split(small("aliccp"), 100_000, seed=4).impressions
    click = col(imp, "click")
    assert abs(click.mean() - 0.04) < 0.006
    # ~20 conversions in 100k rows are too few to measure 0.5%; the truth is exact.
    p_v = col(imp, "p_conversion")
    assert abs(p_v[click == 1].mean() - 0.005) < 0.001
    assert col(imp, "conversion").sum() < 0.02 * click.sum()


@pytest.mark.parametrize("target", [0.01, 0.10])
def test_ctr_knob(target):
    imp = one_split(small("dense", ctr=target), 50_000, seed=6).impressions
    assert abs(col(imp, "click").mean() - target) < 0.25 * target


def _clicked_vs_all(cfg: SimConfig, seed: int = 7) -> float:
    imp = one_split(cfg, 100_000, seed).impressions
    click, p_v = col(imp, "click"), col(imp, "p_conversion")
    return p_v[click == 1].mean() / p_v.mean()


def test_selection_bias_visible():
    assert _clicked_vs_all(small("dense", selection=0.5, clickbait_fraction=0.0)) > 1.25
    assert _clicked_vs_all(small("dense", selection=1.0, clickbait_fraction=0.0)) > 1.6


def test_no_selection_no_bias():
    ratio = _clicked_vs_all(small("dense", selection=0.0, clickbait_fraction=0.0))
    assert abs(ratio - 1.0) < 0.08


def test_hidden_confounder_biases_clicked_rows():
    cfg = small("dense", selection=0.0, clickbait_fraction=0.0, hidden_confounder=1.0)
    assert _clicked_vs_all(cfg) > 1.25


def test_clickbait_items_attract_clicks_but_rarely_convert():
    cfg = small("dense", clickbait_fraction=0.2)
    imp = one_split(cfg, 100_000, seed=8).impressions
    bait = sim._build_world(cfg, 8).item_bait[col(imp, "205")]
    assert 0.15 < bait.mean() < 0.25
    p_c, p_v = col(imp, "p_click"), col(imp, "p_conversion")
    assert p_c[bait].mean() > 1.5 * p_c[~bait].mean()
    assert p_v[bait].mean() < 0.5 * p_v[~bait].mean()


def test_item_popularity_is_zipf_like():
    def top_share(cfg: SimConfig) -> float:
        counts = np.bincount(col(one_split(cfg, 100_000, seed=9).impressions, "205"),
                             minlength=cfg.n_items)
        top = np.sort(counts)[::-1][: cfg.n_items // 100]
        return top.sum() / counts.sum()

    assert top_share(small("dense")) > 0.4
    assert top_share(small("dense", zipf_item=0.0)) < 0.05


def test_user_activity_skewed():
    """Active users (Zipf) reappear across splits far more than uniform ones."""
    def overlap(cfg: SimConfig) -> float:
        s = simulate(cfg, {"a": 30_000, "b": 30_000}, 10)
        ua, ub = col(s["a"].users, "101"), col(s["b"].users, "101")
        return len(np.intersect1d(ua, ub)) / len(ua)

    assert overlap(small("dense", zipf_user=1.2)) > overlap(small("dense", zipf_user=0.0)) + 0.2


# ---------------------------------------------------------------------------------------------
# Bags


def test_bag_lengths_dense(dense_split):
    users = dense_split.users
    for f, mean in (("109_14", 10), ("110_14", 30), ("127_14", 20), ("150_14", 15)):
        lens = list_lengths(users, f)
        assert abs(lens.mean() - mean) < 0.15 * mean, f
    lens_210 = list_lengths(dense_split.impressions, "210")
    assert 2.0 < lens_210.mean() < 3.2


def test_bag_lengths_aliccp_long_tailed():
    users = one_split(small("aliccp"), 50_000, seed=11).users
    for f, mean in (("109_14", 100), ("110_14", 300), ("127_14", 200), ("150_14", 150)):
        lens = list_lengths(users, f)
        assert abs(lens.mean() - mean) < 0.15 * mean, f
        assert lens.max() > 3 * mean, f  # long tail
    total = sum(list_lengths(users, f) for f in USER_BAGS)
    assert total.mean() > 500  # hundreds of ids per user, as in Ali-CCP


def _lift_within_item(imp: pa.Table, prob: str, cross: str) -> float:
    """Mean logit of ``prob`` on rows with a ``cross`` id minus rows without, after removing
    each item's mean (so popular items do not decide the comparison)."""
    p = col(imp, prob)
    logit = np.log(p / (1.0 - p))
    item = col(imp, "205")
    per_item = np.bincount(item, weights=logit) / np.maximum(np.bincount(item), 1)
    resid = logit - per_item[item]
    hit = col(imp, cross) > 0
    return float(resid[hit].mean() - resid[~hit].mean())


def test_bags_reveal_preferences(dense_split):
    """Items whose category / shop / brand is in the user's history are clicked and bought
    more: the bags carry the user's preferences."""
    imp = dense_split.impressions
    for cross in ("508", "509", "702", "853"):
        hit = col(imp, cross) > 0
        assert 0.03 < hit.mean() < 0.8, cross
        assert _lift_within_item(imp, "p_click", cross) > 0.15, cross
        assert _lift_within_item(imp, "p_conversion", cross) > 0.1, cross


def test_bag_signal_zero_is_uninformative():
    imp = one_split(small("dense", bag_signal=0.0), 100_000, seed=12).impressions
    for cross in ("508", "509"):
        assert abs(_lift_within_item(imp, "p_click", cross)) < 0.05, cross
        assert abs(_lift_within_item(imp, "p_conversion", cross)) < 0.05, cross


def test_cross_ids_follow_the_users_history(dense_split):
    """An item whose category is in the user's 109_14 bag always gets a 508 cross id (the bag
    is drawn from the user's history pool, and the cross is set for items in that pool)."""
    imp, users = dense_split.impressions, dense_split.users
    bag = users.column("109_14").combine_chunks()
    off, vals = bag.offsets.to_numpy(), bag.values.to_numpy()
    row = {k: i for i, k in enumerate(col(users, "common_key"))}
    keys, cats, cross = col(imp, "common_key"), col(imp, "206"), col(imp, "508")
    in_bag = np.array([cats[j] in set(vals[off[row[keys[j]]]:off[row[keys[j]] + 1]])
                       for j in range(20_000)])
    assert in_bag.mean() > 0.05
    assert (cross[:20_000][in_bag] > 0).all()
    # The cross id is a (user, category) combination: one id per pair.
    hit = cross > 0
    pairs = np.unique(np.stack([keys[hit], cats[hit], cross[hit]]), axis=1)
    assert len(np.unique(pairs[:2], axis=1)[0]) == pairs.shape[1]


# ---------------------------------------------------------------------------------------------
# Presets and knobs


def test_presets():
    assert {"aliccp", "dense"} <= set(PRESETS)
    a, d = PRESETS["aliccp"], PRESETS["dense"]
    assert (a.ctr, a.cvr) == (0.04, 0.005)
    assert d.cvr == 0.10 and d.ctr == a.ctr
    assert a.bag_len_110_14 >= 100 and d.bag_len_110_14 < 100
    # "dense" is the same world: only the conversion rate and the bags differ.
    differ = {f for f in sim._knob_names() if getattr(a, f) != getattr(d, f)}
    assert differ == {"cvr", "bag_len_109_14", "bag_len_110_14", "bag_len_127_14",
                      "bag_len_150_14"}
    assert get_preset("aliccp") == a
    assert get_preset("dense", selection=1.0).selection == 1.0


def test_every_knob_is_documented():
    doc = SimConfig.__doc__ or ""
    from pathlib import Path

    md = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
    text = md.read_text() if md.is_file() else ""
    for name in sim._knob_names():
        assert name in doc, name
        assert f"`{name}`" in text, name


def test_get_preset_errors():
    with pytest.raises(UsageError, match="nope.*aliccp.*dense"):
        get_preset("nope")
    with pytest.raises(UsageError, match="selectoin.*selection"):
        get_preset("dense", selectoin=1.0)
    with pytest.raises(UsageError, match="'ctr'.*1.5"):
        get_preset("dense", ctr=1.5)
    with pytest.raises(UsageError, match="'n_users'.*0"):
        get_preset("dense", n_users=0)
    with pytest.raises(UsageError, match="'latent_dim'.*2.5"):
        get_preset("dense", latent_dim=2.5)
    with pytest.raises(UsageError, match="'selection'.*'lots'"):
        get_preset("dense", selection="lots")
    with pytest.raises(UsageError, match="clickbait_fraction"):
        SimConfig(clickbait_fraction=-0.1)
    with pytest.raises(UsageError, match="'cvr'"):
        SimConfig(cvr=float("nan"))


def test_string_overrides_are_converted():
    cfg = get_preset("dense", cvr="5e-3", n_users="2_000", selection=1)
    assert cfg.cvr == 0.005 and cfg.n_users == 2000
    assert isinstance(cfg.selection, float)


def test_bad_rows_and_seed():
    cfg = small("dense")
    for rows in ({}, {"train": 0}, {"../x": 10}, {"train": 1.5}):
        with pytest.raises(UsageError, match="rows|split"):
            simulate(cfg, rows, 1)
    with pytest.raises(UsageError, match="seed"):
        simulate(cfg, {"train": 10}, -1)


def test_tiny_splits():
    out = simulate(small("dense"), {"one": 1, "few": 7}, 1)
    assert out["one"].impressions.num_rows == 1 and out["one"].users.num_rows == 1
    assert out["few"].impressions.num_rows == 7


# ---------------------------------------------------------------------------------------------
# Chunks and files


def test_chunked_generation(monkeypatch):
    monkeypatch.setattr(sim, "_CHUNK_ROWS", 4_000)
    cfg = small("dense")
    split = one_split(cfg, 30_000, seed=13)
    imp, users = split.impressions, split.users
    np.testing.assert_array_equal(col(imp, "sample_id"), np.arange(1, 30_001))
    keys = col(imp, "common_key")
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    assert len(starts) == users.num_rows == len(np.unique(keys))
    np.testing.assert_array_equal(keys[starts], col(users, "common_key"))
    assert len(list(sim._iter_split(sim._build_world(cfg, 13), "train", 30_000, 13))) > 3


def test_write_simulation(tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "_CHUNK_ROWS", 8_000)
    cfg = small("dense", selection=0.8)
    rows = {"train": 20_000, "test": 5_000}
    info = write_simulation(tmp_path / "a", cfg, rows, 21)
    meta = json.loads((tmp_path / "a" / "simulation.json").read_text())
    assert meta == json.loads(json.dumps(info))
    assert meta["seed"] == 21 and meta["rows"] == rows and meta["preset"] == "dense"
    assert meta["config"]["selection"] == 0.8
    assert meta["overrides"]["selection"] == 0.8
    expected = simulate(cfg, rows, 21)
    for name in rows:
        d = tmp_path / "a" / name
        imp = pq.read_table(d / "impressions.parquet")
        users = pq.read_table(d / "users.parquet")
        assert imp.equals(expected[name].impressions)
        assert users.equals(expected[name].users)
        s = meta["splits"][name]
        click = col(imp, "click")
        assert s["impressions"] == rows[name]
        assert s["ctr"] == pytest.approx(click.mean())
        assert s["conversions_per_click"] == pytest.approx(col(imp, "conversion").sum()
                                                           / click.sum())
        assert s["ctcvr"] == pytest.approx(col(imp, "conversion").mean())
        assert s["n_users"] == users.num_rows
        assert s["n_items"] == len(np.unique(col(imp, "205")))
        for f in USER_BAGS:
            assert s["mean_bag_len"][f] == pytest.approx(list_lengths(users, f).mean())
        assert s["mean_bag_len"]["210"] == pytest.approx(list_lengths(imp, "210").mean())
        assert s["mean_p_conversion_clicked"] > s["mean_p_conversion"]
    # Same seed: byte-identical files.
    write_simulation(tmp_path / "b", cfg, rows, 21)
    for name in rows:
        for f in ("impressions.parquet", "users.parquet"):
            assert (tmp_path / "a" / name / f).read_bytes() == (tmp_path / "b" / name / f
                                                               ).read_bytes()
    assert (tmp_path / "a" / "simulation.json").read_text() == (
        tmp_path / "b" / "simulation.json").read_text()


def test_smallest_world_and_progress(tmp_path):
    cfg = get_preset("dense", n_users=1, n_items=1, n_categories=1, n_shops=1, n_brands=1,
                     n_intentions=1, n_contexts=1, bag_pool=1, latent_dim=1)
    info = write_simulation(tmp_path, cfg, {"train": 500}, 0, progress=True)
    imp = pq.read_table(tmp_path / "train" / "impressions.parquet")
    assert imp.num_rows == 500 and info["splits"]["train"]["n_users"] == 1
    assert set(col(imp, "205")) == {0}


# ---------------------------------------------------------------------------------------------
# The selection knobs, each moving its own quantity


def _fingerprint(imp: pa.Table) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in ("205", "301", "508", "click", "conversion", "conversion_if_clicked"):
        h.update(col(imp, c).astype(np.int64).tobytes())
    for c in ("p_click", "p_conversion"):
        h.update(np.round(col(imp, c), 10).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("preset,digest", [("aliccp", "7fbe8ef18147d4ab"),
                                           ("dense", "053f774ee0f23b13")])
def test_presets_reproduce_the_data_from_before_the_selection_knobs(preset, digest):
    """Digests taken from the simulator before selection_correlation existed: its default
    (1.0) leaves every draw, probability and label as it was."""
    imp = one_split(small(preset), 20_000, seed=5).impressions
    assert _fingerprint(imp) == digest


@pytest.mark.parametrize("k", [1, 2, 8])
def test_orthogonal_score_is_uncorrelated_with_r_and_of_its_variance(k):
    cfg = small("dense", latent_dim=k)
    rng = np.random.default_rng(k)
    uf = rng.standard_normal((400_000, 2 * k + 2)).astype(np.float32)
    itf = rng.standard_normal((400_000, 2 * k + 2)).astype(np.float32)
    r = sim._relevant_score(cfg, uf, itf)
    r_orth = sim._orthogonal_score(cfg, uf, itf)
    assert abs(np.corrcoef(r, r_orth)[0, 1]) < 0.01
    assert r_orth.var() == pytest.approx(r.var(), rel=0.03)


def _effects(**knobs) -> dict[str, float]:
    return sim.selection_effects(small("dense", clickbait_fraction=0.0, **knobs), 100_000, 3)


def test_selection_moves_the_covariate_shift_and_nothing_else():
    """At selection_correlation 0, selection shifts the clicked sample in the factors
    conversion reads without correlating click and conversion propensity."""
    none, some, much = (_effects(selection=s, selection_correlation=0.0) for s in (0, 0.5, 1))
    assert none["covariate_shift"] < 0.1
    assert 0.3 < some["covariate_shift"] < much["covariate_shift"]
    assert much["covariate_shift"] > 0.6
    # A small world's users and items correlate a little by chance (about 0.05 here): the
    # knob must not add to that, where selection_correlation = 1 would add about 0.5.
    for e in (some, much):
        assert abs(e["spearman_observed"] - none["spearman_observed"]) < 0.05
        assert abs(e["clicked_p_conversion_ratio"] - none["clicked_p_conversion_ratio"]) < 0.15
    assert all(e["confounding"] == 1.0 for e in (none, some, much))


def test_selection_correlation_moves_the_correlation_and_nothing_else():
    runs = {rho: _effects(selection=0.8, selection_correlation=rho) for rho in (-1, 0, 0.5, 1)}
    corr = [runs[rho]["spearman_observed"] for rho in (-1, 0, 0.5, 1)]
    unselected = _effects(selection=0.0)["spearman_observed"]
    assert corr == sorted(corr) and corr[0] < -0.4 and corr[3] > 0.4
    assert abs(corr[1] - unselected) < 0.05
    lift = [runs[rho]["clicked_p_conversion_ratio"] for rho in (-1, 0, 0.5, 1)]
    assert lift == sorted(lift) and lift[0] < 0.8 and lift[3] > 1.5
    shifts = [e["covariate_shift"] for e in runs.values()]
    assert max(shifts) < 1.2 * min(shifts)
    assert all(e["confounding"] == 1.0 for e in runs.values())
    # Calibration follows the knob: the rates stay on target at every correlation.
    for e in runs.values():
        assert e["ctr"] == pytest.approx(0.04, rel=0.1)
        assert e["conversions_per_click"] == pytest.approx(0.10, rel=0.1)
    # Click propensity alone ranks conversions better the more it is aligned with them.
    auc_click = [runs[rho]["auc_p_click_entire_space"] for rho in (-1, 0, 0.5, 1)]
    assert auc_click == sorted(auc_click)


def test_hidden_confounder_moves_confounding_and_nothing_the_features_show():
    base, hidden = _effects(), _effects(hidden_confounder=1.0)
    assert base["confounding"] == 1.0
    assert hidden["confounding"] > 1.5
    # The propensities the features carry are untouched (z enters neither), only the truth.
    assert hidden["spearman_observed"] == pytest.approx(base["spearman_observed"], abs=1e-12)
    assert hidden["spearman_p_click_p_conversion"] > base["spearman_p_click_p_conversion"] + 0.1
    assert hidden["covariate_shift"] == pytest.approx(base["covariate_shift"], rel=0.1)


def test_confounding_counts_converting_clicks_beyond_the_features():
    """The confounding ratio is the observed excess of conversions among clicks over what the
    features predict: measured from drawn labels, it agrees."""
    cfg = small("dense", clickbait_fraction=0.0, hidden_confounder=1.0)
    world = sim._build_world(cfg, 3)
    parts = [sim._draw_impressions(world, u, c, rng)
             for u, c, rng in sim._plan_chunks(world, "test", 100_000, 3)]
    click = np.concatenate([p.click for p in parts])
    conv = np.concatenate([p.conv_if_clicked for p in parts])
    s_obs = np.concatenate([p.s_v - cfg.hidden_confounder * p.z for p in parts])
    p_obs = sim._observed_conversion(s_obs, cfg.hidden_confounder, world.off_v)
    # Averaged over all rows, the features-only probability is calibrated ...
    assert conv.mean() == pytest.approx(p_obs.mean(), rel=0.05)
    # ... but clicked rows convert far more than it says.
    measured = conv[click].mean() / p_obs[click].mean()
    assert measured == pytest.approx(sim.selection_effects(cfg, 100_000, 3)["confounding"],
                                     rel=0.12)


def test_selection_correlation_validated_and_passed_as_text():
    assert get_preset("dense", selection_correlation="-0.5").selection_correlation == -0.5
    with pytest.raises(UsageError, match=r"'selection_correlation'.*1.5.*\[-1, 1\]"):
        get_preset("dense", selection_correlation=1.5)


def test_selection_effects_errors():
    with pytest.raises(UsageError, match="rows"):
        sim.selection_effects(small("dense"), 0, 1)
    with pytest.raises(UsageError, match="seed"):
        sim.selection_effects(small("dense"), 100, -2)
