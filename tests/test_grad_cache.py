"""The shared sub-batch / GradCache helper against whole-batch autodiff (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from negjax.grad_cache import (backprop_sub_batches, embed_sub_batches, merge_sub_batches,
                               split_sub_batches, sub_batch_keys)


def _encode(p, x):
    """A small nonlinear 'encoder' with dropout driven by the sub-batch's key."""
    tokens, key = x
    h = jnp.tanh(tokens @ p["w1"] + p["b"])
    keep = jax.random.bernoulli(key, 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0)
    return h @ p["w2"], jnp.sum(h, axis=1)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcache_equals_whole_batch_gradient(n):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        p = {"w1": jnp.asarray(rng.normal(size=(5, 7))), "b": jnp.asarray(rng.normal(size=7)),
             "w2": jnp.asarray(rng.normal(size=(7, 3)))}
        tokens = jnp.asarray(rng.normal(size=(8, 5)))
        keys = sub_batch_keys(jax.random.key(3), n)
        xs = (split_sub_batches(tokens, n), keys)
        target = jnp.asarray(rng.normal(size=(8, 3)))

        def loss_of(emb, aux):  # couples all rows, like the contrastive loss
            return jnp.sum(jax.nn.log_softmax(emb @ target.T, axis=1)) + jnp.sum(aux ** 2)

        def whole(p):  # the reference: one differentiable pass over every sub-batch
            outs = [_encode(p, (xs[0][i], keys[i])) for i in range(n)]
            return loss_of(jnp.concatenate([o[0] for o in outs]),
                           jnp.concatenate([o[1] for o in outs]))
        want = jax.grad(whole)(p)

        emb, aux = embed_sub_batches(_encode, p, xs)
        assert emb.shape == (n, 8 // n, 3)
        g_emb, g_aux = jax.grad(loss_of, argnums=(0, 1))(merge_sub_batches(emb),
                                                         merge_sub_batches(aux))
        got = backprop_sub_batches(_encode, p, xs,
                                   (split_sub_batches(g_emb, n), split_sub_batches(g_aux, n)))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)
        # embedding carries no gradient of its own
        assert jax.grad(lambda q: embed_sub_batches(_encode, q, xs)[0].sum())(p)["w1"].max() == 0


def test_split_sizes():
    x = jnp.arange(12).reshape(6, 2)
    assert split_sub_batches(x, 3).shape == (3, 2, 2)
    np.testing.assert_array_equal(merge_sub_batches(split_sub_batches(x, 3)), x)
    with pytest.raises(ValueError, match="equal sub-batches"):
        split_sub_batches(x, 4)
