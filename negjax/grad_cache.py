"""Sub-batched encoding and GradCache (Gao et al. 2021), one implementation for the train step,
the step benchmark's breakdown and any encode that must not hold a whole batch's activations.

    xs = (split_sub_batches(tokens, n), split_sub_batches(mask, n), sub_batch_keys(key, n))
    emb = embed_sub_batches(fn, params, xs)              # [n, m, D]; activations of one
                                                         # sub-batch at a time, no gradient
    grads = backprop_sub_batches(fn, params, xs, ct)     # sum_i vjp(fn(., xs[i]))(ct[i])

`fn(params, x) -> outputs` encodes one sub-batch `x` (a pytree slice of `xs` along its
leading axis); the outputs may be any pytree (e.g. the query and document embeddings).
GradCache is: embed every sub-batch without activations, take the loss gradient w.r.t. the
embeddings (`ct`), then re-encode each sub-batch with the same inputs and dropout keys and
back-propagate its slice of `ct`, accumulating parameter gradients in a `lax.scan`. Peak
activation memory is that of one sub-batch; the result equals the gradient of the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def split_sub_batches(x, n: int):
    """[n*m, ...] -> [n, m, ...] (consecutive rows form a sub-batch)."""
    if x.shape[0] % n:
        raise ValueError(f"{x.shape[0]} rows do not split into {n} equal sub-batches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def merge_sub_batches(x):
    """[n, m, ...] -> [n*m, ...], the inverse of `split_sub_batches`."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def sub_batch_keys(key, n: int):
    """One PRNG key per sub-batch: fold_in(key, i), i < n. With n = 1 the single key is the
    one a whole-batch step uses, so plain and sub-batched steps draw the same dropout masks."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def embed_sub_batches(fn: Callable, params, xs):
    """`fn(params, xs[i])` for every sub-batch i, stacked on a leading axis, computed one
    sub-batch at a time with no gradient (nothing kept for a backward pass)."""
    def body(_, x):
        return None, lax.stop_gradient(fn(params, x))
    _, out = lax.scan(body, None, xs)
    return out


def backprop_sub_batches(fn: Callable, params, xs, cotangents):
    """sum_i of the parameter cotangent of `fn(., xs[i])` at `cotangents[i]`: each sub-batch
    is re-encoded (same inputs, same keys) and back-propagated on its own. `cotangents` has
    the structure of `fn`'s outputs, stacked like `embed_sub_batches` returns them."""
    def body(acc, x_ct):
        x, ct = x_ct
        _, vjp = jax.vjp(lambda p: fn(p, x), params)
        (g,) = vjp(ct)
        return jax.tree.map(jnp.add, acc, g), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = lax.scan(body, zeros, (xs, cotangents))
    return grads
