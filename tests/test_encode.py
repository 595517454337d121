"""Batch encoding (`negjax encode`, `encode_texts`) and export, against sentence-transformers.

The MiniLM fixture (64 sentences + sentence-transformers' embeddings) comes from
tools/make_fixtures.py; sentence-transformers itself is a test-only dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import run_negjax

from negjax.config import ModelConfig
from negjax.model import bucket_lengths, encode_texts, encode_tokens, export_hf, load_encoder, minilm_dir
from negjax.model.tokenizer import tokenize_padded

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_bert"
SENTENCES = [json.loads(line)["text"] for line in
             (FIXTURES / "minilm_sentences.jsonl").read_text(encoding="utf-8").splitlines()]

# Varied lengths for the tiny model's 100-token vocabulary.
TINY_TEXTS = [" ".join(["the cat runs", "a dog is in the", "cats and dogs", "x"][i % 4]
                       for _ in range(1 + (i * 7) % 23)) + ("!" * (i % 3)) for i in range(37)]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(ModelConfig(name="minilm"))


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_encode_cli_matches_sentence_transformers(tmp_path):
    """Acceptance: `negjax encode` (8 devices, batch not a multiple of 8, length buckets) of
    64 varied sentences vs sentence-transformers' PyTorch embeddings, fp32 on CPU."""
    out = tmp_path / "emb.npy"
    run_negjax("encode", "--model", "minilm", "--input", FIXTURES / "minilm_sentences.jsonl",
               "--output", out, "--batch-size", 20, check=True)
    got = np.load(out)
    want = np.load(FIXTURES / "minilm_embeddings.npy")
    assert got.dtype == np.float32 and got.shape == (64, 384)
    assert _cos(got, want).min() >= 0.99999
    assert np.abs(got - want).max() <= 1e-4


def test_encode_texts_order_buckets_padding():
    """Bucketed, sorted, device-padded batches give each text the embedding it gets in one
    plain batch padded to the max length, in input order (tiny random BERT, 37 texts, batch
    12 on 8 devices)."""
    enc = load_encoder(ModelConfig(name=str(TINY)))
    assert bucket_lengths(64) == [16, 32, 64] and bucket_lengths(100) == [16, 32, 64, 100]
    got = encode_texts(enc, enc.params, TINY_TEXTS, batch_size=12, max_length=64)
    assert got.shape == (len(TINY_TEXTS), 32) and got.dtype == np.float32
    tokens, mask = tokenize_padded(enc.tokenizer, TINY_TEXTS, 64)
    lengths = mask.sum(1)
    assert lengths.min() < 16 < 32 < lengths.max() <= 64  # several buckets are used
    want = np.asarray(jax.jit(enc.encode)(enc.params, tokens, mask))
    np.testing.assert_allclose(got, want, atol=2e-5)
    # The token-array entry point (a token store's rows) agrees.
    np.testing.assert_allclose(encode_tokens(enc, enc.params, tokens, mask, batch_size=16), got,
                               atol=2e-5)
    # Called from a training loop: inside its Explicit mesh, with params placed on it.
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with jax.set_mesh(mesh):
        params = jax.device_put(enc.params, NamedSharding(mesh, P()))
        inside = encode_texts(enc, params, TINY_TEXTS, batch_size=12, max_length=64)
    np.testing.assert_allclose(inside, got, atol=1e-6)


def test_encode_micro_batches_and_short_batches(monkeypatch):
    """Each device encodes its rows a micro-batch at a time, skipping micro-batches a short
    batch leaves empty: several micro-batches per device (a fori_loop), micro-batches of 2-4
    rows by bucket, a last batch per bucket that leaves some of the 8 devices idle. Every row
    gets its one-batch embedding, in input order; a fixed per-device batch fixes the bits
    (and one row per device, per_device=1, runs 1-row micro-batches)."""
    from negjax.model import encode as encode_mod

    enc = load_encoder(ModelConfig(name=str(TINY)))
    monkeypatch.setattr(encode_mod, "MICRO_TOKENS", 64)  # 4 rows at 16 tokens, 2 at 32 and 64
    assert [encode_mod.micro_rows(L, 5) for L in (16, 32, 64)] == [4, 2, 2]
    assert encode_mod.micro_rows(16, 3) == 3 and encode_mod.micro_rows(64, 1) == 1
    tokens, mask = tokenize_padded(enc.tokenizer, TINY_TEXTS, 64)
    want = np.asarray(jax.jit(enc.encode)(enc.params, tokens, mask))
    got = encode_texts(enc, enc.params, TINY_TEXTS, batch_size=40, max_length=64)
    np.testing.assert_allclose(got, want, atol=2e-5)
    fixed = encode_texts(enc, enc.params, TINY_TEXTS, max_length=64, per_device=5)
    np.testing.assert_array_equal(fixed, got)  # 40 texts over 8 devices = 5 rows each
    rev = encode_texts(enc, enc.params, TINY_TEXTS[::-1], max_length=64, per_device=5)
    np.testing.assert_array_equal(rev[::-1], got)  # other batch-mates, same bits
    np.testing.assert_allclose(encode_texts(enc, enc.params, TINY_TEXTS[:11], max_length=64,
                                            per_device=1), want[:11], atol=2e-5)


def test_export_sentence_transformers_and_automodel(minilm, tmp_path):
    """Acceptance: export -> SentenceTransformer(exported).encode equals negjax's encode."""
    from sentence_transformers import SentenceTransformer

    out = export_hf(minilm, minilm.params, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling",
            "2_Normalize", "sentence_bert_config.json"} <= names
    ours = encode_texts(minilm, minilm.params, SENTENCES, batch_size=32)
    st = SentenceTransformer(str(out), device="cpu").encode(SENTENCES, batch_size=32)
    assert _cos(ours, st).min() >= 0.99999
    assert np.abs(ours - st).max() <= 1e-4
    with pytest.raises(Exception, match="not empty"):
        export_hf(minilm, minilm.params, out)


def test_export_cli_tiny_cls_unnormalised(tmp_path):
    """`negjax export` of a plain HF dir with CLS pooling and no normalisation: AutoModel
    reproduces the PyTorch reference hidden states, SentenceTransformer our embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from negjax.cli import main

    out = tmp_path / "hf"
    sets = ["--set", "model.pooling=cls", "--set", "model.normalize=false"]
    assert main(["export", "--checkpoint", str(TINY), "--out", str(out), *sets]) == 0
    assert not (out / "2_Normalize").exists()
    ref = np.load(FIXTURES / "tiny_bert_reference.npz")
    model = AutoModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ref["tokens"], dtype=torch.long),
                       attention_mask=torch.tensor(ref["mask"], dtype=torch.long)).last_hidden_state
    np.testing.assert_allclose(hidden.numpy(), ref["hidden"], atol=1e-5)

    enc = load_encoder(ModelConfig(name=str(out), normalize=False))
    assert enc.pooling == "cls"  # read back from the exported 1_Pooling
    ours = encode_texts(enc, enc.params, TINY_TEXTS, batch_size=16)
    st = SentenceTransformer(str(out), device="cpu").encode(TINY_TEXTS)
    assert _cos(ours, st).min() >= 0.99999
    np.testing.assert_allclose(ours, st, atol=1e-4)


def test_encode_cli_input_errors_and_tiny(tmp_path, capsys):
    from negjax.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"id": "2", "txt": "no text key"}\n')
    out = tmp_path / "out.npy"
    assert main(["encode", "--model", str(TINY), "--input", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2:" in err, err

    bad.write_text('{"text": "fine"}\n{not json\n')
    assert main(["encode", "--model", str(TINY), "--input", str(bad), "--output", str(out)]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    assert not out.exists()

    # 'tiny' from scratch with any tokenizer directory; doc tower of separate towers.
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TINY_TEXTS[:5])))
    rc = main(["encode", "--model", "tiny", "--input", str(good), "--output", str(out),
               "--tower", "doc", "--set", f"model.tokenizer={TINY}", "--set", "model.hidden_size=16",
               "--set", "model.num_layers=1", "--set", "model.tied_towers=false"])
    assert rc == 0
    emb = np.load(out)
    assert emb.shape == (5, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_minilm_dir_is_cached():
    a = minilm_dir()
    b = minilm_dir()
    assert a == b and (a / "config.json").is_file() and (a / "model.safetensors").is_file()
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert jax.device_count() >= 1


def test_prompts_reach_the_tokenizer_in_encode_eval_and_mine(monkeypatch, tmp_path):
    """The tower's prompt goes in front of every text wherever texts are encoded: `negjax
    encode` and evaluation (`encode_texts`, `encode_across_processes`), the mining job
    (`encode_chunked`); the mining cache key changes with it; the export carries it to
    sentence-transformers (`prompt_name='query'` gives negjax's query embeddings)."""
    from sentence_transformers import SentenceTransformer

    from negjax.mining.embeddings import encode_chunked, model_identity
    from negjax.model import encode as encode_mod

    seen = []
    real = encode_mod.tokenize
    monkeypatch.setattr(encode_mod, "tokenize",
                        lambda tok, texts, n: seen.append(list(texts)) or real(tok, texts, n))
    plain = load_encoder(ModelConfig(name=str(TINY)))
    enc = load_encoder(ModelConfig(name=str(TINY), query_prompt="query: ", doc_prompt="passage: "))
    q = encode_texts(enc, enc.params, ["the cat runs"], tower="query")
    encode_mod.encode_across_processes(enc, enc.params, ["a dog"], tower="doc")
    encode_chunked(enc, enc.params, ["cats", "dogs"], tower="doc", max_length=16, batch_size=8,
                   chunk=8, directory=tmp_path / "emb", stage="doc")
    assert seen == [["query: the cat runs"], ["passage: a dog"], ["passage: cats", "passage: dogs"]]
    np.testing.assert_allclose(q, encode_texts(plain, plain.params, ["query: the cat runs"]),
                               atol=1e-6)
    assert model_identity(enc) != model_identity(plain)
    assert "prompts" not in model_identity(plain)  # caches of prompt-less runs keep their keys

    out = export_hf(enc, enc.params, tmp_path / "export")
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": "query: ", "document": "passage: "}
    back = load_encoder(ModelConfig(name=str(out)))  # prompts read back from the export
    assert back.prompts == {"query": "query: ", "doc": "passage: "}
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(["the cat runs"], prompt_name="query", convert_to_numpy=True)
    np.testing.assert_allclose(got, q, atol=1e-5)


def test_last_token_pooling_right_and_left_padding(tmp_path):
    """pooling 'last': the hidden state of the last real token, whether rows are padded on
    the right or on the left; `negjax encode --pooling last` uses it, and an export with it
    loads in sentence-transformers (pooling_mode_lasttoken) with the same embeddings."""
    import jax.numpy as jnp
    from sentence_transformers import SentenceTransformer

    from negjax.model.bert import pool

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    left = right[:, ::-1].copy()
    np.testing.assert_array_equal(pool(jnp.asarray(hidden), jnp.asarray(right), "last"),
                                  hidden[[0, 1, 2], [2, 4, 0]])
    np.testing.assert_array_equal(pool(jnp.asarray(hidden), jnp.asarray(left), "last"),
                                  hidden[:, 4])

    enc = load_encoder(ModelConfig(name=str(TINY), pooling="last"))
    texts = TINY_TEXTS[:6]
    emb = encode_texts(enc, enc.params, texts, max_length=32)
    tokens, mask = tokenize_padded(enc.tokenizer, texts, 32)
    hid = np.asarray(enc.hidden_states(enc.params, tokens, mask))
    want = hid[np.arange(len(texts)), mask.sum(1) - 1]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, want, atol=2e-5)
    out = export_hf(enc, enc.params, tmp_path / "export")
    st = SentenceTransformer(str(out), device="cpu")
    st.max_seq_length = 32  # as negjax above (some texts are longer)
    np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), emb, atol=1e-5)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_negjax("encode", "--model", str(out), "--input", str(inp), "--output",
               str(tmp_path / "o.npy"), "--pooling", "mean", "--max-length", "32", check=True)
    mean = load_encoder(ModelConfig(name=str(TINY)))
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"),
                               encode_texts(mean, mean.params, texts, max_length=32), atol=1e-5)


def test_encode_store_equals_encode_texts(tmp_path):
    """Encoding rows of a token store (mining, evaluation) gives the embeddings of encoding
    their texts, bit for bit: same tokens (prompt, truncation, special tokens), same padding."""
    from negjax.data.token_store import build_token_store
    from negjax.model.encode import encode_store

    enc = load_encoder(ModelConfig(name=str(TINY), doc_prompt="passage: "))
    texts = ["a cat", "the quick brown fox jumps over the lazy dog again and again and again",
             "x", "dogs bark", "birds sing in the morning", "fish"]
    store = build_token_store(enc.prompted(texts, "doc"), [f"d{i}" for i in range(6)],
                              enc.tokenizer, max_len=16, cache_dir=tmp_path)
    for per_device in (None, 2):
        got = encode_store(enc, enc.params, store, 1, 5, tower="doc", batch_size=8,
                           per_device=per_device)
        want = encode_texts(enc, enc.params, texts[1:5], tower="doc", max_length=16,
                            batch_size=8, per_device=per_device)
        assert np.array_equal(got, want)


def test_evaluation_from_the_token_store_equals_from_texts(tmp_path):
    """EvalSet.from_files(encoder=...) keeps the corpus as a token store and encodes its rows:
    the same metrics as from the texts; a store tokenised to another length is refused."""
    from negjax.evaluation.evaluate import EvalSet, evaluate_encoder

    enc = load_encoder(ModelConfig(name=str(TINY), doc_prompt="passage: "))
    words = ["cat", "dog", "bird", "fish", "tree", "rock", "sand", "sea", "sun", "moon"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"a {w} and a {v}"})
                                              + "\n" for i, (w, v) in enumerate(zip(words, words[::-1]))))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "text": w}) + "\n"
                                              for i, w in enumerate(words[:4])))
    (tmp_path / "r.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    files = (tmp_path / "c.jsonl", tmp_path / "q.jsonl", tmp_path / "r.tsv")
    texts = EvalSet.from_files(*files)
    store = EvalSet.from_files(*files, encoder=enc, doc_max_len=16, cache_dir=tmp_path / "cache")
    assert store.corpus_texts == [] and list(store.corpus_ids) == texts.corpus_ids
    kw = dict(batch_size=8, query_max_len=8, doc_max_len=16)
    assert evaluate_encoder(enc, enc.params, store, **kw) == evaluate_encoder(enc, enc.params, texts, **kw)
    with pytest.raises(ValueError, match="tokenised to 16 tokens"):
        evaluate_encoder(enc, enc.params, store, **{**kw, "doc_max_len": 32})
