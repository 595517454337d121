"""The jitted train step over a mesh with a 'data' axis (and an 'fsdp' axis when
`distributed.fsdp` > 1): plain or GradCache, optional learnable temperature and MoCo-style
memory bank.

    step_fn = make_train_step(enc, cfg, mesh, group_size=1 + H)
    state, metrics = step_fn(state, batch)     # batch: the pipeline's dict, global arrays

Shardings (`negjax.train.sharding`): without 'fsdp' the state is replicated; with it every
parameter, its AdamW moments and its momentum-encoder copy are cut over 'fsdp'; the memory bank
(`negjax.train.memory_bank`) and every batch array are split on their first axis over the batch
axes; metrics are replicated. The state is donated.

The body runs as `jax.shard_map` over all batch axes: each device encodes its own queries and
documents; the contrastive loss gathers documents from every device (full global in-batch
matrix). Encoder parameters enter device-varying (`vary`): each device's gradient stays local
and one sum over the batch axes follows (`sum_grads`).

FSDP: the encoder runs on full parameters gathered from the shards, each transformer layer's
inside that layer (`layer_gather`, flax `map_variables`) and rematerialised, so only about one
layer's full parameters are alive at a time and the backward pass gathers again; each
gather's transpose reduce-scatters that parameter's gradient over 'fsdp' as soon as it is
computed. The optimizer updates the shards; its clip norm is the global one (`global_norm`).
Losses, gradients and updates equal the replicated step's (tests/test_step.py).

Randomness: the dropout key of a step is fold_in(fold_in(key(seed), step), device index along
the batch axes), so a resumed run, 2 processes x 4 devices vs 1 x 8, and 'data' 8 vs 'data' 2
x 'fsdp' 4 draw the same masks.

GradCache (`train.grad_cache_chunk = s`, `negjax.grad_cache`): each device splits its `b`
queries into `b/s` sub-batches (and their documents), (1) encodes them with no activations
kept, (2) takes the loss gradient w.r.t. all embeddings (across devices), (3) re-encodes each
sub-batch with the same dropout key and back-propagates its cached embedding gradient. Peak
activation memory is that of one sub-batch; the result equals the plain step's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from negjax.config import Config
from negjax.distributed import FSDP, batch_axes, batch_devices
from negjax.errors import NegjaxError
from negjax.grad_cache import (backprop_sub_batches, embed_sub_batches, merge_sub_batches,
                               split_sub_batches, sub_batch_keys)
from negjax.losses import LossSpec, distillation_loss, temperature_from_log_scale
from negjax.train.diagnostics import SAMPLE
from negjax.train.memory_bank import check_bank, update_bank
from negjax.model.lora import combine, split_trainable
from negjax.train.sharding import (BATCH_KEYS, _manual_axes, _varying_axes, gather_params,
                                   global_norm, layer_gather, state_specs, sum_grads, tree_specs,
                                   vary)
from negjax.train.state import TrainState, join_params, make_optimizer, split_params

def temperature_of(params, cfg: Config):
    if "log_scale" in params:
        return temperature_from_log_scale(params["log_scale"], cfg.loss.min_temperature,
                                          cfg.loss.max_temperature)
    return jnp.asarray(cfg.loss.temperature, jnp.float32)


def dropout_keys(seed: int, step):
    """(query key, document key) of `step` on this device (inside the step's shard_map): the
    device's index along the batch axes, so ('data' 8) and ('data' 2 x 'fsdp' 4) draw alike."""
    device = lax.axis_index(_manual_axes())
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), device)
    return jax.random.split(key)


def tower_fn(enc, layer_params=None):
    """`towers(params, x)`: one (sub-)batch x = (q tokens, q mask, d tokens, d mask, q key, d key)
    -> (query, document) embeddings, dropout on (keys None: off). The encode of the step and of
    `negjax bench step`'s breakdown. `layer_params`: see `Encoder.hidden_states` (FSDP)."""
    def towers(p, x):
        qt, qm, dt, dm, kq, kd = x
        kw = dict(layer_params=layer_params)
        return (enc.encode(p, qt, qm, tower="query", rng=kq, deterministic=kq is None, **kw),
                enc.encode(p, dt, dm, tower="doc", rng=kd, deterministic=kd is None, **kw))
    return towers


def sub_batches(batch, rq, rd, n: int):
    """The step's batch as `n` GradCache sub-batches for `tower_fn` (leading axis n), each with
    its own dropout keys (`sub_batch_keys`)."""
    split = lambda x: split_sub_batches(x, n)  # noqa: E731
    return (split(batch["q_tokens"]), split(batch["q_mask"]), split(batch["d_tokens"]),
            split(batch["d_mask"]), sub_batch_keys(rq, n), sub_batch_keys(rd, n))


def embedding_loss(spec: LossSpec, loss_cfg):
    """`(q, d, temperature, batch, bank, bank_ids) -> (loss, metrics)`: InfoNCE as `spec`
    binds it, plus the distillation term when `loss_cfg.distill` is set. The one loss of the
    train step (plain, GradCache, memory bank) and of `negjax bench step`'s breakdown."""
    def loss_of_embeddings(q, d, temp, batch, bank=None, bank_ids=None):
        # in_batch [b] (sources that turn in-batch negatives off): each query's own group only
        loss, metrics = spec(q, d, temperature=temp, query_pos_ids=batch["query_pos_ids"],
                             doc_ids=batch["doc_ids"], extra_docs=bank, extra_doc_ids=bank_ids,
                             in_batch_negatives=batch.get("in_batch"))
        if loss_cfg.distill:
            distill, counted = distillation_loss(
                q, d, batch["teacher_scores"], group_size=spec.group_size, mode=loss_cfg.distill,
                temperature=temp, teacher_temperature=loss_cfg.teacher_temperature)
            loss = loss + loss_cfg.distill_weight * distill
            metrics = dict(metrics, distill_loss=distill, distill_queries=counted)
        return loss, metrics
    return loss_of_embeddings


@dataclass(frozen=True)
class TrainStep:
    """What `make_train_step` builds: called as `(state, batch) -> (state, metrics)` (jitted,
    the state donated; `lower` as for any jitted function), and `loss_and_grads(params, batch,
    step[, bank, bank_ids]) -> (loss, metrics, grads)`, the step's gradient computation alone
    (jitted; for tests and the benchmark's breakdown)."""

    step: Callable
    loss_and_grads: Callable

    def __call__(self, state, batch):
        return self.step(state, batch)

    def lower(self, *args):
        return self.step.lower(*args)


def diagnostics_sample(q, d, *, axes, devices: int, group_size: int):
    """Inside the step's shard_map: the diagnostics' sample (`negjax.train.diagnostics`), the
    first SAMPLE / devices queries of every device and their documents, replicated ([rows, D]
    f32, no gradient)."""
    n_dev = devices
    b = q.shape[0]
    s = min(b, max(1, SAMPLE // n_dev))
    idx = lax.axis_index(axes)

    def place(x, rows):
        buf = jnp.zeros((n_dev * rows,) + x.shape[1:], jnp.float32)
        part = lax.stop_gradient(x[:rows]).astype(jnp.float32)
        return lax.psum(lax.dynamic_update_slice(buf, part, (idx * rows, 0)), axes)
    return {"sample_q": place(q, s), "sample_d": place(d, s * group_size)}


def plain_grads(params, towers, x, loss_of, specs, *, axes, devices: int, group_size: int):
    """(loss, metrics, gradients of this device's trainable parameter shards) of one forward
    and backward pass over the (sub-)batch `x` (`tower_fn`'s input); `loss_of(q, d, params)`
    is the step's loss of the embeddings (the temperature read from `params`)."""
    rest = {k: v for k, v in params.items() if k != "model"}
    trainable, frozen = split_trainable(params["model"])

    def loss_fn(model, rest):
        q, d = towers(combine(model, frozen), x)
        loss, metrics = loss_of(q, d, rest)
        return loss, dict(metrics, **diagnostics_sample(q, d, axes=axes, devices=devices,
                                                         group_size=group_size))
    # Device-varying encoder parameters: under FSDP each gather's transpose reduce-scatters its
    # gradient over 'fsdp' first; one sum over the other batch axes follows, of shards. LoRA:
    # the gradient is taken w.r.t. the adapters only.
    (loss, metrics), (gmodel, grest) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(vary(trainable), rest)
    gspecs = split_trainable(specs["model"])[0]
    return loss, metrics, {"model": sum_grads(gmodel, gspecs, axes), **grest}


def cached_grads(params, towers, xs, loss_of, specs, *, axes, devices: int, group_size: int):
    """`plain_grads` by GradCache over the sub-batches `xs` (leading axis n): (1) embeddings of
    every sub-batch with no activations kept, (2) the loss gradient w.r.t. all embeddings (the
    loss gathers across devices), (3) each sub-batch re-encoded with the same dropout keys and
    its cached embedding gradient back-propagated. Equal to `plain_grads` of the whole batch."""
    # Device-varying: each sub-batch's gradient stays local; one sum at the end. LoRA: the
    # adapters are the argument differentiated, the base weights ride along.
    trainable, frozen = split_trainable(params["model"])
    model = vary(trainable)

    def adapted(p, x):
        return towers(combine(p, frozen), x)
    q, d = jax.tree.map(merge_sub_batches, embed_sub_batches(adapted, model, xs))      # (1)
    rest = {k: v for k, v in params.items() if k != "model"}
    (loss, metrics), (gq, gd, grest) = jax.value_and_grad(                          # (2)
        loss_of, argnums=(0, 1, 2), has_aux=True)(q, d, rest)
    metrics = dict(metrics, **diagnostics_sample(q, d, axes=axes, devices=devices,
                                                 group_size=group_size))
    n = xs[0].shape[0]
    cts = (split_sub_batches(gq, n), split_sub_batches(gd, n))
    gmodel = sum_grads(backprop_sub_batches(adapted, model, xs, cts),                # (3)
                       split_trainable(specs["model"])[0], axes)
    return loss, metrics, {"model": gmodel, **grest}


def make_train_step(enc, cfg: Config, mesh, *, group_size: int) -> TrainStep:
    """Build the step (a `TrainStep`); see the module docstring."""
    G = group_size
    seed = cfg.train.seed
    gc = cfg.train.grad_cache_chunk
    momentum = cfg.loss.momentum
    axes = batch_axes(mesh)
    n_dev = batch_devices(mesh)

    loss_of_embeddings = embedding_loss(
        LossSpec.from_config(cfg.loss, group_size=G, renormalize=enc.normalize), cfg.loss)

    base_towers = tower_fn(enc)

    def grads_body(params, batch, step, bank, bank_ids, specs):
        """(loss, metrics, gradients of this device's parameter shards)."""
        rq, rd = dropout_keys(seed, step)

        towers = base_towers
        if FSDP in axes:  # the encoder on parameters gathered from the shards, layer by layer
            per_layer = layer_gather(specs["model"])
            fsdp_towers = tower_fn(enc, layer_params=per_layer)

            def gathered_towers(shards, x):
                return fsdp_towers(gather_params(shards, specs["model"],
                                                 skip_layers=per_layer is not None), x)
            towers = gathered_towers

        def loss_of(q, d, rest):
            return loss_of_embeddings(q, d, temperature_of(rest, cfg), batch, bank, bank_ids)
        b = batch["q_tokens"].shape[0]
        if gc and b % gc:
            raise NegjaxError(f"train.grad_cache_chunk={gc} must divide the per-device batch {b}")
        # Plain: GradCache's first sub-batch's keys, so with one sub-batch both draw the same masks.
        xs = sub_batches(batch, rq, rd, b // gc if gc else 1)
        kw = dict(axes=axes, devices=n_dev, group_size=G)
        if gc:
            out = cached_grads(params, towers, xs, loss_of, specs, **kw)
        else:
            out = plain_grads(params, towers, jax.tree.map(lambda a: a[0], xs), loss_of, specs, **kw)
        if n_dev == 1:
            # On a single device the loss takes its collective-free path, whose results are
            # still typed device-varying; a psum over the size-1 axes marks them replicated.
            def invariant(x):
                v = tuple(a for a in axes if a in _varying_axes(x))
                return lax.psum(x, v) if v else x
            out = jax.tree.map(invariant, out)
        return out

    keys = (BATCH_KEYS + (("teacher_scores",) if cfg.loss.distill else ())
            + (("in_batch",) if any(not s.in_batch_negatives for s in cfg.data.sources) else ()))
    batch_spec = {k: P(axes) for k in keys}

    def step(state: TrainState, batch):
        check_bank(state, batch, n_dev)
        specs = state_specs(state, mesh)
        pspecs = specs.params
        tspecs = split_params(pspecs)[0]   # of the trainable params (LoRA: the adapters)
        # The optimizer sees this device's shards: its clip norm is the global one.
        opt = make_optimizer(cfg.train, norm=lambda g: global_norm(g, tspecs))

        def body(state: TrainState, batch):
            params = state.params
            loss, metrics, grads = grads_body(params, batch, state.step, state.bank,
                                              state.bank_ids, pspecs)
            gnorm = global_norm(grads, tspecs)
            trainable, frozen = split_params(params)
            updates, new_opt = opt.update(grads, state.opt_state, trainable)
            # Frozen (LoRA base) weights are passed through as they are.
            new_params = join_params(optax.apply_updates(trainable, updates), frozen)
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            new_state = state.replace(params=keep(new_params, params),
                                      opt_state=keep(new_opt, state.opt_state),
                                      step=state.step + 1,
                                      nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
            if state.bank is not None:
                new_state = update_bank(enc, new_state, state, batch, ok, specs.ema,
                                        momentum=momentum, grad_cache_chunk=gc, axes=axes)
            metrics = dict(metrics, loss=loss, grad_norm=gnorm,
                           temperature=temperature_of(params, cfg),
                           skipped=(~ok).astype(jnp.float32))
            return new_state, metrics

        fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, batch_spec),
                           out_specs=(specs, P()))
        return fn(state, {k: batch[k] for k in keys})

    def loss_and_grads(params, batch, step, bank=None, bank_ids=None):
        pspecs = tree_specs(params, mesh)
        bspec = None if bank is None else P(axes)
        fn = jax.shard_map(lambda *a: grads_body(*a, pspecs), mesh=mesh,
                           in_specs=(pspecs, batch_spec, P(), bspec, bspec),
                           out_specs=(P(), P(), split_params(pspecs)[0]))
        return fn(params, {k: batch[k] for k in keys}, step, bank, bank_ids)

    return TrainStep(jax.jit(step, donate_argnums=(0,)), jax.jit(loss_and_grads))
