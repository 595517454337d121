"""Every encoder family, random-init ('tiny' with model.architecture), through the commands
users run on the built-in WordNet data: `negjax train` (50 steps) -> `negjax eval` ->
`negjax mine` -> `negjax encode`, with a query and a document prompt set. Records the
training loss at the start and end, dev MRR@10, mining counts and the wall time of each
command in families.json.

    python experiments/families/run_families.py --out /tmp/families [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("bert", "roberta", "xlm-roberta", "modernbert", "qwen3", "qwen2")


def run(args, log):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "negjax", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    log.write(f"$ negjax {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode:
        raise SystemExit(f"negjax {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--json", default=str(REPO / "experiments/families/families.json"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = out / "texts.jsonl"
    texts.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in
                             enumerate(["a domestic dog", "a large body of water",
                                        "the act of running quickly"])))
    rows = []
    with open(out / "log.txt", "w") as log:
        for fam in a.families.split(","):
            wd = out / fam
            sets = [f"workdir={wd}", f"model.architecture={fam}", f"train.steps={a.steps}",
                    "train.warmup_steps=5", "train.log_every=5", "eval.max_queries=1000",
                    f"checkpoint.every_steps={a.steps}", "model.query_prompt=query: ",
                    "model.doc_prompt=passage: "]
            row = {"family": fam}
            _, row["train_s"] = run(["train", "--config", "experiments/configs/tiny-wordnet.toml",
                                     *sum((["--set", s] for s in sets), [])], log)
            metrics = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
            row["loss_first"], row["loss_last"] = metrics[0]["loss"], metrics[-1]["loss"]
            times = sorted(m["step_time"] for m in metrics[1:])  # the first window compiles
            row["step_time_median_s"] = times[len(times) // 2]
            ev, row["eval_s"] = run(["eval", "--model", wd, "--split", "dev", "--max-queries",
                                     1000, "--json"], log)
            row["dev_mrr@10"] = json.loads(ev)["mrr@10"]
            _, row["mine_s"] = run(["mine", "--model", wd, "--out", wd / "mined", "--index",
                                    "scann", "--negatives-kept", 8], log)
            manifest = json.loads((wd / "mined" / "manifest.json").read_text())
            row["mined_rows"] = manifest.get("num_rows", manifest.get("rows"))
            _, row["encode_s"] = run(["encode", "--model", wd, "--input", texts, "--output",
                                      wd / "texts.npy", "--tower", "query"], log)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.json).write_text(json.dumps({"steps": a.steps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
