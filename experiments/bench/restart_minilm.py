"""Preemption restart through `negjax train`: MiniLM on 8 simulated devices, kill -9 mid-run,
rerun; time to first step cold vs restarted, and the final weights against an uninterrupted run.

    .venv/bin/python experiments/bench/restart_minilm.py [--steps 12] [--kill-after 7] [--json out.json]

Three child processes of `negjax train` on the built-in data (all-MiniLM-L6-v2, the packaged
weights; `XLA_FLAGS=--xla_force_host_platform_device_count=8`; a checkpoint every 4 steps,
synchronous):

1. `cold (killed)`: nothing cached (an empty token-store cache and an empty compilation cache
   C: it tokenises and compiles), SIGKILLed by `tests/faults.py` once step `--kill-after` is
   done;
2. `rerun`: the same command and workdir, with both caches: restores the last checkpoint and
   loads the compiled step from C;
3. `ref`: uninterrupted, in another workdir with its own empty compilation cache (the token
   stores cached): what a cold start costs when only the compiled programs are missing.

Reported: each run's "first step N s after start (phases; first step: compile ...)" line, the
rerun's time to first step over the cold run's and over `ref`'s, and whether every parameter
of the rerun's final checkpoint equals `ref`'s bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_FIRST = re.compile(r"first step ([\d.]+) s after start \((.*?); first step: (.*)\)$")

CONFIG = """
[model]
name = "minilm"
query_max_len = 32
doc_max_len = 64

[data]
dataset = "wordnet"
cache_dir = "{cache}"

[train]
steps = {steps}
batch_size = 32
learning_rate = 2e-5
warmup_steps = 2
seed = 0
eval_every = 0

[checkpoint]
every_steps = 4
keep = 2
async_save = false

[eval]
split = "none"
"""


def train(cfg: Path, workdir: Path, jit_cache: Path, kill_after: int = 0) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "NEGJAX_COMPILE_CACHE": str(jit_cache), "NEGJAX_PROGRESS": "0"}
    head = [sys.executable, str(REPO / "tests" / "faults.py"), f"step:{kill_after}"] if kill_after \
        else [sys.executable, "-m", "negjax"]
    run = subprocess.run([*head, "train", "--config", str(cfg), "--workdir", str(workdir)],
                         env=env, cwd=REPO, capture_output=True, text=True)
    if run.returncode != (-9 if kill_after else 0):
        raise RuntimeError(f"negjax train ended with {run.returncode}:\n{run.stderr[-3000:]}")
    line = next((x for x in run.stderr.splitlines() if _FIRST.search(x)), None)
    if line is None:
        raise RuntimeError(f"no first-step line:\n{run.stderr[-3000:]}")
    m = _FIRST.search(line)
    return {"first_step_s": float(m.group(1)), "phases": m.group(2), "compile": m.group(3),
            "returncode": run.returncode}


def final_params(workdir: Path):
    import jax
    import numpy as np

    from negjax.model.loader import load_model

    _, params, info = load_model(workdir)
    return info["step"], [np.asarray(x) for x in jax.tree.leaves(params)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kill-after", type=int, default=7)
    p.add_argument("--json", default="")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="negjax-restart-") as tmp:
        tmp = Path(tmp)
        cfg = tmp / "minilm.toml"
        cfg.write_text(CONFIG.format(cache=tmp / "tokens", steps=args.steps))
        runs = {}
        runs["cold (killed)"] = train(cfg, tmp / "run", tmp / "jit", kill_after=args.kill_after)
        print("cold (killed)", json.dumps(runs["cold (killed)"]), flush=True)
        runs["rerun"] = train(cfg, tmp / "run", tmp / "jit")
        print("rerun", json.dumps(runs["rerun"]), flush=True)
        runs["ref"] = train(cfg, tmp / "ref", tmp / "jit-ref")
        print("ref", json.dumps(runs["ref"]), flush=True)
        (sa, a), (sb, b) = final_params(tmp / "ref"), final_params(tmp / "run")
        same = sa == sb == args.steps and len(a) == len(b) and all(
            x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))
        first = {k: v["first_step_s"] for k, v in runs.items()}
        summary = {"rerun_over_cold": round(first["rerun"] / first["cold (killed)"], 3),
                   "rerun_over_ref": round(first["rerun"] / first["ref"], 3),
                   "final_step": [sa, sb], "weights_bit_identical": bool(same),
                   "parameters": len(a)}
        print(json.dumps(summary))
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
