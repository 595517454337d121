"""A worker process of `negjax bench mine` (`python -m negjax.bench.mine_worker WORKDIR I`,
started by `negjax.bench.mine.launch_workers` through `negjax.multihost.start_local_job`): it
builds its shard's index, times exact and ScaNN search, and writes its report; and the timing
helpers the launcher shares."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from negjax.bench.vectors import finish_queries, load_shard, query_sources
from negjax.errors import NegjaxError
from negjax.utils import atomic_save_npy, atomic_write_text, log, process_memory_bytes

_BARRIER_MS = 12 * 3600 * 1000  # a barrier waits for the slowest process's build; lost ones: Watchdog


# ----------------------------------------------------------------------------- measuring

_LOG_PREFIX = "[bench mine]"


def bench_log(msg: str) -> None:
    log(f"{_LOG_PREFIX} {msg}", every_process=True)


def peak_rss_mb() -> float:
    return (process_memory_bytes("VmHWM") or 0) / 2**20


def _ru_maxrss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
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
    bench_log("faiss IndexFlatIP ...")
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    t0 = time.perf_counter()
    _, ids = flat.search(queries[:m], k)
    dt = time.perf_counter() - t0
    out["flat"] = {"queries": m, "search_s": dt, "qps": m / dt, "recall": recall(ids, exact_ids)}
    del flat
    nlist = max(1, int(4 * math.sqrt(n)))
    bench_log(f"faiss IndexIVFFlat nlist={nlist}: training ...")
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
                                   "qps": len(queries) / dt, "recall": recall(ids, exact_ids)})
    return out


def blas_limit(threads: int | None):
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
    rng, rows = query_sources(spec["n"], spec["queries"], spec["seed"])
    mine = (rows >= lo) & (rows < hi)
    atomic_save_npy(workdir / f"qrows-{pi}.npy", shard[rows[mine] - lo])
    _barrier("query-rows")
    base = np.empty((len(rows), spec["dim"]), np.float32)
    for p, (plo, phi) in enumerate(cfg["bounds"]):
        sel = (rows >= plo) & (rows < phi)
        if sel.any():
            base[sel] = np.load(workdir / f"qrows-{p}.npy")
    return finish_queries(base, rng, spec["query_noise"])


def _worker(cfg: dict, workdir: Path, pi: int) -> dict:
    """Process `pi`'s share of the benchmark: load its shard, exact search, ScaNN build and
    searches, candidates saved for the launcher's merge -> its report."""
    from negjax.search.index import ScannIndex, ScannParams
    from negjax.search.sharded import merge_ids, save_candidates, shard_candidates

    lo, hi = cfg["bounds"][pi]
    rows, k, threads, repeats = hi - lo, cfg["k"], cfg["threads"], cfg["repeats"]
    rep: dict = {"process": pi, "rows": [lo, hi], "threads": threads}
    bench_log(f"rows [{lo:,}, {hi:,}): loading ...")
    t0 = time.perf_counter()
    shard = load_shard(cfg["data"], lo, hi)
    queries = _shard_queries(cfg, workdir, pi, shard, lo, hi)
    rep["load_s"] = time.perf_counter() - t0
    m = max(1, min(cfg["exact_queries"], len(queries)))
    blas_ctx, _ = blas_limit(threads)

    _barrier("exact")
    bench_log(f"exact brute force: {m} queries x {rows:,} vectors ...")
    with blas_ctx:
        t0 = time.perf_counter()
        exact = shard_candidates(queries[:m], shard, lo, k, None)
        rep["exact_s"] = time.perf_counter() - t0
    save_candidates(workdir / f"exact-{pi}.npz", exact)

    params = ScannParams(**cfg["params"][pi]) if rows else None
    index = None
    _barrier("build")
    if rows:
        bench_log(f"building ScaNN index over {rows:,} vectors {asdict(params)} ...")
        t0 = time.perf_counter()
        index = ScannIndex.build(shard, min(k, rows), params, num_threads=threads)
        rep["build_s"] = time.perf_counter() - t0
        bench_log(f"built in {rep['build_s']:.1f} s")
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

    bench_log(f"searching {len(queries)} queries x {repeats} ...")
    rep.update(searched(index, "scann"))
    if "search_s" in rep:
        bench_log(f"search {rep['search_s']:.2f} s ({len(queries) / rep['search_s']:,.0f} queries/s on this shard)")
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
    rep["peak_rss_mb"] = peak_rss_mb()
    rep["ru_maxrss_mb"] = _ru_maxrss_mb()
    bench_log(f"done; peak RSS {rep['peak_rss_mb']:,.0f} MiB")
    return rep


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker: `python -m negjax.bench.mine_worker WORKDIR PROCESS_INDEX`."""
    global _LOG_PREFIX
    workdir, pi = Path(argv[0]), int(argv[1])
    cfg = json.loads((workdir / "config.json").read_text())
    pc = cfg["processes"]
    _LOG_PREFIX = f"[bench mine p{pi}]"
    from negjax.distributed import initialize
    from negjax.multihost import Watchdog

    if pc > 1:  # the job: NEGJAX_COORDINATOR etc., set by `start_local_job`
        initialize()
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


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
