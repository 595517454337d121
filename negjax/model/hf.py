"""Hugging Face / sentence-transformers directories <-> `BertConfig` + Flax params.

Import reads config.json, model.safetensors (or a sharded model.safetensors.index.json;
pickled .bin files are refused), and the sentence-transformers settings when present
(modules.json, the Pooling module's config.json, Normalize, sentence_bert_config.json).
Export writes a directory that `transformers.AutoModel` and
`sentence_transformers.SentenceTransformer` both load.

Key map (each family's `hf_key_map`; for BERT, `bert.hf_key_map`: HF `BertModel` name -> Flax
path; dense weights are transposed [out, in] -> [in, out]):

    embeddings.{word,position,token_type}_embeddings.weight -> embeddings/<same>/embedding
    embeddings.LayerNorm.{weight,bias}                      -> embeddings/LayerNorm/{scale,bias}
    encoder.layer.i.attention.self.{query,key,value}.*      -> layer_i/attention/{query,key,value}
    encoder.layer.i.attention.output.dense.*                -> layer_i/attention_output
    encoder.layer.i.attention.output.LayerNorm.*            -> layer_i/attention_LayerNorm
    encoder.layer.i.intermediate.dense.*                    -> layer_i/intermediate
    encoder.layer.i.output.dense.*                          -> layer_i/output
    encoder.layer.i.output.LayerNorm.*                      -> layer_i/output_LayerNorm

Qwen3 / Qwen2 (`qwen3.hf_key_map`) and ModernBERT (`modernbert.hf_key_map`: `layers.i.attn.Wqkv`
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
from negjax.model import bert, modernbert, qwen3
from negjax.model.st_settings import read_json, read_st_prompts, read_st_settings, transformer_dir
from negjax.model.modernbert import MODERNBERT_TYPES, ModernBertConfig
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
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise file_error(path, None, "expected a JSON object")
    model_type = raw.get("model_type")
    if model_type in QWEN_TYPES:
        return qwen3.from_hf_config(path, raw)
    if model_type in MODERNBERT_TYPES:
        return modernbert.from_hf_config(path, raw)
    if model_type not in MODEL_TYPES:
        arch = raw.get("architectures")
        raise file_error(path, None, f"unknown architecture (model_type={model_type!r}, "
                         f"architectures={arch!r}); negjax loads model_type "
                         f"{', '.join(repr(t) for t in MODEL_TYPES + QWEN_TYPES + MODERNBERT_TYPES)}")
    return bert.from_hf_config(path, raw)


def config_json(cfg: BertConfig) -> dict:
    """The config.json of `cfg` that transformers' AutoConfig reads as the family's model
    (each family's `to_hf_config`)."""
    if isinstance(cfg, Qwen3Config):
        return qwen3.to_hf_config(cfg)
    if isinstance(cfg, ModernBertConfig):
        return modernbert.to_hf_config(cfg)
    return bert.to_hf_config(cfg)


# ---------------------------------------------------------------------------------- key map

def key_map(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF key, Flax path, HF shape, transpose?) for every tensor the encoder needs."""
    if isinstance(cfg, Qwen3Config):
        return qwen3.hf_key_map(cfg)
    if isinstance(cfg, ModernBertConfig):
        return modernbert.hf_key_map(cfg)
    return bert.hf_key_map(cfg)


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
        meta = read_json(index)
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
