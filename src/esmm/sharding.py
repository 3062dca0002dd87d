"""Embedding tables sharded across ranks with TorchRec (``model.sharding: torchrec``).

With ``model.sharding: none`` every rank holds every table (:mod:`esmm.distributed`). With
``torchrec`` each :class:`esmm.nn.embedding.EmbeddingCollection` of the model is replaced by a
:class:`ShardedEmbeddingCollection`: its tables (one per embedding width, the same rows and
state-dict keys) live in a TorchRec ``EmbeddingBagCollection`` wrapped in
``DistributedModelParallel`` and split across the ranks, ``row_wise`` (each table cut into
contiguous row ranges, one per rank) or ``table_wise`` (whole tables placed on ranks, the
largest first on the least-loaded rank). The towers stay replicated and data parallel: their
gradients are summed by :class:`esmm.distributed.GradientSync` as without sharding.

Per step, each rank sends the ids of its batch to the ranks owning their rows, the owners pool
them and send the pooled rows back (forward), the pooled rows' gradients go to the owners and
each owner updates its rows with FBGEMM's optimizer fused into the backward pass
(``train.sparse_optimizer``: ``sgd`` -> ``EXACT_SGD``, ``adagrad`` -> ``EXACT_ADAGRAD``,
``sparse_adam`` -> ``ADAM``, a CUDA path: FBGEMM's CPU kernels have no Adam). TorchRec divides
the embedding gradients by the number of ranks by default (to match DDP's mean); that is turned
off here because esmm's losses are each rank's share of the global batch's loss, whose gradient
is the **sum** over ranks.

Checkpoints are ordinary: at a save every rank sends its shards to rank 0, which writes the
whole tables under the keys of the unsharded model (``embedding.weights.dim18``), so
``evaluate``, ``export`` and ``serve`` load them in one process without TorchRec. Rank 0 then
holds one whole table at a time beside its shard; loading (``--resume``, the best checkpoint at
the end) reads whole tables on every rank and keeps each rank's rows.

Initial tables do not come from the global random stream (which would need the whole table on
every rank): rows are drawn N(0, 0.01^2) in fixed blocks of :data:`INIT_BLOCK_ROWS`, each block
from its own generator seeded by ``train.seed``, the collection, the table and the block, so the
initial weights are the same for any number of ranks and either sharding type and each rank
draws only the blocks it holds.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esmm.config import Config
from esmm.errors import ConfigError
from esmm.features import FeatureSpec, FieldSpec

log = logging.getLogger(__name__)

__all__ = ["INIT_BLOCK_ROWS", "INSTALL", "ShardedEmbeddingCollection", "build_sharded_model",
           "check_sharding", "finish_forwards", "gather_sharded", "initial_state",
           "load_sharded_optimizer", "sharded_collections"]

# Versions: fbgemm-gpu-cpu 1.8.0 is the FBGEMM release built against torch 2.13 (1.9.0 fails to
# load with it: an undefined libtorch symbol); torchrec 1.8.0 is its release. torchrec declares
# the CUDA ``fbgemm-gpu`` as a dependency, hence ``--no-deps`` for it.
INSTALL = "pip install 'esmm[torchrec]' && pip install --no-deps torchrec==1.8.0"

INIT_BLOCK_ROWS = 65536
_HOLDER = "ebc"  # the attribute of the TorchRec module in _Holder


def check_sharding(cfg: Config) -> None:
    """Refuse a sharded config that cannot run here (one line, before any work): TorchRec
    missing, or an embedding optimizer FBGEMM has no fused form of on this device."""
    mc, so = cfg.model, cfg.train.sparse_optimizer
    if mc.sharding == "none":
        return
    _import_torchrec()
    if so.name == "dense":
        raise ConfigError("train.sparse_optimizer.name=dense: with model.sharding=torchrec the "
                          "tables are updated by TorchRec's fused optimizer; expected sgd, "
                          "adagrad or sparse_adam (CUDA)")
    device = str(cfg.train.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if so.name == "sparse_adam" and not device.startswith("cuda"):
        raise ConfigError(f"train.sparse_optimizer.name=sparse_adam with model.sharding=torchrec "
                          f"on train.device={device}: FBGEMM's CPU kernels have no Adam; "
                          "expected adagrad or sgd (or train.device=cuda)")


def _import_torchrec() -> None:
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as e:
        line = next((s for s in str(e).splitlines() if s.strip()), type(e).__name__)
        raise ConfigError(f"model.sharding=torchrec needs TorchRec and FBGEMM, which do not "
                          f"import here ({line}); install them with: {INSTALL}") from None


def _tiny_spec(spec: FeatureSpec) -> FeatureSpec:
    """``spec`` with one bucket per sparse field: the towers' shapes without the tables."""
    fields = tuple(f if f.kind == "dense" else FieldSpec(
        f.name, f.kind, 1, f.dim, f.pooling, f.dtype) for f in spec.fields)
    return FeatureSpec(fields, spec.hash_version)


def build_sharded_model(cfg: Config, spec: FeatureSpec, ctx: Any) -> nn.Module:
    """``cfg.model`` with its embedding collections sharded across the ranks of ``ctx``.

    The model is built with one-row tables (the towers get their seeded initial weights
    without any rank allocating a whole table), then each collection is replaced by a
    :class:`ShardedEmbeddingCollection` of the real spec.
    """
    from esmm.models import build_model
    from esmm.nn.embedding import EmbeddingCollection

    check_sharding(cfg)
    if not ctx.active:
        raise ConfigError("model.sharding=torchrec shards tables across torch.distributed "
                          "ranks: run `esmm train --nproc N` or under torchrun")
    from torchrec.distributed import comm_ops

    # esmm's rank losses are shares of the global loss: the global gradient is the sum.
    comm_ops.set_gradient_division(False)
    model = build_model(cfg, _tiny_spec(spec))
    names = [n for n, m in model.named_modules() if isinstance(m, EmbeddingCollection)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, attr)
        setattr(owner, attr, ShardedEmbeddingCollection(
            spec, cfg, ctx, name=name, sparse=old.sparse))
    # Tables outside an embedding collection were built with the one-row spec: refuse them.
    other = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if other or not names:
        what = f"embedding tables outside esmm's embedding collection ({other})" if other \
            else "no embedding collection"
        raise ConfigError(f"model.sharding=torchrec: model {cfg.model.name!r} has {what}; it "
                          "trains with model.sharding=none only")
    return model.to(ctx.device)


def initial_state(cfg: Config, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """The weights a sharded run of ``cfg`` starts from, whole, computed in one process
    (towers from ``train.seed`` as :func:`build_sharded_model` draws them, tables block by
    block): the start of an unsharded run that should follow the sharded one."""
    from esmm.models import build_model
    from esmm.nn.embedding import EmbeddingCollection

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, _tiny_spec(spec))
    state = {k: v for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if not isinstance(m, EmbeddingCollection):
            continue
        with torch.device("meta"):  # the table shapes only
            full = EmbeddingCollection(spec, sparse=m.sparse)
        for key, w in full.weights.items():
            rows, width = w.shape
            blocks = [_init_block(cfg.train.seed, name, key, b, width, rows)
                      for b in range(-(-rows // INIT_BLOCK_ROWS))]
            state[f"{name}.weights.{key}"] = torch.cat(blocks)
    return state


class ShardedEmbeddingCollection(nn.Module):
    """:class:`esmm.nn.embedding.EmbeddingCollection` whose tables are sharded with TorchRec.

    The same inputs, output ((B, spec.input_dim): fields in spec order, then dense values) and
    state-dict keys (``weights.dimD``, whole tables, read through :func:`gather_sharded` and
    ``load_state_dict``). Each table is one TorchRec table of the same rows, fed by one
    feature: the table's bags of the batch (single ids as bags of one, field ids shifted to
    their field's rows, as the unsharded collection lays them out), all pooled by sum; mean
    bags are divided by their length afterwards (an empty bag stays zero).

    Every forward is a collective. Every rank pads its bags to the largest count of any rank
    (row-wise sharding reduces the pooled rows with equal-sized collectives), learnt with one
    all-reduce of two integers, which also tells whether any rank still runs forwards: a rank
    that has finished an uneven share of the evaluation rows keeps the others company with
    empty forwards in :func:`finish_forwards`.

    Args:
        spec: the feature spec; cfg: the run's config (model.sharding_type, train.seed,
            train.sparse_optimizer); ctx: the :class:`esmm.distributed.DistContext`;
        name: this collection's path in the model (seeds its initial rows).
    """

    def __init__(self, spec: FeatureSpec, cfg: Config, ctx: Any, name: str,
                 sparse: bool = True) -> None:
        super().__init__()
        from esmm.nn.embedding import EmbeddingCollection

        self.spec, self.sparse, self.name = spec, sparse, name
        # The unsharded collection's layout (field rows, input plans) without its tables.
        with torch.device("meta"):
            layout = EmbeddingCollection(spec, sparse=sparse)
        object.__setattr__(self, "_layout", layout)  # not a child: its tables are on meta
        self._names = layout._names
        self.field_rows = layout.field_rows
        self.output_dim = layout.output_dim
        self._shapes = {k: tuple(w.shape) for k, w in layout.weights.items()}
        self._ctx = ctx
        self.bytes_sent = 0  # what this rank put into the embedding collectives
        # Not registered as a child: its sharded tables are no torch parameters of the model
        # (the fused optimizer updates them) and reach checkpoints through gather_sharded.
        object.__setattr__(self, "_dmp", _shard(self._shapes, cfg, ctx))
        self._init_rows(cfg.train.seed)

    # ------------------------------------------------------------------------- tables

    def local_shards(self) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
        """This rank's rows: table key -> [(first row, first column, (rows, cols) view)]."""
        out: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        for k, st in self._dmp.state_dict().items():
            key = k.split(".")[-2]
            out[key] = [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor)
                        for s in st.local_shards()]
        return out

    def sharded_tensors(self) -> dict[str, Any]:
        """Table key -> TorchRec's ShardedTensor of the table."""
        return {k.split(".")[-2]: st for k, st in self._dmp.state_dict().items()}

    @torch.no_grad()
    def _init_rows(self, seed: int) -> None:
        """N(0, 0.01^2) rows, block by block (see the module docstring)."""
        for key, shards in self.local_shards().items():
            width = self._shapes[key][1]
            for r0, c0, t in shards:
                n, d = t.shape
                first, last = r0 // INIT_BLOCK_ROWS, (r0 + n - 1) // INIT_BLOCK_ROWS
                for b in range(first, last + 1):
                    block = _init_block(seed, self.name, key, b, width,
                                        self._shapes[key][0])  # (rows of block, width)
                    lo, hi = max(r0, b * INIT_BLOCK_ROWS), min(r0 + n, (b + 1) * INIT_BLOCK_ROWS)
                    t[lo - r0:hi - r0].copy_(
                        block[lo - b * INIT_BLOCK_ROWS:hi - b * INIT_BLOCK_ROWS, c0:c0 + d])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Whole tables ``prefix + weights.dimD`` in, this rank's rows kept."""
        shards = self.local_shards()
        for key, shape in self._shapes.items():
            full = state_dict.get(f"{prefix}weights.{key}")
            if full is None:
                missing_keys.append(f"{prefix}weights.{key}")
                continue
            if tuple(full.shape) != shape:
                error_msgs.append(f"{prefix}weights.{key}: shape {tuple(full.shape)}, expected "
                                  f"{shape}")
                continue
            with torch.no_grad():
                for r0, c0, t in shards.get(key, []):
                    t.copy_(full[r0:r0 + t.shape[0], c0:c0 + t.shape[1]])
        own = {f"{prefix}weights.{k}" for k in self._shapes}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own)

    # ------------------------------------------------------------------------- forward

    def forward(self, batch) -> torch.Tensor:
        """(B, input_dim): sparse fields in spec order, then ``batch.dense``."""
        plans, inputs = {}, {}
        for key, names in self._names.items():
            plans[key] = self._layout._plan(names, batch)
            inputs[key] = plans[key].tensors(self._ctx.device)  # values, sum/mean offsets
        counts = {k: len(so) + len(mo) - 2 for k, (_, so, mo) in inputs.items()}
        stride = self._agree(max(counts.values()), active=True)
        pooled = self._pooled(inputs, counts, stride)  # key -> (bags, D)
        by_field: dict[str, torch.Tensor] = {}
        for key, plan in plans.items():
            for side in ("own", "user"):
                for group, e in plan.blocks(side, pooled[key]):  # (N, k, D)
                    if side == "user":
                        e = e.index_select(0, batch.user_index)  # (U, k, D) -> (B, k, D)
                    by_field.update(zip(group, e.unbind(1), strict=True))
        parts = [by_field[f.name] for f in self.spec.sparse]
        if batch.dense is not None:
            parts.append(batch.dense)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _agree(self, stride: int, active: bool) -> int:
        """The largest bag count of any rank this round, 0 when no rank is still active."""
        t = torch.tensor([stride, int(active)], dtype=torch.int64, device=self._ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) if int(t[1]) else 0

    def _pooled(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                counts: dict[str, int], stride: int) -> dict[str, torch.Tensor]:
        """One TorchRec lookup of every table: key -> (counts[key], D) pooled rows."""
        from torchrec import KeyedJaggedTensor

        keys = list(inputs)
        device = self._ctx.device
        lengths, values = [], []
        for key in keys:
            v, so, mo = inputs[key]
            pad = torch.zeros(stride - counts[key], dtype=torch.int64, device=device)
            lengths.append(torch.cat([so.diff(), mo.diff(), pad]))
            values.append(v)
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                stride=stride)
        self._count_bytes(kjt, stride)
        if torch.is_inference_mode_enabled():
            # FBGEMM registers its CPU lookups under the autograd keys only, which inference
            # mode skips; plain no-grad mode reaches them and records nothing either.
            with torch.inference_mode(False), torch.no_grad():
                out = self._dmp(kjt).to_dict()
        else:
            out = self._dmp(kjt).to_dict()
        pooled = {}
        for key in keys:
            _, so, mo = inputs[key]
            n_sum = len(so) - 1
            p = out[key][:counts[key]]  # (bags, D) sums
            if len(mo) > 1:
                n = mo.diff().clamp(min=1).to(p.dtype)[:, None]  # (n_mean, 1)
                p = torch.cat([p[:n_sum], p[n_sum:] / n])
            pooled[key] = p
        return pooled

    def _count_bytes(self, kjt: Any, stride: int) -> None:
        """What this rank puts into the embedding collectives of one step: its ids and bag
        lengths (8 bytes each) to the owners, then pooled rows (4 x D bytes per bag and table)
        forward and their gradients backward; other ranks' shares of that are sent likewise."""
        if self._ctx.world == 1:
            return  # one rank: TorchRec's collectives move nothing
        pooled = sum(stride * self._shapes[k][1] * 4 for k in self._shapes)
        self.bytes_sent += (kjt.values().numel() + kjt.lengths().numel()) * 8 + 2 * pooled

    def empty_forward(self, stride: int) -> None:
        """A forward with no ids, padded to ``stride`` bags: this rank's part of the others'
        lookups once its own forwards are done (:func:`finish_forwards`)."""
        zero = torch.zeros(1, dtype=torch.int64, device=self._ctx.device)
        empty = {k: (zero[:0], zero, zero) for k in self._names}
        with torch.no_grad():
            self._pooled(empty, dict.fromkeys(self._names, 0), stride)


def _init_block(seed: int, name: str, key: str, block: int, width: int,
                rows: int) -> torch.Tensor:
    """Block ``block`` of table ``key`` of collection ``name``: (<= INIT_BLOCK_ROWS, width)."""
    g = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(f"{name}/{key}".encode()) * 65_537 + block) % (2**63))
    n = min(INIT_BLOCK_ROWS, rows - block * INIT_BLOCK_ROWS)
    return torch.empty(n, width).normal_(std=0.01, generator=g)


def _fused_params(cfg: Config) -> dict[str, Any]:
    """FBGEMM's optimizer for ``train.sparse_optimizer`` (checked by check_sharding)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    so, oc = cfg.train.sparse_optimizer, cfg.train.optimizer
    lr = so.lr or oc.lr
    if so.name == "sgd":
        return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr}
    if so.name == "adagrad":
        # torch.optim.Adagrad's eps and initial accumulator, which the unsharded path uses.
        return {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": lr, "eps": 1e-10}
    return {"optimizer": EmbOptimType.ADAM, "learning_rate": lr, "eps": oc.eps,
            "beta1": oc.betas[0], "beta2": oc.betas[1]}


def _plan(tables: dict[str, tuple[int, int]], kind: str, world: int) -> dict[str, Any]:
    """Table key -> TorchRec parameter-sharding generator.

    ``row_wise``: every table over every rank. ``table_wise``: largest tables first, each on
    the rank holding the fewest bytes so far. The plan is written by hand: TorchRec's planner
    offers no row-wise sharding on a CPU topology, though its row-wise kernels run there.
    """
    from torchrec.distributed.sharding_plan import row_wise, table_wise

    if kind == "row_wise":
        return {k: row_wise(compute_kernel="fused") for k in tables}
    load = [0] * world
    out = {}
    for k in sorted(tables, key=lambda k: -tables[k][0] * tables[k][1]):
        r = min(range(world), key=lambda i: load[i])
        load[r] += tables[k][0] * tables[k][1]
        out[k] = table_wise(rank=r, compute_kernel="fused")
    return out


class _Holder(nn.Module):
    """The module DistributedModelParallel shards: one EmbeddingBagCollection."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: Any) -> Any:
        return self.ebc(kjt)


def _shard(shapes: dict[str, tuple[int, int]], cfg: Config, ctx: Any) -> nn.Module:
    """The tables as a TorchRec EmbeddingBagCollection in DistributedModelParallel."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingPlan

    class _NoDataParallel(DataParallelWrapper):
        """The holder has no dense parameters; the towers are synced by GradientSync."""

        def wrap(self, dmp: Any, env: Any, device: torch.device) -> None:
            pass

    # On the meta device: DistributedModelParallel allocates each rank's shards only.
    holder = _Holder(EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=k, embedding_dim=d, num_embeddings=n, feature_names=[k],
                           pooling=PoolingType.SUM) for k, (n, d) in shapes.items()],
        device=torch.device("meta")))
    sharder = EmbeddingBagCollectionSharder(fused_params=_fused_params(cfg))
    plan = ShardingPlan({_HOLDER: construct_module_sharding_plan(
        getattr(holder, _HOLDER), _plan(shapes, cfg.model.sharding_type, ctx.world),
        sharder=sharder, local_size=ctx.world, world_size=ctx.world,
        device_type=ctx.device.type)})
    dmp = DistributedModelParallel(holder, device=ctx.device, plan=plan, sharders=[sharder],
                                   data_parallel_wrapper=_NoDataParallel())
    log.info("embedding tables sharded %s over %d ranks: %s", cfg.model.sharding_type,
             ctx.world, {k: list(v) for k, v in shapes.items()})
    return dmp


# ----------------------------------------------------------------------------- the Trainer's calls


def sharded_collections(model: nn.Module) -> list[tuple[str, ShardedEmbeddingCollection]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardedEmbeddingCollection)]


def finish_forwards(model: nn.Module) -> None:
    """After a rank's last forward of an evaluation: empty forwards, round after round, while
    any rank still runs forwards of its own (evaluation shares differ by up to a batch).

    A round mirrors one model forward: each collection in the order the models call them (the
    order they are registered in, CTR side first), each agreeing on its bag count first.
    """
    found = [m for _, m in sharded_collections(model)]
    while found:
        for m in found:
            stride = m._agree(0, active=False)
            if not stride:
                return  # no rank is running forwards
            m.empty_forward(stride)


def _gather(meta: Any, local: dict[tuple[int, int], torch.Tensor],
            rank: int) -> torch.Tensor | None:
    """A sharded (rows, D) tensor whole on rank 0 (None elsewhere), shard by shard: rank 0
    holds the whole tensor and one shard in flight, no other rank more than its own shards.

    Args:
        meta: the ShardedTensor metadata (every shard's offsets, sizes and rank).
        local: this rank's shards by (first row, first column).
    """
    full = torch.empty(tuple(meta.size), dtype=meta.tensor_properties.dtype) if rank == 0 else None
    for sm in sorted(meta.shards_metadata, key=lambda m: tuple(m.shard_offsets)):
        owner = sm.placement.rank()
        (r0, c0), (n, d) = sm.shard_offsets, sm.shard_sizes
        if owner == rank == 0:
            full[r0:r0 + n, c0:c0 + d].copy_(local[(r0, c0)])
        elif rank == 0:
            buf = torch.empty(n, d, dtype=full.dtype)
            dist.recv(buf, src=owner)
            full[r0:r0 + n, c0:c0 + d].copy_(buf)
        elif owner == rank:
            dist.send(local[(r0, c0)].reshape(n, d).contiguous().cpu(), dst=0)
    return full


def _local(st: Any) -> dict[tuple[int, int], torch.Tensor]:
    return {tuple(s.metadata.shard_offsets): s.tensor for s in st.local_shards()}


def _optimizer_states(m: ShardedEmbeddingCollection) -> dict[str, dict[str, Any]]:
    """This rank's FBGEMM optimizer states shaped like their table: key -> name -> sharded.
    A rank lists only the tables it holds rows of."""
    out: dict[str, dict[str, Any]] = {}
    for pkey, states in m._dmp.fused_optimizer.state_dict()["state"].items():
        key = pkey.split(".")[-2]
        for sname, st in states.items():
            if hasattr(st, "local_shards") and tuple(st.metadata().size) == m._shapes[key]:
                out.setdefault(key, {})[sname] = st
    return out


def gather_sharded(model: nn.Module, rank: int, optimizer: bool) -> dict[str, Any]:
    """Whole sharded tables on rank 0 (a collective; {} elsewhere and without sharding).

    Returns:
        ``{"model": {state-dict key: (rows, D)}, "optimizer": {key: {state name: tensor}}}``,
        the latter with ``optimizer`` only (FBGEMM's per-table optimizer state shaped like
        the table, e.g. Adagrad's accumulator).
    """
    tables: dict[str, torch.Tensor] = {}
    opt: dict[str, dict[str, torch.Tensor]] = {}
    found = sharded_collections(model)
    for name, m in found:
        weights = m.sharded_tensors()
        for key, st in weights.items():
            full = _gather(st.metadata(), _local(st), rank)
            if full is not None:
                tables[f"{name}.weights.{key}"] = full
        if not optimizer:
            continue
        states = _optimizer_states(m)
        # Every rank learns every table's state names (a table-wise rank lists only its own).
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, {k: sorted(v) for k, v in states.items()})
        for key in weights:
            for sname in sorted({n for e in every for n in e.get(key, [])}):
                st = states.get(key, {}).get(sname)
                full = _gather(weights[key].metadata(), _local(st) if st is not None else {},
                               rank)
                if full is not None:
                    opt.setdefault(f"{name}.weights.{key}", {})[sname] = full
    if not found or rank != 0:
        return {}
    return {"model": tables, "optimizer": opt}


@torch.no_grad()
def load_sharded_optimizer(model: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put whole optimizer states (from :func:`gather_sharded`) back into the shards."""
    for name, m in sharded_collections(model):
        for key, states in _optimizer_states(m).items():
            saved = state.get(f"{name}.weights.{key}", {})
            for sname, st in states.items():
                if sname not in saved:
                    continue
                for s in st.local_shards():
                    (r0, c0), t = s.metadata.shard_offsets, s.tensor
                    t.copy_(saved[sname][r0:r0 + t.shape[0], c0:c0 + t.shape[1]].reshape(t.shape))
