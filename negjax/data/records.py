"""Records of any input file, one reader per on-disk format.

    for where, obj in iter_records("corpus.parquet"):     # where: Where (line or row)
        ...

Formats (by name; a directory by its contents):
- JSONL, optionally gzip'd (`.jsonl`, `.json`, `.jsonl.gz`): one JSON object per line.
- Parquet: a `.parquet` file, or a directory of them (read in name order, row group by row
  group: memory stays bounded by one row group).
- Arrow: a `datasets.save_to_disk` directory (`state.json` + `data-*.arrow`, Arrow IPC
  streams; read with pyarrow, no `datasets` needed), or a single `.arrow` file.
- TSV (`.tsv`, `.tsv.gz`): MS MARCO's `id<TAB>text` for corpora and queries (a header
  line `id<TAB>text` is skipped).

Every record is a plain dict; a problem in one is a `NegjaxError` naming the file and where
(`path:LINE: ...` for text files, `path: row N (row group G): ...` for Parquet and Arrow).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from negjax.errors import NegjaxError, file_error

TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".tsv", ".tsv.gz")
TSV_HEADERS = ({"id", "text"}, {"_id", "text"}, {"pid", "passage"}, {"qid", "query"},
               {"docid", "text"}, {"query_id", "query"})
_BATCH = 8192  # rows converted to Python objects at a time


class Where(int):
    """A record's place in its file: the 1-based line (text files) or row (Parquet, Arrow),
    usable as an int (str() is the number); `.text` says which, e.g. 'line 7' or 'row 7 (row
    group 0)'."""

    def __new__(cls, n: int, text: str = "", file=None):
        obj = super().__new__(cls, n)
        obj.text = text or f"line {n}"
        obj.file = file  # the file inside a directory input
        return obj

    # str() and f-strings give the plain number, as for an int (`path:{line}` messages).
    def __str__(self) -> str:
        return str(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    def __repr__(self) -> str:
        return f"Where({int(self)}, {self.text!r})"


def place(path, where) -> str:
    """`path:7` (a line) or `path: row 7 (row group 0)` (a row), as messages name a record;
    in a directory input, the file inside it."""
    if isinstance(where, Where) and where.file is not None:
        path = where.file
    if isinstance(where, Where) and not where.text.startswith("line "):
        return f"{path}: {where.text}"
    return f"{path}:{int(where)}" if where is not None else f"{path}"


def at(where) -> str:
    """'line 7' or 'row 7 (row group 0)': where a record is, for messages naming another."""
    return where.text if isinstance(where, Where) else f"line {where}"


def record_error(path, where, msg: str) -> NegjaxError:
    """The error of one record: `path:7: msg` (a line) or `path: row 7 (row group 0): msg`."""
    return NegjaxError(f"{place(path, where)}: {msg}")


def input_kind(path) -> str:
    """'jsonl', 'tsv', 'parquet' or 'arrow' for a file or directory; a `NegjaxError` when it
    is none of them or does not exist."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise NegjaxError(f"{path}: a DatasetDict; pass one split's directory "
                              f"({', '.join(str(path / s) for s in splits) or 'none found'})")
        if (path / "state.json").is_file() or any(path.glob("*.arrow")):
            return "arrow"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise NegjaxError(f"{path}: a directory with no .parquet files and no Arrow dataset "
                          "(state.json + data-*.arrow)")
    if not path.is_file():
        raise NegjaxError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if name.endswith((".tsv", ".tsv.gz")):
        return "tsv"
    return "jsonl"


def input_files(path) -> list[Path]:
    """The files a (possibly directory) input consists of, in reading order."""
    path = Path(path)
    kind = input_kind(path)
    if not path.is_dir():
        return [path]
    if kind == "parquet":
        return sorted(path.glob("*.parquet"))
    state = path / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise file_error(state, None, f"not a datasets state.json ({e})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise file_error(state, None, f"lists {f.name}, which is missing")
        return files
    return sorted(path.glob("*.arrow"))


def sha256_input(path) -> str:
    """sha256 of an input: the file's bytes, or for a directory of Parquet / Arrow files
    (each file's name and sha256, in reading order)."""
    from negjax.utils import sha256_file

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    import hashlib

    h = hashlib.sha256()
    for f in input_files(path):
        h.update(f"{f.name}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def fingerprint(path) -> list:
    """[[resolved path, size, mtime_ns], ...] of the files an input consists of."""
    out = []
    for f in input_files(path):
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def input_digest(path, cache_dir=None) -> str:
    """`sha256_input(path)`, remembered under `<cache>/digests/` by the input's fingerprint
    (each file's resolved path, size and mtime_ns, as the token stores are found): the first
    call on a host reads the input's bytes once, later ones (reruns, the host's other
    processes) read none. An input rewritten with the same size and mtime keeps its old
    digest, as it keeps its token stores."""
    import hashlib

    from negjax.utils import atomic_write_text, default_cache_dir

    fp = fingerprint(path)
    key = hashlib.blake2b(json.dumps(fp).encode(), digest_size=16).hexdigest()
    memo = default_cache_dir(cache_dir) / "digests" / f"{key}.json"
    try:
        got = json.loads(memo.read_text())
        if got.get("fingerprint") == fp and isinstance(got.get("sha256"), str):
            return got["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = sha256_input(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, json.dumps({"fingerprint": fp, "sha256": digest}) + "\n")
    return digest


def iter_records(path, span=None) -> Iterator[tuple[Where, dict]]:
    """(where, record) for every record of `path` in file order (see the module docstring);
    span = (start byte, end byte, number of the line at start): only the lines that start in
    that range of an uncompressed JSONL or TSV file."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "jsonl":
        return iter_jsonl(path, span)
    if kind == "tsv":
        return _iter_tsv(path, span)
    if span is not None:
        raise ValueError(f"{path}: a byte range of a {kind} input")
    return _iter_table(path, kind)


# ---------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------

def open_lines(path: Path):
    if not path.is_file():
        raise NegjaxError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path, span=None):
    """(line number, raw line) of a text file, or of the lines starting in its byte range."""
    if span is None:
        with open_lines(path) as fh:
            yield from enumerate(fh, 1)
        return
    start, end, lineno = span
    with open(path, "rb") as fh:
        fh.seek(start)
        for raw in fh:
            if start >= end:
                return
            yield lineno, raw
            start, lineno = start + len(raw), lineno + 1


def decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise file_error(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return line.lstrip("\ufeff") if lineno == 1 else line


def iter_jsonl(path, span=None) -> Iterator[tuple[Where, dict]]:
    """(line, object) for every non-blank line; anything but a JSON object is an error."""
    path = Path(path)
    for lineno, raw in _lines(path, span):
        line = decode_line(path, lineno, raw)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise file_error(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise file_error(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield Where(lineno), obj


def _iter_tsv(path: Path, span=None) -> Iterator[tuple[Where, dict]]:
    """MS MARCO style `id<TAB>text` lines -> {"id", "text"}."""
    for lineno, raw in _lines(path, span):
        line = decode_line(path, lineno, raw).rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise file_error(path, lineno, f"expected 2 tab-separated columns (id, text), "
                             f"got {len(parts)}")
        if lineno == 1 and {p.strip().lower() for p in parts} in TSV_HEADERS:
            continue
        yield Where(lineno), {"id": parts[0].strip(), "text": parts[1]}


# ---------------------------------------------------------------------------------------------
# Parquet and Arrow
# ---------------------------------------------------------------------------------------------

def _iter_table(path: Path, kind: str) -> Iterator[tuple[Where, dict]]:
    for f in input_files(path):
        row = 0
        for group, batch in _batches(f, kind):
            cols = batch.schema.names
            try:
                columns = [batch.column(i).to_pylist() for i in range(len(cols))]
            except Exception as e:  # pyarrow: a value Python cannot represent
                raise NegjaxError(f"{f}: {kind} batch {group}: unreadable values ({e})") from None
            label = "row group" if kind == "parquet" else "record batch"
            for i in range(batch.num_rows):
                row += 1
                yield (Where(row, f"row {row} ({label} {group})", f if f != path else None),
                       {c: col[i] for c, col in zip(cols, columns)})


def _batches(f: Path, kind: str):
    """(group index, pyarrow.RecordBatch) of one Parquet or Arrow IPC file, bounded in size."""
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                for batch in pf.iter_batches(batch_size=_BATCH, row_groups=[g]):
                    yield g, batch
            return
        source = pa.memory_map(str(f))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:  # the IPC file format (random access) instead of a stream
            reader = pa.ipc.open_file(source)
            for g in range(reader.num_record_batches):
                yield g, reader.get_batch(g)
            return
        for g, batch in enumerate(reader):
            yield g, batch
    except (pa.ArrowInvalid, OSError) as e:
        raise file_error(f, None, f"not a readable {kind} file ({e})") from None
