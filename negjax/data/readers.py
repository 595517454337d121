"""Readers of corpora, queries, qrels and teacher scores, and the record-field checks every
reader shares (`negjax.data.formats` reads training data with them; docs/formats.md).

    corpus = read_corpus("corpus.jsonl")        # {"id"|"_id", "text", "title"?}: Corpus
    queries = read_queries("dev_queries.jsonl")  # {"id"|"_id", "text"}: Queries
    qrels = read_qrels("dev_qrels.tsv", corpus=corpus, query_ids=queries.ids)

Every malformed record raises `NegjaxError` naming the file and line or row; nothing is
skipped silently (blank lines are not records).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from negjax.data.records import (at, decode_line, iter_jsonl, iter_records, open_lines,
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


def _expect(value, typ, path, line, what: str, hint: str = "") -> None:
    """Raise naming file:line unless `value` is a `typ` (`what` says what was expected)."""
    if not isinstance(value, typ):
        raise record_error(path, line, f"{what}, got {type(value).__name__}{hint}")


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
