"""Hugging Face / sentence-transformers directories <-> `BertConfig` + Flax params.

Import reads config.json, model.safetensors (or a sharded model.safetensors.index.json;
pickled .bin files are refused), and the sentence-transformers settings when present
(modules.json, the Pooling module's config.json, Normalize, sentence_bert_config.json).
Export writes a directory that `transformers.AutoModel` and
`sentence_transformers.SentenceTransformer` both load.

Key map (HF `BertModel` name -> Flax path; dense weights are transposed [out, in] -> [in, out]):

    embeddings.{word,position,token_type}_embeddings.weight -> embeddings/<same>/embedding
    embeddings.LayerNorm.{weight,bias}                      -> embeddings/LayerNorm/{scale,bias}
    encoder.layer.i.attention.self.{query,key,value}.*      -> layer_i/attention/{query,key,value}
    encoder.layer.i.attention.output.dense.*                -> layer_i/attention_output
    encoder.layer.i.attention.output.LayerNorm.*            -> layer_i/attention_LayerNorm
    encoder.layer.i.intermediate.dense.*                    -> layer_i/intermediate
    encoder.layer.i.output.dense.*                          -> layer_i/output
    encoder.layer.i.output.LayerNorm.*                      -> layer_i/output_LayerNorm

Qwen3 / Qwen2 (`_qwen_key_map`) and ModernBERT (`_modernbert_key_map`: `layers.i.attn.Wqkv`
-> `layer_i/attn/Wqkv`, ...; a ModernBertForMaskedLM's `model.` prefix is stripped and its
MLM head ignored) map the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError, file_error
from negjax.model.bert import MODEL_TYPES, BertConfig
from negjax.model.modernbert import MODERNBERT_TYPES, ModernBertConfig, default_layer_types
from negjax.model.qwen3 import QWEN_TYPES, Qwen3Config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Encoder tensors live under these prefixes; anything else (pooler, MLM / classifier heads)
# is unused. The pooler is kept aside so an export round-trips it (AutoModel would
# otherwise re-initialise it). Buffers some checkpoints save are ignored too.
_ENCODER_PREFIXES = ("embeddings.", "encoder.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


@dataclass
class HFModel:
    """What a model directory holds, in negjax terms."""

    config: BertConfig
    params: dict                   # Flax params of one tower, float32 numpy arrays
    pooling: str | None = None     # 'mean' | 'cls' from 1_Pooling; None = not stated
    normalize: bool | None = None  # Normalize module present; None = no modules.json
    max_length: int | None = None  # sentence_bert_config.json max_seq_length
    extras: dict = field(default_factory=dict)  # unused tensors kept for export (pooler)
    prompts: dict = field(default_factory=dict)  # {"query", "doc"} from sentence-transformers


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise file_error(path, e.lineno, f"invalid JSON: {e.msg}") from None


# ---------------------------------------------------------------------------------- config

def read_config(model_dir: Path) -> BertConfig:
    """config.json -> BertConfig; model_type 'bert', 'roberta' or 'xlm-roberta' (Qwen3Config for
    'qwen3' / 'qwen2', ModernBertConfig for 'modernbert'; anything else is an unknown
    architecture)."""
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise NegjaxError(f"{model_dir}: model directory not found")
    if not path.is_file():
        raise NegjaxError(f"{model_dir}: no config.json (not a Hugging Face model directory; a "
                          "training workdir has config.toml and checkpoints/)")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise file_error(path, None, "expected a JSON object")
    model_type = raw.get("model_type")
    if model_type in QWEN_TYPES:
        return _read_qwen_config(path, raw)
    if model_type in MODERNBERT_TYPES:
        return _read_modernbert_config(path, raw)
    if model_type not in MODEL_TYPES:
        arch = raw.get("architectures")
        raise file_error(path, None, f"unknown architecture (model_type={model_type!r}, "
                         f"architectures={arch!r}); negjax loads model_type "
                         f"{', '.join(repr(t) for t in MODEL_TYPES + QWEN_TYPES + MODERNBERT_TYPES)}")
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


def _read_qwen_config(path: Path, raw: dict) -> Qwen3Config:
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


def _qwen_config_json(cfg: Qwen3Config) -> dict:
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


def _qwen_key_map(cfg: Qwen3Config) -> list:
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


def _read_modernbert_config(path: Path, raw: dict) -> ModernBertConfig:
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


def _modernbert_config_json(cfg: ModernBertConfig) -> dict:
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


def _modernbert_key_map(cfg: ModernBertConfig) -> list:
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


def config_json(cfg: BertConfig) -> dict:
    """BertConfig -> a config.json that transformers' AutoConfig reads as a BertModel
    (RobertaModel, XLMRobertaModel)."""
    if isinstance(cfg, Qwen3Config):
        return _qwen_config_json(cfg)
    if isinstance(cfg, ModernBertConfig):
        return _modernbert_config_json(cfg)
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


# ---------------------------------------------------------------------------------- key map

def key_map(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF key, Flax path, HF shape, transpose?) for every tensor the encoder needs."""
    if isinstance(cfg, Qwen3Config):
        return _qwen_key_map(cfg)
    if isinstance(cfg, ModernBertConfig):
        return _modernbert_key_map(cfg)
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


def _canonical(key: str) -> str:
    """Strip a task model's 'bert.' / 'roberta.' prefix; old TF-converted checkpoints say
    gamma/beta."""
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key


def hf_to_flax(tensors: dict[str, np.ndarray], cfg: BertConfig, source: str = "model.safetensors"):
    """HF tensors -> (Flax params [float32 numpy], extras). Missing, mis-shaped or unexpected
    encoder tensors raise `NegjaxError` naming the tensor."""
    tensors = {_canonical(k): v for k, v in tensors.items()}
    params: dict = {}
    used = set()
    for hf_key, path, shape, transpose in key_map(cfg):
        if hf_key not in tensors:
            raise NegjaxError(f"{source}: missing tensor {hf_key!r}")
        arr = tensors[hf_key]
        if tuple(arr.shape) != shape:
            raise NegjaxError(f"{source}: tensor {hf_key!r} has shape {list(arr.shape)}, "
                              f"expected {list(shape)} from config.json")
        arr = np.asarray(arr, dtype=np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(arr.T) if transpose else arr
        used.add(hf_key)
    extras = {}
    for key, arr in tensors.items():
        if key in used or key in _BUFFERS:
            continue
        prefixes = (("embed_tokens.", "layers.", "norm.") if isinstance(cfg, Qwen3Config)
                    else ("embeddings.", "layers.", "final_norm.")
                    if isinstance(cfg, ModernBertConfig) else _ENCODER_PREFIXES)
        if not key.startswith(prefixes):
            if key in POOLER_KEYS:
                extras[key] = np.asarray(arr, dtype=np.float32)
            continue
        raise NegjaxError(f"{source}: unexpected tensor {key!r} (config.json has "
                          f"{cfg.num_layers} layers; is this a BertModel checkpoint?)")
    return params, extras


def flax_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Flax params of one tower -> HF `BertModel` tensors (float32, contiguous)."""
    out = {}
    for hf_key, path, shape, transpose in key_map(cfg):
        node = params
        for part in path:
            node = node[part]
        arr = np.asarray(node, dtype=np.float32)
        arr = arr.T if transpose else arr
        if arr.shape != shape:
            raise NegjaxError(f"param {'/'.join(path)} has shape {list(arr.shape)}, expected "
                              f"{list(shape)} for {hf_key!r}")
        out[hf_key] = np.ascontiguousarray(arr)
    return out


# ---------------------------------------------------------------------------------- weights

def _load_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                try:
                    out[key] = f.get_tensor(key)
                except (TypeError, ValueError):
                    # numpy has no bfloat16: read that tensor through JAX instead.
                    out[key] = None
        missing = [k for k, v in out.items() if v is None]
        if missing:
            with safe_open(str(path), framework="flax") as f:
                for key in missing:
                    out[key] = np.asarray(f.get_tensor(key).astype("float32"))
    except SafetensorError as e:
        raise NegjaxError(f"{path}: not a readable safetensors file: {e}") from None
    return out


def load_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of model.safetensors (or its sharded index). Pickles are refused."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors_file(single), str(single)
    if index.is_file():
        meta = _read_json(index)
        shards = sorted(set((meta.get("weight_map") or {}).values()))
        if not shards:
            raise file_error(index, None, "no weight_map")
        tensors = {}
        for name in shards:
            shard = model_dir / name
            if not shard.is_file():
                raise file_error(index, None, f"shard {name} not found")
            tensors.update(_load_safetensors_file(shard))
        return tensors, str(index)
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise NegjaxError(f"{model_dir}: only pickled weights ({', '.join(pickles)}); negjax "
                          "never loads pickles (they can run code): convert to model.safetensors")
    raise NegjaxError(f"{model_dir}: no model.safetensors")


# ---------------------------------------------------------------------------------- sentence-transformers

def read_st_settings(model_dir: Path) -> tuple[str | None, bool | None, int | None]:
    """(pooling, normalize, max_seq_length) from sentence-transformers files, None if absent.

    Only Transformer -> Pooling (mean or CLS) -> Normalize pipelines are supported; any other
    module (Dense, max pooling, ...) would change the embeddings, so it is an error."""
    modules_path = model_dir / "modules.json"
    pooling = normalize = max_length = None
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise file_error(modules_path, None, "expected a JSON list of modules")
        normalize = False
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
            if kind == "Transformer":
                continue
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pooling = _read_pooling(model_dir / m.get("path", "1_Pooling") / "config.json")
            else:
                raise file_error(modules_path, None, f"unsupported sentence-transformers module "
                                 f"{m.get('type') if isinstance(m, dict) else m!r}")
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        value = _read_json(sbert).get("max_seq_length")
        max_length = int(value) if value else None
    return pooling, normalize, max_length


def _read_pooling(path: Path) -> str:
    if not path.is_file():
        raise NegjaxError(f"{path}: pooling config not found (named in modules.json)")
    cfg = _read_json(path)
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if on == ["pooling_mode_mean_tokens"]:
        return "mean"
    if on == ["pooling_mode_cls_token"]:
        return "cls"
    if on == ["pooling_mode_lasttoken"]:
        return "last"
    raise file_error(path, None, f"unsupported pooling {on} (negjax supports mean, CLS or last token)")


def transformer_dir(model_dir: Path) -> Path:
    """Where config.json, the weights and the tokenizer live: the directory itself, or the
    Transformer module's subfolder of a sentence-transformers directory (e.g. 0_BERT/)."""
    modules_path = model_dir / "modules.json"
    if (model_dir / "config.json").is_file() or not modules_path.is_file():
        return model_dir
    modules = _read_json(modules_path)
    for m in modules if isinstance(modules, list) else []:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("Transformer") and m.get("path"):
            return model_dir / m["path"]
    return model_dir


def read_hf_dir(model_dir: str | Path) -> HFModel:
    """Config, weights and sentence-transformers settings of a model directory (no tokenizer;
    it lives in `transformer_dir(model_dir)`)."""
    model_dir = Path(model_dir)
    hf_dir = transformer_dir(model_dir) if model_dir.is_dir() else model_dir
    cfg = read_config(hf_dir)
    tensors, source = load_weights(hf_dir)
    params, extras = hf_to_flax(tensors, cfg, source)
    pooling, normalize, max_length = read_st_settings(model_dir)
    if max_length is None and hf_dir != model_dir:
        max_length = read_st_settings(hf_dir)[2]
    return HFModel(cfg, params, pooling, normalize, max_length, extras, read_st_prompts(model_dir))


# sentence-transformers prompt names -> negjax towers
_PROMPT_NAMES = {"query": "query", "document": "doc", "passage": "doc", "doc": "doc"}


def read_st_prompts(model_dir: Path) -> dict:
    """{"query": str, "doc": str} from config_sentence_transformers.json's `prompts` (names
    'query' and 'document' / 'passage'); empty when absent."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    prompts = _read_json(path).get("prompts") or {}
    if not isinstance(prompts, dict):
        raise file_error(path, None, "'prompts' must be an object of name -> text")
    out = {}
    for name, tower in _PROMPT_NAMES.items():
        if isinstance(prompts.get(name), str) and prompts[name] and tower not in out:
            out[tower] = prompts[name]
    return out


# ---------------------------------------------------------------------------------- export

def _pooler(cfg: BertConfig, extras: dict) -> dict[str, np.ndarray]:
    """The pooler tensors AutoModel expects: the imported ones, else a deterministic init
    (sentence-transformers never uses the pooler; this only keeps AutoModel from warning)."""
    if all(k in extras for k in POOLER_KEYS):
        return {k: np.ascontiguousarray(extras[k], dtype=np.float32) for k in POOLER_KEYS}
    rng = np.random.default_rng(0)
    h = cfg.hidden_size
    return {"pooler.dense.weight": (rng.standard_normal((h, h)) * cfg.initializer_range).astype(np.float32),
            "pooler.dense.bias": np.zeros((h,), np.float32)}


def _set_permissions(root: Path) -> None:
    """mkdtemp (0700) and safetensors (0600) create private files; an exported model is
    meant to be shared, so use the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size ("5GB")


def _save_tensors(root: Path, tensors: dict, max_shard_bytes: int) -> None:
    """model.safetensors, or -- when the tensors exceed `max_shard_bytes` -- shards
    model-0000i-of-0000n.safetensors and model.safetensors.index.json (transformers'
    layout: {"metadata": {"total_size"}, "weight_map": {tensor: shard}}). Tensors are cut
    in their own order; a tensor larger than the limit gets a shard of its own."""
    from safetensors.numpy import save_file

    total = sum(int(t.nbytes) for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, size = [{}], 0
    for key, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += int(t.nbytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_hf_dir(out_dir: str | Path, cfg: BertConfig, params: dict, tokenizer, *, pooling: str,
                 normalize: bool, max_length: int, extras: dict | None = None,
                 prompts: dict | None = None, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 matryoshka_dims=None) -> Path:
    """Write a Hugging Face + sentence-transformers directory, atomically (a temporary
    directory renamed into place). An existing non-empty `out_dir` is an error unless
    `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NegjaxError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise NegjaxError(f"{out_dir}: directory exists and is not empty (choose another --out)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = flax_to_hf(params, cfg)
        if isinstance(cfg, BertConfig):  # (decoders have no pooler)
            tensors.update(_pooler(cfg, extras or {}))
        _save_tensors(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_json(cfg), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (tmp / "2_Normalize").mkdir()
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (tmp / "1_Pooling").mkdir()
        pool_cfg = {"word_embedding_dimension": cfg.hidden_size,
                    "pooling_mode_cls_token": pooling == "cls",
                    "pooling_mode_mean_tokens": pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                    "pooling_mode_weightedmean_tokens": False,
                    "pooling_mode_lasttoken": pooling == "last",
                    "include_prompt": True}
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2) + "\n")
        (tmp / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": int(max_length), "do_lower_case": False}, indent=2) + "\n")
        (tmp / "config_sentence_transformers.json").write_text(json.dumps(
            {"model_type": "SentenceTransformer",
             "prompts": {name: (prompts or {}).get(tower, "") for name, tower in
                         (("query", "query"), ("document", "doc")) if (prompts or {}).get(tower)},
             "default_prompt_name": None,
             "similarity_fn_name": "cosine" if normalize else "dot",
             # Trained with Matryoshka at these sizes: SentenceTransformer(dir, truncate_dim=k)
             # (sentence-transformers ignores the key; negjax eval/encode/mine --dim k).
             **({"matryoshka_dims": [int(k) for k in matryoshka_dims]} if matryoshka_dims else {})},
            indent=2) + "\n")
        _set_permissions(tmp)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
