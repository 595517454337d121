"""The embedding cache of the mining job: texts encoded in resumable chunks on disk.

    emb, info = encode_chunked(enc, params, texts, tower="doc", max_length=128,
                               batch_size=256, chunk=8192, directory=work / "emb" / key,
                               stage="doc")

A chunk `chunk-NNNNN.npy` holds the float32 embeddings of `chunk` consecutive texts and is
written atomically, so a rerun after a crash (even `kill -9`) re-encodes only the chunks
that are missing. The directory name is a key over everything that decides the embeddings
(`model_identity`, `params_fingerprint`, the input, the max length), so a chunk is reused
only for identical inputs.
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
from negjax.model.encode import encode_texts, rows_per_device
from negjax.multihost import process_chunks
from negjax.utils import atomic_path


def model_identity(enc) -> dict:
    """What besides the params decides the embeddings: architecture, pooling, normalisation,
    compute dtype and the tokenizer (hashed)."""
    tok = json.loads(enc.tokenizer.backend_tokenizer.to_str())
    # Truncation and padding are set per call (encode_texts changes them): not identity.
    tok = json.dumps({key: v for key, v in tok.items() if key not in ("truncation", "padding")},
                     sort_keys=True)
    return {"config": asdict(enc.config), "pooling": enc.pooling, "normalize": enc.normalize,
            "dtype": enc.dtype, "tokenizer": hashlib.sha256(tok.encode()).hexdigest()}


def params_fingerprint(enc, params, tower: str) -> str:
    """blake2b over the names, shapes, dtypes and bytes of one tower's params (host copies)."""
    h = hashlib.blake2b(digest_size=16)
    leaves = jax.tree_util.tree_leaves_with_path(enc.tower_params(params, tower))
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.ascontiguousarray(to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def chunk_ok(path: Path, rows: int, dim: int) -> bool:
    """True if `path` is a complete float32 [rows, dim] chunk."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


def save_chunk(path: Path, emb: np.ndarray) -> None:
    """Write one chunk atomically (a crash leaves no file under the final name)."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb.astype(np.float32, copy=False))


def encode_chunked(enc, params, texts, *, tower: str, max_length: int, batch_size: int,
                   chunk: int, directory: Path, stage: str) -> tuple[np.ndarray, dict]:
    """Embeddings `[N, D] float32` of `texts`, computed chunk by chunk into `directory`
    (reusing chunks already there). Collective: process p encodes chunks c % P == p, then all
    read all. `batch_size` counts the texts of a batch over all devices of all processes (a
    fixed per-device batch, so the embeddings do not depend on the number of processes).
    Returns (embeddings, {"chunks", "encoded", "reused"} of this process)."""
    pc = jax.process_count()
    n, dim = len(texts), enc.dim
    n_chunks = max(1, math.ceil(n / chunk))
    directory.mkdir(parents=True, exist_ok=True)
    info = {"chunks": n_chunks, "encoded": 0, "reused": 0}
    for c, lo, hi in process_chunks(n, chunk):
        path = directory / f"chunk-{c:05d}.npy"
        if chunk_ok(path, hi - lo, dim):
            info["reused"] += 1
            continue
        emb = encode_texts(enc, params, texts[lo:hi], tower=tower, max_length=max_length,
                           batch_size=batch_size, desc=f"encode {stage} {c + 1}/{n_chunks}",
                           per_device=rows_per_device(batch_size))
        save_chunk(path, emb)
        info["encoded"] += 1
    barrier(f"mine-encode-{stage}")
    out = np.empty((n, dim), np.float32)
    for c, lo, hi in process_chunks(n, chunk, 0, 1):  # every chunk
        path = directory / f"chunk-{c:05d}.npy"
        if not chunk_ok(path, hi - lo, dim):
            raise NegjaxError(f"{path}: embedding chunk missing or damaged after encoding "
                              f"(did process {c % pc} fail?)")
        out[lo:hi] = np.load(path)
    return out, info
