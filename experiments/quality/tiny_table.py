"""Tables of the tiny-model Matryoshka and false-negative-guard rows (matryoshka_guard.sh):
MRR@10 / R@10 per row and size, paired bootstrap intervals (paired.py) against the right
baseline, and the guard's masked columns per step from the runs' metrics.jsonl.

    python experiments/quality/tiny_table.py [--res experiments/quality/results/tiny] [--exp /tmp/exp]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def paired(qrels: Path, a: Path, b: Path) -> dict:
    from paired import main as paired_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        paired_main([str(qrels), str(a), str(b), "--json"])
    return json.loads(buf.getvalue())


def main():
    import sys
    sys.path.insert(0, str(HERE))
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=Path, default=HERE / "results" / "tiny")
    ap.add_argument("--exp", type=Path, default=Path("/tmp/exp"))
    a = ap.parse_args()
    qrels = a.exp / "evalset" / "qrels.tsv"
    runs = a.res / "runs"

    def metric(name):
        path = a.res / f"{name}.json"
        if not path.is_file():
            return float("nan"), float("nan")
        r = json.loads(path.read_text())
        return r["mrr@10"], r["recall@10"]

    def ci(base, other, m="mrr@10"):
        if not ((runs / f"{base}.trec").is_file() and (runs / f"{other}.trec").is_file()):
            return "not run"
        p = paired(qrels, runs / f"{base}.trec", runs / f"{other}.trec")[m]
        return f"{p['diff']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"

    print("## Matryoshka (MRR@10 / R@10; CI: paired bootstrap, row - base at the same size)\n")
    print("| size | base s0 (truncated) | base s1 | MRL s0 | MRL s1 | single-size | MRL s0 - base s0 | MRL s0 - single |")
    print("|---:|---|---|---|---|---|---|---|")
    for k in (128, 64, 32, 16):
        cells = []
        for name in (f"base_s0_d{k}", f"base_s1_d{k}", f"mrl_s0_d{k}", f"mrl_s1_d{k}"):
            m, r = metric(name)
            cells.append(f"{m:.4f} / {r:.4f}")
        single = f"single_d{k}" if k != 128 else f"base_s0_d{k}"
        m, r = metric(single)
        cells.append(f"{m:.4f} / {r:.4f}" + (" (= base)" if k == 128 else ""))
        cells.append(ci(f"base_s0_d{k}", f"mrl_s0_d{k}"))
        cells.append(ci(single, f"mrl_s0_d{k}") if k != 128 else "-")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\nseed noise at 128: base s1 - base s0 {ci('base_s0_d128', 'base_s1_d128')}; "
          f"MRL s1 - MRL s0 {ci('mrl_s0_d128', 'mrl_s1_d128')}")

    print("\n## False-negative guard (loss.false_negative_margin = 0.1)\n")
    print("| seed | base MRR@10 | guard MRR@10 | guard - base | masked per step (mean; first / last window) |")
    print("|---:|---|---|---|---|")
    for s in (0, 1):
        path = a.exp / f"tiny_guard_s{s}" / "metrics.jsonl"
        if not path.is_file():
            print(f"| {s} | not run | | | |")
            continue
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        masked = [x["false_negatives_masked"] for x in lines]
        mean = sum(masked) / len(masked)
        print(f"| {s} | {metric(f'base_s{s}_d128')[0]:.4f} | {metric(f'guard_s{s}')[0]:.4f} | "
              f"{ci(f'base_s{s}_d128', f'guard_s{s}')} | {mean:.1f} ({masked[0]:.1f} / {masked[-1]:.1f}) |")


if __name__ == "__main__":
    main()
