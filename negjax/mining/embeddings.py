"""The embedding cache of the mining job: texts (read from a token store, or strings) encoded
in resumable chunks on disk, read back out of core.

    store, info = encode_chunked(enc, params, doc_tokens, tower="doc", max_length=128,
                                 batch_size=256, chunk=8192, directory=work / "emb" / key,
                                 stage="doc", dtype="float16")
    block = store[0:65536]                       # float32 rows read from the chunk files

A chunk `chunk-NNNNN.npy` holds the embeddings of `chunk` consecutive texts (float32, float16,
or bfloat16 stored as its uint16 bits) and is written atomically, so a rerun after a crash
(even `kill -9`) re-encodes only the chunks that are missing. The directory name is a key over
everything that decides the embeddings (`model_identity`, `params_fingerprint`, the input, the
max length, the dtype), so a chunk is reused only for identical inputs. `EmbeddingStore` reads
rows (spans or gathers) from the files without holding the matrix in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

from negjax.distributed import barrier, to_host
from negjax.errors import NegjaxError
from negjax.model.encode import encode_store, encode_texts, rows_per_device
from negjax.multihost import process_chunks
from negjax.utils import atomic_save_npy


def model_identity(enc) -> dict:
    """What besides the params decides the embeddings: architecture, pooling, normalisation,
    compute dtype and the tokenizer (hashed)."""
    tok = json.loads(enc.tokenizer.backend_tokenizer.to_str())
    # Truncation and padding are set per call (encode_texts changes them): not identity.
    tok = json.dumps({key: v for key, v in tok.items() if key not in ("truncation", "padding")},
                     sort_keys=True)
    config = asdict(enc.config)
    if config["model_type"] == "bert":  # keys of caches written before RoBERTa support
        del config["model_type"]
    config.pop("attention", None)  # the kernel, not the math
    if config.get("lora", 0) is None:  # (keys of caches written before LoRA stay valid)
        del config["lora"]
    ident = {"config": config, "pooling": enc.pooling, "normalize": enc.normalize,
             "dtype": enc.dtype, "tokenizer": hashlib.sha256(tok.encode()).hexdigest()}
    if any(enc.prompts.values()):  # (keys of caches written before prompts stay valid)
        ident["prompts"] = dict(enc.prompts)
    if enc.truncate_dim:
        ident["truncate_dim"] = enc.truncate_dim
    return ident


def params_fingerprint(enc, params, tower: str) -> str:
    """blake2b over the names, shapes, dtypes and bytes of one tower's params (host copies)."""
    h = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_leaves_with_path(enc.tower_params(params, tower))
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.ascontiguousarray(to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")


def _file_dtype(dtype: str) -> np.dtype:
    """The dtype of a chunk file: bfloat16 is saved as its raw uint16 bits (plain .npy)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return arr.view(ml_dtypes.bfloat16).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def chunk_ok(path: Path, rows: int, dim: int, dtype: str = "float32") -> bool:
    """True if `path` is a complete [rows, dim] chunk of `dtype`."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == _file_dtype(dtype)


def save_chunk(path: Path, emb: np.ndarray, dtype: str = "float32") -> None:
    """Write one chunk atomically (a crash leaves no file under the final name)."""
    if dtype == "bfloat16":
        import ml_dtypes

        data = np.asarray(emb, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
        data = np.asarray(emb).astype(dtype, copy=False)
    atomic_save_npy(path, data)


class EmbeddingStore:
    """Rows [lo, hi) of an embedding matrix saved as chunk files `chunk-NNNNN.npy` of `chunk`
    rows each, read from disk on demand (out of core): nothing holds the whole matrix.

        store = EmbeddingStore(directory, n, dim, chunk)           # every row
        shard = store.rows_between(lo, hi)                           # a view of rows lo..hi
        block = shard[0:4096]                                        # float32 [4096, D]
        picked = shard[np.array([[3, 7], [0, -1]])]                  # float32 [2, 2, D]

    Indices are relative to the view's first row (negative indices are not supported: callers
    pass row numbers; -1 entries of a gather read row 0 and are masked by the caller). A file is
    memory-mapped only while a read copies out of it, so pages read do not stay in the
    process's resident set. Reads are float32 whatever the stored dtype."""

    def __init__(self, directory: Path, n: int, dim: int, chunk: int, dtype: str = "float32",
                 lo: int = 0, hi: int | None = None):
        self.directory, self.n, self.dim, self.chunk = Path(directory), int(n), int(dim), int(chunk)
        self.dtype = dtype
        self.lo, self.hi = int(lo), int(n if hi is None else hi)

    def rows_between(self, lo: int, hi: int) -> "EmbeddingStore":
        return EmbeddingStore(self.directory, self.n, self.dim, self.chunk, self.dtype,
                              self.lo + lo, self.lo + hi)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.dim)

    def __len__(self) -> int:
        return self.hi - self.lo

    def path(self, c: int) -> Path:
        return self.directory / f"chunk-{c:05d}.npy"

    def _map(self, c: int) -> np.ndarray:
        return np.load(self.path(c), mmap_mode="r")

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("EmbeddingStore slices must have step 1")
            return self._span(self.lo + start, self.lo + max(start, stop))
        idx = np.asarray(key, np.int64)
        flat = idx.reshape(-1) + self.lo
        out = np.empty((flat.size, self.dim), np.float32)
        chunks = flat // self.chunk
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            arr = self._map(int(c))
            out[sel] = _to_float32(np.asarray(arr[flat[sel] - c * self.chunk]), self.dtype)
            del arr
        return out.reshape(*idx.shape, self.dim)

    def _span(self, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, self.dim), np.float32)
        r = a
        while r < b:
            c = r // self.chunk
            end = min(b, (c + 1) * self.chunk)
            arr = self._map(c)
            out[r - a:end - a] = _to_float32(np.asarray(arr[r - c * self.chunk:end - c * self.chunk]),
                                             self.dtype)
            del arr
            r = end
        return out

    def blocks(self, rows: int = 65536):
        """(start, float32 block) over the view, `rows` rows at a time (relative starts)."""
        for a in range(0, len(self), rows):
            yield a, self[a:min(len(self), a + rows)]

    def max_norm(self) -> float:
        """The largest row L2 norm in the view (streamed)."""
        best = 0.0
        for _, block in self.blocks():
            if len(block):
                best = max(best, float(np.linalg.norm(block, axis=1).max()))
        return best

    def bytes_on_disk(self) -> int:
        c0, c1 = self.lo // self.chunk, -(-self.hi // self.chunk)
        return sum(self.path(c).stat().st_size for c in range(c0, c1) if self.path(c).is_file())


def encode_chunked(enc, params, texts, *, tower: str, max_length: int, batch_size: int,
                   chunk: int, directory: Path, stage: str, dtype: str = "float32",
                   chunks: list[tuple[int, int, int]] | None = None,
                   source: Path | None = None) -> tuple[EmbeddingStore, dict]:
    """Embeddings of `texts` (strings, or a `TokenStore` of them tokenised with the encoder's
    tokenizer, prompt and `max_length`), computed chunk by chunk into `directory` (reusing chunks already
    there) and returned as an `EmbeddingStore` over all rows (read from disk on demand).
    Collective: this process encodes `chunks` [(c, lo, hi)] (default: c % P == p), then a
    barrier, then every chunk is checked. `batch_size` counts the texts of a batch over all
    devices of all processes (a fixed per-device batch, so the embeddings do not depend on the
    number of processes). `source`: a directory of float32 chunks of the same texts and model
    (another dtype's cache): a chunk found there is converted instead of encoded.
    Returns (store, {"chunks", "encoded", "reused", "converted"} of this process)."""
    n, dim = len(texts), enc.dim
    n_chunks = max(1, math.ceil(n / chunk))
    directory.mkdir(parents=True, exist_ok=True)
    info = {"chunks": n_chunks, "encoded": 0, "reused": 0, "converted": 0}
    store = EmbeddingStore(directory, n, dim, chunk, dtype)
    for c, lo, hi in (process_chunks(n, chunk) if chunks is None else chunks):
        path = store.path(c)
        if chunk_ok(path, hi - lo, dim, dtype):
            info["reused"] += 1
            continue
        if source is not None and chunk_ok(source / path.name, hi - lo, dim):
            save_chunk(path, np.load(source / path.name), dtype)
            info["converted"] += 1
            continue
        common = dict(tower=tower, batch_size=batch_size, desc=f"encode {stage} {c + 1}/{n_chunks}",
                      per_device=rows_per_device(batch_size))
        if hasattr(texts, "pad"):  # a token store: only these rows' tokens are read
            emb = encode_store(enc, params, texts, lo, hi, **common)
        else:
            emb = encode_texts(enc, params, texts[lo:hi], max_length=max_length, **common)
        save_chunk(path, emb, dtype)
        info["encoded"] += 1
    barrier(f"mine-encode-{stage}")
    for c, lo, hi in process_chunks(n, chunk, 0, 1):  # every chunk
        path = store.path(c)
        if not chunk_ok(path, hi - lo, dim, dtype):
            raise NegjaxError(f"{path}: embedding chunk missing or damaged after encoding "
                              "(did the process that encodes it fail?)")
    return store, info
