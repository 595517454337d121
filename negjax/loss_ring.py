"""The ring variant of the contrastive loss's core (Inf-CL, arXiv 2410.17243): column
pieces travel around the devices of a mesh axis with `lax.ppermute` instead of being
gathered; see `negjax.losses` ("Ring"). `ring_ce` is the entry point.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from negjax.loss_blocks import (_ANY_HI, _ANY_LO, _PRECISION, _bwd_block, _finish_forward,
                                _fwd_block, _init_carry, _inv_norm, _match_vma, _pad_cols)


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


def _ring_rows(rows, targets, row_keys, guard, window, chunk):
    """The rows in tiles of `chunk` (so a block's logits are [chunk, chunk], not [b, chunk]):
    padding rows have target -2 (no column has it), no keys, no guard (+inf) and an
    unrestricted window."""
    r = rows.shape[0] if chunk is None else min(chunk, rows.shape[0])
    if window is not None:
        window = (_row_tiles(window[0], r, _ANY_LO), _row_tiles(window[1], r, _ANY_HI))
    return (_row_tiles(rows, r, 0.0), _row_tiles(targets, r, -2), _row_tiles(row_keys, r, -1),
            _row_tiles(guard, r, jnp.inf), window, r)


def _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids, guard, window, chunk,
                  with_stats, axis, precision):
    n = lax.axis_size(axis)
    perm = [(i, (i + 1) % n) for i in range(n)]
    b = rows.shape[0]
    blocks, key_blocks, ids, valid, _ = _ring_pieces(cols, col_keys, col_ids, chunk)
    rows_t, targets_t, keys_t, guard_t, window_t, r = _ring_rows(rows, targets, row_keys, guard,
                                                                  window, chunk)
    inv_t = _row_tiles(_inv_norm(rows), r, 1.0) if with_stats else None
    nt = rows_t.shape[0]
    carry0 = jax.tree.map(lambda x: _row_tiles(x, r, 0.0),
                          _init_carry(rows, with_stats, cols, scale))

    def fold(carry, blk, bids, bvalid, kblk):  # one piece into every row tile's state
        def tile(_, xs):
            c, rw, tg, rk, ir, gd, wd = xs
            return None, _fwd_block(c, rw, blk, bids, bvalid, kblk, scale, tg, rk, ir, precision,
                                    gd, wd)
        _, carry = lax.scan(tile, None, (carry, rows_t, targets_t, keys_t, inv_t, guard_t,
                                         window_t))
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


@partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _ring_ce(rows, cols, scale, targets, row_keys, col_keys, col_ids, guard, window, chunk,
             with_stats, axis, precision):
    """`_chunked_ce` over the columns of every device of `axis`, without gathering them: each
    piece of this device's columns `cols [m, D]` (global ids `col_ids [m]`, -1 = nobody's
    target) visits every device once, which folds it into its rows' online log-sum-exp, a
    tile of `chunk` rows at a time."""
    loss_sum, stats, _ = _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids,
                                       guard, window, chunk, with_stats, axis, precision)
    return loss_sum, stats


def _ring_ce_fwd(rows, cols, scale, targets, row_keys, col_keys, col_ids, guard, window, chunk,
                 with_stats, axis, precision):
    loss_sum, stats, lse = _ring_forward(rows, cols, scale, targets, row_keys, col_keys, col_ids,
                                         guard, window, chunk, with_stats, axis, precision)
    return (loss_sum, stats), (rows, cols, scale, targets, row_keys, col_keys, col_ids, guard,
                               window, lse)


def _ring_ce_bwd(chunk, with_stats, axis, precision, res, cotangents):
    rows, cols, scale, targets, row_keys, col_keys, col_ids, guard, window, lse = res
    g = cotangents[0]
    n = lax.axis_size(axis)
    perm = [(i, (i + 1) % n) for i in range(n)]
    b = rows.shape[0]
    m, dim = cols.shape
    blocks, key_blocks, ids, valid, nblocks = _ring_pieces(cols, col_keys, col_ids, chunk)
    rows_t, targets_t, keys_t, guard_t, window_t, r = _ring_rows(rows, targets, row_keys, guard,
                                                                  window, chunk)
    lse_t = _row_tiles(lse, r, jnp.inf)   # padding rows: p = exp(-inf) = 0, no gradient

    def grads(dr, blk, bids, bvalid, kblk):  # one piece against every row tile
        def tile(dblk, xs):
            rw, tg, rk, ls, gd, wd = xs
            d_rows, d_scale, d_blk = _bwd_block(rw, blk, bids, bvalid, kblk, scale, tg, rk, ls, g,
                                                precision, gd, wd)
            return dblk + d_blk, (d_rows, d_scale)
        dblk0 = _match_vma(jnp.zeros_like(blk), rows, cols, scale)
        dblk, (d_rows, d_scale) = lax.scan(tile, dblk0, (rows_t, targets_t, keys_t, lse_t, guard_t,
                                                         window_t))
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
    return drows, dcols, dscale.astype(scale.dtype), None, None, None, None, None, None


_ring_ce.defvjp(_ring_ce_fwd, _ring_ce_bwd)


def ring_ce(rows, cols, scale, targets, row_keys, col_keys, col_ids, chunk, with_stats, axis,
            precision=_PRECISION, guard=None, window=None):
    """`loss_blocks.ce` over the columns of every device of `axis` (this device holds `cols`,
    global ids `col_ids`), passed around the ring. `window`: the rows' windows of global
    column ids (`loss_blocks.group_windows`); memory-bank columns (id -1) lie outside every
    restricted one."""
    rows, cols, scale = _match_vma((rows, cols, scale), rows, cols, scale)
    return _ring_ce(rows, cols, scale, targets, row_keys, col_keys, col_ids, guard, window, chunk,
                    with_stats, axis, precision)
