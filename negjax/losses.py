"""Contrastive (InfoNCE) loss over the global in-batch similarity matrix, shard_map aware.

    loss = contrastive_loss(q, d, group_size=G, temperature=0.05,
                            query_pos_ids=pos_ids, doc_ids=ids, chunk_size=1024)

Layout (DESIGN.md "Batch layout"): `q [B, D]`, `d [B*G, D]` grouped per query; document
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

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from negjax.errors import NegjaxError

AXIS = "data"
COLLECTIVES = ("gather", "ring")
# TPUs/GPUs would otherwise run f32 matmuls in bf16/tf32; logits are divided by a small
# temperature, so their error would be amplified ~20x.
_PRECISION = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------
# Masks and the dense core
# ---------------------------------------------------------------------------------------

def _key_match(row_keys, col_keys):
    """[b, Pr] int, [c, Pc] int -> [b, c] bool: some non-negative key of the row equals a key
    of the column (-1 padding never matches)."""
    eq = row_keys[:, None, :, None] == col_keys[None, :, None, :]
    eq = eq & (row_keys[:, None, :, None] >= 0)
    return eq.any(axis=(2, 3))


def _block_masks(col_ids, valid, targets, row_keys, col_keys):
    """(onehot, neg) [b, c] bool for a block of columns with global ids `col_ids [c]` (-1 for
    columns that are nobody's target: memory-bank columns, padding) and `valid [c]` (False
    for padding): the target column, and the columns that enter the softmax as negatives."""
    onehot = col_ids[None, :] == targets[:, None]
    neg = ~onehot & valid[None, :]
    if row_keys is not None:
        neg = neg & ~_key_match(row_keys, col_keys)
    return onehot, neg


def _match_vma(tree, *refs):
    """`tree`'s arrays made device-varying over the manual mesh axes of `refs` (inside
    shard_map a scan carry must keep one type, and fresh constants are invariant)."""
    want = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))

    def cast(x):
        axes = tuple(sorted(want - jax.typeof(x).manual_axis_type.varying))
        return lax.pcast(x, axes, to="varying") if axes else x
    return jax.tree.map(cast, tree)


def _inv_norm(x):
    return lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-24))


def _block_stats(sim, onehot, neg, inv_r, inv_c):
    """Per-row statistics of one column block (no gradient): target similarity / cosine,
    hardest negative similarity / cosine, sum and count of negative cosines."""
    cos = sim * inv_r[:, None] * inv_c[None, :]
    ninf = jnp.float32(-jnp.inf)
    return dict(
        tgt_sim=jnp.sum(jnp.where(onehot, sim, 0.0), axis=1),
        pos_cos=jnp.sum(jnp.where(onehot, cos, 0.0), axis=1),
        best_neg_sim=jnp.max(jnp.where(neg, sim, ninf), axis=1, initial=ninf),
        hard_cos=jnp.max(jnp.where(neg, cos, ninf), axis=1, initial=ninf),
        neg_cos=jnp.sum(jnp.where(neg, cos, 0.0), axis=1),
        neg_count=jnp.sum(neg, axis=1).astype(jnp.float32),
    )


def _finish_stats(s):
    """Per-row block statistics -> [] f32 sums over the rows."""
    has_neg = s["neg_count"] > 0
    return dict(
        correct=jnp.sum((s["tgt_sim"] > s["best_neg_sim"]).astype(jnp.float32)),
        pos_cos=jnp.sum(s["pos_cos"]),
        hard_cos=jnp.sum(jnp.where(has_neg, s["hard_cos"], 0.0)),
        rows_with_neg=jnp.sum(has_neg.astype(jnp.float32)),
        neg_cos=jnp.sum(s["neg_cos"]),
        neg_count=jnp.sum(s["neg_count"]),
    )


def _dense_ce(rows, cols, scale, targets, row_keys, col_keys, with_stats):
    """Sum over rows of softmax cross-entropy, materialising the [b, N] logits.

    rows [b, D] f32, cols [N, D] f32, scale [] f32 (1/temperature), targets [b] int (column
    of each row's target), row_keys [b, Pr] / col_keys [N, Pc] int or None.
    Returns (loss_sum [] f32, stats dict of [] f32 sums, or None)."""
    sim = jnp.matmul(rows, cols.T, precision=_PRECISION)
    logits = sim * scale
    ids = jnp.arange(cols.shape[0])
    onehot, neg = _block_masks(ids, ids >= 0, targets, row_keys, col_keys)
    lse = jax.nn.logsumexp(jnp.where(onehot | neg, logits, -jnp.inf), axis=1)
    tgt = jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    loss_sum = jnp.sum(lse - tgt)
    if not with_stats:
        return loss_sum, None
    sg = lax.stop_gradient
    stats = _block_stats(sg(sim), onehot, neg, _inv_norm(sg(rows)), _inv_norm(sg(cols)))
    return loss_sum, _finish_stats(stats)


# ---------------------------------------------------------------------------------------
# The chunked core: online log-sum-exp + recomputing custom VJP
# ---------------------------------------------------------------------------------------

def _pad_cols(cols, col_keys, chunk, col_ids=None):
    """Columns [n, D] (+ keys [n, Pc], ids [n]) -> blocks [nblocks, chunk, ...] padded with
    invalid columns; also returns the blocks' ids (default: 0..n-1), validity and count."""
    n = cols.shape[0]
    nblocks = -(-n // chunk)
    pad = nblocks * chunk - n
    if col_ids is None:
        col_ids = jnp.arange(n)
    valid = jnp.pad(jnp.ones((n,), bool), (0, pad)).reshape(nblocks, chunk)
    ids = jnp.pad(col_ids, (0, pad), constant_values=-1).reshape(nblocks, chunk)
    cols = jnp.pad(cols, ((0, pad), (0, 0))).reshape(nblocks, chunk, cols.shape[1])
    if col_keys is not None:
        col_keys = jnp.pad(col_keys, ((0, pad), (0, 0)), constant_values=-1)
        col_keys = col_keys.reshape(nblocks, chunk, col_keys.shape[1])
    return cols, col_keys, ids, valid, nblocks


def _init_carry(rows, with_stats, *refs):
    """The online log-sum-exp state of `rows`: (running max, running sum, target logit,
    statistics), typed like `refs` inside shard_map."""
    b = rows.shape[0]
    ninf = jnp.float32(-jnp.inf)
    zeros = jnp.zeros((b,), jnp.float32)
    st0 = None
    if with_stats:
        st0 = dict(tgt_sim=zeros, pos_cos=zeros, best_neg_sim=jnp.full((b,), ninf),
                   hard_cos=jnp.full((b,), ninf), neg_cos=zeros, neg_count=zeros)
    return _match_vma((jnp.full((b,), ninf), zeros, zeros, st0), rows, *refs)


def _fwd_block(carry, rows, blk, ids, valid, kblk, scale, targets, row_keys, inv_r):
    """Fold one block of columns into the online log-sum-exp state `carry`."""
    m, l, tgt, st = carry
    ninf = jnp.float32(-jnp.inf)
    sim = jnp.matmul(rows, blk.T, precision=_PRECISION)
    logits = sim * scale
    onehot, neg = _block_masks(ids, valid, targets, row_keys, kblk)
    keep = onehot | neg
    m_new = jnp.maximum(m, jnp.max(jnp.where(keep, logits, ninf), axis=1))
    # Rows whose columns so far were all masked keep m = -inf; shift by 0 then.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    l = l * jnp.exp(m - shift) + jnp.sum(jnp.where(keep, jnp.exp(logits - shift[:, None]), 0.0), axis=1)
    tgt = tgt + jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    if st is not None:
        s = _block_stats(sim, onehot, neg, inv_r, _inv_norm(blk))
        st = dict(
            tgt_sim=st["tgt_sim"] + s["tgt_sim"], pos_cos=st["pos_cos"] + s["pos_cos"],
            best_neg_sim=jnp.maximum(st["best_neg_sim"], s["best_neg_sim"]),
            hard_cos=jnp.maximum(st["hard_cos"], s["hard_cos"]),
            neg_cos=st["neg_cos"] + s["neg_cos"], neg_count=st["neg_count"] + s["neg_count"])
    return m_new, l, tgt, st


def _finish_forward(carry, with_stats):
    """(loss sum, stats or None, lse [b]) of a finished online log-sum-exp state."""
    m, l, tgt, st = carry
    lse = m + jnp.log(l)
    return jnp.sum(lse - tgt), (_finish_stats(st) if with_stats else None), lse


def _bwd_block(rows, blk, ids, valid, kblk, scale, targets, row_keys, lse, g):
    """One block's share of the backward pass: (d rows, d scale, d block)."""
    sim = jnp.matmul(rows, blk.T, precision=_PRECISION)
    logits = sim * scale
    onehot, neg = _block_masks(ids, valid, targets, row_keys, kblk)
    p = jnp.where(onehot | neg, jnp.exp(logits - lse[:, None]), 0.0)
    dlogits = g * (p - onehot.astype(jnp.float32))       # d loss_sum / d logits
    dsim = dlogits * scale
    return (jnp.matmul(dsim, blk, precision=_PRECISION), jnp.sum(dlogits * sim),
            jnp.matmul(dsim.T, rows, precision=_PRECISION))


def _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats):
    blocks, key_blocks, ids, valid, _ = _pad_cols(cols, col_keys, chunk)
    inv_r = _inv_norm(rows) if with_stats else None

    def step(carry, xs):
        blk, kblk, bids, bvalid = xs
        return _fwd_block(carry, rows, blk, bids, bvalid, kblk, scale, targets, row_keys, inv_r), None

    carry, _ = lax.scan(step, _init_carry(rows, with_stats, cols, scale),
                        (blocks, key_blocks, ids, valid))
    return _finish_forward(carry, with_stats)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked_ce(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats):
    """Same contract as `_dense_ce`, with columns processed `chunk` at a time."""
    loss_sum, stats, _ = _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats)
    return loss_sum, stats


def _chunked_ce_fwd(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats):
    loss_sum, stats, lse = _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats)
    return (loss_sum, stats), (rows, cols, scale, targets, row_keys, col_keys, lse)


def _chunked_ce_bwd(chunk, with_stats, res, cotangents):
    rows, cols, scale, targets, row_keys, col_keys, lse = res
    g = cotangents[0]  # the statistics carry no gradient
    n, dim = cols.shape
    blocks, key_blocks, ids, valid, nblocks = _pad_cols(cols, col_keys, chunk)

    def step(carry, xs):
        blk, kblk, bids, bvalid = xs
        drows, dscale = carry
        dr, ds, dblk = _bwd_block(rows, blk, bids, bvalid, kblk, scale, targets, row_keys, lse, g)
        return (drows + dr, dscale + ds), dblk

    init = _match_vma((jnp.zeros_like(rows), jnp.zeros((), jnp.float32)), rows, cols, scale)
    (drows, dscale), dblocks = lax.scan(step, init, (blocks, key_blocks, ids, valid))
    dcols = dblocks.reshape(nblocks * chunk, dim)[:n]
    return drows, dcols, dscale.astype(scale.dtype), None, None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def _ce(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats):
    if chunk is None or chunk >= cols.shape[0]:
        return _dense_ce(rows, cols, scale, targets, row_keys, col_keys, with_stats)
    # Inside shard_map the custom VJP's cotangents must have their primals' device-variance;
    # they are computed from all three, so give all three the same variance up front (the
    # transpose of this cast sums e.g. a replicated scale's per-device cotangents).
    rows, cols, scale = _match_vma((rows, cols, scale), rows, cols, scale)
    return _chunked_ce(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats)


# ---------------------------------------------------------------------------------------
# The ring: column blocks travel around the devices instead of being gathered
# ---------------------------------------------------------------------------------------

def _ring_pieces(cols, col_keys, col_ids, chunk):
    """This device's columns as the pieces that travel the ring: `chunk` columns each (all of
    them when chunk is None), so a device holds O(chunk x D) of other devices' columns."""
    size = cols.shape[0] if chunk is None else min(chunk, cols.shape[0])
    return _pad_cols(cols, col_keys, size, col_ids)


def _row_tiles(x, r, fill):
    """[b, ...] -> [ceil(b/r), r, ...], padded with `fill` (None stays None)."""
    if x is None:
        return None
    pad = -x.shape[0] % r
    if pad:
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
    return x.reshape((x.shape[0] // r, r) + x.shape[1:])


def _ring_rows(rows, targets, row_keys, chunk):
    """The rows in tiles of `chunk` (so a block's logits are [chunk, chunk], not [b, chunk]):
    padding rows have target -2 (no column has it) and no keys."""
    r = rows.shape[0] if chunk is None else min(chunk, rows.shape[0])
    return (_row_tiles(rows, r, 0.0), _row_tiles(targets, r, -2), _row_tiles(row_keys, r, -1), r)


def _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats, axis):
    n = lax.axis_size(axis)
    perm = [(i, (i + 1) % n) for i in range(n)]
    b = rows.shape[0]
    blocks, key_blocks, ids, valid, _ = _ring_pieces(cols, col_keys, col_ids, chunk)
    rows_t, targets_t, keys_t, r = _ring_rows(rows, targets, row_keys, chunk)
    inv_t = _row_tiles(_inv_norm(rows), r, 1.0) if with_stats else None
    nt = rows_t.shape[0]
    carry0 = jax.tree.map(lambda x: _row_tiles(x, r, 0.0),
                          _init_carry(rows, with_stats, cols, scale))

    def fold(carry, blk, bids, bvalid, kblk):  # one piece into every row tile's state
        def tile(_, xs):
            c, rw, tg, rk, ir = xs
            return None, _fwd_block(c, rw, blk, bids, bvalid, kblk, scale, tg, rk, ir)
        _, carry = lax.scan(tile, None, (carry, rows_t, targets_t, keys_t, inv_t))
        return carry

    def piece(carry, own):
        def hop(inner, _):
            carry, cur = inner
            nxt = lax.ppermute(cur, axis, perm)   # issued before this hop's compute
            return (fold(carry, *cur), nxt), None
        own = _match_vma(own, rows, cols, scale)  # e.g. the padding mask is a constant
        (carry, _), _ = lax.scan(hop, (carry, own), None, length=n)
        return carry, None

    carry, _ = lax.scan(piece, carry0, (blocks, ids, valid, key_blocks))
    carry = jax.tree.map(lambda x: x.reshape((nt * r,) + x.shape[2:])[:b], carry)
    return _finish_forward(carry, with_stats)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ring_ce(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats, axis):
    """`_chunked_ce` over the columns of every device of `axis`, without gathering them: each
    piece of this device's columns `cols [m, D]` (global ids `col_ids [m]`, -1 = nobody's
    target) visits every device once, which folds it into its rows' online log-sum-exp, a
    tile of `chunk` rows at a time."""
    loss_sum, stats, _ = _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids,
                                       chunk, with_stats, axis)
    return loss_sum, stats


def _ring_ce_fwd(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats, axis):
    loss_sum, stats, lse = _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids,
                                         chunk, with_stats, axis)
    return (loss_sum, stats), (rows, cols, scale, targets, row_keys, col_keys, col_ids, lse)


def _ring_ce_bwd(chunk, with_stats, axis, res, cotangents):
    rows, cols, scale, targets, row_keys, col_keys, col_ids, lse = res
    g = cotangents[0]
    n = lax.axis_size(axis)
    perm = [(i, (i + 1) % n) for i in range(n)]
    b = rows.shape[0]
    m, dim = cols.shape
    blocks, key_blocks, ids, valid, nblocks = _ring_pieces(cols, col_keys, col_ids, chunk)
    rows_t, targets_t, keys_t, r = _ring_rows(rows, targets, row_keys, chunk)
    lse_t = _row_tiles(lse, r, jnp.inf)   # padding rows: p = exp(-inf) = 0, no gradient

    def grads(dr, blk, bids, bvalid, kblk):  # one piece against every row tile
        def tile(dblk, xs):
            rw, tg, rk, ls = xs
            d_rows, d_scale, d_blk = _bwd_block(rw, blk, bids, bvalid, kblk, scale, tg, rk, ls, g)
            return dblk + d_blk, (d_rows, d_scale)
        dblk0 = _match_vma(jnp.zeros_like(blk), rows, cols, scale)
        dblk, (d_rows, d_scale) = lax.scan(tile, dblk0, (rows_t, targets_t, keys_t, lse_t))
        return dr + d_rows, jnp.sum(d_scale), dblk

    def piece(carry, own):
        # The piece travels with the gradient accumulated for it; after n hops both are back
        # at the piece's owner (Inf-CL returns column gradients the same way).
        def hop(inner, _):
            (drows, dscale), cur, dacc = inner
            nxt = lax.ppermute(cur, axis, perm)
            drows, ds, dblk = grads(drows, *cur)
            dacc = lax.ppermute(dacc + dblk, axis, perm)
            return ((drows, dscale + ds), nxt, dacc), None
        own, dacc0 = _match_vma((own, jnp.zeros_like(own[0])), rows, cols, scale)
        (carry, _, dacc), _ = lax.scan(hop, (carry, own, dacc0), None, length=n)
        return carry, dacc

    init = _match_vma((jnp.zeros_like(rows_t), jnp.zeros((), jnp.float32)), rows, cols, scale)
    (drows, dscale), dblocks = lax.scan(piece, init, (blocks, ids, valid, key_blocks))
    drows = drows.reshape(-1, dim)[:b]
    dcols = dblocks.reshape(nblocks * blocks.shape[1], dim)[:m]
    return drows, dcols, dscale.astype(scale.dtype), None, None, None, None


_ring_ce.defvjp(_ring_ce_fwd, _ring_ce_bwd)


def _ring(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats, axis):
    rows, cols, scale = _match_vma((rows, cols, scale), rows, cols, scale)
    return _ring_ce(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats,
                    axis)


# ---------------------------------------------------------------------------------------
# Per-device body and the mesh dispatch
# ---------------------------------------------------------------------------------------

def _local_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids, *, group_size, symmetric,
                 chunk, with_stats, axis, collective="gather"):
    """Sums over this device's queries. q [b, D], d [b*G, D] (local shards, or the whole batch
    when axis is None), pos_keys [b, P+1] / doc_ids [b*G] int or None, extra [k, D] / extra_ids
    [k] or None. Returns (fwd_sum, bwd_sum or None, stats or None), unreduced."""
    if collective == "ring" and axis is not None:
        return _ring_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids,
                           group_size=group_size, symmetric=symmetric, chunk=chunk,
                           with_stats=with_stats, axis=axis)
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
        cols = jnp.concatenate([cols, lax.stop_gradient(gather(extra))], axis=0)
        if col_keys is not None:
            eids = (jnp.full((extra.shape[0],), -1, col_keys.dtype) if extra_ids is None
                    else extra_ids.astype(col_keys.dtype))
            col_keys = jnp.concatenate([col_keys, gather(eids)[:, None]], axis=0)
    fwd, stats = _ce(q, cols, scale, qidx * group_size, pos_keys, col_keys, chunk, with_stats)
    bwd = None
    if symmetric:
        # Positives against all queries; masked where the positive's id is another query's
        # positive id.
        row_keys = None if doc_ids is None else doc_ids[::group_size][:, None]
        qkeys = None if pos_keys is None else gather(pos_keys)
        bwd, _ = _ce(d[::group_size], gather(q), scale, qidx, row_keys, qkeys, chunk, False)
    return fwd, bwd, stats


def _ring_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids, *, group_size, symmetric,
                chunk, with_stats, axis):
    """`_local_terms` with the columns passed around the ring instead of gathered: the same
    columns (documents, then the memory bank's), ids, masks and targets."""
    b = q.shape[0]
    offset = lax.axis_index(axis) * b
    qidx = offset + jnp.arange(b)
    cols, col_ids = d, offset * group_size + jnp.arange(d.shape[0])
    col_keys = None if doc_ids is None else doc_ids[:, None]
    if extra is not None:
        cols = jnp.concatenate([cols, lax.stop_gradient(extra)], axis=0)
        col_ids = jnp.concatenate([col_ids, jnp.full((extra.shape[0],), -1, col_ids.dtype)])
        if col_keys is not None:
            eids = (jnp.full((extra.shape[0],), -1, col_keys.dtype) if extra_ids is None
                    else extra_ids.astype(col_keys.dtype))
            col_keys = jnp.concatenate([col_keys, eids[:, None]], axis=0)
    fwd, stats = _ring(q, cols, scale, qidx * group_size, pos_keys, col_keys, col_ids, chunk,
                       with_stats, axis)
    bwd = None
    if symmetric:
        row_keys = None if doc_ids is None else doc_ids[::group_size][:, None]
        bwd, _ = _ring(d[::group_size], q, scale, qidx, row_keys, pos_keys, qidx, chunk, False,
                       axis)
    return fwd, bwd, stats


def _data_axis():
    """(size of the mesh's 'data' axis or 1, whether it is already manual (inside shard_map),
    whether it is Explicit)."""
    am = jax.sharding.get_abstract_mesh()
    if am.empty or AXIS not in am.axis_names:
        return 1, False, False
    size = am.shape[AXIS]
    manual = AXIS in am.manual_axes
    explicit = dict(zip(am.axis_names, am.axis_types))[AXIS] == jax.sharding.AxisType.Explicit
    return size, manual, explicit


def _check(q, d, group_size, query_pos_ids, doc_ids, chunk_size, extra, extra_ids, collective):
    if collective not in COLLECTIVES:
        raise NegjaxError(f"contrastive loss: collective {collective!r} is not one of "
                          f"{list(COLLECTIVES)}")
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
    if chunk_size is not None and chunk_size < 0:
        raise NegjaxError(f"contrastive loss: chunk_size must be >= 1, or None/0 for no chunking, "
                          f"got {chunk_size}")
    if extra is not None and (extra.ndim != 2 or extra.shape[1] != q.shape[1]):
        raise NegjaxError(f"contrastive loss: extra_docs must be [K, {q.shape[1]}], got {extra.shape}")
    if extra_ids is not None and (extra is None or extra_ids.shape != (extra.shape[0],)):
        raise NegjaxError("contrastive loss: extra_doc_ids must be [K] and needs extra_docs")


def _contrastive(q, d, *, group_size, temperature, query_pos_ids, doc_ids, symmetric,
                 chunk_size, extra, extra_ids, with_stats, collective="gather"):
    q = jnp.asarray(q, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    doc_ids, query_pos_ids, extra_ids = as_int(doc_ids), as_int(query_pos_ids), as_int(extra_ids)
    if extra is not None:
        extra = jnp.asarray(extra, jnp.float32)
    _check(q, d, group_size, query_pos_ids, doc_ids, chunk_size, extra, extra_ids, collective)
    chunk_size = chunk_size or None  # 0 (the config's "off") = materialise the matrix
    scale = (1.0 / jnp.asarray(temperature, jnp.float32)).reshape(())
    pos_keys = None
    if doc_ids is not None:
        pos_keys = doc_ids[::group_size][:, None]  # the target's own id is always a positive
        if query_pos_ids is not None:
            pos_keys = jnp.concatenate([query_pos_ids, pos_keys], axis=1)

    n, manual, explicit = _data_axis()
    kw = dict(group_size=group_size, symmetric=symmetric, chunk=chunk_size, with_stats=with_stats,
              collective=collective)
    args = (q, d, scale, pos_keys, doc_ids, extra, extra_ids)
    if n == 1 and not manual:
        fwd, bwd, stats = _local_terms(*args, axis=None, **kw)
        global_b = q.shape[0]
    else:
        def body(q, d, scale, pos_keys, doc_ids, extra, extra_ids):
            fwd, bwd, stats = _local_terms(q, d, scale, pos_keys, doc_ids, extra, extra_ids,
                                           axis=AXIS, **kw)
            return lax.psum((fwd, bwd, stats), AXIS)

        if manual:  # already inside a shard_map over 'data': arguments are local shards
            fwd, bwd, stats = body(*args)
            global_b = q.shape[0] * n
        else:
            if q.shape[0] % n or (extra is not None and extra.shape[0] % n):
                raise NegjaxError(f"contrastive loss: the batch ({q.shape[0]} queries) and the "
                                  f"extra negatives must divide over the {n} devices of 'data'")
            from jax.sharding import PartitionSpec as P

            spec = (P(AXIS), P(AXIS), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS))
            spec = tuple(None if a is None else s for a, s in zip(args, spec))
            if explicit:  # Explicit axes: shard_map requires inputs already laid out so
                args = tuple(a if s is None or s == P() else jax.sharding.reshard(a, s)
                             for a, s in zip(args, spec))
            fwd, bwd, stats = jax.shard_map(body, in_specs=spec, out_specs=P())(*args)
            global_b = q.shape[0]
    loss = fwd / global_b
    if symmetric:
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
    return loss, metrics


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def contrastive_loss(q, d, *, group_size, temperature, query_pos_ids=None, doc_ids=None,
                     symmetric=False, chunk_size=None, collective="gather"):
    """InfoNCE over the global in-batch similarity matrix (see the module docstring).

    q [B, D] float, d [B*group_size, D] float (grouped per query, positive first),
    temperature: float or traced [] float32, query_pos_ids [B, P] int (-1 padded),
    doc_ids [B*group_size] int, chunk_size: columns per block (None or 0 = dense),
    collective: 'gather' (all-gather the documents) or 'ring' (pass them around the devices).
    Returns the mean over the B global queries, [] float32.
    """
    loss, _ = _contrastive(q, d, group_size=group_size, temperature=temperature,
                           query_pos_ids=query_pos_ids, doc_ids=doc_ids, symmetric=symmetric,
                           chunk_size=chunk_size, extra=None, extra_ids=None, with_stats=False,
                           collective=collective)
    return loss


def contrastive_loss_and_metrics(q, d, *, group_size, temperature, query_pos_ids=None,
                                 doc_ids=None, symmetric=False, chunk_size=None,
                                 extra_docs=None, extra_doc_ids=None, collective="gather"):
    """`contrastive_loss` plus in-batch metrics and optional extra negative columns.

    extra_docs [K, D]: negatives appended after the batch's documents (a memory bank); they
    receive no gradient and, under a mesh, must be sharded along 'data' (K divisible by the
    axis size). extra_doc_ids [K] int: their ids, masked like in-batch columns (-1 = none).

    Returns (loss [] f32, metrics) with metrics of the query->document direction, computed in
    the same pass on both the dense and the chunked path (no gradient), [] f32 each:
      accuracy         fraction of queries whose target scores strictly above every negative
      pos_cos          mean cosine of query and positive
      hardest_neg_cos  mean over queries of the highest negative cosine (NaN if none)
      neg_cos          mean cosine over all (query, negative) pairs (NaN if none)
    "Negative" = every unmasked non-target column (hard, in-batch and extra negatives).
    Cosines are computed from the embeddings' norms, so they are exact also when the
    encoder does not normalise.
    """
    return _contrastive(q, d, group_size=group_size, temperature=temperature,
                        query_pos_ids=query_pos_ids, doc_ids=doc_ids, symmetric=symmetric,
                        chunk_size=chunk_size, extra=extra_docs, extra_ids=extra_doc_ids,
                        with_stats=True, collective=collective)


def temperature_from_log_scale(log_scale, min_temperature, max_temperature):
    """A learnable temperature: `log_scale` [] f32 is log(1/temperature); the result is
    exp(-log_scale) clipped to [min_temperature, max_temperature] (the clip's gradient is zero
    outside the range, so the parameter stops moving there)."""
    return jnp.clip(jnp.exp(-log_scale), min_temperature, max_temperature)


def init_log_scale(temperature):
    """Initial value of the learnable log(1/temperature) parameter, [] float32."""
    return jnp.log(1.0 / jnp.asarray(temperature, jnp.float32))
