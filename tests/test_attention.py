"""DIN target attention over behaviour bags (``pooling: attention``): the unit against a
direct reading of the paper's formula, chunking, empty bags, config errors, the embedding
collection's once-per-user path, training, export and serving parity."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import esmm.export as ex
import esmm.nn.embedding as emb
from esmm.config import DataConfig, config_from_dict
from esmm.data.batches import make_batch
from esmm.data.tables import encode, read_tables
from esmm.errors import ConfigError
from esmm.features import spec_from_config
from esmm.models import build_model
from esmm.nn.attention import TargetAttention
from esmm.nn.embedding import EmbeddingCollection
from esmm.train import load_model, train
from tests.conftest import FEATURES, small_config


def attention_features(**attention):
    fs = [dict(f) for f in FEATURES]
    fs[4].update(pooling="attention", query="205")
    if attention:
        fs[4]["attention"] = attention
    return fs


def attention_config(train_path, eval_path=None, **attention):
    cfg = small_config(train_path, eval_path, max_steps=12)
    cfg["features"] = attention_features(**attention)
    return cfg


def _reference(unit, query, keys, offsets, rows):
    """The paper's formula read directly: one impression at a time, the MLP on the
    concatenation [q, k, q - k, q * k] (no decomposition, no padding, no chunks)."""
    out = []
    for n, r in enumerate(rows.tolist()):
        k = keys[offsets[r]:offsets[r + 1]]
        if len(k) == 0:
            out.append(torch.zeros(keys.shape[1], dtype=keys.dtype))
            continue
        q = query[n].expand_as(k)
        s = unit.rest(unit.first(torch.cat([q, k, q - k, q * k], dim=1))).squeeze(1)
        w = torch.softmax(s, 0) if unit.weights == "softmax" else s
        out.append((w.unsqueeze(1) * k).sum(0))
    return torch.stack(out)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, 5, 5, 12, 40, 41])  # bags of 5, 0, 7, 28, 1
    keys = torch.randn(41, 6, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 1, 2, 3, 3, 0, 1, 4, 2, 3])
    query = torch.randn(10, 6, generator=g, dtype=torch.float64)
    return query, keys, offsets, rows


@pytest.mark.parametrize("weights", ["none", "softmax"])
@pytest.mark.parametrize("chunk", [1, 30, 10**6])
def test_unit_equals_the_formula_chunked_or_padded(weights, chunk):
    torch.manual_seed(1)
    unit = TargetAttention(6, (12, 5), weights, chunk=chunk).double()
    query, keys, offsets, rows = _inputs()
    ref = _reference(unit, query, keys, offsets, rows)
    torch.testing.assert_close(unit(query, keys, offsets, rows), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(unit.padded(query, keys, offsets, rows), ref, atol=1e-12, rtol=0)
    assert ref[[1, 6]].abs().max() == 0  # the empty bag pools to zeros
    assert ref[[0, 2, 3]].abs().min() > 0


@pytest.mark.parametrize("weights", ["none", "softmax"])
def test_gradients_through_chunks_equal_the_formula(weights):
    """Chunked with recomputation (chunk=4: several chunks) gives the formula's gradients."""
    torch.manual_seed(2)
    unit = TargetAttention(6, (12, 5), weights, chunk=4).double()
    query, keys, offsets, rows = _inputs(3)
    grads = []
    for fn in (unit.forward, lambda *a: _reference(unit, *a)):
        q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        unit.zero_grad()
        (fn(q, k, offsets, rows) ** 2).sum().backward()
        grads.append([q.grad, k.grad, unit.first.weight.grad.clone(),
                      unit.rest[0].weight.grad.clone()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda q, k: unit(q, k, offsets, rows),
                                    (query.requires_grad_(), keys.requires_grad_()))


def test_chunks_bound_the_pairs():
    from esmm.nn.attention import _chunk_bounds

    lengths = torch.tensor([3, 0, 5, 2, 9, 1, 0, 4])
    bounds = _chunk_bounds(lengths, 6)
    assert bounds[0][0] == 0 and bounds[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    longest = int(lengths.max())
    for i, j in bounds:
        assert int(lengths[i:j].sum()) <= 6 + longest
    assert len(bounds) > 1
    assert _chunk_bounds(lengths, 1000) == [(0, 8)]


@pytest.mark.parametrize("weights", ["none", "softmax"])
def test_all_empty_bags_give_zeros_and_finite_gradients(weights):
    unit = TargetAttention(4, (8,), weights, chunk=3)
    q = torch.randn(5, 4, requires_grad=True)
    keys = torch.zeros(0, 4, requires_grad=True)
    offsets = torch.zeros(4, dtype=torch.int64)  # three empty bags
    rows = torch.tensor([0, 1, 2, 1, 0])
    for fn in (unit.forward, unit.padded):
        out = fn(q, keys, offsets, rows)
        assert out.shape == (5, 4) and out.abs().max() == 0
        (out.sum() + (q ** 2).sum()).backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None


def test_extreme_scores_stay_finite():
    """Huge embeddings: softmax weights stay finite and sum to one per bag."""
    torch.manual_seed(4)
    unit = TargetAttention(4, (8,), "softmax")
    query, keys, offsets, rows = (t.float() if t.is_floating_point() else t for t in _inputs())
    keys, query = keys[:, :4] * 1e4, query[:, :4] * 1e4
    keys.requires_grad_()
    out = unit(query, keys, offsets, rows)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(keys.grad).all()
    assert torch.isfinite(unit.padded(query, keys, offsets, rows)).all()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("change,words", [
    ({"query": None}, ["'109_14'", "no `query`"]),
    ({"query": "2055"}, ["'109_14'", "'2055'", "not a feature", "did you mean '205'"]),
    ({"query": "109_14"}, ["'109_14'", "multi_categorical", "expected a categorical"]),
    ({"query": "d1"}, ["'d1'", "dense", "expected a categorical"]),
    ({"dim": 4}, ["'109_14' (dim 4)", "'205' (dim 8)", "same dim"]),
    ({"pooling": "mean"}, ["'109_14'", "sets `query`", "'mean'"]),
    ({"attention": {"hidden": [8], "weigths": "none"}}, ["weigths"]),
    ({"attention": {"weights": "sparsemax"}}, ["weights", "softmax"]),
])
def test_config_errors_name_the_field(tmp_path, change, words):
    cfg = attention_config(tmp_path / "t.parquet")
    cfg["features"][4].update(change)
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_attention_on_a_single_id_field_is_refused(tmp_path):
    cfg = attention_config(tmp_path / "t.parquet")
    cfg["features"][2].update(pooling="attention", query="205")
    with pytest.raises(ConfigError, match="'206' is categorical: `pooling: attention` applies"):
        config_from_dict(cfg)


def test_configs_without_attention_dump_as_before(tmp_path):
    cfg = config_from_dict(small_config(tmp_path / "t.parquet"))
    assert all("query" not in f and "attention" not in f for f in cfg.to_dict()["features"])
    assert all("attention" not in f for f in spec_from_config(cfg).to_dict()["fields"])
    att = config_from_dict(attention_config(tmp_path / "t.parquet"))
    spec = spec_from_config(att)
    assert spec.to_dict()["fields"][4]["attention"] == {
        "query": "205", "hidden": (80, 40), "weights": "none", "chunk": 65536}
    assert type(spec).from_dict(spec.to_dict()) == spec


# ----------------------------------------------------------------------------- the collection


def _batch(normalized_data, cfg):
    spec = spec_from_config(cfg)
    raw = read_tables(str(normalized_data["valid"]), cfg.data)
    data = encode(raw, spec, cfg.data)
    return spec, data, make_batch(data, np.arange(300))


def test_user_bags_are_embedded_once_and_attended_per_impression(normalized_data,
                                                                 monkeypatch):
    cfg = config_from_dict(attention_config(normalized_data["train"], weights="softmax"))
    spec, data, batch = _batch(normalized_data, cfg)
    assert "109_14" in batch.user_bags and batch.user_index is not None
    torch.manual_seed(0)
    coll = EmbeddingCollection(spec, sparse=False).eval()
    seen = []
    real = emb._pool
    monkeypatch.setattr(emb, "_pool", lambda w, v, *a: seen.append(len(v)) or real(w, v, *a))
    with torch.no_grad():
        got = coll(batch)
    # Every element of the U users' bags is embedded once, not once per impression.
    user_nnz = len(batch.user_bags["109_14"][0])
    per_impression = int(batch.user_bags["109_14"][1].diff()[batch.user_index].sum())
    assert per_impression > 2 * user_nnz
    n_singles = sum(len(v) for v in batch.ids.values()) + sum(
        len(v) for v in batch.user_ids.values())
    assert seen == [n_singles + user_nnz]
    # Each impression: its user's bag attended with its own item's embedding.
    unit = coll.attention[0]
    w = coll.field_weight("109_14")
    q = coll.field_weight("205")[batch.ids["205"]]
    v, o = batch.user_bags["109_14"]
    start = 8 * [f.name for f in spec.sparse].index("109_14")
    for n in (0, 7, 150, 299):
        u = int(batch.user_index[n])
        keys = w[v[o[u]:o[u + 1]]]
        ref = _reference(unit, q[n:n + 1], keys, torch.tensor([0, len(keys)]), torch.tensor([0]))
        torch.testing.assert_close(got[n, start:start + 8], ref[0], atol=1e-6, rtol=0)


def test_mean_and_sum_fields_are_unchanged_by_an_attention_field(normalized_data):
    """The other fields' columns equal those of a collection without attention."""
    att = config_from_dict(attention_config(normalized_data["train"]))
    plain = config_from_dict(small_config(normalized_data["train"]))
    spec_a, _, batch = _batch(normalized_data, att)
    spec_p = spec_from_config(plain)
    torch.manual_seed(0)
    a = EmbeddingCollection(spec_a, sparse=False)
    torch.manual_seed(0)
    p = EmbeddingCollection(spec_p, sparse=False)
    with torch.no_grad():
        out_a, out_p = a(batch), p(batch)
    keep = np.r_[0:32, 40:41]  # every column but 109_14's (fields 101, 205, 206, 121; d1)
    torch.testing.assert_close(out_a[:, keep], out_p[:, keep], atol=0, rtol=0)
    assert not torch.allclose(out_a[:, 32:40], out_p[:, 32:40])


@pytest.mark.parametrize("sparse", [True, False])
def test_a_batch_of_empty_bags_trains_with_finite_gradients(normalized_data, sparse):
    tree = attention_config(normalized_data["train"], weights="softmax")
    if not sparse:
        tree["train"]["sparse_optimizer"] = {"name": "dense"}
    cfg = config_from_dict(tree)
    spec, data, batch = _batch(normalized_data, cfg)
    v, o = batch.user_bags["109_14"]
    batch.user_bags["109_14"] = (v[:0], torch.zeros_like(o))
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    assert model.embedding.sparse == sparse
    loss = model.total_loss(model.losses(model(batch), batch))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            assert torch.isfinite(g).all(), name


# ----------------------------------------------------------------------------- train, export


@pytest.fixture(scope="module")
def attention_run(normalized_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("attention") / "run"
    cfg = attention_config(normalized_data["train"], normalized_data["valid"],
                           hidden=[16, 8], chunk=2000)
    train(config_from_dict(cfg), d)
    return d


def test_training_moves_the_attention_unit(attention_run):
    model, cfg, spec, _ = load_model(attention_run)
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg, spec)
    trained = model.embedding.attention[0].first.weight
    assert trained.shape == (16, 32)
    assert not torch.allclose(trained, fresh.embedding.attention[0].first.weight)
    assert spec.fields[4].attention.hidden == (16, 8)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_parity_with_user_side_bags(attention_run, tmp_path, fmt):
    meta = ex.export_run(attention_run, fmt, tmp_path / f"m.{fmt}", parity_rows=300)
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    assert any("shared user fields" in r and "109_14" in r for r in meta["parity"]["row_sets"])
    fields = {f["name"]: f for f in meta["fields"]}
    assert fields["109_14"]["pooling"] == "attention" and fields["109_14"]["query"] == "205"
    pred = ex.load_artifact(tmp_path / f"m.{fmt}")
    # One user's bag shared by rows of different items, and the same bag given per row.
    rng = np.random.default_rng(0)
    items = rng.integers(0, 1500, 30).tolist()
    cols = {"205": items, "206": [i % 50 for i in items], "d1": rng.random(30).tolist()}
    user = {"101": 5, "121": 2, "109_14": [3, 14, 77, 3, 190]}
    shared = pred.predict_columns(cols, user)
    per_row = pred.predict_columns(cols | {k: [v] * 30 for k, v in user.items()})
    for k in shared:
        np.testing.assert_allclose(shared[k], per_row[k], atol=1e-6, rtol=0)
    assert np.ptp(shared["p_ctr"]) > 0
    empty = pred.predict_columns(cols, user | {"109_14": []})
    assert all(np.isfinite(v).all() for v in empty.values())
    assert not np.allclose(empty["p_ctr"], shared["p_ctr"])


def test_export_parity_check_sees_the_attention_unit(attention_run, tmp_path, monkeypatch):
    """An artifact whose attention unit differs from the trained one fails the check."""
    real = ex.build_export_module

    def corrupt(model, spec):
        module = real(model, spec)
        for m in module.modules():
            if isinstance(m, TargetAttention):
                m.rest[-1].bias.data += 0.5
        return module

    monkeypatch.setattr(ex, "build_export_module", corrupt)
    with pytest.raises(Exception, match="parity check failed"):
        ex.export_run(attention_run, "onnx", tmp_path / "m.onnx", parity_rows=100)
    assert not (tmp_path / "m.onnx").exists()


def test_flat_data_attention_matches_predict(flat_data, tmp_path):
    """Impression-side bags (flat data): eager predictions equal the artifact's."""
    cfg = attention_config(flat_data["train"], weights="softmax")
    train(config_from_dict(cfg), tmp_path / "run")
    model, cfg2, spec, _ = load_model(tmp_path / "run")
    head = pq.read_table(flat_data["valid"]).slice(0, 50)
    from esmm.data.tables import RawTables
    from esmm.evaluate import predict_arrays

    data = encode(RawTables("head", head), spec, DataConfig(user_column=None),
                  require_labels=False)
    ref = predict_arrays(model, data)
    ex.export_run(tmp_path / "run", "torchscript", tmp_path / "m.pt", parity_rows=64)
    got = ex.load_artifact(tmp_path / "m.pt").predict_columns(
        {f.name: head.column(f.name) for f in spec.fields})
    for k in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_artifact_scores_long_requests_in_row_chunks(attention_run, tmp_path, fmt):
    """Rows cut into runs of bounded (row, bag element) pairs score as in one call."""
    ex.export_run(attention_run, fmt, tmp_path / f"m.{fmt}", parity_rows=64)
    pred = ex.load_artifact(tmp_path / f"m.{fmt}")
    assert pred.attention_pairs == 2000  # the field's attention.chunk
    rng = np.random.default_rng(1)
    n = 200
    items = rng.integers(0, 1500, n).tolist()
    bags = [rng.integers(0, 200, k).tolist() for k in rng.integers(0, 30, n)]
    cols = {"205": items, "206": [i % 50 for i in items], "d1": rng.random(n).tolist(),
            "101": rng.integers(0, 300, n).tolist(), "121": rng.integers(0, 6, n).tolist(),
            "109_14": bags}
    user = {"101": 5, "121": 2, "109_14": rng.integers(0, 200, 40).tolist()}
    shared_cols = {k: v for k, v in cols.items() if k not in user}
    whole = [pred.run(pred.encode_columns(cols)),
             pred.run(pred.encode_columns(shared_cols, user))]
    pred.attention_pairs = 37
    per_row = pred.encode_columns(cols)
    assert len(pred.row_chunks(per_row)) > 10
    assert len(pred.row_chunks(pred.encode_columns(shared_cols, user))) == n  # 40 > 37
    chunked = [pred.run(per_row), pred.run(pred.encode_columns(shared_cols, user))]
    for a, b in zip(whole, chunked, strict=True):
        for k in a:
            assert b[k].shape == (n,)
            np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0)


def test_chunks_recompute_under_the_forward_autocast():
    """bf16 autocast: chunked gradients equal the one-chunk ones (the recomputation runs
    under the forward's autocast; outside it, it would mix bf16 and float32 inputs)."""
    torch.manual_seed(5)
    unit = TargetAttention(6, (12, 5), "none", chunk=4)
    query, keys, offsets, rows = (t.float() if t.is_floating_point() else t for t in _inputs())
    grads = []
    for chunk in (4, 10**6):
        unit.chunk = chunk
        k = keys.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unit(query, k, offsets, rows)
        out.float().sum().backward()
        grads.append(k.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)
