"""The MoCo-style memory bank: a queue of past document embeddings, encoded by a momentum
(EMA) copy of the document tower, used as extra negative columns without gradient.

Each device holds its slice of the queue (split over the batch axes) and writes its own step's
documents at `bank_ptr` within it; `negjax.train.state.relayout_bank` re-lays a queue written
on another number of devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from negjax.distributed import FSDP
from negjax.errors import NegjaxError
from negjax.grad_cache import embed_sub_batches, merge_sub_batches, split_sub_batches
from negjax.train.sharding import gather_params, layer_gather


def check_bank(state, batch, n_dev: int) -> None:
    """Each device's share of the queue must hold whole steps of its documents."""
    if state.bank is not None:
        local_k = state.bank.shape[0] // n_dev
        local_docs = batch["d_tokens"].shape[0] // n_dev
        if local_k % local_docs:
            raise NegjaxError(f"loss.memory_bank_size={state.bank.shape[0]}: each device's "
                              f"share ({local_k}) must be a multiple of its documents per "
                              f"step ({local_docs})")


def update_bank(enc, new_state, old, batch, ok, ema_specs, *, momentum: float,
                grad_cache_chunk: int, axes):
    """Inside the step's shard_map: the EMA of the document tower, then this step's documents
    encoded by it enqueued at `bank_ptr` (all kept only where `ok`, a finite step)."""
    doc_params = enc.tower_params(new_state.params["model"], "doc")
    ema_tower = enc.tower_params(old.ema, "doc")
    new_tower = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_tower, doc_params)
    if enc.tied_towers:
        ema = {"encoder": new_tower}
    else:
        ema = dict(old.ema, doc=new_tower)
    # The momentum encoder honours GradCache: one sub-batch's activations at a time (and
    # FSDP: one layer's gathered parameters at a time).
    per_layer = layer_gather(ema_specs) if FSDP in axes else None
    n = batch["q_tokens"].shape[0] // grad_cache_chunk if grad_cache_chunk else 1
    xs = (split_sub_batches(batch["d_tokens"], n), split_sub_batches(batch["d_mask"], n))
    keys = merge_sub_batches(embed_sub_batches(
        lambda p, x: enc.encode(p, x[0], x[1], tower="doc", layer_params=per_layer),
        gather_params(ema, ema_specs, skip_layers=per_layer is not None), xs))
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
