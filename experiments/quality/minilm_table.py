"""Tables of the all-MiniLM-L6-v2 Matryoshka and false-negative-guard rows
(minilm_mrl_guard.sh): MRR@10 / R@10 per row and size, paired bootstrap intervals
(paired.py) against the right baseline, and the guard's masked columns per step from the
runs' metrics (copied next to the results as NAME.metrics.jsonl).

    python experiments/quality/minilm_table.py [--res experiments/quality/results/minilm] [--exp /tmp/exp]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (384, 256, 128, 64)
BATCH = 32  # queries per step in experiments/configs/minilm-wordnet.toml


def main():
    sys.path.insert(0, str(HERE))
    from tiny_table import paired

    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=Path, default=HERE / "results" / "minilm")
    ap.add_argument("--exp", type=Path, default=Path("/tmp/exp"))
    a = ap.parse_args()
    qrels = a.exp / "evalset" / "qrels.tsv"
    runs = a.res / "runs"
    missing: set[str] = set()

    def metric(name, k):
        path = a.res / f"{name}.d{k}.json"
        if not path.is_file():
            return None
        r = json.loads(path.read_text())
        return r["mrr@10"], r["recall@10"]

    def cell(name, k):
        m = metric(name, k)
        return "not run" if m is None else f"{m[0]:.4f} / {m[1]:.4f}"

    def ci(base, other, k, m="mrr@10"):
        ra, rb = runs / f"{base}.trec.d{k}", runs / f"{other}.trec.d{k}"
        if metric(base, k) is None or metric(other, k) is None:
            return "not run"
        if not (ra.is_file() and rb.is_file()):
            missing.add(f"rankings in {runs} (git-ignored: rerun the rows with minilm_mrl_guard.sh)")
            return "no rankings"
        if not qrels.is_file():
            missing.add(f"{qrels} (make_eval_set.py --out {a.exp / 'evalset'} --queries 1000 "
                        "--corpus-size 10000 --seed 0)")
            return "no qrels"
        p = paired(qrels, ra, rb)[m]
        return f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"

    print("## Matryoshka, all-MiniLM-L6-v2 (MRR@10 / R@10; CI: paired bootstrap of MRR@10, "
          "row - base at the same size)\n")
    print("| size | plain s0 (truncated) | plain s1 | MRL s0 | MRL s1 | single-size | "
          "MRL s0 - plain s0 | MRL s1 - plain s1 | MRL s0 - single |")
    print("|---:|---|---|---|---|---|---|---|---|")
    for k in SIZES:
        single = "single" if k != 384 else "plain_s0"
        cells = [cell(n, k) for n in ("plain_s0", "plain_s1", "mrl_s0", "mrl_s1")]
        cells.append(cell(single, k) + (" (= plain s0)" if k == 384 else ""))
        cells.append(ci("plain_s0", "mrl_s0", k))
        cells.append(ci("plain_s1", "mrl_s1", k))
        cells.append(ci(single, "mrl_s0", k) if k != 384 else "-")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\nseed noise at 384: plain s1 - plain s0 {ci('plain_s0', 'plain_s1', 384)}; "
          f"MRL s1 - MRL s0 {ci('mrl_s0', 'mrl_s1', 384)}")

    print("\n## False-negative guard, all-MiniLM-L6-v2 (loss.false_negative_margin = 0.1)\n")
    print("| negatives | seed | without guard MRR@10 | guard MRR@10 | guard - without [95% CI] | "
          "masked per step (mean; first / last 10-step window) | negative pairs per step |")
    print("|---|---:|---:|---:|---|---|---:|")
    rows = (("in-batch", 0, "plain_s0", "guard_s0", BATCH * (BATCH - 1)),
            ("in-batch", 1, "plain_s1", "guard_s1", BATCH * (BATCH - 1)),
            ("in-batch + H=1 top-k", 0, "topk", "topk_guard", BATCH * (2 * BATCH - 1)),
            ("in-batch + H=1 top-k", 1, "topk_s1", "topk_guard_s1", BATCH * (2 * BATCH - 1)),
            ("in-batch + H=1 re-mined margin", 0, "remine", "remine_guard", BATCH * (2 * BATCH - 1)),
            ("in-batch + H=1 re-mined margin", 1, "remine_s1", "remine_guard_s1",
             BATCH * (2 * BATCH - 1)))
    for label, s, base, guard, pairs in rows:
        path = a.res / f"{guard}.metrics.jsonl"
        g, p = metric(guard, 384), metric(base, 384)
        if not path.is_file() or g is None or p is None:
            print(f"| {label} | {s} | not run | | | | |")
            continue
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        masked = [x["false_negatives_masked"] for x in lines if "false_negatives_masked" in x]
        mean = sum(masked) / len(masked)
        print(f"| {label} | {s} | {p[0]:.4f} | {g[0]:.4f} | {ci(base, guard, 384)} | "
              f"{mean:.1f} ({masked[0]:.1f} / {masked[-1]:.1f}) | {pairs} |")
    print(f"\ntop-k vs in-batch only, seed 0: {ci('plain_s0', 'topk', 384)}; "
          f"top-k + guard vs in-batch only: {ci('plain_s0', 'topk_guard', 384)}")
    for s, (p, r, g) in enumerate((("plain_s0", "remine", "remine_guard"),
                                   ("plain_s1", "remine_s1", "remine_guard_s1"))):
        print(f"re-mined margin vs in-batch only, seed {s}: {ci(p, r, 384)}; "
              f"re-mined margin + guard vs in-batch only: {ci(p, g, 384)}")
    for m in sorted(missing):
        print(f"\nintervals need {m}", file=sys.stderr)


if __name__ == "__main__":
    main()
