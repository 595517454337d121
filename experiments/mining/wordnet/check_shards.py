"""Acceptance checks of a finished `negjax mine` directory against its inputs and the
embeddings the job saved under OUT/.work: manifest + checksums verify, no negative is a positive
(by id or normalised text), stored scores equal recomputed q.d, every negative respects the
relative margin, and the training pipeline loads the shards.

    python experiments/mining/wordnet/check_shards.py OUT corpus.jsonl train.jsonl [MARGIN]
"""
import json, sys
from pathlib import Path
import numpy as np
from negjax.data import shards
from negjax.data.formats import read_training, normalize_text

out = Path(sys.argv[1]); corpus_path, train_path = sys.argv[2], sys.argv[3]
rel = float(sys.argv[4]) if len(sys.argv) > 4 else -1
m = shards.verify(out)
print("verify ok:", len(m["shards"]), "shards", m["counts"]["queries"], "queries", m["counts"]["negatives"], "negatives")
corpus, ex = read_training(train_path, corpus_path)
run = json.loads((out / ".work/run.json").read_text())
doc = np.concatenate([np.load(p) for p in sorted((out / ".work/emb" / f"doc-{run['doc_key'][:16]}").glob("chunk-*.npy"))])
qe = np.concatenate([np.load(p) for p in sorted((out / ".work/emb" / f"query-{run['query_key'][:16]}").glob("chunk-*.npy"))])
rows = shards.read_table(out).to_pylist()
assert [r["query_id"] for r in rows] == ex.query_ids
norm = [normalize_text(t) for t in corpus.texts]
bad_id = bad_text = bad_margin = 0; max_err = 0.0; n = 0; min_gap = np.inf
for i, r in enumerate(rows):
    pos = ex.positives[i]; neg = [corpus.row(d) for d in r["negative_ids"]]
    bad_id += len(set(pos) & set(neg))
    pt = {norm[p] for p in pos}; bad_text += sum(norm[d] in pt for d in neg)
    exact_pos = max(float(qe[i] @ doc[p]) for p in pos)
    s = np.asarray(r["negative_scores"], np.float64)
    if len(neg):
        ex_s = doc[neg] @ qe[i]
        max_err = max(max_err, float(np.abs(ex_s - s).max()), abs(exact_pos - r["positive_score"]))
        if rel >= 0:
            bad_margin += int((s > r["positive_score"] * (1 - rel)).sum())
            min_gap = min(min_gap, float((exact_pos * (1 - rel) - ex_s).min()))
    n += len(neg)
print(f"negatives checked {n}: equal to a positive by id {bad_id}, by normalised text {bad_text}, "
      f"above pos*(1-{rel}) {bad_margin}; max |stored - recomputed score| {max_err:.2e}; "
      f"min (pos*(1-M) - neg) with recomputed scores {min_gap:.2e}")
neg = shards.load_negatives(out, ex, corpus)
print("load_negatives:", neg.queries_found, "queries found,", int(neg.counts().sum()), "rows")
