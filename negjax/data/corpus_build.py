"""Corpus and training files streamed into token stores, on every core of the host when large.

    feed(writer, path, prompt)            # every document of `path` -> a StoreWriter, in order
    spans = plan(path)                    # byte ranges, one a process ([]: one process)
    build_parts(writer, spans, {"kind": "docs", "path": ..., "prompt": ...})

Reading, checking, hashing and tokenising a record are Python work, bound to one core by the
interpreter's lock. A plain (uncompressed) JSONL or TSV file of at least `PARALLEL_BYTES`, on a
host with several cores, is therefore cut at line boundaries into one byte range per core; a
fresh interpreter per range (`python -m negjax.data.corpus_build`, importing no JAX) reads its
lines into a part, and the parts are appended in file order: a corpus into a `StoreWriter`
(kind "docs"), training records (pairs or tevatron-ids, their ids resolved through the
finished corpus store) into a `prepared.ExampleWriter` (kind "train"). The result is what a
single process writes, byte for byte (tests/test_prepared.py), and a bad record is named by
its file and line as there (the first in the file when several parts fail; a duplicate id
across parts when the parts are joined). Parquet, Arrow and gzip'd inputs, and the other
training formats, are read by one process. NEGJAX_BUILD_PROCESSES=N sets the number of
processes (1: never more than one; any N also applies to small files, which tests use).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from negjax.data import readers
from negjax.data.records import input_kind, iter_records
from negjax.errors import NegjaxError

PARALLEL_BYTES = 16 << 20  # smaller files are read by one process (starting others costs ~1 s)
RECORDS = 16384  # records per StoreWriter.add


def feed(writer, path: Path, prompt: str, span=None, check=None) -> None:
    """The documents of `path` (or of its byte range `span`, see `records.iter_records`) into
    `writer`, with the checks of `formats.read_corpus`; `check()` runs between chunks."""
    keys, texts = [], []
    for line, obj in iter_records(path, span):
        keys.append(readers._id(obj, readers.DOC_ID_KEYS, path, line, "document id"))
        title = readers._text(obj, "title", path, line, required=False)
        texts.append(prompt + readers._join(title, readers._text(obj, "text", path, line,
                                                                what="document text")))
        if len(keys) == RECORDS:
            writer.add(keys, texts)
            keys, texts = [], []
            if check is not None:
                check()
    writer.add(keys, texts)


def processes() -> int:
    """Processes a large build uses: NEGJAX_BUILD_PROCESSES, else the host's cores (<= 16)."""
    forced = os.environ.get("NEGJAX_BUILD_PROCESSES", "").strip()
    if forced:
        return max(1, int(forced))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, 16)


def plan(path) -> list:
    """[(start byte, end byte, number of the line at start)] covering `path`, one per process,
    cut at line starts; [] when one process reads it (see the module docstring)."""
    path = Path(path)
    n = processes()
    if n < 2 or not path.is_file() or path.suffix == ".gz" or input_kind(path) not in ("jsonl", "tsv"):
        return []
    size = path.stat().st_size
    if size < PARALLEL_BYTES and not os.environ.get("NEGJAX_BUILD_PROCESSES", "").strip():
        return []
    cuts = [0]
    with open(path, "rb") as fh:
        for i in range(1, n):
            fh.seek(max(size * i // n - 1, cuts[-1]))
            fh.readline()  # to the start of the next line
            if cuts[-1] < fh.tell() < size:
                cuts.append(fh.tell())
    cuts.append(size)
    firsts, line, done = [], 1, 0
    with open(path, "rb") as fh:
        for cut in cuts[:-1]:
            while done < cut:
                block = fh.read(min(1 << 24, cut - done))
                line, done = line + block.count(b"\n"), done + len(block)
            firsts.append(line)
    return [list(x) for x in zip(cuts[:-1], cuts[1:], firsts)]


def build_parts(writer, spans: list, spec: dict) -> None:
    """`writer` (a `StoreWriter`, or a `prepared.ExampleWriter` for training records) filled
    from one process per span, each running `_part` on `spec` (kind "docs" or "train", path,
    ...) and its span (see the module docstring); the error of the first failing span in the
    file is raised."""
    tmp = writer.dir
    tok_file = tmp / ".parts-tokenizer.json"
    tok_file.write_text(writer.backend.to_str())
    parts = [tmp / f".part-{i}" for i in range(len(spans))]
    # (this negjax, wherever the caller imported it from)
    pythonpath = os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                 + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = []
    try:
        for i, (part, span) in enumerate(zip(parts, spans)):
            part.mkdir()
            (part / "spec.json").write_text(json.dumps({
                **spec, "span": span, "tokenizer": str(tok_file), "max_len": writer.max_len,
                "parent": os.getpid(), "name": f"{spec['kind']} (part {i + 1} of {len(spans)})"}))
            # One thread a process (the processes are the cores); one progress bar.
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath,
                   **({"NEGJAX_PROGRESS": "0"} if i else {})}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "negjax.data.corpus_build", str(part / "spec.json")], env=env))
        failed = None
        while any(p.returncode is None for p in procs[:failed]):
            time.sleep(0.05)
            for i, p in enumerate(procs[:failed]):
                if p.poll() and (failed is None or i < failed):
                    failed = i  # later parts no longer matter: the error is at or before here
        if failed is not None:
            error = parts[failed] / "error.txt"
            raise NegjaxError(error.read_text() if error.is_file() else
                              f"{spec['path']}: reading lines from {spans[failed][2]} failed "
                              f"(exit code {procs[failed].returncode}; its output is above)")
        for part in parts:
            writer.add_part(part)
            shutil.rmtree(part)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        tok_file.unlink(missing_ok=True)


def _part(spec_file: str) -> int:
    """A worker: the records of one span into a part (`python -m negjax.data.corpus_build`)."""
    spec = json.loads(Path(spec_file).read_text())
    part, path, span = Path(spec_file).parent, Path(spec["path"]), tuple(spec["span"])

    def check() -> None:  # the parent is gone (killed): stop
        if os.getppid() != spec["parent"]:
            raise SystemExit(1)

    try:
        if spec["kind"] == "docs":
            from negjax.data.store_writer import StoreWriter

            w = StoreWriter(part, spec["tokenizer"], max_len=spec["max_len"], name=spec["name"],
                            thread=False)
            read = lambda: feed(w, path, spec["prompt"], span, check)  # noqa: E731
        else:  # training records whose ids resolve through the finished corpus store
            from negjax.data import formats
            from negjax.data.prepared import ExampleWriter, StoreCorpus
            from negjax.data.token_store import TokenStore

            corpus = StoreCorpus(TokenStore.open(spec["docs"]), spec["corpus"])
            w = ExampleWriter(part, spec["tokenizer"], max_len=spec["max_len"], path=path,
                              prompt=spec["prompt"], fmt=spec["fmt"], thread=False)
            read = lambda: formats.read_training(  # noqa: E731
                path, corpus, fmt=spec["fmt"], sink=lambda *_: w, span=span)
        try:
            read()
        except BaseException:
            w.abort()
            raise
        w.save_part()
    except NegjaxError as e:
        (part / "error.txt").write_text(str(e))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_part(sys.argv[1]))
