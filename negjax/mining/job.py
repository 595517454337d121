"""The mining job: encode -> index -> search -> filter -> sample -> shards + manifest + report.

    from negjax.mining.job import run_mining
    from negjax.model.loader import load_model
    enc, params, info = load_model("minilm")
    manifest = run_mining(enc, params, corpus_path="corpus.jsonl", train_path="train.jsonl",
                          out_dir="negatives", mining_cfg=cfg.mining, query_max_len=32,
                          doc_max_len=128, model_info=info)

The pieces: `negjax.mining.embeddings` (the embedding cache), `negjax.search` (exact and
ScaNN search, ScaNN settings, tuning and audit), `negjax.mining.filters` (false-negative
filters and sampling), `negjax.data.shards` (the output format); this module orchestrates.

Called collectively by every process of a (possibly multi-process) JAX job on a shared
filesystem. The corpus is cut into one contiguous, chunk-aligned shard per process
(`negjax.search.sharded.shard_bounds`, recorded in the manifest's `index.sharding`): process p
encodes, indexes and searches only its shard, so no process holds the corpus' embeddings or
index; every process searches all queries against its shard, and the per-shard top-k are
merged into the global top-k before the filters and sampling run once per query. With exact
search the rows do not depend on the number of processes. Everything it computes is kept
under `OUT/.work/` so that a rerun after a crash (even `kill -9`) redoes only what is missing:

- `emb/{doc,query}-KEY/chunk-NNNNN.npy`: embeddings of `encode_chunk` texts each, read from
  disk on demand (`negjax.mining.embeddings.EmbeddingStore`); KEY hashes the model
  (architecture, tokenizer, a fingerprint of the params of the tower), the input file's sha256
  (`negjax.data.records.input_digest`: hashed once per host, remembered by fingerprint),
  the max length and the stored dtype (`mining.embedding_dtype`; queries are float32).
  Process p encodes the document chunks of its shard and the query chunks c with c % P == p.
- `index-KEY/shard-PPP/`: process p's ScaNN index over its shard, saved before any candidate is
  written (ScaNN's tree training is not bit-reproducible; a resumed run searches that one).
- `tune-KEY.json`: per shard, the search-time settings (leaves_to_search, reorder) that reached
  `target_recall` against exact search over the shard on a sample of queries.
- `cand-KEY/`: `qSSSSS-pPPP.npz`, the candidates of query shard S in corpus shard P (ids, search
  and exact scores), `shard-PPP.json` (bounds, max norm, ScaNN settings and tuning) and the
  audit parts; removed once the manifest is written.
- `run.json`: the key of everything that decides the shard rows (embeddings, index, filters,
  sampling, shard size). Shards of another key are discarded (an unfinished run) or refused
  (a finished one, unless `overwrite`).
- `stats/shard-NNNNN.npz`: the counts and histograms of shard k, written before the shard, so
  the report of a resumed run covers every shard.

Output shard k holds queries [k*S, (k+1)*S) in training-file order and is merged and written
by process k % P. Every random choice depends on (seed, global query index), and an embedding
does not depend on which process encodes it (a fixed per-device batch of `encode_batch_size` /
all devices of the job), so a resumed run and a multi-process run write the rows a single
uninterrupted run on as many devices writes. Process 0 merges the recall audit (sharded ScaNN
against sharded exact search over the whole corpus), writes the report and, last, the
manifest. A process that is lost stops the others within NEGJAX_PEER_TIMEOUT seconds
(`negjax.multihost.Watchdog`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

from negjax.data import shards as shard_io
from negjax.data.prepared import prepare_training, shared_token_stores
from negjax.data.records import input_digest
from negjax.distributed import barrier
from negjax.errors import NegjaxError
from negjax.mining import report as report_mod
from negjax.mining.block import load_stats, mine_block, save_stats
from negjax.mining.embeddings import EMBEDDING_DTYPES, encode_chunked, model_identity, params_fingerprint
from negjax.multihost import Watchdog
from negjax.mining.filters import FILTER_ORDER, SAMPLING, FilterSettings, hash_groups
from negjax.search import (ScannIndex, audit_recall, describe, query_samples, scann_settings,
                           tunable_settings, tune_search)
from negjax.search.tuning import recall_summary
from negjax.search.sharded import (load_candidates, merge_candidates, merge_ids, save_candidates,
                                   shard_bounds, shard_candidates)
from negjax.utils import atomic_write_text, log, progress

WORK = ".work"
JOB_VERSION = 1


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _barrier(name: str) -> None:
    barrier(f"mine-{name}")


def _log(msg: str) -> None:
    log(f"[mine] {msg}")


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def _check_cfg(mc, shard_size: int) -> None:
    if mc.embedding_dtype not in EMBEDDING_DTYPES:
        raise NegjaxError(f"mining.embedding_dtype {mc.embedding_dtype!r}: expected one of "
                          f"{list(EMBEDDING_DTYPES)}")
    if mc.index not in ("scann", "exact"):
        raise NegjaxError(f"mining.index {mc.index!r}: expected 'scann' or 'exact'")
    if not 0 <= mc.target_recall <= 1:
        raise NegjaxError(f"mining.target_recall must be in [0, 1], got {mc.target_recall}")
    if mc.sampling not in SAMPLING:
        raise NegjaxError(f"mining.sampling {mc.sampling!r}: expected one of {list(SAMPLING)}")
    minimum = {"shard_size": 1, "encode_chunk": 1, "encode_batch_size": 1, "k": 0,
               "negatives_kept": 0,
               "audit_queries": 0, "num_leaves": 0, "leaves_to_search": 0, "reorder": 0}
    for key, low in minimum.items():
        value = shard_size if key == "shard_size" else getattr(mc, key)
        if value < low:
            raise NegjaxError(f"mining.{key} must be >= {low}, got {value}")


def _score_edges(q_norm: float, d_norm: float, bins: int = 200) -> np.ndarray:
    """Histogram bin edges covering every possible score |q.d| <= max|q| max|d| (±1 for
    normalised embeddings); a function of the embeddings, so equal in every process and rerun."""
    bound = math.ceil(max(float(q_norm) * float(d_norm), 1e-6) * 1.0001 * 100) / 100
    return np.linspace(-bound, bound, bins + 1)


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_once(path: Path, make) -> dict:
    """`path`'s JSON if a complete one is there (a resumed run), else `make()` written
    atomically."""
    got = _read_json_or_none(path)
    if got is None:
        got = make()
        atomic_write_text(path, json.dumps(got, indent=1) + "\n")
    return got


def _cand_path(cand_dir: Path, s: int, p: int) -> Path:
    """Candidates of query shard `s` in the corpus shard of process `p`."""
    return cand_dir / f"q{s:05d}-p{p:03d}.npz"


def _shard_index(docs, k: int, sp, directory: Path):
    """The ScaNN index over this process's corpus shard `docs` (read into memory only to build
    it), built and saved once (ScaNN's tree training is not bit-reproducible, so every resumed
    run searches that saved index) and loaded from disk."""
    build_s = 0.0
    if not (directory / "negjax_index.json").is_file():
        _log(f"building ScaNN index over {len(docs):,} documents"
             f"{' per shard' if jax.process_count() > 1 else ''} ({describe(sp)})")
        t = time.perf_counter()
        ScannIndex.build(docs[0:len(docs)], k, sp).save(directory)
        build_s = time.perf_counter() - t
    return ScannIndex.load(directory), build_s


def _audit_part(path: Path, queries: np.ndarray, docs, lo: int, k: int, index) -> None:
    """This shard's share of the recall audit: its exact and its ScaNN top-k for the audit
    queries, with the time each took (merged by process 0 into recall over the whole corpus)."""
    if load_candidates(path.with_suffix(".exact.npz")) is not None and path.is_file():
        return
    t = time.perf_counter()
    exact = shard_candidates(queries, docs, lo, k, None)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    approx = shard_candidates(queries, docs, lo, k, index)
    approx_s = time.perf_counter() - t
    save_candidates(path.with_suffix(".exact.npz"), exact)
    save_candidates(path, approx, seconds=np.array([exact_s, approx_s]))


def _merge_audit(cand_dir: Path, pc: int, k: int, n: int) -> dict:
    """Recall@k (and @100) over the whole corpus of the sharded ScaNN search against the
    sharded exact search, from every process's audit part. The searches ran in parallel, so
    a rate is audit queries / the slowest process's time."""
    if n == 0:
        return {"queries": 0, "recall_at_k": None, "note": "audit disabled (audit_queries = 0)"}
    exact, approx, secs = [], [], []
    for p in range(pc):
        path = cand_dir / f"audit-p{p:03d}.npz"
        if not path.is_file():
            continue  # a process whose shard is empty
        exact.append(load_candidates(path.with_suffix(".exact.npz")))
        approx.append(load_candidates(path))
        with np.load(path) as z:
            secs.append(z["seconds"])
    exact_ids = merge_ids(exact, k)
    approx_ids = merge_ids(approx, k)
    secs = np.max(np.array(secs), axis=0)
    return {**recall_summary(approx_ids, exact_ids, float(secs[0]), float(secs[1])), "shards": pc}


def _exact_advice(shard_info: list[dict]) -> str | None:
    """A note when tuning needed more than half of some shard's ScaNN leaves: a search that
    visits most leaves costs about as much as exact search, which is then the better choice."""
    heavy = [(p, x["tuning"]["leaves_to_search"], x["scann"]["num_leaves"])
             for p, x in enumerate(shard_info)
             if x.get("tuning") and x["scann"] and x["scann"]["num_leaves"]
             and x["tuning"]["leaves_to_search"] > x["scann"]["num_leaves"] / 2]
    if not heavy:
        return None
    p, used, leaves = heavy[0]
    return (f"ScaNN needed {used} of {leaves} leaves (shard {p}) to reach the target recall: "
            "it searches most of the corpus, so exact search (--index exact) costs about the "
            "same and has recall 1")


def run_mining(*args, **kwargs) -> dict:
    """Mine hard negatives for every training query into `out_dir` (shards + manifest.json +
    report.json/report.png); returns the manifest. Collective over all processes: a process
    that is lost ends the others within NEGJAX_PEER_TIMEOUT seconds (`multihost.Watchdog`).
    Arguments: see `_run_mining`."""
    with Watchdog("mine"):
        return _run_mining(*args, **kwargs)


def _run_mining(enc, params, *, corpus_path, train_path, out_dir, mining_cfg, query_max_len: int,
               doc_max_len: int, model_info: dict | None = None, train_qrels=None,
               overwrite: bool = False, teacher_scores=None, cache_dir=None) -> dict:
    """The mining job (`run_mining`).

    `params`: encoder params in `enc`'s tower layout (queries use tower 'query', documents
    'doc'). `corpus_path` None: the training file carries inline texts.
    A rerun resumes; a finished directory mined with the same settings is returned as is; one
    mined with other settings is refused unless `overwrite`. `teacher_scores`: a file of a
    teacher's (query, document) scores (`read_teacher_scores`); the shards then carry the
    teacher's score of every positive and negative they list (NaN where it gave none).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    mc = mining_cfg
    shard_size = mc.shard_size
    _check_cfg(mc, shard_size)
    settings = FilterSettings.from_config(mc)
    pi, pc = jax.process_index(), jax.process_count()
    out = Path(out_dir)
    work = out / WORK
    model_info = dict(model_info or {"path": enc.source, "step": None})

    # -- inputs and keys -------------------------------------------------------------------
    # The corpus and training queries as token stores (built once per host, or found by the
    # inputs' fingerprints): no process holds their texts; each encodes its own rows.
    paths = {"train": Path(train_path), "corpus": Path(corpus_path) if corpus_path else None,
             "train_qrels": Path(train_qrels) if train_qrels else None}
    # The inputs' sha256s (the job's identity) are hashed once per host too, then remembered
    # by fingerprint: a rerun, and every other process, reads no input bytes.
    digest_of = {"corpus": corpus_path or train_path, "train": train_path,
                 "train_qrels": train_qrels, "teacher": teacher_scores}

    def prepare():
        prepared = prepare_training(paths, enc.tokenizer, doc_max_len=doc_max_len,
                                    query_max_len=query_max_len, prompts=enc.prompts,
                                    cache_dir=cache_dir)
        return prepared, {name: input_digest(p, cache_dir) if p else None
                          for name, p in digest_of.items()}

    data, digests = shared_token_stores(prepare, cache_dir)
    corpus, examples = data.corpus, data.examples
    n_docs, nq = len(corpus), len(examples)
    max_pos = int(examples.positive_lists().counts().max()) if nq else 0
    k = min(mc.k or 100 + max_pos, n_docs)
    if settings.rank_min > k:
        raise NegjaxError(f"rank range {settings.rank_min}:... starts beyond the {k} candidates "
                          "retrieved; raise mining.k (--k)")
    ident = model_identity(enc)
    fp_doc = params_fingerprint(enc, params, "doc")
    fp_query = fp_doc if enc.tied_towers else params_fingerprint(enc, params, "query")
    corpus_sha, train_sha = digests["corpus"], digests["train"]
    if train_qrels:
        train_sha = _hash([train_sha, digests["train_qrels"]])
    teacher, teacher_sha = None, digests["teacher"]
    if teacher_scores:
        from negjax.data.readers import read_teacher_scores

        teacher = read_teacher_scores(teacher_scores)
    dtype = mc.embedding_dtype
    doc_key32 = _hash({"model": ident, "params": fp_doc, "input": corpus_sha, "n": n_docs,
                       "max_length": doc_max_len, "chunk": mc.encode_chunk, "tower": "doc"})
    doc_key = doc_key32 if dtype == "float32" else _hash([doc_key32, dtype])
    query_key = _hash({"model": ident, "params": fp_query, "input": train_sha, "n": nq,
                       "max_length": query_max_len, "chunk": mc.encode_chunk, "tower": "query"})
    # The corpus is cut into one contiguous shard per process (chunk-aligned): each process
    # encodes, indexes and searches only its own shard (negjax.search.sharded).
    bounds = shard_bounds(n_docs, mc.encode_chunk, pc)
    shard_sp = ([scann_settings(hi - lo, enc.dim, min(k, hi - lo), num_leaves=mc.num_leaves,
                                leaves_to_search=mc.leaves_to_search, reorder=mc.reorder)
                 if hi > lo else None for lo, hi in bounds] if mc.index == "scann" else None)
    sp = shard_sp[0] if shard_sp else None
    # Exact search gives the same rows for any number of shards, so its key ignores them.
    index_key = _hash({"doc": doc_key, "index": mc.index, "k": k,
                       **({"shards": bounds, "params": [asdict(x) if x else None
                                                        for x in shard_sp]} if shard_sp else {})})
    filters_info = {**settings.to_dict(), "order": list(FILTER_ORDER),
                    "num_negatives": mc.negatives_kept, "sampling": mc.sampling, "seed": mc.seed}
    run_key = _hash({"version": JOB_VERSION, "doc": doc_key, "query": query_key,
                     "index": index_key, "filters": filters_info, "shard_size": shard_size,
                     "target_recall": mc.target_recall if sp is not None else None,
                     "audit": [mc.audit_queries, mc.seed],
                     "corpus_ids": corpus_sha, "train": train_sha,
                     **({"teacher": teacher_sha} if teacher_sha else {})})

    # -- resume / refuse / start fresh (every process decides alike, then process 0 acts) ---
    run_file = work / "run.json"
    previous = _read_json_or_none(run_file) or {}
    finished = (out / shard_io.MANIFEST).is_file()
    same = previous.get("key") == run_key
    if finished and same and not overwrite:
        manifest = shard_io.verify(out)
        _log(f"{out}: already mined with these settings; nothing to do")
        return manifest
    if finished and not same and not overwrite:
        raise NegjaxError(f"{out}: already holds hard negatives mined with other settings (model, "
                          "data, index, filters or sampling); choose another output directory or "
                          "pass --overwrite")
    fresh = overwrite or not same
    _barrier("start")
    if pi == 0 and fresh:
        if previous and not finished:
            _log(f"{out}: discarding an unfinished run with other settings")
        shard_io.ShardWriter(out, overwrite=True)  # removes the old manifest and shards
        for stale in list((work / "stats").glob("*.npz")) if (work / "stats").is_dir() else []:
            stale.unlink()
        for name in ("report.json", "report.png"):
            (out / name).unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps({"key": run_key, "doc_key": doc_key,
                                                "query_key": query_key, "index_key": index_key,
                                                "model": model_info, "filters": filters_info,
                                                "shard_size": shard_size}, indent=1) + "\n")
    elif pi == 0:
        _log(f"{out}: resuming an unfinished run")
    _barrier("prepared")

    # -- encode ------------------------------------------------------------------------------
    lo_p, hi_p = bounds[pi]
    _log(f"encoding {n_docs:,} documents ({dtype}) and {nq:,} queries ({pc} process(es), "
         f"{jax.local_device_count()} local device(s) each"
         + (f"; documents in {pc} shards, this process {lo_p:,}..{hi_p:,}" if pc > 1 else "") + ")")
    chunk = mc.encode_chunk
    my_doc_chunks = [(c, c * chunk, min(n_docs, (c + 1) * chunk))
                     for c in range(lo_p // chunk, -(-hi_p // chunk))] if hi_p > lo_p else []
    enc_info = {}
    t = time.perf_counter()
    doc_store, enc_info["doc"] = encode_chunked(
        enc, params, data.docs, tower="doc", max_length=doc_max_len,
        batch_size=mc.encode_batch_size, chunk=chunk, stage="doc", dtype=dtype,
        directory=work / "emb" / f"doc-{doc_key[:16]}", chunks=my_doc_chunks,
        source=work / "emb" / f"doc-{doc_key32[:16]}" if dtype != "float32" else None)
    timings["encode_docs_s"] = time.perf_counter() - t
    t = time.perf_counter()
    q_store, enc_info["query"] = encode_chunked(
        enc, params, data.queries, tower="query", max_length=query_max_len,
        batch_size=mc.encode_batch_size, chunk=chunk, stage="query",
        directory=work / "emb" / f"query-{query_key[:16]}")
    timings["encode_queries_s"] = time.perf_counter() - t
    my_docs = doc_store.rows_between(lo_p, hi_p)
    k_p = min(k, hi_p - lo_p)

    # -- this process's shard: index, tuning ---------------------------------------------------
    cand_dir = work / f"cand-{_hash([index_key, query_key, bounds, shard_size])[:16]}"
    cand_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    index, build_s, tuning = None, 0.0, None
    audit_sample, tune_sample = query_samples(nq, mc.audit_queries, mc.seed)
    if shard_sp and k_p:
        index, build_s = _shard_index(my_docs, k_p, shard_sp[pi],
                                      work / f"index-{index_key[:16]}" / f"shard-{pi:03d}")
        timings["index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tunable = tunable_settings(leaves_to_search=mc.leaves_to_search, reorder=mc.reorder)
        if (not index.params.brute_force and mc.target_recall > 0 and len(tune_sample)
                and tunable):
            tune_key = _hash([index_key, query_key, pi, mc.target_recall, mc.audit_queries,
                              mc.seed, sorted(tunable)])
            tune_file = work / f"tune-{tune_key[:16]}.json"
            tuning = _read_json_or_none(tune_file)
            if tuning is None:
                tuning = tune_search(index, q_store[tune_sample], my_docs, k_p,
                                     np.arange(len(tune_sample)), mc.target_recall, tunable)
                tuning["disjoint_from_audit"] = tune_sample is not audit_sample
                atomic_write_text(tune_file, json.dumps(tuning, indent=1) + "\n")
            index.params.leaves_to_search = tuning["leaves_to_search"]
            index.params.reorder = tuning["reorder"]
            _log(f"ScaNN search settings for recall@{k_p} >= {mc.target_recall}"
                 f"{' (shard 0)' if pc > 1 else ''}: leaves_to_search "
                 f"{tuning['leaves_to_search']} of {index.params.num_leaves}, reorder "
                 f"{tuning['reorder']} (recall {tuning['steps'][-1]['recall_at_k']:.4f} on "
                 f"{tuning['queries']} queries)")
        timings["tune_s"] = time.perf_counter() - t
    scann_info = asdict(index.params) if index is not None else None
    _write_json_once(cand_dir / f"shard-{pi:03d}.json", lambda: {
        "lo": lo_p, "hi": hi_p, "max_norm": my_docs.max_norm(), "build_s": build_s,
        "scann": scann_info, "tuning": tuning})

    # -- search: every query against this shard ------------------------------------------------
    t = time.perf_counter()
    writer = shard_io.ShardWriter(out)
    done = writer.completed()
    stats_dir = work / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(nq / shard_size))
    finished_shards = {s for s in done if (stats_dir / f"shard-{s:05d}.npz").is_file()}
    search_todo = [s for s in range(n_shards) if s not in finished_shards
                   and load_candidates(_cand_path(cand_dir, s, pi)) is None]
    bar = progress(total=sum(min(nq, (s + 1) * shard_size) - s * shard_size for s in search_todo),
                   desc="search", unit="q", disable=None if pi == 0 else True)
    for s in search_todo:
        lo, hi = s * shard_size, min(nq, (s + 1) * shard_size)
        save_candidates(_cand_path(cand_dir, s, pi),
                        shard_candidates(q_store[lo:hi], my_docs, lo_p, k_p, index))
        bar.update(hi - lo)
    bar.close()
    timings["search_s"] = time.perf_counter() - t
    if index is not None and len(audit_sample):
        _audit_part(cand_dir / f"audit-p{pi:03d}.npz", q_store[audit_sample], my_docs, lo_p,
                    k_p, index)
    index = None  # the shard's index is not needed past this point
    _barrier("search")

    # -- merge, filter, sample, write: shard s by process s % P --------------------------------
    t = time.perf_counter()
    shard_info = [json.loads((cand_dir / f"shard-{p:03d}.json").read_text()) for p in range(pc)]
    groups = hash_groups(data.docs.text_hash) if settings.dedup_text else None
    edges = _score_edges(q_store.max_norm(), max(x["max_norm"] for x in shard_info))
    mine_ids = list(range(pi, n_shards, pc))
    todo = [s for s in mine_ids if s not in finished_shards]
    bar = progress(total=sum(min(nq, (s + 1) * shard_size) - s * shard_size for s in todo),
                   desc="mine", unit="q", disable=None if pi == 0 else True)
    for s in todo:
        lo, hi = s * shard_size, min(nq, (s + 1) * shard_size)
        parts = []
        for p in range(pc):
            part = load_candidates(_cand_path(cand_dir, s, p), hi - lo)
            if part is None:
                raise NegjaxError(f"{_cand_path(cand_dir, s, p)}: candidates of process {p} "
                                  "missing or damaged after the search (did it fail?)")
            parts.append(part)
        ids, scores = merge_candidates(parts, k)
        cols, stats = mine_block(q_store[lo:hi], doc_store, ids, scores,
                                 examples.positives[lo:hi], np.arange(lo, hi), k=k,
                                 settings=settings, groups=groups,
                                 num_negatives=mc.negatives_kept, sampling=mc.sampling,
                                 seed=mc.seed, edges=edges)
        save_stats(stats_dir / f"shard-{s:05d}.npz", stats, edges)
        cid = corpus.ids
        pos_ids = [[cid[r] for r in p] for p in examples.positives[lo:hi]]
        neg_ids = [[cid[r] for r in rows] for rows in cols["negative_rows"]]
        extra = {}
        if teacher is not None:
            qids = examples.query_ids[lo:hi]
            nan = float("nan")
            extra = dict(
                teacher_positive_scores=[[teacher.get((q, d), nan) for d in row]
                                         for q, row in zip(qids, pos_ids)],
                teacher_negative_scores=[[teacher.get((q, d), nan) for d in row]
                                         for q, row in zip(qids, neg_ids)])
        writer.write(s, query_ids=examples.query_ids[lo:hi], positive_ids=pos_ids,
                     negative_ids=neg_ids, negative_scores=cols["negative_scores"],
                     negative_ranks=cols["negative_ranks"],
                     positive_score=cols["positive_score"], **extra)
        bar.update(hi - lo)
    bar.close()
    timings["mine_s"] = time.perf_counter() - t
    _barrier("shards")

    # -- audit, report, manifest (process 0) ---------------------------------------------------
    if pi == 0:
        t = time.perf_counter()
        audit = (_merge_audit(cand_dir, pc, k, len(audit_sample)) if mc.index == "scann"
                 else audit_recall(None, None, None, k, audit_sample))
        timings["audit_s"] = time.perf_counter() - t
        parts = [load_stats(stats_dir / f"shard-{s:05d}.npz") for s in range(n_shards)]
        counts = report_mod.merge_counts(parts)
        index_info = {"type": mc.index, "k": k, "corpus": n_docs, "dim": enc.dim,
                      "embedding_dtype": dtype, "bytes_on_disk": doc_store.bytes_on_disk(),
                      "sharding": {"scheme": "contiguous", "processes": pc, "bounds": bounds}}
        if mc.index == "scann":
            first = next(x for x in shard_info if x["scann"] is not None)
            index_info.update(scann=first["scann"], tuning=first["tuning"],
                              shards=[{key: x[key] for key in ("lo", "hi", "scann", "tuning")}
                                      for x in shard_info])
            advice = _exact_advice(shard_info)
            if advice:
                index_info["advice"] = advice
                _log(advice)
        index_info["audit"] = audit
        build_s = sum(x["build_s"] for x in shard_info)
        timings["total_s"] = time.perf_counter() - t_start
        rep = report_mod.build_report(parts, edges=edges, k=k, counts=counts, filters=filters_info,
                                      index=index_info, model=model_info, timings=timings,
                                      encode=enc_info,
                                      inputs={"corpus": str(corpus_path or ""),
                                              "train": str(train_path)},
                                      out_dir=str(out), build_seconds=build_s)
        report_mod.write_report(out, rep)
        writer.finalize(model=model_info, index=index_info, filters=filters_info,
                        counts={"corpus": n_docs, **counts},
                        teacher={"path": str(teacher_scores), "sha256": teacher_sha,
                                 "pairs": len(teacher)} if teacher is not None else None)
    _barrier("manifest")
    if pi == 0:  # per-shard candidates (of this run, or of an interrupted one with other
        for stale in work.glob("cand-*"):  # shard bounds): merged into the shards
            shutil.rmtree(stale, ignore_errors=True)
    return shard_io.read_manifest(out)
