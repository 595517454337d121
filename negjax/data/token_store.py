"""Token store: texts tokenised once, kept as memory-mapped arrays, reused across runs.

    store = build_token_store(corpus.texts, corpus.ids, tokenizer, max_len=128, cache_dir=cache)
    tokens, mask = store.pad(rows, 64)          # [n, 64] int32 each
    store.row("doc-7"), store.rows_of(ids)      # key -> row through the on-disk index
    store.keys[5], store.text_hash[rows]        # row -> key; hashes of the normalised texts

A store directory holds (every array memory-mapped when opened; nothing is read whole)
    ids.npy          [T] int32    every text's token ids back to back (special tokens
                                  included, truncated to max_len)
    offsets.npy      [N+1] int64  text i is ids[offsets[i]:offsets[i+1]]
    lengths.npy      [N] int32    tokens per text (<= max_len)
    keys.bin         UTF-8 keys (document / query ids) back to back;
    key_offsets.npy  [N+1] int64  key i is keys.bin[key_offsets[i]:key_offsets[i+1]]
    key_hash.npy     [N] uint64   the keys' 64-bit hashes (`hash_keys`), sorted
    key_rows.npy     [N] int64    the row of each sorted hash: key -> row is a binary search
                                  (a hash match is confirmed against keys.bin)
    text_hash.npy    [N] uint64   hash of each normalised text (`formats.normalize_text`):
                                  text-level dedup without the texts
    meta.json        written last: tokenizer hash, max_len, pad id, counts

`build_token_store` names a store by a hash of (keys, texts, tokenizer.json, max_len, format
version): a changed input, tokenizer or max_len lands in a new directory and a store is never
stale. `negjax.data.prepared` streams files into `StoreWriter` instead and names the store by
the input files' fingerprints, so a warm start reads no text. A store is built in a temporary
directory and renamed into place, so a crash never leaves a half store under the final name,
and concurrent builders all end up reading the one that won the rename. A multi-process
training job builds each store once per host (`negjax.data.prepared.shared_token_stores`: one
leader process per host and cache directory tokenises, the others open its store after a
barrier).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from negjax.errors import NegjaxError
from negjax.utils import default_cache_dir

FORMAT_VERSION = 2
_CHUNK = 8192  # texts per JSON document of content_hash


# ---------------------------------------------------------------------------------------------
# Tokenizer handling
# ---------------------------------------------------------------------------------------------

def load_backend_tokenizer(tokenizer):
    """(tokenizers.Tokenizer, pad id) from a transformers fast tokenizer, a `tokenizers.Tokenizer`,
    a tokenizer.json path or a directory containing one."""
    from tokenizers import Tokenizer

    pad_id = None
    if hasattr(tokenizer, "backend_tokenizer"):  # transformers PreTrainedTokenizerFast
        backend = tokenizer.backend_tokenizer
        pad_id = tokenizer.pad_token_id
    elif isinstance(tokenizer, Tokenizer):
        backend = tokenizer
    else:
        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise NegjaxError(f"{path}: no tokenizer.json (a fast tokenizer is required)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise NegjaxError(f"{file}: cannot load tokenizer: {e}") from None
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            pad = json.loads(config.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                pad_id = backend.token_to_id(pad)
    # Our own copy: truncation/padding settings must not leak into (or from) the caller's.
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    if pad_id is None:
        for tok in ("[PAD]", "<pad>"):
            if backend.token_to_id(tok) is not None:
                pad_id = backend.token_to_id(tok)
                break
    return backend, int(pad_id or 0)


def tokenizer_hash(backend) -> str:
    """sha256 of the serialised tokenizer (tokenizer.json with padding/truncation cleared)."""
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def content_hash(keys: Sequence[str], texts: Sequence[str], tok_hash: str, max_len: int,
                 pad_id: int) -> str:
    """The store key: blake2b over every (key, text) pair, the tokenizer hash, max_len."""
    if len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys but {len(texts)} texts")
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": FORMAT_VERSION, "tok": tok_hash, "max_len": max_len,
                         "pad": pad_id, "n": len(keys)}).encode())
    for i in range(0, len(keys), _CHUNK):
        # JSON encoding is unambiguous about where one string ends and the next begins.
        h.update(json.dumps(list(keys[i:i + _CHUNK]), ensure_ascii=False).encode("utf-8"))
        h.update(json.dumps(list(texts[i:i + _CHUNK]), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Keys: hashes, the row -> key sequence, the key -> row index
# ---------------------------------------------------------------------------------------------

def hash_keys(keys: Iterable[str]) -> np.ndarray:
    """uint64 hashes (blake2b, 8 bytes, little-endian) of strings: stable across runs, hosts
    and Python versions."""
    digest = hashlib.blake2b
    raw = b"".join(digest(k.encode("utf-8"), digest_size=8).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


class Keys(Sequence):
    """Row -> key of a store, read from keys.bin on demand (a list's interface: len, [i],
    [a:b], iteration, == list). `arrow()`: all keys as one zero-copy pyarrow array."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self._blob, self._off = blob, offsets

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._blob[self._off[i]:self._off[i + 1]]).decode("utf-8")

    def __iter__(self):
        n, step = len(self), 65536
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            chunk = bytes(self._blob[self._off[lo]:self._off[hi]])
            base, offs = int(self._off[lo]), self._off[lo:hi + 1].tolist()
            for a, b in zip(offs[:-1], offs[1:]):
                yield chunk[a - base:b - base].decode("utf-8")

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, Keys)) and len(other) == len(self) and \
            all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Keys({len(self)})"

    def arrow(self):
        """Every key as a pyarrow large_string array over the memory-mapped bytes."""
        import pyarrow as pa

        return pa.LargeStringArray.from_buffers(
            len(self), pa.py_buffer(np.ascontiguousarray(self._off, dtype=np.int64)),
            pa.py_buffer(self._blob))


class KeyIndex:
    """Key -> row of a store through its sorted hashes (a read-only mapping's interface:
    `get`, `[]`, `in`, `len`)."""

    def __init__(self, store: "TokenStore"):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key, default=None):
        raw, h = str(key).encode("utf-8"), hash_keys((str(key),))[0]
        s = self._store
        i, n = int(s._key_hash.searchsorted(h)), len(s._key_hash)
        while i < n and s._key_hash[i] == h:  # (more than once only for a hash collision)
            row = int(s._key_rows[i])
            if s._blob_flat[s._key_off[row]:s._key_off[row + 1]].tobytes() == raw:
                return row
            i += 1
        return default

    def __getitem__(self, key) -> int:
        row = self.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def __contains__(self, key) -> bool:
        return self.get(key) is not None


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

_ARRAYS = ("ids", "offsets", "lengths", "key_offsets", "key_hash", "key_rows", "text_hash")


class _Pread:
    """A memory-mapped .npy file's descriptor and data offset, for `os.pread`: the kernel maps
    a whole page-cache folio (up to megabytes) into the process for each row read through a
    map, so training batches' random rows of a large store, read through its maps, would
    fill the process's resident set with the store (~0.3 GB after 2 batches at 10M
    documents, growing to the whole store over a long run). `TokenStore.pad` reads a row's
    offsets and tokens this way: ~9 us a row against ~6 through the maps (8,192 random rows
    of the 10M store, page cache warm), on the pipeline's prefetch threads."""

    def __init__(self, arr: np.memmap):
        self.fd = os.open(arr.filename, os.O_RDONLY)
        self.base = int(arr.offset)

    def __del__(self):
        os.close(self.fd)


def drop_pages(arrays) -> None:
    """Unmap from this process the pages it has read of memory-mapped arrays (`np.memmap`s;
    others are skipped): MADV_DONTNEED on a read-only shared file mapping leaves the data in
    the page cache, and the next read maps it again (a minor fault). The training pipeline
    calls it after every batch for the arrays it reads at random rows (text hashes, lengths,
    positive and negative lists): read through the maps, each random row keeps a page-cache
    folio (up to megabytes) in the process's resident set, which would grow with the corpus
    (+0.14 GiB after 2 batches of 16 queries at 10M documents; the whole arrays over a long
    run) - see `_Pread` for the token ids."""
    for a in arrays:
        m = getattr(a, "_mmap", None)
        if m is not None and not m.closed:
            m.madvise(mmap.MADV_DONTNEED)


class RowReader:
    """Random rows of a memory-mapped 1-d .npy array read with `os.pread` (see `_Pread`):
    `reader[i]` and `reader[rows]` (any shape of non-negative ints) as numpy indexing gives
    them. For the arrays the training pipeline reads a few hundred random rows of per batch
    (a store's text hashes and lengths); reading them through the maps kept ~90 MB of the
    10M-document store resident after 2 batches of 16 queries."""

    def __init__(self, arr: np.memmap):
        self._file = _Pread(arr)
        self.dtype, self.shape = arr.dtype, arr.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows out of range 0..{self.shape[0] - 1}")
        uniq, inverse = np.unique(rows.ravel(), return_inverse=True)
        size, fd, base, read = self.dtype.itemsize, self._file.fd, self._file.base, os.pread
        data = b"".join([read(fd, size, base + size * r) for r in uniq.tolist()])
        return np.frombuffer(data, dtype=self.dtype)[inverse].reshape(rows.shape)


class TokenStore:
    """A read-only, memory-mapped token store (open with `TokenStore.open(dir)`)."""

    def __init__(self, directory: Path, meta: dict, arrays: dict):
        self.dir = directory
        self.meta = meta
        self.maps = [a for a in arrays.values() if isinstance(a, np.memmap)]  # see drop_pages
        self.ids = arrays["ids"]              # [T] int32
        self._flat = np.asarray(self.ids)     # plain-ndarray view: gathers skip np.memmap's overhead
        self.offsets = np.asarray(arrays["offsets"])  # [N+1] int64
        self.lengths = np.asarray(arrays["lengths"])  # [N] int32
        self.text_hash = np.asarray(arrays["text_hash"])  # [N] uint64
        self._key_hash = np.asarray(arrays["key_hash"])
        self._key_rows = np.asarray(arrays["key_rows"])
        self._key_off = np.asarray(arrays["key_offsets"])
        self._blob = arrays["keys"]
        self._blob_flat = np.asarray(self._blob)
        self.max_len = int(meta["max_len"])
        self.pad_id = int(meta["pad_id"])
        self.keys = Keys(self._blob, self._key_off)
        self.index = KeyIndex(self)
        mapped = all(isinstance(arrays[a], np.memmap) for a in ("ids", "offsets"))
        self._ids, self._off = ((_Pread(arrays["ids"]), _Pread(arrays["offsets"])) if mapped
                                else (None, None))
        # Random rows of the hashes and lengths (the pipeline's reads; `RowReader`).
        self.hash_rows, self.length_rows = (
            (RowReader(arrays["text_hash"]), RowReader(arrays["lengths"])) if mapped
            else (self.text_hash, self.lengths))

    @classmethod
    def open(cls, directory) -> "TokenStore":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise NegjaxError(f"{directory}: not a token store (no meta.json; incomplete build?)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NegjaxError(f"{meta_path}: unreadable ({e}); delete the store to rebuild") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise NegjaxError(f"{directory}: token store format {meta.get('format_version')}, "
                              f"expected {FORMAT_VERSION}; delete it to rebuild")
        try:
            arrays = {a: np.load(directory / f"{a}.npy", mmap_mode="r") for a in _ARRAYS}
            size = (directory / "keys.bin").stat().st_size
            arrays["keys"] = (np.memmap(directory / "keys.bin", dtype=np.uint8, mode="r")
                              if size else np.zeros(0, np.uint8))
        except (OSError, ValueError) as e:
            raise NegjaxError(f"{directory}: unreadable token store ({e}); delete it to rebuild") from None
        n, t = meta["num_texts"], meta["num_tokens"]
        shapes = {"ids": (t,), "offsets": (n + 1,), "lengths": (n,), "key_offsets": (n + 1,),
                  "key_hash": (n,), "key_rows": (n,), "text_hash": (n,)}
        if any(arrays[a].shape != shape for a, shape in shapes.items()) \
                or int(arrays["offsets"][-1]) != t or int(arrays["key_offsets"][-1]) != size:
            raise NegjaxError(f"{directory}: token store arrays do not match meta.json; delete it")
        return cls(directory, meta, arrays)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, key: str) -> int:
        """The row of `key`; KeyError when the store has none."""
        return self.index[key]

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """[len(keys)] int64 rows of the keys, -1 where the store has none."""
        keys = [str(k) for k in keys]
        h = hash_keys(keys)
        hs = self._key_hash
        lo = np.searchsorted(hs, h, side="left")
        hi = np.searchsorted(hs, h, side="right")
        rows = np.full(len(keys), -1, dtype=np.int64)
        for width in range(1, int((hi - lo).max()) + 1 if len(keys) else 1):
            # (width > 1 only for a 64-bit hash collision between two stored keys)
            pending = np.flatnonzero((rows < 0) & (hi - lo >= width))
            cand = self._key_rows[lo[pending] + width - 1].astype(np.int64)
            same = self._keys_equal(cand, [keys[i] for i in pending])
            rows[pending[same]] = cand[same]
        return rows

    def _keys_equal(self, rows: np.ndarray, keys: list[str]) -> np.ndarray:
        """[n] bool: stored key of rows[i] == keys[i] (compared byte by byte, vectorised)."""
        enc = [k.encode("utf-8") for k in keys]
        ql = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
        off = self._key_off
        equal = (off[rows + 1] - off[rows]) == ql
        lens = np.where(equal, ql, 0)
        if lens.sum():
            query = np.frombuffer(b"".join(enc), dtype=np.uint8)
            starts = np.cumsum(lens) - lens
            pos = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
            a = query[np.repeat(np.cumsum(ql) - ql, lens) + pos]
            b = self._blob_flat[np.repeat(off[rows], lens) + pos]
            equal[np.unique(np.repeat(np.arange(len(rows)), lens)[a != b])] = False
        return equal

    def tokens(self, row: int) -> np.ndarray:
        """Token ids of one text: [len] int32."""
        return self._flat[self.offsets[row]:self.offsets[row + 1]].copy()

    def pad(self, rows, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows padded (or truncated) to `length`: (tokens [n, length] int32, mask [n, length]
        int32, 1 = real token)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if self._ids is not None:  # with pread (see `_Pread`): a row's offsets, then its tokens
            tokens = np.full((n, length), self.pad_id, dtype=np.int32)
            lens = np.zeros(n, np.int64)
            ids, off, read = self._ids, self._off, os.pread
            for i, r in enumerate(rows.tolist()):
                start, end = np.frombuffer(read(off.fd, 16, off.base + 8 * r), np.int64).tolist()
                k = lens[i] = min(end - start, length)
                tokens[i, :k] = np.frombuffer(read(ids.fd, 4 * k, ids.base + 4 * start), np.int32)
            return tokens, (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
        lens = np.minimum(self.lengths[rows], length).astype(np.int64)
        # Gather only the real tokens (padding is most of a bucket), then scatter into place.
        starts = np.cumsum(lens) - lens
        pos = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
        tokens = np.full((n, length), self.pad_id, dtype=np.int32)
        tokens[np.repeat(np.arange(n), lens), pos] = self._flat[np.repeat(self.offsets[rows], lens) + pos]
        mask = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
        return tokens, mask


def build_into(final: Path, write) -> TokenStore | None:
    """Build a store (or any directory written last-file-last) at `final` atomically:
    `write(tmp)` fills a fresh temporary directory beside it, which is then renamed into place;
    reuse `final` when it is complete (has meta.json). Another process winning the race with
    an identical build is fine: its directory is used. Returns nothing; open `final` after."""
    if (final / "meta.json").is_file():
        return None
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    from negjax.cache import builder_tag  # (the name tells `negjax cache` who builds it)

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{builder_tag()}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        write(tmp)
        if final.exists() and not (final / "meta.json").is_file():
            shutil.rmtree(final, ignore_errors=True)  # damaged: only complete ones are renamed
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won with an identical one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return None


def build_token_store(texts: Sequence[str], keys: Sequence[str], tokenizer, *, max_len: int,
                      cache_dir=None, name: str = "texts") -> TokenStore:
    """Tokenise `texts` (row i has key keys[i]) once and return the memory-mapped store.

    Reuses `<cache>/tokens/<name>-<hash>` when it exists. tokenizer: transformers fast
    tokenizer, `tokenizers.Tokenizer`, tokenizer.json or its directory. name: shown on the
    progress bar. Keys must be distinct (`DuplicateKey`).
    """
    if max_len < 2:
        raise NegjaxError(f"max_len must be >= 2, got {max_len}")
    backend, pad_id = load_backend_tokenizer(tokenizer)
    key = content_hash(keys, texts, tokenizer_hash(backend), max_len, pad_id)
    final = default_cache_dir(cache_dir) / "tokens" / f"{name}-{key}"
    return open_or_build(final, lambda tmp: _write_all(tmp, texts, keys, tokenizer, max_len, name))


def open_or_build(final: Path, write, open_dir=None):
    """`open_dir(final)` (default `TokenStore.open`) of the directory built by `write(tmp)`
    (`build_into`) unless complete; one damaged after it was built (disk, a person) is
    rebuilt once."""
    open_dir = open_dir or TokenStore.open
    build_into(final, write)
    try:
        return open_dir(final)
    except NegjaxError:
        shutil.rmtree(final, ignore_errors=True)
        build_into(final, write)
        return open_dir(final)


def _write_all(tmp: Path, texts, keys, tokenizer, max_len, name) -> None:
    from negjax.data.store_writer import StoreWriter

    w = StoreWriter(tmp, tokenizer, max_len=max_len, name=name, total=len(texts))
    try:
        w.add(keys, texts)
    except BaseException:
        w.abort()
        raise
    w.finish()
