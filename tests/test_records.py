"""Inputs in every format: JSONL, Parquet (files, directories), Arrow (`datasets.save_to_disk`
directories), MS MARCO TSV; the column conventions of FlagEmbedding, sentence-transformers
and Tevatron; malformed rows named by file and row."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negjax.data import formats
from negjax.data.records import input_kind, iter_records
from negjax.errors import NegjaxError
from tests.helpers import run_negjax


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_parquet_dir(rows: list[dict], out: Path, files: int = 2, row_group: int = 37) -> Path:
    """`rows` as a directory of `files` Parquet files with small row groups."""
    out.mkdir(parents=True)
    step = -(-len(rows) // files)
    for k in range(files):
        pq.write_table(pa.Table.from_pylist(rows[k * step:(k + 1) * step]),
                       out / f"part-{k:05d}.parquet", row_group_size=row_group)
    return out


def write_arrow_dataset(rows: list[dict], out: Path, files: int = 2) -> Path:
    """`rows` in the layout `datasets.Dataset.save_to_disk` writes: data-*.arrow IPC streams
    listed in state.json."""
    out.mkdir(parents=True)
    step = -(-len(rows) // files)
    names = []
    for k in range(files):
        table = pa.Table.from_pylist(rows[k * step:(k + 1) * step])
        names.append(f"data-{k:05d}-of-{files:05d}.arrow")
        with pa.OSFile(str(out / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=29):
                w.write_batch(batch)
    (out / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                "_split": "train"}))
    (out / "dataset_info.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def formats_dirs(small_data, tmp_path_factory):
    """The same corpus + training pairs as JSONL, Parquet directories and Arrow datasets."""
    root = tmp_path_factory.mktemp("formats")
    corpus, train = _rows(small_data / "corpus.jsonl"), _rows(small_data / "train.jsonl")
    out = {"jsonl": (small_data / "corpus.jsonl", small_data / "train.jsonl")}
    out["parquet"] = (write_parquet_dir(corpus, root / "pq" / "corpus"),
                      write_parquet_dir(train, root / "pq" / "train"))
    out["arrow"] = (write_arrow_dataset(corpus, root / "arrow" / "corpus"),
                    write_arrow_dataset(train, root / "arrow" / "train"))
    return out


def test_every_format_reads_the_same_data_and_batches(formats_dirs, tmp_path):
    from negjax.data.pipeline import Pipeline
    from negjax.data.token_store import build_token_store
    from negjax.data.wordnet import tokenizer_dir

    read = {k: formats.read_training(t, c) for k, (c, t) in formats_dirs.items()}
    assert [input_kind(p) for p in formats_dirs["arrow"]] == ["arrow", "arrow"]
    ref_c, ref_x = read["jsonl"]
    batches = {}
    for kind, (corpus, ex) in read.items():
        assert (corpus.ids, corpus.texts, corpus.titles) == (ref_c.ids, ref_c.texts, ref_c.titles), kind
        assert (ex.query_ids, ex.queries, ex.positives, ex.negatives) == \
            (ref_x.query_ids, ref_x.queries, ref_x.positives, ref_x.negatives), kind
        docs = build_token_store(corpus.texts, corpus.ids, tokenizer_dir(), max_len=24,
                                 cache_dir=tmp_path / kind, name="docs")
        queries = build_token_store(ex.queries, ex.query_ids, tokenizer_dir(), max_len=12,
                                    cache_dir=tmp_path / kind, name="queries")
        pipe = Pipeline(examples=ex, query_store=queries, doc_store=docs, batch_size=8,
                        num_negatives=1, seed=3, prefetch=0)
        batches[kind] = [pipe.batch(k) for k in range(10)]
    for kind in ("parquet", "arrow"):
        for a, b in zip(batches["jsonl"], batches[kind]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind}: {key}")


def test_column_conventions(tmp_path):
    """sentence-transformers anchor/positive/negative_i and Tevatron's id columns read as the
    FlagEmbedding / pairs records they mean; MS MARCO TSV corpora and queries."""
    flag = [{"query": "a cat", "pos": ["feline animal"], "neg": ["a car", "a tree"]},
            {"query": "a dog", "pos": ["canine animal"], "neg": ["a log"]}]
    st = [{"anchor": "a cat", "positive": "feline animal", "negative_1": "a car", "negative_2": "a tree"},
          {"anchor": "a dog", "positive": "canine animal", "negative_1": "a log", "negative_2": None}]
    (tmp_path / "flag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flag))
    pq.write_table(pa.Table.from_pylist(st), tmp_path / "st.parquet")
    assert formats.detect_train_format(tmp_path / "st.parquet") == "sentence-transformers"
    c1, x1 = formats.read_training(tmp_path / "flag.jsonl")
    c2, x2 = formats.read_training(tmp_path / "st.parquet")
    assert (c1.ids, c1.texts) == (c2.ids, c2.texts)
    assert (x1.queries, x1.positives, x1.negatives) == (x2.queries, x2.positives, x2.negatives)
    one_neg = [{"anchor": r["anchor"], "positive": r["positive"], "negative": r["negative_1"]} for r in st]
    pq.write_table(pa.Table.from_pylist(one_neg), tmp_path / "st1.parquet")
    assert formats.read_training(tmp_path / "st1.parquet")[1].negatives == [[1], [3]]

    (tmp_path / "collection.tsv").write_text("id\ttext\nd1\tfeline animal\nd2\tcanine animal\n"
                                             "d3\ta car\n")
    tev = [{"query_id": "q1", "query_text": "a cat", "positive_document_ids": ["d1"],
            "negative_document_ids": ["d3"]},
           {"query_id": "q2", "query_text": "a dog", "positive_document_ids": ["d2"],
            "negative_document_ids": []}]
    pq.write_table(pa.Table.from_pylist(tev), tmp_path / "tev.parquet")
    corpus, ex = formats.read_training(tmp_path / "tev.parquet", tmp_path / "collection.tsv")
    assert corpus.ids == ["d1", "d2", "d3"] and ex.format == "tevatron-ids"
    assert (ex.query_ids, ex.queries, ex.positives, ex.negatives) == \
        (["q1", "q2"], ["a cat", "a dog"], [[0], [1]], [[2], []])
    with pytest.raises(NegjaxError, match="need the corpus"):
        formats.read_training(tmp_path / "tev.parquet")
    (tmp_path / "queries.tsv").write_text("7\thow do cats purr\n8\twhy is the sky blue\n")
    q = formats.read_queries(tmp_path / "queries.tsv")
    assert (q.ids, q.texts) == (["7", "8"], ["how do cats purr", "why is the sky blue"])


@pytest.mark.parametrize("kind", ["parquet", "arrow", "tsv"])
def test_malformed_rows_name_file_and_row(tmp_path, kind):
    corpus = [{"id": f"d{i}", "text": f"document {i}"} for i in range(10)]
    corpus[7]["text"] = None if kind != "arrow" else ""
    if kind == "parquet":
        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist(corpus), path, row_group_size=4)
        where = r"corpus.parquet: row 8 \(row group 1\): field 'text' \(document text\) is null"
    elif kind == "arrow":
        path = write_arrow_dataset(corpus, tmp_path / "corpus", files=1)
        where = r"data-00000-of-00001.arrow: row 8 \(record batch 0\): field 'text' \(document text\) is empty"
    else:
        path = tmp_path / "corpus.tsv"
        path.write_text("".join(f"{r['id']}\t{r['text']}\n" if r["text"] else f"{r['id']}\tx\ty\n"
                                for r in corpus))
        where = r"corpus.tsv:8: expected 2 tab-separated columns \(id, text\), got 3"
    with pytest.raises(NegjaxError, match=where):
        formats.read_corpus(path)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"query": "q", "pos": ["d0"]}) + "\n")
    res = run_negjax("data", "validate", "--corpus", str(path), "--train", str(train))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("negjax: error: "), res.stderr
    assert ("row 8" if kind != "tsv" else "corpus.tsv:8:") in lines[0], res.stderr


def test_input_digest_is_hashed_once_and_remembered_by_fingerprint(tmp_path):
    """`input_digest` (what a mining job's identity hashes) is `sha256_input`, computed once
    and then found by the files' path, size and mtime: a second call reads no byte of the
    input (a rewrite that keeps size and mtime keeps the old digest), a new mtime or size
    hashes again, and a damaged memo is recomputed."""
    import os

    from negjax.data.records import input_digest, sha256_input

    cache = tmp_path / "cache"
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"id": "a", "text": "one"}\n')
    first = input_digest(f, cache)
    assert first == sha256_input(f)
    assert len(list((cache / "digests").iterdir())) == 1
    st = f.stat()
    f.write_text('{"id": "b", "text": "two"}\n')  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_digest(f, cache) == first  # not read again
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    second = input_digest(f, cache)
    assert second == sha256_input(f) != first
    for m in (cache / "digests").iterdir():
        m.write_text("{not json")
    assert input_digest(f, cache) == second
    assert json.loads(max((cache / "digests").iterdir(), key=lambda m: m.stat().st_mtime_ns)
                      .read_text())["sha256"] == second  # rewritten
    # A directory input: its files' names and digests, remembered alike.
    d = write_parquet_dir([{"id": str(i), "text": f"t{i}"} for i in range(10)], tmp_path / "pq")
    assert input_digest(d, cache) == sha256_input(d)
    assert len(list((cache / "digests").iterdir())) == 3


def test_not_an_input(tmp_path):
    (tmp_path / "dd" / "train").mkdir(parents=True)
    (tmp_path / "dd" / "train" / "state.json").write_text("{}")
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(NegjaxError, match="a DatasetDict; pass one split's directory"):
        list(iter_records(tmp_path / "dd"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(NegjaxError, match="bad.parquet: not a readable parquet file"):
        formats.read_corpus(tmp_path / "bad.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NegjaxError, match="no .parquet files and no Arrow dataset"):
        formats.read_corpus(tmp_path / "empty")


def test_synthetic_data_is_the_same_in_jsonl_and_parquet(tmp_path):
    """`negjax bench data`'s generator: deterministic, the same records in either format."""
    from negjax.bench.data import write_synthetic

    a = write_synthetic(tmp_path / "a", 300, pairs_ratio=0.2, fmt="jsonl", seed=1)
    b = write_synthetic(tmp_path / "b", 300, pairs_ratio=0.2, fmt="parquet", seed=1)
    assert (a["documents"], a["pairs"]) == (b["documents"], b["pairs"]) == (300, 60)
    ca, xa = formats.read_training(tmp_path / "a" / "train.jsonl", tmp_path / "a" / "corpus.jsonl")
    cb, xb = formats.read_training(tmp_path / "b" / "train.parquet", tmp_path / "b" / "corpus.parquet")
    assert (ca.ids, ca.texts) == (cb.ids, cb.texts) and len(set(ca.texts)) == 300
    assert (xa.query_ids, xa.queries, xa.positives) == (xb.query_ids, xb.queries, xb.positives)
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind


def test_streamed_token_stores_are_identical_in_every_format(formats_dirs, tmp_path, monkeypatch):
    """What training, mining and evaluation read (`prepare_training`: the corpus streamed into
    its store, the training records as arrays) is the same bytes from JSONL, Parquet and
    Arrow; the JSONL corpus and training file also through the parallel byte-range build.
    The training records carry no query ids (FlagEmbedding's columns): each gets '#N', N its
    number in the input, counted across the files of a directory (not the row in its file)."""
    from negjax.data.prepared import prepare_training
    from negjax.data.wordnet import tokenizer_dir

    monkeypatch.setenv("NEGJAX_BUILD_PROCESSES", "2")  # (any size: JSONL in 2 byte ranges)
    rows = [{k: v for k, v in r.items() if k != "id"} for r in _rows(formats_dirs["jsonl"][1])]
    trains = {"jsonl": tmp_path / "train.jsonl", "parquet": write_parquet_dir(rows, tmp_path / "pq"),
              "arrow": write_arrow_dataset(rows, tmp_path / "arrow")}
    trains["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrays = {}
    for kind, (corpus, _) in formats_dirs.items():
        train = trains[kind]
        data = prepare_training({"corpus": corpus, "train": train, "train_qrels": None},
                                tokenizer_dir(), doc_max_len=24, query_max_len=12,
                                cache_dir=tmp_path / kind)
        assert sorted(data.built) == ["docs", "train"]
        stores = {"docs": data.docs.dir, "queries": data.queries.dir,
                  "train": data.queries.dir.parent}
        arrays[kind] = {f"{name}/{f.name}": f.read_bytes() for name, d in stores.items()
                        for f in sorted(d.iterdir()) if f.suffix in (".npy", ".bin")}
        assert list(data.examples.query_ids)[:2] == ["#1", "#2"] and len(data.examples) == len(rows)
        assert list(data.examples.query_ids)[-1] == f"#{len(rows)}"
        # (lines.npy: each record's place in its own file, a line or a row of one Parquet file)
        assert arrays[kind].pop("train/lines.npy")
    assert len(arrays["jsonl"]) >= 20
    for kind in ("parquet", "arrow"):
        assert arrays[kind].keys() == arrays["jsonl"].keys()
        for name, data in arrays["jsonl"].items():
            assert arrays[kind][name] == data, f"{kind}: {name}"


def test_a_dataset_directory_in_parquet_and_arrow_trains(formats_dirs, tmp_path):
    """`data.dataset` holding corpus/ and train/ as Parquet or Arrow directories passes the
    training command's input checks and reads as the JSONL one (the CLI: `negjax train` on
    each gives identical losses, checked by hand in the issue's note)."""
    from negjax.config import load_config
    from negjax.data.layout import load_training_data
    from negjax.train.loop import _check_inputs

    ref = None
    for kind in ("parquet", "arrow"):
        root = formats_dirs[kind][0].parent
        cfg = load_config(None, [f"workdir={tmp_path / kind}", f"data.dataset={root}"])
        paths = _check_inputs(cfg)["default"]
        assert paths["corpus"] == root / "corpus" and paths["train"] == root / "train"
        corpus, ex = load_training_data(cfg.data)
        got = (corpus.ids, corpus.texts, ex.positives)
        assert ref is None or got == ref
        ref = got


def test_bench_data_rounds_each_train(tmp_path):
    """`negjax bench data --runs warm,warm`: each round trains in its own workdir (a repeated
    name used to reuse the first's finished workdir and train nothing), reported as warm and
    warm2; an unknown run name is refused before any data is written."""
    import json

    from tests.helpers import subprocess_env

    bad = run_negjax("bench", "data", "--synthetic", 50, "--out", tmp_path / "x", "--runs", "cold,hot",
                     env=subprocess_env(1))
    assert bad.returncode == 2 and "--runs takes cold and warm" in bad.stderr
    assert not (tmp_path / "x").exists()
    out = tmp_path / "bench.json"
    r = run_negjax("bench", "data", "--synthetic", 200, "--out", tmp_path / "d", "--runs", "warm,warm",
                   "--steps", 1, "--json", out, env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["warm", "warm2"]
    for run in runs.values():
        assert run["first_step_s"] > 0 and "first step" in run["phases_s"]
