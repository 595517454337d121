"""`negjax mine`: mine hard negatives for training queries (encode, ScaNN, filters, shards).

    negjax mine --model minilm --out negatives/                 # built-in WordNet data
    negjax mine --model DIR --corpus corpus.jsonl --train train.jsonl --out negatives/ \\
        --relative-margin 0.05 --num-negatives 32 --sampling random --seed 1
    negjax mine --model runs/round1 --out negatives/   # a training workdir: latest checkpoint

Settings come from the [mining] section of --config (and --set mining.key=value); the flags
below override it. A rerun with the same settings resumes an interrupted run. Several
processes: start one per host with --coordinator HOST:PORT --num-processes N --process-id I
(or NEGJAX_COORDINATOR / NEGJAX_NUM_PROCESSES / NEGJAX_PROCESS_ID) on a shared filesystem.
"""

from __future__ import annotations

from negjax.errors import NegjaxError

# flag attribute -> mining config field
_MINING_FLAGS = {"index": "index", "k": "k", "num_negatives": "num_negatives",
                 "sampling": "sampling", "seed": "seed", "rank_range": "rank_range",
                 "relative_margin": "relative_margin", "absolute_margin": "absolute_margin",
                 "max_score": "max_score", "min_score": "min_score",
                 "audit_queries": "audit_queries", "batch_size": "batch_size",
                 "num_leaves": "num_leaves", "leaves_to_search": "leaves_to_search",
                 "reorder": "reorder", "target_recall": "target_recall", "shard_size": "shard_size", "encode_chunk": "encode_chunk"}


def add_parser(sub):
    from negjax.cli import add_config_args

    p = sub.add_parser("mine", help="mine hard negatives: encode, ScaNN top-k, false-negative "
                       "filters, Parquet shards + manifest + report")
    p.add_argument("--model", help="'minilm', 'tiny', a Hugging Face / sentence-transformers "
                   "directory or a negjax training workdir / checkpoint (default: model.name "
                   "from the config)")
    p.add_argument("--corpus", help="corpus JSONL (default: the config's dataset, built-in WordNet)")
    p.add_argument("--train", help="training JSONL (default: the config's dataset)")
    p.add_argument("--train-qrels", help="qrels TSV when --train is a BEIR queries.jsonl")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json, "
                   "report.json, report.png; .work/ holds resumable intermediate state)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished shard set mined with other settings")
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
    g.add_argument("--num-negatives", type=int, help="negatives kept per query")
    g.add_argument("--sampling", choices=("top", "random"))
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("encoding and output")
    g.add_argument("--batch-size", type=int, help="encoding batch (all local devices)")
    g.add_argument("--max-length", type=int, help="document max tokens (default model.doc_max_len)")
    g.add_argument("--query-max-length", type=int, help="query max tokens (default model.query_max_len)")
    g.add_argument("--shard-size", type=int, help="queries per shard")
    g.add_argument("--encode-chunk", type=int, help="texts per saved embedding chunk")
    g = p.add_argument_group("multi-process")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    add_config_args(p)
    return p


def apply_flags(cfg, args):
    """Flags given on the command line override the loaded config (then re-validated)."""
    from negjax.config import parse_rank_range, validate

    if args.rank_range:
        parse_rank_range(args.rank_range, key="--rank-range")
    for attr, key in _MINING_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            setattr(cfg.mining, key, value)
    if args.no_dedup_text:
        cfg.mining.dedup_text = False
    if args.model:
        cfg.model.name = args.model
    if args.max_length is not None:
        cfg.model.doc_max_len = args.max_length
    if args.query_max_length is not None:
        cfg.model.query_max_len = args.query_max_length
    if args.coordinator:
        cfg.distributed.coordinator_address = args.coordinator
    if args.num_processes is not None:
        cfg.distributed.num_processes = args.num_processes
    if args.process_id is not None:
        cfg.distributed.process_id = args.process_id
    return validate(cfg)


def input_paths(cfg, args) -> tuple:
    """(corpus or None, train, train_qrels or None): the flags, else the config's dataset."""
    if args.corpus and not args.train:
        raise NegjaxError("--corpus needs --train (the training queries to mine for)")
    if args.train:
        return args.corpus, args.train, args.train_qrels
    from negjax.data.pipeline import resolve_dataset

    paths = resolve_dataset(cfg.data)
    if paths["train"] is None:
        raise NegjaxError("no training data: pass --train (and --corpus) or set data.dataset")
    return paths["corpus"], paths["train"], paths["train_qrels"]


def run(args) -> int:
    from negjax import distributed
    from negjax.config import load_config

    cfg = apply_flags(load_config(args.config, args.overrides), args)
    # Before anything touches a JAX device.
    pi, _ = distributed.initialize(cfg.distributed)
    corpus, train, qrels = input_paths(cfg, args)

    from negjax.mining.job import resolve_model, run_mining
    from negjax.mining.report import summary_text

    enc, params, model_info = resolve_model(cfg.model.name, cfg.model)
    run_mining(enc, params, corpus_path=corpus, train_path=train, out_dir=args.out,
               mining_cfg=cfg.mining, query_max_len=cfg.model.query_max_len,
               doc_max_len=cfg.model.doc_max_len, model_info=model_info, train_qrels=qrels,
               overwrite=args.overwrite)
    if pi == 0:
        print(summary_text(args.out))
    return 0
