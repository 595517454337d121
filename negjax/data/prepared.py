"""Training data prepared once per set of input files: token stores and example arrays on
disk, found again by the inputs' fingerprints, so a warm start reads no text.

    data = prepare_training(paths, tokenizer, doc_max_len=128, query_max_len=32,
                            prompts={"query": "", "doc": ""}, cache_dir=None)
    data.docs        # TokenStore of the corpus (row = document; key -> row on disk)
    data.queries     # TokenStore of the training queries (row = example)
    data.examples    # ExampleArrays: positives / negatives / teacher scores as CSR arrays

Under `<negjax cache>/tokens/`:
    docs-<key>/   the corpus' token store. With a corpus file, <key> hashes the file's
                  fingerprint (each file's resolved path, size and mtime_ns), the tokenizer,
                  doc_max_len and the document prompt; the file is streamed through
                  `StoreWriter` record by record, so building holds per-row numbers, never the
                  texts. Without one (texts inline in the training file) the documents come
                  from the training file and <key> hashes its fingerprint.
    train-<key>/  queries/ (a token store), pos_offsets / pos_rows / neg_offsets / neg_rows /
                  lines .npy (+ teacher_offsets / teacher_rows / teacher_scores), meta.json
                  last; <key> hashes the docs key, the training (and qrels) fingerprints, the
                  tokenizer, query_max_len and the query prompt.

Editing an input file changes its size or mtime, so it lands in new directories; stale
ones are never read (delete old ones under the cache to reclaim space). Both are built in a
temporary directory and renamed into place (`token_store.open_or_build`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from negjax.data import corpus_build, formats
from negjax.data.records import Where, at, fingerprint, iter_records, record_error
from negjax.data.shards import NegativeLists
from negjax.data.store_writer import DuplicateKey, StoreWriter
from negjax.data.token_store import (TokenStore, load_backend_tokenizer, open_or_build,
                                     tokenizer_hash)
from negjax.errors import NegjaxError
from negjax.utils import default_cache_dir

FORMAT = 1


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------
# Examples as arrays
# ---------------------------------------------------------------------------------------------

class _Ragged:
    """Row i of a CSR array as a list (a read-only list of lists)."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray):
        self._off, self._val = offsets, values

    def __len__(self) -> int:
        return len(self._off) - 1

    def _span(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return self._off[i], self._off[i + 1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        lo, hi = self._span(i)
        return self._val[lo:hi].tolist()


class _TeacherScores(_Ragged):
    """Row i as {corpus row: teacher score}."""

    def __init__(self, offsets, rows, scores):
        super().__init__(offsets, rows)
        self._scores = scores

    def __getitem__(self, i) -> dict:
        lo, hi = self._span(i)
        return dict(zip(self._val[lo:hi].tolist(), self._scores[lo:hi].tolist()))


class ExampleArrays:
    """Training examples read from a prepared directory (memory-mapped): the interface of
    `formats.TrainExamples` the pipeline and the shard loader use, without Python lists."""

    def __init__(self, directory: Path, queries: TokenStore, meta: dict):
        self.maps = []  # the arrays' maps (`token_store.drop_pages`)

        def load(name):
            self.maps.append(np.load(directory / f"{name}.npy", mmap_mode="r"))
            return self.maps[-1]

        self.meta = meta
        self.path, self.format = meta["train_path"], meta["train_format"]
        self.query_store, self.query_ids = queries, queries.keys
        self._pos = NegativeLists(np.asarray(load("pos_offsets")), np.asarray(load("pos_rows")))
        self._neg = NegativeLists(np.asarray(load("neg_offsets")), np.asarray(load("neg_rows")))
        self.lines = np.asarray(load("lines"))
        self.positives = _Ragged(self._pos.offsets, self._pos.rows)
        self.negatives = _Ragged(self._neg.offsets, self._neg.rows)
        if meta["teacher_scores"]:
            self.teacher = _TeacherScores(np.asarray(load("teacher_offsets")),
                                          np.asarray(load("teacher_rows")),
                                          np.asarray(load("teacher_scores")))
        else:
            self.teacher = []

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def has_teacher_scores(self) -> bool:
        return len(self.teacher) > 0

    def positive_lists(self) -> NegativeLists:
        return self._pos

    def negative_lists(self) -> NegativeLists:
        return NegativeLists(self._neg.offsets, self._neg.rows, "", int((self._neg.counts() > 0).sum()))

    def with_teacher(self, teacher: list) -> "ExampleArrays":
        """A copy whose teacher scores are `teacher` (per example {row: score})."""
        out = object.__new__(ExampleArrays)
        out.__dict__.update(self.__dict__)
        out.teacher = teacher
        return out


class ExampleWriter:
    """Training examples written to a prepared directory as the readers produce them
    (`formats.read_training(sink=...)`): queries into a `StoreWriter`, positives, negatives,
    lines and teacher scores into growing integer arrays; memory per example is a few numbers,
    never its texts. `finish(meta)` writes the arrays and meta.json last."""

    def __init__(self, directory: Path, tokenizer, *, max_len: int, prompt: str, path="",
                 fmt: str = "", total=None, thread: bool = True):
        from array import array

        self.dir, self.prompt, self.path, self.format = Path(directory), prompt, str(path), fmt
        (self.dir / "queries").mkdir()
        self._store = StoreWriter(self.dir / "queries", tokenizer, max_len=max_len,
                                  name="queries", total=total, thread=thread)
        self._ids, self._texts = [], []
        self._arrays = {name: array(code) for name, code in (
            ("pos_counts", "q"), ("pos_rows", "i"), ("neg_counts", "q"), ("neg_rows", "i"),
            ("lines", "q"), ("teacher_counts", "q"), ("teacher_rows", "i"),
            ("teacher_scores", "d"))}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, query_id: str, query: str, positives, negatives, line, teacher=None) -> None:
        a = self._arrays
        self._ids.append(query_id)
        self._texts.append(self.prompt + query)
        a["pos_counts"].append(len(positives))
        a["pos_rows"].extend(positives)
        a["neg_counts"].append(len(negatives))
        a["neg_rows"].extend(negatives)
        a["lines"].append(int(line))
        teacher = teacher or {}
        a["teacher_counts"].append(len(teacher))
        a["teacher_rows"].extend(teacher.keys())
        a["teacher_scores"].extend(teacher.values())
        self._n += 1
        if len(self._ids) == corpus_build.RECORDS:
            self._flush()

    def _flush(self) -> None:
        self._store.add(self._ids, self._texts)
        self._ids, self._texts = [], []

    @property
    def backend(self):
        return self._store.backend

    @property
    def max_len(self) -> int:
        return self._store.max_len

    def save_part(self) -> None:
        """End a part that one process of a parallel build wrote (`corpus_build`): the
        queries' part and the raw arrays, for `add_part`."""
        self._flush()
        self._store.save_part()
        for name, arr in self._arrays.items():
            (self.dir / f"{name}.bin").write_bytes(arr.tobytes())
        (self.dir / "part.json").write_text(json.dumps({"examples": self._n}))

    def add_part(self, part: Path) -> None:
        """Append the examples of a part (`save_part`) after those written so far."""
        self._flush()
        self._store.add_part(part / "queries")
        for name, arr in self._arrays.items():
            arr.frombytes((part / f"{name}.bin").read_bytes())
        self._n += json.loads((part / "part.json").read_text())["examples"]

    def finish(self, meta: dict) -> None:
        self._flush()
        try:
            self._store.finish()
        except DuplicateKey as e:  # (one process found these when reading; parts find them here)
            lines = [Where(self._arrays["lines"][r]) for r in e.rows]
            raise record_error(self.path, lines[1], f"duplicate query id {e.key!r} (first at "
                               f"{at(lines[0])})") from None
        a = {k: np.frombuffer(v, dtype=v.typecode) if len(v) else np.zeros(0, v.typecode)
             for k, v in self._arrays.items()}
        teacher = len(a["teacher_rows"]) > 0
        for name in ("pos", "neg") + (("teacher",) if teacher else ()):
            offsets = np.zeros(self._n + 1, dtype=np.int64)
            np.cumsum(a[f"{name}_counts"], out=offsets[1:])
            np.save(self.dir / f"{name}_offsets.npy", offsets)
            np.save(self.dir / f"{name}_rows.npy", a[f"{name}_rows"].astype(np.int32))
        np.save(self.dir / "lines.npy", a["lines"].astype(np.int64))
        if teacher:
            np.save(self.dir / "teacher_scores.npy", a["teacher_scores"].astype(np.float64))
        (self.dir / "meta.json").write_text(json.dumps(
            {**meta, "train_format": self.format, "examples": self._n,
             "teacher_scores": teacher}, indent=1))

    def abort(self) -> None:
        self._store.abort()


def _write_examples(tmp: Path, ex: formats.TrainExamples, tokenizer, max_len: int,
                    prompt: str, meta: dict) -> None:
    """Examples read into memory (training files whose texts form the corpus) -> `tmp`."""
    w = ExampleWriter(tmp, tokenizer, max_len=max_len, prompt=prompt, path=ex.path,
                      fmt=ex.format, total=len(ex))
    try:
        for i in range(len(ex)):
            w.add(ex.query_ids[i], ex.queries[i], ex.positives[i], ex.negatives[i], ex.lines[i],
                  ex.teacher[i] if ex.teacher else None)
        w.finish(meta)
    except BaseException:
        w.abort()
        raise


# ---------------------------------------------------------------------------------------------
# The corpus, streamed
# ---------------------------------------------------------------------------------------------

class StoreCorpus:
    """A corpus token store seen as a `formats.Corpus` by the training readers: ids, index
    (key -> row on disk), path; no texts."""

    def __init__(self, store: TokenStore, path):
        self.store, self.path = store, str(path)
        self.ids, self.index = store.keys, store.index

    def __len__(self) -> int:
        return len(self.store)

    def row(self, doc_id: str) -> int:
        return self.store.row(doc_id)


def _stream_corpus(tmp: Path, path: Path, tokenizer, max_len: int, prompt: str) -> None:
    """Tokenise a corpus file into a store at `tmp`, record by record (the checks of
    `formats.read_corpus`; a duplicate id names both records), on every core when it is
    large (`negjax.data.corpus_build`)."""
    w = StoreWriter(tmp, tokenizer, max_len=max_len, name="docs")
    try:
        spans = corpus_build.plan(path)
        if spans:
            corpus_build.build_parts(w, spans, {"kind": "docs", "path": str(path),
                                                "prompt": prompt})
        else:
            corpus_build.feed(w, path, prompt)
    except BaseException:
        w.abort()
        raise
    try:
        meta = w.finish(source=str(path), inputs=fingerprint(path))
    except DuplicateKey as e:
        first, second = (next(where for i, (where, _) in enumerate(iter_records(path)) if i == r)
                         for r in e.rows)
        raise record_error(path, second, f"duplicate document id {e.key!r} (first at "
                           f"{at(first)})") from None
    if meta["num_texts"] == 0:
        raise NegjaxError(f"{path}: no documents")


def _open_examples(directory: Path) -> ExampleArrays:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        examples = ExampleArrays(directory, TokenStore.open(directory / "queries"), meta)
    except (OSError, ValueError, KeyError) as e:
        raise NegjaxError(f"{directory}: unreadable prepared training data ({e})") from None
    if meta.get("format") != FORMAT or len(examples) != len(examples.query_store) \
            or len(examples.positives) != len(examples):
        raise NegjaxError(f"{directory}: prepared training data does not match its meta.json")
    return examples


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def shared_token_stores(build, cache_dir=None):
    """`build()` (which builds or opens token stores under `cache_dir`) run once per host: in
    a multi-process job the processes that see the same resolved cache directory on the same
    host elect a leader (the lowest process index), the leader builds, all wait at a barrier,
    then the others call `build()` too, which opens the stores the leader wrote (or, should
    they not be there, e.g. a directory that is not what it seems, builds its own; a store is
    renamed into place complete, so concurrent builders stay safe). Hosts that share a
    network cache each tokenise once. Collective; one process: `build()`."""
    import jax

    if jax.process_count() == 1:
        return build()
    from negjax.distributed import barrier
    from negjax.multihost import host_leader
    from negjax.utils import default_cache_dir

    leader = host_leader(default_cache_dir(cache_dir) / "tokens")
    out, error = None, None
    if leader:
        try:
            out = build()
        except Exception as e:  # reach the barrier first: the others then fail alike or build
            error = e
    barrier("token-stores")
    if error is not None:
        raise error
    return out if leader else build()


@dataclass
class Prepared:
    docs: TokenStore
    queries: TokenStore
    examples: ExampleArrays
    corpus: StoreCorpus
    built: list  # names of what was built now ([] = everything was in the cache)


def _docs_key(from_corpus: bool, source: list, tok: list, max_len: int, prompt: str) -> str:
    return _key(FORMAT, "docs", from_corpus, source, tok, max_len, prompt)


def corpus_store(corpus_path, tokenizer, *, max_len: int, prompt: str = "",
                 cache_dir=None) -> TokenStore:
    """The token store of a corpus file (`<cache>/tokens/docs-<key>`, the one training uses
    for the same corpus, tokenizer, max length and prompt), streamed in unless cached: what
    evaluation encodes its rows from. Not collective (wrap in `shared_token_stores`)."""
    backend, pad_id = load_backend_tokenizer(tokenizer)
    key = _docs_key(True, fingerprint(corpus_path), [tokenizer_hash(backend), pad_id], max_len,
                    prompt)
    return open_or_build(default_cache_dir(cache_dir) / "tokens" / f"docs-{key}",
                         lambda tmp: _stream_corpus(tmp, Path(corpus_path), tokenizer, max_len, prompt))


def prepare_training(paths: dict, tokenizer, *, doc_max_len: int, query_max_len: int,
                     prompts: dict | None = None, cache_dir=None) -> Prepared:
    """The prepared training data of `paths` (`layout.resolve_dataset`: "train", "corpus",
    "train_qrels"), built now unless the cache has it (see the module docstring)."""
    prompts = prompts or {}
    train, corpus_path, qrels = paths["train"], paths.get("corpus"), paths.get("train_qrels")
    backend, pad_id = load_backend_tokenizer(tokenizer)
    tok = [tokenizer_hash(backend), pad_id]
    root = default_cache_dir(cache_dir) / "tokens"
    # With a corpus file the documents are its records (training entries are its ids),
    # without one the training file's texts; the format is detected only when building.
    use_corpus = corpus_path is not None
    source = fingerprint(corpus_path) if use_corpus else fingerprint(train)
    doc_key = _docs_key(use_corpus, source, tok, doc_max_len, prompts.get("doc", ""))
    train_key = _key(FORMAT, "train", doc_key, fingerprint(train),
                     fingerprint(qrels) if qrels else None, tok, query_max_len,
                     prompts.get("query", ""))
    docs_dir, train_dir = root / f"docs-{doc_key}", root / f"train-{train_key}"
    built, read = [], {}

    def train_format() -> str:
        if "format" not in read:
            read["format"] = "queries" if qrels else formats.detect_train_format(train)
            if use_corpus and read["format"] == "sentence-transformers":
                raise NegjaxError(f"{train}: sentence-transformers columns carry texts, not "
                                  "corpus ids; train without a corpus (the texts form it)")
        return read["format"]

    def read_training(corpus):
        if "examples" not in read:
            read["corpus"], read["examples"] = formats.read_training(
                train, corpus, qrels=qrels, fmt=train_format())
        return read["corpus"], read["examples"]

    def write_docs(tmp):
        built.append("docs")
        train_format()  # (refuse a training file that cannot use the corpus before reading it)
        if use_corpus:
            return _stream_corpus(tmp, Path(corpus_path), tokenizer, doc_max_len, prompts.get("doc", ""))
        corpus, _ = read_training(None)
        w = StoreWriter(tmp, tokenizer, max_len=doc_max_len, name="docs", total=len(corpus))
        doc_prompt = prompts.get("doc", "")
        w.add(corpus.ids, [doc_prompt + t for t in corpus.texts] if doc_prompt else corpus.texts)
        w.finish(source=str(train), inputs=fingerprint(train))

    docs = open_or_build(docs_dir, write_docs)
    store_corpus = StoreCorpus(docs, corpus_path if use_corpus else train)
    meta = {"format": FORMAT, "train_path": str(train),
            "inputs": {"train": fingerprint(train), "corpus": source if use_corpus else None,
                       "train_qrels": fingerprint(qrels) if qrels else None}, "docs": docs_dir.name}

    def write_train(tmp):
        built.append("train")
        if not use_corpus:  # (the texts are in memory already: they form the corpus)
            _, ex = read_training(None)
            return _write_examples(tmp, ex, tokenizer, query_max_len, prompts.get("query", ""), meta)
        fmt = train_format()
        spans = corpus_build.plan(train) if fmt in ("pairs", "tevatron-ids") else []
        if spans:  # read by one process per core (byte ranges), the parts appended in order
            w = ExampleWriter(tmp, tokenizer, max_len=query_max_len, path=train, fmt=fmt,
                              prompt=prompts.get("query", ""))
            try:
                corpus_build.build_parts(w, spans, {
                    "kind": "train", "path": str(train), "fmt": fmt, "docs": str(docs_dir),
                    "corpus": str(corpus_path), "prompt": prompts.get("query", "")})
                if not len(w):
                    raise NegjaxError(f"{train}: no training examples")
                return w.finish(meta)
            except BaseException:
                w.abort()
                raise
        writers = []

        def sink(path, fmt):  # the examples go to disk as they are read
            writers.append(ExampleWriter(tmp, tokenizer, max_len=query_max_len,
                                         prompt=prompts.get("query", ""), path=path, fmt=fmt))
            return writers[-1]

        try:
            formats.read_training(train, store_corpus, qrels=qrels, fmt=fmt, sink=sink)
            writers[-1].finish(meta)
        except BaseException:
            for w in writers:
                w.abort()
            raise

    examples = open_or_build(train_dir, write_train, _open_examples)
    return Prepared(docs, examples.query_store, examples, store_corpus, built)
