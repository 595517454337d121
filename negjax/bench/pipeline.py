"""`negjax bench pipeline`: batches/s the training input pipeline delivers.

    negjax bench pipeline                       # WordNet, batch 64, query 32 / doc 128, H = 1
    negjax bench pipeline --batches 5000 --prefetch 8 --threads 2 --json out.json

Setup (timed separately, not part of batches/s): the dataset is read, the corpus and queries
are tokenised into token stores (cached: a second run reuses them), and a hard-negative shard
directory is written and verified. Its negatives are realistic WordNet ones: the other senses
of the positive's first lemma, ranked in corpus order, so queries of rare words have fewer than
H and exercise the random fallback.

Measured: `next(pipe)` over --batches batches after --warmup, i.e. what a training loop sees:
the sampler (global-batch dedup included), token padding to buckets, grain's prefetch. Also
the synchronous cost of one batch (`pipe.batch(k)`, no prefetch threads). The train step's
rate is measured elsewhere (`negjax bench step`); the ratio of the two is the headroom.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--data", default="wordnet", help="'wordnet' or a dataset directory "
                   "(corpus.jsonl + train.jsonl)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir; default: packaged all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--num-negatives", type=int, default=1)
    p.add_argument("--strategy", default="top", choices=("top", "random"))
    p.add_argument("--batches", type=int, default=2000, help="timed batches")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--process-count", type=int, default=1,
                   help="build the slice of process 0 of this many (cost per process)")
    p.add_argument("--cache-dir", default="", help="token store cache (default $NEGJAX_CACHE)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")


def _headword_negatives(corpus, examples, per_query: int = 32) -> list[list[str]]:
    """Other documents whose text starts with the same first lemma as the query's positive
    (WordNet: the other senses of the word), else an empty list."""
    by_head: dict[str, list[int]] = {}
    heads = []
    for i, t in enumerate(corpus.texts):
        head = t.split(",")[0].split(" (")[0].strip().lower()
        heads.append(head)
        by_head.setdefault(head, []).append(i)
    out = []
    for pos in examples.positives:
        own = set(pos)
        cands = [r for r in by_head[heads[pos[0]]] if r not in own][:per_query]
        out.append([corpus.ids[r] for r in cands])
    return out


def run(args) -> int:
    from negjax.data.formats import read_training
    from negjax.data.pipeline import Pipeline
    from negjax.data.shards import ShardWriter, load_negatives
    from negjax.data.token_store import build_token_store
    from negjax.utils import default_cache_dir
    from negjax.errors import NegjaxError

    res: dict = {"batch_size": args.batch_size, "query_len": args.query_len,
                 "doc_len": args.doc_len, "num_negatives": args.num_negatives,
                 "prefetch": args.prefetch, "threads": args.threads,
                 "process_count": args.process_count, "data": args.data}
    t0 = time.perf_counter()
    if args.data == "wordnet":
        from negjax.data import wordnet

        root = Path(wordnet.ensure_exported(args.cache_dir or None))
    else:
        root = Path(args.data)
        if not root.is_dir():
            raise NegjaxError(f"--data {args.data!r}: not 'wordnet' nor a directory")
    corpus, examples = read_training(root / "train.jsonl", root / "corpus.jsonl")
    res["read_s"] = round(time.perf_counter() - t0, 2)
    res["documents"], res["queries"] = len(corpus), len(examples)

    if args.tokenizer:
        tok = args.tokenizer
    else:
        from negjax.model import minilm_dir

        tok = minilm_dir()
    cache = default_cache_dir(args.cache_dir or None)
    t0 = time.perf_counter()
    docs = build_token_store(corpus.texts, corpus.ids, tok, max_len=args.doc_len, cache_dir=cache, name="docs")
    queries = build_token_store(examples.queries, examples.query_ids, tok, max_len=args.query_len,
                                cache_dir=cache, name="queries")
    res["token_stores_s"] = round(time.perf_counter() - t0, 2)
    res["doc_tokens_mean"] = round(float(np.mean(docs.lengths)), 1)

    with tempfile.TemporaryDirectory(prefix="negjax-bench-shards-") as tmp:
        t0 = time.perf_counter()
        negs = _headword_negatives(corpus, examples)
        w = ShardWriter(tmp)
        step = 8192
        for k, s in enumerate(range(0, len(examples), step)):
            part = slice(s, s + step)
            w.write(k, query_ids=examples.query_ids[part],
                    positive_ids=[[corpus.ids[r] for r in p] for p in examples.positives[part]],
                    negative_ids=negs[part], negative_scores=[[0.0] * len(n) for n in negs[part]])
        w.finalize(model={"path": "bench: WordNet other senses", "step": None})
        res["shards_write_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        negatives = load_negatives(tmp, examples, corpus)
        res["shards_load_s"] = round(time.perf_counter() - t0, 2)

    pipe = Pipeline(examples=examples, query_store=queries, doc_store=docs,
                    batch_size=args.batch_size, num_negatives=args.num_negatives,
                    negatives=negatives, strategy=args.strategy, seed=0,
                    process_index=0, process_count=args.process_count,
                    prefetch=args.prefetch, threads=args.threads)
    res["info"] = pipe.info

    # Synchronous cost of one batch (no threads).
    for k in range(args.warmup):
        pipe.batch(k)
    t0 = time.perf_counter()
    n_sync = max(args.batches // 4, 1)
    for k in range(n_sync):
        pipe.batch(args.warmup + k)
    res["sync_ms_per_batch"] = round(1000 * (time.perf_counter() - t0) / n_sync, 3)

    for _ in range(args.warmup):
        next(pipe)
    t0 = time.perf_counter()
    shapes = {}
    for _ in range(args.batches):
        b = next(pipe)
        key = (b["q_tokens"].shape[1], b["d_tokens"].shape[1])
        shapes[key] = shapes.get(key, 0) + 1
    dt = time.perf_counter() - t0
    pipe.close()
    res["batches_per_s"] = round(args.batches / dt, 1)
    res["examples_per_s"] = round(args.batches * args.batch_size / dt, 1)
    res["bucket_shapes"] = {f"{q}x{d}": n for (q, d), n in sorted(shapes.items())}
    stats = pipe.stats
    res["random_negative_fraction"] = round(stats["random_negatives"] / max(stats["negatives"], 1), 4)
    res["replaced_duplicates_per_batch"] = round(stats["replaced_duplicates"] / max(stats["batches"], 1), 3)

    print(f"pipeline: {res['batches_per_s']:,} batches/s ({res['examples_per_s']:,} queries/s) at "
          f"batch {args.batch_size}, query {args.query_len} / doc {args.doc_len} tokens, "
          f"H={args.num_negatives}, prefetch {args.prefetch} x {args.threads} thread(s)")
    print(f"  one batch synchronously: {res['sync_ms_per_batch']} ms; data {res['documents']:,} docs, "
          f"{res['queries']:,} queries; setup: read {res['read_s']} s, token stores "
          f"{res['token_stores_s']} s, shards write {res['shards_write_s']} s / load {res['shards_load_s']} s")
    print(f"  random negatives {100 * res['random_negative_fraction']:.1f}% of slots, "
          f"{res['replaced_duplicates_per_batch']} replaced duplicates per batch, "
          f"bucket shapes {res['bucket_shapes']}")
    if args.json:
        from negjax.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=1, default=str) + "\n")
    return 0
