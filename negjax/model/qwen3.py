"""A Flax (linen) Qwen3 decoder as a bi-encoder tower (Qwen3-Embedding), and Qwen2 where it is
only a flag away (q/k/v biases, no per-head q/k norm).

    tokens, mask [N, L] -> last hidden states [N, L, H] float32

Pre-norm layers: RMSNorm -> grouped-query self-attention (per-head RMSNorm of q and k
(Qwen3), rotary position embeddings, causal by default) -> residual -> RMSNorm -> SwiGLU MLP
-> residual; a final RMSNorm. Parameter names mirror Hugging Face's `Qwen3Model`
(`layer_3/self_attn/q_proj`, ...), so `negjax.model.hf` maps safetensors by a rename plus a
transpose of the projection kernels. Positions count real tokens from 0 whatever the padding
(RoPE scores depend on position differences only, so left padding gives the hidden states of
right padding). Norm statistics, softmax and the outputs are float32; `dtype` is the compute
dtype of the projections.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from negjax.errors import NegjaxError, file_error
from negjax.model.attention import attend, check_implementation
from negjax.model.lora import dense as lora_dense

QWEN_TYPES = ("qwen3", "qwen2")


@dataclass(frozen=True)
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 / Qwen2 config.json that change the math."""

    vocab_size: int
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_bias: bool = False     # q/k/v/o biases (Qwen2: q/k/v only, see `qkv_bias`)
    qkv_bias: bool = False           # Qwen2's q/k/v biases without an o_proj bias
    qk_norm: bool = True             # Qwen3's per-head RMSNorm of q and k
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0      # (none in the architecture; kept for the loader's override)
    pad_token_id: int = 0
    eos_token_id: int | None = None
    causal: bool = True              # False: bidirectional attention (an option for embedders)
    initializer_range: float = 0.02
    model_type: str = "qwen3"
    attention: str = "xla"           # model.attention: 'xla' | 'cudnn' (not saved with the model)
    lora: Any = None                 # negjax.model.lora.LoraSpec: adapters (not saved with the model)

    def __post_init__(self):
        check_implementation(self.attention)
        if self.model_type not in QWEN_TYPES:
            raise NegjaxError(f"unsupported model_type {self.model_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise NegjaxError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise NegjaxError(f"unsupported hidden_act {self.hidden_act!r} (Qwen uses 'silu')")

    position_offset = 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    def replace(self, **changes) -> "Qwen3Config":
        return replace(self, **changes)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * y.astype(x.dtype)).astype(x.dtype)


def _dense(features: int, cfg: Qwen3Config, dtype, name: str, bias: bool) -> nn.Module:
    return lora_dense(features, name, lora=cfg.lora, dtype=dtype, use_bias=bias,
                      kernel_init=nn.initializers.normal(cfg.initializer_range))


def rotary(x, positions, theta: float):
    """x [N, L, heads, D] rotated by positions [N, L] (the 'rotate half' convention)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv            # [N, L, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]        # [N, L, 1, D]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    half = d // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: Qwen3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, *, deterministic: bool):
        cfg = self.cfg
        n, length, _ = x.shape
        hd, heads, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        q = _dense(heads * hd, cfg, self.dtype, "q_proj", qkv_bias)(x).reshape(n, length, heads, hd)
        k = _dense(kv * hd, cfg, self.dtype, "k_proj", qkv_bias)(x).reshape(n, length, kv, hd)
        v = _dense(kv * hd, cfg, self.dtype, "v_proj", qkv_bias)(x).reshape(n, length, kv, hd)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
        q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        drop = None
        if not deterministic and cfg.attention_dropout > 0:
            from negjax.model.bert import Dropout

            dropout = Dropout(cfg.attention_dropout)
            drop = lambda probs: dropout(probs, deterministic=False)  # noqa: E731
        ctx = attend(q, k, v, mask, causal=cfg.causal, implementation=cfg.attention, drop=drop)
        ctx = ctx.reshape(n, length, heads * hd)
        return _dense(cfg.hidden_size, cfg, self.dtype, "o_proj", cfg.attention_bias)(ctx)


class Layer(nn.Module):
    cfg: Qwen3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, deterministic: bool = True):
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        x = x + Attention(cfg, self.dtype, name="self_attn")(h, mask, positions,
                                                             deterministic=deterministic)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        gate = _dense(cfg.intermediate_size, cfg, self.dtype, "gate_proj", False)(h)
        up = _dense(cfg.intermediate_size, cfg, self.dtype, "up_proj", False)(h)
        return x + _dense(cfg.hidden_size, cfg, self.dtype, "down_proj", False)(jax.nn.silu(gate) * up)


class Qwen3Encoder(nn.Module):
    """tokens, mask [N, L] int32 -> last hidden states [N, L, H] float32 (the interface of
    `negjax.model.bert.BertEncoder`, `layer_params` included)."""

    cfg: Qwen3Config
    dtype: Any = jnp.float32
    remat: bool = False
    layer_params: Any = None

    @nn.compact
    def __call__(self, tokens, mask, deterministic: bool = True):
        from negjax.model.bert import Embed

        cfg = self.cfg
        x = Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range,
                  name="embed_tokens")(tokens).astype(self.dtype)
        # Positions of real tokens from 0 (pads take the position of the token before them).
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        layer_cls = nn.remat(Layer, static_argnums=(4,)) if self.remat else Layer
        if self.layer_params is not None:
            fn = self.layer_params
            layer_cls = nn.remat(nn.map_variables(Layer, "params", mutable=False,
                                                  trans_in_fn=lambda v: {"params": fn(v["params"])}),
                                 static_argnums=(4,))
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, self.dtype, name=f"layer_{i}")(x, mask, positions, deterministic)
        return RMSNorm(cfg.rms_norm_eps, name="norm")(x).astype(jnp.float32)

# ---------------------------------------------------------------------------------------------
# Hugging Face config.json and weight names (read and written by negjax.model.hf)
# ---------------------------------------------------------------------------------------------

def from_hf_config(path: Path, raw: dict) -> Qwen3Config:
    """A Qwen3 / Qwen2 config.json (transformers' defaults for missing keys)."""
    get = raw.get
    qwen2 = raw["model_type"] == "qwen2"
    rope = get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or get("rope_scaling"):
        raise file_error(path, None, "only the default RoPE is supported (no rope_scaling)")
    if get("use_sliding_window"):
        raise file_error(path, None, "sliding-window attention layers are not supported")
    try:
        heads = int(get("num_attention_heads", 32))
        hidden = int(get("hidden_size", 4096))
        pad = get("pad_token_id")
        eos = get("eos_token_id")
        return Qwen3Config(
            vocab_size=int(get("vocab_size", 151936)),
            hidden_size=hidden,
            num_layers=int(get("num_hidden_layers", 32)),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(get("intermediate_size", 22016)),
            max_position_embeddings=int(get("max_position_embeddings", 32768)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            attention_bias=bool(get("attention_bias", False)) and not qwen2,
            qkv_bias=qwen2,
            qk_norm=not qwen2,
            hidden_act=str(get("hidden_act", "silu")),
            attention_dropout=float(get("attention_dropout", 0.0)),
            pad_token_id=int(pad if pad is not None else (eos if isinstance(eos, int) else 0)),
            eos_token_id=eos if isinstance(eos, int) else None,
            causal=not bool(get("negjax_bidirectional", False)),
            initializer_range=float(get("initializer_range", 0.02)),
            model_type=raw["model_type"],
        )
    except NegjaxError as e:
        raise file_error(path, None, str(e)) from None
    except (TypeError, ValueError) as e:
        raise file_error(path, None, f"bad value: {e}") from None


def to_hf_config(cfg: Qwen3Config) -> dict:
    arch = {"qwen3": "Qwen3Model", "qwen2": "Qwen2Model"}[cfg.model_type]
    out = {"architectures": [arch], "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
           "max_position_embeddings": cfg.max_position_embeddings,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": cfg.hidden_act, "attention_dropout": cfg.attention_dropout,
           "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": False,
           "use_sliding_window": False, "torch_dtype": "float32"}
    if cfg.model_type == "qwen3":
        out["attention_bias"] = cfg.attention_bias
    if not cfg.causal:
        out["negjax_bidirectional"] = True  # transformers ignores it; negjax reads it back
    return out


def hf_key_map(cfg: Qwen3Config) -> list:
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    rows = [("embed_tokens.weight", ("embed_tokens", "embedding"), (cfg.vocab_size, h), False),
            ("norm.weight", ("norm", "scale"), (h,), False)]
    bias = cfg.attention_bias or cfg.qkv_bias
    for n in range(cfg.num_layers):
        hf, fl = f"layers.{n}", f"layer_{n}"
        for proj, out in (("q_proj", cfg.num_heads * hd), ("k_proj", cfg.num_kv_heads * hd),
                          ("v_proj", cfg.num_kv_heads * hd)):
            rows.append((f"{hf}.self_attn.{proj}.weight", (fl, "self_attn", proj, "kernel"), (out, h), True))
            if bias:
                rows.append((f"{hf}.self_attn.{proj}.bias", (fl, "self_attn", proj, "bias"), (out,), False))
        rows.append((f"{hf}.self_attn.o_proj.weight", (fl, "self_attn", "o_proj", "kernel"),
                     (h, cfg.num_heads * hd), True))
        if cfg.attention_bias:
            rows.append((f"{hf}.self_attn.o_proj.bias", (fl, "self_attn", "o_proj", "bias"), (h,), False))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                rows.append((f"{hf}.self_attn.{norm}.weight", (fl, "self_attn", norm, "scale"), (hd,), False))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rows.append((f"{hf}.{norm}.weight", (fl, norm, "scale"), (h,), False))
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            rows.append((f"{hf}.mlp.{proj}.weight", (fl, proj, "kernel"), shape, True))
    return rows
