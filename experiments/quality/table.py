"""Print the markdown table of experiments/quality/results/*.json (one row per file).

    /work/venv/bin/python experiments/quality/table.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    print("| row | queries | " + " | ".join(COLS) + " |")
    print("|---|---|" + "---|" * len(COLS))
    for path in sorted(root.glob("*.json")):
        r = json.loads(path.read_text())
        print(f"| {path.stem} | {r['queries']} | " + " | ".join(f"{r[c]:.4f}" for c in COLS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
