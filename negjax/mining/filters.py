"""False-negative filters and negative sampling for mined candidates (pure functions).

For one query the search returns candidates `ids [k]` (corpus rows, best first, -1 = none) with
`scores [k]`. Each filter is optional; a candidate removed by several filters is counted under
the first one in `FILTER_ORDER`, so the per-filter counts add up to the total removed.

The positive score `pos` of a query is the highest score among its positives (computed exactly,
not taken from the candidate list, so it exists even when a positive is outside the top-k).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

FILTER_ORDER = ("positive_id", "positive_text", "rank_range", "max_score", "min_score",
                "relative_margin", "absolute_margin")


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

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_text(text: str) -> str:
    """Case-, accent-width- and whitespace-insensitive form used to find duplicate documents."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text)).strip()


def filter_candidates(ids: np.ndarray, scores: np.ndarray, *, positive_ids: set[int],
                      positive_text_keys: set[str], text_key, pos_score: float,
                      settings: FilterSettings) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Apply the filters to one query's candidates.

    `ids [k]` int64 and `scores [k]` float32, best first; `text_key(row) -> str` gives the
    normalised text of a corpus row (only called when `dedup_text`).
    Returns `(keep_mask [k] bool, ranks [k] int32 (1-based retrieval rank), removed)` where
    `removed[name]` is the boolean mask of candidates removed by filter `name` (first match).
    """
    k = len(ids)
    ranks = np.arange(1, k + 1, dtype=np.int32)
    valid = ids >= 0
    alive = valid.copy()
    removed: dict[str, np.ndarray] = {}

    def apply(name: str, drop: np.ndarray):
        hit = alive & drop
        removed[name] = hit
        alive[hit] = False

    apply("positive_id", np.array([int(i) in positive_ids for i in ids], dtype=bool))
    if settings.dedup_text and positive_text_keys:
        apply("positive_text", np.array([valid[j] and text_key(int(ids[j])) in positive_text_keys
                                         for j in range(k)], dtype=bool))
    else:
        removed["positive_text"] = np.zeros(k, bool)
    apply("rank_range", (ranks < settings.rank_min) | (ranks > settings.rank_max))
    apply("max_score", scores > settings.max_score)
    apply("min_score", scores < settings.min_score)
    if settings.relative_margin >= 0:
        apply("relative_margin", scores > pos_score * (1.0 - settings.relative_margin))
    else:
        removed["relative_margin"] = np.zeros(k, bool)
    if settings.absolute_margin >= 0:
        apply("absolute_margin", scores > pos_score - settings.absolute_margin)
    else:
        removed["absolute_margin"] = np.zeros(k, bool)
    return alive, ranks, removed


def sample_negatives(kept_positions: np.ndarray, n: int, strategy: str, rng: np.random.Generator
                     ) -> np.ndarray:
    """Choose up to `n` of the kept candidate positions (ascending = best first).

    'top' takes the best-ranked; 'random' draws uniformly without replacement and returns
    them in rank order.
    """
    if len(kept_positions) <= n:
        return kept_positions
    if strategy == "top":
        return kept_positions[:n]
    if strategy == "random":
        return np.sort(rng.choice(kept_positions, size=n, replace=False))
    raise ValueError(f"unknown sampling strategy {strategy!r}")
