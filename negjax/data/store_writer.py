"""Writing a token store in bounded memory (`StoreWriter`), alone or in parts.

    w = StoreWriter(tmp, tokenizer, max_len=128, name="docs")
    for keys, texts in chunks: w.add(keys, texts)
    w.finish()          # DuplicateKey when two rows share a key; meta.json written last

A parallel build (`negjax.data.corpus_build`) has each process write a part (`save_part`) and
one writer append the parts in order (`add_part`) before `finish`. The store's files are
described in `negjax.data.token_store`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from negjax.data import token_store
from negjax.data.token_store import FORMAT_VERSION, Keys, load_backend_tokenizer, tokenizer_hash
from negjax.errors import NegjaxError
from negjax.utils import progress


# ids.raw starts with this many bytes of room for the .npy header (numpy writes 128 bytes for
# a 1-d array of any length: it pads for growth), so that finish makes it ids.npy in place.
_NPY_HEADER = 128


class DuplicateKey(NegjaxError):
    """Two rows of a store under construction share a key (`rows`: the first two)."""

    def __init__(self, key: str, rows: tuple[int, int]):
        super().__init__(f"duplicate key {key!r} (rows {rows[0]} and {rows[1]})")
        self.key, self.rows = key, rows


class StoreWriter:
    """Builds a store in `directory` from (keys, texts) chunks in bounded memory:

        w = StoreWriter(tmp, tokenizer, max_len=128, name="docs")
        for keys, texts in chunks: w.add(keys, texts)
        w.finish()          # DuplicateKey when two rows share a key; meta.json written last

    Memory: the arrays of per-row numbers (about 30 bytes a row), never the texts."""

    def __init__(self, directory, tokenizer, *, max_len: int, name: str = "texts", total=None,
                 thread: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        from negjax.data.tokenise import Encoder

        if max_len < 2:
            raise NegjaxError(f"max_len must be >= 2, got {max_len}")
        self.dir = Path(directory)
        self.backend, self.pad_id = load_backend_tokenizer(tokenizer)
        self.tok_hash = tokenizer_hash(self.backend)
        self.backend.enable_truncation(max_length=max_len)
        self._encode = Encoder(self.backend)  # (a word cache: negjax.data.tokenise)
        self.max_len, self.name = max_len, name
        self._ids = open(self.dir / "ids.raw", "wb")
        self._ids.write(bytes(_NPY_HEADER))  # room for ids.npy's header (written by finish)
        self._keys = open(self.dir / "keys.bin", "wb")
        self._lengths, self._key_lens, self._key_hash, self._text_hash = [], [], [], []
        self._bar = progress(total=total, desc=f"tokenise {name}", unit="text")
        # Tokenising (the tokenizer releases the GIL and uses every core) runs on a worker
        # thread while the caller reads the next records; chunks are written in order.
        # thread=False: in the caller's (a process of a parallel build, which is one core).
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="negjax-tokenise") if thread else None
        self._pending = None

    def add(self, keys: Sequence[str], texts: Sequence[str]) -> None:
        from negjax.data.readers import normalize_text

        if len(keys) != len(texts):
            raise ValueError(f"{len(keys)} keys but {len(texts)} texts")
        raw = [str(k).encode("utf-8") for k in keys]
        key_hash = token_store.hash_keys(str(k) for k in keys)
        text_hash = token_store.hash_keys(normalize_text(t) for t in texts)
        self._wait()
        self._keys.write(b"".join(raw))
        self._key_lens.append(np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)))
        self._key_hash.append(key_hash)
        self._text_hash.append(text_hash)
        if self._worker is None:
            self._tokenise(list(texts))
        else:
            self._pending = self._worker.submit(self._tokenise, list(texts))

    def _tokenise(self, texts: list) -> None:
        lengths, ids = self._encode(texts)
        self._ids.write(ids.tobytes())
        self._lengths.append(lengths)
        self._bar.update(len(lengths))

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # (re-raises the worker's error)

    def _gathered(self):
        """(name, list of per-chunk arrays, dtype) of each per-row column gathered so far."""
        return (("lengths", self._lengths, np.int32), ("key_lens", self._key_lens, np.int64),
                ("key_hash", self._key_hash, np.uint64), ("text_hash", self._text_hash, np.uint64))

    def _columns(self) -> dict:
        """Per-row arrays so far, with their dtypes (after the last chunk is written)."""
        try:
            self._wait()
        finally:
            self.abort()
        return {name: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)
                for name, parts, dt in self._gathered()}

    def save_part(self) -> None:
        """End a part that one process of a parallel build wrote (`negjax.data.corpus_build`):
        its per-row arrays go beside ids.raw and keys.bin, for `add_part`."""
        for name, arr in self._columns().items():
            np.save(self.dir / f"{name}.npy", arr)

    def add_part(self, part: Path) -> None:
        """Append the rows of a part (`save_part`) after the rows written so far."""
        self._wait()
        for name, out, skip in (("ids.raw", self._ids, _NPY_HEADER), ("keys.bin", self._keys, 0)):
            with open(Path(part) / name, "rb") as f:
                f.seek(skip)
                shutil.copyfileobj(f, out, 1 << 22)
        for name, parts, _ in self._gathered():
            parts.append(np.load(Path(part) / f"{name}.npy"))
        self._bar.update(len(self._lengths[-1]))

    def finish(self, **meta_extra) -> dict:
        col = self._columns()
        lengths = col["lengths"]
        n = len(lengths)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        key_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(col["key_lens"], out=key_offsets[1:])
        key_hash = col["key_hash"]
        order = np.argsort(key_hash, kind="stable")
        sorted_hash = key_hash[order]
        same = np.flatnonzero(sorted_hash[1:] == sorted_hash[:-1])
        if len(same):
            keys = Keys(np.fromfile(self.dir / "keys.bin", dtype=np.uint8), key_offsets)
            for j in same:  # equal hashes: a duplicate key, or (rarely) a 64-bit collision
                a, b = sorted(int(r) for r in order[j:j + 2])
                if keys[a] == keys[b]:
                    raise DuplicateKey(keys[a], (a, b))
        total = int(offsets[-1])
        # The raw ids become ids.npy in place: its header goes into the room left before them.
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (total,)})
        assert len(header.getvalue()) == _NPY_HEADER, "a .npy header of another size"
        with open(self.dir / "ids.raw", "r+b") as raw:
            raw.write(header.getvalue())
        os.replace(self.dir / "ids.raw", self.dir / "ids.npy")
        for name, arr in (("offsets", offsets), ("lengths", lengths), ("key_offsets", key_offsets),
                          ("key_hash", sorted_hash), ("key_rows", order.astype(np.int64)),
                          ("text_hash", col["text_hash"])):
            np.save(self.dir / f"{name}.npy", arr)
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "num_texts": n,
                "num_tokens": total, "max_len": self.max_len, "pad_id": self.pad_id,
                "tokenizer_sha256": self.tok_hash,
                "at_max_len": int((lengths >= self.max_len).sum()),
                "mean_length": float(lengths.mean()) if n else 0.0, **meta_extra}
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta

    def abort(self) -> None:
        """Stop (after the chunk being tokenised) and close the files; idempotent."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self._bar.close()
        self._ids.close()
        self._keys.close()
