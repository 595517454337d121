"""The jitted train step over a Mesh with a 'data' axis: plain or GradCache, optional
learnable temperature and MoCo-style memory bank.

    step_fn = make_train_step(enc, cfg, mesh, group_size=1 + H)
    state, metrics = step_fn(state, batch)     # batch: the pipeline's dict, global arrays

Shardings are stated here: the state is replicated (the memory bank is sharded along 'data'),
every batch array is sharded along 'data' on its first axis, metrics are replicated. The state
is donated. The body runs as `jax.shard_map` over 'data': each device encodes its own queries
and documents; the contrastive loss gathers documents from every device (full global in-batch
matrix), and because parameters enter replicated, their gradients are summed over devices by
the transpose of the implicit broadcast (shard_map's varying-axis tracking).

Randomness: the dropout key of a step is fold_in(fold_in(key(seed), step), device index), so a
resumed run, and 2 processes x 4 devices vs 1 x 8, draw the same masks.

GradCache (`train.grad_cache_chunk = s`, `negjax.grad_cache`): each device splits its `b`
queries into `b/s` sub-batches (and their documents), (1) encodes them with no activations
kept, (2) takes the loss gradient w.r.t. all embeddings (across devices), (3) re-encodes each
sub-batch with the same dropout key and back-propagates its cached embedding gradient. Peak
activation memory is that of one sub-batch; the result equals the plain step's gradient.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from negjax.config import Config
from negjax.errors import NegjaxError
from negjax.grad_cache import (backprop_sub_batches, embed_sub_batches, merge_sub_batches,
                               split_sub_batches, sub_batch_keys)
from negjax.losses import contrastive_loss_and_metrics, temperature_from_log_scale
from negjax.train.state import TrainState, make_optimizer

AXIS = "data"
BATCH_KEYS = ("q_tokens", "q_mask", "d_tokens", "d_mask", "doc_ids", "query_pos_ids")


def temperature_of(params, cfg: Config):
    if "log_scale" in params:
        return temperature_from_log_scale(params["log_scale"], cfg.loss.min_temperature,
                                          cfg.loss.max_temperature)
    return jnp.asarray(cfg.loss.temperature, jnp.float32)


def state_shardings(state: TrainState, mesh) -> TrainState:
    """Replicated everywhere except the memory bank (sharded along 'data')."""
    rep = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(AXIS))
    out = jax.tree.map(lambda _: rep, state)
    if state.bank is not None:
        out = out.replace(bank=sharded, bank_ids=sharded)
    return out


def state_specs(state: TrainState) -> TrainState:
    out = jax.tree.map(lambda _: P(), state)
    if state.bank is not None:
        out = out.replace(bank=P(AXIS), bank_ids=P(AXIS))
    return out


def place_state(state: TrainState, mesh) -> TrainState:
    return jax.device_put(state, state_shardings(state, mesh))


def _is_varying(x) -> bool:
    return AXIS in jax.typeof(x).manual_axis_type.varying


def vary(tree):
    """Mark replicated values as device-varying, so gradients w.r.t. them stay local (no
    all-reduce per GradCache sub-batch); one psum at the end sums them."""
    def cast(x):
        if _is_varying(x):
            return x
        return lax.pcast(x, AXIS, to="varying")
    return jax.tree.map(cast, tree)


def dropout_keys(seed: int, step):
    """(query key, document key) of `step` on this device (inside shard_map over 'data')."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), lax.axis_index(AXIS))
    return jax.random.split(key)


def tower_fn(enc):
    """`towers(params, x)`: one (sub-)batch x = (q tokens, q mask, d tokens, d mask, q key, d key)
    -> (query, document) embeddings, dropout on (keys None: off). The encode of the step and of
    `negjax bench step`'s breakdown."""
    def towers(p, x):
        qt, qm, dt, dm, kq, kd = x
        return (enc.encode(p, qt, qm, tower="query", rng=kq, deterministic=kq is None),
                enc.encode(p, dt, dm, tower="doc", rng=kd, deterministic=kd is None))
    return towers


def sub_batches(batch, rq, rd, n: int):
    """The step's batch as `n` GradCache sub-batches for `tower_fn` (leading axis n), each with
    its own dropout keys (`sub_batch_keys`)."""
    split = lambda x: split_sub_batches(x, n)  # noqa: E731
    return (split(batch["q_tokens"]), split(batch["q_mask"]), split(batch["d_tokens"]),
            split(batch["d_mask"]), sub_batch_keys(rq, n), sub_batch_keys(rd, n))


def make_train_step(enc, cfg: Config, mesh, *, group_size: int):
    """Build the jitted step `(state, batch) -> (state, metrics)`; see the module docstring."""
    G = group_size
    seed = cfg.train.seed
    sym = cfg.loss.symmetric
    chunk = cfg.loss.chunk_size or None
    gc = cfg.train.grad_cache_chunk
    momentum = cfg.loss.momentum
    opt = make_optimizer(cfg.train)

    def encode(params, tokens, mask, tower, rng):
        return enc.encode(params, tokens, mask, tower=tower, rng=rng,
                          deterministic=rng is None)

    def loss_of_embeddings(q, d, temp, batch, bank, bank_ids):
        return contrastive_loss_and_metrics(
            q, d, group_size=G, temperature=temp, query_pos_ids=batch["query_pos_ids"],
            doc_ids=batch["doc_ids"], symmetric=sym, chunk_size=chunk,
            extra_docs=bank, extra_doc_ids=bank_ids, collective=cfg.loss.collective)

    towers = tower_fn(enc)

    def plain_grads(params, batch, rq, rd, bank, bank_ids):
        # The keys of GradCache's first sub-batch: with one sub-batch both draw the same masks.
        x = jax.tree.map(lambda a: a[0], sub_batches(batch, rq, rd, 1))

        def loss_fn(p):
            q, d = towers(p["model"], x)
            loss, metrics = loss_of_embeddings(q, d, temperature_of(p, cfg), batch, bank, bank_ids)
            return loss, metrics
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, metrics, grads

    def cached_grads(params, batch, rq, rd, bank, bank_ids):
        b = batch["q_tokens"].shape[0]
        if b % gc:
            raise NegjaxError(f"train.grad_cache_chunk={gc} must divide the per-device batch {b}")
        xs = sub_batches(batch, rq, rd, b // gc)
        model = vary(params["model"])
        # (1) embeddings of every sub-batch, no activations kept
        q, d = jax.tree.map(merge_sub_batches, embed_sub_batches(towers, model, xs))

        # (2) loss gradient w.r.t. the embeddings (the loss gathers across devices)
        def emb_loss(q, d, p_temp):
            return loss_of_embeddings(q, d, temperature_of(p_temp, cfg), batch, bank, bank_ids)
        temp_params = {k: v for k, v in params.items() if k != "model"}
        (loss, metrics), (gq, gd, gtemp) = jax.value_and_grad(emb_loss, argnums=(0, 1, 2),
                                                              has_aux=True)(q, d, temp_params)

        # (3) re-encode each sub-batch (same keys) and back-propagate its cached gradient
        n = b // gc
        cts = (split_sub_batches(gq, n), split_sub_batches(gd, n))
        gmodel = lax.psum(backprop_sub_batches(towers, model, xs, cts), AXIS)
        return loss, metrics, {"model": gmodel, **gtemp}

    def body(state: TrainState, batch):
        params = state.params
        loss, metrics, grads = grads_body(params, batch, state.step, state.bank, state.bank_ids)
        gnorm = optax.tree.norm(grads)
        updates, new_opt = opt.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(params=keep(new_params, params), opt_state=keep(new_opt, state.opt_state),
                                  step=state.step + 1, nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
        if state.bank is not None:
            new_state = _update_bank(new_state, state, batch, ok)
        metrics = dict(metrics, loss=loss, grad_norm=gnorm, temperature=temperature_of(params, cfg),
                       skipped=(~ok).astype(jnp.float32))
        return new_state, metrics

    def _update_bank(new_state, old, batch, ok):
        # EMA of the document tower, then enqueue this step's documents encoded by it.
        doc_params = enc.tower_params(new_state.params["model"], "doc")
        ema_tower = enc.tower_params(old.ema, "doc")
        new_tower = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_tower, doc_params)
        if enc.tied_towers:
            ema = {"encoder": new_tower}
        else:
            ema = dict(old.ema, doc=new_tower)
        # The momentum encoder honours GradCache: one sub-batch's activations at a time.
        n = batch["q_tokens"].shape[0] // gc if gc else 1
        xs = (split_sub_batches(batch["d_tokens"], n), split_sub_batches(batch["d_mask"], n))
        keys = merge_sub_batches(embed_sub_batches(
            lambda p, x: encode(p, x[0], x[1], "doc", None), ema, xs))
        ids = batch["doc_ids"].astype(jnp.int32)
        n_new = keys.shape[0]
        ptr = old.bank_ptr
        bank = lax.dynamic_update_slice(old.bank, keys.astype(old.bank.dtype), (ptr, 0))
        bank_ids = lax.dynamic_update_slice(old.bank_ids, ids, (ptr,))
        local_k = old.bank.shape[0]
        keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
        return new_state.replace(
            ema=jax.tree.map(keep, ema, old.ema), bank=keep(bank, old.bank),
            bank_ids=keep(bank_ids, old.bank_ids),
            bank_ptr=keep((ptr + n_new) % local_k, ptr))

    batch_spec = {k: P(AXIS) for k in BATCH_KEYS}

    def grads_body(params, batch, step, bank, bank_ids):
        rq, rd = dropout_keys(seed, step)
        compute = cached_grads if gc else plain_grads
        out = compute(params, batch, rq, rd, bank, bank_ids)
        if mesh.shape[AXIS] == 1:
            # On a single device the loss takes its collective-free path, whose results are
            # still typed device-varying; a psum over the size-1 axis marks them replicated.
            out = jax.tree.map(lambda x: lax.psum(x, AXIS) if _is_varying(x) else x, out)
        return out

    def loss_and_grads(params, batch, step, bank=None, bank_ids=None):
        bspec = None if bank is None else P(AXIS)
        fn = jax.shard_map(grads_body, mesh=mesh,
                           in_specs=(P(), batch_spec, P(), bspec, bspec), out_specs=P())
        return fn(params, {k: batch[k] for k in BATCH_KEYS}, step, bank, bank_ids)

    def step(state: TrainState, batch):
        if state.bank is not None:
            local_k = state.bank.shape[0] // mesh.shape[AXIS]
            local_docs = batch["d_tokens"].shape[0] // mesh.shape[AXIS]
            if local_k % local_docs:
                raise NegjaxError(f"loss.memory_bank_size={state.bank.shape[0]}: each device's "
                                  f"share ({local_k}) must be a multiple of its documents per "
                                  f"step ({local_docs})")
        specs = state_specs(state)
        fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, batch_spec),
                           out_specs=(specs, P()))
        return fn(state, {k: batch[k] for k in BATCH_KEYS})

    jitted = jax.jit(step, donate_argnums=(0,))
    # (params, batch, step[, bank, bank_ids]) -> (loss, metrics, grads): the step's gradient
    # computation alone, for tests and the benchmark breakdown.
    jitted.loss_and_grads = jax.jit(loss_and_grads)
    return jitted


def batch_shardings(mesh) -> dict:
    return {k: NamedSharding(mesh, P(AXIS)) for k in BATCH_KEYS}
