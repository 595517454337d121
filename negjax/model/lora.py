"""LoRA: low-rank adapters on chosen dense layers, the only parameters a LoRA run trains.

    model.lora_rank = 16, model.lora_alpha = 32, model.lora_targets = ["q_proj", "v_proj"]

A targeted dense layer (`LoraDense`) keeps its kernel [in, out] (and bias) and adds
`lora_a` [in, r] and `lora_b` [r, out]: y = x W + b + (alpha / r) (x A) B. A starts uniform
in +-1/sqrt(in) and B at zero (as PEFT), so a fresh adapter leaves the model's outputs
unchanged. The adapters live in the encoder's params tree next to the kernels they adapt;
`split_trainable` separates them, and the train step differentiates, clips and updates only
them (the optimizer state holds nothing else; the base weights pass through every step
untouched). `merge_adapters` folds them into the kernels (W + (alpha / r) A B) for
`negjax export`, whose output is a plain model of the family.

Targets name dense layers of the family: BERT / RoBERTa `query`, `key`, `value`,
`attention_output`, `intermediate`, `output`; Qwen `q_proj`, `k_proj`, `v_proj`, `o_proj`,
`gate_proj`, `up_proj`, `down_proj`; ModernBERT `Wqkv`, `attn/Wo`, `mlp/Wi`, `mlp/Wo`. Empty =
the family's attention projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from negjax.errors import NegjaxError

ADAPTERS = ("lora_a", "lora_b")
# Dense layers each family can adapt, and the default targets (attention projections).
FAMILY_TARGETS = {
    "bert": ("query", "key", "value", "attention_output", "intermediate", "output"),
    "qwen": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "modernbert": ("Wqkv", "attn/Wo", "mlp/Wi", "mlp/Wo"),
}
DEFAULT_TARGETS = {
    "bert": ("query", "key", "value", "attention_output"),
    "qwen": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "modernbert": ("Wqkv", "attn/Wo"),
}


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_spec(family: str, rank: int, alpha: float, targets) -> LoraSpec | None:
    """The `model.lora_*` settings for a family (None when rank is 0), validated."""
    if rank == 0:
        return None
    if rank < 0:
        raise NegjaxError(f"config key 'model.lora_rank': must be >= 0, got {rank}")
    if alpha <= 0:
        raise NegjaxError(f"config key 'model.lora_alpha': must be > 0, got {alpha}")
    targets = tuple(targets) or DEFAULT_TARGETS[family]
    unknown = [t for t in targets if t not in FAMILY_TARGETS[family]]
    if unknown:
        raise NegjaxError(f"config key 'model.lora_targets': {unknown} are not dense layers of "
                          f"this model (choose from {list(FAMILY_TARGETS[family])})")
    return LoraSpec(int(rank), float(alpha), targets)


class LoraDense(nn.Module):
    """`nn.Dense` (same `kernel` / `bias` params and math) plus a low-rank update."""

    features: int
    rank: int
    scale: float
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        n_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (n_in, self.features), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
                if self.use_bias else None)
        bound = 1.0 / math.sqrt(n_in)
        a = self.param("lora_a", lambda key, shape, dtype: jax.random.uniform(
            key, shape, dtype, -bound, bound), (n_in, self.rank), jnp.float32)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), jnp.float32)
        x = x.astype(self.dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(x, kernel.astype(self.dtype), dims)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        low = jax.lax.dot_general(x, a.astype(self.dtype), dims)
        low = jax.lax.dot_general(low, b.astype(self.dtype), (((low.ndim - 1,), (0,)), ((), ())))
        return y + (self.scale * low).astype(y.dtype)


def dense(features: int, name: str, *, lora: LoraSpec | None, dtype, kernel_init,
          use_bias: bool = True, target: str | None = None) -> nn.Module:
    """An `nn.Dense`, or a `LoraDense` when `target` (default `name`) is one of the LoRA
    targets."""
    if lora is not None and (target or name) in lora.targets:
        return LoraDense(features, lora.rank, lora.scale, use_bias=use_bias, dtype=dtype,
                         kernel_init=kernel_init, name=name)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, name=name)


def _is_adapter(path) -> bool:
    return str(path[-1]) in ADAPTERS


def has_adapters(tree) -> bool:
    return isinstance(tree, dict) and any(_is_adapter(k) for k in flatten_dict(tree))


def split_trainable(tree):
    """A model params tree (or a tree of the same structure: specs, gradients) -> (trainable,
    frozen): with adapters, (the adapters, everything else); without, (tree, {})."""
    if not has_adapters(tree):
        return tree, {}
    flat = flatten_dict(tree)
    return (unflatten_dict({k: v for k, v in flat.items() if _is_adapter(k)}),
            unflatten_dict({k: v for k, v in flat.items() if not _is_adapter(k)}))


def combine(trainable, frozen):
    """The inverse of `split_trainable`."""
    if not frozen:
        return trainable
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})


def add_adapters(params: dict, like: dict, rng) -> dict:
    """`params` (one tower, no adapters) with fresh adapters wherever `like` (the shapes of
    the LoRA module's params, e.g. from `jax.eval_shape`) has them: A uniform in
    +-1/sqrt(in), B zero."""
    flat = dict(flatten_dict(params))
    for i, (path, shape) in enumerate(sorted(flatten_dict(like).items())):
        if not _is_adapter(path):
            continue
        if path[-1] == "lora_a":
            bound = 1.0 / math.sqrt(shape.shape[0])
            flat[path] = jax.random.uniform(jax.random.fold_in(rng, i), shape.shape,
                                            jnp.float32, -bound, bound)
        else:
            flat[path] = jnp.zeros(shape.shape, jnp.float32)
    return unflatten_dict(flat)


def merge_adapters(params: dict, lora: LoraSpec) -> dict:
    """One tower's params with adapters -> plain params: kernel + (alpha / r) A B, in float64
    then rounded to float32 (numpy arrays)."""
    flat = flatten_dict(params)
    out = {k: v for k, v in flat.items() if not _is_adapter(k)}
    for path, a in flat.items():
        if path[-1] != "lora_a":
            continue
        parent = path[:-1]
        b = np.asarray(flat[parent + ("lora_b",)], np.float64)
        kernel = np.asarray(out[parent + ("kernel",)], np.float64)
        out[parent + ("kernel",)] = (kernel + lora.scale * (np.asarray(a, np.float64) @ b)
                                     ).astype(np.float32)
    return unflatten_dict(out)
