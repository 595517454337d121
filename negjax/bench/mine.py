"""`negjax bench mine`: queries/s and recall@k of ScaNN against exact brute-force search, with
the corpus sharded over `--processes` local processes exactly as the mining job shards it.

The command starts P worker processes (`python -m negjax.bench.mine`; one `jax.distributed`
job on localhost when P > 1, CPU only, one device each, inside `multihost.Watchdog`). Worker p
holds only its contiguous shard [lo, hi) of the corpus (`negjax.search.sharded.shard_bounds`,
boundaries on multiples of the generation chunk) and, on the same queries, measures:

- exact brute force (`shard_candidates` without an index) on the first `--exact-queries`
  queries: the reference top-k for recall, and its time;
- ScaNN over its shard only (settings from `ScannParams.auto` for the shard size unless
  overridden): build time; time of batched parallel search of all queries (build excluded;
  median of `--repeats` timed runs after a warm-up); then `shard_candidates` with the index;
- optionally a sweep of `leaves_to_search` x `reorder` on the same index (no rebuild);
- faiss IndexFlatIP and IndexIVFFlat, with one process only and when `faiss` is importable
  (it is not a negjax dependency; otherwise reported as skipped);
- its peak RSS.

The launching process merges the shards' candidates (`merge_ids`) into the global top-k of
exact and of ScaNN search over the whole corpus: recall@k and recall@100 of sharded ScaNN
against exact, QPS = queries / the slowest process's search time, each process's peak RSS.
One process goes through the same code (one shard), so 1 and P processes compare like with
like. Barriers line the phases up, so the processes search at the same time and share the
machine's cores (cpu_count / P threads each unless `--threads`).

Candidates travel through files in a temporary directory (`save_candidates`), not through
`multihost.allgather_rows`: the launcher, which is not part of the JAX job, has to read every
worker's report anyway, so it merges too; then no worker ever holds the other shards'
candidates (a worker's peak RSS is its own shard's) and no device collective is needed.

Data: deterministic clustered synthetic vectors (`--synthetic N`; any row range can be
generated alone, bit-identical to those rows of the whole corpus) or real embeddings
(`--embeddings corpus.npy [--query-embeddings queries.npy]`; each worker reads its rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError, file_error
from negjax.utils import atomic_save_npy, atomic_write_text, log, process_memory_bytes, progress

_GEN_CHUNK = 65536  # rows per generation chunk; part of the data's definition (seeded per chunk)
_BARRIER_MS = 12 * 3600 * 1000  # a barrier waits for the slowest process's build; lost ones: Watchdog


# ----------------------------------------------------------------------------- data

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
    """Generation chunk `c`: corpus rows [c * _GEN_CHUNK, min(n, (c + 1) * _GEN_CHUNK)), into
    `out` when given. Its noise is one stream seeded by (seed, c), hence generated whole."""
    r0, r1 = c * _GEN_CHUNK, min(n, (c + 1) * _GEN_CHUNK)
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
    for c in range(lo // _GEN_CHUNK, -(-hi // _GEN_CHUNK)):
        r0, r1 = c * _GEN_CHUNK, min(n, (c + 1) * _GEN_CHUNK)
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


def _query_sources(n: int, q: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """-> (the query generator, positioned after drawing the source rows; the rows [q])."""
    rng = np.random.default_rng([seed, 2])
    return rng, rng.integers(0, n, q)


def _finish_queries(base: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    dim = base.shape[1]
    out = base + np.float32(noise / math.sqrt(dim)) * rng.standard_normal(base.shape, dtype=np.float32)
    return _normalize(out)


def synthetic_queries(corpus: np.ndarray, q: int, *, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """`[q, D] float32` unit queries near random corpus rows but not equal to them.

    Each is a corpus row plus isotropic Gaussian noise of total norm ~`noise`, normalised
    (cosine ~0.89 to its source row at noise 0.5). A sharded run assembles the same queries
    from each shard's source rows (`_shard_queries`)."""
    rng, rows = _query_sources(len(corpus), q, seed)
    return _finish_queries(corpus[rows], rng, noise)


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
    Yields (position in `rows`, block [<= _GEN_CHUNK, D]). Read by plain file reads (a memory
    map would add the file's pages to the resident set); an error names the file's row that
    holds NaN or infinity."""
    arr, p = _open_npy(path)
    dim, dtype = arr.shape[1], arr.dtype
    contiguous = isinstance(arr, np.memmap) and arr.flags.c_contiguous
    offset = int(arr.offset) if contiguous else 0  # else (Fortran order) read through the map
    index = np.arange(*rows) if isinstance(rows, tuple) else np.asarray(rows, np.int64)
    width = dim * dtype.itemsize
    for r0 in range(0, len(index), _GEN_CHUNK):
        want = index[r0:r0 + _GEN_CHUNK]
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


def _load_shard(spec: dict, lo: int, hi: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------- measuring

_LOG_PREFIX = "[bench mine]"


def _log(msg: str) -> None:
    log(f"{_LOG_PREFIX} {msg}", every_process=True)


def _peak_rss_mb() -> float:
    return (process_memory_bytes("VmHWM") or 0) / 2**20


def _ru_maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


def _recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    from negjax.search.index import recall_at_k

    return recall_at_k(approx_ids[:len(exact_ids)], exact_ids)


def _time_scann(index, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, list[float]]:
    """Warm up on a few queries, then time `repeats` searches of all queries.
    -> (ids of the last run [Q, k], seconds of each run)."""
    index.search(queries[:min(len(queries), 512)], k)
    times, ids = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids, _ = index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return ids, times


def _bench_faiss(corpus, queries, exact_ids, k, threads, nprobes) -> dict:
    """faiss IndexFlatIP (exact) and IndexIVFFlat (nlist = 4*sqrt(N)) on the same data."""
    try:
        import faiss
    except ImportError:
        return {"available": False, "reason": "the faiss module is not installed; it is not a negjax dependency"}
    if threads:
        faiss.omp_set_num_threads(threads)
    n, dim = corpus.shape
    m = len(exact_ids)
    out = {"available": True, "version": getattr(faiss, "__version__", "?")}
    _log("faiss IndexFlatIP ...")
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    t0 = time.perf_counter()
    _, ids = flat.search(queries[:m], k)
    dt = time.perf_counter() - t0
    out["flat"] = {"queries": m, "search_s": dt, "qps": m / dt, "recall": _recall(ids, exact_ids)}
    del flat
    nlist = max(1, int(4 * math.sqrt(n)))
    _log(f"faiss IndexIVFFlat nlist={nlist}: training ...")
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = corpus[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)]
    ivf.train(sample)
    ivf.add(corpus)
    out["ivf"] = {"nlist": nlist, "build_s": time.perf_counter() - t0, "runs": []}
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        t0 = time.perf_counter()
        _, ids = ivf.search(queries, k)
        dt = time.perf_counter() - t0
        out["ivf"]["runs"].append({"nprobe": nprobe, "queries": len(queries), "search_s": dt,
                                   "qps": len(queries) / dt, "recall": _recall(ids, exact_ids)})
    return out


def _blas_limit(threads: int | None):
    """Context limiting BLAS threads (threadpoolctl, when installed) -> (context, note)."""
    if not threads:
        return nullcontext(), "default"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext(), "default (threadpoolctl not installed; set OPENBLAS_NUM_THREADS)"
    return threadpool_limits(limits=threads, user_api="blas"), str(threads)


# ----------------------------------------------------------------------------- worker processes

def _barrier(name: str) -> None:
    """Wait for every process of the job (the coordination service's barrier: no device work)."""
    import jax

    if jax.process_count() > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(f"negjax-bench-mine-{name}", _BARRIER_MS)


def _shard_queries(cfg: dict, workdir: Path, pi: int, shard: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """All queries `[Q, D]`. Synthetic ones are corpus rows plus noise: each process writes the
    source rows that fall in its shard, then every process assembles the same queries (equal,
    bit for bit, to `synthetic_queries` over the whole corpus) without the rest of the corpus."""
    spec = cfg["data"]
    if spec["source"] != "synthetic":
        return np.load(workdir / "queries.npy")
    rng, rows = _query_sources(spec["n"], spec["queries"], spec["seed"])
    mine = (rows >= lo) & (rows < hi)
    atomic_save_npy(workdir / f"qrows-{pi}.npy", shard[rows[mine] - lo])
    _barrier("query-rows")
    base = np.empty((len(rows), spec["dim"]), np.float32)
    for p, (plo, phi) in enumerate(cfg["bounds"]):
        sel = (rows >= plo) & (rows < phi)
        if sel.any():
            base[sel] = np.load(workdir / f"qrows-{p}.npy")
    return _finish_queries(base, rng, spec["query_noise"])


def _worker(cfg: dict, workdir: Path, pi: int) -> dict:
    """Process `pi`'s share of the benchmark: load its shard, exact search, ScaNN build and
    searches, candidates saved for the launcher's merge -> its report."""
    from negjax.search.index import ScannIndex, ScannParams
    from negjax.search.sharded import merge_ids, save_candidates, shard_candidates

    lo, hi = cfg["bounds"][pi]
    rows, k, threads, repeats = hi - lo, cfg["k"], cfg["threads"], cfg["repeats"]
    rep: dict = {"process": pi, "rows": [lo, hi], "threads": threads}
    _log(f"rows [{lo:,}, {hi:,}): loading ...")
    t0 = time.perf_counter()
    shard = _load_shard(cfg["data"], lo, hi)
    queries = _shard_queries(cfg, workdir, pi, shard, lo, hi)
    rep["load_s"] = time.perf_counter() - t0
    m = max(1, min(cfg["exact_queries"], len(queries)))
    blas_ctx, _ = _blas_limit(threads)

    _barrier("exact")
    _log(f"exact brute force: {m} queries x {rows:,} vectors ...")
    with blas_ctx:
        t0 = time.perf_counter()
        exact = shard_candidates(queries[:m], shard, lo, k, None)
        rep["exact_s"] = time.perf_counter() - t0
    save_candidates(workdir / f"exact-{pi}.npz", exact)

    params = ScannParams(**cfg["params"][pi]) if rows else None
    index = None
    _barrier("build")
    if rows:
        _log(f"building ScaNN index over {rows:,} vectors {asdict(params)} ...")
        t0 = time.perf_counter()
        index = ScannIndex.build(shard, min(k, rows), params, num_threads=threads)
        rep["build_s"] = time.perf_counter() - t0
        _log(f"built in {rep['build_s']:.1f} s")
    rep["params"] = asdict(params) if params else None

    def searched(variant, name: str) -> dict:
        """Timed searches of all queries, then the candidates (searched once more) saved."""
        _barrier(name)
        out = {}
        if variant is not None:
            _, times = _time_scann(variant, queries, min(k, rows), repeats)
            out = {"search_s": float(np.median(times)), "search_s_runs": times}
        t0 = time.perf_counter()
        cand = shard_candidates(queries, shard, lo, k, variant)
        out["candidates_s"] = time.perf_counter() - t0
        save_candidates(workdir / f"{name}-{pi}.npz", cand)
        return out

    _log(f"searching {len(queries)} queries x {repeats} ...")
    rep.update(searched(index, "scann"))
    if "search_s" in rep:
        _log(f"search {rep['search_s']:.2f} s ({len(queries) / rep['search_s']:,.0f} queries/s on this shard)")
    rep["sweep"] = []
    grid = cfg["grids"][pi] or []
    for j in range(cfg["sweep_count"]):
        variant = None
        if index is not None:
            lv, ro = grid[j]
            variant = ScannIndex(index.searcher, replace(params, leaves_to_search=lv, reorder=ro), rows)
        rep["sweep"].append(searched(variant, f"sweep{j}"))
    del index
    if cfg["run_faiss"]:  # one process: its shard is the whole corpus
        exact_ids = merge_ids([exact], k)
        rep["faiss"] = _bench_faiss(shard, queries, exact_ids, k, threads, cfg["faiss_nprobes"])
    rep["peak_rss_mb"] = _peak_rss_mb()
    rep["ru_maxrss_mb"] = _ru_maxrss_mb()
    _log(f"done; peak RSS {rep['peak_rss_mb']:,.0f} MiB")
    return rep


def _worker_main(argv: list[str]) -> int:
    """Entry point of a worker: `python -m negjax.bench.mine WORKDIR PROCESS_INDEX`."""
    global _LOG_PREFIX
    workdir, pi = Path(argv[0]), int(argv[1])
    cfg = json.loads((workdir / "config.json").read_text())
    pc = cfg["processes"]
    _LOG_PREFIX = f"[bench mine p{pi}]"
    import jax

    from negjax.multihost import Watchdog

    if pc > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{cfg['port']}",
                                   num_processes=pc, process_id=pi)
    try:
        with Watchdog("bench-mine"):
            rep = _worker(cfg, workdir, pi)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which stops the others
        if isinstance(e, NegjaxError):
            msg = str(e).splitlines()[0] if str(e) else "error"
        else:
            import traceback

            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
        atomic_write_text(workdir / f"error-{pi}.txt", msg)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not a normal exit: with several processes it would wait for the others in JAX's
        # shutdown barrier, and they wait for this one in the next barrier.
        os._exit(2 if isinstance(e, NegjaxError) else 1)
    atomic_write_text(workdir / f"worker-{pi}.json", json.dumps(rep))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    """The workers' environment: CPU only, one device each, no progress bars, negjax importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
    env["JAX_PLATFORMS"] = "cpu"
    env["NEGJAX_PROGRESS"] = "0"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("NEGJAX_COORDINATOR", "NEGJAX_NUM_PROCESSES", "NEGJAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(var, None)
    return env


def _relay(stream, sink) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()


def launch_workers(cfg: dict, workdir: Path) -> list[dict]:
    """Start the `cfg['processes']` workers, relay their output to stderr, wait for all ->
    their reports. One failing stops the others, and its message becomes a NegjaxError."""
    pc = cfg["processes"]
    cfg = dict(cfg, port=_free_port() if pc > 1 else 0)
    (workdir / "config.json").write_text(json.dumps(cfg))
    env = _worker_env()
    procs, relays = [], []
    try:
        for pi in range(pc):
            p = subprocess.Popen([sys.executable, "-m", "negjax.bench.mine", str(workdir), str(pi)],
                                 env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace")
            procs.append(p)
            relays.append(threading.Thread(target=_relay, args=(p.stdout, sys.stderr), daemon=True))
            relays[-1].start()
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            failed = next((pi for pi, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in relays:
            t.join(timeout=5)
    if failed is not None:
        err = workdir / f"error-{failed}.txt"
        msg = (err.read_text() if err.is_file()
               else f"exited with status {procs[failed].returncode} (its output is above)")
        raise NegjaxError(msg if pc == 1 else f"process {failed} of {pc}: {msg}")
    return [json.loads((workdir / f"worker-{pi}.json").read_text()) for pi in range(pc)]


# ----------------------------------------------------------------------------- the whole run

def _shard_setup(args, n: int, dim: int, bounds) -> tuple[list, list]:
    """ScaNN settings and sweep grid of each shard (None for an empty one), checked."""
    from negjax.search.index import ScannParams

    over = {"num_leaves": args.num_leaves, "leaves_to_search": args.leaves_to_search,
            "reorder": args.reorder, "training_sample_size": args.training_sample_size}
    params, grids = [], []
    for lo, hi in bounds:
        rows = hi - lo
        if rows == 0:
            params.append(None)
            grids.append(None)
            continue
        p = ScannParams.auto(rows, dim, args.k).override(**over)
        if args.num_leaves:
            p.brute_force = False
            if not p.leaves_to_search:
                p.leaves_to_search = max(1, math.ceil(0.01 * args.num_leaves))
        if p.num_leaves and not 0 < p.leaves_to_search <= p.num_leaves:
            raise NegjaxError(f"--leaves-to-search must be in 1..{p.num_leaves} (the number of leaves)")
        if p.num_leaves > rows:
            where = "vectors" if rows == n else f"vectors in a shard ({len(bounds)} processes)"
            raise NegjaxError(f"--num-leaves {p.num_leaves}: more leaves than {where} ({rows})")
        grid = []
        if (args.sweep_leaves or args.sweep_reorder) and not p.brute_force:
            grid = [(lv, ro) for lv in (args.sweep_leaves or [p.leaves_to_search])
                    for ro in (args.sweep_reorder or [p.reorder])]
            if not p.num_leaves:
                grid = sorted({(0, ro) for _, ro in grid})
        params.append(asdict(p))
        grids.append(grid)
    if len({len(g) for g in grids if g is not None}) > 1:
        raise NegjaxError("--sweep-leaves/--sweep-reorder: the shards' indexes differ in kind (tree or "
                          "not, brute force or not); pass --num-leaves, or use other --processes")
    return params, grids


def bench(args, spec: dict, workdir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run the workers and merge their candidates -> (result dict, merged exact ids [M, k],
    merged ScaNN ids [Q, k])."""
    from negjax.search.sharded import load_candidates, merge_ids, shard_bounds

    n, dim, q, k, pc = spec["n"], spec["dim"], spec["queries"], args.k, args.processes
    if not 0 < k <= n:
        raise NegjaxError(f"--k {k}: must be in 1..{n} (the corpus size)")
    bounds = shard_bounds(n, args.shard_chunk, pc)
    params, grids = _shard_setup(args, n, dim, bounds)
    threads = args.threads or max(1, (os.cpu_count() or 1) // pc)
    m = max(1, min(args.exact_queries, q))
    first = next(p for p, b in enumerate(bounds) if b[1] > b[0])
    cfg = {"data": spec, "processes": pc, "bounds": bounds, "k": k, "exact_queries": m,
           "threads": threads, "repeats": args.repeats, "params": params, "grids": grids,
           "sweep_count": len(grids[first]), "run_faiss": pc == 1 and not args.no_faiss,
           "faiss_nprobes": [8, 16, 32]}
    _log(f"{pc} process(es), shards {', '.join(f'[{lo:,}, {hi:,})' for lo, hi in bounds)}, "
         f"{threads} thread(s) each")
    reports = launch_workers(cfg, workdir)

    def merged(name: str, rows: int) -> np.ndarray:
        parts = [load_candidates(workdir / f"{name}-{p}.npz", rows) for p in range(pc)]
        if any(part is None for part in parts):
            raise NegjaxError(f"bench mine: a worker's {name} candidates are missing or damaged")
        return merge_ids(parts, k)

    exact_ids = merged("exact", m)
    scann_ids = merged("scann", q)
    busy = [r for r in reports if r["rows"][1] > r["rows"][0]]
    blas_note = _blas_limit(threads)[1]
    res: dict = {"k": k, "processes": pc,
                 "threads": {"cpu_count": os.cpu_count(), "per_process": threads, "blas": blas_note,
                             "scann": threads}}
    exact_s = max(r["exact_s"] for r in reports)
    res["exact"] = {"queries": m, "search_s": exact_s, "qps": m / exact_s,
                    "recall": _recall(exact_ids, exact_ids)}
    slow = max(busy, key=lambda r: r["search_s"])
    res["scann"] = {"params": params[first], "build_s": max(r["build_s"] for r in busy),
                    "queries": q, "search_s": slow["search_s"], "search_s_runs": slow["search_s_runs"],
                    "qps": q / slow["search_s"], "recall": _recall(scann_ids, exact_ids),
                    "recall_at_100": (_recall(scann_ids[:, :100], exact_ids[:, :100])
                                      if k >= 100 else None),
                    "recall_queries": m}
    res["speedup"] = res["scann"]["qps"] / res["exact"]["qps"]
    res["sweep"] = []
    for j, (lv, ro) in enumerate(grids[first]):
        s_ids = merged(f"sweep{j}", q)
        s_time = max(r["sweep"][j]["search_s"] for r in busy)
        res["sweep"].append({"leaves_to_search": lv, "reorder": max(ro, k), "qps": q / s_time,
                             "recall": _recall(s_ids, exact_ids),
                             "recall_at_100": (_recall(s_ids[:, :100], exact_ids[:, :100])
                                               if k >= 100 else None),
                             "speedup": q / s_time / res["exact"]["qps"]})
    if cfg["run_faiss"]:
        res["faiss"] = reports[0]["faiss"]
    else:
        res["faiss"] = {"available": False,
                        "reason": "--no-faiss" if args.no_faiss else "measured with one process only"}
    res["per_process"] = [{key: r.get(key) for key in
                           ("process", "rows", "threads", "params", "load_s", "exact_s", "build_s",
                            "search_s", "search_s_runs", "candidates_s", "peak_rss_mb", "ru_maxrss_mb")}
                          for r in reports]
    res["peak_rss_mb"] = max(r["peak_rss_mb"] for r in reports)
    res["launcher_peak_rss_mb"] = _peak_rss_mb()
    return res, exact_ids, scann_ids


# ----------------------------------------------------------------------------- report

def format_table(res: dict) -> str:
    """The human-readable summary of a `bench` result."""
    k, d = res["k"], res["data"]
    lines = [f"data: {d['source']} {d['n']:,} x {d['dim']}, {d['queries']:,} queries, k={k}"
             + (f", {d['clusters']} clusters" if "clusters" in d else ""),
             f"processes: {res['processes']} (one corpus shard, ScaNN index and search each; "
             f"top-k merged)",
             f"threads per process: scann={res['threads']['scann']} blas={res['threads']['blas']} "
             f"(cpus: {res['threads']['cpu_count']})", ""]
    head = f"{'method':<14} {'settings':<34} {'build s':>8} {'queries':>8} {'QPS':>10} {'vs exact':>9} {'recall@' + str(k):>10}"
    lines += [head, "-" * len(head)]

    def row(method, settings, build, q, qps, recall):
        b = "-" if build is None else f"{build:.1f}"
        lines.append(f"{method:<14} {settings:<34} {b:>8} {q:>8,} {qps:>10,.1f} "
                     f"{qps / res['exact']['qps']:>8.1f}x {recall:>10.4f}")

    e, s = res["exact"], res["scann"]
    row("exact", "blockwise GEMM (reference)", None, e["queries"], e["qps"], e["recall"])
    p = s["params"]
    settings = ("brute force" if p["brute_force"] else
                (f"{p['num_leaves']} leaves, search {p['leaves_to_search']}, " if p["num_leaves"] else "AH, ")
                + f"reorder {max(p['reorder'], k)}")
    if res["processes"] > 1:
        settings = f"{res['processes']} x " + settings
    row("ScaNN", settings, s["build_s"], s["queries"], s["qps"], s["recall"])
    for sw in res["sweep"]:
        st = (f"search {sw['leaves_to_search']}, " if sw["leaves_to_search"] else "") + f"reorder {sw['reorder']}"
        row("  sweep", st, None, s["queries"], sw["qps"], sw["recall"])
    f = res["faiss"]
    if f["available"]:
        row("faiss flat", "IndexFlatIP", None, f["flat"]["queries"], f["flat"]["qps"], f["flat"]["recall"])
        for r in f["ivf"]["runs"]:
            row("faiss IVF", f"nlist {f['ivf']['nlist']}, nprobe {r['nprobe']}", f["ivf"]["build_s"],
                r["queries"], r["qps"], r["recall"])
    lines.append("")
    phead = (f"{'process':>7} {'rows':<26} {'load s':>7} {'exact s':>8} {'build s':>8} "
             f"{'search s':>9} {'peak RSS MiB':>13}")
    lines += [phead, "-" * len(phead)]
    for r in res["per_process"]:
        lo, hi = r["rows"]

        def num(key):
            return "-" if r.get(key) is None else f"{r[key]:.1f}"

        lines.append(f"{r['process']:>7} {f'[{lo:,}, {hi:,})':<26} {num('load_s'):>7} "
                     f"{num('exact_s'):>8} {num('build_s'):>8} "
                     f"{'-' if r.get('search_s') is None else format(r['search_s'], '.2f'):>9} "
                     f"{r['peak_rss_mb']:>13,.0f}")
    lines.append("")
    at100 = "" if s.get("recall_at_100") is None or k == 100 else f", recall@100 {s['recall_at_100']:.4f}"
    lines.append(f"ScaNN vs exact: {res['speedup']:.1f}x queries/s at recall@{k} {s['recall']:.4f}{at100} "
                 f"(recall on {s['recall_queries']:,} queries; QPS = queries / the slowest process's "
                 f"search, median of {len(s['search_s_runs'])} runs)")
    if not f["available"]:
        lines.append(f"faiss: skipped: {f['reason']}")
    lines.append(f"peak RSS: {res['peak_rss_mb']:,.0f} MiB (the largest process; launcher "
                 f"{res['launcher_peak_rss_mb']:,.0f} MiB)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (synthetic unless --embeddings)")
    g.add_argument("--synthetic", type=int, default=100_000, metavar="N", help="corpus size (default 100000)")
    g.add_argument("--dim", type=int, default=384, help="dimension of synthetic vectors (default 384)")
    g.add_argument("--clusters", type=int, default=0, metavar="C",
                   help="synthetic clusters (default N/1000, i.e. ~1000 vectors per cluster)")
    g.add_argument("--spread", type=float, default=1.0, help="within-cluster noise norm (default 1.0)")
    g.add_argument("--query-noise", type=float, default=0.5,
                   help="noise norm added to the corpus row a query is drawn from (default 0.5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--queries", type=int, default=0, metavar="Q",
                   help="queries searched by ScaNN (default 10000; with --query-embeddings: all rows)")
    g.add_argument("--embeddings", metavar="FILE.npy", help="real corpus embeddings [N, D]")
    g.add_argument("--query-embeddings", metavar="FILE.npy",
                   help="real query embeddings [Q, D]; default: Q rows held out of --embeddings")
    g.add_argument("--normalize", action="store_true", help="L2-normalise --embeddings / --query-embeddings")
    g = p.add_argument_group("processes")
    g.add_argument("--processes", type=int, default=1, metavar="P",
                   help="local worker processes, each holding one contiguous corpus shard (its own "
                        "ScaNN index), as the mining job shards the corpus; default 1")
    g.add_argument("--shard-chunk", type=int, default=_GEN_CHUNK, metavar="ROWS",
                   help=f"shard boundaries fall on multiples of this (default {_GEN_CHUNK}, the "
                        "synthetic generation chunk; smaller values split small corpora)")
    g = p.add_argument_group("search")
    g.add_argument("--k", type=int, default=100)
    g.add_argument("--exact-queries", type=int, default=1000, metavar="M",
                   help="queries searched exactly (QPS + recall reference; default 1000)")
    g.add_argument("--num-leaves", type=int, help="ScaNN tree leaves per shard (default: ScannParams.auto)")
    g.add_argument("--leaves-to-search", type=int)
    g.add_argument("--reorder", type=int, help="candidates re-scored exactly")
    g.add_argument("--training-sample-size", type=int)
    g.add_argument("--threads", type=int,
                   help="threads for ScaNN and BLAS in each process (default: cores / processes)")
    g.add_argument("--repeats", type=int, default=3, help="timed ScaNN runs; the median counts (default 3)")
    g.add_argument("--sweep-leaves", type=_int_list, default=[], metavar="L1,L2,...",
                   help="also measure these leaves_to_search values on the same index")
    g.add_argument("--sweep-reorder", type=_int_list, default=[], metavar="R1,R2,...",
                   help="also measure these reorder counts (crossed with --sweep-leaves)")
    g.add_argument("--no-faiss", action="store_true",
                   help="skip faiss even if it is importable (it is measured with one process only)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    g.add_argument("--output", metavar="FILE.json", help="also write the JSON result here (atomically)")
    g.add_argument("--save-ids", metavar="DIR",
                   help="also write the merged top-k ids (exact_ids.npy [M, k], scann_ids.npy [Q, k])")


def run(args) -> int:
    for name in ("synthetic", "dim", "exact_queries", "repeats", "k", "processes", "shard_chunk"):
        if getattr(args, name) <= 0:
            raise NegjaxError(f"--{name.replace('_', '-')} must be positive")
    if args.queries < 0 or args.clusters < 0 or (args.threads is not None and args.threads <= 0):
        raise NegjaxError("--queries, --clusters and --threads must be positive")
    if args.query_embeddings and not args.embeddings:
        raise NegjaxError("--query-embeddings needs --embeddings")

    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="negjax-bench-mine-"))
    try:
        spec, data = prepare_data(args, workdir)
        res, exact_ids, scann_ids = bench(args, spec, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = {"bench": "mine", "data": data, **res}
    from importlib.metadata import version

    res["versions"] = {"scann": version("scann"), "numpy": np.__version__,
                       "python": platform.python_version()}
    res["host"] = {"machine": platform.machine(), "processor": platform.processor() or "?"}
    res["command"] = "negjax bench mine " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "mine"] else None
    res["total_s"] = time.perf_counter() - t_start
    if args.save_ids:
        out = Path(args.save_ids)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "exact_ids.npy", exact_ids)
        np.save(out / "scann_ids.npy", scann_ids)
    text = json.dumps(res, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
