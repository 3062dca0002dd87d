"""RowSparseAdam against torch.optim.SparseAdam, the oracle it must equal."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from esmm.optim import RowSparseAdam


def _step(w: torch.nn.Parameter, ids: torch.Tensor, coef: torch.Tensor) -> None:
    w.grad = None
    (F.embedding(ids, w, sparse=True) * coef).sum().backward()


def test_equals_torch_sparse_adam_with_repeated_and_absent_rows():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(500, 8))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.SparseAdam([a], lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    ob = RowSparseAdam([b], lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    g = torch.Generator().manual_seed(1)
    touched = torch.zeros(500, dtype=torch.bool)
    for _ in range(25):
        # Skewed ids (many repeats within a step), most rows never drawn.
        ids = (torch.rand(300, generator=g) ** 4 * 400).long()
        touched[ids] = True
        coef = torch.randn(300, 8, generator=g)
        _step(a, ids, coef)
        _step(b, ids, coef)
        oa.step()
        ob.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ob.state[b][k], oa.state[a][k], rtol=1e-5, atol=1e-7)
    assert ob.state[b]["step"] == oa.state[a]["step"] == 25
    assert not touched[400:].any()
    assert torch.equal(b.detach()[~touched], a.detach()[~touched])  # untouched rows unchanged


def test_state_of_torch_sparse_adam_resumes_in_row_sparse_adam():
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.randn(100, 4))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.SparseAdam([a], lr=0.05)
    ids = torch.randint(0, 100, (64,))
    coef = torch.randn(64, 4)
    for _ in range(3):
        _step(a, ids, coef)
        oa.step()
    b.data.copy_(a.detach())
    ob = RowSparseAdam([b], lr=0.05)
    # Through bytes, as a checkpoint goes (a plain state_dict would share the moment tensors).
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    _step(a, ids, coef)
    oa.step()
    _step(b, ids, coef)
    ob.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dense_gradient_is_refused():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        RowSparseAdam([w]).step()


def test_gradient_of_distinct_sorted_rows_updates_as_torch_sparse_adam():
    # Such a gradient (the embedding collection's) is taken as it is, with no unique(); an
    # uncoalesced one with the same rows in another order must give the same step.
    torch.manual_seed(4)
    a = torch.nn.Parameter(torch.randn(50, 3))
    b = torch.nn.Parameter(a.detach().clone())
    c = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.SparseAdam([a], lr=0.1)
    ob, oc = RowSparseAdam([b], lr=0.1), RowSparseAdam([c], lr=0.1)
    rows = torch.tensor([1, 4, 9, 30])
    for _ in range(3):
        vals = torch.randn(4, 3)
        perm = torch.tensor([2, 0, 3, 1])
        a.grad = torch.sparse_coo_tensor(rows[None], vals, (50, 3), check_invariants=False)
        b.grad = torch.sparse_coo_tensor(rows[None], vals, (50, 3), check_invariants=False)
        c.grad = torch.sparse_coo_tensor(rows[perm][None], vals[perm], (50, 3),
                                         check_invariants=False)
        assert not b.grad.is_coalesced()
        for o in (oa, ob, oc):
            o.step()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
