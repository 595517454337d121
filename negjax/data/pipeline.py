"""The training input pipeline: (seed, step) -> this process' slice of the global batch.

    pipe = build_pipeline(cfg, tokenizer)        # or Pipeline(...) from parts
    batch = next(pipe)                           # dict of numpy arrays (docs/design.md)
    state = pipe.get_state()                     # small JSON-able dict, saved with a checkpoint
    pipe.set_state(state)                        # the sequence continues exactly

Design: batch k is a pure function of (seed, k). Every process computes the *ids* of the
whole global batch (cheap integer work) and materialises tokens only for its own slice, so
the slices of any number of processes concatenate to exactly the one-process batch, the
dedup rule below can look at the whole global batch, and resuming is `step = k`.
grain (MapDataset.range(...).map(batch) -> to_iter_dataset) supplies the background
prefetch threads and the iterator state; grain's own samplers and per-process sharding work
per record, which cannot express a rule over the *global* batch, so sampling is ours.

Sampling (epoch e = k // steps_per_epoch, steps_per_epoch = num_queries // batch_size):
- Queries: a permutation of all training queries per epoch, from hash(seed, e); batch k takes
  the next batch_size of it. The last num_queries % batch_size queries of each epoch's order
  are not used in that epoch (which ones changes every epoch).
- Positive: the query's positives in turn, positives[(hash(seed, q) + e) % n] (Tevatron's
  rotation).
- Hard negatives (H per query) from the query's mined list (shards, else the training file's
  "neg"): 'top' takes the ranked list as a ring and starts at (e * H) % n, so successive
  epochs walk down the ranking (Tevatron); 'random' orders the list by hash(seed, e, q, j)
  and takes the first H. A query with fewer than H gets random corpus documents for the
  rest (counted in stats as random_negatives / queries_short).
- No document text twice in one global batch (texts compared by the store's normalised-text
  hashes, so two rows of equal text count as one document): documents are taken in priority
  order (every query's positive, then the mined negatives query by query, slot by slot, then
  the random fills); a negative whose text is already in the batch or is one of its own
  query's positives' is replaced by the query's next unused candidate, then by random corpus
  documents (hash(seed, k, slot, attempt)), then by a bounded scan from a random start. Only
  when that finds no unused text does a duplicate stay (stats: unavoidable_duplicates). Two
  queries that share the positive first try their other positives; if none is free the
  shared positive stays (stats: shared_positives).
- Identity for the loss: the batch's doc_ids and query_pos_ids are text identities
  (`TextIdentity`: rows of equal text get one id), and the loss masks a column whose id is
  one of the query's positives, so a text that is some query's positive is never that
  query's negative, whatever row carries it (stats: duplicate_texts, the batch documents
  sharing their text with another row).
- Lengths: queries / documents are padded to the smallest length bucket that holds the
  longest text of the *global* batch, so every process has the same shapes.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass

import numpy as np

from negjax.data.formats import TrainExamples
from negjax.data.layout import resolve_dataset
from negjax.data.prepared import prepare_training, shared_token_stores
from negjax.data.sampling import (bucket_of, hash_u64, length_buckets, not_first, ragged_rows,
                                  TextIdentity)
from negjax.data.shards import NegativeLists, load_negatives
from negjax.data.token_store import TokenStore, drop_pages
from negjax.errors import NegjaxError

STATE_VERSION = 1
_PERM, _POS, _NEG, _RAND, _MIX = 1, 2, 3, 4, 5  # hash streams: one per kind of random choice
_RANDOM_ATTEMPTS = 32  # random draws before scanning for a free document
_FAST_DRAWS = 4       # of which drawn vectorised up front
STAT_KEYS = ("batches", "queries", "negatives", "random_negatives", "queries_short",
             "replaced_duplicates", "unavoidable_duplicates", "shared_positives", "mix_random",
             "duplicate_texts")


@dataclass
class GlobalBatch:
    """Ids of global batch k (before tokens): q_rows [B], d_rows [B*G], pos_ids [B, P]."""
    step: int
    q_rows: np.ndarray
    d_rows: np.ndarray
    pos_ids: np.ndarray
    q_len: int
    d_len: int
    stats: dict


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

class BatchIterator(abc.ABC):
    """Iteration over `_element(k) -> (batch, stats)` with grain's prefetch threads, the
    position `step` and summed `stats` (what `get_state` saves); `Pipeline` and
    `negjax.data.sources.SourcesPipeline` are ones."""

    _iter = None
    _start = 0

    @abc.abstractmethod
    def _element(self, k: int):
        """(this process' slice of global batch k, its stats): a pure function of k."""

    def maps(self) -> list:
        """The memory-mapped arrays batches read at random rows (`drop_pages`)."""
        return []

    def _make_iter(self, start: int):
        import grain

        ds = grain.MapDataset.range(0, 1 << 62).map(self._element)
        opts = grain.ReadOptions(num_threads=max(self._threads, 1) if self._prefetch else 0,
                                 prefetch_buffer_size=self._prefetch)
        it = iter(ds.to_iter_dataset(opts))
        if start:
            it.set_state({"next_index": int(start)})
        return it

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._make_iter(self._start)
        batch, stats = next(self._iter)
        drop_pages(self.maps())  # the RSS stays what a batch reads, not the corpus's arrays
        for key, v in stats.items():
            self._stats[key] = self._stats.get(key, 0) + v
        self._start += 1
        return batch

    @property
    def step(self) -> int:
        """Index of the next batch `next()` returns."""
        return self._start

    @property
    def stats(self) -> dict:
        """Counters over the batches returned so far (restored with the state)."""
        return dict(self._stats)

    def _seek(self, step: int, stats: dict) -> None:
        self._start = int(step)
        self._stats = {**dict.fromkeys(STAT_KEYS, 0), **stats}
        if self._iter is not None:
            self._iter.set_state({"next_index": self._start})

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Pipeline(BatchIterator):
    """Deterministic, resumable, multi-process batches (see the module docstring).

    query_store rows are training examples, doc_store rows are corpus rows (= document ids).
    negatives: ranked candidate lists per example (None = none; all negatives random).
    """

    def __init__(self, *, examples: TrainExamples, query_store: TokenStore, doc_store: TokenStore,
                 batch_size: int, num_negatives: int = 0, negatives: NegativeLists | None = None,
                 seed: int = 0, strategy: str = "top", max_positives: int = 32,
                 query_buckets=None, doc_buckets=None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 4, threads: int = 1,
                 negative_mix: float = 1.0, curriculum_start_rank: int = 0,
                 curriculum_steps: int = 0):
        nq, nd = len(examples), len(doc_store)
        if not 0.0 <= negative_mix <= 1.0:
            raise NegjaxError(f"data.negative_mix must be in [0, 1], got {negative_mix}")
        if curriculum_start_rank < 0 or curriculum_steps < 0:
            raise NegjaxError("data.curriculum_start_rank and data.curriculum_steps must be >= 0")
        if len(query_store) != nq:
            raise ValueError(f"query store has {len(query_store)} rows, examples {nq}")
        if strategy not in ("top", "random"):
            raise NegjaxError(f"negative sampling {strategy!r}: expected 'top' or 'random'")
        if batch_size > nq:
            raise NegjaxError(f"batch size {batch_size} exceeds the {nq} training queries")
        if batch_size % process_count:
            raise NegjaxError(f"global batch size {batch_size} is not divisible by the "
                              f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.examples, self.query_store, self.doc_store = examples, query_store, doc_store
        self.batch_size, self.num_negatives, self.group_size = batch_size, num_negatives, 1 + num_negatives
        self.seed, self.strategy = int(seed), strategy
        self.negative_mix = float(negative_mix)
        self.curriculum = (int(curriculum_start_rank), int(curriculum_steps))
        self.num_queries, self.num_docs = nq, nd
        self.steps_per_epoch = nq // batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = batch_size // process_count

        pos = examples.positive_lists()
        self._pos_off, self._pos_rows = pos.offsets, pos.rows.astype(np.int64)
        if (np.diff(self._pos_off) == 0).any():
            raise NegjaxError("every training query needs at least one positive")
        if negatives is None:
            negatives = NegativeLists(np.zeros(nq + 1, np.int64), np.zeros(0, np.int32))
        if len(negatives.offsets) != nq + 1:
            raise ValueError("negatives are not aligned to the training examples")
        self._neg_off, self._neg_rows = negatives.offsets, negatives.rows.astype(np.int64)
        for arr in (self._pos_rows, self._neg_rows):
            if len(arr) and (arr.min() < 0 or arr.max() >= nd):
                raise ValueError("document row out of range of the document store")
        self.num_positives = int(max(1, min(max_positives, np.diff(self._pos_off).max())))
        # Teacher scores (distillation): a batch field only when the training data has them.
        self._teacher = examples.teacher if examples.has_teacher_scores else None
        self.query_buckets = length_buckets(query_store.max_len, query_buckets or ())
        self.doc_buckets = length_buckets(doc_store.max_len, doc_buckets or ())
        # [nq] / [nd] int32 token counts, [nd] uint64 text hashes: read row by row (`RowReader`)
        self._q_lengths, self._d_lengths = query_store.length_rows, doc_store.length_rows
        self._text_hash = doc_store.hash_rows

        counts = np.diff(self._neg_off)
        self.info = {
            "queries": nq, "documents": nd, "steps_per_epoch": self.steps_per_epoch,
            "unused_queries_per_epoch": nq % batch_size, "group_size": self.group_size,
            "num_positives": self.num_positives,
            "queries_without_negatives": int((counts == 0).sum()),
            "queries_with_fewer_than_H": int((counts < num_negatives).sum()),
            "negatives_source": negatives.source or ("training file" if len(self._neg_rows) else "none"),
            "query_buckets": self.query_buckets, "doc_buckets": self.doc_buckets,
        }
        self._perm_cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._prefetch, self._threads = int(prefetch), int(threads)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._iter = None
        self._start = 0

    # -- pure part: ids of global batch k ---------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[num_queries] int64: the order of the training queries in `epoch`."""
        with self._lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                keys = hash_u64(self.seed, _PERM, epoch, np.arange(self.num_queries))
                perm = np.argsort(keys, kind="stable")
                self._perm_cache = {epoch: perm, **{e: p for e, p in self._perm_cache.items()
                                                    if e == epoch - 1}}
            return perm

    def global_batch(self, k: int) -> GlobalBatch:
        """Ids of global batch k (a pure function of (seed, k))."""
        B, H, G = self.batch_size, self.num_negatives, self.group_size
        epoch, i = divmod(int(k), self.steps_per_epoch)
        q = self.epoch_order(epoch)[i * B:(i + 1) * B]
        stats = dict.fromkeys(STAT_KEYS, 0)
        stats.update(batches=1, queries=B, negatives=B * H)

        # Positives: rotate through each query's list by epoch.
        all_pos, npos = ragged_rows(self._pos_off, self._pos_rows, q)
        rot = (hash_u64(self.seed, _POS, q) + np.uint64(epoch)) % npos.astype(np.uint64)
        chosen = all_pos[np.arange(B), rot.astype(np.int64)]
        th = self._text_hash
        dup = not_first(th[chosen])
        if dup.any():
            used = set(th[chosen].tolist())
            for b in np.flatnonzero(dup):
                for t in range(1, int(npos[b])):
                    alt = int(all_pos[b, (int(rot[b]) + t) % int(npos[b])])
                    if int(th[alt]) not in used:
                        chosen[b] = alt
                        used.add(int(th[alt]))
                        break
                else:
                    stats["shared_positives"] += 1

        # The query's positives, chosen first, padded with -1 to P columns.
        key = np.where(all_pos == chosen[:, None], -1, np.arange(all_pos.shape[1])[None, :])
        key = np.where(all_pos < 0, all_pos.shape[1], key)
        ordered = np.take_along_axis(all_pos, np.argsort(key, axis=1, kind="stable"), axis=1)
        P = self.num_positives
        pos_ids = np.full((B, P), -1, dtype=np.int64)
        pos_ids[:, :min(P, ordered.shape[1])] = ordered[:, :P]

        negs = np.zeros((B, 0), dtype=np.int64)
        if H:
            negs = self._negatives(k, epoch, q, chosen, all_pos, stats)
        d_rows = np.concatenate([chosen[:, None], negs], axis=1).reshape(B * G)
        q_len = bucket_of(self.query_buckets, int(self._q_lengths[q].max()))
        d_len = bucket_of(self.doc_buckets, int(self._d_lengths[d_rows].max()))
        return GlobalBatch(int(k), q, d_rows, pos_ids, q_len, d_len, stats)

    def curriculum_offset(self, k: int) -> int:
        """Mined ranks skipped at step k: curriculum_start_rank at step 0, falling linearly to 0
        at curriculum_steps (easy -> hard); 0 without a curriculum."""
        start, steps = self.curriculum
        if not start or not steps or k >= steps:
            return 0
        return int(round(start * (1.0 - k / steps)))

    def _negatives(self, k, epoch, q, chosen, all_pos, stats) -> np.ndarray:
        """[B, H] int64 document rows (the rules in the module docstring)."""
        B, H, nd = self.batch_size, self.num_negatives, self.num_docs
        cand, n = ragged_rows(self._neg_off, self._neg_rows, q)
        off = self.curriculum_offset(k)
        if off and cand.shape[1]:
            # The window starts `off` ranks down each list (never past its last H entries).
            skip = np.clip(n - H, 0, off)
            j = np.arange(cand.shape[1])[None, :] + skip[:, None]
            cand = np.where(j < cand.shape[1], np.take_along_axis(cand, np.minimum(j, cand.shape[1] - 1), axis=1), -1)
            n = n - skip
        C = cand.shape[1]
        if C:
            j = np.arange(C)[None, :]
            valid = j < n[:, None]
            if self.strategy == "top":
                # A list no longer than H is used whole, in ranked order.
                start = np.where(n > H, (epoch * H) % np.maximum(n, 1), 0)
                order = (start[:, None] + j) % np.maximum(n, 1)[:, None]
            else:
                keys = hash_u64(self.seed, _NEG, epoch, q[:, None], j)
                order = np.argsort(np.where(valid, keys, np.iinfo(np.uint64).max), axis=1, kind="stable")
            cand = np.where(valid, np.take_along_axis(cand, order, axis=1), -1)
        picks = np.full((B, H), -1, dtype=np.int64)
        picks[:, :min(H, C)] = cand[:, :H]
        mix_slot = np.zeros((B, H), bool)
        if self.negative_mix < 1.0:
            # Each slot is a mined negative with probability negative_mix (hash of the step and
            # slot: deterministic), else a random corpus document.
            u = hash_u64(self.seed, _MIX, k, np.arange(B * H).reshape(B, H)) >> np.uint64(11)
            mix_slot = u.astype(np.float64) / float(1 << 53) >= self.negative_mix
            picks = np.where(mix_slot, -1, picks)
            stats["mix_random"] = int(mix_slot.sum())
        short = picks < 0
        stats["queries_short"] = int(short.any(axis=1).sum())
        stats["random_negatives"] = int(short.sum())
        slot = np.arange(B * H).reshape(B, H)
        picks = np.where(short, (hash_u64(self.seed, _RAND, k, slot, 0) % np.uint64(nd)).astype(np.int64), picks)

        # First occurrence wins, in priority order positives, mined negatives, random fills
        # (a random fill never displaces a mined negative); the rest are replaced.
        flat_short = short.ravel()
        prio = np.concatenate([np.flatnonzero(~flat_short), np.flatnonzero(flat_short)])
        th = self._text_hash
        seen_twice = not_first(th[np.concatenate([chosen, picks.ravel()[prio]])])[B:]
        bad = np.empty(B * H, dtype=bool)
        bad[prio] = seen_twice
        bad = bad.reshape(B, H)
        pos_h = np.where(all_pos >= 0, th[np.maximum(all_pos, 0)], 0)
        bad |= ((th[picks][:, :, None] == pos_h[:, None, :]) & (all_pos >= 0)[:, None, :]).any(axis=2)
        if not bad.any():
            return picks
        used = set(th[chosen].tolist()) | set(th[picks[~bad]].tolist())
        bad_b, bad_h = np.nonzero(bad)
        bad_slot = slot[bad_b, bad_h]
        # The first random draws of every bad slot at once (scalar hashing is slow).
        draws = (hash_u64(self.seed, _RAND, k, bad_slot[:, None], np.arange(1, _FAST_DRAWS + 1))
                 % np.uint64(nd)).astype(np.int64).tolist()
        next_cand = dict.fromkeys(set(bad_b.tolist()), H)  # candidates [H:] are the spare ones
        rows, owns = {}, {}
        for i, (b, h) in enumerate(zip(bad_b.tolist(), bad_h.tolist())):
            if b not in rows:
                rows[b] = cand[b].tolist() if C else []
                owns[b] = set(th[all_pos[b][all_pos[b] >= 0]].tolist())
            row, own = rows[b], owns[b]
            new = None
            # (a slot the mix made random is refilled at random, not from the mined list)
            while not mix_slot[b, h] and next_cand[b] < C and row[next_cand[b]] >= 0:
                c = row[next_cand[b]]
                next_cand[b] += 1
                if int(th[c]) not in used and int(th[c]) not in own:
                    new = c
                    break
            if new is None:
                new = next((d for d in draws[i] if int(th[d]) not in used and int(th[d]) not in own),
                           None)
                if new is None:
                    new = self._random_free(k, int(bad_slot[i]), used, own, stats)
                if not short[b, h]:
                    stats["random_negatives"] += 1
            stats["replaced_duplicates"] += 1
            used.add(int(th[new]))
            picks[b, h] = new
        return picks

    def _random_free(self, k: int, slot: int, used: set, own: set, stats) -> int:
        """A document whose text is not in `used` nor `own` (text hashes; after the first
        _FAST_DRAWS draws failed)."""
        nd, th = self.num_docs, self._text_hash
        free = lambda d: int(th[d]) not in used and int(th[d]) not in own  # noqa: E731
        for attempt in range(_FAST_DRAWS + 1, _RANDOM_ATTEMPTS + 1):
            d = int(hash_u64(self.seed, _RAND, k, slot, attempt) % np.uint64(nd))
            if free(d):
                return d
        start = int(hash_u64(self.seed, _RAND, k, slot, -1) % np.uint64(nd))
        # A scan from a random start, bounded (rows of repeated texts can outnumber the texts
        # in use; past the bound a repeat stays, and the loss masks it by text identity).
        for step in range(min(nd, 4 * (len(used) + len(own)) + 1024)):
            d = (start + step) % nd
            if free(d):
                return d
        stats["unavoidable_duplicates"] += 1
        for step in range(nd):  # no unused text left: at least never a positive's
            d = (start + step) % nd
            if int(th[d]) not in own:
                return d
        return start

    # -- this process' slice ---------------------------------------------------------------

    def maps(self) -> list:
        return (self.query_store.maps + self.doc_store.maps
                + getattr(self.examples, "maps", []))

    def batch(self, k: int) -> dict:
        """This process' slice of global batch k (a pure function of (seed, k)):
        q_tokens/q_mask [b, Lq] int32, d_tokens/d_mask [b*G, Ld] int32, doc_ids [b*G] int32,
        query_pos_ids [b, P] int32 (-1 padded), b = batch_size // process_count; and, when
        the training data carries teacher scores, teacher_scores [b, G] float32 (NaN where
        the teacher did not score that document). doc_ids / query_pos_ids are text
        identities (`TextIdentity`): documents of equal text carry one id."""
        return self._element(k)[0]

    def _element(self, k: int):
        g = self.global_batch(k)
        b, p = self.local_batch, self.process_index
        batch = self.slice(g, p * b, (p + 1) * b, g.q_len, g.d_len)
        ident = TextIdentity(g.d_rows, g.pos_ids, self._text_hash)
        batch["doc_ids"] = ident(batch["doc_ids"]).astype(np.int32)
        batch["query_pos_ids"] = ident(batch["query_pos_ids"]).astype(np.int32)
        stats = dict(g.stats, duplicate_texts=ident.duplicates)
        return batch, stats

    def slice(self, g: GlobalBatch, lo: int, hi: int, q_len: int, d_len: int) -> dict:
        """Queries lo..hi of global batch `g` and their documents, tokens padded to q_len /
        d_len; doc_ids [n*G] / query_pos_ids [n, P] int64 are document rows."""
        G = self.group_size
        q = g.q_rows[lo:hi]
        d = g.d_rows[lo * G:hi * G]
        q_tokens, q_mask = self.query_store.pad(q, q_len)
        d_tokens, d_mask = self.doc_store.pad(d, d_len)
        batch = {"q_tokens": q_tokens, "q_mask": q_mask, "d_tokens": d_tokens, "d_mask": d_mask,
                 "doc_ids": d.copy(), "query_pos_ids": g.pos_ids[lo:hi].copy()}
        if self._teacher is not None:
            # [n, G]: the teacher's score of each query's positive and negatives (NaN = none).
            rows = d.reshape(-1, G)
            batch["teacher_scores"] = np.array(
                [[self._teacher[qi].get(int(r), np.nan) for r in row]
                 for qi, row in zip(q.tolist(), rows)], np.float32).reshape(-1, G)
        return batch

    # -- state -------------------------------------------------------------------------------

    @property
    def has_teacher_scores(self) -> bool:
        return self._teacher is not None

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._start, "seed": self.seed,
                "batch_size": self.batch_size, "num_negatives": self.num_negatives,
                "num_queries": self.num_queries, "num_docs": self.num_docs,
                "strategy": self.strategy, "negative_mix": self.negative_mix,
                "curriculum": list(self.curriculum), "stats": self.stats}

    def set_state(self, state: dict) -> None:
        self.check_state(state)
        self._seek(state["step"], state.get("stats", {}))

    def check_state(self, state: dict) -> None:
        """Raise `NegjaxError` unless `state` (`get_state`) is of this pipeline's setup."""
        if state.get("version") != STATE_VERSION:
            raise NegjaxError(f"data iterator state version {state.get('version')!r}, expected "
                              f"{STATE_VERSION}")
        for key in ("seed", "batch_size", "num_negatives", "num_queries", "num_docs", "strategy"):
            if state.get(key) != getattr(self, key):
                raise NegjaxError(f"data iterator state is from a different setup: {key} "
                                  f"{state.get(key)!r} there, {getattr(self, key)!r} now")
        # (states saved before these options existed: mix 1, no curriculum)
        for key, now, default in (("negative_mix", self.negative_mix, 1.0),
                                  ("curriculum", list(self.curriculum), [0, 0])):
            if state.get(key, default) != now:
                raise NegjaxError(f"data iterator state is from a different setup: {key} "
                                  f"{state.get(key, default)!r} there, {now!r} now")


# ---------------------------------------------------------------------------------------------
# From a config
# ---------------------------------------------------------------------------------------------

def build_pipeline(cfg, tokenizer, *, negatives_dir: str | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   cache_dir=None, prompts: dict | None = None) -> Pipeline:
    """The training pipeline for a `negjax.config.Config`: reads the data, builds (or reuses)
    the token stores (once per host: `shared_token_stores`; collective in a multi-process
    job), loads and verifies hard-negative shards. `negatives_dir`: the shard
    directory in use (a re-mining round's, or a resumed run's); None = `data.negatives`.
    `prompts`: {"query", "doc"} put before the texts (`Encoder.prompts`; default: the config's
    `model.query_prompt` / `doc_prompt`), so training tokenises what encoding does."""
    d = cfg.data
    if negatives_dir is None:
        negatives_dir = d.negatives
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    cache = cache_dir or d.cache_dir or None
    if prompts is None:
        prompts = {"query": cfg.model.query_prompt, "doc": cfg.model.doc_prompt}
    paths = resolve_dataset(d, cache_dir)
    if paths["train"] is None:
        raise NegjaxError("no training data: set data.dataset or data.train")
    data = shared_token_stores(lambda: prepare_training(
        paths, tokenizer, doc_max_len=cfg.model.doc_max_len, query_max_len=cfg.model.query_max_len,
        prompts=prompts, cache_dir=cache), cache)
    examples, query_store, doc_store = data.examples, data.queries, data.docs
    if negatives_dir:
        negatives = load_negatives(negatives_dir, examples, data.corpus)
        if negatives.teacher is not None:  # mined with --teacher-scores: theirs win
            own = examples.teacher if examples.has_teacher_scores else [{}] * len(examples)
            examples = examples.with_teacher([{**o, **mined} for o, mined in
                                              zip(own, negatives.teacher)])
    else:
        negatives = examples.negative_lists()
    return Pipeline(examples=examples, query_store=query_store, doc_store=doc_store,
                    batch_size=cfg.train.batch_size, num_negatives=d.num_negatives,
                    negatives=negatives, seed=cfg.train.seed, strategy=d.negative_sampling,
                    max_positives=getattr(d, "max_positives", 32),
                    query_buckets=d.length_buckets, doc_buckets=d.length_buckets,
                    process_index=process_index, process_count=process_count,
                    prefetch=d.prefetch, threads=getattr(d, "prefetch_threads", 1),
                    negative_mix=d.negative_mix, curriculum_start_rank=d.curriculum_start_rank,
                    curriculum_steps=d.curriculum_steps)
