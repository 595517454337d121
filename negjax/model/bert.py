"""A Flax (linen) BERT encoder: embeddings, post-LayerNorm transformer layers, pooling.

The module and parameter names mirror Hugging Face's `BertModel`
(`embeddings/word_embeddings`, `layer_3/attention/query`, ...), so that the safetensors key
map in `negjax.model.hf` is a rename plus a transpose of dense kernels.

Params are float32; `dtype` is the compute dtype of matmuls and activations (bfloat16 on
accelerators). Attention softmax, LayerNorm statistics, pooling and normalisation run in
float32; the encoder's outputs are float32. `dtype=int8` is for inference only: the dense
layers (`Int8Dense`) multiply int8 activations (one scale per token) by int8 kernels (one
scale per output feature) into int32; everything else, attention included, runs in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dataclasses
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from negjax.errors import NegjaxError, file_error
from negjax.model.attention import attend, check_implementation
from negjax.model.lora import dense as lora_dense


@jax.custom_jvp
def gelu_exact(x):
    """The exact (erf) GELU, `x * Phi(x)`, with its derivative `Phi(x) + x * phi(x)` stated.

    The forward pass is PyTorch's formula, `0.5 * x * (1 + erf(x / sqrt(2)))`. It is not
    `jax.nn.gelu(approximate=False)`, which evaluates `erfc` (two polynomials, an `exp`, two
    divisions and selects per element) for relative accuracy far out in the negative tail,
    where the GELU is below 1e-6 anyway; on the CPU that cost ~10% of a MiniLM encode. Both
    are within 1e-6 of the float64 GELU on [-10, 10] (tests/test_model.py).

    jax 0.12's derivative of `erf`/`erfc` evaluates `lax.polynomial` with unvaried constant
    coefficients, which fails inside `jax.shard_map` ("Primitive polynomial requires varying
    manual axes to match"); the derivative is stated here with `erfc` and `exp` (both fine
    under shard_map).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * jax.lax.erfc(-x * math.sqrt(0.5))
    pdf = jnp.exp(-0.5 * x * x) * math.sqrt(0.5 / math.pi)
    return gelu_exact(x), t * (cdf + x * pdf)


# Hugging Face `hidden_act` names -> activation. "gelu" is the exact (erf) GELU.
_ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# Hugging Face model types this module computes: BERT, and RoBERTa / XLM-RoBERTa, whose only
# difference in the math is where positions start (`BertConfig.position_offset`).
MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass(frozen=True)
class BertConfig:
    """The architecture (the fields of a Hugging Face BERT / RoBERTa / XLM-RoBERTa config.json
    that change the math)."""

    vocab_size: int
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    model_type: str = "bert"
    attention: str = "xla"           # model.attention: 'xla' | 'cudnn' (not saved with the model)
    lora: Any = None                 # negjax.model.lora.LoraSpec: adapters (not saved with the model)

    def __post_init__(self):
        check_implementation(self.attention)
        if self.model_type not in MODEL_TYPES:
            raise NegjaxError(f"unsupported model_type {self.model_type!r} "
                              f"(supported: {', '.join(MODEL_TYPES)})")
        if self.hidden_act not in _ACTIVATIONS:
            raise NegjaxError(f"unsupported hidden_act {self.hidden_act!r} "
                              f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        if self.hidden_size % self.num_heads:
            raise NegjaxError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_heads}")

    @property
    def position_offset(self) -> int:
        """Position id of the first token: 0 for BERT; RoBERTa counts positions from
        `pad_token_id + 1` (padding tokens get `pad_token_id`)."""
        return 0 if self.model_type == "bert" else self.pad_token_id + 1

    @property
    def max_tokens(self) -> int:
        """The longest input the position embeddings cover (514 positions = 512 tokens for
        RoBERTa)."""
        return self.max_position_embeddings - self.position_offset

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)


def quantize_int8(x, axis: int):
    """x float32 -> (q int8, scale float32 with `axis` kept as 1): symmetric, q = round(x /
    scale) in [-127, 127] with scale = max |x| / 127 along `axis` (1 where x is all zero)."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


class Int8Dense(nn.Module):
    """`nn.Dense` (same params: kernel [in, out], bias [out], float32) computed in int8, for
    inference: the input is quantised per row (dynamic, one scale per token), the kernel per
    output column, the product accumulates in int32 and is rescaled to float32 before the bias.
    On a 2-core AVX-512 VNNI CPU `negjax encode` of MiniLM runs ~1.5x faster than in float32
    (experiments/bench/README.md, "Encoding long documents"). Rounding has no useful
    gradient: never train through it."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kq, ks = quantize_int8(kernel, axis=0)
        xq, xs = quantize_int8(x.astype(jnp.float32), axis=-1)
        acc = jax.lax.dot_general(xq, kq, (((x.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * (xs * ks[0]) + bias


def _float(dtype):
    """The floating compute dtype: float32 for int8 (only the dense layers are int8)."""
    return jnp.float32 if dtype == jnp.int8 else dtype


def _dense(features: int, cfg: BertConfig, dtype, name: str) -> nn.Module:
    init = nn.initializers.normal(cfg.initializer_range)
    if dtype == jnp.int8:
        if cfg.lora is not None:
            raise NegjaxError("model.dtype 'int8' cannot run LoRA adapters: export the model "
                              "(which merges them) and encode the export")
        return Int8Dense(features, kernel_init=init, name=name)
    return lora_dense(features, name, lora=cfg.lora, dtype=dtype, kernel_init=init)


def _layer_norm(cfg: BertConfig, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance (like PyTorch): the fast E[x²]-E[x]² form loses digits at eps 1e-12.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=_float(dtype), param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def _explicit_spec(x):
    """The PartitionSpec of `x` when it is sharded over Explicit mesh axes, else None."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return P(*spec) if any(axis is not None for axis in spec) else None


def take_rows(table, ids):
    """table [V, H], ids [...] int32 -> [..., H] (an embedding lookup).

    Under an Explicit-axes mesh (`jax.set_mesh`) a gather must state its output sharding:
    the rows follow the sharding of `ids` (the batch axis) and H stays replicated.
    """
    spec = _explicit_spec(ids)
    if spec is not None:
        return table.at[ids].get(out_sharding=P(*spec, None))
    return jnp.take(table, ids, axis=0)


def _mix32(x):
    """A bijective 32-bit integer finaliser with full avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(key, keep_prob: float, shape) -> jax.Array:
    """Boolean keep-mask with P(True) = keep_prob, a pure function of (key, shape).

    Two words drawn from `key` seed a counter-based hash of each element's flat index (two
    rounds of a 32-bit avalanche finaliser), compared with keep_prob scaled to 2^32. This is
    a statistical, not a cryptographic, generator -- like the Philox streams other frameworks
    use for dropout -- and ~13x cheaper on CPU than threefry-based `jax.random.bernoulli`,
    which cost ~20% of a MiniLM training step. Needs fewer than 2^32 elements.
    """
    n = 1
    for s in shape:
        n *= s
    if n >= 2**32:
        raise ValueError(f"dropout mask of {n} elements: at most 2^32 - 1")
    seed = jax.random.bits(key, (2,), jnp.uint32)
    idx = jax.lax.iota(jnp.uint32, n).reshape(shape)
    x = _mix32(idx * jnp.uint32(0x9E3779B1) + seed[0])
    x = _mix32(x ^ seed[1])
    drop = min(int(round((1.0 - keep_prob) * 2**32)), 2**32 - 1)
    return x >= jnp.uint32(drop)


class Dropout(nn.Module):
    """Inverted dropout on the 'dropout' rng stream.

    The keep-mask comes from `dropout_keep_mask` (a fast counter-based hash). For arrays
    sharded with Explicit axes it is drawn with `jax.random.bernoulli` instead, with the
    sharding of `x` (which `nn.Dropout` does not support)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        key = self.make_rng("dropout")
        spec = _explicit_spec(x)
        if spec is None and x.size < 2**32:
            keep = dropout_keep_mask(key, keep_prob, x.shape)
        else:
            keep = jax.random.bernoulli(key, keep_prob, x.shape, out_sharding=spec)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class Embed(nn.Module):
    """A lookup table [num, features] float32 (param 'embedding', as `nn.Embed`)."""

    num: int
    features: int
    init_std: float

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.initializers.normal(self.init_std),
                           (self.num, self.features), jnp.float32)
        return take_rows(table, ids)


class Embeddings(nn.Module):
    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool):
        """tokens [N, L] int32 -> [N, L, H] in `dtype` (token type is always 0). RoBERTa
        positions count the non-padding tokens from `pad_token_id + 1`; padding tokens take
        position `pad_token_id` (as `create_position_ids_from_input_ids` in transformers)."""
        cfg = self.cfg
        std = cfg.initializer_range
        word = Embed(cfg.vocab_size, cfg.hidden_size, std, name="word_embeddings")
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, std, name="position_embeddings")
        typ = Embed(cfg.type_vocab_size, cfg.hidden_size, std, name="token_type_embeddings")
        length = tokens.shape[1]
        if cfg.position_offset:
            real = (tokens != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        else:
            positions = jnp.arange(length, dtype=jnp.int32)[None]
        x = word(tokens) + pos(positions) + typ(jnp.zeros((1, 1), jnp.int32))
        x = _layer_norm(cfg, self.dtype, "LayerNorm")(x)
        return Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        """x [N, L, H], mask [N, L] (1 = real) -> [N, L, H] (before the residual LayerNorm)."""
        cfg = self.cfg
        n, length, _ = x.shape
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads

        def split(t):
            return t.reshape(n, length, heads, head_dim)

        q = split(_dense(cfg.hidden_size, cfg, self.dtype, "query")(x))
        k = split(_dense(cfg.hidden_size, cfg, self.dtype, "key")(x))
        v = split(_dense(cfg.hidden_size, cfg, self.dtype, "value")(x))
        drop = None
        if not deterministic and cfg.attention_dropout > 0:
            dropout = Dropout(cfg.attention_dropout)
            drop = lambda probs: dropout(probs, deterministic=False)  # noqa: E731
        ctx = attend(q, k, v.astype(_float(self.dtype)), mask, implementation=cfg.attention, drop=drop)
        return ctx.reshape(n, length, cfg.hidden_size)


class Layer(nn.Module):
    """One post-LayerNorm transformer layer (BertLayer)."""

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.cfg
        drop = Dropout(cfg.hidden_dropout)
        attn = SelfAttention(cfg, self.dtype, name="attention")(x, mask, deterministic=deterministic)
        attn = _dense(cfg.hidden_size, cfg, self.dtype, "attention_output")(attn)
        x = _layer_norm(cfg, self.dtype, "attention_LayerNorm")(x + drop(attn, deterministic=deterministic))
        h = _dense(cfg.intermediate_size, cfg, self.dtype, "intermediate")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        h = _dense(cfg.hidden_size, cfg, self.dtype, "output")(h)
        return _layer_norm(cfg, self.dtype, "output_LayerNorm")(x + drop(h, deterministic=deterministic))


class BertEncoder(nn.Module):
    """tokens, mask [N, L] int32 -> last hidden states [N, L, H] float32.

    `remat` recomputes each layer's activations in the backward pass (memory for compute);
    parameter names are the same either way.
    """

    cfg: BertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    # Applied to each layer's params when the layer runs (FSDP: gather them from their shards
    # one layer at a time, `negjax.train.step`); None = the params as given.
    layer_params: Any = None

    @nn.compact
    def __call__(self, tokens, mask, deterministic: bool = True):
        x = Embeddings(self.cfg, self.dtype, name="embeddings")(tokens, deterministic=deterministic)
        # `deterministic` is a Python bool: static for remat (argument 3 counting self).
        layer_cls = nn.remat(Layer, static_argnums=(3,)) if self.remat else Layer
        if self.layer_params is not None:
            # The transform runs inside a rematerialised layer: the backward pass re-runs it
            # (FSDP: gathers the layer's parameters again) instead of keeping its output.
            fn = self.layer_params
            layer_cls = nn.remat(nn.map_variables(Layer, "params", mutable=False,
                                                  trans_in_fn=lambda v: {"params": fn(v["params"])}),
                                 static_argnums=(3,))
        for i in range(self.cfg.num_layers):
            x = layer_cls(self.cfg, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x.astype(jnp.float32)


def pool(hidden, mask, mode: str):
    """hidden [N, L, H], mask [N, L] -> [N, H] float32: 'mean' over real tokens, 'cls' (the
    first position) or 'last' (the last real token: right or left padding alike)."""
    hidden = hidden.astype(jnp.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        length = mask.shape[1]
        last = length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if mode == "mean":
        m = mask.astype(jnp.float32)[:, :, None]
        # The clamp matches sentence-transformers (an all-padding row gives zeros, not NaN).
        return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    raise NegjaxError(f"unknown pooling {mode!r} (use 'mean', 'cls' or 'last')")


def l2_normalize(x, eps: float = 1e-12):
    """[N, D] -> rows of unit L2 norm (as torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json and weight names (read and written by negjax.model.hf)
# ---------------------------------------------------------------------------------------------

def from_hf_config(path: Path, raw: dict) -> BertConfig:
    """A BERT / RoBERTa / XLM-RoBERTa config.json (`raw`, read from `path`)."""
    model_type = raw.get("model_type")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise file_error(path, None, f"unsupported position_embedding_type "
                         f"{raw['position_embedding_type']!r} (only 'absolute')")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise file_error(path, None, "decoder / cross-attention BERT configs are not supported")
    # Missing keys take transformers' BertConfig / RobertaConfig defaults, as AutoModel would.
    get = raw.get
    default_pad = 0 if model_type == "bert" else 1
    try:
        return BertConfig(
            vocab_size=int(get("vocab_size", 30522)),
            hidden_size=int(get("hidden_size", 768)),
            num_layers=int(get("num_hidden_layers", 12)),
            num_heads=int(get("num_attention_heads", 12)),
            intermediate_size=int(get("intermediate_size", 3072)),
            max_position_embeddings=int(get("max_position_embeddings", 512)),
            type_vocab_size=int(get("type_vocab_size", 2)),
            layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
            hidden_act=str(get("hidden_act", "gelu")),
            hidden_dropout=float(get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(get("attention_probs_dropout_prob", 0.1)),
            pad_token_id=int(default_pad if get("pad_token_id") is None else get("pad_token_id")),
            initializer_range=float(get("initializer_range", 0.02)),
            model_type=model_type,
        )
    except NegjaxError as e:
        raise file_error(path, None, str(e)) from None
    except (TypeError, ValueError) as e:
        raise file_error(path, None, f"bad value: {e}") from None


def to_hf_config(cfg: BertConfig) -> dict:
    """BertConfig -> a config.json that transformers' AutoConfig reads as a BertModel
    (RobertaModel, XLMRobertaModel)."""
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
    return {
        "architectures": [arch[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def hf_key_map(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF key, Flax path, HF shape, transpose?) for every tensor of the encoder."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    rows = [
        ("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings", "embedding"),
         (cfg.vocab_size, h), False),
        ("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings", "embedding"),
         (cfg.max_position_embeddings, h), False),
        ("embeddings.token_type_embeddings.weight", ("embeddings", "token_type_embeddings", "embedding"),
         (cfg.type_vocab_size, h), False),
        ("embeddings.LayerNorm.weight", ("embeddings", "LayerNorm", "scale"), (h,), False),
        ("embeddings.LayerNorm.bias", ("embeddings", "LayerNorm", "bias"), (h,), False),
    ]

    def dense(hf, path, n_out, n_in):
        rows.append((f"{hf}.weight", path + ("kernel",), (n_out, n_in), True))
        rows.append((f"{hf}.bias", path + ("bias",), (n_out,), False))

    def norm(hf, path):
        rows.append((f"{hf}.weight", path + ("scale",), (h,), False))
        rows.append((f"{hf}.bias", path + ("bias",), (h,), False))

    for n in range(cfg.num_layers):
        hf, fl = f"encoder.layer.{n}", f"layer_{n}"
        for proj in ("query", "key", "value"):
            dense(f"{hf}.attention.self.{proj}", (fl, "attention", proj), h, h)
        dense(f"{hf}.attention.output.dense", (fl, "attention_output"), h, h)
        norm(f"{hf}.attention.output.LayerNorm", (fl, "attention_LayerNorm"))
        dense(f"{hf}.intermediate.dense", (fl, "intermediate"), i, h)
        dense(f"{hf}.output.dense", (fl, "output"), h, i)
        norm(f"{hf}.output.LayerNorm", (fl, "output_LayerNorm"))
    return rows
