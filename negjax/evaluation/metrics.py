"""Retrieval metrics from rankings and qrels: Recall@k, MRR@10, nDCG@10.

Definitions (those of trec_eval / ranx, so results are comparable with published numbers):
- Recall@k: |relevant ∩ top-k| / |relevant|, relevant = qrels score > 0.
- MRR@10: 1 / rank of the first relevant document within the top 10, else 0.
- nDCG@10: sum_{r<=10} rel_r / log2(r + 1), divided by the same sum over the ideal ordering of
  the judged documents (linear gain, graded relevance).
Every metric is averaged over the queries that have at least one relevant document.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

METRICS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def query_metrics(ranked: Sequence[str], rels: Mapping[str, float]) -> dict[str, float]:
    """Metrics of one query. `ranked`: document ids, best first; `rels`: id -> relevance."""
    relevant = {d for d, r in rels.items() if r > 0}
    out = {}
    for k in (1, 10, 100):
        hits = sum(1 for d in ranked[:k] if d in relevant)
        out[f"recall@{k}"] = hits / len(relevant)
    rr = 0.0
    for rank, d in enumerate(ranked[:10], start=1):
        if d in relevant:
            rr = 1.0 / rank
            break
    out["mrr@10"] = rr
    dcg = sum(rels.get(d, 0.0) / math.log2(rank + 1) for rank, d in enumerate(ranked[:10], start=1)
              if rels.get(d, 0.0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:10]
    idcg = sum(r / math.log2(rank + 1) for rank, r in enumerate(ideal, start=1))
    out["ndcg@10"] = dcg / idcg if idcg > 0 else 0.0
    return out


def evaluate_rankings(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]]
                      ) -> dict[str, float]:
    """Mean metrics over the queries of `qrels` with a relevant document.

    `run`: query id -> ranked document ids (a query missing from `run` scores 0);
    `qrels`: query id -> {document id: relevance}.
    """
    totals = {m: 0.0 for m in METRICS}
    n = 0
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        per = query_metrics(list(run.get(qid, ())), rels)
        for m in METRICS:
            totals[m] += per[m]
        n += 1
    if n == 0:
        return {m: 0.0 for m in METRICS} | {"queries": 0}
    return {m: totals[m] / n for m in METRICS} | {"queries": n}
