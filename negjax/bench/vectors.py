"""The vectors of `negjax bench mine`: a synthetic clustered corpus and its queries, generated
in seeded chunks so that any slice can be made alone (each process of a sharded run makes only
its own shard), or rows of a `.npy` file read in blocks; `prepare_data` writes what the workers
read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError, file_error
from negjax.utils import progress

GEN_CHUNK = 65536  # rows per generation chunk; part of the data's definition (seeded per chunk)


def _normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows of `x [R, D] float32` in place (zero rows are left as zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def _synthetic_setup(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (cluster centres [C, D] float32, each row's centre [n] int64)."""
    rng = np.random.default_rng([seed, 0])
    centres = _normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
    return centres, rng.integers(0, clusters, n)


def _synthetic_chunk(c: int, n: int, centres: np.ndarray, assign: np.ndarray, scale: np.float32,
                     seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """Generation chunk `c`: corpus rows [c * GEN_CHUNK, min(n, (c + 1) * GEN_CHUNK)), into
    `out` when given. Its noise is one stream seeded by (seed, c), hence generated whole."""
    r0, r1 = c * GEN_CHUNK, min(n, (c + 1) * GEN_CHUNK)
    noise = np.random.default_rng([seed, 1, c]).standard_normal((r1 - r0, centres.shape[1]),
                                                                dtype=np.float32)
    if out is None:
        out = np.empty((r1 - r0, centres.shape[1]), dtype=np.float32)
    out[...] = centres[assign[r0:r1]] + scale * noise
    return _normalize(out)


def synthetic_corpus(n: int, dim: int, clusters: int, *, spread: float = 1.0, seed: int = 0,
                     show_progress: bool = True, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) (default all) of `n` clustered unit vectors: `[hi - lo, dim] float32`, a
    pure function of its arguments, bit-identical to the same rows of the whole corpus.

    `clusters` centres are uniform on the unit sphere; each point is a uniformly chosen centre
    plus isotropic Gaussian noise of total norm ~`spread`, then L2-normalised. With spread 1 a
    point's cosine to its centre is ~0.71 and to another point of its cluster ~0.5, so a
    query's top-100 lies inside its cluster with small score gaps: the regime where
    quantisation errors cost recall. Memory: the rows returned, one chunk of temporaries and
    `n` int64 cluster assignments.
    """
    hi = n if hi is None else hi
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"rows [{lo}, {hi}) are not inside [0, {n})")
    centres, assign = _synthetic_setup(n, dim, clusters, seed)
    out = np.empty((hi - lo, dim), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(dim))
    bar = progress(total=hi - lo, desc="generate corpus", unit="vec",
                   disable=None if show_progress else True)
    for c in range(lo // GEN_CHUNK, -(-hi // GEN_CHUNK)):
        r0, r1 = c * GEN_CHUNK, min(n, (c + 1) * GEN_CHUNK)
        a, b = max(lo, r0), min(hi, r1)
        if a >= b:
            continue
        if (a, b) == (r0, r1):
            _synthetic_chunk(c, n, centres, assign, scale, seed, out=out[a - lo:b - lo])
        else:  # a chunk cut by the range
            out[a - lo:b - lo] = _synthetic_chunk(c, n, centres, assign, scale, seed)[a - r0:b - r0]
        bar.update(b - a)
    bar.close()
    return out


def query_sources(n: int, q: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """-> (the query generator, positioned after drawing the source rows; the rows [q])."""
    rng = np.random.default_rng([seed, 2])
    return rng, rng.integers(0, n, q)


def finish_queries(base: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    dim = base.shape[1]
    out = base + np.float32(noise / math.sqrt(dim)) * rng.standard_normal(base.shape, dtype=np.float32)
    return _normalize(out)


def synthetic_queries(corpus: np.ndarray, q: int, *, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """`[q, D] float32` unit queries near random corpus rows but not equal to them.

    Each is a corpus row plus isotropic Gaussian noise of total norm ~`noise`, normalised
    (cosine ~0.89 to its source row at noise 0.5). A sharded run assembles the same queries
    from each shard's source rows (`_shard_queries`)."""
    rng, rows = query_sources(len(corpus), q, seed)
    return finish_queries(corpus[rows], rng, noise)


def _open_npy(path: str):
    """(memory map of a checked 2-D floating .npy file, Path)."""
    p = Path(path)
    if not p.is_file():
        raise file_error(p, None, "no such file")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise file_error(p, None, f"not a readable .npy array ({e})") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise file_error(p, None, f"expected a non-empty 2-D array [rows, dim], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise file_error(p, None, f"expected floating-point embeddings, got dtype {arr.dtype}")
    return arr, p


def _row_blocks(path: str, rows):
    """Checked float32 blocks of rows of a .npy file: `rows` is (lo, hi) or a sorted int array.
    Yields (position in `rows`, block [<= GEN_CHUNK, D]). Read by plain file reads (a memory
    map would add the file's pages to the resident set); an error names the file's row that
    holds NaN or infinity."""
    arr, p = _open_npy(path)
    dim, dtype = arr.shape[1], arr.dtype
    contiguous = isinstance(arr, np.memmap) and arr.flags.c_contiguous
    offset = int(arr.offset) if contiguous else 0  # else (Fortran order) read through the map
    index = np.arange(*rows) if isinstance(rows, tuple) else np.asarray(rows, np.int64)
    width = dim * dtype.itemsize
    for r0 in range(0, len(index), GEN_CHUNK):
        want = index[r0:r0 + GEN_CHUNK]
        first, last = int(want[0]), int(want[-1]) + 1
        if contiguous:
            span = np.fromfile(p, dtype=dtype, count=(last - first) * dim,
                               offset=offset + first * width).reshape(last - first, dim)
        else:
            span = np.asarray(arr[first:last])
        block = np.asarray(span[want - first], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise file_error(p, None, f"row {int(want[np.argmax(bad)])} holds NaN or infinity")
        yield r0, block


def _read_rows(path: str, rows) -> np.ndarray:
    """Rows of a .npy file (`_row_blocks`) as one float32 array `[R, D]`."""
    n = rows[1] - rows[0] if isinstance(rows, tuple) else len(rows)
    out = np.empty((n, _open_npy(path)[0].shape[1]), np.float32)
    for r0, block in _row_blocks(path, rows):
        out[r0:r0 + len(block)] = block
    return out


def _held_out_rows(n_file: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows of an embeddings file held out as queries -> (query rows, corpus rows), sorted."""
    perm = np.random.default_rng([seed, 3]).permutation(n_file)
    return np.sort(perm[:q]), np.sort(perm[q:])


def prepare_data(args, workdir: Path) -> tuple[dict, dict]:
    """Check the data arguments; for embedding files write the queries to `workdir/queries.npy`.
    -> (the workers' data spec, description for the result)."""
    if args.embeddings:
        arr, _ = _open_npy(args.embeddings)
        n_file, dim = arr.shape
        del arr
        for _ in _row_blocks(args.embeddings, (0, n_file)):  # every row, before any work starts
            pass
        spec = {"source": "files", "embeddings": str(args.embeddings), "n_file": n_file,
                "held_out": 0, "seed": args.seed, "normalize": bool(args.normalize)}
        desc = {"source": "files", "embeddings": str(args.embeddings)}
        if args.query_embeddings:
            qarr, _ = _open_npy(args.query_embeddings)
            if qarr.shape[1] != dim:
                raise NegjaxError(f"{args.query_embeddings}: dimension {qarr.shape[1]} differs from "
                                  f"the corpus's {dim} ({args.embeddings})")
            q = min(len(qarr), args.queries) if args.queries else len(qarr)
            del qarr
            queries = _read_rows(args.query_embeddings, (0, q))
            desc["query_embeddings"] = str(args.query_embeddings)
        else:
            # Hold out random corpus rows as queries, so no query finds itself at rank 1.
            q = args.queries or 10_000
            if q >= n_file:
                raise NegjaxError(f"--queries {q}: must be smaller than the corpus ({n_file} rows) "
                                  "when queries are held out of it; or pass --query-embeddings")
            queries = _read_rows(args.embeddings, _held_out_rows(n_file, q, args.seed)[0])
            spec["held_out"] = q
            desc["queries_from"] = "held-out corpus rows"
        if args.normalize:
            _normalize(queries)
        np.save(workdir / "queries.npy", queries)
        n = n_file - spec["held_out"]
        desc["normalized"] = bool(args.normalize)
    else:
        n, dim, q = args.synthetic, args.dim, args.queries or 10_000
        clusters = args.clusters or max(1, n // 1000)
        spec = {"source": "synthetic", "clusters": clusters, "spread": args.spread,
                "query_noise": args.query_noise, "seed": args.seed}
        desc = {"source": "synthetic", "clusters": clusters, "spread": args.spread,
                "query_noise": args.query_noise, "seed": args.seed, "normalized": True}
    spec.update(n=int(n), dim=int(dim), queries=int(q))
    desc.update(n=int(n), dim=int(dim), queries=int(q))
    return spec, desc


def load_shard(spec: dict, lo: int, hi: int) -> np.ndarray:
    """This process's corpus rows [lo, hi) `[hi - lo, D] float32` (only those are generated or read)."""
    if spec["source"] == "synthetic":
        return synthetic_corpus(spec["n"], spec["dim"], spec["clusters"], spread=spec["spread"],
                                seed=spec["seed"], show_progress=False, lo=lo, hi=hi)
    if spec["held_out"]:
        rows = _held_out_rows(spec["n_file"], spec["held_out"], spec["seed"])[1][lo:hi]
    else:
        rows = (lo, hi)
    shard = _read_rows(spec["embeddings"], rows) if hi > lo else np.zeros((0, spec["dim"]), np.float32)
    if spec["normalize"]:
        _normalize(shard)
    return shard
