"""Single-source against mixed global batches, on the built-in data split into three sources
by part of speech (nouns; verbs; adjectives and adverbs), each with its own query prompt.

    python experiments/sources/ablation.py --model tiny --work W [--steps 300] [--batch 64]
    python experiments/sources/ablation.py --model minilm --work W --steps 150 --batch 32 \
        --eval-corpus-every 8

For each alpha in --alphas (data.source_sampling = "temperature", p ~ queries^alpha) and seed
in --seeds it trains twice with `negjax train`: data.sources_per_batch = 1 (every global batch
from one source) and = batch / 4 (global batches of 4-query sub-batches, each from a source
drawn alike: mixed batches), equal steps, batch, learning rate and sampling probabilities.
Each model is evaluated on each source's dev queries against the source's own corpus with the
source's prompt (in-process, the library's encode and exact search); the macro MRR@10 is the
mean of the three sources'. The comparison single - mixed is paired: per query, the mean
reciprocal rank over the seeds, resampled with replacement within each source (--samples
bootstrap draws), the macro difference's 2.5 / 97.5 percentiles. --eval-corpus-every K
evaluates against every K-th document of each source's corpus plus the dev positives (a
cheaper evaluation for MiniLM on CPU; training uses the whole corpora, though with no hard
negatives only the positives are ever in a batch). W/results.json holds every figure; the
table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PROMPTS = {"nouns": "noun sense: ", "verbs": "verb sense: ", "adjectives": "adjective or adverb sense: "}
MODELS = {
    "tiny": """
[model]
name = "tiny"
hidden_size = 128
num_layers = 2
num_heads = 2
intermediate_size = 512
query_max_len = 32
doc_max_len = 64
dropout = 0.1
""",
    "minilm": """
[model]
name = "minilm"
query_max_len = 32
doc_max_len = 64
""",
}
LR = {"tiny": 5e-4, "minilm": 2e-5}


def config(a, data: Path, alpha: float, per_batch: int, seed: int) -> str:
    sources = "".join(f"""
[[data.sources]]
name = "{name}"
dataset = "{data / name}"
query_prompt = "{prompt}"
""" for name, prompt in PROMPTS.items())
    return MODELS[a.model] + f"""
[data]
cache_dir = "{a.work / 'cache'}"
source_sampling = "temperature"
source_temperature = {alpha}
sources_per_batch = {per_batch}
{sources}
[loss]
temperature = 0.05

[train]
steps = {a.steps}
batch_size = {a.batch}
learning_rate = {LR[a.model]}
warmup_steps = {max(1, a.steps // 10)}
seed = {seed}
log_every = {max(1, a.steps // 10)}

[checkpoint]
every_steps = {a.steps}
keep = 1
async_save = false

[eval]
split = "none"
"""


def eval_corpora(data: Path, out: Path, every: int) -> dict[str, Path]:
    """{source: corpus evaluated against}: the source's, or every `every`-th document of it
    plus its dev positives."""
    if every <= 1:
        return {name: data / name / "corpus.jsonl" for name in PROMPTS}
    made = {}
    for name in PROMPTS:
        needed = {r.split("\t")[1] for r in (data / name / "dev_qrels.tsv").read_text().splitlines()[1:]}
        lines = (data / name / "corpus.jsonl").read_text().splitlines()
        keep = [x for i, x in enumerate(lines) if i % every == 0 or json.loads(x)["id"] in needed]
        made[name] = out / name / "corpus.jsonl"
        made[name].parent.mkdir(parents=True, exist_ok=True)
        made[name].write_text("".join(x + "\n" for x in keep))
    return made


def reciprocal_ranks(workdir: Path, corpora: dict) -> dict[str, list[float]]:
    """{source: per-query RR@10 on its dev set} of the model trained in `workdir`."""
    from negjax.data.layout import resolve_dataset
    from negjax.config import load_config
    from negjax.data.sources import sources_of
    from negjax.evaluation.evaluate import EvalSet, rankings
    from negjax.evaluation.metrics import query_metrics
    from negjax.model.encode import encode_store, encode_texts
    from negjax.model.loader import load_model

    enc, params, _ = load_model(workdir)
    cfg = load_config(workdir / "config.toml")
    out = {}
    for src in sources_of(cfg, enc.prompts):
        senc = enc.with_prompts(src.prompts)
        paths = resolve_dataset(src.data)
        ev = EvalSet.from_files(corpora[src.name], paths["dev_queries"], paths["dev_qrels"],
                                encoder=senc, doc_max_len=cfg.model.doc_max_len,
                                cache_dir=cfg.data.cache_dir)
        c = encode_store(senc, params, ev.corpus_store, tower="doc", batch_size=256,
                         desc=f"encode {src.name}")
        q = encode_texts(senc, params, ev.query_texts, tower="query",
                         max_length=cfg.model.query_max_len, batch_size=256, desc="queries")
        ids, _ = rankings(q, c, k=10)
        out[src.name] = [query_metrics([ev.corpus_ids[j] for j in row if j >= 0],
                                       ev.qrels[qid])["mrr@10"]
                         for qid, row in zip(ev.query_ids, ids)]
    return out


def paired_macro(single: dict, mixed: dict, samples: int, seed: int) -> tuple[float, float, float]:
    """(mean, lo, hi): macro MRR@10 of single - mixed, queries resampled within sources."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(samples)
    point = 0.0
    for name in PROMPTS:
        d = np.asarray(single[name]) - np.asarray(mixed[name])  # [queries], seeds averaged
        idx = rng.integers(0, len(d), (samples, len(d)))
        diffs += d[idx].mean(axis=1) / len(PROMPTS)
        point += d.mean() / len(PROMPTS)
    return float(point), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--alphas", default="0.5,1")
    p.add_argument("--eval-corpus-every", type=int, default=1)
    p.add_argument("--samples", type=int, default=10000)
    a = p.parse_args(argv)
    a.work = a.work.absolute()
    from negjax.data.wordnet import split_by_pos

    data = a.work / "data"
    if not (data / "adjectives" / "train.jsonl").is_file():
        split_by_pos(data)
    corpora = eval_corpora(data, a.work / "eval", a.eval_corpus_every)
    seeds = [int(s) for s in a.seeds.split(",")]
    alphas = [float(x) for x in a.alphas.split(",")]
    results_path = a.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for alpha in alphas:
        for mode, per_batch in (("single", 1), ("mixed", a.batch // 4)):
            for seed in seeds:
                row = f"{a.model}-a{alpha:g}-{mode}-s{seed}"
                if row in results:
                    continue
                workdir = a.work / "runs" / row
                cfg = a.work / "configs" / f"{row}.toml"
                cfg.parent.mkdir(parents=True, exist_ok=True)
                cfg.write_text(config(a, data, alpha, per_batch, seed))
                print(f"[ablation] {row}: training", flush=True)
                subprocess.run([sys.executable, "-m", "negjax", "train", "--config", str(cfg),
                                "--workdir", str(workdir)], check=True, cwd=REPO)
                rr = reciprocal_ranks(workdir, corpora)
                results[row] = {"rr": rr, "mrr@10": {n: float(np.mean(v)) for n, v in rr.items()}}
                results_path.write_text(json.dumps(results))
    print(f"\n{a.model}, {a.steps} steps x {a.batch} queries, seeds {seeds}; dev MRR@10 "
          "(mean over seeds)\n")
    print("| alpha | batches | nouns | verbs | adjectives | macro | single - mixed (95% CI) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for alpha in alphas:
        per = {}
        for mode in ("single", "mixed"):
            rows = [results[f"{a.model}-a{alpha:g}-{mode}-s{s}"] for s in seeds]
            per[mode] = {n: np.mean([r["rr"][n] for r in rows], axis=0) for n in PROMPTS}
        mean, lo, hi = paired_macro(per["single"], per["mixed"], a.samples, seed=0)
        summary[f"a{alpha:g}"] = {"single_minus_mixed": mean, "ci95": [lo, hi]}
        for mode in ("single", "mixed"):
            m = {n: float(per[mode][n].mean()) for n in PROMPTS}
            macro = float(np.mean(list(m.values())))
            summary[f"a{alpha:g}"][mode] = {**m, "macro": macro}
            diff = f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" if mode == "single" else ""
            print(f"| {alpha:g} | {mode} | {m['nouns']:.4f} | {m['verbs']:.4f} | "
                  f"{m['adjectives']:.4f} | {macro:.4f} | {diff} |")
    (a.work / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
