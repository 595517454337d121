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
filesystem. Everything it computes is kept under `OUT/.work/` so that a rerun after a crash
(even `kill -9`) redoes only what is missing:

- `emb/{doc,query}-KEY/chunk-NNNNN.npy`: embeddings of `encode_chunk` texts each
  (`negjax.mining.embeddings`); KEY hashes the model (architecture, tokenizer, a fingerprint
  of the params of the tower), the input file's sha256 and the max length. Process p encodes
  chunks c with c % P == p; after a barrier every process reads all.
- `index-KEY/`: the ScaNN index (built by process 0, saved, loaded by all). ScaNN's tree
  training is not bit-reproducible, so the index is saved before any shard is written and
  every process and every resumed run searches that one saved index.
- `tune-KEY.json`: the search-time settings (leaves_to_search, reorder) that reached
  `target_recall` against exact search on a sample of queries (process 0 tunes, all apply).
- `run.json`: the key of everything that decides the shard rows (embeddings, index, filters,
  sampling, shard size). Shards of another key are discarded (an unfinished run) or refused
  (a finished one, unless `overwrite`).
- `stats/shard-NNNNN.npz`: the counts and histograms of shard k, written before the shard, so
  the report of a resumed run covers every shard.

Shard k holds queries [k*S, (k+1)*S) in training-file order and is written by process k % P.
Every random choice depends on (seed, global query index), and an embedding does not depend on
which process encodes it (a fixed per-device batch of `encode_batch_size` / all devices of the
job), so a resumed run and a multi-process run write the rows a single uninterrupted run on as
many devices writes. Process 0 writes the report and, last, the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

from negjax.data import shards as shard_io
from negjax.data.formats import read_training
from negjax.distributed import barrier
from negjax.errors import NegjaxError
from negjax.mining import report as report_mod
from negjax.mining.embeddings import encode_chunked, model_identity, params_fingerprint
from negjax.mining.filters import (FILTER_ORDER, SAMPLING, FilterSettings, filter_candidates,
                                   pair_scores, positive_ranks, sample_block, text_groups)
from negjax.search import (ScannIndex, audit_recall, describe, exact_search, query_samples,
                           scann_settings, tunable_settings, tune_search)
from negjax.utils import atomic_path, atomic_write_text, progress, sha256_file

WORK = ".work"
JOB_VERSION = 1


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _barrier(name: str) -> None:
    barrier(f"mine-{name}")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[mine] {msg}", file=sys.stderr, flush=True)


def _open_index(kind: str, doc_emb: np.ndarray, k: int, sp, directory: Path):
    """None for exact search; else the ScaNN index, built and saved by process 0 (or reused
    from an earlier run) and loaded from disk by every process."""
    if kind == "exact":
        return None, 0.0
    build_s = 0.0
    if jax.process_index() == 0 and not (directory / "negjax_index.json").is_file():
        _log(f"building ScaNN index over {len(doc_emb):,} documents ({describe(sp)})")
        t = time.perf_counter()
        ScannIndex.build(doc_emb, k, sp).save(directory)
        build_s = time.perf_counter() - t
    _barrier("index")
    # Every process (process 0 included) searches the saved index, so all search the same one.
    return ScannIndex.load(directory), build_s


# ---------------------------------------------------------------------------------------------
# One block of queries
# ---------------------------------------------------------------------------------------------

def _pad_rows(lists, fill=-1) -> np.ndarray:
    width = max(1, max((len(x) for x in lists), default=0))
    out = np.full((len(lists), width), fill, np.int64)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def mine_block(q_emb, doc_emb, index, k: int, pos_lists, query_index, *, settings, groups,
               num_negatives: int, sampling: str, seed: int,
               edges: np.ndarray) -> tuple[dict, dict]:
    """Mine `q_emb [Q, D]` float32 (global query numbers `query_index [Q]`, positives as corpus
    rows `pos_lists`). Candidates come from `index` (None = exact search) and are re-scored
    exactly (the same arithmetic as the positive score, so margins compare like with like) and
    re-ranked by that score. Returns (columns of corpus rows, stats for the report)."""
    if index is None:
        ids, _ = exact_search(q_emb, doc_emb, k, show_progress=False)
    else:
        ids, _ = index.search(q_emb, k)
    scores = pair_scores(q_emb, doc_emb, ids)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    pos_rows = _pad_rows(pos_lists)
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


def _save_stats(path: Path, stats: dict, edges: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, edges=edges, **{key: np.asarray(v) for key, v in stats.items()})


def _load_stats(path: Path) -> dict:
    with np.load(path) as z:
        return {key: z[key] for key in z.files}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def _check_cfg(mc, shard_size: int) -> None:
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


def _score_edges(q_emb: np.ndarray, doc_emb: np.ndarray, bins: int = 200) -> np.ndarray:
    """Histogram bin edges covering every possible score |q.d| <= max|q| max|d| (±1 for
    normalised embeddings); a function of the embeddings, so equal in every process and rerun."""
    bound = float(np.linalg.norm(q_emb, axis=1).max(initial=0) *
                  np.linalg.norm(doc_emb, axis=1).max(initial=0))
    bound = math.ceil(max(bound, 1e-6) * 1.0001 * 100) / 100
    return np.linspace(-bound, bound, bins + 1)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_mining(enc, params, *, corpus_path, train_path, out_dir, mining_cfg, query_max_len: int,
               doc_max_len: int, model_info: dict | None = None, train_qrels=None,
               overwrite: bool = False) -> dict:
    """Mine hard negatives for every training query into `out_dir` (shards + manifest.json +
    report.json/report.png); returns the manifest. Collective over all processes.

    `params`: encoder params in `enc`'s tower layout (queries use tower 'query', documents
    'doc'). `corpus_path` None: the training file carries inline texts.
    A rerun resumes; a finished directory mined with the same settings is returned as is; one
    mined with other settings is refused unless `overwrite`.
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
    corpus, examples = read_training(train_path, corpus_path, qrels=train_qrels)
    n_docs, nq = len(corpus), len(examples)
    max_pos = max((len(p) for p in examples.positives), default=0)
    k = min(mc.k or 100 + max_pos, n_docs)
    if settings.rank_min > k:
        raise NegjaxError(f"rank range {settings.rank_min}:... starts beyond the {k} candidates "
                          "retrieved; raise mining.k (--k)")
    ident = model_identity(enc)
    fp_doc = params_fingerprint(enc, params, "doc")
    fp_query = fp_doc if enc.tied_towers else params_fingerprint(enc, params, "query")
    corpus_sha = sha256_file(corpus_path) if corpus_path else sha256_file(train_path)
    train_sha = sha256_file(train_path)
    if train_qrels:
        train_sha = _hash([train_sha, sha256_file(train_qrels)])
    doc_key = _hash({"model": ident, "params": fp_doc, "input": corpus_sha, "n": n_docs,
                     "max_length": doc_max_len, "chunk": mc.encode_chunk, "tower": "doc"})
    query_key = _hash({"model": ident, "params": fp_query, "input": train_sha, "n": nq,
                       "max_length": query_max_len, "chunk": mc.encode_chunk, "tower": "query"})
    sp = (scann_settings(n_docs, enc.dim, k, num_leaves=mc.num_leaves,
                         leaves_to_search=mc.leaves_to_search, reorder=mc.reorder)
          if mc.index == "scann" else None)
    index_key = _hash({"doc": doc_key, "index": mc.index, "k": k,
                       "params": asdict(sp) if sp else None})
    filters_info = {**settings.to_dict(), "order": list(FILTER_ORDER),
                    "num_negatives": mc.negatives_kept, "sampling": mc.sampling, "seed": mc.seed}
    run_key = _hash({"version": JOB_VERSION, "doc": doc_key, "query": query_key,
                     "index": index_key, "filters": filters_info, "shard_size": shard_size,
                     "target_recall": mc.target_recall if sp is not None else None,
                     "audit": [mc.audit_queries, mc.seed],
                     "corpus_ids": corpus_sha, "train": train_sha})

    # -- resume / refuse / start fresh (every process decides alike, then process 0 acts) ---
    run_file = work / "run.json"
    previous = _read_json(run_file) or {}
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
    _log(f"encoding {n_docs:,} documents and {nq:,} queries ({pc} process(es), "
         f"{jax.local_device_count()} local device(s) each)")
    emb, enc_info = {}, {}
    for tower, texts, max_len, key, what in (
            ("doc", corpus.texts, doc_max_len, doc_key, "docs"),
            ("query", examples.queries, query_max_len, query_key, "queries")):
        t = time.perf_counter()
        emb[tower], enc_info[tower] = encode_chunked(
            enc, params, texts, tower=tower, max_length=max_len, batch_size=mc.encode_batch_size,
            chunk=mc.encode_chunk, stage=tower, directory=work / "emb" / f"{tower}-{key[:16]}")
        timings[f"encode_{what}_s"] = time.perf_counter() - t
    doc_emb, q_emb = emb["doc"], emb["query"]

    # -- index -------------------------------------------------------------------------------
    t = time.perf_counter()
    index, build_s = _open_index(mc.index, doc_emb, k, sp, work / f"index-{index_key[:16]}")
    timings["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    audit_sample, tune_sample = query_samples(nq, mc.audit_queries, mc.seed)
    tunable = tunable_settings(leaves_to_search=mc.leaves_to_search, reorder=mc.reorder)
    tuning = None
    if (index is not None and not index.params.brute_force and mc.target_recall > 0
            and len(tune_sample) and tunable):
        tune_key = _hash([index_key, query_key, mc.target_recall, mc.audit_queries, mc.seed,
                          sorted(tunable)])
        tune_file = work / f"tune-{tune_key[:16]}.json"
        if pi == 0 and _read_json(tune_file) is None:
            res = tune_search(index, q_emb, doc_emb, k, tune_sample, mc.target_recall, tunable)
            res["disjoint_from_audit"] = tune_sample is not audit_sample
            atomic_write_text(tune_file, json.dumps(res, indent=1) + "\n")
        _barrier("tune")
        tuning = json.loads(tune_file.read_text())
        index.params.leaves_to_search = tuning["leaves_to_search"]
        index.params.reorder = tuning["reorder"]
        _log(f"ScaNN search settings for recall@{k} >= {mc.target_recall}: "
             f"leaves_to_search {tuning['leaves_to_search']}, reorder {tuning['reorder']} "
             f"(recall {tuning['steps'][-1]['recall_at_k']:.4f} on {tuning['queries']} queries)")
    timings["tune_s"] = time.perf_counter() - t
    groups = text_groups(corpus.texts) if settings.dedup_text else None
    edges = _score_edges(q_emb, doc_emb)

    # -- shards ------------------------------------------------------------------------------
    t = time.perf_counter()
    writer = shard_io.ShardWriter(out)
    done = writer.completed()
    stats_dir = work / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(nq / shard_size))
    mine_ids = list(range(pi, n_shards, pc))
    todo = [s for s in mine_ids if not (s in done and (stats_dir / f"shard-{s:05d}.npz").is_file())]
    bar = progress(total=sum(min(nq, (s + 1) * shard_size) - s * shard_size for s in todo),
                   desc="mine", unit="q", disable=None if pi == 0 else True)
    for s in todo:
        lo, hi = s * shard_size, min(nq, (s + 1) * shard_size)
        cols, stats = mine_block(q_emb[lo:hi], doc_emb, index, k, examples.positives[lo:hi],
                                 np.arange(lo, hi), settings=settings, groups=groups,
                                 num_negatives=mc.negatives_kept, sampling=mc.sampling,
                                 seed=mc.seed, edges=edges)
        _save_stats(stats_dir / f"shard-{s:05d}.npz", stats, edges)
        ids = corpus.ids
        writer.write(s, query_ids=examples.query_ids[lo:hi],
                     positive_ids=[[ids[r] for r in p] for p in examples.positives[lo:hi]],
                     negative_ids=[[ids[r] for r in rows] for rows in cols["negative_rows"]],
                     negative_scores=cols["negative_scores"], negative_ranks=cols["negative_ranks"],
                     positive_score=cols["positive_score"])
        bar.update(hi - lo)
    bar.close()
    timings["mine_s"] = time.perf_counter() - t
    _barrier("shards")

    # -- audit, report, manifest (process 0) ---------------------------------------------------
    if pi == 0:
        t = time.perf_counter()
        audit_key = _hash([index_key, query_key, audit_sample.tolist(),
                           asdict(index.params) if index is not None else None])[:16]
        audit = audit_recall(index, q_emb, doc_emb, k, audit_sample, work / f"audit-{audit_key}.json")
        timings["audit_s"] = time.perf_counter() - t
        parts = [_load_stats(stats_dir / f"shard-{s:05d}.npz") for s in range(n_shards)]
        counts = report_mod.merge_counts(parts)
        index_info = {"type": mc.index, "k": k, "corpus": n_docs, "dim": enc.dim,
                      **({"scann": asdict(index.params), "tuning": tuning} if sp else {}),
                      "audit": audit}
        timings["total_s"] = time.perf_counter() - t_start
        rep = report_mod.build_report(parts, edges=edges, k=k, counts=counts, filters=filters_info,
                                      index=index_info, model=model_info, timings=timings,
                                      encode=enc_info,
                                      inputs={"corpus": str(corpus_path or ""),
                                              "train": str(train_path)},
                                      out_dir=str(out), build_seconds=build_s)
        report_mod.write_report(out, rep)
        writer.finalize(model=model_info, index=index_info, filters=filters_info,
                        counts={"corpus": n_docs, **counts})
    _barrier("manifest")
    return shard_io.read_manifest(out)
