"""Issue-18 ablations (batch size, mining strategy, Matryoshka, false-negative guard,
distillation) with all-MiniLM-L6-v2 on the built-in WordNet data, as a graph of the negjax
commands users run (`negjax mine`, `negjax train`, `negjax eval`), several at a time on one
accelerator.

    python experiments/quality/ablate.py --model MINILM_DIR --eval-dir EVALSET --work W \
        --results R [--parallel 8] [--deadline 480] [--only ROW,...]

Recipe "G" (every MiniLM row unless named otherwise): experiments/configs/minilm-wordnet.toml
with global batch 128 x 338 steps (one epoch of the 43,256 training queries), linear warm-up
10% then decay, lr 2e-5, temperature 0.05, fp32, from the zero-shot all-MiniLM-L6-v2.
Batch-size rows keep the examples seen (one epoch) and the learning rate: steps = 43,256 / B.
Each row is evaluated on the fixed reduced eval set (make_eval_set.py) with `negjax eval`;
`R/ROW.json` holds its metrics (one line per size for Matryoshka rows), `R/runs/ROW.trec`
its top-10 rankings (enough for MRR@10 / R@10 and the paired bootstrap of paired.py),
`R/metrics/ROW.jsonl` its training metrics. Rows run as soon as what they need exists
(mined negatives, the in-batch model for re-mining and the teacher); none starts after
--deadline seconds, and --bundle re-packs R into one .tar.gz after every finished row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "experiments/configs/minilm-wordnet.toml"
TINY = REPO / "experiments/configs/tiny-wordnet.toml"
EPOCH = 43256


def build_rows(a) -> list[dict]:
    """Rows in launch-priority order: name, needs (rows), cmds (argv lists), eval options."""
    py = [sys.executable, "-m", "negjax"]
    W = Path(a.work)

    def train(name, steps=338, batch=128, cfg=MINI, sets=(), model=a.model):
        steps, batch = min(steps, a.max_steps), min(batch, a.max_batch)  # --max-*: a smoke test
        s = ["workdir=" + str(W / name), f"train.steps={steps}", f"train.batch_size={batch}",
             f"train.warmup_steps={max(1, steps // 10)}", f"checkpoint.every_steps={steps}",
             "eval.split=none", *sets]
        if model:
            s.append("model.name=" + str(model))
        return py + ["train", "--config", str(cfg)] + sum((["--set", x] for x in s), [])

    def mine(out, model, *opts):
        return py + ["mine", "--config", str(MINI), "--model", str(model), "--index", "exact",
                     "--out", str(W / out), "--target-recall", "0", *map(str, opts)]

    DIMS = a.dims
    mrl = f"loss.matryoshka_dims=[{DIMS.replace(',', ', ')}]"
    rows = []

    def row(name, cmds, needs=(), dims=None, evaluate=True, model_path=None):
        rows.append(dict(name=name, cmds=cmds, needs=list(needs), dims=dims,
                         evaluate=evaluate, model_path=model_path or str(W / name)))

    neg = lambda d, h=1: [f"data.negatives={W / d}", f"data.num_negatives={h}"]  # noqa: E731
    seed1 = ["train.seed=1"]
    # mining (zero-shot MiniLM; the positive-aware margin as negjax mine's --relative-margin)
    row("mine_topk", [mine("neg_topk", a.model, "--sampling", "top", "--no-dedup-text")], evaluate=False)
    row("mine_margin", [mine("neg_margin", a.model, "--relative-margin", "0.05")], evaluate=False)
    row("zeroshot", [], evaluate=True, model_path=a.model)
    row("inbatch_s0", [train("inbatch_s0")], dims=DIMS)
    row("mine_window", [mine("neg_window", a.model, "--rank-range", "10:50", "--sampling", "random",
                             "--no-dedup-text")], evaluate=False)
    row("margin_s0", [train("margin_s0", sets=neg("neg_margin"))], needs=["mine_margin"])
    row("topk_s0", [train("topk_s0", sets=neg("neg_topk"))], needs=["mine_topk"])
    row("inbatch_s1", [train("inbatch_s1", sets=seed1)], dims=DIMS)
    row("mine_remined", [mine("neg_remined", W / "inbatch_s0", "--relative-margin", "0.05")],
        needs=["inbatch_s0"], evaluate=False)
    row("window_s0", [train("window_s0", sets=neg("neg_window"))], needs=["mine_window"])
    row("h3_s0", [train("h3_s0", sets=neg("neg_margin", 3))], needs=["mine_margin"])
    row("h7_s0", [train("h7_s0", sets=neg("neg_margin", 7))], needs=["mine_margin"])
    row("remined_s0", [train("remined_s0", sets=neg("neg_remined"))], needs=["mine_remined"])
    row("teacher", [[sys.executable, str(REPO / "experiments/quality/teacher_scores.py"),
                     "--teacher", str(W / "inbatch_s0"), "--negatives", str(W / "neg_remined"),
                     "--out", str(W / "teacher_train.jsonl"), "--max-negatives", "7"]],
        needs=["mine_remined"], evaluate=False)
    # batch size at equal examples seen (one epoch), same learning rate; B = 128 is inbatch_s0
    for b in (32, 512, 2048, 4096, 64, 256, 1024):
        row(f"batch{b}", [train(f"batch{b}", steps=round(EPOCH / b), batch=b)])
    row("mix0_s0", [train("mix0_s0", sets=neg("neg_margin") + ["data.negative_mix=0.0"])], needs=["mine_margin"])
    row("mix05_s0", [train("mix05_s0", sets=neg("neg_margin") + ["data.negative_mix=0.5"])], needs=["mine_margin"])
    row("curric_s0", [train("curric_s0", sets=neg("neg_margin") + [
        "data.curriculum_start_rank=16", "data.curriculum_steps=270"])], needs=["mine_margin"])
    # Matryoshka and single-size training at 256 / 128 / 64 (same budget)
    row("mrl_s0", [train("mrl_s0", sets=[mrl])], dims=DIMS)
    for k in map(int, DIMS.split(",")[1:]):
        row(f"single{k}", [train(f"single{k}", sets=[f"loss.matryoshka_dims=[{k}]"])], dims=str(k))
    # false-negative guard
    row("guard_s0", [train("guard_s0", sets=["loss.false_negative_margin=0.1"])])
    # distillation: the teacher (the fine-tuned in-batch MiniLM) scores the candidates it
    # mined itself (re-mined, margin-filtered); students train on the same file and
    # negatives, with and without the KL term
    tfile = f"data.train={W / 'teacher_train.jsonl'}"
    kl = ["loss.distill=kl", "loss.distill_weight=1.0", "loss.teacher_temperature=0.05"]
    row("tiny_file_s0", [train("tiny_file_s0", steps=300, cfg=TINY, model=None,
                               sets=[tfile, "data.num_negatives=3"])], needs=["teacher"])
    row("tiny_distill_s0", [train("tiny_distill_s0", steps=300, cfg=TINY, model=None,
                                  sets=[tfile, "data.num_negatives=3", *kl])], needs=["teacher"])
    row("mini_file_s0", [train("mini_file_s0", sets=[tfile, "data.num_negatives=3"])], needs=["teacher"])
    row("mini_distill_s0", [train("mini_distill_s0", sets=[tfile, "data.num_negatives=3", *kl])],
        needs=["teacher"])
    # second seeds
    row("guard_s1", [train("guard_s1", sets=["loss.false_negative_margin=0.1", *seed1])])
    row("mrl_s1", [train("mrl_s1", sets=[mrl, *seed1])], dims=DIMS)
    row("tiny_file_s1", [train("tiny_file_s1", steps=300, cfg=TINY, model=None,
                               sets=[tfile, "data.num_negatives=3", *seed1])], needs=["teacher"])
    row("tiny_distill_s1", [train("tiny_distill_s1", steps=300, cfg=TINY, model=None,
                                  sets=[tfile, "data.num_negatives=3", *kl, *seed1])], needs=["teacher"])
    for r in ("margin", "h3", "h7", "remined", "window", "topk", "mix05", "curric", "mix0"):
        src = next(x for x in rows if x["name"] == f"{r}_s0")
        cmd = list(src["cmds"][0])
        cmd[cmd.index("workdir=" + str(W / f"{r}_s0"))] = "workdir=" + str(W / f"{r}_s1")
        row(f"{r}_s1", [cmd + ["--set", "train.seed=1"]], needs=src["needs"])
    row("mini_file_s1", [train("mini_file_s1", sets=[tfile, "data.num_negatives=3", *seed1])], needs=["teacher"])
    row("mini_distill_s1", [train("mini_distill_s1", sets=[tfile, "data.num_negatives=3", *kl, *seed1])],
        needs=["teacher"])
    for b in (32, 512, 4096, 64, 256, 1024, 2048):
        row(f"batch{b}_s1", [train(f"batch{b}_s1", steps=round(EPOCH / b), batch=b, sets=seed1)])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="all-MiniLM-L6-v2 directory (or 'minilm')")
    ap.add_argument("--eval-dir", required=True, help="make_eval_set.py output")
    ap.add_argument("--work", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=1e9, help="start no row after this many s")
    ap.add_argument("--kill-after", type=float, default=1e9, help="stop running rows after this many s")
    ap.add_argument("--bundle", help="re-pack --results into this .tar.gz after every row")
    ap.add_argument("--dims", default="384,256,128,64", help="Matryoshka sizes (the first: full)")
    ap.add_argument("--max-steps", type=int, default=10**9, help="cap every row's steps (smoke test)")
    ap.add_argument("--max-batch", type=int, default=10**9, help="cap every row's batch (smoke test)")
    ap.add_argument("--only", help="comma-separated rows (their needs are not added)")
    a = ap.parse_args(argv)
    t0 = time.time()
    W, R = Path(a.work), Path(a.results)
    for d in (W, R / "runs", R / "metrics", R / "logs", R / "mining"):
        d.mkdir(parents=True, exist_ok=True)
    rows = build_rows(a)
    if a.only:
        keep = set(a.only.split(","))
        rows = [r for r in rows if r["name"] in keep]
        for r in rows:
            r["needs"] = [n for n in r["needs"] if n in keep]
    status = {r["name"]: "waiting" for r in rows}
    lock = threading.Lock()
    procs: dict[str, subprocess.Popen] = {}

    def bundle():
        if not a.bundle:
            return
        tmp = a.bundle + ".part"
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(R, arcname="results")
        os.replace(tmp, a.bundle)

    def run_row(r):
        name, log = r["name"], R / "logs" / f"{r['name']}.log"
        ok = True
        with open(log, "w") as f:
            for cmd in r["cmds"]:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                t = time.time()
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
                with lock:
                    procs[name] = p
                rc = p.wait()
                f.write(f"# rc {rc} in {time.time() - t:.1f} s\n")
                if rc != 0:
                    ok = False
                    break
            if ok and r["evaluate"]:
                cmd = [sys.executable, "-m", "negjax", "eval", "--model", r["model_path"],
                       "--corpus", str(Path(a.eval_dir) / "corpus.jsonl"),
                       "--queries", str(Path(a.eval_dir) / "queries.jsonl"),
                       "--qrels", str(Path(a.eval_dir) / "qrels.tsv"), "--doc-max-length", "64",
                       "--query-max-length", "32", "--json", "--save-run", str(W / f"{name}.trec")]
                if r["dims"]:
                    cmd += ["--dim", r["dims"]]
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                t = time.time()
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
                f.write(f"# rc {p.returncode} in {time.time() - t:.1f} s\n")
                ok = p.returncode == 0
                if ok:
                    (R / f"{name}.json").write_text(p.stdout)
                    runs = sorted(W.glob(f"{name}.trec*"))
                    for src in runs:  # top 10 per query: MRR@10, R@10 and paired.py
                        with open(src) as fi, open(R / "runs" / src.name.replace(".trec", "") , "w") as fo:
                            fo.writelines(x for x in fi if int(x.split()[3]) <= 10)
        metrics = W / name / "metrics.jsonl"
        if metrics.is_file():
            shutil.copy(metrics, R / "metrics" / f"{name}.jsonl")
        for rep in W.glob(f"neg_{name.removeprefix('mine_')}/report.json"):
            shutil.copy(rep, R / "mining" / f"{name}.json")
        if name == "teacher" and ok:
            (R / "teacher.txt").write_text(log.read_text()[-2000:])
        with lock:
            status[name] = "done" if ok else "failed"
            procs.pop(name, None)
            (R / "status.json").write_text(json.dumps(
                {"elapsed_s": round(time.time() - t0, 1), "status": status}, indent=1))
            bundle()
        print(f"[{time.time() - t0:6.1f} s] {name}: {status[name]}", flush=True)

    threads = []
    while True:
        with lock:
            running = [n for n, s in status.items() if s == "running"]
            waiting = [r for r in rows if status[r["name"]] == "waiting"]
            if not waiting and not running:
                break
            for r in waiting:
                if any(status.get(n) == "failed" or status.get(n) == "skipped" for n in r["needs"]):
                    status[r["name"]] = "skipped"
            late = time.time() - t0 > a.deadline
            if late:
                for r in waiting:
                    if status[r["name"]] == "waiting":
                        status[r["name"]] = "not started (deadline)"
            ready = [r for r in rows if status[r["name"]] == "waiting"
                     and all(status.get(n) == "done" for n in r["needs"])]
            free = a.parallel - len(running)
            for r in ready[:max(0, free)]:
                status[r["name"]] = "running"
                th = threading.Thread(target=run_row, args=(r,), daemon=True)
                th.start()
                threads.append(th)
            if time.time() - t0 > a.kill_after:
                for p in procs.values():
                    p.kill()
        time.sleep(1)
    for th in threads:
        th.join()
    (R / "status.json").write_text(json.dumps({"elapsed_s": round(time.time() - t0, 1),
                                               "status": status}, indent=1))
    bundle()
    print(json.dumps(status, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
