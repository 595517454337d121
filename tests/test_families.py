"""Every encoder family through the commands users run: a random-init model of the family
('tiny' + model.architecture, with prompts) trains (loss falls), evaluates, mines and encodes
on a slice of the built-in data; eval's rankings, mine's scores and encode's embeddings are
those of the prompted texts (the training token stores' prompts: tests/test_pipeline.py)."""

import dataclasses
import json
import subprocess

import numpy as np
import pytest

from helpers import REPO, run_negjax, subprocess_env, train_cmd, write_config

PROMPTS = {"query": "query: ", "doc": "passage: "}


# Two families keep CI time down: ModernBERT, and Qwen3 with LoRA (the other families' math
# is checked in tests/test_model.py; all six ran through these commands on the full built-in
# data in experiments/families/run_families.py).
@pytest.mark.parametrize("arch,extra", [("modernbert", []), ("qwen3", ["model.lora_rank=4"])])
def test_family_trains_evaluates_mines_and_encodes(tmp_path, small_data, arch, extra):  # noqa: F811
    from negjax.model import encode_texts
    from negjax.model.loader import load_model

    cfg = write_config(tmp_path, small_data, steps=30)
    work = tmp_path / "w"
    sets = [f"model.architecture={arch}", "model.num_layers=2", "model.dropout=0.0",
            f"model.query_prompt={PROMPTS['query']}", f"model.doc_prompt={PROMPTS['doc']}",
            "train.learning_rate=3e-3", "train.log_every=5", "checkpoint.every_steps=30", *extra]
    cmd = train_cmd(cfg, work) + sum((["--set", s] for s in sets), [])
    r = subprocess.run(cmd, env=subprocess_env(2), capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.9, losses

    # The prompts reach the tokenizer in eval and mine: their scores are those of the prompted
    # texts encoded in this process by the same model with no prompts configured.
    enc, params, _ = load_model(work)
    assert enc.prompts == PROMPTS
    bare = dataclasses.replace(enc, prompts={})

    def read(name):
        return [json.loads(x) for x in (small_data / name).read_text().splitlines()]

    corpus = {d["id"]: d["text"] for d in read("corpus.jsonl")}
    queries = {q["id"]: q["text"] for q in read("dev_queries.jsonl")[:8]}

    def scores(pairs, prompt=True):
        qs = [(PROMPTS["query"] if prompt else "") + t for t, _ in pairs]
        ds = [(PROMPTS["doc"] if prompt else "") + corpus[d] for _, d in pairs]
        # (the lengths of the training config, which eval and mine of a workdir use)
        q = encode_texts(bare, params, qs, tower="query", batch_size=16, max_length=16)
        d = encode_texts(bare, params, ds, tower="doc", batch_size=16, max_length=32)
        return np.sum(q * d, axis=1)

    r = run_negjax("eval", "--model", work, "--corpus", small_data / "corpus.jsonl", "--queries",
                   small_data / "dev_queries.jsonl", "--qrels", small_data / "dev_qrels.tsv",
                   "--json", "--save-run", tmp_path / "run.trec", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0.0 < json.loads(r.stdout)["mrr@10"] <= 1.0
    run = [x.split() for x in (tmp_path / "run.trec").read_text().splitlines()]
    top = [(queries[q], d, float(sc)) for q, _, d, rank, sc, _ in run if q in queries and int(rank) <= 3]
    assert len(top) == 3 * len(queries)
    pairs = [(t, d) for t, d, _ in top]
    np.testing.assert_allclose(scores(pairs), [sc for *_, sc in top], atol=2e-5)
    assert np.abs(scores(pairs, prompt=False) - [sc for *_, sc in top]).max() > 1e-3

    r = run_negjax("mine", "--model", work, "--corpus", small_data / "corpus.jsonl", "--train",
                   small_data / "train.jsonl", "--out", tmp_path / "mined", "--index", "exact",
                   "--negatives-kept", 4, env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((tmp_path / "mined").glob("shard-*.parquet"))[0]).to_pylist()[:6]
    train = {t["id"]: t["query"] for t in read("train.jsonl")}
    pairs = [(train[row["query_id"]], d) for row in rows for d in row["negative_ids"][:2]]
    mined = [s for row in rows for s in row["negative_scores"][:2]]
    np.testing.assert_allclose(scores(pairs), mined, atol=2e-5)
    pairs = [(train[row["query_id"]], row["positive_ids"][0]) for row in rows]
    np.testing.assert_allclose(scores(pairs), [row["positive_score"] for row in rows], atol=2e-5)

    # encode through the CLI = the prompted texts encoded in this process without prompts.
    texts = ["a domestic dog", "water that falls from clouds"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for tower in ("doc",):
        out = tmp_path / f"{tower}.npy"
        r = run_negjax("encode", "--model", work, "--input", tmp_path / "in.jsonl", "--output",
                       out, "--tower", tower, env=subprocess_env(1))
        assert r.returncode == 0, r.stderr[-3000:]
        want = encode_texts(bare, params, [PROMPTS[tower] + t for t in texts], tower=tower,
                            batch_size=8)
        unprompted = encode_texts(bare, params, texts, tower=tower, batch_size=8)
        np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-6)
        assert np.abs(want - unprompted).max() > 1e-3
