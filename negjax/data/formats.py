"""Readers for the input formats in docs/formats.md, into one in-memory representation.

    corpus = read_corpus("corpus.jsonl")                      # {"id"|"_id", "text", "title"?}
    corpus, train = read_training("train.jsonl", corpus)      # pairs with corpus ids
    corpus, train = read_training("flag.jsonl")               # pairs with inline texts
    corpus, train = read_training("tevatron.jsonl")           # Tevatron (corpus optional)
    corpus, train = read_training("queries.jsonl", corpus, qrels="qrels/train.tsv")  # BEIR

Every malformed record raises `NegjaxError` naming the file and line ("path:line: what");
nothing is skipped silently (blank lines are not records). Documents are addressed by their
row in `Corpus` (an int), which is also their row in the token store and the document id the
training batches carry.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from negjax.data.records import (at, decode_line, iter_jsonl, iter_records, open_lines, place,
                                  record_error)
from negjax.errors import NegjaxError

DOC_ID_KEYS = ("_id", "id", "docid", "doc_id")
QUERY_ID_KEYS = ("_id", "id", "query_id", "qid")
QUERY_TEXT_KEYS = ("text", "query", "query_text")
QRELS_HEADERS = ({"query-id", "corpus-id", "score"}, {"query_id", "corpus_id", "score"},
                 {"qid", "docid", "score"}, {"query-id", "doc-id", "score"})


# ---------------------------------------------------------------------------------------------
# In-memory representation
# ---------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Documents in file order. Row `i` is document `ids[i]`.

    `texts[i]` is the string that gets tokenised and encoded: "title text" when the record has a
    title (the BEIR / sentence-transformers convention), else the text. `titles[i]` is the raw
    title ('' when absent).
    """
    ids: list[str]
    texts: list[str]
    titles: list[str]
    path: str = ""
    index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.index:
            self.index = {d: i for i, d in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, doc_id: str) -> int:
        """The row of a document id; KeyError when unknown."""
        return self.index[doc_id]


@dataclass
class Queries:
    """Evaluation (or BEIR training) queries in file order."""
    ids: list[str]
    texts: list[str]
    path: str = ""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TrainExamples:
    """One training query per example, in file order.

    positives[i] / negatives[i] are corpus rows (ints). `negatives` are the ones given in the
    training file (ranked as given; hard-negative shards replace them in the pipeline).
    query_ids are the file's ids, or "#LINE" when the format has none (pairs JSONL without "id").
    """
    query_ids: list[str]
    queries: list[str]
    positives: list[list[int]]
    negatives: list[list[int]]
    lines: list[int]
    path: str = ""
    format: str = ""
    # teacher[i]: {corpus row: teacher score} from the record's pos_scores / neg_scores
    # (FlagEmbedding's fields, any reranker's scores); empty when it has none.
    teacher: list[dict] = field(default_factory=list)

    @classmethod
    def empty(cls, path, fmt: str) -> "TrainExamples":
        return cls([], [], [], [], [], str(path), fmt)

    @property
    def has_teacher_scores(self) -> bool:
        return any(self.teacher)

    def __len__(self) -> int:
        return len(self.query_ids)

    def index(self) -> dict[str, int]:
        return {q: i for i, q in enumerate(self.query_ids)}

    def positive_lists(self):
        from negjax.data.shards import NegativeLists

        return NegativeLists.from_lists(self.positives)

    def negative_lists(self):
        from negjax.data.shards import NegativeLists

        return NegativeLists.from_lists(self.negatives, "")

    def with_teacher(self, teacher: list) -> "TrainExamples":
        """A copy whose teacher scores are `teacher` (per example {row: score})."""
        import dataclasses

        return dataclasses.replace(self, teacher=teacher)

    def add(self, query_id: str, query: str, positives: list[int], negatives: list[int],
            line: int, teacher: dict | None = None) -> None:
        self.query_ids.append(query_id)
        self.queries.append(query)
        self.positives.append(positives)
        self.negatives.append(negatives)
        self.lines.append(line)
        self.teacher.append(teacher or {})


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: two texts are 'the same document' iff equal."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_id(text: str) -> str:
    """The id of an inline document: a hash of its normalised text ('h' + 16 hex digits)."""
    return "h" + hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).hexdigest()


def _id(obj: dict, keys: tuple[str, ...], path, line, what: str) -> str:
    """An id field (string or integer) under the first present key of `keys`."""
    for key in keys:
        if key in obj:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise record_error(path, line, f"field {key!r} ({what}) must be a string or an "
                                 f"integer, got {type(v).__name__}")
            v = str(v)
            if not v.strip():
                raise record_error(path, line, f"field {key!r} ({what}) is empty")
            return v
    raise record_error(path, line, f"missing field {' or '.join(repr(k) for k in keys)} ({what})")


def _text(obj: dict, key: str, path, line, *, required=True, what="text") -> str:
    if key not in obj:
        if required:
            raise record_error(path, line, f"missing field {key!r} ({what})")
        return ""
    v = obj[key]
    if v is None:  # a null cell of a Parquet / Arrow column
        if required:
            raise record_error(path, line, f"field {key!r} ({what}) is null")
        return ""
    if not isinstance(v, str):
        raise record_error(path, line, f"field {key!r} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise record_error(path, line, f"field {key!r} ({what}) is empty")
    return v


def _list(obj: dict, key: str, path, line, *, required: bool) -> list:
    if key not in obj or obj[key] is None:
        if required:
            raise record_error(path, line, f"missing field {key!r}")
        return []
    v = obj[key]
    if not isinstance(v, list):
        raise record_error(path, line, f"field {key!r} must be a list, got {type(v).__name__}")
    if required and not v:
        raise record_error(path, line, f"field {key!r} is an empty list (every query needs a positive)")
    return v


def _dedup(rows: list[int]) -> list[int]:
    return list(dict.fromkeys(rows))


def _join(title: str, text: str) -> str:
    return f"{title.strip()} {text}" if title.strip() else text


# ---------------------------------------------------------------------------------------------
# Corpus, queries, qrels
# ---------------------------------------------------------------------------------------------

def read_corpus(path) -> Corpus:
    """Corpus JSONL: {"id" | "_id": str|int, "text": str (non-empty), "title"?: str}."""
    path = Path(path)
    ids, texts, titles, index = [], [], [], {}
    first_line: dict[str, int] = {}
    for line, obj in iter_records(path):
        doc_id = _id(obj, DOC_ID_KEYS, path, line, "document id")
        text = _text(obj, "text", path, line, what="document text")
        title = _text(obj, "title", path, line, required=False)
        if doc_id in index:
            raise record_error(path, line, f"duplicate document id {doc_id!r} (first at "
                             f"{at(first_line[doc_id])})")
        index[doc_id] = len(ids)
        first_line[doc_id] = line
        ids.append(doc_id)
        texts.append(_join(title, text))
        titles.append(title)
    if not ids:
        raise NegjaxError(f"{path}: no documents")
    return Corpus(ids, texts, titles, str(path), index)


def read_queries(path) -> Queries:
    """Queries JSONL: {"id" | "_id": str|int, "text": str (non-empty)}."""
    path = Path(path)
    ids, texts, seen = [], [], {}
    for line, obj in iter_records(path):
        qid = _id(obj, QUERY_ID_KEYS, path, line, "query id")
        text = _text(obj, next((k for k in QUERY_TEXT_KEYS if k in obj), "text"), path, line,
                     what="query text")
        if qid in seen:
            raise record_error(path, line, f"duplicate query id {qid!r} (first at {at(seen[qid])})")
        seen[qid] = line
        ids.append(qid)
        texts.append(text)
    if not ids:
        raise NegjaxError(f"{path}: no queries")
    return Queries(ids, texts, str(path))


def read_teacher_scores(path) -> dict[tuple[str, str], float]:
    """A teacher's scores of (query, document) pairs -> {(query id, doc id): score}: a TSV
    `query-id<TAB>doc-id<TAB>score` (a header line is skipped; scores are floats, e.g. a
    reranker's logits) or a JSONL of {"query_id", "doc_id" (or "corpus_id"), "score"}. A
    malformed line or a pair given twice is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise NegjaxError(f"{path}: teacher score file not found")
    out: dict[tuple[str, str], float] = {}
    first: dict[tuple[str, str], int] = {}

    def add(qid, did, score, lineno):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
            raise record_error(path, lineno, f"score must be a number, got {score!r}")
        if (qid, did) in first:
            raise record_error(path, lineno, f"pair ({qid!r}, {did!r}) given twice (first on line "
                             f"{first[(qid, did)]})")
        first[(qid, did)] = lineno
        out[(qid, did)] = float(score)

    if path.suffix in (".jsonl", ".gz") and not path.name.endswith(".tsv.gz"):
        for lineno, obj in iter_jsonl(path):
            qid = obj.get("query_id", obj.get("qid"))
            did = obj.get("doc_id", obj.get("corpus_id", obj.get("docid")))
            if not isinstance(qid, (str, int)) or not isinstance(did, (str, int)):
                raise record_error(path, lineno, 'expected {"query_id", "doc_id", "score"}')
            add(str(qid), str(did), obj.get("score"), lineno)
    else:
        with open_lines(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = decode_line(path, lineno, raw).rstrip("\r\n")
                if not line.strip():
                    continue
                parts = [p.strip() for p in (line.split("\t") if "\t" in line else line.split())]
                if len(parts) != 3:
                    raise record_error(path, lineno, f"expected 3 tab-separated columns "
                                     f"(query-id, doc-id, score), got {len(parts)}")
                try:
                    score = float(parts[2])
                except ValueError:
                    if lineno == 1:  # a header
                        continue
                    raise record_error(path, lineno, f"score {parts[2]!r} is not a number") from None
                add(parts[0], parts[1], score, lineno)
    if not out:
        raise NegjaxError(f"{path}: no teacher scores")
    return out


def read_qrels(path, *, corpus: Corpus | None = None,
               query_ids=None) -> dict[str, dict[str, int]]:
    """Qrels TSV -> {query id: {doc id: score}}.

    Lines are `query-id<TAB>corpus-id<TAB>score` (BEIR; the header line is optional) or the
    4-column TREC form `qid<WS>iteration<WS>docid<WS>score`. Scores are integers. With `corpus`
    / `query_ids`, unknown ids are errors naming the line.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    known_q = set(query_ids) if query_ids is not None else None
    with open_lines(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = decode_line(path, lineno, raw).rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if lineno == 1 and {p.strip().lower() for p in parts} in QRELS_HEADERS:
                continue
            if len(parts) == 4:
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise record_error(path, lineno, f"expected 3 tab-separated columns "
                                 f"(query-id, corpus-id, score), got {len(parts)}")
            qid, did, score_s = (p.strip() for p in parts)
            if not qid or not did:
                raise record_error(path, lineno, "empty query id or corpus id")
            try:
                score = int(score_s)
            except ValueError:
                raise record_error(path, lineno, f"score {score_s!r} is not an integer") from None
            if known_q is not None and qid not in known_q:
                raise record_error(path, lineno, f"unknown query id {qid!r}")
            if corpus is not None and did not in corpus.index:
                raise record_error(path, lineno, f"unknown corpus id {did!r} (not in {corpus.path})")
            if (qid, did) in first_line:
                raise record_error(path, lineno, f"duplicate pair ({qid!r}, {did!r}) (first on line "
                                 f"{first_line[qid, did]})")
            first_line[qid, did] = lineno
            qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise NegjaxError(f"{path}: no judgements")
    return qrels


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------

def detect_train_format(path) -> str:
    """The training format from the first record's fields (any input file format):
    'pairs' (FlagEmbedding {"query", "pos", "neg"?, "pos_scores"?, "neg_scores"?}; pos/neg are
    texts, or corpus ids when a corpus is given), 'sentence-transformers' ({"anchor",
    "positive", "negative" | "negative_1".."negative_n"?}), 'tevatron' ({"query_id", "query",
    "positive_passages", "negative_passages"?}), 'tevatron-ids' (Tevatron's newer {"query_id",
    "query_text", "positive_document_ids", "negative_document_ids"?} with a corpus) or
    'queries' (BEIR queries; positives come from qrels)."""
    path = Path(path)
    for line, obj in iter_records(path):
        if "positive_passages" in obj:
            return "tevatron"
        if "positive_document_ids" in obj:
            return "tevatron-ids"
        if "anchor" in obj:
            return "sentence-transformers"
        if "pos" in obj or "query" in obj:
            return "pairs"
        if "text" in obj and any(k in obj for k in QUERY_ID_KEYS):
            return "queries"
        raise record_error(path, line, "unknown training format: expected FlagEmbedding "
                           "{\"query\", \"pos\", \"neg\"?}, sentence-transformers {\"anchor\", "
                           "\"positive\", \"negative\"?}, Tevatron {\"query_id\", \"query\", "
                           "\"positive_passages\"} or {\"query_id\", \"query_text\", "
                           "\"positive_document_ids\"}, or BEIR queries {\"_id\", \"text\"} with qrels; "
                           f"got fields {sorted(obj)}")
    raise NegjaxError(f"{path}: no training examples")


def _from_sentence_transformers(obj: dict) -> dict:
    """{"anchor", "positive", "negative" | "negative_1".."negative_n"} -> pairs fields."""
    out = {"query": obj.get("anchor"), "pos": [obj.get("positive")]}
    if "id" in obj:
        out["id"] = obj["id"]
    negs = [obj["negative"]] if obj.get("negative") is not None else []
    j = 1
    while f"negative_{j}" in obj:
        if obj[f"negative_{j}"] is not None:
            negs.append(obj[f"negative_{j}"])
        j += 1
    out["neg"] = negs
    return out


def _from_tevatron_ids(obj: dict) -> dict:
    """Tevatron's {"query_id", "query_text", "positive_document_ids", "negative_document_ids"}
    -> pairs fields (entries are corpus ids)."""
    return {"query_id": obj.get("query_id"), "query": obj.get("query_text"),
            "pos": obj.get("positive_document_ids"), "neg": obj.get("negative_document_ids")}


def read_training(path, corpus: Corpus | str | Path | None = None, *, qrels=None,
                  fmt: str = "auto") -> tuple[Corpus, TrainExamples]:
    """Read training data in any supported format; returns (corpus, examples).

    corpus: a `Corpus`, a corpus JSONL path, or None (then pairs carry inline texts and
    Tevatron passages form the corpus). qrels: a qrels TSV path (BEIR training: `path` is then
    queries.jsonl). The returned corpus is the given one, or the one built from the texts.
    """
    path = Path(path)
    if isinstance(corpus, (str, Path)):  # else a Corpus, or anything with its ids / index / path
        corpus = read_corpus(corpus)
    if fmt == "auto":
        fmt = "queries" if qrels is not None else detect_train_format(path)
    if fmt == "queries" or qrels is not None:
        if qrels is None:
            raise NegjaxError(f"{path}: looks like BEIR queries; pass the training qrels TSV too")
        if corpus is None:
            raise NegjaxError(f"{path}: BEIR training data needs the corpus")
        return corpus, _read_beir(path, corpus, Path(qrels))
    if fmt == "tevatron":
        return _read_tevatron(path, corpus)
    if fmt == "tevatron-ids":
        if corpus is None:
            raise NegjaxError(f"{path}: Tevatron positive_document_ids need the corpus "
                              "(data.corpus / --corpus)")
        return corpus, _read_pairs_ids(path, corpus, _from_tevatron_ids, fmt)
    if fmt == "sentence-transformers":
        if corpus is not None:
            raise NegjaxError(f"{path}: sentence-transformers columns carry texts, not corpus "
                              "ids; train without a corpus (the texts form it)")
        return _read_pairs_texts(path, _from_sentence_transformers)
    if fmt == "pairs":
        return (corpus, _read_pairs_ids(path, corpus)) if corpus is not None else _read_pairs_texts(path)
    raise NegjaxError(f"unknown training format {fmt!r} (auto, pairs, sentence-transformers, "
                      "tevatron, tevatron-ids, queries)")


def _query_id(obj, path, line, seen: dict) -> str:
    qid = _id(obj, ("id", "_id", "query_id"), path, line, "query id") if any(
        k in obj for k in ("id", "_id", "query_id")) else f"#{int(line)}"
    if qid in seen:
        raise record_error(path, line, f"duplicate query id {qid!r} (first at {at(seen[qid])})")
    seen[qid] = line
    return qid


def _read_pairs(path: Path, fmt: str, doc_row, clash, convert=None) -> TrainExamples:
    """The records of a pairs JSONL ({"query", "pos", "neg"?, "id"?}), pos/neg entries mapped
    to corpus rows by `doc_row(entry, key, j, line)`; `clash(rows)` is the error when a
    negative is also a positive."""
    ex = TrainExamples.empty(path, fmt)
    seen: dict[str, int] = {}
    for line, obj in iter_records(path):
        if convert is not None:
            obj = convert(obj)
        qid = _query_id(obj, path, line, seen)
        query = _text(obj, "query", path, line, what="query text")
        pos, neg = _pos_neg(obj, doc_row, "pos", "neg", path, line)
        if set(pos) & set(neg):
            raise record_error(path, line, clash(set(pos) & set(neg)))
        ex.add(qid, query, pos, neg, line, _teacher(obj, doc_row, path, line))
    if not ex.query_ids:
        raise NegjaxError(f"{path}: no training examples")
    return ex


def _read_pairs_ids(path: Path, corpus: Corpus, convert=None, fmt="pairs") -> TrainExamples:
    def doc_row(d, key, j, line) -> int:
        if isinstance(d, bool) or not isinstance(d, (str, int)):
            raise record_error(path, line, f"{key}[{j}] must be a corpus id (string), got "
                             f"{type(d).__name__}")
        r = corpus.index.get(str(d))
        if r is None:
            raise record_error(path, line, f"{key}[{j}]: unknown corpus id {str(d)!r} "
                             f"(not in {corpus.path or 'the corpus'})")
        return r

    return _read_pairs(path, fmt, doc_row, lambda rows: f"negative {corpus.ids[min(rows)]!r} "
                       "is also a positive of this query", convert)


def _pos_neg(obj, doc_row, pos_key: str, neg_key: str, path, line) -> tuple[list, list]:
    """(positive rows, negative rows) of a record, each entry mapped by
    `doc_row(entry, key, j, line)`, duplicates dropped; positives are required."""
    pos = _dedup([doc_row(x, pos_key, j, line) for j, x in
                  enumerate(_list(obj, pos_key, path, line, required=True))])
    neg = _dedup([doc_row(x, neg_key, j, line) for j, x in
                  enumerate(_list(obj, neg_key, path, line, required=False))])
    return pos, neg


def _teacher(obj, doc_row, path, line) -> dict:
    """{corpus row: score} from "pos_scores" / "neg_scores" (FlagEmbedding's fields: one
    number per entry of "pos" / "neg", e.g. a reranker's scores for distillation)."""
    out = {}
    for key, scores_key in (("pos", "pos_scores"), ("neg", "neg_scores")):
        if obj.get(scores_key) is None:
            continue
        entries = _list(obj, key, path, line, required=False)
        scores = _list(obj, scores_key, path, line, required=False)
        if len(scores) != len(entries):
            raise record_error(path, line, f"{scores_key!r} has {len(scores)} numbers for "
                             f"{len(entries)} {key!r} entries")
        for j, (entry, score) in enumerate(zip(entries, scores)):
            if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
                raise record_error(path, line, f"{scores_key}[{j}] must be a number, got {score!r}")
            out[doc_row(entry, key, j, line)] = float(score)
    return out


def _expect(value, typ, path, line, what: str, hint: str = "") -> None:
    """Raise naming file:line unless `value` is a `typ` (`what` says what was expected)."""
    if not isinstance(value, typ):
        raise record_error(path, line, f"{what}, got {type(value).__name__}{hint}")


def _read_pairs_texts(path: Path, convert=None) -> tuple[Corpus, TrainExamples]:
    """FlagEmbedding style: pos/neg are texts; documents are deduplicated by normalised text."""
    ids, texts, index = [], [], {}

    def doc_row(t, key, j, line) -> int:
        _expect(t, str, path, line, f"{key}[{j}] must be a text (string)",
                hint=" (pass --corpus when entries are corpus ids)")
        if not t.strip():
            raise record_error(path, line, f"{key}[{j}] is an empty text")
        did = text_id(t)
        r = index.get(did)
        if r is None:
            r = index[did] = len(ids)
            ids.append(did)
            texts.append(t)
        return r

    ex = _read_pairs(path, "sentence-transformers" if convert else "pairs-text", doc_row,
                     lambda rows: "a negative text equals a positive text (after normalising "
                     "case and whitespace)", convert)
    return Corpus(ids, texts, [""] * len(ids), str(path), index), ex


def _read_tevatron(path: Path, corpus: Corpus | None) -> tuple[Corpus, TrainExamples]:
    """Tevatron: {"query_id", "query", "positive_passages": [{"docid", "title"?, "text"}],
    "negative_passages": [...]?}. Without a corpus the passages form it (a docid seen twice
    must carry the same text)."""
    own = corpus is None
    ids, texts, titles, index, doc_line = [], [], [], {}, {}
    ex = TrainExamples.empty(path, "tevatron")
    seen: dict[str, int] = {}

    def doc_row(p, key, j, line) -> int:
        _expect(p, dict, path, line, f"{key}[{j}] must be an object with docid/text")
        did = _id(p, ("docid", "_id", "id"), path, line, f"{key}[{j}] docid")
        if not own:
            r = corpus.index.get(did)
            if r is None:
                raise record_error(path, line, f"{key}[{j}]: unknown docid {did!r} (not in "
                                 f"{corpus.path or 'the corpus'})")
            return r
        text = _text(p, "text", path, line, what=f"{key}[{j}] text")
        title = _text(p, "title", path, line, required=False)
        full = _join(title, text)
        r = index.get(did)
        if r is None:
            r = index[did] = len(ids)
            ids.append(did)
            texts.append(full)
            titles.append(title)
            doc_line[did] = line
        elif texts[r] != full:
            raise record_error(path, line, f"{key}[{j}]: docid {did!r} has a different text than "
                             f"at {at(doc_line[did])}")
        return r

    for line, obj in iter_records(path):
        qid = _id(obj, ("query_id",), path, line, "query id")
        if qid in seen:
            raise record_error(path, line, f"duplicate query_id {qid!r} (first at {at(seen[qid])})")
        seen[qid] = line
        query = _text(obj, "query", path, line, what="query text")
        pos, neg = _pos_neg(obj, doc_row, "positive_passages", "negative_passages", path, line)
        if set(pos) & set(neg):
            doc = (ids if own else corpus.ids)[min(set(pos) & set(neg))]
            raise record_error(path, line, f"negative passage {doc!r} is also a positive")
        ex.add(qid, query, pos, neg, line)
    if not ex.query_ids:
        raise NegjaxError(f"{path}: no training examples")
    if own:
        corpus = Corpus(ids, texts, titles, str(path), index)
    return corpus, ex


def _read_beir(path: Path, corpus: Corpus, qrels_path: Path) -> TrainExamples:
    """BEIR: queries.jsonl + qrels TSV. Score > 0 = positive, score <= 0 = given negative.
    Queries without judgements are not training queries (BEIR keeps all splits' queries in one
    file); a judged query without any positive is an error."""
    queries = read_queries(path)
    qrels = read_qrels(qrels_path, corpus=corpus, query_ids=queries.ids)
    ex = TrainExamples.empty(path, "beir")
    qline = {}
    for line, obj in iter_records(path):
        qline[str(next((obj[k] for k in QUERY_ID_KEYS if k in obj), None))] = line
    for qid, text in zip(queries.ids, queries.texts):
        judged = qrels.get(qid)
        if not judged:
            continue
        pos = [corpus.index[d] for d, s in judged.items() if s > 0]
        neg = [corpus.index[d] for d, s in judged.items() if s <= 0]
        if not pos:
            raise NegjaxError(f"{qrels_path}: query {qid!r} ({place(path, qline[qid])}) has judgements "
                              "but no positive (score > 0)")
        ex.add(qid, text, pos, neg, qline[qid])
    if not ex.query_ids:
        raise NegjaxError(f"{qrels_path}: no judged query of {path}")
    return ex
