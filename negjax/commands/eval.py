"""`negjax eval --model CHECKPOINT_OR_HF_DIR --corpus C --queries Q --qrels R [--json]`."""

from __future__ import annotations

from negjax.errors import NegjaxError


def add_parser(sub):
    from negjax.cli import add_renamed_flag

    p = sub.add_parser("eval", help="retrieval metrics (Recall@1/10/100, MRR@10, nDCG@10) of a model")
    p.add_argument("--model", required=True,
                   help="training workdir / checkpoint dir, a Hugging Face dir, 'minilm' or 'tiny'")
    p.add_argument("--corpus", help="corpus JSONL (default: the built-in WordNet corpus)")
    p.add_argument("--queries", help="queries JSONL (default: WordNet test queries)")
    p.add_argument("--qrels", help="qrels TSV (default: WordNet test qrels)")
    p.add_argument("--split", choices=("dev", "test"), default="test",
                   help="built-in WordNet split when --queries/--qrels are not given")
    p.add_argument("--index", choices=("exact", "scann"), default="exact")
    p.add_argument("--encode-batch-size", type=int, default=256,
                   help="texts per encoding batch (all local devices)")
    add_renamed_flag(p, "--batch-size", "--encode-batch-size", type=int)
    p.add_argument("--query-max-length", type=int,
                   help="query max tokens (default: a training workdir's model.query_max_len, else 32)")
    p.add_argument("--doc-max-length", type=int,
                   help="document max tokens (default: a training workdir's model.doc_max_len, else 128)")
    p.add_argument("--max-queries", type=int, default=0, help="evaluate at most N queries (0 = all)")
    p.add_argument("--save-run", help="write the rankings as a TREC run file (qid Q0 doc rank score tag)")
    p.add_argument("--dim", type=int, default=0, metavar="K", help="keep the first K embedding dimensions (re-normalised when the model normalises): a Matryoshka-trained model at a smaller size (default: all)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def run(args) -> int:
    import json
    from pathlib import Path

    from negjax.evaluation.evaluate import TOP_K, EvalSet, rankings
    from negjax.evaluation.metrics import evaluate_rankings
    from negjax.model.encode import encode_texts
    from negjax.model.loader import load_model, saved_config

    if bool(args.queries) != bool(args.qrels):
        raise NegjaxError("--queries and --qrels go together")
    if args.corpus is None or args.queries is None:
        from negjax.data import wordnet

        root = Path(wordnet.ensure_exported())
        corpus = args.corpus or root / "corpus.jsonl"
        queries = args.queries or root / f"{args.split}_queries.jsonl"
        qrels = args.qrels or root / f"{args.split}_qrels.tsv"
    else:
        corpus, queries, qrels = args.corpus, args.queries, args.qrels
    for path in (corpus, queries, qrels):
        if not Path(path).is_file():
            raise NegjaxError(f"{path}: file not found")
    if args.encode_batch_size < 1 or args.max_queries < 0:
        raise NegjaxError("--encode-batch-size must be >= 1 and --max-queries >= 0")
    data = EvalSet.from_files(corpus, queries, qrels, max_queries=args.max_queries)
    enc, params, info = load_model(args.model)
    if args.dim:
        enc = enc.truncated(args.dim)
        info = dict(info, dim=args.dim)
    saved = saved_config(args.model)  # a training workdir: the lengths it trained with
    qlen, dlen = args.query_max_length, args.doc_max_length
    if qlen is None:
        qlen = saved.model.query_max_len if saved else 32
    if dlen is None:
        dlen = saved.model.doc_max_len if saved else 128
    corpus_emb = encode_texts(enc, params, data.corpus_texts, tower="doc", max_length=dlen,
                              batch_size=args.encode_batch_size, desc="encode corpus")
    query_emb = encode_texts(enc, params, data.query_texts, tower="query", max_length=qlen,
                             batch_size=args.encode_batch_size, desc="encode queries")
    ids, scores = rankings(query_emb, corpus_emb, index=args.index, k=min(TOP_K, len(data.corpus_ids)))
    run_map = {q: [data.corpus_ids[j] for j in row if j >= 0] for q, row in zip(data.query_ids, ids)}
    metrics = evaluate_rankings(run_map, data.qrels)
    if args.save_run:
        from negjax.utils import atomic_path

        with atomic_path(args.save_run) as tmp, open(tmp, "w") as f:
            for q, row, srow in zip(data.query_ids, ids, scores):
                for rank, (j, s) in enumerate(zip(row, srow), start=1):
                    if j >= 0:
                        f.write(f"{q} Q0 {data.corpus_ids[j]} {rank} {float(s):.6f} negjax\n")
    if args.json:
        print(json.dumps({"model": info, **metrics}))
    else:
        print(f"model: {info['path']}" + (f" (step {info['step']})" if info.get("step") is not None else ""))
        print(f"queries: {metrics['queries']}")
        for k in ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
            print(f"  {k:<11} {metrics[k]:.4f}")
    return 0
