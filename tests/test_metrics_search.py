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
