"""Where the train state and batches live on the mesh, and the collectives the step's FSDP
path needs (used inside the step's shard_map).

Without 'fsdp' the state is replicated; with it every parameter, its AdamW moments and its
momentum-encoder copy are cut along their largest dimension that the 'fsdp' size divides
(`fsdp_spec`; arrays with none stay replicated). The memory bank and every batch array are
split on their first axis over the batch axes ('data', then 'fsdp').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from negjax.distributed import BATCH_AXES, FSDP, batch_axes
from negjax.train.state import TrainState

BATCH_KEYS = ("q_tokens", "q_mask", "d_tokens", "d_mask", "doc_ids", "query_pos_ids")


def fsdp_spec(shape, fsdp: int) -> P:
    """Where FSDP cuts an array of `shape`: its largest dimension that `fsdp` divides (the
    first of equals), or nowhere (P(): replicated) if none does or fsdp = 1."""
    dims = [i for i, n in enumerate(shape) if n >= fsdp and n % fsdp == 0]
    if fsdp == 1 or not dims:
        return P()
    i = max(dims, key=lambda i: (shape[i], -i))
    return P(*([None] * i), FSDP)


def _fsdp_dim(spec: P):
    return next((i for i, a in enumerate(spec) if a == FSDP), None)


def tree_specs(tree, mesh):
    """`fsdp_spec` of every array of `tree` on `mesh` (all P() without an 'fsdp' axis)."""
    f = mesh.shape.get(FSDP, 1)
    return jax.tree.map(lambda x: fsdp_spec(x.shape, f), tree)


def state_specs(state: TrainState, mesh) -> TrainState:
    """PartitionSpecs of the state on `mesh`: every array by `fsdp_spec` (so a parameter, its
    optimizer moments and its momentum-encoder copy are cut alike; all replicated without an
    'fsdp' axis), the memory bank split over the batch axes."""
    out = tree_specs(state, mesh)
    if state.bank is not None:
        axes = batch_axes(mesh)
        out = out.replace(bank=P(axes), bank_ids=P(axes), bank_ptr=P())
    return out


def state_shardings(state: TrainState, mesh) -> TrainState:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def place_state(state: TrainState, mesh) -> TrainState:
    return jax.device_put(state, state_shardings(state, mesh))


def _map_specs(fn, specs, tree):
    return jax.tree.map(fn, specs, tree, is_leaf=lambda x: isinstance(x, P))


def _in_layer(path) -> bool:
    return any(str(getattr(k, "key", "")).startswith("layer_") for k in path)


def gather_params(tree, specs, *, skip_layers: bool = False):
    """Inside the step's shard_map: full arrays from this device's FSDP shards (all-gather over
    'fsdp'). Each gather is rematerialised: the backward pass gathers again instead of keeping
    every full parameter alive between the passes, and its transpose (a reduce-scatter)
    returns each parameter's gradient to the shards as soon as it is computed.
    `skip_layers`: leave the transformer layers' params (`layer_<i>`) as shards, for
    `layer_gather` to gather one layer at a time as the encoder runs."""
    def leaf(path, spec, x):
        d = _fsdp_dim(spec)
        if d is None or (skip_layers and _in_layer(path)):
            return x
        return jax.checkpoint(lambda y: lax.all_gather(y, FSDP, axis=d, tiled=True))(x)
    return jax.tree_util.tree_map_with_path(leaf, specs, tree, is_leaf=lambda x: isinstance(x, P))


def layer_gather(model_specs):
    """The per-layer gather for `tower_fn(layer_params=...)`: every layer has the shapes, so
    the specs, of the first tower's `layer_0` (None if the model has no such layers)."""
    tower = next(iter(model_specs.values()))
    if not isinstance(tower, dict) or "layer_0" not in tower:
        return None
    specs = tower["layer_0"]
    return lambda layer: gather_params(layer, specs)


def sum_grads(tree, specs, axes):
    """Per-device gradients of the shards (GradCache: device-varying, unreduced) -> their sums
    over the batch axes ('fsdp' excepted where a parameter is cut: the gather's transpose has
    already reduce-scattered over it)."""
    def leaf(spec, g):
        over = tuple(a for a in axes if not (a == FSDP and _fsdp_dim(spec) is not None))
        return lax.psum(g, over) if over else g
    return _map_specs(leaf, specs, tree)


def global_norm(tree, specs):
    """The global L2 norm of a tree of FSDP shards (optax.tree.norm of the full tree)."""
    def sq(spec, x):
        s = jnp.sum(jnp.square(x))
        return s if _fsdp_dim(spec) is None else lax.psum(s, FSDP)
    return jnp.sqrt(sum(jax.tree.leaves(_map_specs(sq, specs, tree))))


def _manual_axes() -> tuple:
    am = jax.sharding.get_abstract_mesh()
    return tuple(a for a in BATCH_AXES if a in am.manual_axes)


def _varying_axes(x) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary(tree):
    """Mark values as device-varying over every batch axis, so gradients w.r.t. them stay local
    (no all-reduce per GradCache sub-batch); one reduction at the end sums them."""
    axes = _manual_axes()

    def cast(x):
        missing = tuple(a for a in axes if a not in _varying_axes(x))
        return lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree)


def batch_shardings(mesh) -> dict:
    return {k: NamedSharding(mesh, P(batch_axes(mesh))) for k in BATCH_KEYS}
