"""Token store: texts tokenised once, kept as memory-mapped arrays, reused across runs.

    store = build_token_store(corpus.texts, corpus.ids, tokenizer, max_len=128, cache_dir=cache)
    tokens, mask = store.pad(rows, 64)          # [n, 64] int32 each

A store directory holds
    ids.npy      [T] int32   every text's token ids back to back (special tokens included,
                             truncated to max_len)
    offsets.npy  [N+1] int64 text i is ids[offsets[i]:offsets[i+1]]
    lengths.npy  [N] int32   tokens per text (<= max_len)
    keys.json    [N] str     row -> key (document / query id)
    meta.json    written last: tokenizer hash, max_len, pad id, counts

Its name is a hash of (keys, texts, tokenizer.json, max_len, format version): the hash covers
exactly what was tokenised, so a changed input file, a different tokenizer or max_len lands in
a new directory and a store is never stale. It is built in a temporary directory and renamed
into place, so a crash never leaves a half store under the final name, and concurrent
builders all end up reading the one that won the rename. A multi-process training job builds
each store once per host (`negjax.data.pipeline.shared_token_stores`: one leader process per
host and cache directory tokenises, the others open its store after a barrier).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from negjax.errors import NegjaxError
from negjax.utils import default_cache_dir, progress

FORMAT_VERSION = 1
_CHUNK = 8192  # texts per encode_batch call


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
# The store
# ---------------------------------------------------------------------------------------------

class TokenStore:
    """A read-only, memory-mapped token store (open with `TokenStore.open(dir)`)."""

    def __init__(self, directory: Path, meta: dict, ids, offsets, lengths):
        self.dir = directory
        self.meta = meta
        self.ids = ids            # [T] int32 (memory-mapped)
        self._flat = np.asarray(ids)  # plain-ndarray view: gathers skip np.memmap's overhead
        self.offsets = offsets    # [N+1] int64
        self.lengths = lengths    # [N] int32
        self.max_len = int(meta["max_len"])
        self.pad_id = int(meta["pad_id"])
        self._keys = None
        self._index = None

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
            ids = np.load(directory / "ids.npy", mmap_mode="r")
            offsets = np.load(directory / "offsets.npy")
            lengths = np.load(directory / "lengths.npy")
        except (OSError, ValueError) as e:
            raise NegjaxError(f"{directory}: unreadable token store ({e}); delete it to rebuild") from None
        n, t = meta["num_texts"], meta["num_tokens"]
        if ids.shape != (t,) or offsets.shape != (n + 1,) or lengths.shape != (n,) \
                or int(offsets[-1]) != t:
            raise NegjaxError(f"{directory}: token store arrays do not match meta.json; delete it")
        return cls(directory, meta, ids, offsets, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = json.loads((self.dir / "keys.json").read_text())
        return self._keys

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def row(self, key: str) -> int:
        return self.index[key]

    def tokens(self, row: int) -> np.ndarray:
        """Token ids of one text: [len] int32."""
        return self._flat[self.offsets[row]:self.offsets[row + 1]].copy()

    def pad(self, rows, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows padded (or truncated) to `length`: (tokens [n, length] int32, mask [n, length]
        int32, 1 = real token)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        lens = np.minimum(self.lengths[rows], length).astype(np.int64)
        # Gather only the real tokens (padding is most of a bucket), then scatter into place.
        starts = np.cumsum(lens) - lens
        pos = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
        tokens = np.full((n, length), self.pad_id, dtype=np.int32)
        tokens[np.repeat(np.arange(n), lens), pos] = self._flat[np.repeat(self.offsets[rows], lens) + pos]
        mask = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
        return tokens, mask


def build_token_store(texts: Sequence[str], keys: Sequence[str], tokenizer, *, max_len: int,
                      cache_dir=None, name: str = "texts") -> TokenStore:
    """Tokenise `texts` (row i has key keys[i]) once and return the memory-mapped store.

    Reuses `<cache>/tokens/<hash>` when it exists. tokenizer: transformers fast tokenizer,
    `tokenizers.Tokenizer`, tokenizer.json or its directory. name: shown on the progress bar.
    """
    if max_len < 2:
        raise NegjaxError(f"max_len must be >= 2, got {max_len}")
    backend, pad_id = load_backend_tokenizer(tokenizer)
    tok_hash = tokenizer_hash(backend)
    key = content_hash(keys, texts, tok_hash, max_len, pad_id)
    root = default_cache_dir(cache_dir) / "tokens"
    final = root / f"{name}-{key}"
    if (final / "meta.json").is_file():
        try:
            return TokenStore.open(final)
        except NegjaxError:
            # Only a complete store is ever renamed into place, so this one was damaged
            # afterwards (disk, a person): rebuild it.
            shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        _write(tmp, texts, keys, backend, max_len, pad_id, tok_hash, name)
        if final.exists() and not (final / "meta.json").is_file():
            shutil.rmtree(final, ignore_errors=True)  # damaged (see above)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race with an identical store: use theirs.
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.open(final)


def _write(tmp: Path, texts, keys, backend, max_len, pad_id, tok_hash, name) -> None:
    backend.enable_truncation(max_length=max_len)
    n = len(texts)
    lengths = np.zeros(n, dtype=np.int32)
    raw_path = tmp / "ids.raw"
    with open(raw_path, "wb") as raw, progress(total=n, desc=f"tokenise {name}", unit="text") as bar:
        for start in range(0, n, _CHUNK):
            chunk = list(texts[start:start + _CHUNK])
            enc = backend.encode_batch(chunk, add_special_tokens=True)
            ids = [e.ids for e in enc]
            lengths[start:start + len(chunk)] = [len(x) for x in ids]
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int32,
                               count=int(lengths[start:start + len(chunk)].sum()))
            raw.write(flat.tobytes())
            bar.update(len(chunk))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    # Stream the raw ids behind a .npy header (memory stays bounded for any corpus size).
    with open(tmp / "ids.npy", "wb") as out, open(raw_path, "rb") as raw:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (total,)})
        shutil.copyfileobj(raw, out, 1 << 22)
    raw_path.unlink()
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "lengths.npy", lengths)
    (tmp / "keys.json").write_text(json.dumps(list(keys), ensure_ascii=False))
    meta = {"format_version": FORMAT_VERSION, "name": name, "num_texts": n, "num_tokens": total,
            "max_len": max_len, "pad_id": pad_id, "tokenizer_sha256": tok_hash,
            "at_max_len": int((lengths >= max_len).sum()),
            "mean_length": float(lengths.mean()) if n else 0.0}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
