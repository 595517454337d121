"""Search and metrics against independent implementations (NumPy argsort, ranx)."""

import os

import numpy as np
import pytest

from negjax.evaluation.metrics import evaluate_rankings
from negjax.search.index import ScannIndex, ScannParams, exact_search, recall_at_k


def test_exact_search_matches_argsort():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((130, 32)).astype(np.float32)
    ids, vals = exact_search(queries, corpus, 50, query_block=64, corpus_block=1200)
    scores = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :50]
    # Same sets; order equal except where float32 rounding swaps near-ties.
    assert np.mean(ids == ref) > 0.999
    np.testing.assert_allclose(vals, np.take_along_axis(scores, ids, 1), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(vals, axis=1) <= 0)


def test_exact_search_ties_and_small_corpus():
    corpus = np.ones((7, 4), np.float32)
    ids, vals = exact_search(np.ones((2, 4), np.float32), corpus, 10)
    assert ids.shape == (2, 7)
    assert ids[0].tolist() == list(range(7))  # ties: smaller row first


def test_scann_recall_on_clustered_data(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((200, 48)).astype(np.float32)
    corpus = centers[rng.integers(0, 200, 30000)] + 0.3 * rng.standard_normal((30000, 48)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.integers(0, 30000, 200)] + 0.1 * rng.standard_normal((200, 48)).astype(np.float32)
    exact_ids, _ = exact_search(queries, corpus, 20)
    index = ScannIndex.build(corpus, 20)
    ids, scores = index.search(queries, 20)
    assert recall_at_k(ids, exact_ids) >= 0.9
    index.save(tmp_path / "idx")
    again, _ = ScannIndex.load(tmp_path / "idx").search(queries, 20)
    np.testing.assert_array_equal(again, ids)


def test_metrics_match_ranx():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(2)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        rel = rng.choice(300, size=rng.integers(1, 4), replace=False)
        qrels[f"q{q}"] = {docs[r]: int(rng.integers(1, 3)) for r in rel}
        ranking = list(rng.permutation(300)[:100])
        if q % 3 == 0:  # make some hits likely
            ranking.insert(int(rng.integers(0, 15)), int(rel[0]))
        seen, ranked = set(), []
        for r in ranking:
            if r not in seen:
                seen.add(r)
                ranked.append(docs[r])
        run[f"q{q}"] = ranked[:100]
    ours = evaluate_rankings(run, qrels)
    r_run = ranx.Run({q: {d: float(100 - i) for i, d in enumerate(ds)} for q, ds in run.items()})
    r_qrels = ranx.Qrels(qrels)
    theirs = ranx.evaluate(r_qrels, r_run, ["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"])
    for m, v in theirs.items():
        assert ours[m] == pytest.approx(v, abs=1e-9), m


def test_scann_native_log_lines_hidden_unless_verbose(capfd):
    from negjax.utils import quiet_native_logs, set_verbose

    x = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    params = ScannParams(num_leaves=20, leaves_to_search=4, reorder=50)
    try:
        capfd.readouterr()
        ScannIndex.build(x, 10, params)       # ScaNN logs its partitioner through absl (fd 2)
        assert "partitioner" not in capfd.readouterr().err
        set_verbose(True)
        ScannIndex.build(x, 10, params)
        assert "partitioner" in capfd.readouterr().err
    finally:
        set_verbose(False)
    # A failing quiet block replays what native code wrote, then raises.
    with pytest.raises(RuntimeError, match="boom"):
        with quiet_native_logs():
            os.write(2, b"native detail\n")
            raise RuntimeError("boom")
    assert "native detail" in capfd.readouterr().err


# ----------------------------------------------------------------------------- sharded search

def _store(tmp_path, emb, chunk, dtype="float32"):
    from negjax.mining.embeddings import EmbeddingStore, save_chunk

    for c, lo in enumerate(range(0, len(emb), chunk)):
        save_chunk(tmp_path / f"chunk-{c:05d}.npy", emb[lo:lo + chunk], dtype)
    return EmbeddingStore(tmp_path, len(emb), emb.shape[1], chunk, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_embedding_store_reads_rows_across_chunks(tmp_path, dtype):
    import ml_dtypes

    from negjax.mining.embeddings import chunk_ok

    emb = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    store = _store(tmp_path, emb, 16, dtype)
    want = emb if dtype == "float32" else emb.astype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16).astype(np.float32)
    assert store.shape == (50, 6) and len(store) == 50
    np.testing.assert_array_equal(store[0:50], want)
    np.testing.assert_array_equal(store[10:40], want[10:40])  # spans three chunk files
    idx = np.array([[3, 49, 17], [16, 15, 0]])
    np.testing.assert_array_equal(store[idx], want[idx])
    view = store.rows_between(20, 45)
    assert len(view) == 25
    np.testing.assert_array_equal(view[5:7], want[25:27])
    np.testing.assert_array_equal(view[np.array([0, 24])], want[[20, 44]])
    assert view.max_norm() == pytest.approx(np.linalg.norm(want[20:45], axis=1).max())
    assert chunk_ok(tmp_path / "chunk-00000.npy", 16, 6, dtype)
    assert not chunk_ok(tmp_path / "chunk-00000.npy", 16, 6,
                        "float16" if dtype != "float16" else "float32")
    assert store.bytes_on_disk() > 50 * 6 * (4 if dtype == "float32" else 2)
    # Exact search streams the store block by block and equals search over the array.
    q = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    ids, vals = exact_search(q, store, 5, corpus_block=8, show_progress=False)
    ref_ids, ref_vals = exact_search(q, want, 5, show_progress=False)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-6)


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_sharded_candidates_merge_to_the_unsharded_top_k(shards):
    """Per-shard top-k merged == top-k of the whole corpus by exact score (ties: smaller row),
    duplicates included, for any cut, with a shard smaller than k."""
    from negjax.search import pair_scores
    from negjax.search.sharded import merge_candidates, shard_bounds, shard_candidates

    rng = np.random.default_rng(shards)
    corpus = rng.standard_normal((90, 8)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    corpus[40] = corpus[7]   # exact duplicates in different shards: the tie goes to row 7
    corpus[41] = corpus[42]
    q = rng.standard_normal((12, 8)).astype(np.float32)
    q[0] = corpus[7]
    k = 20
    bounds = shard_bounds(90, 10, shards)
    assert bounds[0][0] == 0 and bounds[-1][1] == 90
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(lo % 10 == 0 for lo, _ in bounds)
    parts = [shard_candidates(q, corpus[lo:hi], lo, k) for lo, hi in bounds]
    ids, scores = merge_candidates(parts, k)
    full = pair_scores(q, corpus, np.broadcast_to(np.arange(90), (12, 90)).copy())
    order = np.lexsort((np.broadcast_to(np.arange(90), (12, 90)), -full), axis=1)[:, :k]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, order, 1))
    assert ids[0, 0] == 7 and ids[0, 1] == 40
    # A corpus smaller than k: every row once, then nothing.
    small, _ = merge_candidates([shard_candidates(q, corpus[:3], 0, k),
                                 shard_candidates(q, corpus[3:5], 3, k)], k)
    assert sorted(small[0].tolist()) == [0, 1, 2, 3, 4]


def test_sharded_scann_audit_over_the_whole_corpus(tmp_path):
    """Each shard's audit part (its exact and its ScaNN top-k) merges into recall over the
    whole corpus; heavy tuning (more than half of a shard's leaves) is reported."""
    from negjax.bench.vectors import synthetic_corpus, synthetic_queries
    from negjax.mining.job import _audit_part, _exact_advice, _merge_audit
    from negjax.search.sharded import shard_bounds

    corpus = synthetic_corpus(4000, 16, 20, show_progress=False)
    q = synthetic_queries(corpus, 30)
    k = 10
    for p, (lo, hi) in enumerate(shard_bounds(4000, 1000, 2)):
        index = ScannIndex.build(corpus[lo:hi], k, ScannParams(num_leaves=8, leaves_to_search=1,
                                                               reorder=40))
        _audit_part(tmp_path / f"audit-p{p:03d}.npz", q, corpus[lo:hi], lo, k, index)
    res = _merge_audit(tmp_path, 2, k, len(q))
    exact_ids, _ = exact_search(q, corpus, k, show_progress=False)
    from negjax.search.sharded import Candidates, merge_ids
    approx = []
    for p, (lo, hi) in enumerate(shard_bounds(4000, 1000, 2)):
        with np.load(tmp_path / f"audit-p{p:03d}.npz") as z:
            approx.append(Candidates(z["ids"], z["search"], z["exact"]))
    assert res["recall_at_k"] == pytest.approx(recall_at_k(merge_ids(approx, k), exact_ids))
    assert 0 < res["recall_at_k"] <= 1 and res["shards"] == 2 and res["queries"] == 30
    info = [{"scann": {"num_leaves": 8}, "tuning": {"leaves_to_search": 2}},
            {"scann": {"num_leaves": 8}, "tuning": {"leaves_to_search": 5}}]
    assert "5 of 8 leaves (shard 1)" in _exact_advice(info)
    assert _exact_advice(info[:1]) is None
