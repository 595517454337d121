"""Nearest-neighbour search over embeddings: exact (blockwise matmul) and ScaNN.

One implementation serves mining (hard negatives) and evaluation (rankings); the ScaNN
settings, their tuning against exact search and the recall audit are in
`negjax.search.tuning`. Scores are inner
products (cosine for L2-normalised embeddings). Results are `(ids [Q, k] int64, scores [Q, k]
float32)`, best first; ties are broken by the smaller corpus row, so exact search is
deterministic.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError
from negjax.utils import progress, quiet_native_logs


# ----------------------------------------------------------------------------- exact search

def _block_topk(scores: np.ndarray, k: int, sub: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of `scores [R, C]` -> (cols [R, k], vals [R, k]), unsorted.

    Instead of argpartition over every row, split the columns into sub-blocks of `sub`, take
    each sub-block's maximum, and keep only entries >= the k-th largest sub-block maximum: k
    distinct sub-blocks reach that value, so the true top-k lies above it. Few entries survive.
    """
    r, c = scores.shape
    if c <= k:
        cols = np.broadcast_to(np.arange(c), (r, c)).copy()
        return cols, scores.copy()
    nsub = -(-c // sub)
    if nsub <= k:  # too few sub-blocks for the bound to help
        cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return cols, np.take_along_axis(scores, cols, axis=1)
    pad = nsub * sub - c
    padded = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf) if pad else scores
    maxima = padded.reshape(r, nsub, sub).max(axis=2)
    thresh = -np.partition(-maxima, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(scores >= thresh[:, None])
    vals = scores[rows, cols]
    # Sort candidates by (row, -score, col) and keep the first k of each row.
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(r))
    take = starts[:, None] + np.arange(k)[None, :]
    return cols[take], vals[take]


def _merge_topk(ids_a, vals_a, ids_b, vals_b, k):
    ids = np.concatenate([ids_a, ids_b], axis=1)
    vals = np.concatenate([vals_a, vals_b], axis=1)
    order = _rowwise_order(vals, ids)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _rowwise_order(vals: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-row order by score descending, then id ascending."""
    r, c = vals.shape
    rows = np.repeat(np.arange(r), c)
    order = np.lexsort((ids.ravel(), -vals.ravel(), rows))
    return (order - rows * c).reshape(r, c)


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int, *, query_block: int = 256,
                 corpus_block: int = 65536, show_progress: bool = True, desc: str = "exact search"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product. `queries [Q, D]`, `corpus [N, D]` (any float dtype, or an
    `EmbeddingStore` streamed from disk), read `corpus_block` rows at a time as float32.

    The corpus is read once, block by block; each block is scored against `query_block`
    queries at a time and merged into every query's running top-k. Memory is bounded by one
    corpus block, `query_block x corpus_block` scores (64 MB at the defaults) and Q x k
    running results, whatever the corpus size; the result does not depend on the blocks (ties
    go to the smaller row). Returns `(ids [Q, k] int64, scores [Q, k] float32)`, sorted best
    first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(corpus)  # an array, or anything sliceable into float32 blocks (`EmbeddingStore`)
    if n == 0:
        raise NegjaxError("exact search: the corpus is empty")
    k = min(k, n)
    nq = queries.shape[0]
    starts = range(0, nq, query_block)
    best = [(np.empty((min(query_block, nq - q0), 0), np.int64),
             np.empty((min(query_block, nq - q0), 0), np.float32)) for q0 in starts]
    bar = progress(total=n, desc=desc, unit="doc", disable=None if show_progress else True)
    for c0 in range(0, n, corpus_block):
        block = np.ascontiguousarray(corpus[c0:c0 + corpus_block], dtype=np.float32)
        for i, q0 in enumerate(starts):
            cols, vals = _block_topk(queries[q0:q0 + query_block] @ block.T, k)
            best[i] = _merge_topk(*best[i], cols.astype(np.int64) + c0, vals, k)
        bar.update(len(block))
    bar.close()
    if not best:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    return np.concatenate([b[0] for b in best]), np.concatenate([b[1] for b in best])


# ----------------------------------------------------------------------------- ScaNN

@dataclass
class ScannParams:
    """ScaNN settings (tree + asymmetric hashing + exact reordering). `auto` fills them from
    corpus size and dimension following ScaNN's rules of thumb; every field can be overridden."""

    num_leaves: int = 0            # 0 = no tree (brute-force AH) for small corpora
    leaves_to_search: int = 0
    training_sample_size: int = 0
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder: int = 0               # candidates re-scored exactly; > k
    spherical: bool = True         # spherical k-means: much better recall for cosine data
    brute_force: bool = False      # exact brute force inside ScaNN (tiny corpora)

    @classmethod
    def auto(cls, n: int, dim: int, k: int) -> "ScannParams":
        # AH scores are approximate: on clustered synthetic data (`negjax bench mine`,
        # experiments/mining/README.md) reordering 250 candidates capped recall@100 at 0.958
        # (100k x 384) and 0.951 (1M x 384) whatever the leaves searched; 400 reached 0.996
        # and 0.993, for ~15-30% fewer queries/s.
        reorder = max(4 * k, 250)
        if n < 20_000:
            return cls(brute_force=True, reorder=reorder)
        if n < 100_000:
            return cls(reorder=reorder)
        leaves = int(round(math.sqrt(n)))
        # ~3% of the leaves (at least 10): recall@100 >= 0.95 on the corpora measured here.
        search = max(10, int(math.ceil(leaves * 0.03)))
        return cls(num_leaves=leaves, leaves_to_search=search,
                   training_sample_size=min(n, 250_000), reorder=reorder)

    def override(self, **kw) -> "ScannParams":
        for key, value in kw.items():
            if value is None:
                continue
            if not hasattr(self, key):
                raise NegjaxError(f"unknown ScaNN setting {key!r}")
            setattr(self, key, type(getattr(self, key))(value))
        return self


class ScannIndex:
    """A ScaNN searcher over `corpus [N, D]` float32 (inner product)."""

    def __init__(self, searcher, params: ScannParams, n: int):
        self.searcher = searcher
        self.params = params
        self.n = n

    @classmethod
    def build(cls, corpus: np.ndarray, k: int, params: ScannParams | None = None,
              num_threads: int | None = None) -> "ScannIndex":
        from scann.scann_ops.py import scann_ops_pybind

        corpus = np.ascontiguousarray(corpus, dtype=np.float32)
        n, dim = corpus.shape
        params = params or ScannParams.auto(n, dim, k)
        builder = scann_ops_pybind.builder(corpus, k, "dot_product")
        if params.brute_force:
            builder = builder.score_brute_force()
        else:
            if params.num_leaves:
                builder = builder.tree(num_leaves=params.num_leaves,
                                       num_leaves_to_search=params.leaves_to_search,
                                       training_sample_size=params.training_sample_size or n,
                                       spherical=params.spherical)
            builder = builder.score_ah(params.dims_per_block,
                                       anisotropic_quantization_threshold=params.anisotropic_threshold)
            builder = builder.reorder(max(params.reorder, k))
        with quiet_native_logs():
            searcher = builder.build()
        if num_threads:
            searcher.set_num_threads(num_threads)
        return cls(searcher, params, n)

    def search(self, queries: np.ndarray, k: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Batched parallel search -> `(ids [Q, k] int64, scores [Q, k] float32)`, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kw = {}
        if not self.params.brute_force:
            kw["pre_reorder_num_neighbors"] = max(self.params.reorder, k)
            if self.params.num_leaves:
                kw["leaves_to_search"] = self.params.leaves_to_search
        with quiet_native_logs():
            ids, scores = self.searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                                batch_size=batch_size, **kw)
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        # ScaNN pads with id 2^32-1 / NaN when fewer than k neighbours exist; normalise to -1.
        bad = (ids >= self.n) | (ids < 0)
        ids[bad] = -1
        scores[bad] = -np.inf
        return ids, scores

    def save(self, directory: str | Path) -> None:
        """Serialise to `directory` atomically (temp dir, then rename)."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.searcher.serialize(str(tmp))
        (tmp / "negjax_index.json").write_text(json.dumps({"n": self.n, "params": asdict(self.params)}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: str | Path) -> "ScannIndex":
        from scann.scann_ops.py import scann_ops_pybind

        directory = Path(directory)
        meta_path = directory / "negjax_index.json"
        if not meta_path.is_file():
            raise NegjaxError(f"{directory}: not a saved negjax ScaNN index (no negjax_index.json)")
        meta = json.loads(meta_path.read_text())
        # ScaNN records absolute asset paths; point them at this directory so a saved index
        # survives the temp-dir rename and being moved.
        assets = (directory / "scann_assets.pbtxt").read_text()
        assets = re.sub(r'asset_path: "([^"]*/)?([^"/]+)"',
                        lambda m: f'asset_path: "{directory.resolve() / m.group(2)}"', assets)
        with quiet_native_logs():
            searcher = scann_ops_pybind.ScannSearcher(
                scann_ops_pybind.scann_pybind.ScannNumpy(str(directory), assets), None)
        return cls(searcher, ScannParams(**meta["params"]), meta["n"])


def pair_scores(queries: np.ndarray, corpus: np.ndarray, rows: np.ndarray,
                block: int = 256) -> np.ndarray:
    """Exact scores of chosen pairs: `queries [Q, D]`, `corpus [N, D]` float32, `rows [Q, M]`
    int64 (-1 = none) -> `[Q, M] float32` (-inf where rows < 0).

    Each score is an elementwise product summed over D, whose arithmetic does not depend on M
    or on the other rows, so a document scores the same as a positive and as a candidate.
    Memory: `block x M x D` floats at a time."""
    out = np.full(rows.shape, -np.inf, np.float32)
    for q0 in range(0, len(rows), block):
        r = rows[q0:q0 + block]
        valid = r >= 0
        docs = corpus[np.where(valid, r, 0)]                                   # [b, M, D]
        s = (queries[q0:q0 + block, None, :].astype(np.float32) * docs).sum(axis=-1)
        out[q0:q0 + block] = np.where(valid, s, -np.inf)
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    k = exact_ids.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k)
