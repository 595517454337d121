"""False-negative filters and negative sampling for mined candidates (pure functions).

The search returns, for a block of Q queries, candidates `ids [Q, k]` int64 (corpus rows, best
first, -1 = no candidate) with `scores [Q, k]` float32. Each filter is optional; a candidate
removed by several filters is counted under the first one in `FILTER_ORDER`, so the per-filter
counts add up to the number removed. Ranks are 1-based positions in the retrieved list (the
positives included), as in NV-Retriever's and Tevatron's rank windows.

The positive score `pos` of a query is the highest score among its positives, computed exactly
(`negjax.search.pair_scores`, not taken from the candidate list, so it exists even when a
positive is outside the top-k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from negjax.data.readers import normalize_text
from negjax.errors import NegjaxError

FILTER_ORDER = ("positive_id", "positive_text", "rank_range", "max_score", "min_score",
                "relative_margin", "absolute_margin")
SAMPLING = ("top", "random")


@dataclass(frozen=True)
class FilterSettings:
    """Which candidates may become hard negatives. Negative margins mean 'off'."""

    remove_positive_ids: bool = True       # always on in the mining job; here for the report
    dedup_text: bool = True                # drop candidates whose normalised text is a positive's
    rank_min: int = 1                      # keep ranks in [rank_min, rank_max] (1-based)
    rank_max: int = 1 << 30
    max_score: float = 2.0
    min_score: float = -2.0
    relative_margin: float = -1.0          # drop score > pos * (1 - M)   (NV-Retriever TopK-PercPos)
    absolute_margin: float = -1.0          # drop score > pos - M

    def __post_init__(self):
        if self.min_score > self.max_score:
            raise NegjaxError(f"min score {self.min_score} is above max score {self.max_score}")
        if not 1 <= self.rank_min <= self.rank_max:
            raise NegjaxError(f"rank range {self.rank_min}:{self.rank_max}: need 1 <= MIN <= MAX")
        if self.relative_margin >= 1:
            raise NegjaxError(f"relative margin {self.relative_margin} must be < 1 "
                              "(0.05 drops candidates above 95% of the positive's score)")

    @classmethod
    def from_config(cls, mining_cfg) -> "FilterSettings":
        """From a `negjax.config.MiningConfig`."""
        from negjax.config import parse_rank_range

        lo, hi = (parse_rank_range(mining_cfg.rank_range, key="mining.rank_range")
                  if mining_cfg.rank_range else (1, 1 << 30))
        return cls(dedup_text=bool(mining_cfg.dedup_text), rank_min=lo, rank_max=hi,
                   max_score=float(mining_cfg.max_score), min_score=float(mining_cfg.min_score),
                   relative_margin=float(mining_cfg.relative_margin),
                   absolute_margin=float(mining_cfg.absolute_margin))

    def to_dict(self) -> dict:
        return asdict(self)


def text_groups(texts) -> np.ndarray:
    """`[N] int64`: equal for two documents iff their normalised texts
    (`negjax.data.formats.normalize_text`) are equal."""
    seen: dict[str, int] = {}
    return np.fromiter((seen.setdefault(normalize_text(t), len(seen)) for t in texts),
                       dtype=np.int64, count=len(texts))


def hash_groups(hashes: np.ndarray) -> np.ndarray:
    """`[N] int64` groups from a token store's `text_hash` (hashes of the normalised texts):
    equal iff the hashes are, i.e. `text_groups` of the texts without reading them (two
    different texts share a group only on a 64-bit hash collision)."""
    return np.unique(np.asarray(hashes), return_inverse=True)[1].astype(np.int64).reshape(-1)


def positive_ranks(ids: np.ndarray, pos_rows: np.ndarray) -> np.ndarray:
    """1-based rank of each positive in the candidate list, 0 = not retrieved (or padding).
    `ids [Q, k]`, `pos_rows [Q, P]` -> `[Q, P] int32`."""
    match = (ids[:, :, None] == pos_rows[:, None, :]) & (pos_rows[:, None, :] >= 0)   # [Q, k, P]
    found = match.any(axis=1)
    return np.where(found, match.argmax(axis=1) + 1, 0).astype(np.int32)


def filter_candidates(ids: np.ndarray, scores: np.ndarray, *, pos_rows: np.ndarray,
                      pos_scores: np.ndarray, settings: FilterSettings,
                      groups: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Apply the filters to a block of queries.

    `ids [Q, k]` int64 (best first, -1 = none), `scores [Q, k]` float32, `pos_rows [Q, P]` int64
    (the query's positives, -1 padded), `pos_scores [Q]` float32 (NaN = unknown: the margin
    filters then keep everything), `groups [N]` int64 from `text_groups` (needed iff
    `settings.dedup_text`). Returns `(keep [Q, k] bool, removed)` where `removed[name]` is the
    `[Q, k]` mask of candidates removed by filter `name` (the first in FILTER_ORDER to match).
    """
    q, k = ids.shape
    valid = ids >= 0
    alive = valid.copy()
    removed: dict[str, np.ndarray] = {}
    pos_valid = pos_rows >= 0
    ranks = np.arange(1, k + 1)[None, :]
    pos = pos_scores.astype(np.float32)[:, None]
    off = np.zeros((q, k), bool)

    def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, :, None] == b[:, None, :]) & pos_valid[:, None, :]).any(axis=2)

    drops = {
        "positive_id": same(ids, pos_rows),
        "positive_text": off,
        "rank_range": (ranks < settings.rank_min) | (ranks > settings.rank_max),
        "max_score": scores > settings.max_score,
        "min_score": scores < settings.min_score,
        # NaN comparisons are False: a query without a positive score loses nothing here.
        "relative_margin": (scores > pos * (1.0 - settings.relative_margin)
                            if settings.relative_margin >= 0 else off),
        "absolute_margin": (scores > pos - settings.absolute_margin
                            if settings.absolute_margin >= 0 else off),
    }
    if settings.dedup_text:
        if groups is None:
            raise ValueError("dedup_text needs the text groups of the corpus")
        cand_g = groups[np.where(valid, ids, 0)]
        pos_g = groups[np.where(pos_valid, pos_rows, 0)]
        drops["positive_text"] = same(cand_g, pos_g)
    for name in FILTER_ORDER:
        removed[name] = alive & np.broadcast_to(drops[name], (q, k))
        alive &= ~removed[name]
    return alive, removed


def sample_negatives(kept_positions: np.ndarray, n: int, strategy: str, rng: np.random.Generator
                     ) -> np.ndarray:
    """Choose up to `n` of the kept candidate positions (ascending = best first).

    'top' takes the best-ranked; 'random' draws uniformly without replacement and returns
    them in rank order.
    """
    if strategy not in SAMPLING:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    if len(kept_positions) <= n:
        return kept_positions
    if strategy == "top":
        return kept_positions[:n]
    return np.sort(rng.choice(kept_positions, size=n, replace=False))


def sample_block(keep: np.ndarray, n: int, strategy: str, seed: int,
                 query_index: np.ndarray) -> np.ndarray:
    """Sampling for a block: `keep [Q, k]` bool -> `chosen [Q, k]` bool (at most `n` per row).

    The random draw of a query depends only on (seed, its global index `query_index [Q]`), so
    a resumed or multi-process run draws what a single uninterrupted run draws."""
    if strategy not in SAMPLING:
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    if strategy == "top" or n == 0:
        return keep & (np.cumsum(keep, axis=1) <= n)
    chosen = np.zeros_like(keep)
    for r in np.flatnonzero(keep.sum(axis=1) > 0):
        kept = np.flatnonzero(keep[r])
        rng = np.random.default_rng([seed, int(query_index[r])])
        chosen[r, sample_negatives(kept, n, strategy, rng)] = True
    return chosen
