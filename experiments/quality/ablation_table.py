"""Markdown table of ablation rows: MRR@10 / R@10 of each row and its paired bootstrap
difference (paired.py, 10,000 resamples over the eval queries) against a baseline row.

    python experiments/quality/ablation_table.py --res experiments/quality/results/tiny \
        --base base_s0_d128 --rows topk_s0,window_s0,... [--runs DIR] [--qrels QRELS]

A row is `NAME` (results NAME.json, rankings runs/NAME.trec) or `NAME=label`.
A row whose rankings are missing is shown without interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_table import paired  # noqa: E402  (paired.py's bootstrap as a dict)


def run_file(runs: Path, name: str) -> Path | None:
    for p in (runs / f"{name}.trec", runs / name):
        if p.is_file():
            return p
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=Path, required=True)
    ap.add_argument("--runs", type=Path, help="rankings directory (default RES/runs)")
    ap.add_argument("--qrels", type=Path, default=Path("/tmp/exp/evalset/qrels.tsv"))
    ap.add_argument("--base", required=True)
    ap.add_argument("--rows", required=True)
    a = ap.parse_args(argv)
    runs = a.runs or a.res / "runs"
    base_run = run_file(runs, a.base)
    print("| row | MRR@10 | R@10 | MRR@10 - base [95% CI] | R@10 - base [95% CI] |")
    print("|---|---:|---:|---|---|")
    for item in a.rows.split(","):
        name, _, label = item.partition("=")
        path = a.res / f"{name}.json"
        if not path.is_file():
            print(f"| {label or name} | not run | | | |")
            continue
        r = json.loads(path.read_text().splitlines()[0])
        cells = [f"{r['mrr@10']:.4f}", f"{r['recall@10']:.3f}"]
        other = run_file(runs, name)
        if name != a.base and base_run and other:
            p = paired(a.qrels, base_run, other)
            for m in ("mrr@10", "recall@10"):
                cells.append(f"{p[m]['diff']:+.4f} [{p[m]['ci95'][0]:+.4f}, {p[m]['ci95'][1]:+.4f}]")
        else:
            cells += ["-", "-"]
        print(f"| {label or name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
