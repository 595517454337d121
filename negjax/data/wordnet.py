"""The built-in WordNet 3.0 sense-retrieval dataset and the tokenizer of the 'tiny' model.

A query is a WordNet usage example ("the wind backed"); its positive is the document of the
example's synset: lemmas, part of speech and definition, never the examples themselves
("back, veer (verb): shift to a counterclockwise direction"). Other senses of the same word
are natural hard negatives; near-synonymous senses natural false negatives. The corpus holds
every synset; queries are split 90/5/5 into train/dev/test by a stable hash of the synset, so
dev/test synsets are never training positives. `tools/build_wordnet.py` builds the compressed
files shipped in `wordnet_data/` (with WordNet's licence, which asks that it travel with every
copy); this module only expands them into the project's input formats (docs/formats.md):

    corpus.jsonl         {"id": "n.00001740", "text": "entity (noun): that which is ..."}
    train.jsonl          {"id": "q.n.00001740.0", "query": "...", "pos": ["n.00001740"]}
    dev_queries.jsonl    {"id", "text"}      dev_qrels.tsv    query-id  corpus-id  score (BEIR)
    test_queries.jsonl   {"id", "text"}      test_qrels.tsv
    WORDNET_LICENSE.txt  WordNet 3.0 licence (it must accompany every copy)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from negjax.errors import NegjaxError
from negjax.utils import atomic_path, sha256_file

DATA_DIR = Path(__file__).resolve().parent / "wordnet_data"
FILES = ("corpus.jsonl", "train.jsonl", "dev_queries.jsonl", "dev_qrels.tsv",
         "test_queries.jsonl", "test_qrels.tsv")
LICENSE_NAME = "WORDNET_LICENSE.txt"
QRELS_HEADER = "query-id\tcorpus-id\tscore\n"
# Bump when export() writes different bytes from the same shipped data (invalidates caches).
EXPORT_FORMAT = "1"
_COMPLETE = ".negjax-export.json"  # written into a cached export just before it is published


@lru_cache(maxsize=1)
def manifest() -> dict:
    """The build manifest shipped beside the data: counts, split rule, sha256 of every file."""
    path = DATA_DIR / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NegjaxError(f"{path}: built-in WordNet data is missing from this installation "
                          "(rebuild with tools/build_wordnet.py or reinstall negjax)") from None


def version() -> str:
    """12 hex digits naming the shipped data + export format (names the cache directory)."""
    manifest()  # a clear error when the data is missing
    h = hashlib.sha256((DATA_DIR / "manifest.json").read_bytes())
    h.update(EXPORT_FORMAT.encode())
    return h.hexdigest()[:12]


def counts() -> dict[str, int]:
    """{"corpus", "train", "dev", "test", "train_qrels", "dev_qrels", "test_qrels"}: documents,
    queries per split and (query, positive) pairs per split."""
    return dict(manifest()["counts"])


def tokenizer_dir() -> Path:
    """Directory of the built-in lower-cased WordPiece tokenizer (vocab 8,000; [PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, [MASK]=4; adds [CLS] ... [SEP]), for `AutoTokenizer.from_pretrained`."""
    path = DATA_DIR / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise NegjaxError(f"{path}: built-in tokenizer is missing from this installation "
                          "(rebuild with tools/build_wordnet.py or reinstall negjax)")
    return path


def _verified(name: str) -> Path:
    """A shipped data file whose sha256 matches the manifest (a truncated install fails here)."""
    path = DATA_DIR / name
    want = manifest()["files"].get(name)
    if not path.is_file() or want is None or sha256_file(path) != want:
        raise NegjaxError(f"{path}: missing or corrupt (sha256 does not match manifest.json); "
                          "reinstall negjax")
    return path


def _read_jsonl_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def export(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write the six dataset files (+ WordNet's licence) into `out_dir` (created if needed;
    each file written to a temporary name and renamed). Returns records written per file."""
    out = Path(out_dir)
    corpus_gz, queries_gz = _verified("corpus.jsonl.gz"), _verified("queries.jsonl.gz")
    license_text = _verified("LICENSE").read_text()
    written = dict.fromkeys(FILES, 0)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "corpus.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for doc in _read_jsonl_gz(corpus_gz):
                f.write(_dumps({"id": doc["id"], "text": doc["text"]}))
                written["corpus.jsonl"] += 1
        queries = list(_read_jsonl_gz(queries_gz))
        with atomic_path(out / "train.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for q in queries:
                if q["split"] == "train":
                    f.write(_dumps({"id": q["id"], "query": q["text"], "pos": q["pos"]}))
                    written["train.jsonl"] += 1
        for split in ("dev", "test"):
            rows = [q for q in queries if q["split"] == split]
            with atomic_path(out / f"{split}_queries.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
                for q in rows:
                    f.write(_dumps({"id": q["id"], "text": q["text"]}))
            with atomic_path(out / f"{split}_qrels.tsv") as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(QRELS_HEADER)
                for q in rows:
                    for doc_id in q["pos"]:
                        f.write(f"{q['id']}\t{doc_id}\t1\n")
                        written[f"{split}_qrels.tsv"] += 1
            written[f"{split}_queries.jsonl"] = len(rows)
        with atomic_path(out / LICENSE_NAME) as tmp:
            tmp.write_text(license_text)
    except OSError as e:
        where = e.filename or out
        raise NegjaxError(f"{where}: cannot write the WordNet dataset: {e.strerror or e}") from None
    return written


def ensure_exported(cache_dir: str | os.PathLike | None = None) -> Path:
    """The exported dataset directory `<cache>/wordnet-<version>`, exporting it on first use.

    `cache_dir` defaults to $NEGJAX_CACHE, else ~/.cache/negjax. The export is built in a
    temporary sibling directory and renamed into place, so concurrent callers (several
    processes of one job) never see a half-written directory; the loser of the race discards
    its copy.
    """
    from negjax.utils import default_cache_dir

    root = default_cache_dir(cache_dir)
    target = root / f"wordnet-{version()}"
    if (target / _COMPLETE).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the published cache is readable
    except OSError as e:
        raise NegjaxError(f"{e.filename or root}: cannot create the dataset cache: {e.strerror or e}") from None
    try:
        written = export(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"version": version(), "records": written}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():
                # A stale, incomplete directory from an older crash: replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# The built-in data as three sources by part of speech (experiments/sources: single-source
# against mixed batches): synset ids start with their part of speech.
POS_SOURCES = {"nouns": ("n",), "verbs": ("v",), "adjectives": ("a", "s", "r")}


def split_by_pos(out_dir: str | os.PathLike, *, cache_dir=None, max_train: int = 0,
                 max_dev: int = 0, corpus_every: int = 1) -> dict[str, Path]:
    """The built-in dataset split into `POS_SOURCES` datasets (nouns, verbs, adjectives and
    adverbs), each a directory of the dataset layout with its own corpus (the synsets of its
    parts of speech), training queries and dev / test queries and qrels. `max_train` /
    `max_dev` (0 = all) keep each source's first queries; `corpus_every` > 1 keeps every k-th
    document plus those the kept queries need (small slices for tests). Returns {name: dir}."""
    root = ensure_exported(cache_dir)
    out = Path(out_dir)
    pos_of = {letter: name for name, letters in POS_SOURCES.items() for letter in letters}

    def lines(name):
        return (root / name).read_text(encoding="utf-8").splitlines()

    def source(doc_id: str) -> str:
        return pos_of[doc_id.split(".", 1)[0]]

    # A query goes to the source of its first positive and keeps the positives of that
    # source (a few WordNet examples also name a synset of another part of speech).
    train = {name: [] for name in POS_SOURCES}
    for line in lines("train.jsonl"):
        rec = json.loads(line)
        name = source(rec["pos"][0])
        rec["pos"] = [p for p in rec["pos"] if source(p) == name]
        train[name].append(_dumps(rec).rstrip("\n"))
    splits = {}
    for split in ("dev", "test"):
        qrels = [r.split("\t") for r in lines(f"{split}_qrels.tsv")[1:]]
        src_of = {}
        for q, d, _ in qrels:
            src_of.setdefault(q, source(d))
        qrels = [r for r in qrels if source(r[1]) == src_of[r[0]]]
        queries = {name: [] for name in POS_SOURCES}
        for line in lines(f"{split}_queries.jsonl"):
            queries[src_of[json.loads(line)["id"]]].append(line)
        splits[split] = (queries, qrels)
    docs = [(json.loads(line)["id"], line) for line in lines("corpus.jsonl")]
    made = {}
    for name in POS_SOURCES:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        rows = train[name][:max_train or None]
        needed = {p for line in rows for p in json.loads(line)["pos"]}
        for split, (queries, qrels) in splits.items():
            keep = queries[name][:(max_dev or None) if split == "dev" else None]
            if split == "test" and max_dev:
                keep = keep[:max_dev]
            ids = {json.loads(q)["id"] for q in keep}
            rel = [r for r in qrels if r[0] in ids]
            needed |= {r[1] for r in rel}
            with atomic_path(d / f"{split}_queries.jsonl") as tmp:
                tmp.write_text("".join(q + "\n" for q in keep), encoding="utf-8")
            with atomic_path(d / f"{split}_qrels.tsv") as tmp:
                tmp.write_text(QRELS_HEADER + "".join("\t".join(r) + "\n" for r in rel))
        corpus = [line for i, (doc_id, line) in enumerate(docs)
                  if source(doc_id) == name and (i % corpus_every == 0 or doc_id in needed)]
        with atomic_path(d / "corpus.jsonl") as tmp:
            tmp.write_text("".join(x + "\n" for x in corpus), encoding="utf-8")
        with atomic_path(d / "train.jsonl") as tmp:
            tmp.write_text("".join(x + "\n" for x in rows), encoding="utf-8")
        with atomic_path(d / LICENSE_NAME) as tmp:
            tmp.write_text(_verified("LICENSE").read_text())
        made[name] = d
    return made
