"""Input readers: every supported format, and malformed records named by file and line."""

import gzip
import json

import pytest

from helpers import run_negjax
from negjax.data import formats
from negjax.data.validate import validate_dataset
from negjax.errors import NegjaxError

CORPUS = [{"_id": "d1", "title": "Cats", "text": "Cats purr."},
          {"_id": "d2", "text": "Dogs bark."},
          {"_id": "d3", "title": "", "text": "Birds sing."},
          {"_id": 4, "text": "Fish swim."}]


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


@pytest.fixture
def corpus_path(tmp_path):
    return write(tmp_path, "corpus.jsonl", jsonl(*CORPUS))


# --------------------------------------------------------------------------- well-formed input

def test_corpus_beir_ids_titles_and_gzip(tmp_path, corpus_path):
    c = formats.read_corpus(corpus_path)
    assert c.ids == ["d1", "d2", "d3", "4"]
    assert c.texts == ["Cats Cats purr.", "Dogs bark.", "Birds sing.", "Fish swim."]
    assert c.titles == ["Cats", "", "", ""]
    assert c.row("4") == 3
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus_path.read_bytes()))
    assert formats.read_corpus(gz).texts == c.texts


def test_pairs_with_corpus_ids(tmp_path, corpus_path):
    train = write(tmp_path, "train.jsonl", jsonl(
        {"query": "what purrs", "pos": ["d1"], "neg": ["d2", 4]},
        "",  # blank lines are not records
        {"id": "q7", "query": "who barks", "pos": ["d2", "d2"]}))
    corpus, ex = formats.read_training(train, corpus_path)
    assert ex.format == "pairs"
    assert ex.query_ids == ["#1", "q7"]
    assert ex.positives == [[0], [1]]
    assert ex.negatives == [[1, 3], []]
    assert ex.lines == [1, 3]


def test_pairs_inline_texts_dedup_by_normalised_text(tmp_path):
    train = write(tmp_path, "flag.jsonl", jsonl(
        {"query": "q one", "pos": ["Cats purr."], "neg": ["Dogs  bark.", "dogs bark."]},
        {"query": "q two", "pos": ["CATS PURR."], "neg": ["Birds sing."]}))
    corpus, ex = formats.read_training(train)
    assert len(corpus) == 3  # "Cats purr." == "CATS PURR.", "Dogs  bark." == "dogs bark."
    assert ex.positives == [[0], [0]]
    assert ex.negatives == [[1], [2]]
    assert corpus.ids[0] == formats.text_id("cats   purr.")


def test_tevatron_with_and_without_corpus(tmp_path, corpus_path):
    rec = {"query_id": "7", "query": "what purrs",
           "positive_passages": [{"docid": "d1", "title": "Cats", "text": "Cats purr."}],
           "negative_passages": [{"docid": "d2", "title": "", "text": "Dogs bark."}]}
    rec2 = {"query_id": "8", "query": "who sings",
            "positive_passages": [{"docid": "d3", "text": "Birds sing."}],
            "negative_passages": [{"docid": "d1", "title": "Cats", "text": "Cats purr."}]}
    path = write(tmp_path, "tev.jsonl", jsonl(rec, rec2))
    corpus, ex = formats.read_training(path)
    assert ex.format == "tevatron" and corpus.ids == ["d1", "d2", "d3"]
    assert corpus.texts[0] == "Cats Cats purr."
    assert ex.positives == [[0], [2]] and ex.negatives == [[1], [0]]
    corpus2, ex2 = formats.read_training(path, corpus_path)
    assert ex2.positives == [[0], [2]] and len(corpus2) == 4


@pytest.mark.parametrize("header", [True, False])
def test_beir_queries_and_qrels(tmp_path, corpus_path, header):
    queries = write(tmp_path, "queries.jsonl", jsonl(
        {"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "who barks"},
        {"_id": "q3", "text": "a test-split query"}))
    rows = "q1\td1\t1\nq1\td3\t0\nq2\td2\t2\n"
    qrels = write(tmp_path, "qrels/train.tsv", ("query-id\tcorpus-id\tscore\n" if header else "") + rows)
    corpus, ex = formats.read_training(queries, corpus_path, qrels=qrels)
    assert ex.format == "beir" and ex.query_ids == ["q1", "q2"]  # q3 is not judged: not training
    assert ex.positives == [[0], [1]] and ex.negatives == [[2], []]
    assert formats.read_qrels(qrels) == {"q1": {"d1": 1, "d3": 0}, "q2": {"d2": 2}}


def test_trec_qrels_four_columns(tmp_path):
    q = write(tmp_path, "q.trec", "q1 0 d1 1\nq1 0 d2 0\n")
    assert formats.read_qrels(q) == {"q1": {"d1": 1, "d2": 0}}


def test_validate_dataset_stats(tmp_path, corpus_path):
    train = write(tmp_path, "train.jsonl", jsonl(
        {"query": "what purrs", "pos": ["d1"], "neg": ["d2"]},
        {"query": "What  purrs", "pos": ["d2", "d3"]}))
    qrels = write(tmp_path, "dev_qrels.tsv", "query-id\tcorpus-id\tscore\nx1\td1\t1\nx1\td2\t0\n")
    s = validate_dataset(corpus_path, train, qrels)
    assert s["corpus"]["documents"] == 4
    assert s["train"]["queries"] == 2 and s["train"]["queries_without_negatives"] == 1
    assert s["train"]["positives_per_query"]["max"] == 2
    assert s["train"]["duplicate_query_texts"] == 1
    assert s["train"]["documents_never_positive"] == 1
    assert s["qrels"]["judgements"] == 2 and s["qrels"]["relevant"] == 1


def test_cli_validate_names_file_and_line(tmp_path, corpus_path):
    train = write(tmp_path, "train.jsonl", jsonl({"query": "q", "pos": ["d1"]},
                                                  {"query": "q", "pos": ["nope"]}))
    proc = run_negjax("data", "validate", "--corpus", corpus_path, "--train", train)
    assert proc.returncode == 2, proc.stderr
    assert f"{train}:2:" in proc.stderr and "nope" in proc.stderr
    ok = write(tmp_path, "ok.jsonl", jsonl({"query": "q", "pos": ["d1"]}))
    proc = run_negjax("data", "validate", "--corpus", corpus_path, "--train", ok)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["train"]["queries"] == 1


# --------------------------------------------------------------------------- malformed input
# (name, {file: content}, reader(paths) , file with the error, line, words in the message)

GOOD_C = jsonl(*CORPUS)
TEV_OK = {"query_id": "1", "query": "q", "positive_passages": [{"docid": "a", "text": "A."}]}


def _train(p):
    return formats.read_training(p["train.jsonl"], p["corpus.jsonl"])


def _inline(p):
    return formats.read_training(p["train.jsonl"])


def _beir(p):
    return formats.read_training(p["queries.jsonl"], p["corpus.jsonl"], qrels=p["qrels.tsv"])


MALFORMED = [
    ("corpus bad json", {"corpus.jsonl": jsonl(CORPUS[0], '{"_id": "x", "text": "oops"')},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "invalid JSON"),
    ("corpus missing text", {"corpus.jsonl": jsonl(CORPUS[0], CORPUS[1], {"_id": "x"})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 3, "missing field 'text'"),
    ("corpus empty text", {"corpus.jsonl": jsonl(CORPUS[0], {"_id": "x", "text": "  "})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "is empty"),
    ("corpus duplicate id", {"corpus.jsonl": jsonl(*CORPUS, {"id": "d2", "text": "again"})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 5, "duplicate document id 'd2'"),
    ("corpus text wrong type", {"corpus.jsonl": jsonl({"_id": "x", "text": 12})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 1, "must be a string"),
    ("corpus id wrong type", {"corpus.jsonl": jsonl(CORPUS[0], {"_id": ["x"], "text": "t"})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "string or an integer"),
    ("corpus missing id", {"corpus.jsonl": jsonl(CORPUS[0], {"text": "t"})},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "missing field"),
    ("corpus not an object", {"corpus.jsonl": jsonl(CORPUS[0], "[1, 2]")},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "expected a JSON object"),
    ("corpus invalid utf-8", {"corpus.jsonl": jsonl(CORPUS[0]).encode() + b'{"_id": "x", "text": "\xff"}\n'},
     lambda p: formats.read_corpus(p["corpus.jsonl"]), "corpus.jsonl", 2, "UTF-8"),
    ("train bad json", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": ["d1"]}, "{query}")},
     _train, "train.jsonl", 2, "invalid JSON"),
    ("train unknown id", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": ["d9"]})},
     _train, "train.jsonl", 1, "unknown corpus id 'd9'"),
    ("train negative is positive", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl(
        {"query": "q", "pos": ["d1"]}, {"query": "q", "pos": ["d1", "d2"], "neg": ["d3", "d2"]})},
     _train, "train.jsonl", 2, "also a positive"),
    ("train pos wrong type", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": "d1"})},
     _train, "train.jsonl", 1, "must be a list"),
    ("train pos entry wrong type", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": [{"id": "d1"}]})},
     _train, "train.jsonl", 1, "pos[0] must be a corpus id"),
    ("train empty pos", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": ["d1"]}, {"query": "q", "pos": []})},
     _train, "train.jsonl", 2, "empty list"),
    ("train missing query", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "q", "pos": ["d1"]}, {"pos": ["d1"]})},
     _train, "train.jsonl", 2, "missing field 'query'"),
    ("train empty query", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl({"query": "", "pos": ["d1"]})},
     _train, "train.jsonl", 1, "'query' (query text) is empty"),
    ("train duplicate query id", {"corpus.jsonl": GOOD_C, "train.jsonl": jsonl(
        {"id": "a", "query": "q", "pos": ["d1"]}, {"id": "b", "query": "q", "pos": ["d1"]}, {"id": "a", "query": "r", "pos": ["d2"]})},
     _train, "train.jsonl", 3, "duplicate query id 'a' (first at line 1)"),
    ("inline negative equals positive", {"train.jsonl": jsonl(
        {"query": "q", "pos": ["Cats purr."], "neg": ["cats  PURR."]})},
     _inline, "train.jsonl", 1, "negative text equals a positive"),
    ("inline pos not text", {"train.jsonl": jsonl({"query": "q", "pos": ["ok"]}, {"query": "q", "pos": [3]})},
     _inline, "train.jsonl", 2, "must be a text"),
    ("inline empty text", {"train.jsonl": jsonl({"query": "q", "pos": ["ok"], "neg": [" "]})},
     _inline, "train.jsonl", 1, "empty text"),
    ("tevatron missing docid", {"train.jsonl": jsonl(TEV_OK, {"query_id": "2", "query": "q",
                                                              "positive_passages": [{"text": "A."}]})},
     _inline, "train.jsonl", 2, "docid"),
    ("tevatron docid with two texts", {"train.jsonl": jsonl(TEV_OK, {"query_id": "2", "query": "q",
                                                                     "positive_passages": [{"docid": "a", "text": "B."}]})},
     _inline, "train.jsonl", 2, "different text than at line 1"),
    ("tevatron duplicate query_id", {"train.jsonl": jsonl(TEV_OK, TEV_OK)},
     _inline, "train.jsonl", 2, "duplicate query_id '1'"),
    ("tevatron negative is positive", {"train.jsonl": jsonl(
        {**TEV_OK, "negative_passages": [{"docid": "a", "text": "A."}]})},
     _inline, "train.jsonl", 1, "also a positive"),
    ("qrels bad score", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1", "text": "q"}),
                         "qrels.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n"},
     _beir, "qrels.tsv", 3, "not an integer"),
    ("qrels two columns", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1", "text": "q"}),
                           "qrels.tsv": "q1\td1\n"},
     _beir, "qrels.tsv", 1, "expected 3"),
    ("qrels unknown corpus id", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1", "text": "q"}),
                                 "qrels.tsv": "q1\td1\t1\nq1\tzz\t1\n"},
     _beir, "qrels.tsv", 2, "unknown corpus id 'zz'"),
    ("qrels unknown query id", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1", "text": "q"}),
                                "qrels.tsv": "q1\td1\t1\nq2\td1\t1\n"},
     _beir, "qrels.tsv", 2, "unknown query id 'q2'"),
    ("qrels duplicate pair", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1", "text": "q"}),
                              "qrels.tsv": "q1\td1\t1\nq1\td2\t1\nq1\td1\t0\n"},
     _beir, "qrels.tsv", 3, "duplicate pair"),
    ("queries duplicate id", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl(
        {"_id": "q1", "text": "q"}, {"_id": "q1", "text": "r"}), "qrels.tsv": "q1\td1\t1\n"},
     _beir, "queries.jsonl", 2, "duplicate query id 'q1'"),
    ("queries missing text", {"corpus.jsonl": GOOD_C, "queries.jsonl": jsonl({"_id": "q1"}),
                              "qrels.tsv": "q1\td1\t1\n"},
     _beir, "queries.jsonl", 1, "missing field 'text'"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_names_file_and_line(tmp_path, case):
    _, files, reader, bad_file, line, words = case
    paths = {name: write(tmp_path, name, content) for name, content in files.items()}
    with pytest.raises(NegjaxError) as err:
        reader(paths)
    msg = str(err.value)
    assert msg.startswith(f"{paths[bad_file]}:{line}: "), msg
    assert words in msg, msg


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 15


def test_beir_judged_query_without_positive(tmp_path, corpus_path):
    queries = write(tmp_path, "queries.jsonl", jsonl({"_id": "q1", "text": "q"}))
    qrels = write(tmp_path, "qrels.tsv", "q1\td1\t0\n")
    with pytest.raises(NegjaxError, match=r"query 'q1' \(.*queries.jsonl:1\) has judgements but no positive"):
        formats.read_training(queries, corpus_path, qrels=qrels)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(NegjaxError, match="file not found"):
        formats.read_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(NegjaxError, match="no documents"):
        formats.read_corpus(write(tmp_path, "empty.jsonl", "\n\n"))
