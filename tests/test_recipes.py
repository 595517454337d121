"""Training recipes through the commands users run: Matryoshka (loss.matryoshka_dims) with the
false-negative guard (loss.false_negative_margin, its count logged) trains, and encode / eval /
mine --dim K use the truncated, re-normalised embeddings; the export records the sizes and
loads in sentence-transformers with truncate_dim."""

import json
import subprocess

import numpy as np

from helpers import REPO, run_negjax, subprocess_env
from test_train import small_data, train_cmd, write_config  # noqa: F401  (a fixture)


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

    r = run_negjax("eval", "--model", work, "--corpus", small_data / "corpus.jsonl", "--queries",
                   small_data / "dev_queries.jsonl", "--qrels", small_data / "dev_qrels.tsv",
                   "--dim", 8, "--json", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["model"]["dim"] == 8

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
