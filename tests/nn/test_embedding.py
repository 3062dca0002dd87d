"""The fused embedding collection against a per-field reference computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esmm.data.batches import Batch
from esmm.features import FeatureSpec, FieldSpec
from esmm.nn.embedding import EmbeddingCollection

SPEC = FeatureSpec((
    FieldSpec("u", "categorical", 50, 4, "sum"),
    FieldSpec("item", "categorical", 300, 4, "sum"),
    FieldSpec("cat", "categorical", 20, 6, "sum"),  # another width: a second table
    FieldSpec("clicks", "multi_categorical", 80, 4, "sum"),
    FieldSpec("buys", "multi_categorical", 40, 4, "mean"),
    FieldSpec("tags", "multi_categorical", 30, 6, "mean"),
    FieldSpec("price", "dense", 1, 1, "sum"),
))
SIDES = {  # where each field's input sits in the batch
    "flat": {"ids": ["u", "item", "cat"], "bags": ["clicks", "buys", "tags"]},
    "users": {"ids": ["item", "cat"], "bags": ["tags"], "user_ids": ["u"],
              "user_bags": ["clicks", "buys"]},
}


def _bags(rng, n: int, buckets: int) -> list[list[int]]:
    # Empty bags included on purpose: they must pool to zeros.
    return [rng.integers(0, buckets, rng.integers(0, 6)).tolist() for _ in range(n)]


def _long_bags(rng, n: int, buckets: int) -> list[list[int]]:
    # Long bags over a few ids: every id repeats within a bag and across the rows of a batch.
    return [rng.integers(0, min(buckets, 4), rng.integers(0, 40)).tolist() for _ in range(n)]


def _ragged(bags: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offs = np.concatenate([[0], np.cumsum([len(b) for b in bags])])
    vals = np.array([v for b in bags for v in b], dtype=np.int64)
    return torch.from_numpy(vals), torch.from_numpy(offs.astype(np.int64))


def make_case(side: str, b: int = 64, seed: int = 0, few_ids: bool = False):
    """A batch with the fields placed as SIDES[side] says, and every row's raw inputs
    (``few_ids``: every field draws from at most 4 ids, bags up to 39 long)."""
    rng = np.random.default_rng(seed)
    bag_maker = _long_bags if few_ids else _bags
    fields = {f.name: f for f in SPEC.sparse}
    n_users = 9
    user_index = rng.integers(0, n_users, b)
    raw: dict[str, list] = {}  # field -> per-impression id or bag
    batch = Batch(size=b, dense=torch.from_numpy(rng.random((b, 1), dtype=np.float32)))
    place = SIDES[side]
    for name in place.get("ids", []):
        ids = rng.integers(0, min(fields[name].buckets, 4) if few_ids else fields[name].buckets,
                           b)
        batch.ids[name] = torch.from_numpy(ids)
        raw[name] = ids.tolist()
    for name in place.get("bags", []):
        bags = bag_maker(rng, b, fields[name].buckets)
        batch.bags[name] = _ragged(bags)
        raw[name] = bags
    if "user_ids" in place or "user_bags" in place:
        batch.user_index = torch.from_numpy(user_index)
    for name in place.get("user_ids", []):
        ids = rng.integers(0, min(fields[name].buckets, 4) if few_ids else fields[name].buckets,
                           n_users)
        batch.user_ids[name] = torch.from_numpy(ids)
        raw[name] = ids[user_index].tolist()
    for name in place.get("user_bags", []):
        bags = bag_maker(rng, n_users, fields[name].buckets)
        batch.user_bags[name] = _ragged(bags)
        raw[name] = [bags[u] for u in user_index]
    return batch, raw


def reference(coll: EmbeddingCollection, raw: dict, dense: torch.Tensor) -> np.ndarray:
    """Row by row in numpy float64: look each field's ids up in its own rows, pool, concat."""
    out = []
    for f in SPEC.sparse:
        w = coll.field_weight(f.name).detach().double().numpy()
        cols = []
        for x in raw[f.name]:
            if isinstance(x, list):
                e = w[x].sum(0) if x else np.zeros(w.shape[1])
                if f.pooling == "mean" and x:
                    e = e / len(x)
            else:
                e = w[x]
            cols.append(e)
        out.append(np.stack(cols))
    out.append(dense.double().numpy())
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("side", list(SIDES))
def test_output_equals_per_field_lookups(side):
    torch.manual_seed(0)
    coll = EmbeddingCollection(SPEC)
    batch, raw = make_case(side)
    got = coll(batch)
    assert got.shape == (batch.size, SPEC.input_dim) == (64, 4 * 4 + 6 * 2 + 1)
    np.testing.assert_allclose(got.detach().double().numpy(), reference(coll, raw, batch.dense),
                               rtol=1e-6, atol=1e-7)


def test_one_table_per_width_and_fields_own_disjoint_blocks():
    coll = EmbeddingCollection(SPEC)
    assert {k: tuple(w.shape) for k, w in coll.weights.items()} == {
        "dim4": (50 + 300 + 80 + 40, 4), "dim6": (20 + 30, 6)}
    for key, w in coll.weights.items():
        covered = torch.zeros(len(w), dtype=torch.int64)
        for f in SPEC.sparse:
            k, start = coll.field_rows[f.name]
            if k == key:
                assert coll.field_weight(f.name).shape == (f.buckets, f.dim)
                covered[start:start + f.buckets] += 1
        assert bool((covered == 1).all())  # every row belongs to exactly one field


@pytest.mark.parametrize("side", list(SIDES))
def test_gradient_reaches_exactly_the_rows_each_field_used(side):
    torch.manual_seed(1)
    coll = EmbeddingCollection(SPEC)
    batch, raw = make_case(side, seed=3)
    coef = torch.randn(SPEC.input_dim)
    (coll(batch) * coef).sum().backward()
    # Reference gradient: each impression adds coef's slice (divided by the bag length for
    # mean pooling) to the rows its ids point at, in its field's block.
    expect = {k: np.zeros(tuple(w.shape)) for k, w in coll.weights.items()}
    col = 0
    for f in SPEC.sparse:
        key, start = coll.field_rows[f.name]
        c = coef[col:col + f.dim].double().numpy()
        for x in raw[f.name]:
            ids = x if isinstance(x, list) else [x]
            for i in ids:
                expect[key][start + i] += c / (len(ids) if f.pooling == "mean" else 1)
        col += f.dim
    for key, w in coll.weights.items():
        assert w.grad.is_sparse
        np.testing.assert_allclose(w.grad.to_dense().double().numpy(), expect[key],
                                   rtol=1e-5, atol=1e-6)


def test_dense_gradients_when_not_sparse():
    coll = EmbeddingCollection(SPEC, sparse=False)
    batch, _ = make_case("users")
    coll(batch).sum().backward()
    assert all(not w.grad.is_sparse for w in coll.tables())


def test_per_field_checkpoints_load_into_the_fused_tables():
    torch.manual_seed(2)
    src = EmbeddingCollection(SPEC)
    old = {f"tables.{f.name}.weight": src.field_weight(f.name).detach().clone()
           for f in SPEC.sparse}
    dst = EmbeddingCollection(SPEC)
    dst.load_state_dict(old)
    # Inside a model, under the module's prefix, as a checkpoint holds them.
    parent = torch.nn.ModuleDict({"embedding": EmbeddingCollection(SPEC)})
    parent.load_state_dict({f"embedding.{k}": v for k, v in old.items()})
    for f in SPEC.sparse:
        for got in (dst, parent["embedding"]):
            torch.testing.assert_close(got.field_weight(f.name), src.field_weight(f.name),
                                       rtol=0, atol=0)


def test_missing_field_is_named():
    coll = EmbeddingCollection(SPEC)
    batch, _ = make_case("users")
    del batch.user_ids["u"]
    with pytest.raises(KeyError, match="'u'"):
        coll(batch)


def test_a_seed_gives_the_initial_weights_of_one_table_per_field():
    # The reference: one nn.Embedding per field in spec order, re-initialised at std 0.01.
    torch.manual_seed(11)
    ref = {}
    for f in SPEC.sparse:
        emb = torch.nn.Embedding(f.buckets, f.dim)
        torch.nn.init.normal_(emb.weight, std=0.01)
        ref[f.name] = emb.weight.detach()
    torch.manual_seed(11)
    coll = EmbeddingCollection(SPEC)
    for f in SPEC.sparse:
        torch.testing.assert_close(coll.field_weight(f.name), ref[f.name], rtol=0, atol=0)


class PerFieldReference(torch.nn.Module):
    """One table per field, looked up per impression with torch's own sparse embedding ops:
    the layout and gradient path the fused collection replaces."""

    def __init__(self, coll: EmbeddingCollection, sparse: bool) -> None:
        super().__init__()
        self.sparse = sparse
        self.w = torch.nn.ParameterDict({
            f.name: torch.nn.Parameter(coll.field_weight(f.name).detach().clone())
            for f in SPEC.sparse})

    def forward(self, raw: dict, dense: torch.Tensor) -> torch.Tensor:
        cols = []
        for f in SPEC.sparse:
            x = raw[f.name]
            if isinstance(x[0], list):
                v, o = _ragged(x)
                cols.append(torch.nn.functional.embedding_bag(
                    v, self.w[f.name], o, mode=f.pooling, sparse=self.sparse,
                    include_last_offset=True))
            else:
                cols.append(torch.nn.functional.embedding(torch.tensor(x), self.w[f.name],
                                                          sparse=self.sparse))
        return torch.cat([*cols, dense], dim=1)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("side", list(SIDES))
def test_training_steps_with_repeated_ids_equal_the_per_field_reference(side, sparse):
    # Few distinct ids and long bags: a row is used many times within a bag, across the
    # impressions of a batch and across fields' bags, the case the de-duplicated gradient
    # handles differently from one gradient row per use.
    from esmm.optim import RowSparseAdam

    torch.manual_seed(5)
    coll = EmbeddingCollection(SPEC, sparse=sparse)
    ref = PerFieldReference(coll, sparse)
    adam = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-7)
    if sparse:
        opt, ref_opt = RowSparseAdam(coll.tables(), **adam), torch.optim.SparseAdam(
            ref.parameters(), **adam)
    else:
        opt, ref_opt = torch.optim.Adam(coll.tables(), **adam), torch.optim.Adam(
            ref.parameters(), **adam)
    for step in range(4):
        batch, raw = make_case(side, b=48, seed=10 + step, few_ids=True)
        coef = torch.randn(SPEC.input_dim)
        got, want = coll(batch), ref(raw, batch.dense)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
        (got * coef).sum().backward()
        (want * coef).sum().backward()
        opt.step()
        ref_opt.step()
    for f in SPEC.sparse:
        torch.testing.assert_close(coll.field_weight(f.name), ref.w[f.name], rtol=1e-5,
                                   atol=1e-6)
    # Only the first 4 ids of each field were ever drawn: the other rows never moved.
    torch.manual_seed(5)
    fresh = EmbeddingCollection(SPEC, sparse=sparse)
    for f in SPEC.sparse:
        assert torch.equal(coll.field_weight(f.name)[4:], fresh.field_weight(f.name)[4:])


@pytest.mark.parametrize("side", list(SIDES))
def test_sparse_gradient_holds_each_used_row_once(side):
    coll = EmbeddingCollection(SPEC)
    batch, raw = make_case(side, seed=4, few_ids=True)
    coll(batch).sum().backward()
    for key, w in coll.weights.items():
        used = set()
        for f in SPEC.sparse:
            k, start = coll.field_rows[f.name]
            if k == key:
                for x in raw[f.name]:
                    used.update(start + i for i in (x if isinstance(x, list) else [x]))
        # Sorted and distinct: the optimizer takes the rows as they are, with no unique().
        assert w.grad._indices()[0].tolist() == sorted(used)


@pytest.mark.parametrize("side", list(SIDES))
def test_inference_forward_equals_the_training_forward(side):
    coll = EmbeddingCollection(SPEC)
    batch, _ = make_case(side, seed=6, few_ids=True)
    with torch.no_grad():
        plain = coll(batch)
    assert torch.equal(coll(batch).detach(), plain)


def test_a_batch_of_empty_bags_pools_to_zeros_and_gives_an_empty_gradient():
    spec = FeatureSpec((FieldSpec("tags", "multi_categorical", 30, 4, "mean"),))
    coll = EmbeddingCollection(spec)
    batch = Batch(size=3)
    batch.bags["tags"] = (torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    out = coll(batch)
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert coll.weights["dim4"].grad._nnz() == 0
