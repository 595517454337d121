"""Sharded mining on the built-in WordNet data with MiniLM: 1, 2 and 4 processes (exact search)
write the same rows; float16 document embeddings against float32 (overlap, disk, memory).

    python experiments/mining/sharded_wordnet.py --docs 30000 --queries 8000 \
        --out experiments/mining/sharded_wordnet.json

Every run is the real CLI (`python -m negjax mine`), each process under `/usr/bin/time -v` for
its peak RSS; the P-process runs are one `jax.distributed` job on localhost, 1 CPU device per
process. Encoding is done once (the 1-process run); the other runs start from a copy of its
embedding cache (the per-device encode batch is the same in every layout, so the embeddings
are the ones they would compute; the float16 run converts the float32 chunks), so what they
measure is the sharded search, the merge and the writing ("f32" is the 1-process run again
from the cache: the memory figure to compare "f16" with).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from negjax.multihost import free_port  # noqa: E402  (the repository on sys.path first)


def subset(out: Path, n_docs: int, n_queries: int) -> tuple[Path, Path]:
    """The first `n_docs` documents of the built-in corpus and the first `n_queries` training
    queries whose positives are all among them."""
    from negjax.config import DataConfig
    from negjax.data.layout import resolve_dataset

    paths = resolve_dataset(DataConfig())
    out.mkdir(parents=True, exist_ok=True)
    ids = set()
    with open(paths["corpus"]) as src, open(out / "corpus.jsonl", "w") as dst:
        for i, line in enumerate(src):
            if i == n_docs:
                break
            ids.add(json.loads(line)["id"])
            dst.write(line)
    kept = 0
    with open(paths["train"]) as src, open(out / "train.jsonl", "w") as dst:
        for line in src:
            if kept == n_queries:
                break
            if all(p in ids for p in json.loads(line)["pos"]):
                dst.write(line)
                kept += 1
    return out / "corpus.jsonl", out / "train.jsonl"


def _peak_mib(text: str) -> float:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def mine(data: tuple[Path, Path], out: Path, processes: int, *extra: str) -> dict:
    """One `negjax mine` job of `processes` processes; returns wall time and peak RSS each."""
    corpus, train = data
    env = dict(os.environ, JAX_PLATFORMS="cpu", NEGJAX_PROGRESS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port = free_port()
    base = ["/usr/bin/time", "-v", sys.executable, "-m", "negjax", "mine", "--model", "minilm",
            "--corpus", str(corpus), "--train", str(train), "--out", str(out), "--index", "exact",
            "--encode-batch-size", str(256 * processes), *extra]
    cmds = [base + (["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                     "--process-id", str(i)] if processes > 1 else []) for i in range(processes)]
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t
    for i, (p, text) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise SystemExit(f"process {i} of {out} failed:\n{text[-4000:]}")
    return {"processes": processes, "wall_s": round(wall, 1),
            "peak_rss_mib": [round(_peak_mib(t), 1) for t in outs],
            "command": " ".join(base[2:])}


def rows(out: Path) -> dict:
    from negjax.data import shards

    return {r["query_id"]: r for r in shards.read_table(out).to_pylist()}


def compare_exact(a: dict, b: dict) -> dict:
    """Same query ids, same negative ids in the same order, scores within 1e-6?"""
    import numpy as np

    same_ids = a.keys() == b.keys() and all(
        a[q]["negative_ids"] == b[q]["negative_ids"] and a[q]["positive_ids"] == b[q]["positive_ids"]
        for q in a)
    diff = max((float(np.max(np.abs(np.subtract(a[q]["negative_scores"], b[q]["negative_scores"]))))
                for q in a if a[q]["negative_scores"] and q in b
                and len(a[q]["negative_scores"]) == len(b[q]["negative_scores"])), default=0.0)
    return {"same_ids": bool(same_ids), "max_abs_score_diff": diff}


def overlap(a: dict, b: dict) -> float:
    """Fraction of run a's (query, negative) pairs that run b also wrote."""
    hit = sum(len(set(a[q]["negative_ids"]) & set(b[q]["negative_ids"])) for q in a)
    return hit / max(1, sum(len(a[q]["negative_ids"]) for q in a))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=30000)
    ap.add_argument("--queries", type=int, default=8000)
    ap.add_argument("--work", default="/tmp/negjax_sharded_wordnet")
    ap.add_argument("--out", default=str(REPO / "experiments/mining/sharded_wordnet.json"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = subset(work / "data", args.docs, args.queries)
    runs = {"p1": mine(data, work / "p1", 1)}
    emb = work / "p1" / ".work" / "emb"
    for name, procs, extra in (("p2", 2, ()), ("p4", 4, ()), ("f32", 1, ()),
                               ("f16", 1, ("--embedding-dtype", "float16"))):
        shutil.copytree(emb, work / name / ".work" / "emb")
        runs[name] = mine(data, work / name, procs, *extra)
    ref = rows(work / "p1")
    res = {"data": {"docs": args.docs, "queries": len(ref), "source": "built-in WordNet, first "
                    "docs and the training queries whose positives are among them"},
           "model": "minilm (fp32 encode, max length: model.doc_max_len / query_max_len)",
           "runs": runs,
           "p2_vs_p1": compare_exact(ref, rows(work / "p2")),
           "p4_vs_p1": compare_exact(ref, rows(work / "p4")),
           "f16_overlap_with_f32": overlap(ref, rows(work / "f16"))}
    disk = {}
    for name in ("p1", "f16"):
        doc_dirs = [d for d in (work / name / ".work" / "emb").glob("doc-*")
                    if any(d.glob("chunk-*.npy"))]
        m = json.loads((work / name / "manifest.json").read_text())
        disk[name] = m["index"]["bytes_on_disk"]
        res.setdefault("doc_dirs", {})[name] = [d.name for d in doc_dirs]
    res["doc_embedding_bytes"] = {"float32": disk["p1"], "float16": disk["f16"]}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
