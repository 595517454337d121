"""One block of mined queries: the exact positive scores, the false-negative filters, the
sampled negatives and the block's statistics (for the report), as the mining job writes them
into one shard. Pure numpy, no I/O but the statistics files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from negjax.mining.filters import FILTER_ORDER, filter_candidates, positive_ranks, sample_block
from negjax.search import pair_scores
from negjax.utils import atomic_save_npz


def pad_rows(lists, fill=-1) -> np.ndarray:
    width = max(1, max((len(x) for x in lists), default=0))
    out = np.full((len(lists), width), fill, np.int64)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def mine_block(q_emb, doc_emb, ids, scores, pos_lists, query_index, *, k: int, settings,
               groups, num_negatives: int, sampling: str, seed: int,
               edges: np.ndarray) -> tuple[dict, dict]:
    """Filter and sample the candidates of the queries `q_emb [Q, D]` float32 (global query
    numbers `query_index [Q]`, positives as corpus rows `pos_lists`): `ids [Q, k]` corpus rows
    (-1 = none) ordered by their exact `scores` (`negjax.search.sharded.merge_candidates`, the
    same arithmetic as the positive score, so margins compare like with like). `doc_emb`: the
    corpus (an array or an `EmbeddingStore`; only the positives' rows are read). Returns
    (columns of corpus rows, stats for the report)."""
    pos_rows = pad_rows(pos_lists)
    pos_score = pair_scores(q_emb, doc_emb, pos_rows).max(axis=1)
    pos_score = np.where(np.isfinite(pos_score), pos_score, np.nan).astype(np.float32)
    ranks = positive_ranks(ids, pos_rows)
    keep, removed = filter_candidates(ids, scores, pos_rows=pos_rows, pos_scores=pos_score,
                                      settings=settings, groups=groups)
    chosen = sample_block(keep, num_negatives, sampling, seed, query_index)

    cols = {"negative_rows": [ids[r][chosen[r]] for r in range(len(ids))],
            "negative_scores": [scores[r][chosen[r]] for r in range(len(ids))],
            "negative_ranks": [(np.flatnonzero(chosen[r]) + 1).astype(np.int32)
                               for r in range(len(ids))],
            "positive_score": pos_score}
    valid = ids >= 0
    n_chosen = chosen.sum(axis=1)
    has_pos = pos_rows >= 0
    hist = lambda x: np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)[0]  # noqa: E731
    stats = {
        "queries": len(ids), "candidates": int(valid.sum()),
        "removed": np.array([int(removed[f].sum()) for f in FILTER_ORDER], np.int64),
        "passed_filters": int(keep.sum()), "negatives": int(n_chosen.sum()),
        "queries_short": int((n_chosen < num_negatives).sum()),
        "queries_without_negatives": int((n_chosen == 0).sum()),
        "positives": int(has_pos.sum()),
        "positives_outside_topk": int((has_pos & (ranks == 0)).sum()),
        "queries_positive_outside_topk": int((has_pos & (ranks == 0)).any(axis=1).sum()),
        "queries_no_positive_in_topk": int((has_pos.any(axis=1) & ~(ranks > 0).any(axis=1)).sum()),
        "hist_positive": hist(pos_score[np.isfinite(pos_score)]),
        "hist_passed": hist(scores[keep]),
        "hist_negatives": hist(scores[chosen]),
        "hist_removed": np.stack([hist(scores[removed[f]]) for f in FILTER_ORDER]),
        "rank_hist": np.bincount(ranks[has_pos], minlength=k + 1)[: k + 1],
    }
    return cols, stats


def save_stats(path: Path, stats: dict, edges: np.ndarray) -> None:
    atomic_save_npz(path, edges=edges, **{key: np.asarray(v) for key, v in stats.items()})


def load_stats(path: Path) -> dict:
    with np.load(path) as z:
        return {key: z[key] for key in z.files}
