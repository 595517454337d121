"""How much `model.dtype=int8` encoding changes mined negatives: `negjax mine` on a subset of
the built-in WordNet data with MiniLM, once in float32 and once with `--set model.dtype=int8`
(exact search, one process, the job's defaults otherwise), rows compared.

    python experiments/mining/int8_overlap.py --docs 10000 --queries 3000 \
        --out experiments/mining/int8_overlap.json

Both runs are the real CLI (`experiments/mining/sharded_wordnet.py`'s `mine`: one process under
`/usr/bin/time -v`), each from an empty work directory, so each encodes its own embeddings.
Reported: the fraction of the float32 run's (query, negative) pairs the int8 run also wrote,
the share of queries whose negatives are the same set, and each run's encode time (the
report's `timings`) and wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_wordnet import REPO, mine, overlap, rows, subset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--work", default="/tmp/negjax_int8_overlap")
    ap.add_argument("--out", default=str(REPO / "experiments/mining/int8_overlap.json"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = subset(work / "data", args.docs, args.queries)
    runs, timings = {}, {}
    for name, extra in (("float32", ()), ("int8", ("--set", "model.dtype=int8"))):
        runs[name] = mine(data, work / name, 1, *extra)
        t = json.loads((work / name / "report.json").read_text())["timings"]
        timings[name] = {key: round(t[key], 1) for key in ("encode_docs_s", "encode_queries_s")}
    a, b = rows(work / "float32"), rows(work / "int8")
    same = sum(set(a[q]["negative_ids"]) == set(b[q]["negative_ids"]) for q in a)
    res = {"data": {"docs": args.docs, "queries": len(a), "source": "built-in WordNet, first "
                    "docs and the training queries whose positives are among them"},
           "model": "minilm, exact search, one process", "runs": runs, "encode": timings,
           "int8_overlap_with_float32": overlap(a, b),
           "queries_with_the_same_negatives": same / max(1, len(a))}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
