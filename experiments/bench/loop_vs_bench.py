"""`negjax train` against `negjax bench step` at the same shapes: does the real loop reach the
benchmark's speed and memory? Both are run as the commands users run, one after the other,
alternating, on the same machine.

    # speed: MiniLM, batch 64, query 32 / document 128 tokens, one hard negative
    python experiments/bench/loop_vs_bench.py speed --rounds 2 --out experiments/bench/loop_speed.json
    # memory: tiny model, GradCache 32 + chunked loss 1024, batch 8192 (and train alone at 32768)
    python experiments/bench/loop_vs_bench.py memory --batch 8192 --out experiments/bench/loop_memory.json

speed: the train run pads every batch to exactly the benchmark's lengths
(`data.length_buckets`), uses random corpus documents as its one negative per query, logs every
`--log-every` steps, and its examples/s is the mean over the windows after the first (which
holds compilation). The benchmark's is batch / median step time after `--warmup` steps.
memory: each command's peak RSS from `/usr/bin/time -v` (the whole process: model, optimizer,
compilation, data). Nothing is evaluated or re-mined; checkpointing is at the last step.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NEGJAX = [sys.executable, "-m", "negjax"]


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd` under /usr/bin/time -v; returns (result, peak RSS in bytes)."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return r, int(m.group(1)) * 1024


def bench_cmd(a, batch: int, steps: int, warmup: int, out: Path) -> list[str]:
    cmd = [*NEGJAX, "bench", "step", "--model", a.model, "--batch", str(batch),
           "--query-len", str(a.query_len), "--doc-len", str(a.doc_len), "--negatives",
           str(a.negatives), "--steps", str(steps), "--warmup", str(warmup), "--no-breakdown",
           "--out", str(out)]
    if a.grad_cache:
        cmd += ["--grad-cache", str(a.grad_cache)]
    if a.chunk:
        cmd += ["--set", f"loss.chunk_size={a.chunk}"]
    return cmd


def train_cmd(a, batch: int, steps: int, log_every: int, workdir: Path) -> list[str]:
    sets = {"model.name": f'"{a.model}"', "model.query_max_len": a.query_len,
            "model.doc_max_len": a.doc_len, "data.length_buckets": f"[{max(a.query_len, a.doc_len)}]",  # = no smaller bucket
            "data.num_negatives": a.negatives, "train.batch_size": batch, "train.steps": steps,
            "train.log_every": log_every, "train.grad_cache_chunk": a.grad_cache,
            "loss.chunk_size": a.chunk, "eval.split": '"none"', "checkpoint.every_steps": steps,
            "checkpoint.keep": 1, "train.warmup_steps": 0}
    cmd = [*NEGJAX, "train", "--config", str(REPO / "experiments/configs/tiny-wordnet.toml"),
           "--workdir", str(workdir)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def speed(a) -> dict:
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ("bench", "train") if r % 2 == 0 else ("train", "bench")
            row = {}
            for which in order:
                t0 = time.perf_counter()
                if which == "bench":
                    out = Path(tmp) / f"bench{r}.json"
                    timed(bench_cmd(a, a.batch, a.steps, a.warmup, out))
                    res = json.loads(out.read_text())
                    row["bench_examples_per_s"] = res["examples_per_s"]
                    row["bench_step_s"] = res["step_time"]["median_s"]
                else:
                    work = Path(tmp) / f"train{r}"
                    steps = a.log_every * (1 + a.windows)
                    timed(train_cmd(a, a.batch, steps, a.log_every, work))
                    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
                    kept = lines[1:]  # the first window holds compilation
                    n = sum(x["window_steps"] for x in kept)
                    step_s = sum(x["step_time"] * x["window_steps"] for x in kept) / n
                    row["train_examples_per_s"] = a.batch / step_s
                    row["train_step_s"] = step_s
                    row["train_windows"] = [(x["step"], x["window_steps"], x["step_time"]) for x in lines]
                row[f"{which}_wall_s"] = time.perf_counter() - t0
            row["ratio"] = row["train_examples_per_s"] / row["bench_examples_per_s"]
            print(f"round {r + 1}: train {row['train_examples_per_s']:.2f} vs bench "
                  f"{row['bench_examples_per_s']:.2f} examples/s = {row['ratio']:.3f}x", flush=True)
            rounds.append(row)
    tr = sorted(x["train_examples_per_s"] for x in rounds)
    be = sorted(x["bench_examples_per_s"] for x in rounds)
    med = lambda v: v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])  # noqa: E731
    return {"rounds": rounds, "train_examples_per_s": med(tr), "bench_examples_per_s": med(be),
            "ratio_of_medians": med(tr) / med(be)}


def memory(a) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("bench", "train"):
            if which == "bench":
                _, rss = timed(bench_cmd(a, a.batch, 1, 0, Path(tmp) / "b.json"))
            else:
                _, rss = timed(train_cmd(a, a.batch, a.steps, 1, Path(tmp) / "t"))
            out[f"{which}_peak_rss_bytes"] = rss
            print(f"{which} batch {a.batch}: peak RSS {rss / 2**30:.2f} GiB", flush=True)
        out["ratio"] = out["train_peak_rss_bytes"] / out["bench_peak_rss_bytes"]
        for big in a.train_batches:
            _, rss = timed(train_cmd(a, big, a.steps, 1, Path(tmp) / f"t{big}"))
            out[f"train_{big}_peak_rss_bytes"] = rss
            print(f"train batch {big}: peak RSS {rss / 2**30:.2f} GiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("speed", "memory"))
    ap.add_argument("--model", default=None, help="default: minilm (speed), tiny (memory)")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 (speed), 8192 (memory)")
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--doc-len", type=int, default=None, help="default: 128 (speed), 64 (memory)")
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--grad-cache", type=int, default=None, help="default: 0 (speed), 32 (memory)")
    ap.add_argument("--chunk", type=int, default=None, help="loss.chunk_size; default 0 / 1024")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="bench timed steps (speed, default 5); "
                    "train steps (memory, default 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--windows", type=int, default=1, help="timed train windows after the first")
    ap.add_argument("--train-batches", default="", help="memory: also train alone at these batches")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    mem = a.mode == "memory"
    a.model = a.model or ("tiny" if mem else "minilm")
    a.batch = a.batch or (8192 if mem else 64)
    a.doc_len = a.doc_len or (64 if mem else 128)
    a.grad_cache = (32 if mem else 0) if a.grad_cache is None else a.grad_cache
    a.chunk = (1024 if mem else 0) if a.chunk is None else a.chunk
    a.steps = a.steps or (2 if mem else 5)
    a.train_batches = [int(x) for x in a.train_batches.split(",") if x]
    res = {"args": vars(a), **(memory(a) if mem else speed(a))}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("rounds", "args")}))


if __name__ == "__main__":
    main()
