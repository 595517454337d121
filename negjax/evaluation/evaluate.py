"""Retrieval evaluation of an encoder: encode the corpus (document tower) and the queries
(query tower), search top-100, score the rankings against qrels (negjax.evaluation.metrics).
In a multi-process job every process encodes a slice; process 0 searches and scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from negjax.evaluation.metrics import METRICS, evaluate_rankings
from negjax.model.encode import encode_across_processes
from negjax.multihost import Watchdog, broadcast_floats
from negjax.search import ScannIndex, exact_search, tune_search

TOP_K = 100


@dataclass
class EvalSet:
    """Queries + qrels + the corpus they refer to: its texts, or (`corpus_store`) the token
    store its rows are encoded from."""

    corpus_ids: Sequence  # a list, or a token store's `Keys`
    corpus_texts: list    # [] when `corpus_store` holds the corpus
    query_ids: list
    query_texts: list
    qrels: dict
    corpus_store: object = None

    @classmethod
    def from_files(cls, corpus_path, queries_path, qrels_path, *, max_queries: int = 0,
                   encoder=None, doc_max_len: int = 128, cache_dir=None) -> "EvalSet":
        """With `encoder`, the corpus goes into the token store it is encoded from
        (`negjax.data.prepared.corpus_store`: the encoder's tokenizer and document prompt,
        `doc_max_len`; training's store of the same corpus; built once per host, so this is
        collective in a multi-process job) and no process holds its texts. Without, the texts
        are read (for another library's encoder)."""
        from negjax.data.readers import read_corpus, read_qrels, read_queries

        store = None
        if encoder is not None:
            from negjax.data.prepared import StoreCorpus, corpus_store, shared_token_stores

            store = shared_token_stores(lambda: corpus_store(
                corpus_path, encoder.tokenizer, max_len=doc_max_len,
                prompt=encoder.prompts.get("doc", ""), cache_dir=cache_dir), cache_dir)
            corpus = StoreCorpus(store, corpus_path)
        else:
            corpus = read_corpus(corpus_path)
        queries = read_queries(queries_path)
        qrels = read_qrels(qrels_path, corpus=corpus, query_ids=set(queries.ids))
        keep = [i for i, q in enumerate(queries.ids) if q in qrels]
        if max_queries:
            keep = keep[:max_queries]
        return cls(corpus.ids, [] if store is not None else corpus.texts,
                   [queries.ids[i] for i in keep], [queries.texts[i] for i in keep],
                   {queries.ids[i]: qrels[queries.ids[i]] for i in keep}, store)


def rankings(query_emb: np.ndarray, corpus_emb: np.ndarray, *, index: str = "exact",
             k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows per query, exact (default) or ScaNN."""
    if index == "scann":
        idx = ScannIndex.build(corpus_emb, k)
        # auto settings fit clustered data; real embeddings may need more leaves: tune the
        # search on a query sample to recall@k >= 0.95 against exact search first.
        sample = np.random.default_rng(0).permutation(len(query_emb))[:300]
        tune_search(idx, query_emb, corpus_emb, k, sample, 0.95, {"leaves_to_search", "reorder"})
        return idx.search(query_emb, k)
    return exact_search(query_emb, corpus_emb, k, desc="search")


def evaluate_encoder(enc, params, data: EvalSet, *, batch_size: int = 256, query_max_len: int = 32,
                     doc_max_len: int = 128, index: str = "exact", corpus_emb: np.ndarray | None = None
                     ) -> dict:
    """Recall@1/10/100, MRR@10, nDCG@10 (+ 'queries' evaluated) of `enc` with `params`.

    Collective in a multi-process job (every process calls it): the corpus and query encodes
    are split over the processes (`encode_across_processes`: each encodes a slice on its own
    devices, the embeddings are all-gathered), process 0 searches and scores, and every process
    returns process 0's metrics. The result equals a one-process run on as many devices.
    A lost process ends the others within NEGJAX_PEER_TIMEOUT s (`multihost.Watchdog`).
    `batch_size`: texts per encoding batch over all devices."""
    with Watchdog("eval"):
        return _evaluate(enc, params, data, batch_size=batch_size, query_max_len=query_max_len,
                         doc_max_len=doc_max_len, index=index, corpus_emb=corpus_emb)


def _evaluate(enc, params, data: EvalSet, *, batch_size, query_max_len, doc_max_len, index,
              corpus_emb) -> dict:
    import jax

    if data.corpus_store is not None and data.corpus_store.max_len != doc_max_len:
        raise ValueError(f"the evaluation corpus was tokenised to {data.corpus_store.max_len} "
                         f"tokens, evaluation asks for {doc_max_len}")
    if corpus_emb is None:
        corpus = data.corpus_store if data.corpus_store is not None else data.corpus_texts
        corpus_emb = encode_across_processes(enc, params, corpus, tower="doc",
                                             max_length=doc_max_len, batch_size=batch_size,
                                             desc="encode corpus")
    query_emb = encode_across_processes(enc, params, data.query_texts, tower="query",
                                        max_length=query_max_len, batch_size=batch_size,
                                        desc="encode queries")
    keys = (*METRICS, "queries")
    res = dict.fromkeys(keys, 0.0)
    if jax.process_index() == 0:
        ids, _ = rankings(query_emb, corpus_emb, index=index, k=min(TOP_K, len(data.corpus_ids)))
        run = {q: [data.corpus_ids[j] for j in row if j >= 0] for q, row in zip(data.query_ids, ids)}
        res = evaluate_rankings(run, data.qrels)
    values = broadcast_floats([res[k] for k in keys])
    return {k: (int(v) if k == "queries" else float(v)) for k, v in zip(keys, values)}
