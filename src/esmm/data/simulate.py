"""Ground-truth simulator of Ali-CCP-shaped impression logs.

A *world* (users, items, their latent factors, id hierarchies, calibrated offsets) is drawn once
from the seed; each split then draws its own impressions from that same world. Every impression
carries its true click probability ``p_click``, its true probability of conversion if clicked
``p_conversion`` and a draw ``conversion_if_clicked``, beside the labels and the Ali-CCP feature
fields. The model of the world and every knob are described in ``docs/simulator.md``.

Everything is vectorised numpy: Python loops run over fields, splits and chunks, never rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import re
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esmm.errors import UsageError
from esmm.fsio import write_text

log = logging.getLogger(__name__)

__all__ = [
    "CONTEXT_FIELD",
    "CROSS_FIELDS",
    "IMPRESSION_COLUMNS",
    "ITEM_FIELDS",
    "PRESETS",
    "PROFILE_CARDINALITY",
    "USER_BAG_FIELDS",
    "USER_COLUMNS",
    "SimConfig",
    "Split",
    "get_preset",
    "simulate",
    "write_simulation",
]

# Field ids (Ali-CCP names). Single-valued item fields, then the context and the crosses.
ITEM_FIELDS = ("205", "206", "207", "216")
CONTEXT_FIELD = "301"
CROSS_FIELDS = ("508", "509", "702", "853")
ITEM_BAG_FIELD = "210"
# Profile fields and the number of distinct ids each takes (0 .. cardinality - 1).
PROFILE_CARDINALITY: dict[str, int] = {
    "121": 97, "122": 13, "124": 2, "125": 7, "126": 3, "127": 3, "128": 2, "129": 4,
}
USER_BAG_FIELDS = ("109_14", "110_14", "127_14", "150_14")
# Which entity each behaviour bag lists, and which bag each cross combines with which item field.
_BAG_ENTITY = {"109_14": "category", "110_14": "shop", "127_14": "brand", "150_14": "intention"}
_CROSS_BAG = {"508": "109_14", "509": "110_14", "702": "127_14", "853": "150_14"}

IMPRESSION_COLUMNS = (
    "sample_id", "common_key", *ITEM_FIELDS, CONTEXT_FIELD, *CROSS_FIELDS, ITEM_BAG_FIELD,
    "click", "conversion", "p_click", "p_conversion", "conversion_if_clicked",
)
USER_COLUMNS = ("common_key", "101", *PROFILE_CARDINALITY, *USER_BAG_FIELDS)

# Variance shares of an item's factors: category, shop, brand, the item itself.
_HIERARCHY = {"category": 0.4, "shop": 0.2, "brand": 0.2, "item": 0.2}
# Zipf exponents of the id hierarchy: shops, brands and intention nodes per category, and
# items per shop.
_CATEGORY_ZIPF = 1.0
_SHOP_ZIPF = 0.5
_SHOP_CATEGORY_SHARE = 0.9  # share of an item's category taken from its shop's main category
_CANDIDATES_PER_POOL_SLOT = 4  # candidate entities drawn per pool slot when drawing bag pools
_CALIBRATION_ROWS = 200_000
_CHUNK_ROWS = 1 << 20
_ROW_GROUP_ROWS = 1 << 17
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulated world. Defaults are the ``aliccp`` preset.

    Sizes:
        n_users: users in the world (field ``101``); default 100_000.
        n_items: items (``205``); default 500_000.
        n_categories: categories (``206``); default 2_000.
        n_shops: shops (``207``); default 100_000.
        n_brands: brands (``216``); default 40_000.
        n_intentions: intention nodes (``210``, ``150_14``); default 20_000.
        n_contexts: context / position values (``301``); default 3.
        latent_dim: dimension k of the user and item latent factors; default 8.

    Rates and the click / conversion mechanism:
        ctr: target mean click rate over all impressions; default 0.04.
        cvr: target conversions per click; default 0.005.
        selection: weight of the conversion-relevant score inside the click score (0: clicks
            carry no conversion signal; 1: strong selection on conversion); default 0.5.
        clickbait_fraction: share of items that are click-bait; default 0.1.
        clickbait_boost: click-logit added on click-bait items; default 1.0.
        clickbait_penalty: conversion-logit subtracted on click-bait items; default 2.0.
        hidden_confounder: weight of a per-impression factor z ~ N(0, 1), revealed by no
            feature, added to both the click and the conversion logit; default 0.0.
        interaction_scale: standard deviation of each user-item interaction term; default 0.8.
        bias_scale: standard deviation of each user and item bias term; default 0.5.
        context_scale: standard deviation of the per-context click effect; default 0.3.

    Popularity and activity:
        zipf_item: Zipf exponent of item popularity (which items are impressed); default 1.0.
        zipf_user: Zipf exponent of user activity (which users appear in a split); default 0.8.
        impressions_per_user: mean impressions per user in a split (Ali-CCP: ~58 per common
            key); default 60.0.
        session_sigma: log-normal sigma of a user's share of a split's impressions; default 1.0.

    Bags:
        bag_len_109_14, bag_len_110_14, bag_len_127_14, bag_len_150_14: mean lengths of the
            user behaviour bags (categories, shops, brands, intention nodes); defaults 100, 300,
            200, 150.
        bag_len_sigma: log-normal sigma of the user bag lengths (long tail); default 0.8.
        bag_len_210: mean number of intention nodes per item (at least 1); default 3.0.
        bag_pool: distinct-draw pool per user and bag field the bag entries come from; default 16.
        bag_signal: how strongly the pool follows the user's latent preferences (0: popular ids
            at random); default 2.0.
        profile_signal: share of variance of each profile field's score that comes from the
            user's latent factors (0: profile fields are noise); default 0.5.
        cross_buckets: number of ids of the cross fields 508, 509, 702, 853; default 2**20.

    name: label of the preset the knobs came from (written to simulation.json); default "custom".
    """

    n_users: int = 100_000
    n_items: int = 500_000
    n_categories: int = 2_000
    n_shops: int = 100_000
    n_brands: int = 40_000
    n_intentions: int = 20_000
    n_contexts: int = 3
    latent_dim: int = 8
    ctr: float = 0.04
    cvr: float = 0.005
    selection: float = 0.5
    clickbait_fraction: float = 0.1
    clickbait_boost: float = 1.0
    clickbait_penalty: float = 2.0
    hidden_confounder: float = 0.0
    interaction_scale: float = 0.8
    bias_scale: float = 0.5
    context_scale: float = 0.3
    zipf_item: float = 1.0
    zipf_user: float = 0.8
    impressions_per_user: float = 60.0
    session_sigma: float = 1.0
    bag_len_109_14: float = 100.0
    bag_len_110_14: float = 300.0
    bag_len_127_14: float = 200.0
    bag_len_150_14: float = 150.0
    bag_len_sigma: float = 0.8
    bag_len_210: float = 3.0
    bag_pool: int = 16
    bag_signal: float = 2.0
    profile_signal: float = 0.5
    cross_buckets: int = 1 << 20
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(value, str) or not value:
                    _bad("name", value, "a non-empty string")
                continue
            if f.name in _INT_MIN:
                if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                    _bad(f.name, value, f"an integer >= {_INT_MIN[f.name]}")
                if value < _INT_MIN[f.name]:
                    _bad(f.name, value, f"an integer >= {_INT_MIN[f.name]}")
                object.__setattr__(self, f.name, int(value))
                continue
            lo, hi, lo_open, hi_open = _FLOAT_RANGE[f.name]
            expect = _range_text(lo, hi, lo_open, hi_open)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                _bad(f.name, value, expect)
            v = float(value)
            if (not math.isfinite(v) or v < lo or (lo_open and v == lo)
                    or (hi is not None and (v > hi or (hi_open and v == hi)))):
                _bad(f.name, value, expect)
            object.__setattr__(self, f.name, v)

    def bag_len(self, field: str) -> float:
        """Mean length of the bag ``field`` (a user bag field or ``210``)."""
        return float(getattr(self, "bag_len_" + field))


_INT_MIN = {
    "n_users": 1, "n_items": 1, "n_categories": 1, "n_shops": 1, "n_brands": 1,
    "n_intentions": 1, "n_contexts": 1, "latent_dim": 1, "bag_pool": 1, "cross_buckets": 2,
}
# knob: (low, high or None, low excluded, high excluded)
_FLOAT_RANGE: dict[str, tuple[float, float | None, bool, bool]] = {
    "ctr": (0.0, 1.0, True, True),
    "cvr": (0.0, 1.0, True, True),
    "selection": (0.0, None, False, False),
    "clickbait_fraction": (0.0, 1.0, False, False),
    "clickbait_boost": (0.0, None, False, False),
    "clickbait_penalty": (0.0, None, False, False),
    "hidden_confounder": (0.0, None, False, False),
    "interaction_scale": (0.0, None, False, False),
    "bias_scale": (0.0, None, False, False),
    "context_scale": (0.0, None, False, False),
    "zipf_item": (0.0, None, False, False),
    "zipf_user": (0.0, None, False, False),
    "impressions_per_user": (1.0, None, False, False),
    "session_sigma": (0.0, None, False, False),
    "bag_len_109_14": (0.0, None, False, False),
    "bag_len_110_14": (0.0, None, False, False),
    "bag_len_127_14": (0.0, None, False, False),
    "bag_len_150_14": (0.0, None, False, False),
    "bag_len_sigma": (0.0, None, False, False),
    "bag_len_210": (1.0, None, False, False),
    "bag_signal": (0.0, None, False, False),
    "profile_signal": (0.0, 1.0, False, False),
}


def _range_text(lo: float, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    return (f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


def _bad(knob: str, value: Any, expect: str) -> None:
    raise UsageError(f"simulator knob {knob!r}: got {value!r}, expected {expect}")


PRESETS: dict[str, SimConfig] = {
    # Ali-CCP's rates (CTR ~4%, ~0.5% conversions per click) and long user bags, at a size a
    # laptop holds (the real data: 0.4M users, 4.3M items).
    "aliccp": SimConfig(name="aliccp"),
    # The same world with ~10% conversions per click and short bags: fast, stable experiments.
    "dense": SimConfig(
        cvr=0.10, bag_len_109_14=10.0, bag_len_110_14=30.0, bag_len_127_14=20.0,
        bag_len_150_14=15.0, name="dense",
    ),
}


def _knob_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SimConfig) if f.name != "name"]


def _coerce(knob: str, value: Any) -> Any:
    """Turn a string override (e.g. from a command line) into the knob's type."""
    if not isinstance(value, str):
        return value
    try:
        if knob in _INT_MIN:
            return int(value.replace("_", ""))
        return float(value)
    except ValueError:
        expect = "an integer" if knob in _INT_MIN else "a number"
        raise UsageError(f"simulator knob {knob!r}: got {value!r}, expected {expect}") from None


def get_preset(name: str, **overrides: Any) -> SimConfig:
    """The preset ``name`` with knobs replaced by ``overrides`` (validated).

    String values are converted to the knob's type, so command-line text can be passed as is.
    """
    if name not in PRESETS:
        raise UsageError(f"unknown simulator preset {name!r}: expected one of "
                         f"{', '.join(sorted(PRESETS))}")
    valid = _knob_names()
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise UsageError(f"unknown simulator knob(s) {', '.join(map(repr, unknown))}: valid "
                         f"knobs are {', '.join(valid)}")
    values = {k: _coerce(k, v) for k, v in overrides.items()}
    return dataclasses.replace(PRESETS[name], **values)


# --------------------------------------------------------------------------------------------
# Small vectorised helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -700.0, 700.0)))


def _zipf_ranks(rng: np.random.Generator, size: int | tuple[int, ...], n: int,
                s: float) -> np.ndarray:
    """Ranks 0..n-1 with P(rank r) roughly proportional to (r + 1) ** -s (inverse CDF of the
    continuous power law on [1, n + 1))."""
    u = rng.random(size)
    if n == 1:
        return np.zeros(u.shape, dtype=np.int64)
    a = 1.0 - s
    if abs(a) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        x = ((float(n + 1) ** a - 1.0) * u + 1.0) ** (1.0 / a)
    r = x.astype(np.int64) - 1
    np.clip(r, 0, n - 1, out=r)
    return r


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stable 64-bit hash of uint64 values."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _stochastic_round(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    lo = np.floor(x)
    return (lo + (rng.random(x.shape) < (x - lo))).astype(np.int64)


def _lognormal_lengths(rng: np.random.Generator, n: int, mean: float,
                       sigma: float) -> np.ndarray:
    """Non-negative integer lengths with the given mean and a log-normal (long) tail."""
    if mean <= 0.0:
        return np.zeros(n, dtype=np.int64)
    x = mean * np.exp(sigma * rng.standard_normal(n) - 0.5 * sigma * sigma)
    return _stochastic_round(rng, x)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def _gather_csr(offsets: np.ndarray, values: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR list (offsets, values) as a new (offsets, values)."""
    starts = np.take(offsets, rows)
    lengths = np.take(offsets, rows + 1) - starts
    out_off = _offsets(lengths)
    starts -= out_off[:-1]
    index = np.repeat(starts, lengths)
    index += np.arange(out_off[-1], dtype=np.int64)
    return out_off, np.take(values, index)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    if len(values) > np.iinfo(np.int32).max:
        raise UsageError(f"simulator: {len(values)} list values in one chunk of a split, more "
                         "than a list<int64> column holds; lower the bag_len_* knobs")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(values, type=pa.int64()))


class _Grouped:
    """Uniform draws of an entity among those whose home category is a given category."""

    def __init__(self, home: np.ndarray, n_categories: int):
        self.order = np.argsort(home, kind="stable").astype(np.int64)
        self.count = np.bincount(home, minlength=n_categories).astype(np.int64)
        self.start = _offsets(self.count)[:-1]
        self.n = len(home)

    def draw(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        cnt = self.count[category]
        u = rng.random(len(category))
        anywhere = (u * self.n).astype(np.int64)
        pos = self.start[category] + (u * cnt).astype(np.int64)
        pick = self.order[np.minimum(pos, self.n - 1)]
        return np.where(cnt > 0, pick, anywhere)


def _solve_offset(score: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """Offset o with weighted mean of sigmoid(score + o) equal to target (safeguarded Newton)."""
    wsum = float(len(score)) if weight is None else float(weight.sum())
    lo, hi = -60.0 - float(score.max()), 60.0 - float(score.min())
    o = math.log(target / (1.0 - target)) - float(np.median(score))
    o = min(max(o, lo), hi)
    for _ in range(100):
        p = _sigmoid(score + o)
        if weight is None:
            f = float(p.sum()) / wsum - target
            d = float((p * (1.0 - p)).sum()) / wsum
        else:
            f = float((weight * p).sum()) / wsum - target
            d = float((weight * p * (1.0 - p)).sum()) / wsum
        if abs(f) <= 1e-12 + 1e-9 * target:
            break
        if f > 0:
            hi = o
        else:
            lo = o
        step = o - f / d if d > 0 else 0.5 * (lo + hi)
        o = step if lo < step < hi else 0.5 * (lo + hi)
    return o


# --------------------------------------------------------------------------------------------
# The world


@dataclass
class _World:
    """Everything fixed by the seed. Factor rows are float32 laid out as
    ``[taste (k), attention (k), conversion bias, click bias]`` for users and items alike."""

    cfg: SimConfig
    # items
    item_by_rank: np.ndarray  # (n_items,) item at popularity rank r
    item_entity: dict[str, np.ndarray]  # category / shop / brand / intention (primary) per item
    item_int_off: np.ndarray  # CSR of the item's intention nodes (field 210)
    item_int_val: np.ndarray
    item_bait: np.ndarray  # (n_items,) bool
    item_factors: np.ndarray  # (n_items, 2k + 2) float32
    entity_factors: dict[str, np.ndarray]  # (n_entity, 2k) float32 per entity kind
    ctx_p: np.ndarray
    ctx_effect: np.ndarray
    # users
    user_weight: np.ndarray  # (n_users,) activity weights (sum 1)
    user_factors: np.ndarray  # (n_users, 2k + 2) float32
    profile: dict[str, np.ndarray]
    off_c: float = 0.0
    off_v: float = 0.0

    def scores(self, uf: np.ndarray, items: np.ndarray, ctx: np.ndarray,
               z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Click and conversion logits before the calibrated offsets.

        ``uf``: the user factor rows of the impressions, (N, 2k + 2)."""
        cfg = self.cfg
        k = cfg.latent_dim
        itf = np.take(self.item_factors, items, axis=0)
        w = cfg.interaction_scale / math.sqrt(k)
        inter_t = np.einsum("ij,ij->i", uf[:, :k], itf[:, :k])
        inter_a = np.einsum("ij,ij->i", uf[:, k:2 * k], itf[:, k:2 * k])
        relevant = (cfg.bias_scale * (uf[:, 2 * k].astype(np.float64) + itf[:, 2 * k])
                    + w * inter_t.astype(np.float64))
        own = (cfg.bias_scale * (uf[:, 2 * k + 1].astype(np.float64) + itf[:, 2 * k + 1])
               + w * inter_a.astype(np.float64) + np.take(self.ctx_effect, ctx))
        bait = np.take(self.item_bait, items)
        s_c = own + cfg.selection * relevant
        s_v = relevant
        if cfg.clickbait_boost:
            s_c += cfg.clickbait_boost * bait
        if cfg.clickbait_penalty:
            s_v -= cfg.clickbait_penalty * bait
        if cfg.hidden_confounder:
            s_c += cfg.hidden_confounder * z
            s_v += cfg.hidden_confounder * z
        return s_c, s_v


def _seq(seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=key)


def _split_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _build_world(cfg: SimConfig, seed: int) -> _World:
    t0 = time.perf_counter()
    k = cfg.latent_dim
    width = 2 * k + 2
    rng = np.random.default_rng(_seq(seed, 0, 0))  # items and entities
    n_cat = cfg.n_categories
    cat_by_rank = rng.permutation(n_cat).astype(np.int64)
    shop_cat = cat_by_rank[_zipf_ranks(rng, cfg.n_shops, n_cat, _CATEGORY_ZIPF)]
    brand_cat = cat_by_rank[_zipf_ranks(rng, cfg.n_brands, n_cat, _CATEGORY_ZIPF)]
    int_cat = cat_by_rank[_zipf_ranks(rng, cfg.n_intentions, n_cat, _CATEGORY_ZIPF)]
    shop_by_rank = rng.permutation(cfg.n_shops).astype(np.int64)
    item_shop = shop_by_rank[_zipf_ranks(rng, cfg.n_items, cfg.n_shops, _SHOP_ZIPF)]
    other_cat = cat_by_rank[_zipf_ranks(rng, cfg.n_items, n_cat, _CATEGORY_ZIPF)]
    item_cat = np.where(rng.random(cfg.n_items) < _SHOP_CATEGORY_SHARE, shop_cat[item_shop],
                        other_cat)
    item_brand = _Grouped(brand_cat, n_cat).draw(rng, item_cat)

    # Intention nodes of each item (field 210): distinct, from the item's category.
    ints = _Grouped(int_cat, n_cat)
    n_int = 1 + rng.poisson(cfg.bag_len_210 - 1.0, cfg.n_items).astype(np.int64)
    cnt = ints.count[item_cat]
    n_int = np.where(cnt > 0, np.minimum(n_int, cnt), 1)
    int_off = _offsets(n_int)
    first = rng.random(cfg.n_items)
    fallback = rng.integers(0, cfg.n_intentions, cfg.n_items)
    rep = np.repeat(np.arange(cfg.n_items, dtype=np.int64), n_int)
    j = np.arange(int_off[-1], dtype=np.int64) - int_off[:-1][rep]
    c = cnt[rep]
    cs = np.maximum(c, 1)
    pos = ints.start[item_cat[rep]] + ((first[rep] * cs).astype(np.int64) + j) % cs
    int_val = np.where(c > 0, ints.order[np.minimum(pos, cfg.n_intentions - 1)], fallback[rep])
    item_primary_int = int_val[int_off[:-1]]

    # Latent factors: one table per level of the item hierarchy, mixed by variance shares.
    cat_f = rng.standard_normal((n_cat, width), dtype=np.float32)
    shop_f = rng.standard_normal((cfg.n_shops, width), dtype=np.float32)
    brand_f = rng.standard_normal((cfg.n_brands, width), dtype=np.float32)
    item_f = rng.standard_normal((cfg.n_items, width), dtype=np.float32)
    h = {key: np.float32(math.sqrt(v)) for key, v in _HIERARCHY.items()}
    item_f *= h["item"]
    item_f += h["category"] * np.take(cat_f, item_cat, axis=0)
    item_f += h["shop"] * np.take(shop_f, item_shop, axis=0)
    item_f += h["brand"] * np.take(brand_f, item_brand, axis=0)
    half = np.float32(math.sqrt(0.5))
    int_f = half * (np.take(cat_f[:, :2 * k], int_cat, axis=0)
                    + rng.standard_normal((cfg.n_intentions, 2 * k), dtype=np.float32))
    item_bait = rng.random(cfg.n_items) < cfg.clickbait_fraction
    item_by_rank = rng.permutation(cfg.n_items).astype(np.int64)
    ctx_p = _zipf_weights(cfg.n_contexts, 1.0)
    ctx_effect = cfg.context_scale * rng.standard_normal(cfg.n_contexts)

    urng = np.random.default_rng(_seq(seed, 0, 1))  # users
    user_by_rank = urng.permutation(cfg.n_users)
    user_weight = np.empty(cfg.n_users)
    user_weight[user_by_rank] = _zipf_weights(cfg.n_users, cfg.zipf_user)
    user_f = urng.standard_normal((cfg.n_users, width), dtype=np.float32)
    profile = {}
    sig = math.sqrt(cfg.profile_signal)
    noise = math.sqrt(1.0 - cfg.profile_signal)
    nd = NormalDist()
    for f, card in PROFILE_CARDINALITY.items():
        d = urng.standard_normal(width)
        d /= np.linalg.norm(d)
        score = sig * (user_f @ d.astype(np.float32)) + noise * urng.standard_normal(cfg.n_users)
        cuts = np.array([nd.inv_cdf(q / card) for q in range(1, card)])
        profile[f] = np.searchsorted(cuts, score).astype(np.int64)

    world = _World(
        cfg=cfg, item_by_rank=item_by_rank,
        item_entity={"category": item_cat, "shop": item_shop, "brand": item_brand,
                     "intention": item_primary_int},
        item_int_off=int_off, item_int_val=int_val.astype(np.int64), item_bait=item_bait,
        item_factors=item_f,
        entity_factors={"category": np.ascontiguousarray(cat_f[:, :2 * k]),
                        "shop": np.ascontiguousarray(shop_f[:, :2 * k]),
                        "brand": np.ascontiguousarray(brand_f[:, :2 * k]),
                        "intention": int_f},
        ctx_p=ctx_p, ctx_effect=ctx_effect, user_weight=user_weight, user_factors=user_f,
        profile=profile,
    )
    _calibrate(world, seed)
    log.debug("simulated world built in %.2f s (offsets: click %.4f, conversion %.4f)",
              time.perf_counter() - t0, world.off_c, world.off_v)
    return world


def _calibrate(world: _World, seed: int) -> None:
    """Solve the click and conversion offsets on a sample of impressions of this world."""
    cfg = world.cfg
    rng = np.random.default_rng(_seq(seed, 0, 2))
    n = _CALIBRATION_ROWS
    # Users uniformly: which users a split holds is independent of their factors, so the
    # population average is what a split's rates converge to.
    users = rng.integers(0, cfg.n_users, n)
    items = world.item_by_rank[_zipf_ranks(rng, n, cfg.n_items, cfg.zipf_item)]
    ctx = rng.choice(cfg.n_contexts, size=n, p=world.ctx_p)
    z = rng.standard_normal(n)
    s_c, s_v = world.scores(np.take(world.user_factors, users, axis=0), items, ctx, z)
    world.off_c = _solve_offset(s_c, cfg.ctr)
    p_c = _sigmoid(s_c + world.off_c)
    world.off_v = _solve_offset(s_v, cfg.cvr, weight=p_c)


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class Split:
    """One simulated split: impressions (one row each) and its users (one row per common_key)."""

    impressions: pa.Table
    users: pa.Table


def _plan_split(world: _World, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The users present in a split (in order of appearance) and their impression counts."""
    cfg = world.cfg
    n_present = int(min(cfg.n_users, max(1, round(n / cfg.impressions_per_user))))
    if n_present < cfg.n_users:
        keys = np.log(world.user_weight) + rng.gumbel(size=cfg.n_users)
        chosen = np.sort(np.argpartition(-keys, n_present - 1)[:n_present])
    else:
        chosen = np.arange(cfg.n_users)
    users = rng.permutation(chosen).astype(np.int64)
    share = rng.lognormal(-0.5 * cfg.session_sigma ** 2, cfg.session_sigma, n_present)
    counts = 1 + rng.multinomial(n - n_present, share / share.sum()).astype(np.int64)
    return users, counts


def _chunks(counts: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive user ranges of about _CHUNK_ROWS impressions each."""
    cum = np.cumsum(counts)
    bounds = [0]
    while bounds[-1] < len(counts):
        done = int(cum[bounds[-1] - 1]) if bounds[-1] > 0 else 0
        j = int(np.searchsorted(cum, done + _CHUNK_ROWS, side="left"))
        bounds.append(min(len(counts), j + 1))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _user_bags(world: _World, users: np.ndarray, rng: np.random.Generator
               ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per bag field: each user's pool as int32 (bag_pool, U) and the bag as CSR."""
    cfg = world.cfg
    k = cfg.latent_dim
    n_users = len(users)
    pool_size = cfg.bag_pool
    n_cand = _CANDIDATES_PER_POOL_SLOT * pool_size
    pref = np.take(world.user_factors, users, axis=0)[:, :2 * k, None]
    scale = np.float32(cfg.bag_signal / math.sqrt(2.0 * k))
    pools: dict[str, np.ndarray] = {}
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = np.arange(n_users, dtype=np.int64)
    for f in USER_BAG_FIELDS:
        kind = _BAG_ENTITY[f]
        ranks = _zipf_ranks(rng, (n_users, n_cand), cfg.n_items, cfg.zipf_item)
        cand = np.take(world.item_entity[kind], np.take(world.item_by_rank, ranks))
        aff = np.matmul(np.take(world.entity_factors[kind], cand, axis=0), pref)[..., 0]
        # Gumbel top-k: the pool is a draw without replacement, weights exp(scale * affinity).
        key = np.log(rng.standard_exponential((n_users, n_cand), dtype=np.float32)
                     + np.float32(1e-30))
        key -= scale * aff
        top = np.argpartition(key, pool_size - 1, axis=1)[:, :pool_size]
        pool = np.take_along_axis(cand, top, axis=1)
        lengths = _lognormal_lengths(rng, n_users, cfg.bag_len(f), cfg.bag_len_sigma)
        off = _offsets(lengths)
        slot = rng.integers(0, pool_size, int(off[-1]))
        values = np.take(pool.ravel(), np.repeat(rows * pool_size, lengths) + slot)
        pools[f] = np.ascontiguousarray(pool.T.astype(np.int32))
        bags[f] = (off, values)
    return pools, bags


def _cross(world: _World, field: str, user: np.ndarray, counts: np.ndarray, items: np.ndarray,
           pools: dict[str, np.ndarray]) -> np.ndarray:
    """Cross id: 0 when the item's entity is not in the user's bag pool, else a hash of
    (user, entity) in 1 .. cross_buckets - 1."""
    cfg = world.cfg
    bag = _CROSS_BAG[field]
    kind = _BAG_ENTITY[bag]
    ent = np.take(world.item_entity[kind], items)
    ent32 = ent.astype(np.int32)
    match = np.zeros(len(items), dtype=bool)
    for column in pools[bag]:
        match |= np.repeat(column, counts) == ent32
    out = np.zeros(len(items), dtype=np.int64)
    idx = np.flatnonzero(match)
    if len(idx):
        n_ent = len(world.entity_factors[kind])
        salt = (int(field) * 0x632BE59BD9B4E019) % (1 << 64)
        key = (user[idx].astype(np.uint64) * np.uint64(n_ent) + ent[idx].astype(np.uint64)
               + np.uint64(salt))
        h = _mix64(key) % np.uint64(cfg.cross_buckets - 1)
        out[idx] = h.astype(np.int64) + 1
    return out


def _generate_chunk(world: _World, users: np.ndarray, counts: np.ndarray, first_id: int,
                    rng: np.random.Generator) -> Split:
    cfg = world.cfg
    n = int(counts.sum())
    user = np.repeat(users, counts)
    items = np.take(world.item_by_rank, _zipf_ranks(rng, n, cfg.n_items, cfg.zipf_item))
    ctx = rng.choice(cfg.n_contexts, size=n, p=world.ctx_p).astype(np.int64)
    z = rng.standard_normal(n)
    uf = np.repeat(np.take(world.user_factors, users, axis=0), counts, axis=0)
    s_c, s_v = world.scores(uf, items, ctx, z)
    del uf
    p_click = _sigmoid(s_c + world.off_c)
    p_conv = _sigmoid(s_v + world.off_v)
    click = rng.random(n) < p_click
    conv_if_clicked = rng.random(n) < p_conv
    pools, bags = _user_bags(world, users, rng)

    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "common_key": pa.array(user),
        "205": pa.array(items),
        "206": pa.array(np.take(world.item_entity["category"], items)),
        "207": pa.array(np.take(world.item_entity["shop"], items)),
        "216": pa.array(np.take(world.item_entity["brand"], items)),
        CONTEXT_FIELD: pa.array(ctx),
    }
    for f in CROSS_FIELDS:
        cols[f] = pa.array(_cross(world, f, user, counts, items, pools))
    cols[ITEM_BAG_FIELD] = _list_array(*_gather_csr(world.item_int_off, world.item_int_val,
                                                    items))
    cols["click"] = pa.array(click.astype(np.int8))
    cols["conversion"] = pa.array((click & conv_if_clicked).astype(np.int8))
    cols["p_click"] = pa.array(p_click)
    cols["p_conversion"] = pa.array(p_conv)
    cols["conversion_if_clicked"] = pa.array(conv_if_clicked.astype(np.int8))
    impressions = pa.table(cols)

    ucols: dict[str, pa.Array] = {"common_key": pa.array(users), "101": pa.array(users)}
    for f in PROFILE_CARDINALITY:
        ucols[f] = pa.array(world.profile[f][users])
    for f in USER_BAG_FIELDS:
        ucols[f] = _list_array(*bags[f])
    return Split(impressions=impressions, users=pa.table(ucols))


def _check_rows(rows: Mapping[str, int]) -> None:
    if not isinstance(rows, Mapping) or not rows:
        raise UsageError(f"simulator rows: got {rows!r}, expected a non-empty mapping of split "
                         "name to a positive number of impressions")
    for name, n in rows.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise UsageError(f"simulator split name: got {name!r}, expected letters, digits, "
                             "'_', '-' or '.' (not starting with '.' or '-')")
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise UsageError(f"simulator rows[{name!r}]: got {n!r}, expected an integer >= 1")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"simulator seed: got {seed!r}, expected an integer >= 0")


def _iter_split(world: _World, name: str, n: int, seed: int) -> Iterator[Split]:
    """The chunks of one split, in order. Draws depend only on (seed, split name, n)."""
    key = _split_key(name)
    users, counts = _plan_split(world, n, np.random.default_rng(_seq(seed, 1, key, 0)))
    first = 1
    for i, (a, b) in enumerate(_chunks(counts)):
        rng = np.random.default_rng(_seq(seed, 1, key, i + 1))
        chunk = _generate_chunk(world, users[a:b], counts[a:b], first, rng)
        first += chunk.impressions.num_rows
        yield chunk


def simulate(cfg: SimConfig, rows: dict[str, int], seed: int) -> dict[str, Split]:
    """Simulate the splits ``rows`` (name -> impressions) of one world drawn from ``seed``.

    All splits share users, items and latent factors; each split's impressions are drawn
    independently, and depend only on (cfg, seed, split name, its row count).
    """
    _check_rows(rows)
    _check_seed(seed)
    world = _build_world(cfg, int(seed))
    out: dict[str, Split] = {}
    for name, n in rows.items():
        t0 = time.perf_counter()
        parts = list(_iter_split(world, name, int(n), int(seed)))
        if len(parts) == 1:
            out[name] = parts[0]
        else:
            out[name] = Split(
                impressions=pa.concat_tables([p.impressions for p in parts]).combine_chunks(),
                users=pa.concat_tables([p.users for p in parts]).combine_chunks(),
            )
        dt = time.perf_counter() - t0
        log.debug("split %s: %d impressions in %.2f s (%.0f rows/s)", name, n, dt,
                  n / max(dt, 1e-9))
    return out


# --------------------------------------------------------------------------------------------
# Statistics and writing


class _Stats:
    """Running rates of one split, accumulated chunk by chunk."""

    def __init__(self, n_items: int):
        self.n = 0
        self.clicks = 0
        self.conversions = 0
        self.conv_if_clicked = 0
        self.p_click = 0.0
        self.p_conv = 0.0
        self.p_conv_clicked = 0.0
        self.clickbait = 0
        self.len_210 = 0
        self.users = 0
        self.bag_len = dict.fromkeys(USER_BAG_FIELDS, 0)
        self.items_seen = np.zeros(n_items, dtype=bool)

    def add(self, part: Split, world: _World) -> None:
        imp = part.impressions
        click = imp.column("click").to_numpy()
        conv = imp.column("conversion").to_numpy()
        p_c = imp.column("p_click").to_numpy()
        p_v = imp.column("p_conversion").to_numpy()
        items = imp.column("205").to_numpy()
        self.n += imp.num_rows
        self.clicks += int(click.sum())
        self.conversions += int(conv.sum())
        self.conv_if_clicked += int(imp.column("conversion_if_clicked").to_numpy().sum())
        self.p_click += float(p_c.sum())
        self.p_conv += float(p_v.sum())
        self.p_conv_clicked += float(p_v[click == 1].sum())
        self.clickbait += int(world.item_bait[items].sum())
        self.len_210 += len(imp.column(ITEM_BAG_FIELD).combine_chunks().values)
        self.items_seen[items] = True
        self.users += part.users.num_rows
        for f in USER_BAG_FIELDS:
            self.bag_len[f] += len(part.users.column(f).combine_chunks().values)

    def as_dict(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return float(a / b) if b else None

        return {
            "impressions": self.n,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "ctr": ratio(self.clicks, self.n),
            "conversions_per_click": ratio(self.conversions, self.clicks),
            "ctcvr": ratio(self.conversions, self.n),
            "conversion_if_clicked_rate": ratio(self.conv_if_clicked, self.n),
            "mean_p_click": ratio(self.p_click, self.n),
            "mean_p_conversion": ratio(self.p_conv, self.n),
            "mean_p_conversion_clicked": ratio(self.p_conv_clicked, self.clicks),
            "clickbait_impression_share": ratio(self.clickbait, self.n),
            "n_users": self.users,
            "n_items": int(self.items_seen.sum()),
            "mean_bag_len": {
                **{f: ratio(v, self.users) for f, v in self.bag_len.items()},
                ITEM_BAG_FIELD: ratio(self.len_210, self.n),
            },
        }


def _overrides(cfg: SimConfig) -> dict[str, Any]:
    base = PRESETS.get(cfg.name)
    if base is None:
        return {}
    return {f: getattr(cfg, f) for f in _knob_names() if getattr(cfg, f) != getattr(base, f)}


def write_simulation(out_dir: str | Path, cfg: SimConfig, rows: dict[str, int], seed: int,
                     progress: bool = False) -> dict[str, Any]:
    """Simulate and write ``out_dir/<split>/impressions.parquet`` and ``users.parquet`` per
    split, plus ``out_dir/simulation.json`` (knobs, seed, rows, measured rates per split).

    Splits are generated and written chunk by chunk, so memory stays bounded for any size.
    Returns the content of simulation.json.
    """
    _check_rows(rows)
    _check_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = _build_world(cfg, int(seed))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(sum(rows.values())), unit="rows", desc="simulate")
    splits: dict[str, Any] = {}
    try:
        for name, n in rows.items():
            t_split = time.perf_counter()
            d = out / name
            d.mkdir(parents=True, exist_ok=True)
            stats = _Stats(cfg.n_items)
            imp_writer = users_writer = None
            try:
                for part in _iter_split(world, name, int(n), int(seed)):
                    if imp_writer is None:
                        imp_writer = pq.ParquetWriter(d / "impressions.parquet",
                                                      part.impressions.schema)
                        users_writer = pq.ParquetWriter(d / "users.parquet", part.users.schema)
                    # Row groups well under data.shuffle_buffer, so a streamed epoch mixes them.
                    imp_writer.write_table(part.impressions, row_group_size=_ROW_GROUP_ROWS)
                    users_writer.write_table(part.users)
                    stats.add(part, world)
                    if bar is not None:
                        bar.update(part.impressions.num_rows)
            finally:
                if imp_writer is not None:
                    imp_writer.close()
                if users_writer is not None:
                    users_writer.close()
            splits[name] = stats.as_dict()
            dt = time.perf_counter() - t_split
            log.info("simulated %s: %d impressions, ctr %.4f, conversions/click %.4f "
                     "(%.1f s, %.0f rows/s)", name, n, splits[name]["ctr"],
                     splits[name]["conversions_per_click"], dt, n / max(dt, 1e-9))
    finally:
        if bar is not None:
            bar.close()
    info: dict[str, Any] = {
        "generator": "esmm.data.simulate",
        "preset": cfg.name,
        "seed": int(seed),
        "rows": {k: int(v) for k, v in rows.items()},
        "overrides": _overrides(cfg),
        "config": dataclasses.asdict(cfg),
        "offsets": {"click": world.off_c, "conversion": world.off_v},
        "splits": splits,
    }
    write_text(out / "simulation.json", json.dumps(info, indent=2) + "\n")
    log.info("simulation written to %s in %.1f s", out, time.perf_counter() - t0)
    return info
