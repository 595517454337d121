"""`negjax mine` on one process vs two (one host): peak RSS per process, identical rows.

    .venv/bin/python experiments/mining/mine_processes_rss.py --data DIR [--json out.json]

DIR holds corpus.jsonl and train.jsonl (`negjax bench data --synthetic 1000000` writes one
under `<negjax cache>/synthetic/`). A tiny model is trained for 2 steps on it (bench data's
config; the token stores are built then, in a private cache), then `negjax mine --index exact`
runs as 1 process and as 2 processes of one `jax.distributed` job on localhost (1 simulated
CPU device each), all with that cache. Reported: each process's peak RSS (wait4) and wall
time; the mined shards are compared row by row (exact search: the same rows for any number
of processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from negjax.bench.data import wait_peak_rss


def wait_all(procs: list, logs: list) -> list[dict]:
    out = []
    for p, log in zip(procs, logs):
        rss = wait_peak_rss(p)
        if p.returncode:
            raise RuntimeError(f"process failed:\n{log.read_text()[-3000:]}")
        out.append({"peak_rss_gib": round(rss / 2**30, 3)})
    return out


def mine(model: Path, data: Path, out: Path, processes: int, env: dict) -> dict:
    argv = [sys.executable, "-m", "negjax", "mine", "--model", str(model), "--corpus",
            str(data / "corpus.jsonl"), "--train", str(data / "train.jsonl"), "--out", str(out),
            "--index", "exact"]
    from negjax.multihost import free_port, local_env

    port = free_port()
    t0 = time.perf_counter()
    procs, logs = [], [out.parent / f"{out.name}-p{i}.log" for i in range(processes)]
    for i in range(processes):  # (the launch of multihost.start_local_job, output to files)
        job = {} if processes == 1 else {"NEGJAX_COORDINATOR": f"localhost:{port}",
                                         "NEGJAX_NUM_PROCESSES": processes, "NEGJAX_PROCESS_ID": i}
        procs.append(subprocess.Popen(argv, env=local_env(1, **env, **job),
                                      stdout=subprocess.DEVNULL, stderr=open(logs[i], "w")))
    per = wait_all(procs, logs)
    return {"processes": processes, "wall_s": round(time.perf_counter() - t0, 1), "per_process": per}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default="")
    args = p.parse_args()
    from negjax.bench.data import train_run
    from negjax.data.shards import read_table

    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory(prefix="negjax-mine-rss-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        train = train_run(data, cache, 2, tmp / "model")
        env = {"NEGJAX_CACHE": str(cache)}
        results = {"train": train, "runs": []}
        for n in (1, 2):
            r = mine(tmp / "model", data, tmp / f"mined{n}", n, env)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
        a, b = read_table(tmp / "mined1"), read_table(tmp / "mined2")
        same = a.select(["query_id", "negative_ids"]).equals(b.select(["query_id", "negative_ids"]))
        one = results["runs"][0]["per_process"][0]["peak_rss_gib"]
        worst = max(x["peak_rss_gib"] for x in results["runs"][1]["per_process"])
        results["summary"] = {"rows": a.num_rows, "identical_rows": bool(same),
                              "rss_2proc_max_over_1proc": round(worst / one, 3)}
        print(json.dumps(results["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
