"""`negjax bench mine`: queries/s and recall@k of ScaNN against exact brute-force search.

One run measures, on the same data and queries:

- exact brute force (`negjax.search.index.exact_search`, blockwise GEMM) on the first
  `--exact-queries` queries: its QPS, and the reference top-k for recall;
- ScaNN (`ScannIndex`, settings from `ScannParams.auto` unless overridden): build time, QPS of
  batched parallel search over all queries (build excluded; median of `--repeats` timed runs
  after a warm-up), recall@k against exact on the reference queries;
- optionally a sweep of `leaves_to_search` x `reorder` on the same index (no rebuild);
- faiss IndexFlatIP and IndexIVFFlat, only when `faiss` is importable (it is not a negjax
  dependency; otherwise reported as skipped).

Data: deterministic clustered synthetic vectors (`--synthetic N`) or real embeddings
(`--embeddings corpus.npy [--query-embeddings queries.npy]`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from negjax.errors import NegjaxError, file_error
from negjax.utils import atomic_write_text, process_memory_bytes, progress

_GEN_CHUNK = 65536  # rows per generation chunk; part of the data's definition (seeded per chunk)


# ----------------------------------------------------------------------------- data

def _normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows of `x [R, D] float32` in place (zero rows are left as zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def synthetic_corpus(n: int, dim: int, clusters: int, *, spread: float = 1.0, seed: int = 0,
                     show_progress: bool = True) -> np.ndarray:
    """Clustered unit vectors `[n, dim] float32`, a pure function of its arguments.

    `clusters` centres are uniform on the unit sphere; each point is a uniformly chosen centre
    plus isotropic Gaussian noise of total norm ~`spread`, then L2-normalised. With spread 1 a
    point's cosine to its centre is ~0.71 and to another point of its cluster ~0.5, so a
    query's top-100 lies inside its cluster with small score gaps: the regime where
    quantisation errors cost recall.
    """
    rng = np.random.default_rng([seed, 0])
    centres = _normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
    assign = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(dim))
    bar = progress(total=n, desc="generate corpus", unit="vec", disable=None if show_progress else True)
    for i, r0 in enumerate(range(0, n, _GEN_CHUNK)):
        r1 = min(n, r0 + _GEN_CHUNK)
        noise = np.random.default_rng([seed, 1, i]).standard_normal((r1 - r0, dim), dtype=np.float32)
        out[r0:r1] = centres[assign[r0:r1]] + scale * noise
        _normalize(out[r0:r1])
        bar.update(r1 - r0)
    bar.close()
    return out


def synthetic_queries(corpus: np.ndarray, q: int, *, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """`[q, D] float32` unit queries near random corpus rows but not equal to them.

    Each is a corpus row plus isotropic Gaussian noise of total norm ~`noise`, normalised
    (cosine ~0.89 to its source row at noise 0.5)."""
    n, dim = corpus.shape
    rng = np.random.default_rng([seed, 2])
    rows = rng.integers(0, n, q)
    out = corpus[rows] + np.float32(noise / math.sqrt(dim)) * rng.standard_normal((q, dim), dtype=np.float32)
    return _normalize(out)


def _load_npy(path: str) -> np.ndarray:
    """A 2-D float array from a .npy file, checked, as float32 `[R, D]`."""
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
    out = np.ascontiguousarray(arr, dtype=np.float32)
    for r0 in range(0, len(out), _GEN_CHUNK):  # chunked: no full-size boolean temporary
        bad = ~np.isfinite(out[r0:r0 + _GEN_CHUNK]).all(axis=1)
        if bad.any():
            raise file_error(p, None, f"row {r0 + int(np.argmax(bad))} holds NaN or infinity")
    return out


def load_data(args) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (corpus [N, D], queries [Q, D], description) from the command-line arguments."""
    if args.embeddings:
        corpus = _load_npy(args.embeddings)
        desc = {"source": "files", "embeddings": str(args.embeddings)}
        if args.query_embeddings:
            queries = _load_npy(args.query_embeddings)
            if queries.shape[1] != corpus.shape[1]:
                raise NegjaxError(f"{args.query_embeddings}: dimension {queries.shape[1]} differs from "
                                  f"the corpus's {corpus.shape[1]} ({args.embeddings})")
            if args.queries:
                queries = queries[:args.queries]
            desc["query_embeddings"] = str(args.query_embeddings)
        else:
            # Hold out random corpus rows as queries, so no query finds itself at rank 1.
            q = args.queries or 10_000
            if q >= len(corpus):
                raise NegjaxError(f"--queries {q}: must be smaller than the corpus ({len(corpus)} rows) "
                                  "when queries are held out of it; or pass --query-embeddings")
            perm = np.random.default_rng([args.seed, 3]).permutation(len(corpus))
            queries = corpus[np.sort(perm[:q])]
            corpus = corpus[np.sort(perm[q:])]
            desc["queries_from"] = "held-out corpus rows"
        if args.normalize:
            _normalize(corpus)
            _normalize(queries)
        desc["normalized"] = bool(args.normalize)
    else:
        n, dim = args.synthetic, args.dim
        clusters = args.clusters or max(1, n // 1000)
        t0 = time.perf_counter()
        corpus = synthetic_corpus(n, dim, clusters, spread=args.spread, seed=args.seed)
        queries = synthetic_queries(corpus, args.queries or 10_000, noise=args.query_noise, seed=args.seed)
        desc = {"source": "synthetic", "clusters": clusters, "spread": args.spread,
                "query_noise": args.query_noise, "seed": args.seed, "normalized": True,
                "generate_s": round(time.perf_counter() - t0, 3)}
    desc.update(n=int(corpus.shape[0]), dim=int(corpus.shape[1]), queries=int(queries.shape[0]))
    return corpus, queries, desc


# ----------------------------------------------------------------------------- measuring

def _log(msg: str) -> None:
    print(f"[bench mine] {msg}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return (process_memory_bytes("VmHWM") or 0) / 2**20


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


def bench(corpus: np.ndarray, queries: np.ndarray, k: int, *, params=None, exact_queries: int = 1000,
          threads: int | None = None, repeats: int = 3, sweep_leaves=(), sweep_reorder=(),
          faiss_nprobes=(8, 16, 32), run_faiss: bool = True) -> dict:
    """Measure exact vs ScaNN on `corpus [N, D]`, `queries [Q, D]` float32 -> result dict."""
    from negjax.search.index import ScannIndex, ScannParams, exact_search

    n, dim = corpus.shape
    if not 0 < k <= n:
        raise NegjaxError(f"--k {k}: must be in 1..{n} (the corpus size)")
    m = max(1, min(exact_queries, len(queries)))
    blas_ctx, blas_note = _blas_limit(threads)
    res: dict = {"k": k, "threads": {"cpu_count": os.cpu_count(), "blas": blas_note,
                                     "scann": threads or "default"}}

    with blas_ctx:
        _log(f"exact brute force: {m} queries x {n} vectors ...")
        t0 = time.perf_counter()
        exact_ids, _ = exact_search(queries[:m], corpus, k)
        dt = time.perf_counter() - t0
    res["exact"] = {"queries": m, "search_s": dt, "qps": m / dt, "recall": _recall(exact_ids, exact_ids)}
    _log(f"exact: {m / dt:,.1f} queries/s")

    params = params or ScannParams.auto(n, dim, k)
    _log(f"building ScaNN index {asdict(params)} ...")
    t0 = time.perf_counter()
    index = ScannIndex.build(corpus, k, params, num_threads=threads)
    build_s = time.perf_counter() - t0
    _log(f"built in {build_s:.1f} s; searching {len(queries)} queries x {repeats} ...")
    ids, times = _time_scann(index, queries, k, repeats)
    search_s = float(np.median(times))
    res["scann"] = {"params": asdict(params), "build_s": build_s, "queries": len(queries),
                    "search_s": search_s, "search_s_runs": times, "qps": len(queries) / search_s,
                    "recall": _recall(ids, exact_ids), "recall_queries": m}
    res["speedup"] = res["scann"]["qps"] / res["exact"]["qps"]
    _log(f"ScaNN: {res['scann']['qps']:,.0f} queries/s, recall@{k} {res['scann']['recall']:.4f}")

    res["sweep"] = []
    if (sweep_leaves or sweep_reorder) and not params.brute_force:
        grid = [(lv, ro) for lv in (sweep_leaves or [params.leaves_to_search])
                for ro in (sweep_reorder or [params.reorder])]
        if not params.num_leaves:
            grid = sorted({(0, ro) for _, ro in grid})
        for lv, ro in progress(grid, desc="sweep", unit="setting"):
            variant = ScannIndex(index.searcher, replace(params, leaves_to_search=lv, reorder=ro), n)
            s_ids, s_times = _time_scann(variant, queries, k, repeats)
            qps = len(queries) / float(np.median(s_times))
            res["sweep"].append({"leaves_to_search": lv, "reorder": max(ro, k), "qps": qps,
                                 "recall": _recall(s_ids, exact_ids),
                                 "speedup": qps / res["exact"]["qps"]})
    del index

    if run_faiss:
        res["faiss"] = _bench_faiss(corpus, queries, exact_ids, k, threads, faiss_nprobes)
    else:
        res["faiss"] = {"available": False, "reason": "--no-faiss"}
    if not res["faiss"]["available"]:
        _log(f"faiss skipped: {res['faiss']['reason']}")
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


# ----------------------------------------------------------------------------- report

def format_table(res: dict) -> str:
    """The human-readable summary of a `bench` result."""
    k, d = res["k"], res["data"]
    lines = [f"data: {d['source']} {d['n']:,} x {d['dim']}, {d['queries']:,} queries, k={k}"
             + (f", {d['clusters']} clusters" if "clusters" in d else ""),
             f"threads: scann={res['threads']['scann']} blas={res['threads']['blas']} "
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
    lines.append(f"ScaNN vs exact: {res['speedup']:.1f}x queries/s at recall@{k} {s['recall']:.4f} "
                 f"(recall on {s['recall_queries']:,} queries; QPS median of {len(s['search_s_runs'])} runs)")
    if not f["available"]:
        lines.append(f"faiss: skipped: {f['reason']}")
    lines.append(f"peak RSS: {res['peak_rss_mb']:,.0f} MiB")
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
    g = p.add_argument_group("search")
    g.add_argument("--k", type=int, default=100)
    g.add_argument("--exact-queries", type=int, default=1000, metavar="M",
                   help="queries searched exactly (QPS + recall reference; default 1000)")
    g.add_argument("--num-leaves", type=int, help="ScaNN tree leaves (default: ScannParams.auto)")
    g.add_argument("--leaves-to-search", type=int)
    g.add_argument("--reorder", type=int, help="candidates re-scored exactly")
    g.add_argument("--training-sample-size", type=int)
    g.add_argument("--threads", type=int, help="threads for ScaNN and BLAS (default: all cores)")
    g.add_argument("--repeats", type=int, default=3, help="timed ScaNN runs; the median counts (default 3)")
    g.add_argument("--sweep-leaves", type=_int_list, default=[], metavar="L1,L2,...",
                   help="also measure these leaves_to_search values on the same index")
    g.add_argument("--sweep-reorder", type=_int_list, default=[], metavar="R1,R2,...",
                   help="also measure these reorder counts (crossed with --sweep-leaves)")
    g.add_argument("--no-faiss", action="store_true", help="skip faiss even if it is importable")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    g.add_argument("--output", metavar="FILE.json", help="also write the JSON result here (atomically)")


def run(args) -> int:
    from negjax.search.index import ScannParams

    for name in ("synthetic", "dim", "exact_queries", "repeats", "k"):
        if getattr(args, name) <= 0:
            raise NegjaxError(f"--{name.replace('_', '-')} must be positive")
    if args.queries < 0 or args.clusters < 0 or (args.threads is not None and args.threads <= 0):
        raise NegjaxError("--queries, --clusters and --threads must be positive")
    if args.query_embeddings and not args.embeddings:
        raise NegjaxError("--query-embeddings needs --embeddings")

    t_start = time.perf_counter()
    corpus, queries, data = load_data(args)
    n, dim = corpus.shape
    params = ScannParams.auto(n, dim, args.k)
    over = {"num_leaves": args.num_leaves, "leaves_to_search": args.leaves_to_search,
            "reorder": args.reorder, "training_sample_size": args.training_sample_size}
    params.override(**over)
    if args.num_leaves:
        params.brute_force = False
        if not params.leaves_to_search:
            params.leaves_to_search = max(1, math.ceil(0.01 * args.num_leaves))
    if params.num_leaves and not 0 < params.leaves_to_search <= params.num_leaves:
        raise NegjaxError(f"--leaves-to-search must be in 1..{params.num_leaves} (the number of leaves)")
    if params.num_leaves > n:
        raise NegjaxError(f"--num-leaves {params.num_leaves}: more leaves than vectors ({n})")

    res = {"bench": "mine", "data": data}
    res.update(bench(corpus, queries, args.k, params=params, exact_queries=args.exact_queries,
                     threads=args.threads, repeats=args.repeats, sweep_leaves=args.sweep_leaves,
                     sweep_reorder=args.sweep_reorder, run_faiss=not args.no_faiss))
    from importlib.metadata import version

    res["versions"] = {"scann": version("scann"), "numpy": np.__version__,
                       "python": platform.python_version()}
    res["host"] = {"machine": platform.machine(), "processor": platform.processor() or "?"}
    res["command"] = "negjax bench mine " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "mine"] else None
    res["total_s"] = time.perf_counter() - t_start
    text = json.dumps(res, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text if args.json else format_table(res))
    return 0
