"""The contrastive loss's kernels on one device: masks, in-batch statistics, the dense
cross-entropy and the chunked one (online log-sum-exp with a recomputing custom VJP), and
the block functions the ring (`negjax.loss_ring`) shares. `negjax.losses` documents the
contract; `ce` is the entry point.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

# TPUs/GPUs would otherwise run f32 matmuls in bf16/tf32; logits are divided by a small
# temperature, so their error would be amplified ~20x.
_PRECISION = lax.Precision.HIGHEST
PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
              "default": lax.Precision.DEFAULT}
EMPTY = -2  # the key of an empty memory-bank slot: such a column is not in the softmax
_ANY_LO, _ANY_HI = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max  # an unrestricted window


# ---------------------------------------------------------------------------------------
# Masks and the dense core
# ---------------------------------------------------------------------------------------

def _key_match(row_keys, col_keys):
    """[b, Pr] int, [c, Pc] int -> [b, c] bool: some non-negative key of the row equals a key
    of the column (-1 padding never matches)."""
    eq = row_keys[:, None, :, None] == col_keys[None, :, None, :]
    eq = eq & (row_keys[:, None, :, None] >= 0)
    return eq.any(axis=(2, 3))


def group_windows(in_batch, first, width):
    """The column window of each row when in-batch negatives are off ("In-batch negatives
    off" in `negjax.losses`): (lo [b], hi [b]) int32 such that row r may only score columns
    whose global id is in [lo[r], hi[r]). A row whose flag `in_batch [b]` (bool) is False gets
    its own group, the `width` columns from `first [b]` (its target); a row whose flag is True
    gets an unrestricted window. None when `in_batch` is None (every row sees every column)."""
    if in_batch is None:
        return None
    first = first.astype(jnp.int32)
    return (jnp.where(in_batch, _ANY_LO, first), jnp.where(in_batch, _ANY_HI, first + width))


def _block_masks(col_ids, valid, targets, row_keys, col_keys, sim=None, guard=None, window=None):
    """(onehot, neg, guarded) [b, c] bool for a block of columns with global ids `col_ids [c]`
    (-1 for columns that are nobody's target: memory-bank columns, padding) and `valid [c]`
    (False for padding): the target column, the columns that enter the softmax as negatives,
    and the negatives the false-negative guard removed (None without a guard): those whose
    similarity `sim [b, c]` (no gradient) exceeds the row's threshold `guard [b]`. With
    `window` (lo [b], hi [b], see `group_windows`) a column whose id is outside the row's
    [lo, hi) is no negative of that row (nor a guarded one)."""
    if col_keys is not None:  # empty memory-bank slots are no columns at all
        valid = valid & (col_keys[:, 0] != EMPTY)
    onehot = col_ids[None, :] == targets[:, None]
    neg = ~onehot & valid[None, :]
    if window is not None:
        lo, hi = window
        neg = neg & (col_ids[None, :] >= lo[:, None]) & (col_ids[None, :] < hi[:, None])
    if row_keys is not None:
        neg = neg & ~_key_match(row_keys, col_keys)
    guarded = None
    if guard is not None:
        guarded = neg & (lax.stop_gradient(sim) > guard[:, None])
        neg = neg & ~guarded
    return onehot, neg, guarded


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


def _block_stats(sim, onehot, neg, inv_r, inv_c, guarded=None):
    """Per-row statistics of one column block (no gradient): target similarity / cosine,
    hardest negative similarity / cosine, sum and count of negative cosines, count of
    negatives removed by the false-negative guard."""
    cos = sim * inv_r[:, None] * inv_c[None, :]
    ninf = jnp.float32(-jnp.inf)
    return dict(
        guarded=(jnp.zeros(sim.shape[:1], jnp.float32) if guarded is None
                 else jnp.sum(guarded, axis=1).astype(jnp.float32)),
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
        guarded=jnp.sum(s["guarded"]),
    )


def _dense_ce(rows, cols, scale, targets, row_keys, col_keys, with_stats, precision=_PRECISION,
              guard=None, window=None):
    """Sum over rows of softmax cross-entropy, materialising the [b, N] logits.

    rows [b, D] f32, cols [N, D] f32, scale [] f32 (1/temperature), targets [b] int (column
    of each row's target), row_keys [b, Pr] / col_keys [N, Pc] int or None, guard [b] f32 or
    None (the false-negative guard's similarity threshold per row), window (lo [b], hi [b])
    int32 or None (the columns 0..N-1 each row may score, `group_windows`).
    Returns (loss_sum [] f32, stats dict of [] f32 sums, or None)."""
    sim = jnp.matmul(rows, cols.T, precision=precision)
    logits = sim * scale
    ids = jnp.arange(cols.shape[0])
    onehot, neg, guarded = _block_masks(ids, ids >= 0, targets, row_keys, col_keys, sim, guard,
                                        window)
    lse = jax.nn.logsumexp(jnp.where(onehot | neg, logits, -jnp.inf), axis=1)
    tgt = jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    loss_sum = jnp.sum(lse - tgt)
    if not with_stats:
        return loss_sum, None
    sg = lax.stop_gradient
    stats = _block_stats(sg(sim), onehot, neg, _inv_norm(sg(rows)), _inv_norm(sg(cols)), guarded)
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
                   hard_cos=jnp.full((b,), ninf), neg_cos=zeros, neg_count=zeros, guarded=zeros)
    return _match_vma((jnp.full((b,), ninf), zeros, zeros, st0), rows, *refs)


def _fwd_block(carry, rows, blk, ids, valid, kblk, scale, targets, row_keys, inv_r,
               precision=_PRECISION, guard=None, window=None):
    """Fold one block of columns into the online log-sum-exp state `carry`."""
    m, l, tgt, st = carry
    ninf = jnp.float32(-jnp.inf)
    sim = jnp.matmul(rows, blk.T, precision=precision)
    logits = sim * scale
    onehot, neg, guarded = _block_masks(ids, valid, targets, row_keys, kblk, sim, guard, window)
    keep = onehot | neg
    m_new = jnp.maximum(m, jnp.max(jnp.where(keep, logits, ninf), axis=1))
    # Rows whose columns so far were all masked keep m = -inf; shift by 0 then.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    l = l * jnp.exp(m - shift) + jnp.sum(jnp.where(keep, jnp.exp(logits - shift[:, None]), 0.0), axis=1)
    tgt = tgt + jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    if st is not None:
        s = _block_stats(sim, onehot, neg, inv_r, _inv_norm(blk), guarded)
        st = dict(
            tgt_sim=st["tgt_sim"] + s["tgt_sim"], pos_cos=st["pos_cos"] + s["pos_cos"],
            best_neg_sim=jnp.maximum(st["best_neg_sim"], s["best_neg_sim"]),
            hard_cos=jnp.maximum(st["hard_cos"], s["hard_cos"]),
            neg_cos=st["neg_cos"] + s["neg_cos"], neg_count=st["neg_count"] + s["neg_count"],
            guarded=st["guarded"] + s["guarded"])
    return m_new, l, tgt, st


def _finish_forward(carry, with_stats):
    """(loss sum, stats or None, lse [b]) of a finished online log-sum-exp state."""
    m, l, tgt, st = carry
    lse = m + jnp.log(l)
    return jnp.sum(lse - tgt), (_finish_stats(st) if with_stats else None), lse


def _bwd_block(rows, blk, ids, valid, kblk, scale, targets, row_keys, lse, g,
               precision=_PRECISION, guard=None, window=None):
    """One block's share of the backward pass: (d rows, d scale, d block)."""
    sim = jnp.matmul(rows, blk.T, precision=precision)
    logits = sim * scale
    onehot, neg, _ = _block_masks(ids, valid, targets, row_keys, kblk, sim, guard, window)
    p = jnp.where(onehot | neg, jnp.exp(logits - lse[:, None]), 0.0)
    dlogits = g * (p - onehot.astype(jnp.float32))       # d loss_sum / d logits
    dsim = dlogits * scale
    return (jnp.matmul(dsim, blk, precision=precision), jnp.sum(dlogits * sim),
            jnp.matmul(dsim.T, rows, precision=precision))


def _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, guard, window, chunk,
                     with_stats, precision):
    blocks, key_blocks, ids, valid, _ = _pad_cols(cols, col_keys, chunk)
    inv_r = _inv_norm(rows) if with_stats else None

    def step(carry, xs):
        blk, kblk, bids, bvalid = xs
        return _fwd_block(carry, rows, blk, bids, bvalid, kblk, scale, targets, row_keys, inv_r,
                          precision, guard, window), None

    carry, _ = lax.scan(step, _init_carry(rows, with_stats, cols, scale),
                        (blocks, key_blocks, ids, valid))
    return _finish_forward(carry, with_stats)


@partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _chunked_ce(rows, cols, scale, targets, row_keys, col_keys, guard, window, chunk, with_stats,
                precision):
    """Same contract as `_dense_ce`, with columns processed `chunk` at a time."""
    loss_sum, stats, _ = _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, guard,
                                          window, chunk, with_stats, precision)
    return loss_sum, stats


def _chunked_ce_fwd(rows, cols, scale, targets, row_keys, col_keys, guard, window, chunk,
                    with_stats, precision):
    loss_sum, stats, lse = _chunked_forward(rows, cols, scale, targets, row_keys, col_keys, guard,
                                            window, chunk, with_stats, precision)
    return (loss_sum, stats), (rows, cols, scale, targets, row_keys, col_keys, guard, window, lse)


def _chunked_ce_bwd(chunk, with_stats, precision, res, cotangents):
    rows, cols, scale, targets, row_keys, col_keys, guard, window, lse = res
    g = cotangents[0]  # the statistics carry no gradient
    n, dim = cols.shape
    blocks, key_blocks, ids, valid, nblocks = _pad_cols(cols, col_keys, chunk)

    def step(carry, xs):
        blk, kblk, bids, bvalid = xs
        drows, dscale = carry
        dr, ds, dblk = _bwd_block(rows, blk, bids, bvalid, kblk, scale, targets, row_keys, lse, g,
                                  precision, guard, window)
        return (drows + dr, dscale + ds), dblk

    init = _match_vma((jnp.zeros_like(rows), jnp.zeros((), jnp.float32)), rows, cols, scale)
    (drows, dscale), dblocks = lax.scan(step, init, (blocks, key_blocks, ids, valid))
    dcols = dblocks.reshape(nblocks * chunk, dim)[:n]
    return drows, dcols, dscale.astype(scale.dtype), None, None, None, None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def ce(rows, cols, scale, targets, row_keys, col_keys, chunk, with_stats, precision=_PRECISION,
       guard=None, window=None):
    """Sum over rows of softmax cross-entropy (+ statistics): dense, or chunked when `chunk`
    is smaller than the column count. `guard [b]`, `window (lo [b], hi [b])`: see
    `_dense_ce`."""
    if chunk is None or chunk >= cols.shape[0]:
        return _dense_ce(rows, cols, scale, targets, row_keys, col_keys, with_stats, precision,
                         guard, window)
    # Inside shard_map the custom VJP's cotangents must have their primals' device-variance;
    # they are computed from all three, so give all three the same variance up front (the
    # transpose of this cast sums e.g. a replicated scale's per-device cotangents).
    rows, cols, scale = _match_vma((rows, cols, scale), rows, cols, scale)
    return _chunked_ce(rows, cols, scale, targets, row_keys, col_keys, guard, window, chunk,
                       with_stats, precision)
