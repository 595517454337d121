"""`negjax bench mine`: small, fast runs that check the result's structure and sanity (never speed)."""

import json

import numpy as np
import pytest

from negjax.bench.mine import synthetic_corpus, synthetic_queries
from negjax.cli import main


def _run_json(capsys, *args):
    rc = main(["bench", "mine", *map(str, args), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_synthetic_bench_json(capsys, tmp_path):
    out_file = tmp_path / "res" / "bench.json"
    res = _run_json(capsys, "--synthetic", 20000, "--dim", 32, "--clusters", 40, "--queries", 600,
                    "--exact-queries", 200, "--k", 50, "--num-leaves", 60, "--leaves-to-search", 6,
                    "--sweep-leaves", "2,6", "--sweep-reorder", "100,200", "--repeats", 1,
                    "--output", out_file)
    assert json.loads(out_file.read_text()) == res
    assert res["k"] == 50
    assert res["data"] | {"n": 20000, "dim": 32, "queries": 600, "clusters": 40} == res["data"]
    assert res["exact"]["queries"] == 200 and res["exact"]["recall"] == 1.0
    assert res["exact"]["qps"] > 0
    s = res["scann"]
    assert s["params"]["num_leaves"] == 60 and s["params"]["leaves_to_search"] == 6
    assert s["params"]["reorder"] == 250  # ScannParams.auto: max(4k, 250), not overridden
    assert s["queries"] == 600 and s["recall_queries"] == 200 and len(s["search_s_runs"]) == 1
    assert 0.0 <= s["recall"] <= 1.0 and s["build_s"] > 0 and s["qps"] > 0
    assert res["speedup"] == pytest.approx(s["qps"] / res["exact"]["qps"])
    grid = [(r["leaves_to_search"], r["reorder"]) for r in res["sweep"]]
    assert grid == [(2, 100), (2, 200), (6, 100), (6, 200)]
    assert all(0.0 <= r["recall"] <= 1.0 for r in res["sweep"])
    # More leaves searched (same reorder) can only find more of the exact neighbours here.
    by = {(r["leaves_to_search"], r["reorder"]): r["recall"] for r in res["sweep"]}
    assert by[(6, 200)] >= by[(2, 200)]
    assert res["faiss"]["available"] in (True, False)
    assert res["peak_rss_mb"] > 0


def test_table_output(capsys):
    rc = main(["bench", "mine", "--synthetic", "3000", "--dim", "16", "--queries", "100",
               "--exact-queries", "50", "--k", "10", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "exact" in out and "ScaNN" in out and "recall@10" in out and "peak RSS" in out


def test_synthetic_data_is_deterministic_and_queries_are_new():
    a = synthetic_corpus(3000, 24, 7, seed=5, show_progress=False)
    b = synthetic_corpus(3000, 24, 7, seed=5, show_progress=False)
    c = synthetic_corpus(3000, 24, 7, seed=6, show_progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (3000, 24)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    q = synthetic_queries(a, 200, noise=0.5, seed=5)
    np.testing.assert_array_equal(q, synthetic_queries(a, 200, noise=0.5, seed=5))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    best = (q @ a.T).max(axis=1)
    assert best.max() < 0.999  # near a corpus row, never equal to one
    assert np.median(best) > 0.8


def test_embedding_files_with_held_out_queries(capsys, tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 16)).astype(np.float32)
    np.save(tmp_path / "corpus.npy", emb)
    res = _run_json(capsys, "--embeddings", tmp_path / "corpus.npy", "--queries", 200, "--k", 20,
                    "--normalize", "--repeats", 1)
    assert res["data"]["source"] == "files" and res["data"]["normalized"] is True
    assert res["data"]["n"] == 2800 and res["data"]["queries"] == 200 and res["data"]["dim"] == 16
    assert res["scann"]["params"]["brute_force"] is True  # auto: small corpus
    # ScaNN's brute force scores exactly: only float rounding of near-ties can differ.
    assert res["scann"]["recall"] >= 0.99

    np.save(tmp_path / "queries.npy", emb[:50, :8])
    rc = main(["bench", "mine", "--embeddings", str(tmp_path / "corpus.npy"),
               "--query-embeddings", str(tmp_path / "queries.npy")])
    assert rc == 2
    assert "queries.npy: dimension 8 differs" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (np.zeros(5, np.float32), "expected a non-empty 2-D array"),
    (np.zeros((4, 3), np.int32), "expected floating-point"),
    (np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), "row 1 holds NaN"),
])
def test_bad_embedding_files(capsys, tmp_path, content, message):
    path = tmp_path / "bad.npy"
    if content is not None:
        np.save(path, content)
    rc = main(["bench", "mine", "--embeddings", str(path), "--queries", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.npy" in err and message in err
