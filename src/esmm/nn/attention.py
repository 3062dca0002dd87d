"""Attention units: AITM's transfer attention (Xi et al., KDD 2021, arXiv 2105.08489) and
DIN's target attention over behaviour bags (Zhou et al., KDD 2018, arXiv 1706.06978)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class TransferAttention(nn.Module):
    """Fuse the information transferred from the previous task with the current task's own.

    With ``p`` = transfer(q_prev) and ``q`` = the current tower's hidden output, each (B, H):

        u in {p, q};  w_u = softmax_u(<h2(u), h3(u)> / sqrt(H));  z = sum_u w_u * h1(u)

    ``forward(q_prev, q)``: (B, H), (B, H) -> z (B, H) and the weights (B, 2) over (p, q).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.h1 = nn.Linear(dim, dim)
        self.h2 = nn.Linear(dim, dim)
        self.h3 = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, q_prev: torch.Tensor, q: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.stack([self.transfer(q_prev), q], dim=1)  # (B, 2, H)
        score = (self.h2(u) * self.h3(u)).sum(-1) * self.scale  # (B, 2)
        w = torch.softmax(score, dim=1)
        z = (w.unsqueeze(-1) * self.h1(u)).sum(1)  # (B, H)
        return z, w


class TargetAttention(nn.Module):
    """DIN target attention over a behaviour bag (Zhou et al., KDD 2018, arXiv 1706.06978).

    Each element ``k_j`` of an impression's bag is scored against the impression's query
    embedding ``q`` (its item) by an MLP, the paper's activation unit, and the bag pools to

        a(q, k_j) = MLP([q, k_j, q - k_j, q * k_j])   (PReLU hidden layers, one linear output)
        v = sum_j w_j * k_j,   w_j = a(q, k_j)                      (``weights: none``)
                               w_j = softmax_j a(q, k_j)            (``weights: softmax``)

    The paper's choice, ``none``, keeps the scores unnormalised so that the pooled vector's
    size says how much of a user's behaviour matches the item. An empty bag pools to zeros.

    The first layer is linear in [q, k, q - k, q * k], so it is computed as
    ``(W_q + W_d) q + b`` once per impression and ``[W_k - W_d, W_p] [k, q * k]`` per
    (impression, element) pair: the same function as the paper's layer, with half of its
    per-pair work. (Projecting each key once per de-duplicated bag row instead would save
    little, a user having about two impressions in a shuffled batch, and would hold a
    (bag elements, H) array and its gradient per chunk: the chunking would no longer bound
    the memory.)

    Two evaluation orders of the same function:

    * :meth:`forward` (training, evaluation) walks the pairs flat, without padding, at most
      ``chunk`` pairs (plus one impression's bag) at a time; with more than one chunk under
      autograd each chunk is recomputed in the backward pass rather than kept, so the
      activations held at once are bounded by the chunk whatever the batch and bag sizes.
    * :meth:`padded` (the exported graph) pads every impression's bag to the longest one of
      the call, which traces to TorchScript and ONNX with dynamic sizes.

    Args:
        dim: D, the embedding width of the bag and of the query.
        hidden: the MLP's hidden widths.
        weights: ``none`` or ``softmax``.
        chunk: pairs scored at once by :meth:`forward`.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (80, 40), weights: str = "none",
                 chunk: int = 65536) -> None:
        super().__init__()
        if weights not in ("none", "softmax"):
            raise ValueError(f"weights must be 'none' or 'softmax', got {weights!r}")
        self.dim = dim
        self.weights = weights
        self.chunk = chunk
        self.first = nn.Linear(4 * dim, hidden[0])
        layers: list[nn.Module] = [nn.PReLU()]
        for a, b in itertools.pairwise(hidden):
            layers += [nn.Linear(a, b), nn.PReLU()]
        layers.append(nn.Linear(hidden[-1], 1))
        self.rest = nn.Sequential(*layers)

    def _project(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's per-query term (N, H) and its per-pair weight (H, 2D) over
        [k, q * k]."""
        d = self.dim
        w = self.first.weight  # (H, 4D) over [q, k, q - k, q * k]
        w_q, w_k, w_d, w_p = w[:, :d], w[:, d:2 * d], w[:, 2 * d:3 * d], w[:, 3 * d:]
        a_q = torch.addmm(self.first.bias, query, (w_q + w_d).t())  # (N, H)
        return a_q, torch.cat([w_k - w_d, w_p], dim=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """Attend each impression's bag with its query.

        Args:
            query: (N, D) the impressions' query embeddings.
            keys: (nnz, D) the embeddings of the bags' elements, bag r owning
                ``keys[offsets[r]:offsets[r + 1]]`` (R bags: one per impression, or one per
                distinct user, embedded once).
            offsets: (R + 1,) int64 bag boundaries.
            rows: (N,) int64 bag of each impression.
        Returns:
            (N, D) pooled bags.
        """
        lengths = offsets.diff().index_select(0, rows)  # (N,)
        starts = offsets[:-1].index_select(0, rows)  # (N,)
        a_q, w_kp = self._project(query)
        bounds = _chunk_bounds(lengths, self.chunk)
        if len(bounds) == 1:
            return _attend_flat(self, query, a_q, keys, w_kp, starts, lengths)
        recompute = torch.is_grad_enabled()
        params = list(self.rest.parameters())
        outs = []
        for i, j in bounds:
            args = (query[i:j], a_q[i:j], keys, w_kp, starts[i:j], lengths[i:j])
            if recompute:
                outs.append(_RecomputedChunk.apply(self, *args, *params))
            else:
                outs.append(_attend_flat(self, *args))
        return torch.cat(outs)

    def padded(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` over bags padded to the longest of the call (export-friendly).

        Same arguments and result; holds (N, L, H) activations, L the longest bag.
        """
        lengths = (offsets[1:] - offsets[:-1]).index_select(0, rows)  # (N,)
        starts = offsets[:-1].index_select(0, rows)  # (N,)
        a_q, w_kp = self._project(query)
        j = torch.arange(lengths.max(), device=lengths.device)  # (L,)
        mask = j.unsqueeze(0) < lengths.unsqueeze(1)  # (N, L)
        pos = torch.where(mask, starts.unsqueeze(1) + j.unsqueeze(0), torch.zeros_like(mask,
                          dtype=torch.int64))  # (N, L), padding reads element 0
        # Gathers by the 2-D index, not a flat gather and a reshape: ONNX reads a 0 in a
        # reshape's shape (L = 0: every bag empty) as "keep this dimension".
        k = F.embedding(pos, keys)  # (N, L, D)
        h = a_q.unsqueeze(1) + torch.cat([k, query.unsqueeze(1) * k], dim=2) @ w_kp.t()
        s = self.rest(h).squeeze(-1)  # (N, L)
        if self.weights == "softmax":
            # A -inf column keeps the reduction defined when every bag of the call is empty.
            ninf = torch.full_like(query[:, :1], float("-inf"))  # (N, 1)
            top = torch.cat([s.masked_fill(~mask, float("-inf")), ninf], dim=1).amax(
                dim=1, keepdim=True)  # (N, 1)
            top = torch.where(lengths.unsqueeze(1) > 0, top, torch.zeros_like(top))
            e = torch.where(mask, torch.exp(s - top), torch.zeros_like(s))
            total = e.sum(dim=1, keepdim=True)
            w = e / torch.where(total > 0, total, torch.ones_like(total))
        else:
            w = torch.where(mask, s, torch.zeros_like(s))
        return (w.unsqueeze(-1) * k).sum(dim=1)  # (N, D)


class _RecomputedChunk(torch.autograd.Function):
    """:func:`_attend_flat` over one chunk, its activations recomputed in the backward pass.

    Only the inputs are kept (the query, its first-layer term, the shared keys and weight),
    so the memory of a batch's attention is one chunk's activations whatever its number of
    chunks. (``torch.utils.checkpoint``'s non-reentrant mode, measured on a 1.6M-pair batch,
    held on to every chunk's; its reentrant mode refuses ``torch.autograd.grad``.)
    """

    @staticmethod
    def forward(ctx, unit, query, a_q, keys, w_kp, starts, lengths, *params):  # noqa: D102
        ctx.unit = unit
        # The recomputation runs under the forward's autocast (train.precision), so that it
        # reproduces the forward's values.
        device = query.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device),
                        torch.is_autocast_enabled(device))
        ctx.save_for_backward(query, a_q, keys, w_kp, starts, lengths)
        with torch.no_grad():
            return _attend_flat(unit, query, a_q, keys, w_kp, starts, lengths)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        query, a_q, keys, w_kp, starts, lengths = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() for t in (query, a_q, keys, w_kp)]
        params = list(ctx.unit.rest.parameters())
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = _attend_flat(ctx.unit, *inputs, starts, lengths)
        grads = torch.autograd.grad(out, inputs + params, grad, allow_unused=True)
        return (None, *grads[:4], None, None, *grads[4:])


def _chunk_bounds(lengths: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """[(first, end)] runs of impressions holding at most ``chunk`` pairs each, plus the
    bag of the impression that crosses a boundary (a bag is never split)."""
    n = len(lengths)
    ends = lengths.cumsum(0)
    total = int(ends[-1]) if n else 0
    if total <= chunk:
        return [(0, n)]
    group = ((ends - lengths) // chunk).cpu()  # (N,) chunk of each impression's first pair
    cut = (torch.nonzero(group[1:] != group[:-1]).squeeze(1) + 1).tolist()
    edges = [0, *cut, n]
    return list(itertools.pairwise(edges))


def _attend_flat(unit: TargetAttention, query: torch.Tensor, a_q: torch.Tensor,
                 keys: torch.Tensor, w_kp: torch.Tensor, starts: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
    """The pooled bags of N impressions, over their T pairs laid flat.

    Args:
        query: (N, D); a_q: (N, H); keys: (nnz, D); w_kp: (H, 2D);
        starts, lengths: (N,) each impression's first element in ``keys`` and bag length.
    Returns:
        (N, D).
    """
    n = len(lengths)
    total = int(lengths.sum())
    out = query.new_zeros(n, query.shape[1])
    if total == 0:
        return out  # every bag empty
    seg = torch.repeat_interleave(torch.arange(n, device=lengths.device), lengths,
                                  output_size=total)  # (T,) impression of each pair
    first = (lengths.cumsum(0) - lengths).index_select(0, seg)
    pos = starts.index_select(0, seg) + torch.arange(total, device=seg.device) - first  # (T,)
    k = keys.index_select(0, pos)  # (T, D)
    h = torch.addmm(a_q.index_select(0, seg),
                    torch.cat([k, query.index_select(0, seg) * k], dim=1), w_kp.t())  # (T, H)
    s = unit.rest(h).squeeze(1)  # (T,)
    if unit.weights == "softmax":
        top = s.new_full((n,), float("-inf")).scatter_reduce(0, seg, s.detach(), "amax")
        e = torch.exp(s - top.index_select(0, seg))  # (T,), each bag's largest is exp(0)
        total_e = e.new_zeros(n).index_add(0, seg, e)  # >= 1 on every non-empty bag
        s = e / total_e.index_select(0, seg)
    return out.index_add(0, seg, s.unsqueeze(1) * k)  # (N, D)
