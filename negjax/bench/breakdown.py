"""The time breakdown of `negjax bench step`: the encoder's forward and backward, the loss and
its gradient, and the all-gather, each jitted alone, timed round-robin with the whole step and
with the step's gradient computation (`TrainStep.loss_and_grads`). The loss piece is the train
step's own loss (`negjax.train.step.embedding_loss` of the same `LossSpec`)."""

from __future__ import annotations

import time

from negjax.errors import NegjaxError


def summary(times: list[float]) -> dict:
    import numpy as np

    a = np.asarray(times)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "min_s": float(a.min()), "max_s": float(a.max()),
            "all_s": [round(t, 6) for t in times]}


# ---------------------------------------------------------------------------------------
# Breakdown pieces
# ---------------------------------------------------------------------------------------

def pieces(enc, cfg, mesh, group_size: int):
    """Jitted functions (params, batch, q_emb, d_emb, ct_q, ct_d) -> outputs for the
    encoder / loss / gather pieces; see the module docstring."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from negjax.grad_cache import backprop_sub_batches, embed_sub_batches, split_sub_batches
    from negjax.distributed import batch_axes
    from negjax.losses import LossSpec
    from negjax.train.sharding import vary
    from negjax.train.step import dropout_keys, embedding_loss, sub_batches, tower_fn

    axis, G, gc = "data", group_size, cfg.train.grad_cache_chunk
    seed = cfg.train.seed

    def encode(p, t, m, tower, key):
        return enc.encode(p, t, m, tower=tower, rng=key, deterministic=False)

    towers = tower_fn(enc)

    def encoder_body(params, qt, qm, dt, dm, cq, cd):
        kq, kd = dropout_keys(seed, 0)
        b = qt.shape[0]
        if gc and b % gc:
            raise NegjaxError(f"--grad-cache {gc} must divide the per-device batch {b}")
        n = b // gc if gc else 1
        xs = sub_batches({"q_tokens": qt, "q_mask": qm, "d_tokens": dt, "d_mask": dm}, kq, kd, n)
        if not gc:  # the plain step: one forward with activations, one backward
            _, vjp = jax.vjp(lambda p: towers(p, jax.tree.map(lambda a: a[0], xs)), params)
            return vjp((cq, cd))[0]  # invariant params: the transpose sums over devices
        model = vary(params)
        q, d = embed_sub_batches(towers, model, xs)
        # The embeddings feed the cotangents (as the loss gradient does in the step), so
        # the first pass is not dead code.
        cts = (split_sub_batches(cq, n) + 0 * q, split_sub_batches(cd, n) + 0 * d)
        return lax.psum(backprop_sub_batches(towers, model, xs, cts), axis)

    # The train step's own loss (`embedding_loss` of the same `LossSpec`): precision,
    # Matryoshka, the guard, distillation and the memory bank's columns included.
    loss_of_embeddings = embedding_loss(
        LossSpec.from_config(cfg.loss, group_size=G, renormalize=enc.normalize), cfg.loss)

    def loss_body(q, d, batch, temp, bank, bank_ids):
        def f(q, d):
            return loss_of_embeddings(q, d, temp, batch, bank, bank_ids)
        (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(q, d)
        # Metrics are returned so that their computation (part of the step's loss) is kept.
        return loss.reshape(1), jax.tree.map(lambda x: x.reshape(1), metrics), grads

    def gather_body(d):
        y, vjp = jax.vjp(lambda x: lax.all_gather(x, axis, tiled=True), d)
        return vjp(y)[0]

    S, R = P(axis), P()
    encoder = jax.jit(jax.shard_map(encoder_body, mesh=mesh, in_specs=(R, S, S, S, S, S, S),
                                    out_specs=R))
    B = P(batch_axes(mesh))
    loss = jax.jit(jax.shard_map(loss_body, mesh=mesh, in_specs=(B, B, B, R, B, B),
                                 out_specs=(B, B, (B, B))))
    gather = jax.jit(jax.shard_map(gather_body, mesh=mesh, in_specs=S, out_specs=S))
    return encoder, loss, gather


def breakdown(enc, cfg, mesh, group_size, holder, compiled, step_fn, batch, n: int) -> dict:
    """Median times of the pieces and of the whole step, run round-robin (`n` rounds) so
    that load from elsewhere on the machine affects all of them alike. `holder["state"]`
    is the live train state (the step donates it, so it is replaced at every call)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from negjax.train.step import temperature_of

    encoder, loss, gather = pieces(enc, cfg, mesh, group_size)
    sh = NamedSharding(mesh, P("data"))
    B, D = batch["q_tokens"].shape[0], enc.dim
    kq, kd, kcq, kcd = jax.random.split(jax.random.key(1), 4)

    def unit(k, rows):
        x = jax.random.normal(k, (rows, D), jnp.float32)
        return jax.device_put(x / jnp.linalg.norm(x, axis=1, keepdims=True), sh)
    q, d = unit(kq, B), unit(kd, B * group_size)
    cq = jax.device_put(1e-3 * jax.random.normal(kcq, q.shape), sh)
    cd = jax.device_put(1e-3 * jax.random.normal(kcd, d.shape), sh)

    loss_batch = {k: batch[k] for k in ("query_pos_ids", "doc_ids", "teacher_scores") if k in batch}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    calls = {
        "step": step,
        "grads": lambda: step_fn.loss_and_grads(holder["state"].params, batch, holder["state"].step,
                                                holder["state"].bank, holder["state"].bank_ids),
        "encoder": lambda: encoder(holder["state"].params["model"], batch["q_tokens"],
                                   batch["q_mask"], batch["d_tokens"], batch["d_mask"], cq, cd),
        "loss": lambda: loss(q, d, loss_batch, temperature_of(holder["state"].params, cfg),
                             holder["state"].bank, holder["state"].bank_ids),
        "gather": lambda: gather(d),
    }
    first = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(call())  # compilation + first run
        first[name] = time.perf_counter() - t0
    times: dict = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    return {name: dict(summary(times[name]), first_call_s=first[name]) for name in calls}
