"""Hard-negative shards: the file contract between `negjax mine` and the training pipeline.

A shard directory holds Parquet files `shard-00000.parquet`, ... with one row per query

    query_id str, positive_ids list<str>, negative_ids list<str> (ranked, best first),
    negative_scores list<float32>, negative_ranks list<int32> (1-based), positive_score float32

and, when mined with `--teacher-scores`, teacher_positive_scores / teacher_negative_scores
list<float32> (a teacher's score per entry of positive_ids / negative_ids, NaN = not scored)

and `manifest.json`, written last:

    {"format_version": 1, "model": {"path", "step"}, "index": {...}, "filters": {...},
     "counts": {"queries", "negatives", ...}, "shards": [{"name", "rows", "bytes", "sha256"}]}

Writing (mining job, possibly several processes, possibly resumed):

    w = ShardWriter(out_dir)
    done = w.completed()                      # {k: info} shards already on disk (resume)
    w.write(k, query_ids=..., positive_ids=..., negative_ids=..., negative_scores=...,
            negative_ranks=..., positive_score=...)   # temp name, then rename
    w.finalize(model={"path": ckpt, "step": 1000}, index={...}, filters={...})  # manifest last

Reading (training): `verify(dir)` checks the manifest, every shard's size, sha256 and row
count, and that no unlisted shard lies beside them; `load_negatives(dir, examples, corpus)`
returns the ranked negatives of every training query as corpus rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError, file_error
from negjax.utils import atomic_path, atomic_write_text, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
COLUMNS = ("query_id", "positive_ids", "negative_ids", "negative_scores", "negative_ranks",
           "positive_score")
TEACHER_COLUMNS = ("teacher_positive_scores", "teacher_negative_scores")  # optional


def schema():
    import pyarrow as pa

    return pa.schema([
        ("query_id", pa.string()),
        ("positive_ids", pa.list_(pa.string())),
        ("negative_ids", pa.list_(pa.string())),
        ("negative_scores", pa.list_(pa.float32())),
        ("negative_ranks", pa.list_(pa.int32())),
        ("positive_score", pa.float32()),
    ])


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _shard_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if _SHARD_RE.match(p.name)}


def shard_info(path) -> dict:
    """{name, rows, bytes, sha256} of a complete shard file; NegjaxError if it is not one."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken footers
        raise NegjaxError(f"{path}: not a readable Parquet file (corrupt or truncated): {e}") from None
    return {"name": path.name, "rows": int(rows), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes shards one at a time and the manifest last (see the module docstring).

    Safe to use from several processes on one directory as long as each writes distinct
    shard numbers and only one calls `finalize` after all are done.
    """

    def __init__(self, directory, *, overwrite: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / MANIFEST
        if manifest.exists():
            if not overwrite:
                raise NegjaxError(f"{self.dir}: already holds a finished shard set ({MANIFEST}); "
                                  "choose another output directory or pass overwrite")
            manifest.unlink()
        if overwrite:
            for p in _shard_files(self.dir).values():
                p.unlink()

    def completed(self) -> dict[int, dict]:
        """Shards already on disk, {k: info}; each is verified to be a readable Parquet file
        with our schema (a file under its final name was renamed there when complete)."""
        out = {}
        for name, path in sorted(_shard_files(self.dir).items()):
            info = shard_info(path)
            _check_schema(path)
            out[int(_SHARD_RE.match(name).group(1))] = info
        return out

    def write(self, k: int, *, query_ids, positive_ids, negative_ids, negative_scores,
              negative_ranks=None, positive_score=None, teacher_positive_scores=None,
              teacher_negative_scores=None) -> dict:
        """Write shard k (one row per query) atomically; returns {name, rows, bytes, sha256}.

        negative_ranks default to 1..n per row; positive_score to NaN (unknown).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(query_ids)
        if negative_ranks is None:
            negative_ranks = [list(range(1, len(x) + 1)) for x in negative_ids]
        if positive_score is None:
            positive_score = np.full(n, np.nan, np.float32)
        cols = dict(query_id=list(query_ids), positive_ids=positive_ids,
                    negative_ids=negative_ids, negative_scores=negative_scores,
                    negative_ranks=negative_ranks, positive_score=positive_score)
        for name, col in cols.items():
            if len(col) != n:
                raise ValueError(f"shard {k}: column {name} has {len(col)} rows, expected {n}")
        for i in range(n):
            m = len(negative_ids[i])
            if len(negative_scores[i]) != m or len(negative_ranks[i]) != m:
                raise ValueError(f"shard {k} row {i}: negative_ids/scores/ranks lengths differ")
        arrays = {name: pa.array(_plain(cols[name]), type=schema().field(name).type)
                  for name in COLUMNS}
        if teacher_negative_scores is not None:
            for name, col, ref in (("teacher_positive_scores", teacher_positive_scores, positive_ids),
                                   ("teacher_negative_scores", teacher_negative_scores, negative_ids)):
                if len(col) != n or any(len(a) != len(b) for a, b in zip(col, ref)):
                    raise ValueError(f"shard {k}: {name} does not match its ids")
                arrays[name] = pa.array(_plain(col), type=pa.list_(pa.float32()))
        table = pa.table(arrays)
        final = self.dir / shard_name(k)
        with atomic_path(final) as tmp:
            pq.write_table(table, tmp)
        return shard_info(final)

    def finalize(self, *, model: dict | None = None, index: dict | None = None,
                 filters: dict | None = None, counts: dict | None = None,
                 shards: list[dict] | None = None, teacher: dict | None = None) -> dict:
        """Write manifest.json last. shards: the infos returned by `write` (all processes');
        None = every shard file in the directory (re-verified). counts are merged over the
        computed {"shards", "queries", "negatives"}."""
        if shards is None:
            shards = list(self.completed().values())
        shards = sorted(shards, key=lambda s: s["name"])
        on_disk = set(_shard_files(self.dir))
        missing = [s["name"] for s in shards if s["name"] not in on_disk]
        if missing:
            raise NegjaxError(f"{self.dir}: cannot finalize, shards missing: {missing[:5]}")
        extra = sorted(on_disk - {s["name"] for s in shards})
        if extra:
            raise NegjaxError(f"{self.dir}: cannot finalize, shards on disk but not listed: {extra[:5]}")
        total = {"shards": len(shards), "queries": sum(s["rows"] for s in shards),
                 "negatives": _count_negatives(self.dir, shards)}
        manifest = {"format_version": FORMAT_VERSION, "model": model or {"path": "", "step": None},
                    "index": index or {}, "filters": filters or {},
                    "counts": {**total, **(counts or {})}, "shards": shards}
        if teacher:  # the teacher-score file the shards' teacher columns come from
            manifest["teacher"] = teacher
        atomic_write_text(self.dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return manifest


def _plain(col):
    return col.tolist() if isinstance(col, np.ndarray) else [
        x.tolist() if isinstance(x, np.ndarray) else x for x in col]


def _count_negatives(directory: Path, shards: list[dict]) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    n = 0
    for s in shards:
        col = pq.read_table(directory / s["name"], columns=["negative_ids"]).column(0)
        n += int(pc.sum(pc.list_value_length(col)).as_py() or 0)
    return n


def _check_schema(path: Path) -> None:
    import pyarrow.parquet as pq

    got = pq.read_schema(path)
    want = schema()
    for fld in want:
        if got.get_field_index(fld.name) < 0 or not got.field(fld.name).type.equals(fld.type):
            have = got.field(fld.name).type if got.get_field_index(fld.name) >= 0 else "missing"
            raise NegjaxError(f"{path}: column {fld.name!r} should be {fld.type}, is {have}")


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

def read_manifest(directory) -> dict:
    """The parsed manifest; NegjaxError when the directory or manifest is missing or invalid."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NegjaxError(f"{directory}: hard-negative directory not found")
    path = directory / MANIFEST
    if not path.is_file():
        shards = sorted(_shard_files(directory))
        hint = (f"; it holds {len(shards)} shard(s) but no manifest: the mining job did not "
                "finish (re-run it to resume)") if shards else ""
        raise NegjaxError(f"{directory}: no {MANIFEST}, not a complete hard-negative shard "
                          f"directory{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(path, getattr(e, "lineno", None), f"invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise file_error(path, None, "not a shard manifest (no 'shards' list)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise file_error(path, None, f"format_version {manifest.get('format_version')!r}, "
                         f"this negjax reads {FORMAT_VERSION}")
    for i, s in enumerate(manifest["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and
                isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str)):
            raise file_error(path, None, f"shards[{i}] needs name, rows and sha256")
    return manifest


def verify(directory) -> dict:
    """Check the manifest and every shard (size, sha256, Parquet row count and schema) and that
    no unlisted shard file lies in the directory. Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {s["name"] for s in manifest["shards"]}
    for s in manifest["shards"]:
        path = directory / s["name"]
        if not path.is_file():
            raise NegjaxError(f"{path}: listed in {MANIFEST} but missing (partial directory)")
        size = path.stat().st_size
        if "bytes" in s and size != s["bytes"]:
            raise NegjaxError(f"{path}: {size} bytes, {MANIFEST} says {s['bytes']} "
                              f"({'truncated' if size < s['bytes'] else 'modified'})")
        digest = sha256_file(path)
        if digest != s["sha256"]:
            raise NegjaxError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST} "
                              f"({s['sha256'][:12]}...): the shard is corrupt or was modified")
        info = shard_info(path)
        if info["rows"] != s["rows"]:
            raise NegjaxError(f"{path}: {info['rows']} rows, {MANIFEST} says {s['rows']}")
        _check_schema(path)
    extra = sorted(set(_shard_files(directory)) - listed)
    if extra:
        raise NegjaxError(f"{directory}: shard files not listed in {MANIFEST}: {extra[:5]} "
                          "(left over from another run?)")
    return manifest


def read_table(directory, *, check: bool = True):
    """All shards concatenated as one pyarrow Table (verified first unless check=False)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = verify(directory) if check else read_manifest(directory)
    tables = []
    for s in manifest["shards"]:
        path = directory / s["name"]
        try:
            names = pq.read_schema(path).names
            extra = [c for c in TEACHER_COLUMNS if c in names]
            t = pq.read_table(path, columns=list(COLUMNS) + extra)
            tables.append(t.cast(pa.schema([schema().field(c) for c in COLUMNS] +
                                           [pa.field(c, pa.list_(pa.float32())) for c in extra])))
        except Exception as e:
            raise NegjaxError(f"{path}: cannot read: {e}") from None
    if tables and len({tuple(t.column_names) for t in tables}) > 1:
        raise NegjaxError(f"{directory}: some shards have teacher scores and some do not")
    return pa.concat_tables(tables) if tables else schema().empty_table()


@dataclass
class NegativeLists:
    """Ranked negatives of every training example as corpus rows (CSR layout).

    Example i's negatives are rows[offsets[i]:offsets[i+1]] (best ranked first).
    """
    offsets: np.ndarray   # [num_examples + 1] int64
    rows: np.ndarray      # [M] int32
    source: str = ""
    queries_found: int = 0      # training examples that have a shard row
    extra_queries: int = 0      # shard rows whose query is not a training example
    teacher: list | None = None  # per example {corpus row: teacher score} (mined --teacher-scores)

    @classmethod
    def from_lists(cls, lists, source: str = "") -> "NegativeLists":
        lens = np.array([len(x) for x in lists], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        rows = np.fromiter((r for x in lists for r in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(offsets, rows, source, int((lens > 0).sum()), 0)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def load_negatives(directory, examples, corpus, *, check: bool = True) -> NegativeLists:
    """Negatives from a verified shard directory, aligned to `examples` (TrainExamples) and
    mapped to rows of `corpus`. Unknown document ids and duplicated query ids are errors naming
    the shard and row; positives of the example are dropped from its list (mined lists never
    hold them, but a shard mined against other training data might)."""
    import pyarrow.compute as pc

    directory = Path(directory)
    table = read_table(directory, check=check)
    manifest = read_manifest(directory)
    bounds = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])

    def where(row: int) -> str:
        k = int(np.searchsorted(bounds, row, side="right")) - 1
        return f"{directory / manifest['shards'][k]['name']}: row {row - bounds[k]}"

    qids = table.column("query_id").combine_chunks()
    ex_index = _index_in(qids, examples.query_ids)
    ex_index = ex_index.to_numpy(zero_copy_only=False)
    found = ~np.isnan(ex_index) if ex_index.dtype.kind == "f" else np.ones(len(ex_index), bool)
    ex_rows = np.where(found, np.nan_to_num(ex_index, nan=-1), -1).astype(np.int64)
    seen = np.full(len(examples), -1, dtype=np.int64)
    for r in np.flatnonzero(found):
        e = ex_rows[r]
        if seen[e] >= 0:
            raise NegjaxError(f"{where(r)}: query {examples.query_ids[e]!r} appears twice "
                              f"(also {where(int(seen[e]))})")
        seen[e] = r

    neg = table.column("negative_ids").combine_chunks()
    flat = pc.list_flatten(neg)
    offs = neg.offsets.to_numpy().astype(np.int64)
    doc = _index_in(flat, corpus.ids).to_numpy(zero_copy_only=False)
    missing = np.isnan(doc) if doc.dtype.kind == "f" else np.zeros(len(doc), bool)
    if missing.any():
        j = int(np.flatnonzero(missing)[0])
        r = int(np.searchsorted(offs, j, side="right")) - 1
        raise NegjaxError(f"{where(r)}: unknown document id {flat[j].as_py()!r} (not in "
                          f"{corpus.path or 'the corpus'}; mined against another corpus?)")
    doc = doc.astype(np.int64)

    lists = []
    for e in range(len(examples)):
        r = seen[e]
        if r < 0:
            lists.append([])
            continue
        pos = set(examples.positives[e])
        lists.append([int(d) for d in dict.fromkeys(doc[offs[r]:offs[r + 1]].tolist())
                      if d not in pos])
    out = NegativeLists.from_lists(lists, str(directory))
    if "teacher_negative_scores" in table.column_names:
        out.teacher = _teacher_scores(table, seen, corpus, doc, offs)
    out.queries_found = int((seen >= 0).sum())
    out.extra_queries = int(len(found) - found.sum())
    return out


def _index_in(values, ids):
    """pyarrow index_in of `values` in `ids` (a list, or a token store's `Keys`, whose bytes
    pyarrow reads in place)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = ids.arrow() if hasattr(ids, "arrow") else pa.array(ids, pa.string())
    return pc.index_in(values.cast(value_set.type), value_set=value_set)


def _teacher_scores(table, seen, corpus, neg_rows, neg_offs) -> list[dict]:
    """Per example {corpus row: score} of the shards' teacher columns (NaN left out)."""
    pos_ids = table.column("positive_ids").to_pylist()
    tpos = table.column("teacher_positive_scores").to_pylist()
    tneg = table.column("teacher_negative_scores").to_pylist()
    out = []
    for r in seen.tolist():
        scores = {}
        if r >= 0:
            for d, sc in zip(pos_ids[r], tpos[r]):
                row = corpus.index.get(d)
                if row is not None and sc is not None and sc == sc:
                    scores[row] = float(sc)
            for d, sc in zip(neg_rows[neg_offs[r]:neg_offs[r + 1]].tolist(), tneg[r]):
                if sc is not None and sc == sc:
                    scores[int(d)] = float(sc)
        out.append(scores)
    return out
