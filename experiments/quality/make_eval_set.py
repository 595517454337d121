"""Build the fixed, reduced WordNet evaluation set used by every row of experiments/quality.

Full-corpus evaluation (117,659 documents) costs ~15 min of MiniLM encoding per model on 2 CPU
cores, too slow for a table of fine-tuned models. The reduced set keeps what makes the task
hard: every test positive, plus every document sharing a lemma with a test positive (the other
senses of the same words: the natural hard negatives), plus a fixed random sample of other
documents up to --corpus-size. Queries: a fixed random sample of the test split.

    python experiments/quality/make_eval_set.py --out /tmp/exp/evalset \
        [--queries 1000] [--corpus-size 10000] [--seed 0]

Writes OUT/corpus.jsonl, OUT/queries.jsonl, OUT/qrels.tsv and OUT/stats.json
(deterministic for a given seed and built-in WordNet export).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def lemmas(text: str) -> list[str]:
    """'abaxial, dorsal (adjective): ...' -> ['abaxial', 'dorsal']."""
    head = text.split(" (", 1)[0]
    return [w.strip().lower() for w in head.split(",") if w.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--queries", type=int, default=1000, help="test queries sampled (0 = all)")
    p.add_argument("--corpus-size", type=int, default=10000,
                   help="total documents; random fill after positives + same-lemma documents")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from negjax.data import wordnet

    root = Path(wordnet.ensure_exported())
    corpus = [json.loads(line) for line in open(root / "corpus.jsonl")]
    queries = [json.loads(line) for line in open(root / "test_queries.jsonl")]
    qrels: dict[str, list[str]] = {}
    with open(root / "test_qrels.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            if float(s) > 0:
                qrels.setdefault(q, []).append(d)
    queries = [q for q in queries if q["id"] in qrels]
    rng = np.random.default_rng(args.seed)
    if args.queries and args.queries < len(queries):
        pick = np.sort(rng.choice(len(queries), args.queries, replace=False))
        queries = [queries[i] for i in pick]

    by_id = {d["id"]: i for i, d in enumerate(corpus)}
    positives = {by_id[d] for q in queries for d in qrels[q["id"]]}
    pos_lemmas = {w for i in positives for w in lemmas(corpus[i]["text"])}
    same_lemma = {i for i, d in enumerate(corpus) if i not in positives
                  and any(w in pos_lemmas for w in lemmas(d["text"]))}
    keep = positives | same_lemma
    rest = np.array([i for i in range(len(corpus)) if i not in keep])
    fill = max(0, args.corpus_size - len(keep))
    extra = set(rng.choice(rest, min(fill, len(rest)), replace=False).tolist()) if fill else set()
    keep = sorted(keep | extra)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for i in keep:
            f.write(json.dumps(corpus[i]) + "\n")
    with open(out / "queries.jsonl", "w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    with open(out / "qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            for d in qrels[q["id"]]:
                f.write(f"{q['id']}\t{d}\t1\n")
    stats = {"seed": args.seed, "queries": len(queries), "corpus": len(keep),
             "positives": len(positives), "same_lemma": len(same_lemma), "random_fill": len(extra),
             "source": str(root)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
