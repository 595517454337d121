"""A Flax (linen) ModernBERT encoder, matching Hugging Face's `ModernBertModel`.

    tokens, mask [N, L] -> last hidden states [N, L, H] float32

Embeddings: token embeddings -> LayerNorm -> dropout (no position embeddings). Pre-norm
layers: LayerNorm (none in layer 0) -> self-attention (fused q/k/v projection `Wqkv`,
rotary position embeddings, global or sliding-window) -> `Wo` -> residual -> LayerNorm ->
gated MLP `Wo(act(input) * gate)` with `Wi` = [input; gate] -> residual; a final LayerNorm.
Parameter names mirror Hugging Face's (`layer_3/attn/Wqkv`, `layer_3/mlp/Wi`, ...), so
`negjax.model.hf` maps safetensors by a rename plus a transpose of the kernels.

Attention layers are 'full_attention' (every key, RoPE theta `global_rope_theta`) or
'sliding_attention' (keys within `local_attention // 2` positions either side, inclusive,
RoPE theta `local_rope_theta`). Positions are 0..L-1 whatever the padding, as in
transformers (negjax pads on the right). LayerNorm statistics, softmax and the outputs are
float32; `dtype` is the compute dtype of the dense layers (float32 or bfloat16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from negjax.errors import NegjaxError, file_error
from negjax.model.attention import attend, check_implementation
from negjax.model.bert import _ACTIVATIONS, Dropout, Embed
from negjax.model.lora import dense as lora_dense
from negjax.model.qwen3 import rotary

MODERNBERT_TYPES = ("modernbert",)
LAYER_TYPES = ("full_attention", "sliding_attention")


def default_layer_types(num_layers: int, every: int = 3) -> tuple[str, ...]:
    """transformers' pattern for configs without `layer_types`: layer i is global iff
    i % `global_attn_every_n_layers` == 0."""
    return tuple("sliding_attention" if i % every else "full_attention" for i in range(num_layers))


@dataclass(frozen=True)
class ModernBertConfig:
    """The fields of a Hugging Face ModernBERT config.json that change the math (and the
    special token ids, kept so an export writes them back)."""

    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 22
    num_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "gelu"         # config.json's `hidden_activation`
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128       # the full window: sliding layers see +- local_attention // 2
    layer_types: tuple = ()          # per layer 'full_attention' | 'sliding_attention'; () = every 3rd global
    attention_dropout: float = 0.0   # attention probabilities and the attention output (Wo)
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    pad_token_id: int = 50283
    bos_token_id: int | None = 50281
    eos_token_id: int | None = 50282  # (an encoder: its tokenizer adds [CLS] / [SEP]; no EOS appended)
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282
    initializer_range: float = 0.02
    model_type: str = "modernbert"
    attention: str = "xla"           # model.attention: 'xla' | 'cudnn' (not saved with the model)
    lora: Any = None                 # negjax.model.lora.LoraSpec: adapters (not saved with the model)

    def __post_init__(self):
        check_implementation(self.attention)
        if self.model_type not in MODERNBERT_TYPES:
            raise NegjaxError(f"unsupported model_type {self.model_type!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise NegjaxError(f"unsupported hidden_activation {self.hidden_act!r} "
                              f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise NegjaxError(f"hidden_size {self.hidden_size} is not an even multiple of "
                              f"num_attention_heads {self.num_heads}")
        types = tuple(self.layer_types) or default_layer_types(self.num_layers)
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_layers:
            raise NegjaxError(f"layer_types has {len(types)} entries for {self.num_layers} layers")
        bad = sorted(set(types) - set(LAYER_TYPES))
        if bad:
            raise NegjaxError(f"unsupported layer_types {bad} (supported: {', '.join(LAYER_TYPES)})")
        if self.local_attention < 0:
            raise NegjaxError(f"local_attention must be >= 0, got {self.local_attention}")

    position_offset = 0

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def sliding_window(self) -> int:
        """Keys within this distance (inclusive) of the query are seen by sliding layers."""
        return self.local_attention // 2

    @property
    def hidden_dropout(self) -> float:
        """The embedding / MLP dropout (the loader's `model.dropout` override sets both)."""
        return max(self.embedding_dropout, self.mlp_dropout)

    def replace(self, **changes) -> "ModernBertConfig":
        """`dataclasses.replace`; `hidden_dropout=p` sets the embedding and MLP dropout."""
        if "hidden_dropout" in changes:
            p = changes.pop("hidden_dropout")
            changes.setdefault("embedding_dropout", p)
            changes.setdefault("mlp_dropout", p)
        return replace(self, **changes)


def _dense(features: int, cfg: ModernBertConfig, dtype, name: str, bias: bool, std: float,
           target: str) -> nn.Module:
    """`nn.Dense`, or a LoRA-adapted one when `target` ('Wqkv', 'attn/Wo', 'mlp/Wi',
    'mlp/Wo') is one of `cfg.lora`'s targets."""
    return lora_dense(features, name, lora=cfg.lora, dtype=dtype, use_bias=bias,
                      kernel_init=nn.initializers.normal(std), target=target)


def _layer_norm(cfg: ModernBertConfig, dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance (like PyTorch); Flax computes the statistics in float32.
    return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.norm_bias, dtype=dtype,
                        param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _out_std(cfg: ModernBertConfig) -> float:
    """transformers' init std of the output projections (attention and MLP `Wo`)."""
    return cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers)


class Attention(nn.Module):
    cfg: ModernBertConfig
    layer_type: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, *, deterministic: bool):
        cfg = self.cfg
        n, length, _ = x.shape
        heads, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        qkv = _dense(3 * cfg.hidden_size, cfg, self.dtype, "Wqkv", cfg.attention_bias,
                     cfg.initializer_range, "Wqkv")(x).reshape(n, length, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        sliding = self.layer_type == "sliding_attention"
        theta = cfg.local_rope_theta if sliding else cfg.global_rope_theta
        q, k = rotary(q, positions, theta), rotary(k, positions, theta)
        drop = None
        if not deterministic and cfg.attention_dropout > 0:
            dropout = Dropout(cfg.attention_dropout)
            drop = lambda probs: dropout(probs, deterministic=False)  # noqa: E731
        ctx = attend(q, k, v, mask, window=cfg.sliding_window if sliding else None,
                     implementation=cfg.attention, drop=drop)
        out = _dense(cfg.hidden_size, cfg, self.dtype, "Wo", cfg.attention_bias,
                     _out_std(cfg), "attn/Wo")(ctx.reshape(n, length, cfg.hidden_size))
        return Dropout(cfg.attention_dropout)(out, deterministic=deterministic)


class MLP(nn.Module):
    cfg: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        cfg = self.cfg
        i = cfg.intermediate_size
        h = _dense(2 * i, cfg, self.dtype, "Wi", cfg.mlp_bias, cfg.initializer_range, "mlp/Wi")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h[..., :i]) * h[..., i:]
        h = Dropout(cfg.mlp_dropout)(h, deterministic=deterministic)
        return _dense(cfg.hidden_size, cfg, self.dtype, "Wo", cfg.mlp_bias, _out_std(cfg),
                      "mlp/Wo")(h)


class Layer(nn.Module):
    """One pre-norm layer (ModernBertEncoderLayer); layer 0 has no attention LayerNorm."""

    cfg: ModernBertConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, deterministic: bool = True):
        cfg = self.cfg
        h = x if self.index == 0 else _layer_norm(cfg, self.dtype, "attn_norm")(x)
        x = x + Attention(cfg, cfg.layer_types[self.index], self.dtype, name="attn")(
            h, mask, positions, deterministic=deterministic)
        h = _layer_norm(cfg, self.dtype, "mlp_norm")(x)
        return x + MLP(cfg, self.dtype, name="mlp")(h, deterministic=deterministic)


class Embeddings(nn.Module):
    cfg: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool):
        cfg = self.cfg
        x = Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range,
                  name="tok_embeddings")(tokens)
        x = _layer_norm(cfg, self.dtype, "norm")(x)
        return Dropout(cfg.embedding_dropout)(x, deterministic=deterministic)


class ModernBertEncoder(nn.Module):
    """tokens, mask [N, L] int32 -> last hidden states [N, L, H] float32 (the interface of
    `negjax.model.bert.BertEncoder`, `remat` and `layer_params` included)."""

    cfg: ModernBertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    layer_params: Any = None

    @nn.compact
    def __call__(self, tokens, mask, deterministic: bool = True):
        cfg = self.cfg
        x = Embeddings(cfg, self.dtype, name="embeddings")(tokens, deterministic=deterministic)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        # `deterministic` is a Python bool: static for remat (argument 4 counting self).
        layer_cls = nn.remat(Layer, static_argnums=(4,)) if self.remat else Layer
        if self.layer_params is not None:
            fn = self.layer_params
            layer_cls = nn.remat(nn.map_variables(Layer, "params", mutable=False,
                                                  trans_in_fn=lambda v: {"params": fn(v["params"])}),
                                 static_argnums=(4,))
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, i, self.dtype, name=f"layer_{i}")(x, mask, positions, deterministic)
        return _layer_norm(cfg, self.dtype, "final_norm")(x).astype(jnp.float32)

# ---------------------------------------------------------------------------------------------
# Hugging Face config.json and weight names (read and written by negjax.model.hf)
# ---------------------------------------------------------------------------------------------

def from_hf_config(path: Path, raw: dict) -> ModernBertConfig:
    """A ModernBERT config.json (transformers' defaults for missing keys). Both forms are read:
    `layer_types` + `rope_parameters` (transformers >= 5) and the older
    `global_attn_every_n_layers` + `global_rope_theta` / `local_rope_theta`."""
    get = raw.get
    try:
        layers = int(get("num_hidden_layers", 22))
        hidden = int(get("hidden_size", 768))
        heads = int(get("num_attention_heads", 12))
        if get("head_dim") is not None and int(get("head_dim")) != hidden // heads:
            raise NegjaxError(f"head_dim {get('head_dim')} != hidden_size / "
                              f"num_attention_heads ({hidden // heads}) is not supported")
        types = get("layer_types")
        if types is None:
            every = int(get("global_attn_every_n_layers") or 3)
            types = default_layer_types(layers, every)
        elif not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise NegjaxError("layer_types must be a list of strings")
        rope = get("rope_parameters") or {}
        if not isinstance(rope, dict) or set(rope) - {"full_attention", "sliding_attention"}:
            raise NegjaxError("rope_parameters must map 'full_attention' / "
                              "'sliding_attention' to their RoPE settings")
        thetas = {}
        for kind, old_key, default in (("full_attention", "global_rope_theta", 160_000.0),
                                       ("sliding_attention", "local_rope_theta", 10_000.0)):
            params = dict(rope.get(kind) or {})
            params.update(get("rope_scaling") or {})  # (as transformers: applies to both)
            rope_type = params.get("rope_type", params.get("type")) or "default"
            if rope_type != "default":
                raise NegjaxError(f"only the default RoPE is supported ({kind} has "
                                  f"rope_type {rope_type!r})")
            thetas[kind] = float(params.get("rope_theta", get(old_key, default)))

        def token_id(key, default):
            value = get(key, default)
            return value if isinstance(value, int) else None

        pad = get("pad_token_id", 50283)
        return ModernBertConfig(
            vocab_size=int(get("vocab_size", 50368)),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=int(get("intermediate_size", 1152)),
            max_position_embeddings=int(get("max_position_embeddings", 8192)),
            norm_eps=float(get("norm_eps", 1e-5)),
            norm_bias=bool(get("norm_bias", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            hidden_act=str(get("hidden_activation", "gelu")),
            global_rope_theta=thetas["full_attention"],
            local_rope_theta=thetas["sliding_attention"],
            local_attention=int(get("local_attention", 128)),
            layer_types=tuple(types),
            attention_dropout=float(get("attention_dropout", 0.0)),
            embedding_dropout=float(get("embedding_dropout", 0.0)),
            mlp_dropout=float(get("mlp_dropout", 0.0)),
            pad_token_id=int(pad if pad is not None else 0),
            bos_token_id=token_id("bos_token_id", 50281),
            eos_token_id=token_id("eos_token_id", 50282),
            cls_token_id=token_id("cls_token_id", 50281),
            sep_token_id=token_id("sep_token_id", 50282),
            initializer_range=float(get("initializer_range", 0.02)),
        )
    except NegjaxError as e:
        raise file_error(path, None, str(e)) from None
    except (TypeError, ValueError) as e:
        raise NegjaxError(f"bad value: {e}") from None


def to_hf_config(cfg: ModernBertConfig) -> dict:
    """A config.json from which `transformers.AutoModel` builds the same ModernBertModel."""
    return {"architectures": ["ModernBertModel"], "model_type": "modernbert",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings, "norm_eps": cfg.norm_eps,
            "norm_bias": cfg.norm_bias, "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias, "hidden_activation": cfg.hidden_act,
            "layer_types": list(cfg.layer_types), "local_attention": cfg.local_attention,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
            "attention_dropout": cfg.attention_dropout,
            "embedding_dropout": cfg.embedding_dropout, "mlp_dropout": cfg.mlp_dropout,
            "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "cls_token_id": cfg.cls_token_id, "sep_token_id": cfg.sep_token_id,
            "torch_dtype": "float32"}


def hf_key_map(cfg: ModernBertConfig) -> list:
    h, i = cfg.hidden_size, cfg.intermediate_size
    rows = [("embeddings.tok_embeddings.weight", ("embeddings", "tok_embeddings", "embedding"),
             (cfg.vocab_size, h), False)]

    def norm(hf, path):
        rows.append((f"{hf}.weight", path + ("scale",), (h,), False))
        if cfg.norm_bias:
            rows.append((f"{hf}.bias", path + ("bias",), (h,), False))

    def dense(hf, path, n_out, n_in, bias):
        rows.append((f"{hf}.weight", path + ("kernel",), (n_out, n_in), True))
        if bias:
            rows.append((f"{hf}.bias", path + ("bias",), (n_out,), False))

    norm("embeddings.norm", ("embeddings", "norm"))
    for n in range(cfg.num_layers):
        hf, fl = f"layers.{n}", f"layer_{n}"
        if n:  # (layer 0 has no attention LayerNorm)
            norm(f"{hf}.attn_norm", (fl, "attn_norm"))
        dense(f"{hf}.attn.Wqkv", (fl, "attn", "Wqkv"), 3 * h, h, cfg.attention_bias)
        dense(f"{hf}.attn.Wo", (fl, "attn", "Wo"), h, h, cfg.attention_bias)
        norm(f"{hf}.mlp_norm", (fl, "mlp_norm"))
        dense(f"{hf}.mlp.Wi", (fl, "mlp", "Wi"), 2 * i, h, cfg.mlp_bias)
        dense(f"{hf}.mlp.Wo", (fl, "mlp", "Wo"), h, i, cfg.mlp_bias)
    norm("final_norm", ("final_norm",))
    return rows
