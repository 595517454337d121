"""Check a data set up front: `negjax data validate --corpus C --train T [--qrels Q]`, or
every dataset of a training config (`--config`: its one dataset or each `[[data.sources]]`).

Reading is the check: every reader in `negjax.data.formats` raises `NegjaxError` naming the
file and line of the first malformed record. What comes back is a summary worth looking at
before a long run (how many queries lack given negatives, duplicate query texts, documents
no query points at, ...).
"""

from __future__ import annotations

import numpy as np

from negjax.data import formats


def _summary(values) -> dict:
    arr = np.asarray(list(values), dtype=np.int64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "min": int(arr.min()), "mean": round(float(arr.mean()), 2),
            "p50": int(np.percentile(arr, 50)), "p99": int(np.percentile(arr, 99)),
            "max": int(arr.max())}


def validate_dataset(corpus, train, qrels=None) -> dict:
    """Read and check a corpus (JSONL path or None for inline-text training data), a training
    file (pairs / FlagEmbedding / Tevatron JSONL, or BEIR queries.jsonl when `qrels` are its
    training judgements) and optional qrels. Returns statistics (JSON-able dict).

    qrels: with BEIR queries as `train` they define the training positives; with any other
    training format they are evaluation judgements, checked against the corpus.
    """
    stats: dict = {}
    corp = formats.read_corpus(corpus) if corpus else None
    fmt = formats.detect_train_format(train)
    train_qrels = qrels if fmt == "queries" else None
    corp, ex = formats.read_training(train, corp, qrels=train_qrels)

    stats["corpus"] = {
        "path": str(corpus) if corpus else f"(built from {train})",
        "documents": len(corp),
        "with_title": sum(bool(t) for t in corp.titles),
        "words": _summary(len(t.split()) for t in corp.texts),
        "duplicate_texts": len(corp) - len({formats.normalize_text(t) for t in corp.texts}),
    }
    npos = [len(p) for p in ex.positives]
    nneg = [len(n) for n in ex.negatives]
    referenced = {r for p in ex.positives for r in p}
    stats["train"] = {
        "path": str(train), "format": ex.format, "queries": len(ex),
        "query_words": _summary(len(q.split()) for q in ex.queries),
        "positives_per_query": _summary(npos),
        "negatives_per_query": _summary(nneg),
        "queries_without_negatives": sum(n == 0 for n in nneg),
        "queries_with_several_positives": sum(n > 1 for n in npos),
        "duplicate_query_texts": len(ex) - len({formats.normalize_text(q) for q in ex.queries}),
        "documents_used_as_positive": len(referenced),
        "documents_never_positive": len(corp) - len(referenced),
    }
    if train_qrels is not None:
        stats["train"]["qrels"] = str(qrels)
    elif qrels:
        judged = formats.read_qrels(qrels, corpus=corp)
        scores = [s for d in judged.values() for s in d.values()]
        stats["qrels"] = {"path": str(qrels), "queries": len(judged),
                          "judgements": len(scores),
                          "relevant": sum(s > 0 for s in scores),
                          "judgements_per_query": _summary(len(d) for d in judged.values())}
        overlap = set(judged) & set(ex.query_ids)
        if overlap:
            stats["qrels"]["queries_also_in_train"] = len(overlap)
    stats["ok"] = True
    return stats


def format_report(stats: dict) -> str:
    """A short human-readable version of `validate_dataset`'s result."""
    c, t = stats["corpus"], stats["train"]
    lines = [f"corpus  {c['path']}: {c['documents']:,} documents ({c['with_title']:,} with title, "
             f"{c['duplicate_texts']:,} duplicate texts), {c['words'].get('mean', 0)} words on average",
             f"train   {t['path']} [{t['format']}]: {t['queries']:,} queries, positives/query "
             f"{t['positives_per_query'].get('mean', 0)}, given negatives/query "
             f"{t['negatives_per_query'].get('mean', 0)} ({t['queries_without_negatives']:,} "
             f"without), {t['duplicate_query_texts']:,} duplicate query texts"]
    if "qrels" in stats:
        q = stats["qrels"]
        lines.append(f"qrels   {q['path']}: {q['judgements']:,} judgements of {q['queries']:,} "
                     f"queries ({q['relevant']:,} relevant)")
    return "\n".join(lines)


def validate_config(path) -> dict:
    """`validate_dataset` of each dataset a training config reads: {source name: stats}
    ('default' for a config without `[[data.sources]]`), each with the training qrels, else
    the dev qrels. A malformed file stops it with an error naming the source, file and line."""
    from negjax.config import load_config
    from negjax.data.layout import resolve_dataset
    from negjax.data.sources import sources_of
    from negjax.errors import NegjaxError

    cfg = load_config(path)
    out = {}
    for src in sources_of(cfg):
        paths = resolve_dataset(src.data)
        if paths.get("train") is None:
            raise NegjaxError(f"{path}: source {src.name!r} has no training file")
        try:
            out[src.name] = validate_dataset(paths.get("corpus"), paths["train"],
                                             paths.get("train_qrels") or paths.get("dev_qrels"))
        except NegjaxError as e:
            raise NegjaxError(f"source {src.name!r}: {e}") from None
    return out
