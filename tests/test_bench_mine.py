"""`negjax bench mine`: small, fast runs that check the result's structure and sanity (never speed)."""

import json

import numpy as np
import pytest

from negjax.bench.vectors import synthetic_corpus, synthetic_queries
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


# ----------------------------------------------------------------------------- --processes

def test_shard_generation_equals_slices_of_the_full_corpus():
    n = 140_000  # three generation chunks (65,536 rows each), the last one short
    full = synthetic_corpus(n, 4, 9, seed=3, show_progress=False)
    for lo, hi in [(0, n), (0, 65536), (65536, 131072), (1000, 70000), (131000, n), (65535, 65537),
                   (77, 77)]:
        part = synthetic_corpus(n, 4, 9, seed=3, show_progress=False, lo=lo, hi=hi)
        assert part.shape == (hi - lo, 4)
        np.testing.assert_array_equal(part, full[lo:hi])
    with pytest.raises(ValueError):
        synthetic_corpus(n, 4, 9, lo=10, hi=n + 1)


def _sharded(capsys, tmp_path, processes, *extra):
    ids = tmp_path / f"ids-p{processes}-{len(extra)}"
    res = _run_json(capsys, "--synthetic", 3000, "--dim", 16, "--clusters", 6, "--queries", 300,
                    "--exact-queries", 120, "--k", 20, "--repeats", 1, "--processes", processes,
                    "--save-ids", ids, *extra)
    return res, np.load(ids / "exact_ids.npy"), np.load(ids / "scann_ids.npy")


def test_two_processes_merge_to_the_exact_top_k_of_the_whole_corpus(capsys, tmp_path):
    from negjax.search.index import exact_search

    corpus = synthetic_corpus(3000, 16, 6, show_progress=False)
    queries = synthetic_queries(corpus, 300)
    want, _ = exact_search(queries[:120], corpus, 20, show_progress=False)

    one, exact1, scann1 = _sharded(capsys, tmp_path, 1)
    two, exact2, scann2 = _sharded(capsys, tmp_path, 2, "--shard-chunk", 1000)
    np.testing.assert_array_equal(exact1, want)
    np.testing.assert_array_equal(exact2, want)
    assert scann1.shape == scann2.shape == (300, 20)
    assert (scann2 >= 0).all() and (scann2 < 3000).all()

    assert one["processes"] == 1 and two["processes"] == 2
    assert [p["rows"] for p in one["per_process"]] == [[0, 3000]]
    assert [p["rows"] for p in two["per_process"]] == [[0, 1000], [1000, 3000]]
    for res in (one, two):
        s = res["scann"]
        assert 0.0 <= s["recall"] <= 1.0 and s["recall_at_100"] is None  # k < 100
        assert s["recall"] >= 0.95  # each shard is small: ScaNN scores it by brute force
        assert res["exact"]["recall"] == 1.0
        slowest = max(p["search_s"] for p in res["per_process"])
        assert s["search_s"] == slowest and s["qps"] == pytest.approx(300 / slowest)
        assert res["peak_rss_mb"] == max(p["peak_rss_mb"] for p in res["per_process"]) > 0
        for p in res["per_process"]:
            assert p["build_s"] > 0 and p["exact_s"] > 0 and p["peak_rss_mb"] > 0
            assert p["ru_maxrss_mb"] > 0 and p["params"]["brute_force"] is True
    assert two["faiss"] == {"available": False, "reason": "measured with one process only"}


def test_recall_at_100_and_an_empty_shard(capsys, tmp_path):
    # 3,000 rows are one shard chunk (65,536): process 0 gets none, process 1 all of them.
    res, exact_ids, scann_ids = _sharded(capsys, tmp_path, 2, "--k", 100)
    assert [p["rows"] for p in res["per_process"]] == [[0, 0], [0, 3000]]
    assert res["per_process"][0]["build_s"] is None and res["per_process"][0]["search_s"] is None
    assert exact_ids.shape == (120, 100) and scann_ids.shape == (300, 100)
    assert 0.0 <= res["scann"]["recall_at_100"] <= 1.0
    assert res["scann"]["recall_at_100"] == res["scann"]["recall"]


def test_sweep_with_two_processes(capsys, tmp_path):
    res = _run_json(capsys, "--synthetic", 30000, "--dim", 16, "--clusters", 30, "--queries", 200,
                    "--exact-queries", 100, "--k", 10, "--repeats", 1, "--processes", 2,
                    "--shard-chunk", 5000, "--num-leaves", 20, "--sweep-leaves", "1,20")
    assert [p["rows"] for p in res["per_process"]] == [[0, 15000], [15000, 30000]]
    assert [p["params"]["num_leaves"] for p in res["per_process"]] == [20, 20]
    assert [r["leaves_to_search"] for r in res["sweep"]] == [1, 20]
    assert all(0.0 <= r["recall"] <= 1.0 and r["qps"] > 0 for r in res["sweep"])
    # Searching every leaf of both shards can only find more of the exact neighbours.
    assert res["sweep"][1]["recall"] >= res["sweep"][0]["recall"]


def test_embedding_files_with_two_processes(capsys, tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((2500, 8)).astype(np.float32)
    np.save(tmp_path / "corpus.npy", emb)
    res = _run_json(capsys, "--embeddings", tmp_path / "corpus.npy", "--queries", 100, "--k", 10,
                    "--repeats", 1, "--processes", 2, "--shard-chunk", 600, "--normalize")
    assert res["data"]["n"] == 2400 and res["data"]["queries"] == 100
    assert [p["rows"] for p in res["per_process"]] == [[0, 1200], [1200, 2400]]
    assert res["scann"]["recall"] >= 0.99



def test_a_failing_worker_stops_the_others_with_its_message(tmp_path):
    """The launcher checks a file before starting workers; here a worker meets a bad row
    itself (process 0 waits in the next barrier until the launcher stops it)."""
    from negjax.bench.mine import launch_workers
    from negjax.errors import NegjaxError

    emb = np.ones((2400, 8), np.float32)
    emb[2000, 3] = np.nan
    np.save(tmp_path / "corpus.npy", emb)
    np.save(tmp_path / "queries.npy", emb[:10])
    data = {"source": "files", "embeddings": str(tmp_path / "corpus.npy"), "n_file": 2400,
            "held_out": 0, "seed": 0, "normalize": False, "n": 2400, "dim": 8, "queries": 10}
    cfg = {"data": data, "processes": 2, "bounds": [[0, 1200], [1200, 2400]], "k": 5,
           "exact_queries": 10, "threads": 1, "repeats": 1}
    with pytest.raises(NegjaxError, match="process 1 of 2: .*corpus.npy: row 2000 holds NaN"):
        launch_workers(cfg, tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--processes", "0"], "--processes must be positive"),
    (["--processes", "2", "--shard-chunk", "1000", "--num-leaves", "1500"],
     "more leaves than vectors in a shard"),
])
def test_bad_process_arguments(capsys, args, message):
    rc = main(["bench", "mine", "--synthetic", "3000", "--dim", "8", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
