"""`negjax bench data --synthetic N`: a corpus of N worded documents and training pairs, then
`negjax train` on it cold (token stores built) and warm (stores and compiled programs cached).

    negjax bench data --synthetic 1000000                      # JSONL, 200,000 pairs
    negjax bench data --synthetic 1000000 --format parquet --json out.json

The data (deterministic in --seed): document i joins 2-4 WordNet documents drawn at random
(~300 bytes); every 1/--pairs-ratio-th document gets a training query, the first words of its
text with a few dropped, whose positive it is. Written once under --out (default
`<negjax cache>/synthetic/N-FORMAT-SEED`), to a temporary name renamed when complete.

Measured through the command users run: each run is a child `negjax train` (tiny model,
--steps steps, batch 16, no evaluation) with its own token-store cache; the cold run starts
from an empty one, the warm run reuses it (and the compilation cache the cold run wrote).
Reported per run: wall seconds, peak RSS of the child process (`wait4`), time to first step
and its phases (from the run's own `first step` log line), and the cold run's build rate
(documents / s of its data phase).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHUNK = 65536  # documents generated and written at a time
_FIRST = re.compile(r"first step ([\d.]+) s after start \((.*?); first step: (.*)\)$")


def add_arguments(p) -> None:
    p.add_argument("--synthetic", type=int, required=True, metavar="N", help="documents")
    p.add_argument("--pairs-ratio", type=float, default=0.2, help="training pairs per document")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="dataset directory (default: under the negjax cache)")
    p.add_argument("--steps", type=int, default=2, help="training steps per run")
    p.add_argument("--runs", default="cold,warm", help="comma-separated: cold, warm")
    p.add_argument("--cache", default="", help="token-store and compilation cache directory, "
                   "kept afterwards (default: a temporary one, removed); a later --runs warm "
                   "with the same --cache measures another warm start")
    p.add_argument("--json", default="", help="also write the results here")


def write_synthetic(out: Path, n: int, *, pairs_ratio: float = 0.2, fmt: str = "jsonl",
                    seed: int = 0) -> dict:
    """corpus + train (JSONL or Parquet) in `out`, unless a complete one is there."""
    from negjax.data import wordnet
    from negjax.data.records import iter_jsonl

    done = out / "synthetic.json"
    if done.is_file():
        return json.loads(done.read_text())
    if n < 1 or not 0 < pairs_ratio <= 1:
        from negjax.errors import NegjaxError

        raise NegjaxError("--synthetic must be >= 1 and --pairs-ratio in (0, 1]")
    source = Path(wordnet.ensure_exported()) / "corpus.jsonl"
    words = [obj["text"] for _, obj in iter_jsonl(source)]
    every = max(1, round(1 / pairs_ratio))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    rng = np.random.default_rng(seed)
    writers = _Writers(tmp, fmt)
    pairs = 0
    try:
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            parts = rng.integers(2, 5, size=m)
            picks = rng.integers(0, len(words), size=int(parts.sum()))
            ends = np.cumsum(parts)
            docs, queries = [], []
            for i in range(m):
                text = " ".join(words[j] for j in picks[ends[i] - parts[i]:ends[i]])
                doc_id = f"d{start + i}"
                docs.append({"id": doc_id, "text": text})
                if (start + i) % every == 0:
                    tokens = text.split()[:12]
                    keep = [t for k, t in enumerate(tokens) if (k * 7 + start + i) % 5]
                    queries.append({"id": f"q{start + i}", "query": " ".join(keep or tokens),
                                    "pos": [doc_id]})
            writers.write(docs, queries)
            pairs += len(queries)
        writers.close()
        info = {"documents": n, "pairs": pairs, "format": fmt, "seed": seed,
                "bytes": sum(f.stat().st_size for f in tmp.iterdir())}
        (tmp / "synthetic.json").write_text(json.dumps(info))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        writers.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


class _Writers:
    def __init__(self, tmp: Path, fmt: str):
        self.tmp, self.fmt = tmp, fmt
        self.files = {}

    def write(self, docs: list, queries: list) -> None:
        for name, rows in (("corpus", docs), ("train", queries)):
            if self.fmt == "jsonl":
                f = self.files.get(name) or self.files.setdefault(
                    name, open(self.tmp / f"{name}.jsonl", "w", encoding="utf-8"))
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pylist(rows)
                if name not in self.files:
                    self.files[name] = pq.ParquetWriter(self.tmp / f"{name}.parquet", table.schema)
                self.files[name].write_table(table)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}


CONFIG = """
[model]
name = "tiny"
hidden_size = 32
num_layers = 1
num_heads = 2
intermediate_size = 64
query_max_len = 16
doc_max_len = 64

[data]
dataset = "{data}"
cache_dir = "{cache}"

[train]
steps = {steps}
batch_size = 16
eval_every = 0
"""


def wait_peak_rss(proc) -> int:
    """Wait for a child process (a `Popen`; sets its returncode) and return its peak RSS in
    bytes (`wait4`; read its pipes first)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def train_run(data: Path, cache: Path, steps: int, workdir: Path) -> dict:
    """One child `negjax train`: wall s, peak RSS bytes, time to first step and phases."""
    cfg = workdir.parent / f"{workdir.name}.toml"
    cfg.write_text(CONFIG.format(data=data, cache=cache, steps=steps))
    env = {**os.environ, "NEGJAX_CACHE": str(cache), "NEGJAX_PROGRESS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "negjax", "train", "--config", str(cfg),
                             "--workdir", str(workdir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    rss = wait_peak_rss(proc)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"negjax train failed ({proc.returncode}):\n{err[-3000:]}")
    out = {"wall_s": round(wall, 2), "peak_rss_bytes": rss}
    for line in err.splitlines():
        m = _FIRST.search(line)
        if m:
            out["first_step_s"] = float(m.group(1))
            out["phases_s"] = {k: float(v) for k, v in
                               (p.rsplit(" ", 2)[:2] for p in m.group(2).split(", "))}
            out["compile"] = m.group(3)
    if "first_step_s" not in out:
        raise RuntimeError(f"negjax train logged no first step (did it train?):\n{err[-3000:]}")
    return out


def run(args) -> int:
    from negjax.errors import NegjaxError
    from negjax.utils import default_cache_dir

    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not names or set(names) - {"cold", "warm"}:
        raise NegjaxError(f"--runs takes cold and warm, comma-separated (got {args.runs!r})")
    out = Path(args.out) if args.out else (
        default_cache_dir() / "synthetic" / f"{args.synthetic}-{args.format}-{args.seed}")
    t0 = time.perf_counter()
    info = write_synthetic(out, args.synthetic, pairs_ratio=args.pairs_ratio, fmt=args.format,
                           seed=args.seed)
    print(f"data: {info['documents']:,} documents, {info['pairs']:,} pairs, {args.format}, "
          f"{info['bytes'] / 1e6:,.0f} MB in {out} ({time.perf_counter() - t0:.0f} s)")
    results = {"data": {**info, "dir": str(out)}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="negjax-bench-data-") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        for i, name in enumerate(names):
            # Each run trains in a workdir of its own (a repeated name is another round: in
            # the same workdir it would find its steps done and train none); in the JSON the
            # second 'warm' is 'warm2', and so on.
            key = name if names[:i].count(name) == 0 else f"{name}{names[:i].count(name) + 1}"
            r = train_run(out, cache, args.steps, Path(tmp) / key)
            data_s = r.get("phases_s", {}).get("data")
            if name == "cold" and data_s:
                r["build_docs_per_s"] = round(info["documents"] / data_s)
            results["runs"][key] = r
            print(f"{key:>5}: first step {r['first_step_s']:.1f} s, "
                  f"wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
                  + (f", data phase {data_s:.1f} s" if data_s else "")
                  + (f" ({r['build_docs_per_s']:,} docs/s)" if "build_docs_per_s" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
