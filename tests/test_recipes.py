"""Training recipes through the commands users run: Matryoshka (loss.matryoshka_dims) with the
false-negative guard (loss.false_negative_margin, its count logged) trains, and encode / eval /
mine --dim K use the truncated, re-normalised embeddings; the export records the sizes and
loads in sentence-transformers with truncate_dim."""

import json
import subprocess

import numpy as np
import pytest

from helpers import REPO, run_negjax, subprocess_env, train_cmd, write_config


def test_matryoshka_train_encode_eval_mine_export(tmp_path, small_data):  # noqa: F811
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from negjax.model import encode_texts
    from negjax.model.loader import load_model

    cfg = write_config(tmp_path, small_data, steps=6)
    work = tmp_path / "w"
    sets = ["loss.matryoshka_dims=[32, 16, 8]", "loss.matryoshka_weights=[1.0, 1.0, 0.5]",
            "checkpoint.every_steps=6", "loss.false_negative_margin=0.3"]
    r = subprocess.run(train_cmd(cfg, work) + sum((["--set", s] for s in sets), []),
                       env=subprocess_env(2), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # The false-negative guard's count is logged per step (mean over each logging window).
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(x["false_negatives_masked"] >= 0 for x in lines)
    assert sum(x["false_negatives_masked"] for x in lines) > 0
    r = run_negjax("train", "--config", cfg, "--workdir", tmp_path / "bad", "--set",
                   "loss.matryoshka_dims=[64]", env=subprocess_env(1))
    assert r.returncode == 2 and "matryoshka_dims" in r.stderr and "32 dimensions" in r.stderr

    enc, params, _ = load_model(work)
    texts = ["a domestic dog", "water that falls from clouds", "to run quickly"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    full = encode_texts(enc, params, texts, tower="query", batch_size=8)
    cut = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    r = run_negjax("encode", "--model", work, "--input", tmp_path / "in.jsonl", "--output",
                   tmp_path / "e16.npy", "--dim", 16, env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "e16.npy"), cut, atol=2e-6)
    r = run_negjax("encode", "--model", work, "--input", tmp_path / "in.jsonl", "--output",
                   tmp_path / "x.npy", "--dim", 64, env=subprocess_env(1))
    assert r.returncode == 2 and "32 dimensions" in r.stderr and not (tmp_path / "x.npy").exists()

    ev = ["eval", "--model", work, "--corpus", small_data / "corpus.jsonl", "--queries",
          small_data / "dev_queries.jsonl", "--qrels", small_data / "dev_qrels.tsv", "--json"]
    r = run_negjax(*ev, "--dim", 8, "--save-run", tmp_path / "r8.trec", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(r.stdout)
    assert one["model"]["dim"] == 8
    # Several sizes in one run (encoded once): one JSON line and one run file per size, each
    # equal to its own single-size evaluation.
    r = run_negjax(*ev, "--dim", "32,8", "--save-run", tmp_path / "r.trec", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    both = [json.loads(x) for x in r.stdout.splitlines()]
    assert [b["model"]["dim"] for b in both] == [32, 8]
    assert {k: v for k, v in both[1].items() if k != "model"} == pytest.approx(
        {k: v for k, v in one.items() if k != "model"}, abs=1e-9)
    def scored(path):  # (query, document) -> score; near-ties may swap at float32 rounding
        return {tuple(x.split()[0:3:2]): float(x.split()[4]) for x in path.read_text().splitlines()}
    a, b = scored(tmp_path / "r.trec.d8"), scored(tmp_path / "r8.trec")
    common = a.keys() & b.keys()
    assert len(common) >= 0.99 * len(b)
    np.testing.assert_allclose([a[k] for k in common], [b[k] for k in common], atol=1e-5)
    assert (tmp_path / "r.trec.d32").is_file() and not (tmp_path / "r.trec").exists()
    r = run_negjax(*ev, "--dim", "16,64", env=subprocess_env(1))
    assert r.returncode == 2 and "32 dimensions" in r.stderr and not r.stdout

    r = run_negjax("mine", "--model", work, "--corpus", small_data / "corpus.jsonl", "--train",
                   small_data / "train.jsonl", "--out", tmp_path / "mined", "--index", "exact",
                   "--negatives-kept", 4, "--dim", 16, env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "mined" / "manifest.json").read_text())
    assert manifest["index"]["dim"] == 16 and manifest["model"]["dim"] == 16
    row = pq.read_table(sorted((tmp_path / "mined").glob("shard-*.parquet"))[0]).to_pylist()[0]
    train = {t["id"]: t["query"] for t in map(json.loads, (small_data / "train.jsonl").read_text().splitlines())}
    corpus = {d["id"]: d["text"] for d in map(json.loads, (small_data / "corpus.jsonl").read_text().splitlines())}
    small = enc.truncated(16)
    q = encode_texts(small, params, [train[row["query_id"]]], tower="query", batch_size=8, max_length=16)
    d = encode_texts(small, params, [corpus[i] for i in row["negative_ids"]], tower="doc",
                     batch_size=8, max_length=32)
    np.testing.assert_allclose((d @ q[0]), row["negative_scores"], atol=2e-5)

    r = run_negjax("export", "--checkpoint", work, "--out", tmp_path / "hf", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    st_cfg = json.loads((tmp_path / "hf" / "config_sentence_transformers.json").read_text())
    assert st_cfg["matryoshka_dims"] == [32, 16, 8]
    st = SentenceTransformer(str(tmp_path / "hf"), device="cpu", truncate_dim=16)
    np.testing.assert_allclose(st.encode(texts, normalize_embeddings=True), cut, atol=1e-5)


def test_distillation_from_training_file_scores(tmp_path, small_data):  # noqa: F811
    """Training records with FlagEmbedding's pos_scores / neg_scores: read per document,
    carried into each batch as teacher_scores [b, G], trained on with loss.distill; a record
    whose scores do not match its entries is refused by file and line; loss.distill without
    teacher scores stops before training."""
    from negjax.data.formats import read_training
    from negjax.errors import NegjaxError

    corpus_ids = [json.loads(x)["id"] for x in (small_data / "corpus.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (small_data / "train.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):  # two file negatives per query, scored below the positive
        r["neg"] = [c for c in corpus_ids[i * 3: i * 3 + 6] if c not in r["pos"]][:2]
        r["pos_scores"] = [4.0] * len(r["pos"])
        r["neg_scores"] = [1.0 + 0.5 * j for j in range(len(r["neg"]))]
    data = tmp_path / "data"
    data.mkdir()
    for name in ("corpus.jsonl", "dev_queries.jsonl", "dev_qrels.tsv"):
        (data / name).write_text((small_data / name).read_text())
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus, ex = read_training(data / "train.jsonl", data / "corpus.jsonl")
    first = ex.teacher[0]
    assert first[corpus.index[rows[0]["pos"][0]]] == 4.0
    assert [first[corpus.index[n]] for n in rows[0]["neg"]] == [1.0, 1.5]

    bad = dict(rows[1], neg_scores=[1.0])
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(NegjaxError, match=r"bad.jsonl:2: 'neg_scores' has 1 numbers for 2"):
        read_training(tmp_path / "bad.jsonl", data / "corpus.jsonl")

    cfg = write_config(tmp_path, data, steps=6)
    work = tmp_path / "w"
    sets = ["loss.distill=kl", "loss.distill_weight=0.5", "data.num_negatives=2",
            "checkpoint.every_steps=6"]
    r = subprocess.run(train_cmd(cfg, work) + sum((["--set", s] for s in sets), []),
                       env=subprocess_env(2), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["distill_loss"]) and x["distill_loss"] > 0 for x in lines)
    assert all(x["distill_queries"] > 0 for x in lines)

    r = run_negjax("train", "--config", write_config(tmp_path, small_data, steps=2, name="p.toml"),
                   "--workdir", tmp_path / "w2", "--set", "loss.distill=margin_mse",
                   env=subprocess_env(1))
    assert r.returncode == 2 and "needs teacher scores" in r.stderr


def test_mined_shards_carry_teacher_scores_for_distillation(tmp_path, small_data):  # noqa: F811
    """negjax mine --teacher-scores FILE: the shards carry the teacher's score of every listed
    positive and negative (NaN where the file has none), the manifest names the file, and
    training on those shards with loss.distill uses them (the training file has none)."""
    import pyarrow.parquet as pq

    from negjax.data.formats import read_training
    from negjax.data.shards import load_negatives, read_manifest

    corpus_ids = [json.loads(x)["id"] for x in (small_data / "corpus.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (small_data / "train.jsonl").read_text().splitlines()]
    scored = {t["id"] for t in train[:40]}
    lines = ["query-id\tdoc-id\tscore"]
    for t in train[:40]:
        lines += [f"{t['id']}\t{d}\t{(hash((t['id'], d)) % 1000) / 100:.2f}" for d in corpus_ids]
    (tmp_path / "teacher.tsv").write_text("\n".join(lines) + "\n")
    teacher = {(q, d): float(s) for q, d, s in (x.split("\t") for x in lines[1:])}

    cfg = write_config(tmp_path, small_data, steps=3)
    r = run_negjax("mine", "--model", "tiny", "--config", cfg, "--corpus", small_data / "corpus.jsonl",
                   "--train", small_data / "train.jsonl", "--out", tmp_path / "mined", "--index",
                   "exact", "--negatives-kept", 4, "--teacher-scores", tmp_path / "teacher.tsv",
                   env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(tmp_path / "mined")
    assert manifest["teacher"]["pairs"] == len(teacher)
    rows = pq.read_table(sorted((tmp_path / "mined").glob("shard-*.parquet"))[0]).to_pylist()
    for row in rows[:60]:
        for ids, col in (("positive_ids", "teacher_positive_scores"),
                         ("negative_ids", "teacher_negative_scores")):
            for d, sc in zip(row[ids], row[col]):
                if row["query_id"] in scored:
                    assert sc == np.float32(teacher[(row["query_id"], d)])
                else:
                    assert np.isnan(sc)
    corpus, ex = read_training(small_data / "train.jsonl", small_data / "corpus.jsonl")
    neg = load_negatives(tmp_path / "mined", ex, corpus)
    e = ex.index()[train[0]["id"]]
    assert neg.teacher[e] and all(
        v == np.float32(teacher[(train[0]["id"], corpus.ids[d])]) for d, v in neg.teacher[e].items())

    work = tmp_path / "w"
    sets = ["loss.distill=margin_mse", f"data.negatives={tmp_path / 'mined'}",
            "data.num_negatives=2", "checkpoint.every_steps=3"]
    r = subprocess.run(train_cmd(cfg, work) + sum((["--set", s] for s in sets), []),
                       env=subprocess_env(2), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["distill_queries"] for x in lines) > 0
