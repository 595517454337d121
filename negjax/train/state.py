"""Train state and optimizer: params (encoder + optional learnable temperature), AdamW with
warm-up and decay, gradient clipping, the optional momentum encoder and memory bank."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from negjax.config import Config, TrainConfig
from negjax.errors import NegjaxError
from negjax.losses import init_log_scale
from negjax.model.lora import combine, split_trainable


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. All leaves are jax arrays (checkpointable).

    params:    {"model": encoder params, "log_scale": [] f32 (learnable temperature only)}
    opt_state: optax state of the trainable part of `params` (LoRA: the adapters only)
    step:      [] int32, optimizer steps taken (skipped non-finite steps included)
    nonfinite: [] int32, steps skipped because the loss or gradients were NaN/Inf
    ema:       momentum document-encoder params (memory bank only, else None)
    bank:      [K, D] f32 queue of past document embeddings, sharded on 'data' (or None)
    bank_ids:  [K] int32 their document ids, -1 = empty slot (or None)
    bank_ptr:  [] int32 next write offset within each device's slice of the queue
    """

    params: Any
    opt_state: Any
    step: jax.Array
    nonfinite: jax.Array
    ema: Any = None
    bank: jax.Array | None = None
    bank_ids: jax.Array | None = None
    bank_ptr: jax.Array | None = None


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then linear / cosine decay to 0 at `steps`, or constant."""
    warm = max(cfg.warmup_steps, 0)
    decay_steps = max(cfg.steps - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), after], [warm])


def _decay_mask(params):
    # No weight decay on biases, LayerNorm scales and the temperature (BERT convention).
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def clip_by_global_norm(max_norm: float, norm=optax.tree.norm) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same state, same formula) with the norm computed by `norm`:
    under FSDP each device holds a shard of the gradients and the norm needs a collective
    (negjax.train.sharding.global_norm)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        g = norm(updates)
        trigger = jnp.squeeze(g < max_norm)
        clip = lambda t: jnp.where(trigger, t, (t / g.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig, norm=optax.tree.norm) -> optax.GradientTransformation:
    """Clip by global norm (`norm` of the gradient tree), then AdamW with the schedule."""
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(clip_by_global_norm(cfg.max_grad_norm, norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, eps=1e-6,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def split_params(params: dict) -> tuple[dict, dict]:
    """The state's params (or a tree shaped like them: specs, gradients) -> (trainable, frozen
    model params). With LoRA adapters in the model, only they (and the temperature) train;
    otherwise everything does and frozen is {}."""
    trainable, frozen = split_trainable(params["model"])
    return dict(params, model=trainable), frozen


def join_params(trainable: dict, frozen: dict) -> dict:
    """The inverse of `split_params`."""
    return dict(trainable, model=combine(trainable["model"], frozen))


def init_state(model_params, cfg: Config, *, dim: int, num_devices: int = 1,
               ema_params=None) -> TrainState:
    """A fresh state around `model_params` (not yet placed on a mesh). The optimizer state is
    that of the trainable params only (`split_params`)."""
    params = {"model": jax.tree.map(jnp.array, model_params)}  # a copy: the step donates it
    if cfg.loss.learnable_temperature:
        params["log_scale"] = init_log_scale(cfg.loss.temperature)
    opt_state = make_optimizer(cfg.train).init(split_params(params)[0])
    state = TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                       nonfinite=jnp.zeros((), jnp.int32))
    k = cfg.loss.memory_bank_size
    if k:
        state = state.replace(
            ema=jax.tree.map(jnp.array, ema_params if ema_params is not None else model_params),
            bank=jnp.zeros((k, dim), jnp.float32),
            bank_ids=jnp.full((k,), -1, jnp.int32),
            bank_ptr=jnp.zeros((), jnp.int32))
    return state


def relayout_bank(bank, bank_ids, ptr: int, *, old_devices: int, new_devices: int,
                  docs_per_step: int):
    """The memory-bank queue of a checkpoint written on `old_devices` batch devices, laid out
    for `new_devices` (a resume on another topology). numpy in, numpy out.

    bank [K, D], bank_ids [K]; `ptr` is the next write offset within each device's slice of
    K / devices rows. Every step writes its `docs_per_step` (N) global documents cut in
    `devices` pieces, piece d at offset ptr of device d's slice, so one slice offset holds one
    step's documents across all slices. The result holds the same steps, each step's documents
    in global order and cut for `new_devices`, the oldest step at offset 0 and ptr 0: the queue
    evicts in the same order as it would have on the old devices. Returns (bank, bank_ids, ptr)."""
    bank, bank_ids = np.asarray(bank), np.asarray(bank_ids)
    k, n = bank.shape[0], int(docs_per_step)
    for devices in (old_devices, new_devices):
        if k % devices or n % devices or (k // devices) % (n // devices):
            raise NegjaxError(f"loss.memory_bank_size={k}: cannot be laid out over {devices} "
                              f"devices with {n} documents per step (each device's share must "
                              "be a multiple of its documents per step)")
    s, m = k // old_devices, n // old_devices
    s2, m2 = k // new_devices, n // new_devices
    slots = s // m
    src = np.empty(k, np.int64)
    for age in range(slots):                               # 0 = oldest (overwritten next)
        o = ((int(ptr) // m + age) % slots) * m
        step_rows = (np.arange(old_devices)[:, None] * s + o + np.arange(m)).reshape(-1)  # [N]
        dst = (np.arange(new_devices)[:, None] * s2 + age * m2 + np.arange(m2)).reshape(-1)
        src[dst] = step_rows
    return bank[src], bank_ids[src], 0
