"""`negjax mine`: mine hard negatives for training queries (encode, ScaNN, filters, shards).

    negjax mine --model minilm --out negatives/                 # built-in WordNet data
    negjax mine --model DIR --corpus corpus.jsonl --train train.jsonl --out negatives/ \\
        --relative-margin 0.05 --negatives-kept 32 --sampling random --seed 1
    negjax mine --model runs/round1 --out negatives/   # a training workdir: latest checkpoint
                                                       # (and its query/document lengths)
    negjax mine --config sources.toml --out negatives/ # [[data.sources]]: negatives/<source>/
                                                       # each (--source NAME: one of them)

Settings come from the [mining] section of --config (and --set mining.key=value); the flags
below override it (they become `--set` overrides, validated like the file). A rerun with the same settings resumes an interrupted run. Several
processes: start one per host with --coordinator HOST:PORT --num-processes N --process-id I
(or NEGJAX_COORDINATOR / NEGJAX_NUM_PROCESSES / NEGJAX_PROCESS_ID) on a shared filesystem.
"""

from __future__ import annotations

from pathlib import Path

from negjax.errors import NegjaxError

# flag attribute -> config key
_FLAG_KEYS = {
    **{name: f"mining.{name}" for name in (
        "index", "k", "negatives_kept", "sampling", "seed", "rank_range", "relative_margin",
        "absolute_margin", "max_score", "min_score", "audit_queries", "encode_batch_size",
        "num_leaves", "leaves_to_search", "reorder", "target_recall", "shard_size",
        "encode_chunk", "embedding_dtype", "teacher_scores")},
    "model": "model.name", "doc_max_length": "model.doc_max_len",
    "query_max_length": "model.query_max_len", "coordinator": "distributed.coordinator_address",
    "num_processes": "distributed.num_processes", "process_id": "distributed.process_id",
}


def add_parser(sub):
    from negjax.cli import add_config_args, add_renamed_flag

    p = sub.add_parser("mine", help="mine hard negatives: encode, ScaNN top-k, false-negative "
                       "filters, Parquet shards + manifest + report")
    p.add_argument("--model", help="'minilm', 'tiny', a Hugging Face / sentence-transformers "
                   "directory or a negjax training workdir / checkpoint (default: model.name "
                   "from the config)")
    p.add_argument("--corpus", help="corpus: JSONL, Parquet, Arrow or TSV (default: the config's dataset, built-in WordNet)")
    p.add_argument("--train", help="training data: JSONL, Parquet or Arrow (default: the config's dataset)")
    p.add_argument("--train-qrels", help="qrels TSV when --train is a BEIR queries.jsonl")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json, "
                   "report.json, report.png; .work/ holds resumable intermediate state)")
    p.add_argument("--source", metavar="NAME", help="with [[data.sources]] in the config: mine "
                   "only this source (default: every source, each into OUT/<name> against "
                   "its own corpus with its own prompts)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished shard set mined with other settings")
    p.add_argument("--teacher-scores", metavar="FILE",
                   help="a teacher's (query, document) scores, TSV query-id/doc-id/score or "
                   "JSONL {query_id, doc_id, score} (e.g. a reranker's): the shards then carry "
                   "the teacher's score of each positive and negative, for loss.distill")
    p.add_argument("--dim", type=int, default=0, metavar="K", help="keep the first K embedding dimensions (re-normalised when the model normalises): a Matryoshka-trained model at a smaller size (default: all); mined "
                   "scores are those of the truncated embeddings")
    g = p.add_argument_group("search")
    g.add_argument("--index", choices=("scann", "exact"))
    g.add_argument("--k", type=int, help="neighbours retrieved (default 100 + most positives)")
    g.add_argument("--num-leaves", type=int, help="ScaNN tree leaves (default ~sqrt(N))")
    g.add_argument("--leaves-to-search", type=int, help="ScaNN leaves searched per query")
    g.add_argument("--reorder", type=int, help="ScaNN candidates re-scored exactly")
    g.add_argument("--target-recall", type=float, help="tune automatic ScaNN search settings "
                   "until recall@k vs exact reaches this on a query sample (0 = off; default 0.95)")
    g.add_argument("--audit-queries", type=int, help="queries searched exactly to measure "
                   "(and tune) recall")
    g = p.add_argument_group("filters and sampling")
    g.add_argument("--rank-range", metavar="MIN:MAX", help="keep candidates ranked MIN..MAX (1-based)")
    g.add_argument("--relative-margin", type=float, metavar="M",
                   help="drop candidates scoring above pos*(1-M) (0.05 = NV-Retriever 95%%)")
    g.add_argument("--absolute-margin", type=float, metavar="M", help="drop candidates above pos-M")
    g.add_argument("--max-score", type=float, help="drop candidates scoring above this")
    g.add_argument("--min-score", type=float, help="drop candidates scoring below this")
    g.add_argument("--no-dedup-text", action="store_true",
                   help="keep candidates whose normalised text equals a positive's")
    g.add_argument("--negatives-kept", type=int, help="negatives written per query")
    add_renamed_flag(g, "--num-negatives", "--negatives-kept", type=int)
    g.add_argument("--sampling", choices=("top", "random"))
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("encoding and output")
    g.add_argument("--encode-batch-size", type=int, help="texts per encoding batch, over all devices of all processes")
    add_renamed_flag(g, "--batch-size", "--encode-batch-size", type=int)
    g.add_argument("--doc-max-length", type=int, help="document max tokens (default: a training "
                   "workdir's model.doc_max_len, else model.doc_max_len)")
    add_renamed_flag(g, "--max-length", "--doc-max-length", type=int)
    g.add_argument("--query-max-length", type=int, help="query max tokens (default: a training "
                   "workdir's model.query_max_len, else model.query_max_len)")
    g.add_argument("--shard-size", type=int, help="queries per shard")
    g.add_argument("--encode-chunk", type=int, help="texts per saved embedding chunk")
    g.add_argument("--embedding-dtype", choices=("float32", "float16", "bfloat16"),
                   help="document embeddings on disk and in search (default float32)")
    g = p.add_argument_group("multi-process")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    add_config_args(p)
    return p


def flag_overrides(args) -> dict:
    """The config changes the command-line flags ask for ({"section.key": value})."""
    from negjax.config import parse_rank_range

    if args.rank_range:
        parse_rank_range(args.rank_range, key="--rank-range")
    out = {key: getattr(args, attr) for attr, key in _FLAG_KEYS.items()
           if getattr(args, attr, None) is not None}
    if args.no_dedup_text:
        out["mining.dedup_text"] = False
    return out


def input_paths(cfg, args) -> tuple:
    """(corpus or None, train, train_qrels or None): the flags, else the config's dataset."""
    if args.corpus and not args.train:
        raise NegjaxError("--corpus needs --train (the training queries to mine for)")
    if args.train:
        return args.corpus, args.train, args.train_qrels
    from negjax.data.layout import resolve_dataset

    paths = resolve_dataset(cfg.data)
    if paths["train"] is None:
        raise NegjaxError("no training data: pass --train (and --corpus) or set data.dataset")
    return paths["corpus"], paths["train"], paths["train_qrels"]


_LENGTHS = ("model.query_max_len", "model.doc_max_len")


def workdir_lengths(cfg, args) -> dict:
    """{key: value} of the query/document lengths a training workdir given as the model was
    trained with, for those the user did not set (a flag, --set, or --config's [model])."""
    import tomllib

    from negjax.config import parse_override
    from negjax.model.loader import saved_config

    saved = saved_config(cfg.model.name)
    if saved is None:
        return {}
    explicit = {".".join(parse_override(t)[0]) for t in args.overrides}
    explicit |= {key for key in flag_overrides(args) if key in _LENGTHS}
    if args.config:
        section = tomllib.loads(Path(args.config).read_text()).get("model", {})
        explicit |= {f"model.{k}" for k in section}
    return {key: getattr(saved.model, key.split(".")[1]) for key in _LENGTHS if key not in explicit}


def run(args) -> int:
    from negjax import distributed
    from negjax.config import load_config, updated

    cfg = updated(load_config(args.config, args.overrides), flag_overrides(args))
    cfg = updated(cfg, workdir_lengths(cfg, args))
    if args.source and not cfg.data.sources:
        raise NegjaxError(f"--source {args.source}: the config has no [[data.sources]]")
    if args.source and args.source not in [s.name for s in cfg.data.sources]:
        raise NegjaxError(f"--source {args.source}: not one of the config's sources "
                          f"({', '.join(s.name for s in cfg.data.sources)})")
    # Before anything touches a JAX device.
    pi, _ = distributed.initialize(cfg.distributed)
    by_source = bool(cfg.data.sources) and not args.train
    if not by_source:
        corpus, train, qrels = input_paths(cfg, args)

    from negjax.mining.job import run_mining
    from negjax.mining.report import summary_text
    from negjax.model.loader import load_model

    enc, params, model_info = load_model(None, cfg.model)
    if args.dim:
        enc = enc.truncated(args.dim)
        model_info = dict(model_info, dim=args.dim)
    def mine(enc, corpus, train, qrels, out):
        run_mining(enc, params, corpus_path=corpus, train_path=train, out_dir=out,
                   mining_cfg=cfg.mining, query_max_len=cfg.model.query_max_len,
                   doc_max_len=cfg.model.doc_max_len, model_info=model_info, train_qrels=qrels,
                   overwrite=args.overwrite, teacher_scores=cfg.mining.teacher_scores or None)
        if pi == 0:
            print(summary_text(out))

    if not by_source:
        mine(enc, corpus, train, qrels, args.out)
        return 0
    from negjax.data.layout import resolve_dataset
    from negjax.data.sources import sources_of

    for src in sources_of(cfg, enc.prompts):  # each source: its corpus, its prompts
        if args.source and src.name != args.source:
            continue
        paths = resolve_dataset(src.data)
        if paths["train"] is None or paths["corpus"] is None:
            raise NegjaxError(f"data source {src.name!r}: no training data or corpus to mine")
        if pi == 0:
            print(f"negjax mine: source {src.name}")
        mine(enc.with_prompts(src.prompts), paths["corpus"], paths["train"],
             paths["train_qrels"], Path(args.out) / src.name)
    return 0
