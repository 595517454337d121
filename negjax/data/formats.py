"""Training data in every supported format (docs/formats.md), into one in-memory
representation; the corpus, query and qrels readers are `negjax.data.readers` (re-exported).

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

from dataclasses import dataclass, field
from pathlib import Path

from negjax.data.readers import (DOC_ID_KEYS, QRELS_HEADERS, QUERY_ID_KEYS,
                                 QUERY_TEXT_KEYS, Corpus, Queries, _dedup, _expect, _id, _join,
                                 _list, _text, normalize_text, read_corpus, read_qrels,
                                 read_queries, read_teacher_scores, text_id)
from negjax.data.records import at, iter_records, place, record_error
from negjax.errors import NegjaxError

__all__ = ["TrainExamples", "detect_train_format", "read_training",
           # re-exported from negjax.data.readers
           "Corpus", "Queries", "read_corpus", "read_queries", "read_qrels", "read_teacher_scores",
           "normalize_text", "text_id", "DOC_ID_KEYS", "QUERY_ID_KEYS", "QUERY_TEXT_KEYS",
           "QRELS_HEADERS"]


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
                  fmt: str = "auto", sink=None, span=None) -> tuple[Corpus, TrainExamples]:
    """Read training data in any supported format; returns (corpus, examples).

    corpus: a `Corpus`, a corpus JSONL path, or None (then pairs carry inline texts and
    Tevatron passages form the corpus). qrels: a qrels TSV path (BEIR training: `path` is then
    queries.jsonl). The returned corpus is the given one, or the one built from the texts.
    sink: `sink(path, format)` makes what the examples are added to (`add`, `len`) instead of
    a `TrainExamples`, when they refer to a given corpus (`negjax.data.prepared` writes them
    to disk as they are read). span: only the lines of a byte range of a plain JSONL file
    (`records.iter_records`; pairs or tevatron-ids records with a corpus, read by one process
    of a parallel build: no "no examples" check, query ids distinct only within the range).
    """
    path = Path(path)
    if span is not None and (fmt not in ("pairs", "tevatron-ids") or corpus is None):
        raise ValueError(f"{path}: a byte range of {fmt} training data")
    if isinstance(corpus, (str, Path)):  # else a Corpus, or anything with its ids / index / path
        corpus = read_corpus(corpus)
    if fmt == "auto":
        fmt = "queries" if qrels is not None else detect_train_format(path)
    if fmt == "queries" or qrels is not None:
        if qrels is None:
            raise NegjaxError(f"{path}: looks like BEIR queries; pass the training qrels TSV too")
        if corpus is None:
            raise NegjaxError(f"{path}: BEIR training data needs the corpus")
        return corpus, _read_beir(path, corpus, Path(qrels), sink)
    if fmt == "tevatron":
        return _read_tevatron(path, corpus, sink if corpus is not None else None)
    if fmt == "tevatron-ids":
        if corpus is None:
            raise NegjaxError(f"{path}: Tevatron positive_document_ids need the corpus "
                              "(data.corpus / --corpus)")
        return corpus, _read_pairs_ids(path, corpus, _from_tevatron_ids, fmt, sink, span)
    if fmt == "sentence-transformers":
        if corpus is not None:
            raise NegjaxError(f"{path}: sentence-transformers columns carry texts, not corpus "
                              "ids; train without a corpus (the texts form it)")
        return _read_pairs_texts(path, _from_sentence_transformers)
    if fmt == "pairs":
        if corpus is not None:
            return corpus, _read_pairs_ids(path, corpus, sink=sink, span=span)
        return _read_pairs_texts(path)
    raise NegjaxError(f"unknown training format {fmt!r} (auto, pairs, sentence-transformers, "
                      "tevatron, tevatron-ids, queries)")


def _query_id(obj, path, line, seen: dict) -> str:
    """The record's query id, else '#N' with N its number in the input: its line (or row),
    counted across the files of a directory input (`seen` holds one entry per record read)."""
    if any(k in obj for k in ("id", "_id", "query_id")):
        qid = _id(obj, ("id", "_id", "query_id"), path, line, "query id")
    else:
        qid = f"#{len(seen) + 1 if getattr(line, 'file', None) is not None else int(line)}"
    if qid in seen:
        raise record_error(path, line, f"duplicate query id {qid!r} (first at {at(seen[qid])})")
    seen[qid] = line
    return qid


def _read_pairs(path: Path, fmt: str, doc_row, clash, convert=None, sink=None,
                span=None) -> TrainExamples:
    """The records of a pairs JSONL ({"query", "pos", "neg"?, "id"?}), pos/neg entries mapped
    to corpus rows by `doc_row(entry, key, j, line)`; `clash(rows)` is the error when a
    negative is also a positive."""
    ex = (sink or TrainExamples.empty)(path, fmt)
    seen: dict[str, int] = {}
    for line, obj in iter_records(path, span):
        if convert is not None:
            obj = convert(obj)
        qid = _query_id(obj, path, line, seen)
        query = _text(obj, "query", path, line, what="query text")
        pos, neg = _pos_neg(obj, doc_row, "pos", "neg", path, line)
        if set(pos) & set(neg):
            raise record_error(path, line, clash(set(pos) & set(neg)))
        ex.add(qid, query, pos, neg, line, _teacher(obj, doc_row, path, line))
    if not len(ex) and span is None:
        raise NegjaxError(f"{path}: no training examples")
    return ex


def _read_pairs_ids(path: Path, corpus: Corpus, convert=None, fmt="pairs", sink=None,
                    span=None) -> TrainExamples:
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
                       "is also a positive of this query", convert, sink, span)


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


def _read_tevatron(path: Path, corpus: Corpus | None, sink=None) -> tuple[Corpus, TrainExamples]:
    """Tevatron: {"query_id", "query", "positive_passages": [{"docid", "title"?, "text"}],
    "negative_passages": [...]?}. Without a corpus the passages form it (a docid seen twice
    must carry the same text)."""
    own = corpus is None
    ids, texts, titles, index, doc_line = [], [], [], {}, {}
    ex = (sink or TrainExamples.empty)(path, "tevatron")
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
    if not len(ex):
        raise NegjaxError(f"{path}: no training examples")
    if own:
        corpus = Corpus(ids, texts, titles, str(path), index)
    return corpus, ex


def _read_beir(path: Path, corpus: Corpus, qrels_path: Path, sink=None) -> TrainExamples:
    """BEIR: queries.jsonl + qrels TSV. Score > 0 = positive, score <= 0 = given negative.
    Queries without judgements are not training queries (BEIR keeps all splits' queries in one
    file); a judged query without any positive is an error."""
    queries = read_queries(path)
    qrels = read_qrels(qrels_path, corpus=corpus, query_ids=queries.ids)
    ex = (sink or TrainExamples.empty)(path, "beir")
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
    if not len(ex):
        raise NegjaxError(f"{qrels_path}: no judged query of {path}")
    return ex
