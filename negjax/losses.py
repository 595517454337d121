"""Contrastive (InfoNCE) loss over the global in-batch similarity matrix, shard_map aware.

    loss = contrastive_loss(q, d, group_size=G, temperature=0.05,
                            query_pos_ids=pos_ids, doc_ids=ids, chunk_size=1024)

Layout (docs/design.md, "Batch layout"): `q [B, D]`, `d [B*G, D]` grouped per query; document
`i*G` is query `i`'s positive, the next `G-1` its hard negatives. Query `i` is scored
against every document of the global batch; its target column is `i*G`.

Masking ("Identity"): the positive ids of query `i` are `query_pos_ids[i]` (padded with -1)
plus the id of its own target document `doc_ids[i*G]`. A column whose id is one of them and
is not the target is removed from query `i`'s softmax (duplicates of the positive and other
known positives are never negatives). Without `doc_ids` nothing is masked.

Symmetric direction (`symmetric=True`): every positive document `d[j*G]` is scored against
all `B` queries with target query `j`; query `i != j` is masked out when `doc_ids[j*G]` is
one of query `i`'s positive ids (the same rule read from the document's side). The loss is
the mean of the two directions, each a mean over the `B` global queries.

In-batch negatives off (`in_batch_negatives=False`, or a `[B]` bool array with one flag per
query; FlagEmbedding's `no_in_batch_neg`): a query whose flag is False is scored only against
its own group, the global columns `[i*G, (i+1)*G)` (its target and its `G-1` hard negatives):
no other query's documents and no extra (memory-bank) columns. Masking by id and the
false-negative guard still apply inside the group, and the metrics count only those columns.
In the symmetric direction the row of such a query's positive scores only query `i` itself,
its target, so its term is log 1 = 0 (it still counts in the mean over `B`). The flags are
sharded like `q` (under a mesh along the batch axes; inside a manual shard_map the local
shard); `True` (the default) leaves the computation exactly as without the option.

Devices: without a mesh (or with a `data` axis of size 1) it is plain jnp. Under
`jax.set_mesh(mesh)` with a `data` axis of size n > 1 it runs as `jax.shard_map`: each device
holds `b = B/n` queries and their `b*G` documents, gathers all documents with
`lax.all_gather(tiled=True)` (order = device index, so grouping is preserved and local query
`r` on device `k` has target column `(k*b + r)*G`), and the per-device sums are `psum`-ed.
The gather's transpose is `psum_scatter`, so gradients of remote documents return to their
owners. Called from inside a shard_map that is already manual over `data` (of any size, 1
included), the arguments are taken as the local shards, the collectives are used directly and
the results are the same on every device.

Ring (`collective="ring"`, Inf-CL, arXiv 2410.17243): nothing is gathered. Each device cuts its
columns (documents, then its memory-bank shard) into pieces of `chunk_size` columns, and every
piece travels once around the devices (`lax.ppermute` to the next device, the next hop's
transfer issued before the current piece's matmul); each device folds the pieces that pass
into its own queries' online log-sum-exp. The backward pass (a custom VJP) sends the pieces
around again, each carrying the gradient accumulated for it, so after a full circle a piece's
gradient arrives back at its owner. Per-device memory is O(b x c + c x D) beyond the inputs
instead of O(B x G x D); masks, groups, symmetric, bank columns and temperature are those of
the gather path (same column ids, same targets), and so are the results.

Chunking (`chunk_size=c`): columns are processed in blocks of `c` with an online log-sum-exp
inside a `custom_vjp` whose backward pass recomputes each block, so per-device memory is
O(b x c) instead of O(b x N). A column count that `c` does not divide is padded (padding is
masked out); `c >= N` is the dense computation. Everything is float32 with `Precision.HIGHEST` matmuls (the log-sum-exp is never
done in a low-precision dtype).

Lower-level use (train step, memory bank): `contrastive_loss_and_metrics` additionally takes
`extra_docs [K, D]` (+ `extra_doc_ids [K]`): extra negative columns without gradient (a
MoCo-style queue; under a mesh it is sharded along `data` and gathered), and returns
in-batch metrics. `temperature` may be a traced scalar (a learnable temperature gets its
gradient, also through the chunked custom VJP); see `temperature_from_log_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from negjax.distributed import BATCH_AXES
from negjax.errors import NegjaxError
from negjax.loss_blocks import EMPTY, PRECISIONS, ce, group_windows
from negjax.loss_ring import ring_ce

COLLECTIVES = ("gather", "ring")


# ---------------------------------------------------------------------------------------
# Per-device body and the mesh dispatch
# ---------------------------------------------------------------------------------------

def _extra_keys(n_docs, doc_keys, k, extra_ids):
    """Column keys [n_docs + k, 1] with the extra columns' ids (an empty slot, id -1, gets the
    key EMPTY: not a column), or `doc_keys` unchanged when there are no extra ids."""
    if extra_ids is None:
        if doc_keys is None:
            return None
        return jnp.concatenate([doc_keys, jnp.full((k, 1), -1, doc_keys.dtype)])
    eids = jnp.where(extra_ids < 0, EMPTY, extra_ids).astype(jnp.int32)[:, None]
    if doc_keys is None:
        doc_keys = jnp.full((n_docs, 1), -1, jnp.int32)
    return jnp.concatenate([doc_keys.astype(jnp.int32), eids], axis=0)


def _guard(q, d, group_size, margin):
    """The false-negative guard's threshold per query [b] (no gradient): the similarity of
    its own positive (local: document i*G) times (1 - margin); None when the guard is off."""
    if margin is None:
        return None
    pos = jnp.sum(lax.stop_gradient(q) * lax.stop_gradient(d[::group_size]), axis=-1)
    return pos * (1.0 - margin)


def _local_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids, in_batch, spec: "LossSpec", *,
                 with_stats, axis):
    """Sums over this device's queries. q [b, D], d [b*G, D] (local shards, or the whole batch
    when axis is None), pos_keys [b, P+1] / doc_ids [b*G] int or None, extra [k, D] / extra_ids
    [k] or None, in_batch [b] bool or None (per query: in-batch negatives on; None = all on);
    the options from `spec`. Returns (fwd_sum, bwd_sum or None, stats or None), unreduced."""
    if spec.collective == "ring" and axis is not None:
        return _ring_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids, in_batch, spec,
                           with_stats=with_stats, axis=axis)
    group_size, chunk = spec.group_size, spec.chunk_size
    precision = PRECISIONS[spec.precision]
    b = q.shape[0]
    if axis is None:
        offset = 0
        gather = lambda x: x  # noqa: E731
    else:
        offset = lax.axis_index(axis) * b
        gather = lambda x: lax.all_gather(x, axis, tiled=True)  # noqa: E731
    qidx = offset + jnp.arange(b)
    cols = gather(d)
    col_keys = None if doc_ids is None else gather(doc_ids)[:, None]
    if extra is not None:
        extra = gather(extra)
        col_keys = _extra_keys(cols.shape[0], col_keys, extra.shape[0],
                               None if extra_ids is None else gather(extra_ids))
        cols = jnp.concatenate([cols, lax.stop_gradient(extra)], axis=0)
    guard = _guard(q, d, group_size, spec.false_negative_margin)
    # Column ids: the gathered documents 0..B*G-1, then the extra columns (outside every group).
    fwd, stats = ce(q, cols, scale, qidx * group_size, pos_keys, col_keys, chunk, with_stats,
                    precision, guard, group_windows(in_batch, qidx * group_size, group_size))
    bwd = None
    if spec.symmetric:
        # Positives against all queries; masked where the positive's id is another query's
        # positive id.
        row_keys = None if doc_ids is None else doc_ids[::group_size][:, None]
        qkeys = None if pos_keys is None else gather(pos_keys)
        bwd, _ = ce(d[::group_size], gather(q), scale, qidx, row_keys, qkeys, chunk, False,
                    precision, guard, group_windows(in_batch, qidx, 1))
    return fwd, bwd, stats


def _ring_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids, in_batch, spec: "LossSpec", *,
                with_stats, axis):
    """`_local_terms` with the columns passed around the ring instead of gathered: the same
    columns (documents, then the memory bank's), ids, masks and targets."""
    group_size, chunk = spec.group_size, spec.chunk_size
    precision = PRECISIONS[spec.precision]
    b = q.shape[0]
    offset = lax.axis_index(axis) * b
    qidx = offset + jnp.arange(b)
    cols, col_ids = d, offset * group_size + jnp.arange(d.shape[0])
    col_keys = None if doc_ids is None else doc_ids[:, None]
    if extra is not None:
        col_keys = _extra_keys(cols.shape[0], col_keys, extra.shape[0], extra_ids)
        cols = jnp.concatenate([cols, lax.stop_gradient(extra)], axis=0)
        col_ids = jnp.concatenate([col_ids, jnp.full((extra.shape[0],), -1, col_ids.dtype)])
    guard = _guard(q, d, group_size, spec.false_negative_margin)
    fwd, stats = ring_ce(q, cols, scale, qidx * group_size, pos_keys, col_keys, col_ids, chunk,
                         with_stats, axis, precision, guard,
                         group_windows(in_batch, qidx * group_size, group_size))
    bwd = None
    if spec.symmetric:
        row_keys = None if doc_ids is None else doc_ids[::group_size][:, None]
        bwd, _ = ring_ce(d[::group_size], q, scale, qidx, row_keys, pos_keys, qidx, chunk, False,
                         axis, precision, guard, group_windows(in_batch, qidx, 1))
    return fwd, bwd, stats


def _data_axis():
    """(the batch axes of the current mesh (those of 'data', 'fsdp' it has; () without a
    mesh), their total size, whether they are already manual (inside shard_map), whether
    they are Explicit)."""
    am = jax.sharding.get_abstract_mesh()
    axes = () if am.empty else tuple(a for a in BATCH_AXES if a in am.axis_names)
    if not axes:
        return (), 1, False, False
    size = 1
    for a in axes:
        size *= am.shape[a]
    manual = all(a in am.manual_axes for a in axes)
    types = dict(zip(am.axis_names, am.axis_types))
    explicit = any(types[a] == jax.sharding.AxisType.Explicit for a in axes)
    return axes, size, manual, explicit


def _check(q, d, group_size, query_pos_ids, doc_ids, extra, extra_ids):
    """Shapes of the inputs (the options were validated by `LossSpec`)."""
    if q.ndim != 2 or d.ndim != 2:
        raise NegjaxError(f"contrastive loss: q and d must be 2-D, got {q.shape} and {d.shape}")
    if group_size < 1 or d.shape != (q.shape[0] * group_size, q.shape[1]):
        raise NegjaxError(f"contrastive loss: d must be [B*group_size, D] = "
                          f"[{q.shape[0]}*{group_size}, {q.shape[1]}], got {d.shape}")
    if doc_ids is not None and doc_ids.shape != (d.shape[0],):
        raise NegjaxError(f"contrastive loss: doc_ids must be [{d.shape[0]}], got {doc_ids.shape}")
    if query_pos_ids is not None:
        if doc_ids is None:
            raise NegjaxError("contrastive loss: query_pos_ids needs doc_ids")
        if query_pos_ids.ndim != 2 or query_pos_ids.shape[0] != q.shape[0]:
            raise NegjaxError(f"contrastive loss: query_pos_ids must be [{q.shape[0]}, P], "
                              f"got {query_pos_ids.shape}")
    if extra is not None and (extra.ndim != 2 or extra.shape[1] != q.shape[1]):
        raise NegjaxError(f"contrastive loss: extra_docs must be [K, {q.shape[1]}], got {extra.shape}")
    if extra_ids is not None and (extra is None or extra_ids.shape != (extra.shape[0],)):
        raise NegjaxError("contrastive loss: extra_doc_ids must be [K] and needs extra_docs")


def _in_batch_flags(in_batch_negatives, b):
    """`in_batch_negatives` (None, a bool, or [b] bool / 0-1 int) -> None when every query
    keeps its in-batch negatives by a static True/None (nothing is passed on, the computation
    is unchanged), else [b] bool (False = only the query's own group)."""
    if in_batch_negatives is None or isinstance(in_batch_negatives, (bool, np.bool_)):
        if in_batch_negatives is None or in_batch_negatives:
            return None
        return jnp.zeros((b,), bool)
    flags = jnp.asarray(in_batch_negatives)
    if flags.shape != (b,) or not (jnp.issubdtype(flags.dtype, jnp.bool_)
                                   or jnp.issubdtype(flags.dtype, jnp.integer)):
        raise NegjaxError(f"contrastive loss: in_batch_negatives must be a bool or a [{b}] bool "
                          f"array (one flag per query), got {flags.dtype}{list(flags.shape)}")
    return flags if flags.dtype == jnp.bool_ else flags != 0


def _contrastive(q, d, spec: "LossSpec", *, temperature, query_pos_ids, doc_ids, extra, extra_ids,
                 with_stats, in_batch_negatives=None):
    group_size = spec.group_size
    q = jnp.asarray(q, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    doc_ids, query_pos_ids, extra_ids = as_int(doc_ids), as_int(query_pos_ids), as_int(extra_ids)
    if extra is not None:
        extra = jnp.asarray(extra, jnp.float32)
    _check(q, d, group_size, query_pos_ids, doc_ids, extra, extra_ids)
    in_batch = _in_batch_flags(in_batch_negatives, q.shape[0])
    scale = (1.0 / jnp.asarray(temperature, jnp.float32)).reshape(())
    pos_keys = None
    if doc_ids is not None:
        pos_keys = doc_ids[::group_size][:, None]  # the target's own id is always a positive
        if query_pos_ids is not None:
            pos_keys = jnp.concatenate([query_pos_ids, pos_keys], axis=1)

    axes, n, manual, explicit = _data_axis()
    args = (q, d, scale, pos_keys, doc_ids, extra, extra_ids, in_batch)
    # One device without a manual axis: no collective. (A 1-device Explicit mesh still goes
    # through shard_map: outside it, its arrays' shardings clash in the matmul.)
    if n == 1 and not manual and not explicit:
        fwd, bwd, stats = _local_terms(*args, spec, axis=None, with_stats=with_stats)
        global_b = q.shape[0]
    else:
        def body(q, d, scale, pos_keys, doc_ids, extra, extra_ids, in_batch):
            fwd, bwd, stats = _local_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids,
                                           in_batch, spec, axis=axes, with_stats=with_stats)
            return lax.psum((fwd, bwd, stats), axes)

        if manual:  # already inside a shard_map over 'data': arguments are local shards
            fwd, bwd, stats = body(*args)
            global_b = q.shape[0] * n
        else:
            if q.shape[0] % n or (extra is not None and extra.shape[0] % n):
                raise NegjaxError(f"contrastive loss: the batch ({q.shape[0]} queries) and the "
                                  f"extra negatives must divide over the {n} devices of "
                                  f"{'x'.join(axes)}")
            from jax.sharding import PartitionSpec as P

            specs = (P(axes), P(axes), P(), P(axes), P(axes), P(axes), P(axes), P(axes))
            specs = tuple(None if a is None else s for a, s in zip(args, specs))
            if explicit:  # Explicit axes: shard_map requires inputs already laid out so
                args = tuple(a if s is None or s == P() else jax.sharding.reshard(a, s)
                             for a, s in zip(args, specs))
            fwd, bwd, stats = jax.shard_map(body, in_specs=specs, out_specs=P())(*args)
            global_b = q.shape[0]
    loss = fwd / global_b
    if spec.symmetric:
        loss = 0.5 * (loss + bwd / global_b)
    if not with_stats:
        return loss, None
    stats = lax.stop_gradient(stats)
    metrics = dict(
        accuracy=stats["correct"] / global_b,
        pos_cos=stats["pos_cos"] / global_b,
        hardest_neg_cos=jnp.where(stats["rows_with_neg"] > 0,
                                  stats["hard_cos"] / jnp.maximum(stats["rows_with_neg"], 1.0), jnp.nan),
        neg_cos=jnp.where(stats["neg_count"] > 0,
                          stats["neg_cos"] / jnp.maximum(stats["neg_count"], 1.0), jnp.nan),
    )
    if spec.false_negative_margin is not None:
        metrics["false_negatives_masked"] = stats["guarded"]
    return loss, metrics


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def contrastive_loss(q, d, *, group_size, temperature, query_pos_ids=None, doc_ids=None,
                     symmetric=False, chunk_size=None, collective="gather", precision="highest",
                     matryoshka_dims=None, matryoshka_weights=None, renormalize=True,
                     false_negative_margin=None, in_batch_negatives=True):
    """InfoNCE over the global in-batch similarity matrix (see the module docstring).

    q [B, D] float, d [B*group_size, D] float (grouped per query, positive first),
    temperature: float or traced [] float32, query_pos_ids [B, P] int (-1 padded),
    doc_ids [B*group_size] int, chunk_size: columns per block (None or 0 = dense),
    collective: 'gather' (all-gather the documents) or 'ring' (pass them around the devices),
    precision: of the similarity matmuls, 'highest' (true float32; the default), 'high'
    (bf16_3x / tf32 on accelerators) or 'default' (the backend's fastest); the log-sum-exp is
    float32 in every case.
    matryoshka_dims [k1, k2, ...]: the loss is the weighted sum (`matryoshka_weights`, default
    1 each) of this loss over the embeddings truncated to their first k_i dimensions,
    re-normalised to unit length when `renormalize` (for encoders that normalise).
    false_negative_margin m in [0, 1): the false-negative guard -- a negative column (in-batch,
    hard or extra) whose similarity to the row (no gradient) exceeds the row's own positive's
    similarity x (1 - m) leaves the row's softmax (the mining job's relative margin, applied
    to the live batch; in the symmetric direction read from the positive's side).
    in_batch_negatives: True (the default: every query against the whole batch), False (every
    query only against its own group: its positive and its G-1 hard negatives) or a [B] bool
    (or 0/1 int) array, one flag per query, which may be traced and is sharded like `q`; see
    "In-batch negatives off" in the module docstring. A Python True changes nothing.
    Returns the mean over the B global queries, [] float32.
    """
    spec = LossSpec(group_size=group_size, symmetric=symmetric, chunk_size=chunk_size or None,
                    collective=collective, precision=precision,
                    matryoshka_dims=tuple(matryoshka_dims or ()),
                    matryoshka_weights=tuple(matryoshka_weights or ()), renormalize=renormalize,
                    false_negative_margin=false_negative_margin)
    loss, _ = _matryoshka(q, d, spec, temperature=temperature, query_pos_ids=query_pos_ids,
                          doc_ids=doc_ids, extra=None, extra_ids=None, with_stats=False,
                          in_batch_negatives=in_batch_negatives)
    return loss


def check_matryoshka(dims, weights, dim: int | None = None) -> tuple[tuple, tuple]:
    """Validated (dims, weights): dims distinct, >= 1 and <= `dim`; weights > 0, one per dim
    (empty = 1 each)."""
    dims = tuple(int(k) for k in dims)
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(dims)
    if len(set(dims)) != len(dims) or any(k < 1 for k in dims):
        raise NegjaxError(f"matryoshka_dims must be distinct positive sizes, got {list(dims)}")
    if dim is not None and any(k > dim for k in dims):
        raise NegjaxError(f"matryoshka_dims {list(dims)}: the embeddings have {dim} dimensions")
    if len(weights) != len(dims) or any(w <= 0 for w in weights):
        raise NegjaxError(f"matryoshka_weights must be {len(dims)} positive numbers (one per "
                          f"dimension), got {list(weights)}")
    return dims, weights


def truncate(x, k: int, renormalize: bool):
    """x [N, D] -> its first k dimensions [N, k], re-normalised to unit length if asked."""
    x = x[:, :k]
    if not renormalize:
        return x
    return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), 1e-12)


def _matryoshka(q, d, spec: "LossSpec", *, extra, **kw):
    """`_contrastive`, or with `spec.matryoshka_dims` its weighted sum over truncations;
    metrics (when asked for) are those of the first dimension listed."""
    if not spec.matryoshka_dims:
        return _contrastive(q, d, spec, extra=extra, **kw)
    dims, weights = check_matryoshka(spec.matryoshka_dims, spec.matryoshka_weights, q.shape[-1])
    total, metrics = 0.0, None
    for i, (k, w) in enumerate(zip(dims, weights)):
        cut = lambda x: None if x is None else truncate(jnp.asarray(x, jnp.float32), k, spec.renormalize)  # noqa: E731
        loss, m = _contrastive(cut(q), cut(d), spec, extra=cut(extra),
                               **dict(kw, with_stats=kw["with_stats"] and i == 0))
        total = total + w * loss
        metrics = m if i == 0 else metrics
    return total, metrics


def contrastive_loss_and_metrics(q, d, *, group_size, temperature, query_pos_ids=None,
                                 doc_ids=None, symmetric=False, chunk_size=None,
                                 extra_docs=None, extra_doc_ids=None, collective="gather",
                                 precision="highest", matryoshka_dims=None,
                                 matryoshka_weights=None, renormalize=True,
                                 false_negative_margin=None, in_batch_negatives=True):
    """`contrastive_loss` plus in-batch metrics and optional extra negative columns.

    extra_docs [K, D]: negatives appended after the batch's documents (a memory bank); they
    receive no gradient and, under a mesh, must be sharded along the batch axes ('data', and
    'fsdp' if the mesh has it; K divisible by their size). extra_doc_ids [K] int: their ids,
    masked like in-batch columns; -1 = an empty slot (a memory bank not yet full), which is
    not a column: it enters neither the softmax nor the metrics.

    Returns (loss [] f32, metrics) with metrics of the query->document direction, computed in
    the same pass on both the dense and the chunked path (no gradient), [] f32 each:
      accuracy         fraction of queries whose target scores strictly above every negative
      pos_cos          mean cosine of query and positive
      hardest_neg_cos  mean over queries of the highest negative cosine (NaN if none)
      neg_cos          mean cosine over all (query, negative) pairs (NaN if none)
    "Negative" = every unmasked non-target column (hard, in-batch and extra negatives).
    Cosines are computed from the embeddings' norms, so they are exact also when the
    encoder does not normalise. With `matryoshka_dims` (see `contrastive_loss`; the memory
    bank's columns are truncated alike) the metrics are those of the first dimension listed.
    With `false_negative_margin`, metrics also hold `false_negatives_masked`: the number of
    (query, column) pairs the guard removed in the query->document direction, over the global
    batch. With `in_batch_negatives` (see `contrastive_loss`) a query whose flag is False has
    only its own group's hard negatives as negatives, in the loss and in every metric.
    """
    spec = LossSpec(group_size=group_size, symmetric=symmetric, chunk_size=chunk_size or None,
                    collective=collective, precision=precision,
                    matryoshka_dims=tuple(matryoshka_dims or ()),
                    matryoshka_weights=tuple(matryoshka_weights or ()), renormalize=renormalize,
                    false_negative_margin=false_negative_margin)
    return spec.loss_and_metrics(q, d, temperature=temperature, query_pos_ids=query_pos_ids,
                                 doc_ids=doc_ids, extra_docs=extra_docs, extra_doc_ids=extra_doc_ids,
                                 in_batch_negatives=in_batch_negatives)


DISTILL_MODES = ("kl", "margin_mse")


@dataclass(frozen=True)
class LossSpec:
    """Every option of the contrastive loss, bound once and validated once: the value the
    train step, GradCache, the memory bank and `negjax bench step` all call, so they compute
    one loss. `LossSpec.from_config(cfg.loss, group_size=G, renormalize=enc.normalize)`;
    `spec(q, d, temperature=t, query_pos_ids=..., doc_ids=..., extra_docs=bank,
    extra_doc_ids=bank_ids, in_batch_negatives=flags)` -> (loss, metrics) of
    `contrastive_loss_and_metrics`."""

    group_size: int
    symmetric: bool = False
    chunk_size: int | None = None          # None = dense
    collective: str = "gather"
    precision: str = "highest"
    matryoshka_dims: tuple = ()
    matryoshka_weights: tuple = ()
    renormalize: bool = True
    false_negative_margin: float | None = None  # None = no guard

    def __post_init__(self):
        if self.group_size < 1:
            raise NegjaxError(f"contrastive loss: group_size must be >= 1, got {self.group_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise NegjaxError(f"contrastive loss: chunk_size must be >= 1, or None/0 for no "
                              f"chunking, got {self.chunk_size}")
        if self.collective not in COLLECTIVES:
            raise NegjaxError(f"contrastive loss: collective {self.collective!r} is not one of "
                              f"{list(COLLECTIVES)}")
        if self.precision not in PRECISIONS:
            raise NegjaxError(f"contrastive loss: precision {self.precision!r} is not one of "
                              f"{sorted(PRECISIONS)}")
        if self.false_negative_margin is not None and not 0.0 <= self.false_negative_margin < 1.0:
            raise NegjaxError(f"contrastive loss: false_negative_margin must be in [0, 1), got "
                              f"{self.false_negative_margin}")
        if self.matryoshka_dims:
            dims, weights = check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)
            object.__setattr__(self, "matryoshka_dims", dims)
            object.__setattr__(self, "matryoshka_weights", weights)

    @classmethod
    def from_config(cls, loss_cfg, *, group_size: int, renormalize: bool = True) -> "LossSpec":
        """From a `negjax.config.LossConfig` (0 / negative values mean off, as there)."""
        return cls(group_size=int(group_size), symmetric=bool(loss_cfg.symmetric),
                   chunk_size=loss_cfg.chunk_size or None, collective=loss_cfg.collective,
                   precision=loss_cfg.precision,
                   matryoshka_dims=tuple(loss_cfg.matryoshka_dims or ()),
                   matryoshka_weights=tuple(loss_cfg.matryoshka_weights or ()),
                   renormalize=bool(renormalize),
                   false_negative_margin=(loss_cfg.false_negative_margin
                                          if loss_cfg.false_negative_margin >= 0 else None))

    def loss_and_metrics(self, q, d, *, temperature, query_pos_ids=None, doc_ids=None,
                         extra_docs=None, extra_doc_ids=None, in_batch_negatives=None):
        """(loss, metrics) as `contrastive_loss_and_metrics` documents them;
        `in_batch_negatives` None means True."""
        return _matryoshka(q, d, self, temperature=temperature, query_pos_ids=query_pos_ids,
                           doc_ids=doc_ids, extra=extra_docs, extra_ids=extra_doc_ids,
                           with_stats=True, in_batch_negatives=in_batch_negatives)

    __call__ = loss_and_metrics


def distillation_loss(q, d, teacher_scores, *, group_size, mode, temperature,
                      teacher_temperature=1.0):
    """Distillation from a teacher's scores over each query's own group (its positive and its
    hard negatives), e.g. a cross-encoder reranker's.

    q [B, D], d [B*G, D] (grouped per query, positive first), teacher_scores [B, G] float
    (NaN = the teacher did not score that document). Student scores are q . d / temperature,
    teacher scores t / teacher_temperature, both over the documents the teacher scored:
      'kl'          KL(softmax(teacher) || softmax(student)) per query
      'margin_mse'  mean over scored negatives of ((s_pos - s_neg) - (t_pos - t_neg))^2
    A query counts when its positive and at least one negative were scored. Inside a
    shard_map over the batch axes (the train step) the sums run over the global batch.
    Returns (mean over counted queries [] f32, number of counted queries [] f32).
    """
    if mode not in DISTILL_MODES:
        raise NegjaxError(f"distillation mode {mode!r} is not one of {list(DISTILL_MODES)}")
    q = jnp.asarray(q, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    t = jnp.asarray(teacher_scores, jnp.float32)
    b = q.shape[0]
    if t.shape != (b, group_size) or d.shape[0] != b * group_size:
        raise NegjaxError(f"distillation: teacher_scores must be [{b}, {group_size}] for q "
                          f"{q.shape} and d {d.shape}, got {t.shape}")
    s = jnp.einsum("bd,bgd->bg", q, d.reshape(b, group_size, -1),
                   precision=lax.Precision.HIGHEST) / temperature
    known = jnp.isfinite(t)
    t = jnp.where(known, t, 0.0) / teacher_temperature
    valid = known[:, 0] & known[:, 1:].any(axis=1)
    if mode == "kl":
        # A large finite floor (not -inf) for unscored documents: no NaN in any gradient.
        floor = jnp.float32(-1e30)
        log_pt = jax.nn.log_softmax(jnp.where(known, t, floor), axis=1)
        log_ps = jax.nn.log_softmax(jnp.where(known, s, floor), axis=1)
        per_row = jnp.sum(jnp.where(known, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=1)
    else:
        pair = known[:, :1] & known[:, 1:]
        err = ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])) ** 2
        per_row = jnp.sum(jnp.where(pair, err, 0.0), axis=1) / jnp.maximum(pair.sum(axis=1), 1)
    total = jnp.sum(jnp.where(valid, per_row, 0.0))
    count = jnp.sum(valid.astype(jnp.float32))
    axes, _, manual, _ = _data_axis()
    if manual:
        total, count = lax.psum((total, count), axes)
    return total / jnp.maximum(count, 1.0), count


def temperature_from_log_scale(log_scale, min_temperature, max_temperature):
    """A learnable temperature: `log_scale` [] f32 is log(1/temperature); the result is
    exp(-log_scale) clipped to [min_temperature, max_temperature] (the clip's gradient is zero
    outside the range, so the parameter stops moving there)."""
    return jnp.clip(jnp.exp(-log_scale), min_temperature, max_temperature)


def init_log_scale(temperature):
    """Initial value of the learnable log(1/temperature) parameter, [] float32."""
    return jnp.log(1.0 / jnp.asarray(temperature, jnp.float32))
