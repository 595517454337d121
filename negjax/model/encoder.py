"""`Encoder`: the BERT module plus its tokenizer, pooling and tower layout; `load_encoder`.

    enc = load_encoder(cfg.model)          # 'tiny' | 'minilm' | a model directory
    emb = enc.encode(enc.params, tokens, mask, tower="query")   # [N, D] float32

Params layout: tied towers `{"encoder": p}`, separate towers `{"query": p, "doc": p}`, where
`p` is the Flax params tree of one `BertEncoder`. `encode` is a pure function of its
arguments (jit it with `tower` / `deterministic` static, e.g. through a closure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from negjax.config import ModelConfig
from negjax.errors import NegjaxError
from negjax.model.attention import check_implementation
from negjax.model.lora import add_adapters, lora_spec, merge_adapters
from negjax.model.bert import BertConfig, BertEncoder, l2_normalize, pool
from negjax.model.tokenizer import load_tokenizer

TOWERS = ("query", "doc")
# int8: the dense layers in int8, for inference only (negjax.model.bert.Int8Dense).
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


@dataclass(eq=False)
class Encoder:
    """A BERT-family bi-encoder. Hashable by identity, so it can sit in jit closures."""

    config: BertConfig               # or negjax.model.qwen3.Qwen3Config (decoder embedders)
    tokenizer: object                # transformers PreTrainedTokenizerFast
    params: dict                     # {"encoder": p} or {"query": p, "doc": p}; float32
    pooling: str = "mean"            # 'mean' | 'cls' | 'last'
    normalize: bool = True           # L2-normalise the pooled embedding
    dtype: str = "float32"           # compute dtype: float32 | bfloat16 | int8 (inference)
    remat: bool = False              # rematerialise each layer in the backward pass
    tied_towers: bool = True
    max_length: int = 512            # default max tokens (the model dir's max_seq_length)
    source: str = ""                 # 'tiny', 'minilm' or the directory it came from
    extras: dict = field(default_factory=dict)  # unused checkpoint tensors kept for export
    prompts: dict = field(default_factory=dict)  # {"query": str, "doc": str}: put before texts
    truncate_dim: int = 0            # > 0: keep the first k dimensions (Matryoshka), then normalise
    _jitted: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def dim(self) -> int:
        """Embedding size D (`truncate_dim` when set)."""
        return self.truncate_dim or self.config.hidden_size

    def truncated(self, k: int) -> "Encoder":
        """This encoder with embeddings cut to their first `k` dimensions (re-normalised when
        it normalises): `--dim K` of encode, eval and mine, for Matryoshka-trained models."""
        import dataclasses

        if not 0 < k <= self.config.hidden_size:
            raise NegjaxError(f"--dim {k}: the model's embeddings have {self.config.hidden_size} "
                              "dimensions")
        return dataclasses.replace(self, truncate_dim=0 if k == self.config.hidden_size else k)

    def with_prompts(self, prompts: dict) -> "Encoder":
        """This encoder with other prompts ({"query", "doc"}: a data source's); the compiled
        programs are shared (prompts are put before the texts, outside them)."""
        import dataclasses

        new = dataclasses.replace(self, prompts={**self.prompts, **prompts})
        new._jitted = self._jitted
        return new

    @property
    def module(self):
        """The Flax module of the architecture (`BertEncoder`, `Qwen3Encoder` for Qwen,
        `ModernBertEncoder` for ModernBERT)."""
        from negjax.model.modernbert import ModernBertConfig, ModernBertEncoder
        from negjax.model.qwen3 import Qwen3Config, Qwen3Encoder

        if isinstance(self.config, (Qwen3Config, ModernBertConfig)) and self.dtype == "int8":
            raise NegjaxError("model.dtype 'int8' is implemented for BERT-family encoders only")
        if isinstance(self.config, Qwen3Config):
            return Qwen3Encoder(self.config, _DTYPES[self.dtype], self.remat)
        if isinstance(self.config, ModernBertConfig):
            return ModernBertEncoder(self.config, _DTYPES[self.dtype], self.remat)
        return BertEncoder(self.config, _DTYPES[self.dtype], self.remat)

    def prompted(self, texts, tower: str) -> list[str]:
        """`texts` with the tower's prompt (`model.query_prompt` / `doc_prompt`) in front, as
        sentence-transformers applies a prompt: the same strings in every command."""
        prompt = self.prompts.get(tower, "")
        return [prompt + t for t in texts] if prompt else list(texts)

    def tower_params(self, params: dict, tower: str) -> dict:
        """The Flax params of one tower."""
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        return params["encoder"] if self.tied_towers else params[tower]

    def hidden_states(self, params, tokens, mask, *, tower: str = "query", rng=None,
                      deterministic: bool = True, layer_params=None):
        """tokens, mask [N, L] int32 -> last hidden states [N, L, H] float32. `layer_params`:
        a function applied to each transformer layer's params as the layer runs (FSDP)."""
        if not deterministic and rng is None:
            raise ValueError("dropout (deterministic=False) needs an rng")
        if not deterministic and self.dtype == "int8":
            raise NegjaxError("model.dtype 'int8' is for encoding only, not training")
        rngs = {} if deterministic else {"dropout": rng}
        module = self.module if layer_params is None else self.module.clone(layer_params=layer_params)
        return module.apply({"params": self.tower_params(params, tower)}, tokens, mask,
                            deterministic, rngs=rngs)

    def encode(self, params, tokens, mask, *, tower: str = "query", rng=None,
               deterministic: bool = True, layer_params=None):
        """tokens, mask [N, L] int32 -> embeddings [N, D] float32 (pooled, normalised if
        configured). Dropout is active iff `deterministic=False`, driven by `rng`."""
        hidden = self.hidden_states(params, tokens, mask, tower=tower, rng=rng,
                                    deterministic=deterministic, layer_params=layer_params)
        emb = pool(hidden, mask, self.pooling)
        if self.truncate_dim:
            emb = emb[:, :self.truncate_dim]
        return l2_normalize(emb) if self.normalize else emb

    def jitted_encode(self, tower: str = "query"):
        """`jax.jit` of deterministic `encode(params, tokens, mask)` for one tower, made once per
        encoder so repeated calls (evaluation during training) reuse compiled programs."""
        if tower not in self._jitted:
            self._jitted[tower] = jax.jit(
                lambda params, tokens, mask: self.encode(params, tokens, mask, tower=tower))
        return self._jitted[tower]

    def init_one(self, rng) -> dict:
        """Fresh random params of one tower (BERT init: N(0, 0.02), LayerNorm 1/0)."""
        tokens = jnp.zeros((1, 8), jnp.int32)
        mask = jnp.ones((1, 8), jnp.int32)
        variables = jax.jit(lambda r: self.module.init({"params": r}, tokens, mask, True))(rng)
        return variables["params"]

    def init_params(self, rng) -> dict:
        """Fresh random params in the tower layout; separate towers get independent draws."""
        if self.tied_towers:
            return {"encoder": self.init_one(rng)}
        rq, rd = jax.random.split(rng)
        return {"query": self.init_one(rq), "doc": self.init_one(rd)}

    def with_towers(self, one: dict) -> dict:
        """One tower's params -> the tower layout (separate towers both start from `one`)."""
        if self.tied_towers:
            return {"encoder": one}
        return {"query": one, "doc": jax.tree.map(lambda x: x.copy(), one)}


def family(cfg) -> str:
    """'bert' (BERT, RoBERTa, XLM-RoBERTa), 'modernbert' or 'qwen' (Qwen3, Qwen2)."""
    from negjax.model.qwen3 import Qwen3Config

    if isinstance(cfg, Qwen3Config):
        return "qwen"
    if isinstance(cfg, BertConfig):
        return "bert"
    return "modernbert"


def _tiny_tokenizer_dir(model_cfg: ModelConfig) -> Path:
    if model_cfg.tokenizer:
        return Path(model_cfg.tokenizer)
    try:
        from negjax.data.wordnet import tokenizer_dir
    except ImportError:
        raise NegjaxError("model 'tiny' needs a tokenizer: the built-in WordNet tokenizer is "
                          "not available; set model.tokenizer=DIR") from None
    return Path(tokenizer_dir())


TINY_ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "modernbert", "qwen3", "qwen2")


def _tiny_config(model_cfg: ModelConfig, tokenizer):
    """The architecture of model 'tiny' (`model.architecture`), sized by `model.hidden_size`,
    `num_layers`, `num_heads`, `intermediate_size`; vocabulary and special ids from the
    tokenizer. Qwen gets grouped-query attention (half as many key/value heads, when the
    head count is even); ModernBERT a 64-token local window with every third layer global."""
    from negjax.model.modernbert import ModernBertConfig
    from negjax.model.qwen3 import Qwen3Config

    arch = model_cfg.architecture
    if arch not in TINY_ARCHITECTURES:
        raise NegjaxError(f"config key 'model.architecture': {arch!r} is not one of "
                          f"{list(TINY_ARCHITECTURES)}")
    dropout = model_cfg.dropout if model_cfg.dropout >= 0 else 0.1
    max_len = max(512, model_cfg.query_max_len, model_cfg.doc_max_len)
    pad = tokenizer.pad_token_id
    h, heads = model_cfg.hidden_size, model_cfg.num_heads
    common = dict(vocab_size=len(tokenizer), hidden_size=h, num_layers=model_cfg.num_layers,
                  num_heads=heads, intermediate_size=model_cfg.intermediate_size)
    if arch in ("bert", "roberta", "xlm-roberta"):
        offset = 0 if arch == "bert" else pad + 1
        cfg = BertConfig(max_position_embeddings=max_len + offset, hidden_dropout=dropout,
                         attention_dropout=dropout, pad_token_id=pad, model_type=arch,
                         type_vocab_size=2 if arch == "bert" else 1,
                         layer_norm_eps=1e-12 if arch == "bert" else 1e-5, **common)
    elif arch == "modernbert":
        if h % heads:
            raise NegjaxError(f"model.hidden_size {h} is not divisible by model.num_heads {heads}")
        cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else pad
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else pad
        cfg = ModernBertConfig(max_position_embeddings=max_len, local_attention=64,
                               attention_dropout=dropout, embedding_dropout=dropout,
                               mlp_dropout=dropout, pad_token_id=pad, bos_token_id=cls,
                               cls_token_id=cls, eos_token_id=sep, sep_token_id=sep, **common)
    else:
        if h % heads:
            raise NegjaxError(f"model.hidden_size {h} is not divisible by model.num_heads {heads}")
        eos = next((t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), pad)
        cfg = Qwen3Config(num_kv_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=h // heads,
                          max_position_embeddings=max_len, attention_dropout=dropout,
                          pad_token_id=pad, eos_token_id=eos, model_type=arch,
                          qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", **common)
    return _with_options(cfg, model_cfg)


def _with_options(cfg, model_cfg: ModelConfig):
    """The architecture with the run's options: attention kernel, LoRA, bidirectional."""
    changes = dict(attention=check_implementation(model_cfg.attention),
                   lora=lora_spec(family(cfg), model_cfg.lora_rank, model_cfg.lora_alpha,
                                  model_cfg.lora_targets))
    if model_cfg.bidirectional:
        if family(cfg) != "qwen":
            raise NegjaxError("model.bidirectional applies to decoder embedders (Qwen); "
                              f"{cfg.model_type} attends both ways already")
        changes["causal"] = False
    return cfg.replace(**changes)


def _append_eos(tokenizer, eos_id: int) -> None:
    """Make a decoder's tokenizer end every text with the EOS token, as Qwen3-Embedding's does
    (its last-token embedding is the EOS token's hidden state), when it does not already. The
    change is to the tokenizer object, so every path (token stores, encode, export) sees it;
    truncation keeps room for the EOS."""
    from tokenizers import processors

    probe = tokenizer("a")["input_ids"]
    if probe and probe[-1] == eos_id:
        return
    eos = tokenizer.convert_ids_to_tokens(eos_id)
    template = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, eos_id)])
    backend = tokenizer.backend_tokenizer
    backend.post_processor = (template if backend.post_processor is None
                              else processors.Sequence([backend.post_processor, template]))


def load_encoder(model_cfg: ModelConfig) -> Encoder:
    """Build the encoder named by `model_cfg.name`: 'tiny' (random init from seed 0; vocab from
    the tokenizer), 'minilm' (packaged all-MiniLM-L6-v2) or a HF / sentence-transformers dir.

    Pooling: `model_cfg.pooling`, else the directory's 1_Pooling setting, else mean.
    Normalisation follows `model_cfg.normalize`. `model_cfg.dropout >= 0` overrides the
    checkpoint's hidden and attention dropout.
    """
    from negjax.model.hf import read_hf_dir
    from negjax.model.st_settings import transformer_dir

    name = model_cfg.name
    if model_cfg.dtype not in _DTYPES:
        raise NegjaxError(f"config key 'model.dtype': {model_cfg.dtype!r} is not one of {list(_DTYPES)}")
    common = dict(normalize=model_cfg.normalize, dtype=model_cfg.dtype, remat=model_cfg.remat,
                  tied_towers=model_cfg.tied_towers,
                  prompts={"query": model_cfg.query_prompt, "doc": model_cfg.doc_prompt})
    if name == "tiny":
        tokenizer = load_tokenizer(_tiny_tokenizer_dir(model_cfg))
        cfg = _tiny_config(model_cfg, tokenizer)
        if family(cfg) == "qwen":
            _append_eos(tokenizer, cfg.eos_token_id)
        default_pooling = "last" if family(cfg) == "qwen" else "mean"
        enc = Encoder(cfg, tokenizer, {}, pooling=model_cfg.pooling or default_pooling,
                      max_length=max(model_cfg.query_max_len, model_cfg.doc_max_len),
                      source="tiny", **common)
        enc.params = enc.init_params(jax.random.PRNGKey(0))
        return enc

    if name == "minilm":
        from negjax.model.packaged import minilm_dir

        model_dir = minilm_dir()
    else:
        model_dir = Path(name).expanduser()
    hf = read_hf_dir(model_dir)
    cfg = hf.config
    if model_cfg.dropout >= 0:
        cfg = cfg.replace(hidden_dropout=model_cfg.dropout, attention_dropout=model_cfg.dropout)
    cfg = _with_options(cfg, model_cfg)
    tokenizer = load_tokenizer(Path(model_cfg.tokenizer) if model_cfg.tokenizer
                               else transformer_dir(model_dir))
    if cfg.position_offset and tokenizer.pad_token_id != cfg.pad_token_id:
        # RoBERTa positions are counted over the tokens that are not `pad_token_id`.
        raise NegjaxError(f"{model_dir}: the tokenizer pads with id {tokenizer.pad_token_id} but "
                          f"config.json's pad_token_id is {cfg.pad_token_id} ({cfg.model_type} "
                          "positions depend on it)")
    from negjax.model.qwen3 import Qwen3Config

    # Decoders (Qwen) end texts with EOS; encoders' tokenizers add their own [CLS] / [SEP].
    if isinstance(cfg, Qwen3Config) and cfg.eos_token_id is not None:
        _append_eos(tokenizer, cfg.eos_token_id)
    if len(tokenizer) > cfg.vocab_size:
        raise NegjaxError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {cfg.vocab_size}")
    max_length = min(hf.max_length or cfg.max_tokens, cfg.max_tokens)
    # A prompt left empty in the config comes from the directory (sentence-transformers').
    common["prompts"] = {t: common["prompts"][t] or hf.prompts.get(t, "") for t in TOWERS}
    # Decoder embedders (Qwen) pool the last real token unless told otherwise.
    default_pooling = "last" if isinstance(cfg, Qwen3Config) else "mean"
    enc = Encoder(cfg, tokenizer, {}, pooling=model_cfg.pooling or hf.pooling or default_pooling,
                  max_length=max_length, source=str(model_dir) if name != "minilm" else "minilm",
                  extras=hf.extras, **common)
    one = jax.tree.map(jnp.asarray, hf.params)
    if cfg.lora is not None:  # fresh adapters (B = 0: the model's outputs are unchanged)
        one = add_adapters(one, jax.eval_shape(enc.init_one, jax.random.PRNGKey(0)),
                           jax.random.PRNGKey(0))
    enc.params = enc.with_towers(one)
    return enc


def export_hf(enc: Encoder, params: dict, out_dir, *, tower: str = "query",
              overwrite: bool = False, max_shard_bytes: int | None = None,
              matryoshka_dims=None) -> Path:
    """Write `params` (one tower: `tower`, irrelevant when tied) as a Hugging Face +
    sentence-transformers directory (config.json, model.safetensors, tokenizer files,
    modules.json, 1_Pooling, 2_Normalize when normalising, sentence_bert_config.json) that
    `transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load and that
    encodes as `enc.encode` does (with float32 compute)."""
    from negjax.model.hf import write_hf_dir

    one = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32),
                       enc.tower_params(params, tower))
    config = enc.config
    if config.lora is not None:  # LoRA: the export is the plain model, kernel + (alpha/r) A B
        one = merge_adapters(one, config.lora)
        config = config.replace(lora=None)
    return write_hf_dir(out_dir, config, one, enc.tokenizer, pooling=enc.pooling,
                        normalize=enc.normalize, max_length=enc.max_length, extras=enc.extras,
                        prompts=enc.prompts, overwrite=overwrite, matryoshka_dims=matryoshka_dims,
                        **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}))
