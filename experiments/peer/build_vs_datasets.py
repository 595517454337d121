"""negjax's cold data build vs Hugging Face `datasets`, whole processes, alternated.

    .venv/bin/python experiments/peer/build_vs_datasets.py --data DIR --peer-python PEER/bin/python
    ... --rounds 2 --cores 2,1 --json results.json

DIR holds corpus.jsonl and train.jsonl (e.g. `negjax bench data --synthetic 1000000` writes one
under `<negjax cache>/synthetic/`). The peer interpreter needs `datasets` and `transformers`,
which are never negjax dependencies (`python -m venv peer && peer/bin/pip install datasets
transformers`).

Both sides start from the files and end with every document and training query tokenised
(same tokenizer: model 'tiny''s, the built-in WordNet WordPiece vocabulary; same max lengths:
documents 64, queries 16, bench data's), each as a fresh child process timed whole (imports
included), with peak RSS from wait4:
  negjax    `negjax.data.prepared.prepare_training` into an empty cache: the corpus streamed
            into a token store (ids, offsets, key index, text hashes), the training file's
            ids resolved and its queries tokenised - what a cold `negjax train` does before
            its model.
  datasets  `load_dataset("json")` of both files, then `.map(tokenizer(..., truncation=True,
            max_length=...), batched=True, num_proc=2)` of the texts (its cache in a fresh
            temporary directory).
Rounds alternate which side goes first. `--cores 2,1` also runs negjax pinned to one core
(`taskset -c 0`) for the scaling figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from negjax.bench.data import wait_peak_rss

NEGJAX = """
import sys
from pathlib import Path
from negjax.data.prepared import prepare_training
data, tok, cache = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
d = prepare_training({"train": data / "train.jsonl", "corpus": data / "corpus.jsonl",
                      "train_qrels": None}, tok, doc_max_len=64, query_max_len=16, cache_dir=cache)
print(len(d.docs), len(d.queries))
"""

PEER = """
import os, sys
from datasets import load_dataset
from transformers import AutoTokenizer
data, tok_dir, cache = sys.argv[1], sys.argv[2], sys.argv[3]
tok = AutoTokenizer.from_pretrained(tok_dir)
docs = load_dataset("json", data_files=os.path.join(data, "corpus.jsonl"), split="train", cache_dir=cache)
train = load_dataset("json", data_files=os.path.join(data, "train.jsonl"), split="train", cache_dir=cache)
docs = docs.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, num_proc=2,
                remove_columns=["text"])
train = train.map(lambda b: tok(b["query"], truncation=True, max_length=16), batched=True, num_proc=2)
print(len(docs), len(train))
"""


def timed(argv: list, env: dict) -> dict:
    """A child process' wall seconds and peak RSS (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    rss = wait_peak_rss(proc)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(rss / 2**30, 3),
            "counts": [int(x) for x in out.split()[-2:]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--peer-python", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", default="2,1", help="negjax runs: 2 = unpinned, 1 = taskset -c 0")
    p.add_argument("--json", default="")
    args = p.parse_args()
    from negjax.data.wordnet import tokenizer_dir

    data, tok = Path(args.data).resolve(), str(tokenizer_dir())
    docs = sum(1 for _ in open(data / "corpus.jsonl", "rb"))
    env = {**os.environ, "NEGJAX_PROGRESS": "0", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    results = {"documents": docs, "runs": []}
    for r in range(args.rounds):
        sides = ["negjax", "datasets"] if r % 2 == 0 else ["datasets", "negjax"]
        for side in sides:
            cores = [int(c) for c in args.cores.split(",")] if side == "negjax" else [2]
            for c in cores:
                with tempfile.TemporaryDirectory(prefix="negjax-build-") as cache:
                    if side == "negjax":
                        argv = ([] if c >= 2 else ["taskset", "-c", "0"]) + \
                            [sys.executable, "-c", NEGJAX, str(data), tok, cache]
                    else:
                        argv = [args.peer_python, "-c", PEER, str(data), tok, cache]
                    res = timed(argv, env)
                res.update(side=side, cores=c, round=r, docs_per_s=round(docs / res["wall_s"]))
                results["runs"].append(res)
                print(json.dumps(res), flush=True)

    def median(side, cores):
        xs = sorted(x["wall_s"] for x in results["runs"] if x["side"] == side and x["cores"] == cores)
        return xs[len(xs) // 2] if xs else None

    n2, hf = median("negjax", 2), median("datasets", 2)
    results["summary"] = {"negjax_2core_s": n2, "datasets_s": hf,
                          "speedup_vs_datasets": round(hf / n2, 2) if n2 and hf else None}
    n1 = median("negjax", 1)
    if n1 and n2:
        results["summary"].update(negjax_1core_s=n1, two_vs_one_core=round(n1 / n2, 2))
    print(json.dumps(results["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
