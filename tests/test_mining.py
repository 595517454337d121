"""The mining job: filters and sampling (pure), a full in-process run checked row by row, resume
after kill -9 and two processes, both compared with an uninterrupted single-process run."""

import json
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_negjax, start_negjax_processes, subprocess_env, wait_all
from negjax.config import MiningConfig, ModelConfig
from negjax.data import shards
from negjax.data.formats import normalize_text, read_training
from negjax.errors import NegjaxError
from negjax.mining.filters import (FILTER_ORDER, FilterSettings, filter_candidates,
                                   positive_ranks, sample_block, text_groups)
from negjax.search import pair_scores

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
TINY_SET = [x for key, v in TINY.items() for x in ("--set", f"model.{key}={v}")]
WORDS = ("river bank money water tree plant light heavy run walk fast slow house boat car road "
         "city music song sound color red blue green small large old new cold hot day night food "
         "bread fish bird dog cat stone wood metal glass paper book word name time year").split()


def make_data(path, n_docs, n_queries, seed=0):
    """Random-word corpus + pairs; doc 5 is doc 3 in upper case with extra spaces (the same
    normalised text), and query 0's positive is doc 3. Odd queries carry an id, even ones not."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n_docs)]
    docs[5] = "  " + docs[3].upper().replace(" ", "   ") + " "
    with open(path / "corpus.jsonl", "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    with open(path / "train.jsonl", "w") as f:
        for q in range(n_queries):
            pos = [3] if q == 0 else rng.sample(range(n_docs), rng.choice([1, 1, 2]))
            rec = {"query": " ".join(docs[pos[0]].split()[:4] + [rng.choice(WORDS)]),
                   "pos": [f"d{p}" for p in pos]}
            if q % 2:
                rec["id"] = f"q{q}"
            f.write(json.dumps(rec) + "\n")
    return path / "corpus.jsonl", path / "train.jsonl"


# ----------------------------------------------------------------------------- pure functions

def test_filters_count_each_candidate_once_in_order():
    ids = np.array([[7, 1, 2, 3, 4, 5, -1], [0, 1, 2, 3, 4, 5, 6]], np.int64)
    scores = np.array([[0.99, 0.96, 0.9, 0.8, 0.5, 0.1, -np.inf],
                       [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4]], np.float32)
    pos_rows = np.array([[7, -1], [6, 0]], np.int64)
    groups = np.array([0, 1, 2, 3, 4, 5, 6, 2])  # doc 2 has doc 7's text
    settings = FilterSettings(rank_min=1, rank_max=6, min_score=0.2, relative_margin=0.05,
                              absolute_margin=0.2)
    keep, removed = filter_candidates(ids, scores, pos_rows=pos_rows,
                                      pos_scores=np.array([1.0, 0.8], np.float32),
                                      settings=settings, groups=groups)
    got = {f: np.flatnonzero(removed[f][0]).tolist() for f in FILTER_ORDER}
    # query 0 (pos 1.0): 7 is the positive, 2 shares its text, 5 scores below min, 1 is above
    # 0.95 (relative), nothing else is above 0.8 (absolute); the -1 slot is no candidate.
    assert got == {"positive_id": [0], "positive_text": [2], "rank_range": [], "max_score": [],
                   "min_score": [5], "relative_margin": [1], "absolute_margin": []}
    assert keep[0].tolist() == [False, False, False, True, True, False, False]
    # query 1 (pos 0.8): 0 is a positive (6 too but rank 7 is outside the range first:
    # positive_id comes first); relative: > 0.76 -> ranks 2, 3; absolute: > 0.6 -> rank 4.
    got = {f: np.flatnonzero(removed[f][1]).tolist() for f in FILTER_ORDER}
    assert got["positive_id"] == [0, 6] and got["rank_range"] == []
    assert got["relative_margin"] == [1, 2] and got["absolute_margin"] == [3]
    assert keep[1].tolist() == [False, False, False, False, True, True, False]
    total = sum(int(r.sum()) for r in removed.values()) + int(keep.sum())
    assert total == int((ids >= 0).sum())  # every candidate is kept or counted once
    # A query without a positive score loses nothing to the margins.
    keep, removed = filter_candidates(ids[1:], scores[1:], pos_rows=np.full((1, 1), -1),
                                      pos_scores=np.array([np.nan], np.float32),
                                      settings=FilterSettings(relative_margin=0.0, dedup_text=False))
    assert keep.all()
    with pytest.raises(NegjaxError):
        FilterSettings(min_score=0.5, max_score=0.1)


def test_sampling_and_helpers():
    rng = np.random.default_rng(0)
    keep = rng.random((20, 30)) < 0.5
    top = sample_block(keep, 4, "top", 0, np.arange(20))
    for r in range(20):
        assert np.flatnonzero(top[r]).tolist() == np.flatnonzero(keep[r])[:4].tolist()
    a = sample_block(keep, 4, "random", 7, np.arange(100, 120))
    b = sample_block(keep[5:], 4, "random", 7, np.arange(105, 120))  # other block, same queries
    assert np.array_equal(a[5:], b) and not (a & ~keep).any()
    assert (a.sum(1) == np.minimum(keep.sum(1), 4)).all()
    assert not np.array_equal(a, sample_block(keep, 4, "random", 8, np.arange(100, 120)))
    assert text_groups(["A  b", "a b", "c"]).tolist() == [0, 0, 1]

    q = rng.standard_normal((5, 8)).astype(np.float32)
    d = rng.standard_normal((12, 8)).astype(np.float32)
    rows = np.array([[3, 1, -1], [0, 0, 11], [4, 5, 6], [7, -1, -1], [2, 9, 10]])
    s = pair_scores(q, d, rows)
    np.testing.assert_allclose(s[rows >= 0], np.einsum("qd,qmd->qm", q, d[rows])[rows >= 0],
                               rtol=1e-5)
    assert np.isneginf(s[rows < 0]).all()
    # the arithmetic of one pair does not depend on its neighbours
    assert pair_scores(q[:1], d, rows[:1, :1])[0, 0] == s[0, 0]
    assert positive_ranks(rows, np.array([[1, 8], [11, -1], [9, 4], [7, 3], [0, 10]])).tolist() == \
        [[2, 0], [3, 0], [0, 1], [1, 0], [0, 3]]


def test_scann_settings_overrides():
    from negjax.search import scann_settings

    auto = scann_settings(500, 32, 20)
    assert auto.brute_force and auto.num_leaves == 0
    tree = scann_settings(500, 32, 20, num_leaves=10, reorder=300)
    assert not tree.brute_force and (tree.num_leaves, tree.leaves_to_search, tree.reorder) == (10, 1, 300)
    big = scann_settings(1_000_000, 384, 100, leaves_to_search=5)
    assert (big.num_leaves, big.leaves_to_search) == (1000, 5)
    with pytest.raises(NegjaxError, match="leaves_to_search"):
        scann_settings(500, 32, 20, num_leaves=10, leaves_to_search=11)


# ----------------------------------------------------------------------------- in-process run

def _rows(out):
    return sorted(shards.read_table(out).to_pylist(), key=lambda r: r["query_id"])


def test_run_mining_end_to_end(tmp_path):
    import matplotlib.image

    from negjax.mining.job import run_mining
    from negjax.model.loader import load_model

    corpus_path, train_path = make_data(tmp_path / "data", 120, 40)
    corpus, examples = read_training(train_path, corpus_path)
    enc, params, info = load_model("tiny", ModelConfig(**TINY))
    cfg = MiningConfig(index="exact", negatives_kept=6, sampling="random", seed=3,
                       relative_margin=0.01, absolute_margin=0.001, encode_chunk=50,
                       shard_size=16, k=120, audit_queries=10)
    kw = dict(corpus_path=corpus_path, train_path=train_path, out_dir=tmp_path / "out",
              mining_cfg=cfg, query_max_len=16, doc_max_len=32, model_info=info)
    manifest = run_mining(enc, params, **kw)
    out = tmp_path / "out"
    assert shards.verify(out) == manifest
    assert manifest["model"] == {"path": "tiny", "step": None}
    assert manifest["filters"]["relative_margin"] == 0.01 and manifest["index"]["k"] == 120
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 8]

    # Recompute every score from the saved embeddings.
    doc_emb = np.concatenate([np.load(p) for p in sorted((out / ".work/emb").glob("doc-*/chunk-*.npy"))])
    q_emb = np.concatenate([np.load(p) for p in sorted((out / ".work/emb").glob("query-*/chunk-*.npy"))])
    assert doc_emb.shape == (120, 32) and q_emb.shape == (40, 32)
    rows = shards.read_table(out).to_pylist()
    assert [r["query_id"] for r in rows] == examples.query_ids  # '#LINE' for queries without id
    n_neg = 0
    for i, r in enumerate(rows):
        pos = set(examples.positives[i])
        neg = [corpus.row(d) for d in r["negative_ids"]]
        assert r["positive_ids"] == [corpus.ids[p] for p in examples.positives[i]]
        assert not pos & set(neg)
        assert not {normalize_text(corpus.texts[p]) for p in pos} & \
            {normalize_text(corpus.texts[d]) for d in neg}
        assert len(neg) == len(set(neg)) <= 6 and r["negative_ranks"] == sorted(r["negative_ranks"])
        pos_score = max(float(q_emb[i] @ doc_emb[p]) for p in pos)
        assert r["positive_score"] == pytest.approx(pos_score, abs=1e-5)
        s = np.array(r["negative_scores"])
        np.testing.assert_allclose(s, doc_emb[neg] @ q_emb[i], atol=1e-5)
        assert (s <= r["positive_score"] * (1 - 0.01)).all()
        assert (s <= r["positive_score"] - 0.001).all()
        n_neg += len(neg)

    rep = json.loads((out / "report.json").read_text())
    c = rep["counts"]
    assert c["negatives"] == n_neg == manifest["counts"]["negatives"]
    assert c["candidates"] == 40 * 120 and c["positives_outside_topk"] == 0
    assert c["removed"]["positive_id"] == sum(map(len, examples.positives))
    assert c["removed"]["positive_text"] >= 1  # doc 5 for query 0 (k = the whole corpus)
    assert c["removed"]["relative_margin"] > 0
    assert c["removed_total"] + c["passed_filters"] == c["candidates"]
    assert sum(rep["histograms"]["negatives"]) == n_neg
    assert sum(rep["positive_rank_hist"]) == c["positives"]
    assert rep["index"]["audit"]["recall_at_k"] == 1.0
    png = matplotlib.image.imread(out / "report.png")
    assert png.shape[0] > 500 and png.shape[1] > 500

    # Same settings again: nothing to do. Other settings: refused, or redone with overwrite
    # (the embeddings are reused, not recomputed).
    chunks = {p: p.stat().st_mtime_ns for p in (out / ".work/emb").rglob("*.npy")}
    assert run_mining(enc, params, **kw) == manifest
    cfg2 = MiningConfig(**{**cfg.__dict__, "index": "scann", "num_leaves": 4, "k": 20,
                           "sampling": "top", "relative_margin": -1.0})
    with pytest.raises(NegjaxError, match="other settings"):
        run_mining(enc, params, **{**kw, "mining_cfg": cfg2})
    m2 = run_mining(enc, params, **{**kw, "mining_cfg": cfg2}, overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in chunks} == chunks
    assert m2["index"]["scann"]["num_leaves"] == 4 and not m2["index"]["scann"]["brute_force"]
    assert 0 < m2["index"]["audit"]["recall_at_k"] <= 1
    # leaves_to_search was automatic (1 of 4): raised until recall@k >= 0.95 on other queries.
    tuning = m2["index"]["tuning"]
    assert tuning["reached"] and tuning["disjoint_from_audit"] and tuning["queries"] == 10
    assert tuning["steps"][-1]["recall_at_k"] >= 0.95
    assert m2["index"]["scann"]["leaves_to_search"] == tuning["leaves_to_search"] >= 1
    assert shards.verify(out)["counts"]["negatives"] == m2["counts"]["negatives"] > 0
    assert all(len(r["negative_ids"]) <= 6 for r in _rows(out))

    # float16 document embeddings: half the bytes on disk, nearly the same negatives.
    first = {r["query_id"]: set(r["negative_ids"]) for r in rows}
    cfg3 = MiningConfig(**{**cfg.__dict__, "embedding_dtype": "float16"})
    m3 = run_mining(enc, params, **{**kw, "mining_cfg": cfg3}, overwrite=True)
    assert m3["index"]["embedding_dtype"] == "float16"
    # converted from the float32 chunks already on disk, not encoded again
    assert json.loads((out / "report.json").read_text())["encode"]["doc"]["converted"] == 3
    assert m3["index"]["bytes_on_disk"] < 0.6 * manifest["index"]["bytes_on_disk"]
    half = {r["query_id"]: set(r["negative_ids"]) for r in _rows(out)}
    overlap = sum(len(first[q] & half[q]) for q in first) / sum(len(v) for v in first.values())
    assert overlap > 0.9


# ----------------------------------------------------------------------------- subprocesses

def _mine_args(data, out, *extra, devices=4):
    # encode_batch_size counts over all devices: 4 texts per device whatever the layout, so
    # every layout computes the same embeddings bit for bit.
    return ["mine", "--model", "tiny", *TINY_SET, "--corpus", data / "corpus.jsonl",
            "--train", data / "train.jsonl", "--out", out, "--shard-size", "8",
            "--encode-chunk", "48", "--negatives-kept", "4", "--sampling", "random", "--seed", "5",
            "--relative-margin", "0.002", "--k", "40", "--encode-batch-size", str(4 * devices),
            "--doc-max-length", "32", "--query-max-length", "16", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted one-process runs of the subprocess tests' settings on 4 devices: ScaNN
    (the default index) and exact search."""
    root = tmp_path_factory.mktemp("mine_ref")
    make_data(root / "data", 200, 44, seed=1)
    run_negjax(*_mine_args(root / "data", root / "ref"), env=subprocess_env(devices=4), check=True)
    run_negjax(*_mine_args(root / "data", root / "ref_exact", "--index", "exact"),
               env=subprocess_env(devices=4), check=True)
    return root, _rows(root / "ref"), _rows(root / "ref_exact")


def test_kill_9_and_resume_give_the_same_rows(reference):
    root, want, _ = reference
    out = root / "killed"
    env = subprocess_env(devices=4)

    def killed_at(at):  # a real kill -9 at a known point, injected by tests/faults.py
        return subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), at,
                               *map(str, _mine_args(root / "data", out))],
                              capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    # Killed while encoding documents (after 2 of 5 chunks), then while writing shards.
    p = killed_at("doc:2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    chunks = {c: c.stat().st_mtime_ns for c in (out / ".work/emb").rglob("chunk-*.npy")}
    assert len(chunks) == 2 and not list(out.glob("shard-*"))
    p = killed_at("shard:2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    written = {s: s.stat().st_mtime_ns for s in out.glob("shard-*.parquet")}
    assert len(written) == 2 and not (out / "manifest.json").exists()
    with pytest.raises(NegjaxError, match="no manifest.json.*did not finish"):
        shards.verify(out)
    p = run_negjax(*_mine_args(root / "data", out), env=subprocess_env(devices=4), check=True)
    assert "resuming" in p.stderr
    # Nothing already written was redone; the result equals the uninterrupted run.
    assert all(c.stat().st_mtime_ns == t for c, t in chunks.items())
    assert all(s.stat().st_mtime_ns == t for s, t in written.items())
    m = shards.verify(out)
    assert _rows(out) == want
    rep = json.loads((out / "report.json").read_text())
    ref_rep = json.loads((root / "ref" / "report.json").read_text())
    assert rep["counts"] == ref_rep["counts"] and rep["histograms"] == ref_rep["histograms"]
    assert m["counts"] == shards.verify(root / "ref")["counts"]
    assert not list((out / ".work").glob("cand-*"))  # merged candidates are removed at the end


def test_sharded_exact_search_gives_the_same_rows(reference, processes=4):
    """P processes x 1 device, each searching only its corpus shard, write exactly the rows of
    one process searching the whole corpus (2 processes: the rerun of the next test)."""
    root, _, want = reference
    out = root / f"sharded{processes}"
    procs = start_negjax_processes(lambda i: _mine_args(root / "data", out, "--index", "exact",
                                                        devices=processes), processes)
    outs = wait_all(procs, timeout=600)
    assert f"documents in {processes} shards" in outs[0] and "mined" in outs[0]
    assert not any("mined" in text for text in outs[1:])
    m = shards.verify(out)
    assert _rows(out) == want
    sharding = m["index"]["sharding"]
    assert sharding["processes"] == processes and len(sharding["bounds"]) == processes
    assert sharding["bounds"][0][0] == 0 and sharding["bounds"][-1][1] == 200


def test_lost_process_stops_the_others_and_a_rerun_completes(reference):
    """kill -9 of process 1 in the middle of its search: process 0 exits non-zero within 60 s,
    naming process 1; both rerun to the same rows as one process."""
    import time

    root, _, want = reference
    out = root / "lost"
    args = lambda i: _mine_args(root / "data", out, "--index", "exact", devices=2)  # noqa: E731
    procs = start_negjax_processes(args, 2, prefix=lambda i: [str(REPO / "tests" / "faults.py"), "search:2"] * i,
                                   NEGJAX_PEER_TIMEOUT=10)
    procs[1].wait(timeout=600)
    killed_at = time.monotonic()
    text0 = wait_all(procs, timeout=120, check=False)[0]
    waited = time.monotonic() - killed_at
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None), text0[-3000:]
    assert "process 1 of 2 was lost" in text0, text0[-3000:]
    assert waited < 60
    assert not (out / "manifest.json").exists()
    procs = start_negjax_processes(lambda i: _mine_args(root / "data", out, "--index", "exact",
                                                        devices=2), 2)
    wait_all(procs)
    assert _rows(out) == want


def test_cli_errors():
    p = run_negjax("mine", "--out", "/nonexistent/x", "--rank-range", "5:2",
                   env=subprocess_env(devices=1))
    assert p.returncode == 2 and "rank-range" in p.stderr and len(p.stderr.splitlines()) == 1
    p = run_negjax("mine", "--out", "/nonexistent/x", "--corpus", "c.jsonl",
                   env=subprocess_env(devices=1))
    assert p.returncode == 2 and "--corpus needs --train" in p.stderr
