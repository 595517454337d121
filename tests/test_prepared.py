"""Prepared training data: the corpus streamed into a token store with an on-disk id index,
found again by the inputs' fingerprints (a warm start reads no text), rebuilt when an input
changes; bad corpora named by file and record."""

import json
import os

import numpy as np
import pytest

from negjax.data import formats, prepared, token_store
from negjax.data.prepared import prepare_training
from negjax.errors import NegjaxError
from negjax.mining.filters import hash_groups, text_groups
from test_token_store import minilm_tokenizer

DOCS = [{"id": f"d{i}", "text": f"document number {i} about {w}", **({"title": "T"} if i % 3 == 0 else {})}
        for i, w in enumerate(["cats", "dogs", "cats", "birds", "fish", "trees", "rocks", "sand"])]
DOCS[7]["text"] = DOCS[2]["text"].upper()  # the same normalised text as d2 (neither has a title)
TRAIN = [{"id": "q0", "query": "which cats", "pos": ["d0"], "neg": ["d1", "d2"]},
         {"id": "q1", "query": "which dogs", "pos": ["d1", "d3"], "neg": [],
          "pos_scores": [1.0, 0.5], "neg_scores": []},
         {"id": "q2", "query": "which fish", "pos": ["d4"]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return minilm_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def inputs(tmp_path):
    return {"corpus": write_jsonl(tmp_path / "corpus.jsonl", DOCS),
            "train": write_jsonl(tmp_path / "train.jsonl", TRAIN), "train_qrels": None}


def prepare(paths, tok, cache, **kw):
    return prepare_training(paths, tok, doc_max_len=16, query_max_len=8, cache_dir=cache,
                            prompts={"query": "q: ", "doc": ""}, **kw)


def test_streamed_store_matches_the_readers_and_warm_start_reads_no_text(inputs, tok, tmp_path,
                                                                          monkeypatch):
    data = prepare(inputs, tok, tmp_path / "cache")
    assert sorted(data.built) == ["docs", "train"]
    corpus, ex = formats.read_training(inputs["train"], inputs["corpus"])
    want = token_store.build_token_store(corpus.texts, corpus.ids, tok, max_len=16,
                                         cache_dir=tmp_path / "ref", name="docs")
    assert list(data.docs.keys) == corpus.ids
    assert data.docs.offsets.tolist() == want.offsets.tolist()
    assert np.array_equal(np.asarray(data.docs.ids), np.asarray(want.ids))
    assert data.docs.rows_of(["d5", "nope", "d0", ""]).tolist() == [5, -1, 0, -1]
    assert data.docs.row("d7") == 7 and "d8" not in data.docs.index
    th = data.docs.text_hash
    assert th[2] == th[7] and len(set(th.tolist())) == len(DOCS) - 1  # text-level dedup by hash
    same = lambda g: (g[:, None] == g[None, :]).tolist()  # noqa: E731
    assert same(hash_groups(th)) == same(text_groups(corpus.texts))
    assert [data.queries.tokens(i).tolist()[1:3] != [] for i in range(3)] == [True] * 3
    e = data.examples
    assert list(e.query_ids) == ["q0", "q1", "q2"] and len(e) == 3
    assert [e.positives[i] for i in range(3)] == ex.positives
    assert [e.negatives[i] for i in range(3)] == ex.negatives
    assert e.lines.tolist() == [1, 2, 3]
    assert e.has_teacher_scores and e.teacher[1] == {1: 1.0, 3: 0.5} and e.teacher[0] == {}

    # Warm: the stores are found by fingerprint, no record is read.
    def no_reading(*a, **k):
        raise AssertionError("a warm start read an input")
    monkeypatch.setattr(prepared, "iter_records", no_reading)
    monkeypatch.setattr(formats, "iter_records", no_reading)
    again = prepare(inputs, tok, tmp_path / "cache")
    assert again.built == [] and again.docs.dir == data.docs.dir
    monkeypatch.undo()

    # An edited training file rebuilds the examples only; an edited corpus both.
    write_jsonl(inputs["train"], TRAIN[:2])
    third = prepare(inputs, tok, tmp_path / "cache")
    assert third.built == ["train"] and len(third.examples) == 2
    os.utime(inputs["corpus"], ns=(1, 1))
    assert sorted(prepare(inputs, tok, tmp_path / "cache").built) == ["docs", "train"]


def test_bad_corpora_are_named(inputs, tok, tmp_path):
    bad = DOCS[:3] + [{"id": "d1", "text": "again"}]
    write_jsonl(inputs["corpus"], bad)
    with pytest.raises(NegjaxError, match=r"corpus.jsonl:4: duplicate document id 'd1' \(first at line 2\)"):
        prepare(inputs, tok, tmp_path / "c1")
    write_jsonl(inputs["corpus"], DOCS[:2] + [{"id": "d2"}])
    with pytest.raises(NegjaxError, match=r"corpus.jsonl:3: .*text"):
        prepare(inputs, tok, tmp_path / "c2")
    assert list((tmp_path / "c2" / "tokens").iterdir()) == []  # no store, no temporary one
    write_jsonl(inputs["corpus"], DOCS[:4])
    with pytest.raises(NegjaxError, match=r"train.jsonl:3: pos\[0\]: unknown corpus id 'd4'"):
        prepare(inputs, tok, tmp_path / "c3")
    assert not [p for p in (tmp_path / "c3" / "tokens").iterdir() if p.name.startswith("train-")]


def test_key_index_survives_hash_collisions(tmp_path, tok, monkeypatch):
    """Keys whose 64-bit hashes collide (forced: hashes taken mod 3) still map to their rows:
    a hash match is confirmed against the stored key bytes."""
    real = token_store.hash_keys
    monkeypatch.setattr(token_store, "hash_keys", lambda keys: real(keys) % np.uint64(3))
    keys = [f"k{i}" for i in range(20)] + ["ü-ключ"]
    store = token_store.build_token_store([f"text {i}" for i in range(21)], keys, tok,
                                          max_len=8, cache_dir=tmp_path)
    assert store.rows_of(keys[::-1] + ["k20", "k"]).tolist() == list(range(20, -1, -1)) + [-1, -1]
    assert [store.index.get(k) for k in keys] == list(range(21)) and "k21" not in store.index
    assert store.keys[20] == "ü-ключ" and store.keys[-1] == "ü-ключ"
    with pytest.raises(NegjaxError, match="duplicate key 'k1'"):
        token_store.build_token_store(["a", "b", "c"], ["k0", "k1", "k1"], tok, max_len=8,
                                      cache_dir=tmp_path)


def test_pipeline_reads_shards_through_the_store(inputs, tok, tmp_path):
    """load_negatives maps a shard's document ids through the store's keys (pyarrow, in
    place) to the same rows as through an in-memory corpus."""
    from negjax.data.shards import ShardWriter, load_negatives

    data = prepare(inputs, tok, tmp_path / "cache")
    corpus, ex = formats.read_training(inputs["train"], inputs["corpus"])
    out = tmp_path / "neg"
    w = ShardWriter(out)
    info = w.write(0, query_ids=["q2", "q0"], positive_ids=[["d4"], ["d0"]],
                   negative_ids=[["d7", "d6"], ["d3"]], negative_scores=[[0.5, 0.4], [0.3]])
    w.finalize(shards=[info])
    a = load_negatives(out, data.examples, data.corpus)
    b = load_negatives(out, ex, corpus)
    assert a.offsets.tolist() == b.offsets.tolist() == [0, 1, 1, 3]
    assert a.rows.tolist() == b.rows.tolist() == [3, 7, 6]


def test_parallel_build_is_the_one_process_store(tok, tmp_path, monkeypatch):
    """A corpus read by 3 processes (byte ranges of a JSONL and of a TSV file) is the store one
    process writes, file for file; a bad record in a later range is named by its line in the
    file, the first in the file when two ranges fail, and a duplicate id across ranges names
    both lines; a failed build leaves nothing behind."""
    from negjax.data import corpus_build

    docs = [{"id": f"d{i}", "text": f"text {i} about {w} " * (1 + i % 4)}
            for i, w in enumerate(["cats", "dogs", "birds", "fish", "trees"] * 40)]
    jsonl = write_jsonl(tmp_path / "big.jsonl", docs)
    tsv = tmp_path / "big.tsv"
    tsv.write_text("id\ttext\n" + "".join(f"{d['id']}\t{d['text']}\n" for d in docs))

    def build(path, processes, cache):
        monkeypatch.setenv("NEGJAX_BUILD_PROCESSES", str(processes))
        return prepared.corpus_store(path, tok, max_len=16, cache_dir=tmp_path / cache)

    for path in (jsonl, tsv):
        one, three = build(path, 1, f"one{path.suffix}"), build(path, 3, f"three{path.suffix}")
        assert len(corpus_build.plan(path)) == 3 and len(three) == len(docs)
        assert sorted(f.name for f in three.dir.iterdir()) == sorted(f.name for f in one.dir.iterdir())
        for f in one.dir.iterdir():
            assert (three.dir / f.name).read_bytes() == f.read_bytes(), f.name

    bad = list(docs)
    bad[150] = {"id": "d150"}
    write_jsonl(jsonl, bad)
    with pytest.raises(NegjaxError, match=r"big.jsonl:151: .*text"):
        build(jsonl, 3, "e1")
    bad[20] = {"id": "d20"}
    write_jsonl(jsonl, bad)
    with pytest.raises(NegjaxError, match=r"big.jsonl:21: .*text"):
        build(jsonl, 3, "e2")
    write_jsonl(jsonl, docs + [{"id": "d3", "text": "again"}])
    with pytest.raises(NegjaxError, match=r"big.jsonl:201: duplicate document id 'd3' \(first at line 4\)"):
        build(jsonl, 3, "e3")
    for cache in ("e1", "e2", "e3"):
        assert list((tmp_path / cache / "tokens").iterdir()) == []  # no store, no temporary one


def test_parallel_training_records_are_the_one_process_examples(tok, tmp_path, monkeypatch):
    """Training records read by 3 processes (byte ranges, ids resolved through the finished
    corpus store) are the examples one process writes, file for file, teacher scores
    included; an unknown id in a later range and a query id repeated across ranges are named
    by their lines in the file."""
    docs = [{"id": f"d{i}", "text": f"document {i} on {w}"}
            for i, w in enumerate(["cats", "dogs", "birds", "fish"] * 25)]
    train = [{"id": f"q{i}", "query": f"which {i}", "pos": [f"d{i % 100}"],
              "neg": [f"d{(i + 1) % 100}", f"d{(i + 7) % 100}"],
              **({"pos_scores": [1.0], "neg_scores": [0.5, 0.25]} if i % 2 else {})}
             for i in range(240)]
    paths = {"corpus": write_jsonl(tmp_path / "corpus.jsonl", docs),
             "train": write_jsonl(tmp_path / "train.jsonl", train), "train_qrels": None}

    def build(processes, cache):
        monkeypatch.setenv("NEGJAX_BUILD_PROCESSES", str(processes))
        return prepare(paths, tok, tmp_path / cache)

    from negjax.data import corpus_build

    split, real = [], corpus_build.build_parts
    monkeypatch.setattr(corpus_build, "build_parts",
                        lambda w, spans, spec: (split.append((spec["kind"], len(spans))),
                                                real(w, spans, spec)))
    one, three = build(1, "one"), build(3, "three")
    assert split == [("docs", 3), ("train", 3)]  # the 3-process build did split both files
    a, b = one.queries.dir.parent, three.queries.dir.parent  # (train-<key>/queries)
    files = sorted(str(f.relative_to(a)) for f in a.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(b)) for f in b.rglob("*") if f.is_file())
    assert "teacher_scores.npy" in files and len(three.examples) == 240
    for f in files:
        assert (b / f).read_bytes() == (a / f).read_bytes(), f

    bad = list(train)
    bad[180] = {**train[180], "pos": ["nope"]}
    write_jsonl(paths["train"], bad)
    with pytest.raises(NegjaxError, match=r"train.jsonl:181: pos\[0\]: unknown corpus id 'nope'"):
        build(3, "e1")
    write_jsonl(paths["train"], train + [{**train[3], "query": "again"}])
    with pytest.raises(NegjaxError, match=r"train.jsonl:241: duplicate query id 'q3' \(first at line 4\)"):
        build(3, "e2")
    for cache in ("e1", "e2"):
        assert not [p for p in (tmp_path / cache / "tokens").iterdir() if p.name.startswith("train-")]
