"""Typed configs: one dataclass per section, loaded from TOML, overridden with `--set`.

    negjax config show --config experiments/configs/tiny-wordnet.toml --set train.steps=10

Every field is documented where it is defined (the `doc` metadata, printed by
`negjax config keys`). Unknown keys and wrong types raise `NegjaxError` naming the key.
Defaults live here, next to the fields; each section only holds what its stage reads.

Configs are frozen once loaded and validated: code that needs other values builds a new one
with `updated(cfg, {"section.key": value})`, and runtime values (a checkpoint path, the
hard-negative directory of a re-mining round) travel as arguments, never through a config.
Renamed keys keep working for one release with a deprecation warning (`RENAMED`).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negjax.errors import NegjaxError, warn_deprecated


def f(default, doc: str):
    """A dataclass field with a documentation string (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    name: str = f("tiny", "'tiny' (small BERT from scratch), 'minilm' (packaged all-MiniLM-L6-v2), "
                  "or a path to a Hugging Face / sentence-transformers directory")
    tokenizer: str = f("", "tokenizer directory (tokenizer.json); empty = the model's own, or the "
                       "built-in WordNet tokenizer for 'tiny'")
    pooling: str = f("", "'mean', 'cls' or 'last' (the last real token); empty = the model "
                     "directory's setting (mean for 'tiny')")
    normalize: bool = f(True, "L2-normalise embeddings (cosine similarity)")
    dtype: str = f("float32", "compute dtype: 'float32' or 'bfloat16' (params stay float32); 'int8' "
                   "for encoding only (encode, eval, mine): dense layers in int8, ~1.4-1.6x faster "
                   "on AVX-512 VNNI CPUs; changes ~7% of mined negatives (experiments/bench/README.md)")
    remat: bool = f(False, "rematerialise each transformer layer in the backward pass")
    attention: str = f("xla", "attention kernel (jax.nn.dot_product_attention): 'xla' (any "
                       "backend) or 'cudnn' (cuDNN flash attention on NVIDIA GPUs with "
                       "model.dtype='bfloat16'; assumes right padding, as negjax pads)")
    dropout: float = f(-1.0, "dropout rate; negative = the model config's own")
    tied_towers: bool = f(True, "one encoder for queries and documents; false = separate towers")
    query_prompt: str = f("", "text put before every query wherever queries are tokenised (train, "
                          "mine, eval, encode --tower query), e.g. 'query: ' (e5) or "
                          "'Instruct: ...\\nQuery:'; empty = the model directory's "
                          "sentence-transformers 'query' prompt, if any; saved by export")
    doc_prompt: str = f("", "text put before every document (train, mine, eval, encode --tower "
                        "doc), e.g. 'passage: '; empty = the directory's 'document' prompt, if any")
    bidirectional: bool = f(False, "decoder embedders (Qwen): attend in both directions instead "
                            "of causally (LLM2Vec-style); saved in the export's config.json as "
                            "negjax_bidirectional (transformers itself runs the model causally)")
    lora_rank: int = f(0, "LoRA adapter rank r; 0 = off (all weights train). With r > 0 only the "
                       "adapters train and the optimizer holds only them; export merges them")
    lora_alpha: float = f(16.0, "LoRA scale numerator: the update is (alpha / r) * A B")
    lora_targets: list = f([], "dense layers given adapters, e.g. ['q_proj', 'v_proj'] (Qwen), "
                           "['query', 'value'] (BERT), ['Wqkv', 'attn/Wo'] (ModernBERT); empty = "
                           "the family's attention projections")
    query_max_len: int = f(32, "max query length in tokens")
    doc_max_len: int = f(128, "max document length in tokens")
    architecture: str = f("bert", "'tiny' only: the family of the random-init model: 'bert', "
                          "'roberta', 'xlm-roberta', 'modernbert', 'qwen3' or 'qwen2'")
    hidden_size: int = f(128, "'tiny' only: hidden size")
    num_layers: int = f(2, "'tiny' only: transformer layers")
    num_heads: int = f(2, "'tiny' only: attention heads")
    intermediate_size: int = f(512, "'tiny' only: feed-forward size")


@dataclass(frozen=True)
class SourceConfig:
    """One `[[data.sources]]` table: a dataset of a multi-source run (docs/sources.md)."""
    name: str = f("", "the source's name (unique; used in logs, metrics, eval and mining output)")
    dataset: str = f("", "a dataset directory (the layout of data.dataset) or 'wordnet'")
    corpus: str = f("", "corpus file or directory (overrides the source's dataset's)")
    train: str = f("", "training file or directory (overrides the source's dataset's)")
    train_qrels: str = f("", "qrels TSV of BEIR-style training data (train is then queries)")
    dev_queries: str = f("", "dev queries of this source (overrides the source's dataset's)")
    dev_qrels: str = f("", "dev qrels TSV of this source (overrides the source's dataset's)")
    weight: float = f(1.0, "multiplies the source's sampling probability (data.source_sampling)")
    query_prompt: str = f("", "text put before this source's queries (a task instruction); "
                          "empty = model.query_prompt / the model's own")
    doc_prompt: str = f("", "text put before this source's documents; empty = model.doc_prompt "
                        "/ the model's own")
    negatives: str = f("", "hard-negative shard directory mined for this source; empty = the "
                       "training file's own \"neg\" lists, if any")
    num_negatives: int = f(-1, "hard negatives per query; negative = data.num_negatives. "
                           "Fewer than the largest source's leave masked slots (never random "
                           "documents)")
    in_batch_negatives: bool = f(True, "false: each query is scored against its own positive and "
                                 "hard negatives only, not the batch's other documents "
                                 "(FlagEmbedding's no_in_batch_neg)")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = f("wordnet", "'wordnet' (built-in) or a directory with corpus.jsonl, train.jsonl, "
                     "dev_queries.jsonl, dev_qrels.tsv")
    corpus: str = f("", "corpus JSONL (overrides the dataset's)")
    train: str = f("", "training JSONL (overrides the dataset's)")
    dev_queries: str = f("", "dev queries JSONL (overrides the dataset's)")
    dev_qrels: str = f("", "dev qrels TSV (overrides the dataset's)")
    negatives: str = f("", "hard-negative shard directory (manifest.json); empty = none")
    num_negatives: int = f(0, "hard negatives per query (H); group size is 1 + H")
    negative_sampling: str = f("top", "'top' (best-ranked first) or 'random' within the mined list")
    negative_mix: float = f(1.0, "fraction of the H negative slots filled from the mined list; the "
                            "rest get random corpus documents (each slot decided by a hash of "
                            "seed, step and slot: deterministic, resumable); 1 = all mined")
    curriculum_start_rank: int = f(0, "hardness curriculum: at step 0 the mined lists are read "
                                   "from this rank down (easier negatives), the offset falling "
                                   "linearly to 0 (the hardest) at data.curriculum_steps; 0 = off")
    curriculum_steps: int = f(0, "steps over which the curriculum reaches the top of the lists; "
                              "0 = off")
    length_buckets: list = f([], "pad lengths (tokens); empty = powers of two up to the max length")
    prefetch: int = f(4, "batches prepared ahead in a background thread")
    cache_dir: str = f("", "token store cache; empty = $NEGJAX_CACHE or ~/.cache/negjax")
    train_qrels: str = f("", "qrels TSV of BEIR-style training data (data.train is then a "
                         "queries JSONL)")
    max_positives: int = f(32, "positives per query passed to the loss for masking "
                           "(query_pos_ids columns P = min(this, most positives of any query))")
    prefetch_threads: int = f(1, "threads preparing prefetched batches")
    sources: list = f([], "[[data.sources]] tables (keys: `negjax config keys`, data.sources[]): "
                      "several datasets in one run, each global batch from one of them; "
                      "empty = the single dataset of the keys above")
    source_sampling: str = f("proportional", "how the source of each global batch is drawn: "
                             "'proportional' (p ~ weight x training queries), 'temperature' "
                             "(p ~ weight x queries^data.source_temperature) or 'round_robin' "
                             "(sources in turn; weights ignored)")
    source_temperature: float = f(0.5, "the exponent alpha of 'temperature' sampling: 1 = "
                                  "proportional, 0 = by weight alone")
    sources_per_batch: int = f(1, "single-source sub-batches per global batch: 1 = every "
                               "global batch from one source; k > 1 mixes k draws (each "
                               "batch_size/k queries), e.g. for ablations")


@dataclass(frozen=True)
class LossConfig:
    temperature: float = f(0.05, "softmax temperature (initial value when learnable)")
    learnable_temperature: bool = f(False, "learn log(1/temperature), clipped to [min, max]")
    min_temperature: float = f(0.01, "lower clip of a learnable temperature")
    max_temperature: float = f(1.0, "upper clip of a learnable temperature")
    symmetric: bool = f(False, "add the document->query direction over positives")
    chunk_size: int = f(0, "columns per block of the chunked loss; 0 = materialise the matrix")
    collective: str = f("gather", "'gather' (all-gather the documents to every device) or 'ring' "
                        "(pass them around the devices; O(chunk) instead of O(global batch) "
                        "memory per device, for very large global batches)")
    precision: str = f("highest", "matmul precision of the similarity matrix: 'highest' (true "
                       "float32), 'high' (bf16_3x/tf32 on accelerators) or 'default' (fastest)")
    matryoshka_dims: list = f([], "Matryoshka: sum the loss over the embeddings truncated to these "
                              "leading dimensions (re-normalised when model.normalize), e.g. "
                              "[384, 256, 128, 64]; empty = off (the full embedding only)")
    matryoshka_weights: list = f([], "weight of each matryoshka_dims term; empty = 1 each")
    false_negative_margin: float = f(-1.0, "false-negative guard m in [0, 1): per query, drop from "
                                     "the softmax the negatives (in-batch, hard, bank) scoring "
                                     "above the positive's score x (1 - m), no gradient through "
                                     "the choice; the count is logged (false_negatives_masked); "
                                     "negative = off")
    distill: str = f("", "distillation from teacher scores (training rows' pos_scores / neg_scores): "
                     "'kl' or 'margin_mse' over each query's positive and hard negatives, "
                     "added to InfoNCE; empty = off")
    distill_weight: float = f(1.0, "weight of the distillation term against InfoNCE")
    teacher_temperature: float = f(1.0, "teacher scores are divided by this before the softmax "
                                   "(kl) or the margins (margin_mse)")
    memory_bank_size: int = f(0, "MoCo-style queue of past document embeddings; 0 = off")
    momentum: float = f(0.999, "EMA decay of the momentum document encoder feeding the bank")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = f(1000, "optimizer steps")
    seed: int = f(0, "seed of every random choice (data order, dropout, init)")
    batch_size: int = f(64, "global batch size in queries (across all devices and hosts)")
    learning_rate: float = f(5e-5, "peak learning rate")
    warmup_steps: int = f(100, "linear warm-up steps")
    schedule: str = f("linear", "decay after warm-up: 'linear', 'cosine' or 'constant'")
    weight_decay: float = f(0.01, "AdamW weight decay")
    max_grad_norm: float = f(1.0, "global gradient-norm clip; 0 = off")
    grad_cache_chunk: int = f(0, "GradCache sub-batch (queries per device); 0 = plain step")
    log_every: int = f(10, "steps between metric lines")
    eval_every: int = f(0, "steps between dev evaluations; 0 = only at the end")
    max_nonfinite: int = f(10, "abort after this many steps with a NaN/Inf loss (each is skipped)")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = f(500, "steps between checkpoints")
    keep: int = f(3, "most recent checkpoints kept")
    best_metric: str = f("mrr@10", "dev metric whose best checkpoint is also kept; empty = none")
    async_save: bool = f(True, "write checkpoints in the background")


@dataclass(frozen=True)
class MiningConfig:
    every_steps: int = f(0, "re-mine with the current parameters every N training steps; 0 = never")
    index: str = f("scann", "'scann' or 'exact'")
    k: int = f(0, "neighbours retrieved; 0 = 100 + the largest number of positives")
    negatives_kept: int = f(32, "negatives written per query into the shards (training draws "
                            "data.num_negatives of them per step)")
    sampling: str = f("top", "'top' or 'random' among the candidates that pass the filters")
    rank_range: str = f("", "keep ranks MIN:MAX (1-based, inclusive); empty = all")
    relative_margin: float = f(-1.0, "drop candidates scoring above pos*(1-M); negative = off")
    absolute_margin: float = f(-1.0, "drop candidates scoring above pos-M; negative = off")
    max_score: float = f(2.0, "drop candidates scoring above this")
    min_score: float = f(-2.0, "drop candidates scoring below this")
    dedup_text: bool = f(True, "drop candidates whose normalised text equals a positive's")
    seed: int = f(0, "seed of random sampling")
    teacher_scores: str = f("", "a teacher's (query, document) scores (TSV query-id/doc-id/score or "
                            "JSONL): mined shards carry the teacher's score of each positive and "
                            "negative (loss.distill), also in re-mining rounds; empty = none")
    audit_queries: int = f(1000, "queries searched exactly to measure ScaNN recall@k")
    encode_batch_size: int = f(256, "texts per encoding batch over all devices of all processes")
    shard_size: int = f(4096, "queries per output shard (the unit of resume)")
    encode_chunk: int = f(8192, "texts per saved embedding chunk (the unit of resume while encoding)")
    embedding_dtype: str = f("float32", "dtype of the document embeddings saved on disk and searched: "
                             "'float32', 'float16' or 'bfloat16' (half the disk and memory)")
    num_leaves: int = f(0, "ScaNN tree leaves; 0 = automatic (about sqrt(corpus size))")
    leaves_to_search: int = f(0, "ScaNN leaves searched per query; 0 = automatic")
    reorder: int = f(0, "ScaNN candidates re-scored exactly; 0 = automatic (max(4k, 250))")
    target_recall: float = f(0.95, "raise the automatic ScaNN leaves_to_search / reorder until "
                             "recall@k against exact search reaches this on a sample of "
                             "audit_queries queries; 0 = use the settings as they are")


@dataclass(frozen=True)
class EvalConfig:
    encode_batch_size: int = f(256, "texts per encoding batch over all devices of all processes")
    index: str = f("exact", "'exact' or 'scann' for large corpora")
    split: str = f("dev", "split evaluated during training: 'dev', 'test' or 'none' (no "
                   "evaluation inside the run, e.g. when an outer script evaluates)")
    max_queries: int = f(0, "evaluate at most this many queries; 0 = all")


@dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str = f("", "host:port of process 0; empty = environment or single process")
    num_processes: int = f(0, "number of processes; 0 = environment or 1")
    process_id: int = f(-1, "this process' index; negative = environment or 0")
    fsdp: int = f(1, "devices per FSDP group: parameters, gradients and optimizer state are "
                  "sharded over this many devices (mesh axis 'fsdp', the batch over all); "
                  "1 = replicated")
    compile_cache: str = f("", "JAX persistent compilation cache directory (a shared path on a "
                           "pod; process 0 writes, all read); empty = $NEGJAX_COMPILE_CACHE or "
                           "<negjax cache>/jax-compile; 'off' = none")


@dataclass(frozen=True)
class Config:
    workdir: str = f("", "run directory: checkpoints, metrics.jsonl, TensorBoard events, plots")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "int8"),
    "model.pooling": ("", "mean", "cls", "last"),
    "data.negative_sampling": ("top", "random"),
    "loss.chunk_size": None,
    "loss.collective": ("gather", "ring"),
    "train.schedule": ("linear", "cosine", "constant"),
    "mining.index": ("scann", "exact"),
    "mining.sampling": ("top", "random"),
    "eval.index": ("exact", "scann"),
    "eval.split": ("dev", "test", "none"),
    "loss.precision": ("highest", "high", "default"),
    "loss.distill": ("", "kl", "margin_mse"),
    "model.attention": ("xla", "cudnn"),
    "data.source_sampling": ("proportional", "temperature", "round_robin"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "checkpoint.every_steps",
             "checkpoint.keep", "model.query_max_len", "model.doc_max_len", "mining.encode_batch_size",
             "eval.encode_batch_size", "model.hidden_size", "model.num_layers", "model.num_heads",
             "model.intermediate_size", "data.max_positives", "distributed.fsdp")
_NON_NEGATIVE = ("data.num_negatives", "loss.chunk_size", "loss.memory_bank_size",
                 "train.warmup_steps", "train.grad_cache_chunk", "train.eval_every",
                 "mining.every_steps", "mining.k", "mining.negatives_kept", "mining.audit_queries",
                 "data.prefetch", "train.max_nonfinite", "eval.max_queries",
                 "data.prefetch_threads")


# Old key -> new key. Accepted (with a deprecation warning) until negjax 0.3.
RENAMED = {
    "mining.num_negatives": "mining.negatives_kept",
    "mining.batch_size": "mining.encode_batch_size",
    "eval.batch_size": "eval.encode_batch_size",
}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(key: str, value, typ):
    """Return `value` converted to `typ`, or raise naming `key`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or typing.get_origin(typ) is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - config fields only use the types above
        raise NegjaxError(f"config key {key!r}: unsupported type {typ}")
    name = getattr(typ, "__name__", str(typ))
    raise NegjaxError(f"config key {key!r}: expected {name}, got {type(value).__name__} {value!r}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = {fl.name for fl in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            new = RENAMED[full]
            warn_deprecated(f"config key {full!r}", f"{new!r}")
            full, key = new, new.rsplit(".", 1)[-1]
        if key not in names:
            known = ", ".join(sorted(names))
            raise NegjaxError(f"unknown config key {full!r} (known in this section: {known})")
        typ = hints[key]
        if full == "data.sources":
            object.__setattr__(obj, key, _sources(value))
            continue
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise NegjaxError(f"config key {full!r}: expected a [{full}] table, got {value!r}")
            _apply(getattr(obj, key), value, prefix=f"{full}.")
        else:
            object.__setattr__(obj, key, _check_type(full, value, typ))


def _sources(value) -> list:
    """`[[data.sources]]` tables -> [SourceConfig] (keys checked as everywhere, named
    data.sources[i].key)."""
    if not isinstance(value, list) or not all(isinstance(t, (dict, SourceConfig)) for t in value):
        raise NegjaxError(f"config key 'data.sources': expected [[data.sources]] tables, got {value!r}")
    out = []
    for i, table in enumerate(value):
        if isinstance(table, SourceConfig):
            out.append(table)
            continue
        src = SourceConfig()
        _apply(src, table, prefix=f"data.sources[{i}].")
        out.append(src)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value). The value is read as TOML
    (`3`, `1e-4`, `true`, `[32, 64]`, `"x"`) and otherwise taken as a bare string."""
    if "=" not in text:
        raise NegjaxError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise NegjaxError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Check value ranges and choices; raise `NegjaxError` naming the key."""
    def get(key):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, choices in _CHOICES.items():
        if choices is not None and get(key) not in choices:
            raise NegjaxError(f"config key {key!r}: {get(key)!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        if get(key) <= 0:
            raise NegjaxError(f"config key {key!r}: must be > 0, got {get(key)}")
    for key in _NON_NEGATIVE:
        if get(key) < 0:
            raise NegjaxError(f"config key {key!r}: must be >= 0, got {get(key)}")
    if cfg.loss.temperature <= 0:
        raise NegjaxError(f"config key 'loss.temperature': must be > 0, got {cfg.loss.temperature}")
    if not 0 < cfg.loss.min_temperature <= cfg.loss.max_temperature:
        raise NegjaxError("config keys 'loss.min_temperature'/'loss.max_temperature': need 0 < min <= max")
    if not 0.0 <= cfg.loss.momentum < 1.0:
        raise NegjaxError(f"config key 'loss.momentum': must be in [0, 1), got {cfg.loss.momentum}")
    if cfg.train.learning_rate <= 0:
        raise NegjaxError(f"config key 'train.learning_rate': must be > 0, got {cfg.train.learning_rate}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise NegjaxError("config key 'model.num_heads': must divide model.hidden_size")
    if not all(isinstance(b, int) and b > 0 for b in cfg.data.length_buckets):
        raise NegjaxError("config key 'data.length_buckets': must be a list of positive integers")
    _validate_sources(cfg.data)
    if cfg.mining.rank_range:
        parse_rank_range(cfg.mining.rank_range, key="mining.rank_range")
    if cfg.loss.teacher_temperature <= 0 or cfg.loss.distill_weight < 0:
        raise NegjaxError("config keys 'loss.teacher_temperature' (> 0) / 'loss.distill_weight' "
                          "(>= 0): out of range")
    if cfg.loss.false_negative_margin >= 1.0:
        raise NegjaxError(f"config key 'loss.false_negative_margin': must be < 1 (negative = off), "
                          f"got {cfg.loss.false_negative_margin}")
    dims, weights = cfg.loss.matryoshka_dims, cfg.loss.matryoshka_weights
    if not all(isinstance(k, int) and k > 0 for k in dims) or len(set(dims)) != len(dims):
        raise NegjaxError(f"config key 'loss.matryoshka_dims': must be distinct positive "
                          f"integers, got {dims}")
    if weights and (len(weights) != len(dims) or
                    not all(isinstance(w, (int, float)) and w > 0 for w in weights)):
        raise NegjaxError(f"config key 'loss.matryoshka_weights': must be {len(dims)} positive "
                          f"numbers (one per loss.matryoshka_dims entry), got {weights}")
    return cfg


def _validate_sources(d: DataConfig) -> None:
    if d.sources_per_batch < 1:
        raise NegjaxError(f"config key 'data.sources_per_batch': must be >= 1, got {d.sources_per_batch}")
    if d.source_temperature < 0:
        raise NegjaxError(f"config key 'data.source_temperature': must be >= 0, got "
                          f"{d.source_temperature}")
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        if not s.name or not all(c.isalnum() or c in "-_." for c in s.name):
            raise NegjaxError(f"config key 'data.sources[{i}].name': a non-empty name of letters, "
                              f"digits, '-', '_' or '.' is required, got {s.name!r}")
        if names.count(s.name) > 1:
            raise NegjaxError(f"config key 'data.sources[{i}].name': {s.name!r} is used twice")
        if not s.dataset and not s.train:
            raise NegjaxError(f"config key 'data.sources[{i}]' ({s.name}): set its dataset or train")
        if not s.weight > 0:
            raise NegjaxError(f"config key 'data.sources[{i}].weight' ({s.name}): must be > 0, "
                              f"got {s.weight}")
        if s.negatives and s.num_negatives == 0:
            raise NegjaxError(f"config key 'data.sources[{i}].negatives' ({s.name}): set but "
                              "num_negatives is 0, so no mined negative would be used")


def parse_rank_range(text: str, key: str = "--rank-range") -> tuple[int, int]:
    """'MIN:MAX' (1-based, inclusive; either side may be empty) -> (min, max)."""
    try:
        lo, hi = text.split(":")
        lo_i = int(lo) if lo.strip() else 1
        hi_i = int(hi) if hi.strip() else 1 << 30
    except ValueError:
        raise NegjaxError(f"{key} {text!r}: expected MIN:MAX, e.g. 10:100") from None
    if lo_i < 1 or hi_i < lo_i:
        raise NegjaxError(f"{key} {text!r}: need 1 <= MIN <= MAX")
    return lo_i, hi_i


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- `--set` overrides, then `validate`."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise NegjaxError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise NegjaxError(f"{p}: invalid TOML: {e}") from None
        _apply(cfg, data)
    for text in overrides:
        keys, value = parse_override(text)
        _apply(cfg, _nest(keys, value))
    return validate(cfg)


def updated(cfg: Config, changes: dict[str, Any]) -> Config:
    """A validated copy of `cfg` with `{"section.key": value}` changed (`cfg` is unchanged)."""
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _apply(new, _nest(key.split("."), value))
    return validate(new)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v) -> str:
    if dataclasses.is_dataclass(v):  # a [[data.sources]] table, written inline
        return "{" + ", ".join(f"{fl.name} = {_toml_value(getattr(v, fl.name))}"
                               for fl in dataclasses.fields(v)) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal config."""
    lines = []
    sections = []
    for fl in dataclasses.fields(cfg):
        value = getattr(cfg, fl.name)
        if dataclasses.is_dataclass(value):
            sections.append((fl.name, value))
        else:
            lines.append(f"{fl.name} = {_toml_value(value)}")
    for name, sec in sections:
        lines.append(f"\n[{name}]")
        for fl in dataclasses.fields(sec):
            lines.append(f"{fl.name} = {_toml_value(getattr(sec, fl.name))}")
    return "\n".join(lines) + "\n"


def describe_keys(cfg_cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every config field."""
    rows = []
    hints = _hints(cfg_cls)
    for fl in dataclasses.fields(cfg_cls):
        typ = hints[fl.name]
        if dataclasses.is_dataclass(typ):
            rows.extend(describe_keys(typ, prefix=f"{prefix}{fl.name}."))
        else:
            default = fl.default if fl.default is not dataclasses.MISSING else fl.default_factory()
            rows.append((f"{prefix}{fl.name}", _toml_value(default), fl.metadata.get("doc", "")))
            if f"{prefix}{fl.name}" == "data.sources":
                rows.extend(describe_keys(SourceConfig, prefix="data.sources[]."))
    return rows
