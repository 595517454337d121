"""ScaNN settings for a corpus, their tuning against exact search, and the recall audit.

    sp = scann_settings(n_docs, dim, k, num_leaves=0)            # ScannParams.auto + overrides
    index = ScannIndex.build(doc_emb, k, sp)
    tune_search(index, q_emb, doc_emb, k, sample, target=0.95, tunable={"leaves_to_search"})
    audit = audit_recall(index, q_emb, doc_emb, k, audit_sample)

Used by the mining job and by evaluation (`negjax eval --index scann`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError
from negjax.search.index import ScannParams, exact_search, recall_at_k
from negjax.utils import atomic_write_text

SEARCH_SETTINGS = ("leaves_to_search", "reorder")


def scann_settings(n: int, dim: int, k: int, *, num_leaves: int = 0, leaves_to_search: int = 0,
                   reorder: int = 0) -> ScannParams:
    """`ScannParams.auto(n, dim, k)` with the given settings (0 = automatic). Asking for a
    tree on a corpus small enough for brute force turns brute force off."""
    sp = ScannParams.auto(n, dim, k)
    sp.override(num_leaves=num_leaves or None, leaves_to_search=leaves_to_search or None,
                reorder=reorder or None)
    if num_leaves and sp.brute_force:
        sp.brute_force = False
    if sp.num_leaves:
        if sp.num_leaves > n:
            raise NegjaxError(f"ScaNN num_leaves {sp.num_leaves} exceeds the corpus size {n}")
        if not sp.leaves_to_search:
            sp.leaves_to_search = max(1, math.ceil(sp.num_leaves * 0.03))
        if sp.leaves_to_search > sp.num_leaves:
            raise NegjaxError(f"ScaNN leaves_to_search {sp.leaves_to_search} exceeds num_leaves "
                              f"{sp.num_leaves}")
    return sp


def tunable_settings(*, leaves_to_search: int = 0, reorder: int = 0) -> set[str]:
    """The search-time settings left automatic (0), which `tune_search` may raise."""
    given = {"leaves_to_search": leaves_to_search, "reorder": reorder}
    return {key for key, v in given.items() if not v}


def describe(sp: ScannParams) -> str:
    """'brute force' or e.g. '1000 leaves, search 30, AH, reorder 400'."""
    if sp.brute_force:
        return "brute force"
    tree = f"{sp.num_leaves} leaves, search {sp.leaves_to_search}, " if sp.num_leaves else ""
    return f"{tree}AH, reorder {sp.reorder}"


def tune_search(index, q_emb: np.ndarray, doc_emb: np.ndarray, k: int, sample: np.ndarray,
                target: float, tunable: set[str]) -> dict:
    """Raise the index's search-time settings until recall@k against exact search on the
    queries `sample` reaches `target`: each step doubles whichever of leaves_to_search and
    reorder (those in `tunable`) gains more recall. `ScannParams.auto` fits clustered synthetic
    data; real embeddings can need many more leaves (WordNet/MiniLM: 3% of the leaves gave
    recall@100 0.75, experiments/mining/README.md). Mutates `index.params`; returns the
    record of the steps."""
    p = index.params
    exact_ids, _ = exact_search(q_emb[sample], doc_emb, k, desc="tune (exact)")

    def recall() -> float:
        return recall_at_k(index.search(q_emb[sample], k)[0], exact_ids)

    r = recall()
    steps = [{"leaves_to_search": p.leaves_to_search, "reorder": p.reorder, "recall_at_k": r}]
    while r < target:
        options = []
        if "leaves_to_search" in tunable and p.num_leaves and p.leaves_to_search < p.num_leaves:
            options.append(("leaves_to_search", min(p.num_leaves, 2 * p.leaves_to_search)))
        if "reorder" in tunable and p.reorder < min(index.n, 20 * k):
            options.append(("reorder", min(index.n, 20 * k, 2 * max(p.reorder, k))))
        if not options:
            break
        best = None
        for name, value in options:
            old = getattr(p, name)
            setattr(p, name, value)
            got = recall()
            setattr(p, name, old)
            if best is None or got > best[2]:
                best = (name, value, got)
        setattr(p, best[0], best[1])
        r = best[2]
        steps.append({"leaves_to_search": p.leaves_to_search, "reorder": p.reorder, "recall_at_k": r})
    return {"target": target, "queries": int(len(sample)), "reached": bool(r >= target),
            "leaves_to_search": p.leaves_to_search, "reorder": p.reorder, "steps": steps}


def query_samples(nq: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(audit, tuning) samples of `n` query numbers each, disjoint when there are enough
    queries (else the tuning sample is the audit sample)."""
    perm = np.random.default_rng([seed, 1]).permutation(nq)
    n = min(n, nq)
    audit = np.sort(perm[:n])
    tune = np.sort(perm[n:2 * n]) if nq >= 2 * n else audit
    return audit, tune


def recall_summary(approx_ids: np.ndarray, exact_ids: np.ndarray, exact_s: float,
                   approx_s: float) -> dict:
    """The audit's figures from the top-k ids of the index and of exact search over the same
    queries `[Q, k]` and the seconds each search took: recall@k (and @100 when k >= 100), QPS."""
    n, k = exact_ids.shape
    res = {"queries": int(n), "k": int(k), "recall_at_k": recall_at_k(approx_ids, exact_ids),
           "exact_qps": n / max(exact_s, 1e-9), "index_qps": n / max(approx_s, 1e-9)}
    if k >= 100:
        res["recall_at_100"] = recall_at_k(approx_ids[:, :100], exact_ids[:, :100])
    return res


def audit_recall(index, q_emb: np.ndarray, doc_emb: np.ndarray, k: int, sample: np.ndarray,
                 cache: Path | None = None) -> dict:
    """Recall@k (and @100 when k >= 100) of the index against exact search on the queries
    `sample` (cached in `cache`). Exact search (`index` None): recall 1 by construction."""
    n = len(sample)
    if index is None:
        return {"queries": 0, "recall_at_k": 1.0, "note": "exact search"}
    if n == 0:
        return {"queries": 0, "recall_at_k": None, "note": "audit disabled (audit_queries = 0)"}
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass  # a damaged cache is recomputed
    t = time.perf_counter()
    exact_ids, _ = exact_search(q_emb[sample], doc_emb, k, desc="audit (exact)")
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    approx_ids, _ = index.search(q_emb[sample], k)
    approx_s = time.perf_counter() - t
    res = recall_summary(approx_ids, exact_ids, exact_s, approx_s)
    if cache is not None:
        atomic_write_text(cache, json.dumps(res) + "\n")
    return res
