"""Stateless helpers of the training pipeline (`negjax.data.pipeline`): integer hashing as
the source of every random choice, length buckets, ragged-row gathers.

    hash_u64(seed, epoch, rows)     # uint64, broadcast; the same on any numpy version
    length_buckets(128)             # [16, 32, 64, 128]
"""

from __future__ import annotations

import numpy as np


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_u64(*parts) -> np.ndarray:
    """A uint64 hash of integer arrays (broadcast): the source of every random choice, so a
    choice depends only on its coordinates (seed, epoch, query, ...), on any numpy version."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for p in parts:
            h = _splitmix(h ^ np.asarray(p).astype(np.int64).astype(np.uint64))
    return h


def length_buckets(max_len: int, configured=()) -> list[int]:
    """Pad lengths for texts of up to max_len tokens: the configured ones below max_len, or
    powers of two from 16, and always max_len itself (few buckets = few jit compilations)."""
    if configured:
        small = sorted({int(b) for b in configured if int(b) < max_len})
    else:
        small = [b for b in (16, 32, 64, 128, 256, 512, 1024) if b < max_len]
    return small + [int(max_len)]


def ragged_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray, fill=-1):
    """Rows of a CSR array padded to [len(rows), max length] (and the lengths)."""
    starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
    width = int(lens.max()) if len(rows) else 0
    j = np.arange(width)
    valid = j[None, :] < lens[:, None]
    idx = np.where(valid, starts[:, None] + j[None, :], 0)
    out = np.where(valid, values[idx] if len(values) else fill, fill)
    return out.astype(np.int64), lens



def not_first(x: np.ndarray) -> np.ndarray:
    """Boolean mask: True where x[i] already occurred at an earlier index."""
    _, first = np.unique(x, return_index=True)
    mask = np.ones(len(x), dtype=bool)
    mask[first] = False
    return mask


def bucket_of(buckets: list[int], length: int) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


class TextIdentity:
    """Text identity of the documents of one global batch: `ident(rows)` maps document rows
    to keys such that rows of equal text (`hashes[row]`, the store's normalised-text hashes)
    get one key, the smallest such row among `rows_a` and `rows_b` (the batch's documents and
    its queries' positive lists; negative entries are padding and kept). Used as the loss's
    doc_ids / query_pos_ids, a document whose text equals a query's positive is then masked
    for that query like the positive's own duplicate. `duplicates`: the batch documents
    (entries of `rows_a`) whose key is another row's."""

    def __init__(self, rows_a: np.ndarray, rows_b: np.ndarray, hashes):
        rows = np.concatenate([np.ravel(rows_a), np.ravel(rows_b)]).astype(np.int64)
        self._rows = np.unique(rows[rows >= 0])
        h = np.asarray(hashes[self._rows]) if len(self._rows) else np.zeros(0, np.uint64)
        order = np.lexsort((self._rows, h))  # by hash, then row: each group's first is its min
        hs = h[order]
        first = np.ones(len(hs), bool)
        first[1:] = hs[1:] != hs[:-1]
        group_min = self._rows[order][np.flatnonzero(first)[np.cumsum(first) - 1]]
        self._key = np.empty_like(self._rows)
        self._key[order] = group_min
        a = np.ravel(rows_a).astype(np.int64)
        a = a[a >= 0]
        self.duplicates = int((self(a) != a).sum())

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        idx = np.clip(np.searchsorted(self._rows, rows), 0, max(len(self._rows) - 1, 0))
        if not len(self._rows):
            return rows.copy()
        return np.where(rows >= 0, self._key[idx], rows)
