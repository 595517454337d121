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
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from negjax.bench.mine_worker import bench_log, blas_limit, peak_rss_mb, recall
from negjax.bench.vectors import GEN_CHUNK, prepare_data
from negjax.errors import NegjaxError
from negjax.multihost import start_local_job
from negjax.utils import atomic_write_text


def _relay(stream, sink) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()


def launch_workers(cfg: dict, workdir: Path) -> list[dict]:
    """Start the `cfg['processes']` workers, relay their output to stderr, wait for all ->
    their reports. One failing stops the others, and its message becomes a NegjaxError."""
    pc = cfg["processes"]
    (workdir / "config.json").write_text(json.dumps(cfg))
    procs, relays = [], []
    try:
        procs = start_local_job(lambda pi: ["-m", "negjax.bench.mine_worker", workdir, pi], pc)
        for p in procs:
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
    bench_log(f"{pc} process(es), shards {', '.join(f'[{lo:,}, {hi:,})' for lo, hi in bounds)}, "
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
    blas_note = blas_limit(threads)[1]
    res: dict = {"k": k, "processes": pc,
                 "threads": {"cpu_count": os.cpu_count(), "per_process": threads, "blas": blas_note,
                             "scann": threads}}
    exact_s = max(r["exact_s"] for r in reports)
    res["exact"] = {"queries": m, "search_s": exact_s, "qps": m / exact_s,
                    "recall": recall(exact_ids, exact_ids)}
    slow = max(busy, key=lambda r: r["search_s"])
    res["scann"] = {"params": params[first], "build_s": max(r["build_s"] for r in busy),
                    "queries": q, "search_s": slow["search_s"], "search_s_runs": slow["search_s_runs"],
                    "qps": q / slow["search_s"], "recall": recall(scann_ids, exact_ids),
                    "recall_at_100": (recall(scann_ids[:, :100], exact_ids[:, :100])
                                      if k >= 100 else None),
                    "recall_queries": m}
    res["speedup"] = res["scann"]["qps"] / res["exact"]["qps"]
    res["sweep"] = []
    for j, (lv, ro) in enumerate(grids[first]):
        s_ids = merged(f"sweep{j}", q)
        s_time = max(r["sweep"][j]["search_s"] for r in busy)
        res["sweep"].append({"leaves_to_search": lv, "reorder": max(ro, k), "qps": q / s_time,
                             "recall": recall(s_ids, exact_ids),
                             "recall_at_100": (recall(s_ids[:, :100], exact_ids[:, :100])
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
    res["launcher_peak_rss_mb"] = peak_rss_mb()
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
    g.add_argument("--shard-chunk", type=int, default=GEN_CHUNK, metavar="ROWS",
                   help=f"shard boundaries fall on multiples of this (default {GEN_CHUNK}, the "
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


