"""Paired comparison of two runs on the same queries: the mean per-query difference of each
metric with a bootstrap 95% interval (queries resampled with replacement).

    python experiments/quality/paired.py QRELS RUN_A RUN_B [--samples 10000] [--seed 0]

RUN_A / RUN_B: TREC run files (`negjax eval --save-run FILE`, or the peer script's
`--save-run`). QRELS: the eval set's qrels TSV. Prints, per metric, mean(B) - mean(A), its
interval and the share of bootstrap samples where B > A. With 1,000 queries the paired
interval is much tighter than the unpaired binomial error of each mean, because both runs
are scored on the same queries.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from negjax.data.formats import read_qrels
from negjax.evaluation.metrics import METRICS, query_metrics


def read_run(path: Path) -> dict[str, list[str]]:
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 6:
                raise SystemExit(f"{path}:{lineno}: expected 'qid Q0 doc rank score tag'")
            ranked[parts[0]].append((int(parts[3]), parts[2]))
    return {q: [d for _, d in sorted(v)] for q, v in ranked.items()}


def per_query(run, qrels) -> dict[str, np.ndarray]:
    qids = [q for q, rels in sorted(qrels.items()) if any(r > 0 for r in rels.values())]
    rows = [query_metrics(run.get(q, []), qrels[q]) for q in qids]
    return {m: np.array([r[m] for r in rows]) for m in METRICS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("qrels", type=Path)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    qrels = read_qrels(args.qrels)
    a, b = per_query(read_run(args.run_a), qrels), per_query(read_run(args.run_b), qrels)
    n = len(a["mrr@10"])
    idx = np.random.default_rng(args.seed).integers(0, n, (args.samples, n))
    out = {"queries": n, "a": str(args.run_a), "b": str(args.run_b)}
    for m in METRICS:
        diff = b[m] - a[m]
        boot = diff[idx].mean(axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[m] = {"a": float(a[m].mean()), "b": float(b[m].mean()), "diff": float(diff.mean()),
                  "ci95": [float(lo), float(hi)], "p_b_gt_a": float((boot > 0).mean())}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{n} queries; A = {args.run_a.name}, B = {args.run_b.name}")
    for m in METRICS:
        r = out[m]
        print(f"  {m:<11} A {r['a']:.4f}  B {r['b']:.4f}  B-A {r['diff']:+.4f}  "
              f"95% CI [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  P(B>A) {r['p_b_gt_a']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
