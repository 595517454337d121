"""Search over a corpus cut into contiguous shards, one per process, with the per-shard top-k
merged into the global top-k (what faiss' IndexShards does inside one host; negjax does it
across the processes of a `jax.distributed` job).

    bounds = shard_bounds(n_docs, chunk, num_shards)            # [(lo, hi)] per shard
    part = shard_candidates(q, docs[lo:hi], lo, k, index=None)  # exact, or a ScaNN index
    ids, exact = merge_candidates([part_0, part_1, ...], k)     # the global top-k

Each shard returns its own top-k as global corpus rows with two scores: the search score
(ScaNN's reordered score; for exact search the exact score) and the exact score
(`pair_scores`, a function of the pair alone, the arithmetic every other score of the mining
job uses). The merge keeps the k best by search score (ties: the smaller row), exactly the set
one search over the whole corpus keeps, then orders them by exact score. So with exact search
a sharded run returns what an unsharded run returns, whatever the number of shards.

Every query visits every shard: the queries (Q x D floats, small next to the corpus) are read
by every process, and only the k candidates per shard (ids + two scores, 16 bytes each) travel
to the process that merges them. The alternative, splitting the queries and moving the
corpus to them, moves the corpus.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from negjax.search.index import exact_search, pair_scores

_NONE = np.iinfo(np.int64).max


class Candidates(NamedTuple):
    """One shard's top-k for a block of queries: global corpus rows (-1 = none), the search
    scores that chose them (-inf = none) and their exact scores."""

    ids: np.ndarray      # [Q, k] int64
    search: np.ndarray   # [Q, k] float32
    exact: np.ndarray    # [Q, k] float32

    @classmethod
    def empty(cls, q: int) -> "Candidates":
        return cls(np.full((q, 0), -1, np.int64), np.zeros((q, 0), np.float32),
                   np.zeros((q, 0), np.float32))


def shard_bounds(n: int, chunk: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous shards [(lo, hi)] of `n` rows whose boundaries fall on multiples of `chunk`
    (the embedding files' rows), as even as whole chunks allow. A shard may be empty when there
    are fewer chunks than shards."""
    chunk = max(1, int(chunk))
    n_chunks = max(1, math.ceil(n / chunk))
    cuts = [min(n, (p * n_chunks // num_shards) * chunk) for p in range(num_shards + 1)]
    cuts[-1] = n
    return [(cuts[p], cuts[p + 1]) for p in range(num_shards)]


def _order(primary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-row order by `primary` descending, then id ascending, empty slots (-1) last."""
    key_ids = np.where(ids >= 0, ids, _NONE)
    return np.lexsort((key_ids, -primary), axis=1)


def shard_candidates(queries: np.ndarray, docs, lo: int, k: int, index=None) -> Candidates:
    """The top-`k` of `queries [Q, D]` float32 in one shard: `docs` holds the shard's rows
    (an array or an `EmbeddingStore` view, read block by block) whose first row is corpus row
    `lo`; `index` is a ScaNN index over those rows, or None for exact search.

    Exact search ranks by the exact score itself: a GEMM's score of a pair depends on where
    the pair falls in the matrix (two equal documents can score differently in one product),
    so the GEMM only shortlists k + max(8, k/8) candidates, and the k best by exact score (then
    the smaller row) are kept: the same set whatever the shard boundaries."""
    q = len(queries)
    k = min(k, len(docs))
    if k == 0 or q == 0:
        return Candidates.empty(q)
    if index is None:
        local, _ = exact_search(queries, docs, min(len(docs), k + max(8, k // 8)),
                                show_progress=False)
        exact = pair_scores(queries, docs, local)
        keep = _order(exact, local)[:, :k]
        local, exact = np.take_along_axis(local, keep, 1), np.take_along_axis(exact, keep, 1)
        search = exact
    else:
        local, search = index.search(queries, k)
        exact = pair_scores(queries, docs, local)
    ids = np.where(local >= 0, local + lo, -1)
    search = np.where(local >= 0, search, -np.inf).astype(np.float32)
    return Candidates(ids, search, exact)


def _top_by_search(parts: list[Candidates], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact scores) of the k best candidates by search score (then the smaller row)."""
    ids = np.concatenate([p.ids for p in parts], axis=1)
    search = np.concatenate([p.search for p in parts], axis=1)
    exact = np.concatenate([p.exact for p in parts], axis=1)
    keep = _order(np.where(ids >= 0, search, -np.inf), ids)[:, :k]
    return np.take_along_axis(ids, keep, 1), np.take_along_axis(exact, keep, 1)


def merge_candidates(parts: list[Candidates], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-`k` of the shards' candidates: the k best by search score (then the
    smaller row), ordered by exact score (then the smaller row). Returns (ids [Q, k] int64,
    exact scores [Q, k] float32), -1 / -inf padding where the corpus has fewer than k rows."""
    ids, exact = _top_by_search(parts, k)
    if ids.shape[1] == 0:
        return np.full((len(ids), 1), -1, np.int64), np.full((len(ids), 1), -np.inf, np.float32)
    order = _order(np.where(ids >= 0, exact, -np.inf), ids)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(exact, order, 1)


def merge_ids(parts: list[Candidates], k: int) -> np.ndarray:
    """Only the ids of `merge_candidates` in search-score order (recall audits)."""
    return _top_by_search(parts, k)[0]


def save_candidates(path, cand: Candidates, **extra) -> None:
    """Write one shard's candidates (and any `extra` arrays) atomically (`.npz`)."""
    from negjax.utils import atomic_save_npz

    atomic_save_npz(path, ids=cand.ids, search=cand.search, exact=cand.exact, **extra)


def load_candidates(path, rows: int | None = None) -> Candidates | None:
    """The candidates saved at `path`, or None if missing or damaged (or not `rows` rows)."""
    try:
        with np.load(path) as z:
            cand = Candidates(z["ids"], z["search"], z["exact"])
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if rows is not None and len(cand.ids) != rows:
        return None
    return cand
