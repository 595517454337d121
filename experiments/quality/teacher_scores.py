"""A teacher's scores of each training query's positive and mined negatives, as a training JSONL
with FlagEmbedding's fields (`neg`, `pos_scores`, `neg_scores`), for `loss.distill`.

    python experiments/quality/teacher_scores.py --teacher WORKDIR_OR_MODEL_DIR \
        --negatives MINED_DIR --out teacher_train.jsonl [--max-negatives 7]

Every training query of the built-in WordNet data is written, with the first
`--max-negatives` documents of its mined list (the mined order) as `neg` and the teacher's
cosine of the query with each positive and negative as `pos_scores` / `neg_scores`
(the teacher's own normalised embeddings: bi-encoder scores, in [-1, 1]). Train on it with
`--set data.train=FILE --set data.num_negatives=H`, with or without `loss.distill`: the same
negatives either way, so the two runs differ only by the distillation term.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher model: training workdir or model dir")
    ap.add_argument("--negatives", required=True, help="mined shard directory (negjax mine --out)")
    ap.add_argument("--out", required=True, help="training JSONL to write")
    ap.add_argument("--max-negatives", type=int, default=7)
    ap.add_argument("--query-max-length", type=int, default=32)
    ap.add_argument("--doc-max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args(argv)

    from negjax.data import wordnet
    from negjax.data.shards import read_table
    from negjax.model.encode import encode_texts
    from negjax.model.loader import load_model

    root = Path(wordnet.ensure_exported())
    corpus = {}
    with open(root / "corpus.jsonl") as f:
        for line in f:
            d = json.loads(line)
            corpus[d["id"]] = d["text"]
    train = [json.loads(x) for x in open(root / "train.jsonl")]
    table = read_table(args.negatives)
    mined = dict(zip(table.column("query_id").to_pylist(), table.column("negative_ids").to_pylist()))
    for r in train:
        pos = set(r["pos"])
        r["neg"] = [d for d in (mined.get(r["id"]) or []) if d not in pos][:args.max_negatives]

    enc, params, _ = load_model(args.teacher)
    docs = sorted({d for r in train for d in r["pos"] + r["neg"]})
    row = {d: i for i, d in enumerate(docs)}
    d_emb = encode_texts(enc, params, [corpus[d] for d in docs], tower="doc",
                         max_length=args.doc_max_length, batch_size=args.batch_size,
                         desc="teacher: documents")
    q_emb = encode_texts(enc, params, [r["query"] for r in train], tower="query",
                         max_length=args.query_max_length, batch_size=args.batch_size,
                         desc="teacher: queries")
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for r, q in zip(train, q_emb):
            score = lambda ids: [round(float(d_emb[row[d]] @ q), 6) for d in ids]  # noqa: E731
            f.write(json.dumps({"id": r["id"], "query": r["query"], "pos": r["pos"], "neg": r["neg"],
                                "pos_scores": score(r["pos"]), "neg_scores": score(r["neg"])}) + "\n")
    os.replace(tmp, args.out)
    n_neg = np.array([len(r["neg"]) for r in train])
    print(json.dumps({"queries": len(train), "documents_scored": len(docs),
                      "negatives_per_query_mean": float(n_neg.mean()),
                      "queries_without_negatives": int((n_neg == 0).sum())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
