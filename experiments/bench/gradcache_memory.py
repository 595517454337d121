"""GradCache at equal memory: the largest global batch whose training step fits a memory
budget, plain vs GradCache, and the step time of both at each batch.

    /work/venv/bin/python experiments/bench/gradcache_memory.py            # MiniLM, 4 GiB
    ... --model tiny --budget-gib 2 --plain-batches 16,32,64 --gradcache-batches 64,256,1024

Every (mode, batch) runs `negjax bench step --json --no-breakdown` in its own child process
on one CPU device (no simulated devices); its peak RSS (VmHWM: the whole process, model,
compilation and the step included) is the memory it needs, compared with --budget-gib. Peak
RSS is measured, not enforced (XLA reserves far more virtual memory than it touches, so an
address-space limit would refuse runs that fit): choose the batch lists so that the largest
run still fits the machine. Step times come from --steps timed steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(args, batch: int, chunk: int) -> dict:
    cmd = [sys.executable, "-m", "negjax", "bench", "step", "--model", args.model,
           "--batch", str(batch), "--query-len", str(args.query_len), "--doc-len", str(args.doc_len),
           "--negatives", str(args.negatives), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--devices", "1", "--no-breakdown", "--json"]
    if chunk:
        cmd += ["--grad-cache", str(chunk)]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else \
            (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"batch": batch, "grad_cache": chunk, "error": why}
    r = json.loads(proc.stdout)
    return {"batch": batch, "grad_cache": chunk, "peak_rss_gib": r["peak_rss_bytes"] / 2**30,
            "step_s": r["step_time"]["median_s"], "examples_per_s": r["examples_per_s"],
            "compile_s": r["compile_s"], "final_loss": r["final_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--plain-batches", default="8,16,32,64")
    p.add_argument("--gradcache-batches", default="64,128,256,512")
    p.add_argument("--chunk", type=int, default=8, help="GradCache sub-batch (queries)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="", help="write the rows to this file")
    args = p.parse_args(argv)

    rows = []
    for mode, batches, chunk in (("plain", args.plain_batches, 0),
                                 ("gradcache", args.gradcache_batches, args.chunk)):
        for b in [int(x) for x in batches.split(",") if x.strip()]:
            r = dict(run_one(args, b, chunk), mode=mode)
            r["fits"] = "error" not in r and r["peak_rss_gib"] <= args.budget_gib
            rows.append(r)
            if "error" in r:
                print(f"{mode:<9} batch {b:>5}: {r['error']}", flush=True)
            else:
                print(f"{mode:<9} batch {b:>5}: peak RSS {r['peak_rss_gib']:6.2f} GiB "
                      f"({'fits' if r['fits'] else 'over'} {args.budget_gib:g} GiB), step "
                      f"{r['step_s']:7.2f} s, {r['examples_per_s']:6.2f} examples/s", flush=True)
    for mode in ("plain", "gradcache"):
        fit = [r["batch"] for r in rows if r["mode"] == mode and r["fits"]]
        print(f"largest {mode} batch within {args.budget_gib:g} GiB: {max(fit) if fit else 'none'}")
    plain = {r["batch"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        if r["mode"] == "gradcache" and r["batch"] in plain and "error" not in r:
            print(f"batch {r['batch']}: GradCache step {r['step_s'] / plain[r['batch']]['step_s']:.2f}x "
                  f"the plain step")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
