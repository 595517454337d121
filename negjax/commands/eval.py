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
    p.add_argument("--dim", default="0", metavar="K[,K...]",
                   help="keep the first K embedding dimensions (re-normalised when the model "
                        "normalises): a Matryoshka-trained model at a smaller size (default: all). "
                        "Several sizes (e.g. 384,256,128,64) encode once and report each size: "
                        "one JSON line per size with --json, and --save-run RUN writes RUN.dK "
                        "per size")
    p.add_argument("--source", metavar="NAME", help="a training workdir with [[data.sources]]: "
                   "evaluate as that source (its query / document prompts; its --split "
                   "queries, qrels and corpus unless given)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def run(args) -> int:
    from pathlib import Path

    from negjax.evaluation.evaluate import EvalSet
    from negjax.model.encode import encode_store, encode_texts
    from negjax.model.loader import load_model, saved_config

    if bool(args.queries) != bool(args.qrels):
        raise NegjaxError("--queries and --qrels go together")
    source = _source(args) if args.source else None
    if source is not None and (args.corpus is None or args.queries is None):
        from negjax.data.layout import resolve_dataset

        paths = resolve_dataset(source.data)
        corpus = args.corpus or paths["corpus"]
        queries = args.queries or paths[f"{args.split}_queries"]
        qrels = args.qrels or paths[f"{args.split}_qrels"]
        if corpus is None or queries is None or qrels is None:
            raise NegjaxError(f"data source {source.name!r} has no {args.split} split: pass "
                              "--corpus, --queries and --qrels")
    elif args.corpus is None or args.queries is None:
        from negjax.data import wordnet

        root = Path(wordnet.ensure_exported())
        corpus = args.corpus or root / "corpus.jsonl"
        queries = args.queries or root / f"{args.split}_queries.jsonl"
        qrels = args.qrels or root / f"{args.split}_qrels.tsv"
    else:
        corpus, queries, qrels = args.corpus, args.queries, args.qrels
    for path in (corpus, queries, qrels):
        if not Path(path).exists():
            raise NegjaxError(f"{path}: file not found")
    if args.encode_batch_size < 1 or args.max_queries < 0:
        raise NegjaxError("--encode-batch-size must be >= 1 and --max-queries >= 0")
    dims = _parse_dims(args.dim)
    enc, params, info = load_model(args.model)
    if source is not None:
        enc = enc.with_prompts({t: source.prompts[t] or enc.prompts.get(t, "") for t in source.prompts})
        info = dict(info, source=source.name)
    for k in filter(None, dims):
        enc.truncated(k)  # checks each size against the model before any encoding
    if len(dims) == 1 and dims[0]:
        enc = enc.truncated(dims[0])
        info = dict(info, dim=dims[0])
    saved = saved_config(args.model)  # a training workdir: the lengths it trained with
    qlen, dlen = args.query_max_length, args.doc_max_length
    if qlen is None:
        qlen = saved.model.query_max_len if saved else 32
    if dlen is None:
        dlen = saved.model.doc_max_len if saved else 128
    data = EvalSet.from_files(corpus, queries, qrels, max_queries=args.max_queries, encoder=enc,
                              doc_max_len=dlen)
    corpus_emb = encode_store(enc, params, data.corpus_store, tower="doc",
                              batch_size=args.encode_batch_size, desc="encode corpus")
    query_emb = encode_texts(enc, params, data.query_texts, tower="query", max_length=qlen,
                             batch_size=args.encode_batch_size, desc="encode queries")
    if len(dims) == 1:
        _report(args, data, info, query_emb, corpus_emb, args.save_run)
        return 0
    import numpy as np

    for k in dims:  # several sizes: truncate the full-size embeddings (as Encoder.truncated)
        q, c = query_emb[:, :k], corpus_emb[:, :k]
        if enc.normalize:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
            c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        _report(args, data, dict(info, dim=k), q, c,
                f"{args.save_run}.d{k}" if args.save_run else None)
    return 0


def _source(args):
    """The `negjax.data.sources.Source` named --source in the training workdir --model."""
    from negjax.data.sources import sources_of
    from negjax.model.loader import saved_config

    saved = saved_config(args.model)
    if saved is None or not saved.data.sources:
        raise NegjaxError(f"--source {args.source}: --model {args.model} is not a training "
                          "workdir with [[data.sources]]")
    found = [s for s in sources_of(saved, {"query": "", "doc": ""}) if s.name == args.source]
    if not found:
        raise NegjaxError(f"--source {args.source}: not one of the run's sources "
                          f"({', '.join(s.name for s in saved.data.sources)})")
    return found[0]


def _parse_dims(text: str) -> list[int]:
    try:
        dims = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise NegjaxError(f"--dim {text!r}: expected K or a comma-separated list of sizes") from None
    if not dims or any(k < 0 for k in dims) or (len(dims) > 1 and 0 in dims):
        raise NegjaxError(f"--dim {text!r}: sizes must be positive")
    if len(set(dims)) != len(dims):
        raise NegjaxError(f"--dim {text!r}: a size is repeated")
    return dims


def _report(args, data, info, query_emb, corpus_emb, save_run) -> None:
    import json

    from negjax.evaluation.evaluate import TOP_K, rankings
    from negjax.evaluation.metrics import evaluate_rankings

    ids, scores = rankings(query_emb, corpus_emb, index=args.index, k=min(TOP_K, len(data.corpus_ids)))
    run_map = {q: [data.corpus_ids[j] for j in row if j >= 0] for q, row in zip(data.query_ids, ids)}
    metrics = evaluate_rankings(run_map, data.qrels)
    if save_run:
        from negjax.utils import atomic_path

        with atomic_path(save_run) as tmp, open(tmp, "w") as f:
            for q, row, srow in zip(data.query_ids, ids, scores):
                for rank, (j, s) in enumerate(zip(row, srow), start=1):
                    if j >= 0:
                        f.write(f"{q} Q0 {data.corpus_ids[j]} {rank} {float(s):.6f} negjax\n")
    if args.json:
        print(json.dumps({"model": info, **metrics}), flush=True)
    else:
        print(f"model: {info['path']}" + (f" (step {info['step']})" if info.get("step") is not None else "")
              + (f", {info['dim']} dimensions" if info.get("dim") else ""))
        print(f"queries: {metrics['queries']}")
        for k in ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
            print(f"  {k:<11} {metrics[k]:.4f}")
