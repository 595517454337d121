"""The built-in WordNet dataset: export through the CLI, its invariants, its tokenizer, and
`negjax data stats`. The export (~1 s) runs once per module."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import pytest
from helpers import REPO, run_negjax

from negjax.data import wordnet
from negjax.utils import stable_hash64

WORDNET_SRC = Path("/usr/share/wordnet")


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _qrels(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [tuple(line.split("\t")) for line in lines[1:]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("wn") / "wordnet"  # does not exist yet: export creates it
    proc = run_negjax("data", "export", "wordnet", out, check=True)
    assert "corpus.jsonl" in proc.stdout
    return out


@pytest.fixture(scope="module")
def data(exported):
    return {
        "corpus": {d["id"]: d for d in _jsonl(exported / "corpus.jsonl")},
        "train": _jsonl(exported / "train.jsonl"),
        "dev": _jsonl(exported / "dev_queries.jsonl"),
        "test": _jsonl(exported / "test_queries.jsonl"),
        "dev_qrels": _qrels(exported / "dev_qrels.tsv"),
        "test_qrels": _qrels(exported / "test_qrels.tsv"),
    }


def test_files_and_counts(exported, data):
    for name in wordnet.FILES + (wordnet.LICENSE_NAME,):
        assert (exported / name).is_file(), name
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (exported / wordnet.LICENSE_NAME).read_text()
    assert len(data["corpus"]) >= 100_000
    assert len(data["train"]) >= 30_000
    c = wordnet.counts()
    assert (len(data["corpus"]), len(data["train"]), len(data["dev"]), len(data["test"])) == \
        (c["corpus"], c["train"], c["dev"], c["test"])
    assert (len(data["dev_qrels"]), len(data["test_qrels"])) == (c["dev_qrels"], c["test_qrels"])
    doc = data["corpus"]["n.00001740"]
    assert doc["text"].startswith("entity (noun): that which is perceived or known or inferred")


def test_ids_resolve(data):
    corpus = data["corpus"]
    for q in data["train"]:
        assert q["pos"] and all(p in corpus for p in q["pos"]), q
    for split in ("dev", "test"):
        qids = {q["id"] for q in data[split]}
        judged = {qid for qid, _, _ in data[f"{split}_qrels"]}
        assert judged == qids  # every query judged, no judgement of an unknown query
        for qid, did, score in data[f"{split}_qrels"]:
            assert did in corpus and score == "1"
    all_ids = [q["id"] for q in data["train"] + data["dev"] + data["test"]]
    assert len(all_ids) == len(set(all_ids))


def test_no_query_inside_its_positive(data):
    corpus = data["corpus"]
    pairs = [(q["query"], p) for q in data["train"] for p in q["pos"]]
    for split in ("dev", "test"):
        text = {q["id"]: q["text"] for q in data[split]}
        pairs += [(text[qid], did) for qid, did, _ in data[f"{split}_qrels"]]
    for query, did in pairs:
        assert query.strip() and query.lower() not in corpus[did]["text"].lower(), (query, did)
    # Documents hold definitions, not the usage examples that became queries.
    assert '"' not in corpus["v.00001740"]["text"]  # breathe: 'draw air into...; "I can breathe..."'


def test_splits_by_synset(data):
    train_pos = {p for q in data["train"] for p in q["pos"]}
    heldout = {did for split in ("dev", "test") for _, did, _ in data[f"{split}_qrels"]}
    assert not train_pos & heldout
    dev_docs = {did for _, did, _ in data["dev_qrels"]}
    test_docs = {did for _, did, _ in data["test_qrels"]}
    assert not dev_docs & test_docs
    # The split is the stable hash of the (first) positive synset id, the same on every machine.
    positives = [(q["pos"], "train") for q in data["train"]]
    for split in ("dev", "test"):
        by_query = collections.defaultdict(list)
        for qid, did, _ in data[f"{split}_qrels"]:
            by_query[qid].append(did)
        positives += [(pos, split) for pos in by_query.values()]
    for pos, split in positives:
        bucket = stable_hash64(min(pos)) % 100
        assert {"train": bucket < 90, "dev": 90 <= bucket < 95, "test": bucket >= 95}[split], pos
    n = collections.Counter({s: len(data[s]) for s in ("train", "dev", "test")})
    total = sum(n.values())
    assert 0.86 < n["train"] / total < 0.94
    assert 0.03 < n["dev"] / total < 0.07 and 0.03 < n["test"] / total < 0.07


def test_identical_texts_are_one_item(data):
    """A document text shared by two synsets makes both positives; a query text (up to case and
    spaces) occurs once."""
    from negjax.data.formats import normalize_text

    by_text = collections.defaultdict(set)
    for doc_id, doc in data["corpus"].items():
        by_text[normalize_text(doc["text"])].add(doc_id)
    twins = {d: ids for ids in by_text.values() if len(ids) > 1 for d in ids}
    assert twins["v.01363192"] == {"v.01363192", "v.01685815"}  # "repaint (verb): paint again"
    judged = [set(q["pos"]) for q in data["train"]]
    for split in ("dev", "test"):
        by_query = collections.defaultdict(set)
        for qid, did, _ in data[f"{split}_qrels"]:
            by_query[qid].add(did)
        judged += by_query.values()
    assert any(pos & twins.keys() for pos in judged)
    for pos in judged:
        for d in pos & twins.keys():
            assert twins[d] <= pos
    texts = [normalize_text(q["query"]) for q in data["train"]]
    texts += [normalize_text(q["text"]) for s in ("dev", "test") for q in data[s]]
    assert len(texts) == len(set(texts))


def test_tokenizer_loads_with_autotokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wordnet.tokenizer_dir())
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert 7_000 <= len(tok) <= 8_000 and tok.model_max_length == 512
    ids = tok("The wind backed to the north")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and 1 not in ids
    assert tok.convert_ids_to_tokens(ids)[1:3] == ["the", "wind"]  # lower-cased, whole words
    pair = tok("a query", "a document")["input_ids"]
    assert pair[0] == 2 and pair.count(3) == 2 and pair[-1] == 3
    batch = tok(["short", "a somewhat longer sentence"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0


def test_stats_cli(exported):
    c = wordnet.counts()
    proc = run_negjax("data", "stats", exported, check=True)
    assert f"{c['corpus']:,} documents" in proc.stdout
    assert f"{c['train']:,} queries" in proc.stdout and f"{c['dev_qrels']:,} judgements" in proc.stdout
    assert "p99" in proc.stdout and "documents (words)" in proc.stdout
    stats = json.loads(run_negjax("data", "stats", exported, "--json", check=True).stdout)
    files = stats["files"]
    assert files["corpus.jsonl"]["documents"] == c["corpus"]
    assert files["train.jsonl"] == {"queries": c["train"], "positives": c["train_qrels"], "negatives": 0}
    assert files["test_queries.jsonl"]["queries"] == c["test"]
    assert files["test_qrels.tsv"] == {"judgements": c["test_qrels"], "queries": c["test"]}
    w = stats["lengths"]["documents"]["words"]
    assert 0 < w["p50"] <= w["p90"] <= w["p99"] <= w["max"]


def test_bad_input_exits_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corpus.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    cases = [
        (("data", "export", "nosuchset", tmp_path / "o"), "unknown dataset 'nosuchset'"),
        (("data", "export", "wordnet", afile), "not a directory"),
        (("data", "export", "wordnet", afile / "sub"), str(afile)),
        (("data", "stats", tmp_path / "missing"), "not a directory"),
        (("data", "stats", bad), "corpus.jsonl:2: invalid JSON"),
    ]
    for args, expected in cases:
        proc = run_negjax(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)


def test_ensure_exported_once(tmp_path, monkeypatch, exported):
    monkeypatch.setenv("NEGJAX_CACHE", str(tmp_path / "cache"))
    path = wordnet.ensure_exported()
    assert path.parent == tmp_path / "cache" and path.name == f"wordnet-{wordnet.version()}"
    stamp = {f: (path / f).stat().st_mtime_ns for f in wordnet.FILES}
    assert wordnet.ensure_exported() == path  # reused, not rewritten
    assert {f: (path / f).stat().st_mtime_ns for f in wordnet.FILES} == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    for f in wordnet.FILES:  # the export is deterministic: same bytes as the CLI's
        assert (path / f).read_bytes() == (exported / f).read_bytes(), f


def test_validate_wiring():
    """`data validate` is listed exactly when negjax.data.validate exists (another stage)."""
    listed = "validate" in run_negjax("data", "--help", check=True).stdout
    assert listed == (importlib.util.find_spec("negjax.data.validate") is not None)


def _builder():
    spec = importlib.util.spec_from_file_location("build_wordnet", REPO / "tools" / "build_wordnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gloss, definition, examples", [
    ('draw air into, and expel out of, the lungs; "I can breathe better"; "The patient is respiring"',
     "draw air into, and expel out of, the lungs", ["I can breathe better", "The patient is respiring"]),
    ('x; "Vengeance is mine; I will repay, saith the Lord"--Romans 12:19',
     "x", ["Vengeance is mine; I will repay, saith the Lord"]),
    ('the act of substitution: "he sent Smith in for Jones"', "the act of substitution",
     ["he sent Smith in for Jones"]),
    ('promise of reward as in "carrot and stick"', 'promise of reward as in "carrot and stick"', []),
    ('y; "the head of the nail", "a pinhead is the head of a pin"',
     "y", ["the head of the nail", "a pinhead is the head of a pin"]),
    ('utter with seeming casualness; "drop a hint"; drop names"', "utter with seeming casualness",
     ["drop a hint", "drop names"]),
    ('a local branch where postal services are available"', "a local branch where postal services are available", []),
])
def test_split_gloss(gloss, definition, examples):
    assert _builder().split_gloss(gloss) == (definition, examples)


def test_parse_data_line():
    line = ("00002312 00 a 02 abaxial 0 dorsal(p) 4 002 ;c 06037666 n 0000 ! 00002527 a 0101 | "
            'facing away from the axis of an organ or organism; "the abaxial surface of a leaf"  \n')
    s = _builder().parse_data_line(line, "a")
    assert s == {"id": "a.00002312", "lemmas": ["abaxial", "dorsal"], "pos": "adjective",
                 "definition": "facing away from the axis of an organ or organism",
                 "examples": ["the abaxial surface of a leaf"]}


@pytest.mark.skipif(not (WORDNET_SRC / "data.noun").is_file(), reason="needs Debian's wordnet-base")
def test_shipped_data_is_reproducible(tmp_path):
    """Rebuilding from /usr/share/wordnet gives the shipped bytes (tokenizer skipped: slow)."""
    assert _builder().main(["--src", str(WORDNET_SRC), "--out", str(tmp_path), "--skip-tokenizer"]) == 0
    shipped = wordnet.manifest()["files"]
    rebuilt = json.loads((tmp_path / "manifest.json").read_text())["files"]
    for name in ("corpus.jsonl.gz", "queries.jsonl.gz", "LICENSE"):
        assert rebuilt[name] == shipped[name], name
