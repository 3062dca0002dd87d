import numpy as np
import pytest
import torch

from esmm.data.batches import make_batch
from esmm.data.tables import load_split
from esmm.features import spec_from_config
from esmm.models import OUTPUT_NAMES, build_model


@pytest.fixture()
def setup(flat_data, cfg_factory):
    def make(name):
        cfg = cfg_factory(flat_data["train"], overrides={"model.name": name})
        spec = spec_from_config(cfg)
        data = load_split(flat_data["train"], spec, cfg.data)
        torch.manual_seed(0)
        return build_model(cfg, spec), make_batch(data, np.arange(512)), data
    return make


@pytest.mark.parametrize("name", ["esmm", "esmm_ns", "base"])
def test_outputs_named_and_consistent(setup, name):
    model, batch, _ = setup(name)
    p = model.predict(model(batch))
    assert set(p) == set(OUTPUT_NAMES)
    for k in OUTPUT_NAMES:
        assert p[k].shape == (512,)
        assert ((p[k] >= 0) & (p[k] <= 1)).all()
    torch.testing.assert_close(p["p_ctcvr"], p["p_ctr"] * p["p_cvr"], rtol=1e-5, atol=1e-7)
    losses = model.losses(model(batch), batch)
    assert all(k.startswith("loss_") and torch.isfinite(v) for k, v in losses.items())


def _grad_norm(module):
    gs = [p.grad for p in module.parameters() if p.grad is not None]
    if not gs:
        return 0.0
    return float(sum((g.coalesce().values() if g.is_sparse else g).abs().sum() for g in gs))


def test_esmm_shares_embeddings_and_ctcvr_loss_reaches_them(setup):
    model, batch, _ = setup("esmm")
    assert model.cvr_embedding is None
    out = model(batch)
    model.losses(out, batch)["loss_ctcvr"].backward()
    assert _grad_norm(model.embedding) > 0
    assert _grad_norm(model.cvr_tower) > 0


def test_esmm_ns_does_not_share(setup):
    model, batch, _ = setup("esmm_ns")
    out = model(batch)
    model.losses(out, batch)["loss_ctr"].backward()
    assert _grad_norm(model.embedding) > 0
    assert _grad_norm(model.cvr_embedding) == 0.0  # CTR loss never touches the CVR embeddings


def test_base_cvr_loss_sees_clicked_rows_only(setup):
    model, batch, data = setup("base")
    clicked = batch.click.bool()
    assert 0 < int(clicked.sum()) < batch.size
    loss = model.losses(model(batch), batch)["loss_cvr"]
    # Change every feature of unclicked rows: the CVR loss must not move.
    other = make_batch(data, np.arange(512, 1024))
    for name in batch.ids:
        batch.ids[name] = torch.where(clicked, batch.ids[name], other.ids[name])
    batch.dense = torch.where(clicked[:, None], batch.dense, other.dense)
    loss2 = model.losses(model(batch), batch)["loss_cvr"]
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    # And BASE's two nets are independent: the CVR loss gives the CTR net no gradient.
    loss2.backward()
    assert _grad_norm(model.ctr_embedding) == 0.0 and _grad_norm(model.ctr_tower) == 0.0


def test_per_user_sharing_equals_flat_path(flat_data, normalized_data, cfg_factory):
    cfg = cfg_factory(flat_data["train"])
    spec = spec_from_config(cfg)
    flat = load_split(flat_data["train"], spec, cfg.data)
    norm = load_split(normalized_data["train"], spec, cfg.data)
    assert norm.user_row is not None and "109_14" in norm.user_bags and "109_14" in flat.bags
    rows = np.random.default_rng(0).permutation(flat.n)[:1000]
    bf, bn = make_batch(flat, rows), make_batch(norm, rows)
    assert len(bn.user_ids["101"]) < bn.size  # users really are embedded once per batch
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    of = model(bf)
    on = model(bn)
    for k in of:
        torch.testing.assert_close(of[k], on[k], rtol=0, atol=1e-6)
    lf = sum(model.losses(of, bf).values())
    lf.backward()
    gf = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
          for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(model.losses(on, bn).values()).backward()
    for n, p in model.named_parameters():
        if n in gf:
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(gf[n], g, rtol=1e-5, atol=1e-6)
