"""Many datasets in one run: `[[data.sources]]`, one source per global batch.

    sources = sources_of(cfg, enc.prompts)              # [Source]: one when no [[data.sources]]
    pipe = build_sources_pipeline(cfg, tok, sources)     # batches like `Pipeline`'s
    pipe.source_of_step(s)                               # the source of global batch s

Each source is a dataset of its own (any input format; its own corpus, token stores, prompts,
hard negatives, H and in-batch setting: `negjax.config.SourceConfig`) with its own
`Pipeline`. Global batch s is made of `data.sources_per_batch` = m sub-batches of
batch_size / m queries; sub-batch u = s*m + t comes from source `SourceSampler.sources(u)` and
is that source's next batch (its position = how often it was drawn before u), so with m = 1
(the default) every global batch comes from one source, on every process (each takes its
slice of the concatenated sub-batches, as with one source).

Sampling (`data.source_sampling`): 'proportional' p_j ~ weight_j x n_j (n_j = its training
queries), 'temperature' p_j ~ weight_j x n_j^alpha (`data.source_temperature`; 0 = weights
alone), 'round_robin' the sources in turn. The random modes are stratified: sub-batches come in
blocks of BLOCK, each block holds floor or ceil of BLOCK x p_j draws of source j (systematic
sampling with a random offset per block) in an order shuffled per block; both are hashes of
(seed, block), so the source of u and every source's position at u are pure functions, and
counts stay within one per block of their expectation.

Shapes are the same for every source (no recompilation): a source with fewer hard negatives
than the largest H fills its extra slots with masked columns (document id -2: `EMPTY`, in no
softmax, no gradient; tokens: a copy of the group's positive), fewer positive ids are padded
with -1. Document ids are offset per source (source j's row r is `base_j + r`) and then made
text identities over the whole global batch (`TextIdentity`), so equal texts of different
sources are masked like equal texts of one. `in_batch` [b] int32 (1/0) carries each query's
source's `in_batch_negatives` to the loss when some source turns them off.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np

from negjax.data.pipeline import STAT_KEYS, BatchIterator, Pipeline, build_pipeline
from negjax.data.sampling import TextIdentity, hash_u64
from negjax.errors import NegjaxError

STATE_VERSION = 1
BLOCK = 1024         # sub-batches per stratified block
_SOURCE = 11         # hash stream of the source draws
EMPTY_DOC = -2       # the loss's key of a masked column (`negjax.loss_blocks.EMPTY`)
SAMPLING = ("proportional", "temperature", "round_robin")


@dataclass(frozen=True)
class Source:
    """One dataset of a run: its name, its data keys (a `DataConfig`), the prompts put before
    its queries / documents, its weight and whether its in-batch documents are negatives."""
    name: str
    data: object
    prompts: dict
    weight: float = 1.0
    in_batch_negatives: bool = True


def sources_of(cfg, prompts: dict | None = None) -> list[Source]:
    """The run's sources: the `[[data.sources]]` tables, or the single dataset of `cfg.data`
    (named 'default'). `prompts`: the model's own {"query", "doc"} (`Encoder.prompts`), used
    where a source sets none (default: the config's model.query_prompt / doc_prompt)."""
    d = cfg.data
    if prompts is None:
        prompts = {"query": cfg.model.query_prompt, "doc": cfg.model.doc_prompt}
    if not d.sources:
        return [Source("default", d, dict(prompts))]
    out = []
    for src in d.sources:
        data = dataclasses.replace(
            d, dataset=src.dataset, corpus=src.corpus, train=src.train,
            train_qrels=src.train_qrels, dev_queries=src.dev_queries, dev_qrels=src.dev_qrels,
            negatives=src.negatives, sources=[],
            num_negatives=src.num_negatives if src.num_negatives >= 0 else d.num_negatives)
        out.append(Source(src.name, data, {"query": src.query_prompt or prompts.get("query", ""),
                                           "doc": src.doc_prompt or prompts.get("doc", "")},
                          float(src.weight), bool(src.in_batch_negatives)))
    return out


def any_without_in_batch(cfg) -> bool:
    """Whether some source turns in-batch negatives off (the batch then carries `in_batch`)."""
    return any(not s.in_batch_negatives for s in cfg.data.sources)


# ---------------------------------------------------------------------------------------------
# Which source each sub-batch comes from
# ---------------------------------------------------------------------------------------------

class SourceSampler:
    """The source of every sub-batch u (see the module docstring): `sources(start, stop)` and
    `counts_before(u)` (draws of each source among sub-batches 0..u-1), pure functions of
    (seed, u)."""

    def __init__(self, sizes, weights, mode: str, alpha: float, seed: int):
        if mode not in SAMPLING:
            raise NegjaxError(f"data.source_sampling {mode!r} is not one of {list(SAMPLING)}")
        sizes = np.asarray(sizes, np.float64)
        weights = np.asarray(weights, np.float64)
        self.mode, self.seed, self.n = mode, int(seed), len(sizes)
        if mode == "round_robin":
            p = np.full(self.n, 1.0 / self.n)
        else:
            p = weights * sizes ** (1.0 if mode == "proportional" else float(alpha))
            p = p / p.sum()
        self.probabilities = p
        self._edges = np.concatenate([[0.0], np.cumsum(p)])
        self._edges[-1] = 1.0
        self._block_cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _offsets(self, blocks: np.ndarray) -> np.ndarray:
        return (hash_u64(self.seed, _SOURCE, blocks) >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    def _block_counts(self, blocks: np.ndarray) -> np.ndarray:
        """[len(blocks), n] draws of each source in each block: points (i + r) / BLOCK,
        i < BLOCK, that fall in [edge_j, edge_j+1)."""
        r = self._offsets(blocks)[:, None]
        below = np.ceil(BLOCK * self._edges[None, :] - r)
        below = np.clip(below, 0, BLOCK)
        return np.diff(below, axis=1).astype(np.int64)

    def _block(self, c: int) -> np.ndarray:
        """[BLOCK] the sources of block c's sub-batches, in order."""
        with self._lock:
            got = self._block_cache.get(c)
            if got is None:
                counts = self._block_counts(np.array([c]))[0]
                draws = np.repeat(np.arange(self.n), counts)
                order = np.argsort(hash_u64(self.seed, _SOURCE, c, np.arange(BLOCK)), kind="stable")
                got = draws[order]
                self._block_cache = {c: got, **{k: v for k, v in self._block_cache.items()
                                                if k == c - 1}}
            return got

    def sources(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] int64: the source of each sub-batch start..stop-1."""
        u = np.arange(int(start), int(stop))
        if self.mode == "round_robin":
            return u % self.n
        out = np.empty(len(u), np.int64)
        for c in np.unique(u // BLOCK):
            sel = (u // BLOCK) == c
            out[sel] = self._block(int(c))[u[sel] % BLOCK]
        return out

    def counts_before(self, u: int) -> np.ndarray:
        """[n] int64: how many of sub-batches 0..u-1 each source was drawn for."""
        u = int(u)
        if self.mode == "round_robin":
            return np.array([(u - j + self.n - 1) // self.n for j in range(self.n)], np.int64)
        full, rest = divmod(u, BLOCK)
        counts = np.zeros(self.n, np.int64)
        for lo in range(0, full, 1 << 16):  # bounded memory for very long runs
            counts += self._block_counts(np.arange(lo, min(full, lo + (1 << 16)))).sum(axis=0)
        if rest:
            counts += np.bincount(self._block(full)[:rest], minlength=self.n)
        return counts


# ---------------------------------------------------------------------------------------------
# The batches
# ---------------------------------------------------------------------------------------------

class _Hashes:
    """Text hashes by global document id (source j's row r is id base_j + r)."""

    def __init__(self, stores, bases):
        self.stores, self.bases = stores, np.asarray(bases, np.int64)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        src = np.searchsorted(self.bases, ids, side="right") - 1
        out = np.zeros(ids.shape, np.uint64)
        for j in np.unique(src):
            sel = src == j
            out[sel] = self.stores[j].hash_rows[ids[sel] - self.bases[j]]
        return out


class SourcesPipeline(BatchIterator):
    """Batches over several sources (see the module docstring); the interface of `Pipeline`
    (`next`, `batch(k)`, `get_state` / `set_state`, `stats`, `group_size`, `close`).

    pipes: one `Pipeline` per source, each of batch_size // per_batch queries (built for one
    process: this class takes the process' slice)."""

    def __init__(self, pipes: list[Pipeline], sources: list[Source], *, batch_size: int,
                 seed: int = 0, sampling: str = "proportional", temperature: float = 1.0,
                 per_batch: int = 1, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 4, threads: int = 1):
        if len(pipes) != len(sources) or not pipes:
            raise ValueError("one pipeline per source")
        if batch_size % per_batch:
            raise NegjaxError(f"train.batch_size {batch_size} is not divisible by "
                              f"data.sources_per_batch {per_batch}")
        if batch_size % process_count:
            raise NegjaxError(f"global batch size {batch_size} is not divisible by the "
                              f"{process_count} processes")
        self.pipes, self.sources = pipes, sources
        self.batch_size, self.per_batch, self.sub = batch_size, per_batch, batch_size // per_batch
        for p in pipes:
            if p.batch_size != self.sub:
                raise ValueError("each source's pipeline must take batch_size // per_batch queries")
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = batch_size // process_count
        self.group_size = max(p.group_size for p in pipes)
        self.num_negatives = self.group_size - 1
        self.num_positives = max(p.num_positives for p in pipes)
        self.bases = np.concatenate([[0], np.cumsum([p.num_docs for p in pipes])[:-1]]).astype(np.int64)
        self._hashes = _Hashes([p.doc_store for p in pipes], self.bases)
        self._teacher = any(p.has_teacher_scores for p in pipes)
        self._with_in_batch = not all(s.in_batch_negatives for s in sources)
        sizes = [p.num_queries for p in pipes]
        self.sampler = SourceSampler(sizes, [s.weight for s in sources], sampling, temperature, seed)
        self.sampling, self.temperature = sampling, float(temperature)
        self.query_buckets, self.doc_buckets = pipes[0].query_buckets, pipes[0].doc_buckets
        self.info = {
            "sources": [{"name": s.name, "queries": p.num_queries, "documents": p.num_docs,
                         "weight": s.weight, "probability": float(pr),
                         "negatives": p.num_negatives,
                         "in_batch_negatives": s.in_batch_negatives,
                         "negatives_source": p.info["negatives_source"]}
                        for s, p, pr in zip(sources, pipes, self.sampler.probabilities)],
            "group_size": self.group_size, "num_positives": self.num_positives,
            "sources_per_batch": per_batch, "sampling": sampling,
        }
        self._prefetch, self._threads = int(prefetch), int(threads)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._iter, self._start = None, 0

    def maps(self) -> list:
        return [m for pipe in self.pipes for m in pipe.maps()]

    @property
    def has_teacher_scores(self) -> bool:
        return self._teacher

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source_of_step(self, s: int) -> list[int]:
        """The source index of each sub-batch of global batch s (one with per_batch = 1)."""
        m = self.per_batch
        return self.sampler.sources(s * m, (s + 1) * m).tolist()

    def positions(self, s: int) -> dict:
        """{source name: batches of it taken before global batch s} (the state's record)."""
        counts = self.sampler.counts_before(s * self.per_batch)
        return {n: int(c) for n, c in zip(self.names, counts)}

    def batch(self, k: int) -> dict:
        """This process' slice of global batch k, as `Pipeline.batch`, with G and P the largest
        of the sources' (padding masked) and, when some source turns in-batch negatives off,
        in_batch [b] int32."""
        return self._element(k)[0]

    def _element(self, k: int):
        m, sub = self.per_batch, self.sub
        u0 = int(k) * m
        srcs = self.sampler.sources(u0, u0 + m)
        pos = self.sampler.counts_before(u0)
        drawn = []
        for j in srcs.tolist():
            drawn.append((j, self.pipes[j].global_batch(int(pos[j]))))
            pos[j] += 1
        q_len = max(g.q_len for _, g in drawn)
        d_len = max(g.d_len for _, g in drawn)
        lo, hi = self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch
        parts = []
        for t, (j, g) in enumerate(drawn):
            a, z = max(lo, t * sub), min(hi, (t + 1) * sub)
            if a < z:
                part = self.pipes[j].slice(g, a - t * sub, z - t * sub, q_len, d_len)
                parts.append(self._widen(part, j))
        batch = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        # Text identity over the whole global batch (every source's documents and positives).
        all_docs = np.concatenate([self.bases[j] + g.d_rows for j, g in drawn])
        all_pos = np.concatenate([np.where(g.pos_ids >= 0, self.bases[j] + g.pos_ids, -1).ravel()
                                  for j, g in drawn])
        ident = TextIdentity(all_docs, all_pos, self._hashes)
        batch["doc_ids"] = ident(batch["doc_ids"]).astype(np.int32)
        batch["query_pos_ids"] = ident(batch["query_pos_ids"]).astype(np.int32)
        stats = dict.fromkeys(STAT_KEYS, 0)
        for j, g in drawn:
            for key, v in g.stats.items():
                stats[key] += v
            name = f"batches_{self.sources[j].name}"
            stats[name] = stats.get(name, 0) + 1
        stats["batches"] = 1
        stats["duplicate_texts"] = ident.duplicates
        stats["masked_slots"] = int(sum(
            g.d_rows.size // self.pipes[j].group_size * (self.group_size - self.pipes[j].group_size)
            for j, g in drawn))
        return batch, stats

    def _widen(self, part: dict, j: int) -> dict:
        """A source's slice with G, P and teacher scores of the run's shapes, doc ids global."""
        Gj, G, P = self.pipes[j].group_size, self.group_size, self.num_positives
        n = part["q_tokens"].shape[0]
        ids = (self.bases[j] + part["doc_ids"]).reshape(n, Gj)
        pos = part["query_pos_ids"]
        pos = np.where(pos >= 0, self.bases[j] + pos, -1)
        out = {"q_tokens": part["q_tokens"], "q_mask": part["q_mask"]}
        if Gj < G:
            # Masked slots: the group's positive's tokens under the id the loss ignores.
            for key in ("d_tokens", "d_mask"):
                x = part[key].reshape(n, Gj, -1)
                fill = np.repeat(x[:, :1], G - Gj, axis=1)
                out[key] = np.concatenate([x, fill], axis=1).reshape(n * G, -1)
            ids = np.concatenate([ids, np.full((n, G - Gj), EMPTY_DOC, np.int64)], axis=1)
        else:
            out["d_tokens"], out["d_mask"] = part["d_tokens"], part["d_mask"]
        out["doc_ids"] = ids.reshape(n * G)
        out["query_pos_ids"] = np.concatenate(
            [pos, np.full((n, P - pos.shape[1]), -1, np.int64)], axis=1)
        if self._teacher:
            t = part.get("teacher_scores", np.full((n, Gj), np.nan, np.float32))
            out["teacher_scores"] = np.concatenate(
                [t, np.full((n, G - Gj), np.nan, np.float32)], axis=1).astype(np.float32)
        if self._with_in_batch:
            out["in_batch"] = np.full((n,), int(self.sources[j].in_batch_negatives), np.int32)
        return out

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": "sources", "step": self._start,
                "seed": self.seed, "batch_size": self.batch_size,
                "sources_per_batch": self.per_batch, "sampling": self.sampling,
                "temperature": self.temperature,
                "sources": [{"name": s.name, "weight": s.weight, "position": n,
                             "setup": {k: v for k, v in p.get_state().items()
                                       if k not in ("step", "stats")}}
                            for s, p, n in zip(self.sources, self.pipes,
                                               self.positions(self._start).values())],
                "stats": self.stats}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "sources":
            raise NegjaxError("data iterator state is of a single-dataset run; this run has "
                              f"[[data.sources]] ({', '.join(self.names)}): train in a new workdir")
        if state.get("version") != STATE_VERSION:
            raise NegjaxError(f"data iterator state version {state.get('version')!r}, expected "
                              f"{STATE_VERSION}")
        for key, now in (("seed", self.seed), ("batch_size", self.batch_size),
                         ("sources_per_batch", self.per_batch), ("sampling", self.sampling),
                         ("temperature", self.temperature)):
            if state.get(key) != now:
                raise NegjaxError(f"data iterator state is from a different setup: {key} "
                                  f"{state.get(key)!r} there, {now!r} now")
        then = [(s["name"], s["weight"]) for s in state["sources"]]
        now = [(s.name, s.weight) for s in self.sources]
        if then != now:
            raise NegjaxError(f"data iterator state is from other sources: {then} there, {now} now")
        for s, p in zip(state["sources"], self.pipes):
            p.check_state(s["setup"])
        self._seek(state["step"], state.get("stats", {}))
        got = self.positions(self._start)
        want = {s["name"]: s["position"] for s in state["sources"]}
        if got != want:  # the sampler itself changed
            raise NegjaxError(f"data iterator state: source positions {want} there, {got} now")

    def close(self) -> None:
        super().close()
        for p in self.pipes:
            p.close()


def build_sources_pipeline(cfg, tokenizer, sources: list[Source], *, negatives_dirs=None,
                           process_index: int | None = None, process_count: int | None = None,
                           cache_dir=None) -> SourcesPipeline:
    """The training batches of a multi-source config: one `Pipeline` per source (its token
    stores built once per host, collectively, source by source), combined.
    `negatives_dirs`: {source name: shard directory in use} (re-mined rounds, resumed runs);
    a source not in it uses its `negatives` key."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    m = cfg.data.sources_per_batch
    if cfg.train.batch_size % m:
        raise NegjaxError(f"train.batch_size {cfg.train.batch_size} is not divisible by "
                          f"data.sources_per_batch {m}")
    pipes = []
    try:
        for src in sources:
            one = dataclasses.replace(cfg, data=src.data, train=dataclasses.replace(
                cfg.train, batch_size=cfg.train.batch_size // m))
            neg = (negatives_dirs or {}).get(src.name)
            try:
                pipes.append(build_pipeline(one, tokenizer, negatives_dir=neg, process_index=0,
                                            process_count=1, cache_dir=cache_dir,
                                            prompts=src.prompts))
            except NegjaxError as e:
                raise NegjaxError(f"data source {src.name!r}: {e}") from None
    except BaseException:
        for p in pipes:
            p.close()
        raise
    d = cfg.data
    return SourcesPipeline(pipes, sources, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                           sampling=d.source_sampling, temperature=d.source_temperature,
                           per_batch=m, process_index=process_index, process_count=process_count,
                           prefetch=d.prefetch, threads=d.prefetch_threads)
