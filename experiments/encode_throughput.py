"""Encode throughput of all-MiniLM-L6-v2: negjax next to sentence-transformers (PyTorch) on the
same texts, fp32 on the CPU, alternated in one run.

    # whole process, as a user runs it: `negjax encode` vs a SentenceTransformer script,
    # 3,000 documents of >= 128 tokens (max length 128), then 1,000 of >= 512 tokens
    python experiments/encode_throughput.py --whole-process --n 3000 --min-tokens 128 \
        --max-length 128 --rounds 2 --wait-idle --json experiments/bench/encode_long_128.json
    python experiments/encode_throughput.py --whole-process --n 1000 --min-tokens 512 \
        --max-length 512 --rounds 2 --wait-idle --json experiments/bench/encode_long_512.json
    # in one process, compiled and warmed up first: WordNet documents as they are (short)
    python experiments/encode_throughput.py --n 2000 --rounds 3

Texts are the packaged WordNet corpus (`negjax/data/wordnet_data/corpus.jsonl.gz`, one
"lemmas (pos): gloss" document per synset) in file order; with `--min-tokens T` consecutive
documents are joined with spaces until the text has at least T MiniLM tokens (with [CLS] and
[SEP]), so every text fills the max length: deterministic, no sampling.

`--whole-process` times each side from process start to the written .npy (imports, model
load, compilation, tokenisation, encoding): `negjax encode --model minilm --input F --output
O --max-length L` (its defaults otherwise), and a script doing what a sentence-transformers
user does: `SentenceTransformer(minilm_dir())`, `max_seq_length = L`, `encode(texts)` (batch
32, its default), `np.save`. With `--baseline DIR` a third side runs the same `negjax
encode` from another checkout (the code before a change); with `--int8` another runs it with
`--set model.dtype=int8`. Rounds alternate negjax, ST, negjax, ST... (other sides after
negjax); the JSON has every run's wall and CPU time (user +
system of the child) and the medians. `--wait-idle` waits before each run until the
machine's CPUs are >= 92% idle (other jobs share this machine); `other_cpu_s` is the CPU
time the rest of the machine used during the run (/proc/stat): a run with a large one shared
the cores and is not comparable. The in-process mode (default) reports encode throughput
after compilation (negjax) and a warm-up call (sentence-transformers), median of --rounds.

Results: experiments/bench/README.md ("Encoding long documents").
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ST_SCRIPT = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
from negjax.model.packaged import minilm_dir
inp, out, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [json.loads(line)["text"] for line in open(inp, encoding="utf-8") if line.strip()]
model = SentenceTransformer(str(minilm_dir()), device="cpu")
model.max_seq_length = max_length
np.save(out, model.encode(texts, convert_to_numpy=True))
"""


def wordnet_texts(n: int, min_tokens: int = 0) -> list[str]:
    """`n` texts from the packaged WordNet corpus, in file order; with `min_tokens`, each text
    joins consecutive documents until it has >= min_tokens MiniLM tokens (with [CLS]/[SEP])."""
    from negjax.data.wordnet import DATA_DIR

    with gzip.open(DATA_DIR / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh]
    if not min_tokens:
        return docs[:n]
    from negjax.model.hf import transformer_dir
    from negjax.model.packaged import minilm_dir
    from negjax.model.tokenizer import load_tokenizer

    tok = load_tokenizer(transformer_dir(minilm_dir()))
    texts, group, size = [], [], 2  # size: estimated tokens with [CLS]/[SEP]
    for lo in range(0, len(docs), 5000):
        chunk = docs[lo:lo + 5000]
        for doc, c in zip(chunk, map(len, tok(chunk, add_special_tokens=False)["input_ids"])):
            group.append(doc)
            size += c
            if size >= min_tokens and len(tok(" ".join(group))["input_ids"]) >= min_tokens:
                texts.append(" ".join(group))
                group, size = [], 2
                if len(texts) == n:
                    return texts
    raise SystemExit(f"could only build {len(texts)} texts of >= {min_tokens} tokens")


def wait_idle(max_wait: float = 1800, idle: float = 0.92) -> float:
    """Seconds waited until the CPUs were >= `idle` idle over 3 s (/proc/stat), at most
    `max_wait`."""
    def sample():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return sum(v), v[3] + v[4]

    t0 = time.time()
    while time.time() - t0 < max_wait:
        a = sample()
        time.sleep(3)
        b = sample()
        if (b[1] - a[1]) / max(1, b[0] - a[0]) >= idle:
            break
    return time.time() - t0


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def run_timed(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(wall s, CPU s of the child: user + system, CPU s of everything else on the machine
    meanwhile) of one command, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = busy_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy = busy_cpu_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, max(0.0, busy - cpu)


def whole_process(args, texts: list[str]) -> dict:
    import numpy as np

    env = dict(os.environ, NEGJAX_PROGRESS="0")
    negjax = str(Path(sys.executable).with_name("negjax"))
    work = Path(tempfile.mkdtemp(prefix="encode-throughput-"))
    inp = work / "texts.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                           for i, t in enumerate(texts)), encoding="utf-8")
    encode = ["encode", "--model", "minilm", "--input", str(inp), "--max-length",
              str(args.max_length), *args.negjax_args.split()]
    sides = {"negjax": [negjax, *encode, "--output", str(work / "negjax.npy")]}
    if args.baseline:  # the same command from another checkout (-P: not from the cwd)
        sides["negjax@baseline"] = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}",
                                    sys.executable, "-P", "-m", "negjax", *encode, "--output",
                                    str(work / "baseline.npy")]
    if args.int8:  # the same command with int8 dense layers (model.dtype=int8)
        sides["negjax int8"] = [negjax, *encode, "--set", "model.dtype=int8", "--output",
                                str(work / "int8.npy")]
    sides["sentence-transformers"] = [sys.executable, "-c", ST_SCRIPT, str(inp),
                                      str(work / "st.npy"), str(args.max_length)]
    runs = []
    for r in range(args.rounds):
        for side, cmd in sides.items():
            waited = wait_idle() if args.wait_idle else 0.0
            wall, cpu, other = run_timed(cmd, env)
            runs.append({"round": r + 1, "side": side, "wall_s": round(wall, 2),
                         "cpu_s": round(cpu, 2), "texts_per_s": round(len(texts) / wall, 2),
                         "other_cpu_s": round(other, 1), "waited_idle_s": round(waited, 1)})
            print(json.dumps(runs[-1]), flush=True)
    ours, ref = np.load(work / "negjax.npy"), np.load(work / "st.npy")
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    med = {side: {key: statistics.median(x[key] for x in runs if x["side"] == side)
                  for key in ("wall_s", "cpu_s", "texts_per_s")} for side in sides}
    st = "sentence-transformers"
    pairs = [[b["wall_s"] / a["wall_s"] for b in runs if b["round"] == a["round"] and
              b["side"] == st][0] for a in runs if a["side"] == "negjax"]
    return {"commands": {k: " ".join(v[:2] + ["ST_SCRIPT"] + v[3:] if k == st else v)
                         for k, v in sides.items()},
            "runs": runs, "median": med,
            "speedup_wall_median": round(med[st]["wall_s"] / med["negjax"]["wall_s"], 3),
            **{f"{side}_speedup_wall_median": round(med[st]["wall_s"] / med[side]["wall_s"], 3)
               for side in sides if side not in ("negjax", st)},
            "speedup_per_round": [round(p, 3) for p in pairs],
            "agreement": {"min_cosine": float(cos.min()),
                          "max_abs_diff": float(np.abs(ours - ref).max())}}


def in_process(args, texts: list[str]) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from negjax.config import ModelConfig
    from negjax.model import encode_texts, load_encoder, minilm_dir

    enc = load_encoder(ModelConfig(name="minilm"))
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    st.max_seq_length = args.max_length

    def run_negjax():
        return encode_texts(enc, enc.params, texts, max_length=args.max_length,
                            batch_size=args.batch_size)

    def run_st():
        return st.encode(texts, batch_size=32, convert_to_numpy=True)

    t0 = time.perf_counter()
    ours = run_negjax()  # compiles one program per bucket used
    first = time.perf_counter() - t0
    ref = run_st()
    rates = {"negjax": [], "sentence-transformers": []}
    for r in range(args.rounds):
        for name, fn in (("negjax", run_negjax), ("sentence-transformers", run_st)):
            t0 = time.perf_counter()
            fn()
            rates[name].append(len(texts) / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()),
              flush=True)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    return {"negjax_first_call_s": round(first, 2), "rates": rates,
            "median": {k: statistics.median(v) for k, v in rates.items()},
            "agreement": {"min_cosine": float(cos.min()),
                          "max_abs_diff": float(np.abs(ours - ref).max())}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="texts")
    ap.add_argument("--min-tokens", type=int, default=0,
                    help="join WordNet documents into texts of at least this many tokens")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="negjax, in-process mode")
    ap.add_argument("--whole-process", action="store_true",
                    help="time `negjax encode` and a sentence-transformers script end to end")
    ap.add_argument("--negjax-args", default="", help="extra `negjax encode` flags (quoted)")
    ap.add_argument("--baseline", help="also time `python -m negjax encode` from this checkout "
                    "(e.g. `git worktree add /tmp/base <commit>`), same flags")
    ap.add_argument("--int8", action="store_true",
                    help="also time `negjax encode --set model.dtype=int8` (whole process)")
    ap.add_argument("--wait-idle", action="store_true",
                    help="before each run, wait until the CPUs are >= 92%% idle")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("NEGJAX_PROGRESS", "0")

    texts = wordnet_texts(args.n, args.min_tokens)
    info = {"texts": len(texts), "min_tokens": args.min_tokens, "max_length": args.max_length,
            "model": "all-MiniLM-L6-v2 (negjax --model minilm)", "dtype": "float32",
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "argv": " ".join(sys.argv[1:])}
    print(json.dumps(info), flush=True)
    result = whole_process(args, texts) if args.whole_process else in_process(args, texts)
    result = {**info, **result}
    print(json.dumps({k: result[k] for k in result if k not in ("runs", "rates")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
