"""`negjax quickstart`: the whole product on the built-in WordNet data, end to end.

1. round 1: train with in-batch negatives only;
2. mine hard negatives with the round-1 model (ScaNN, positive-aware false-negative filter);
3. round 2: train again from the same initialisation with in-batch + mined hard negatives
   (same steps and batch, so the difference between the rounds is the hard negatives);
4. evaluate both rounds on the test split; print the table, write results.json and plots.

Rerunning with the same workdir resumes: finished rounds and mined shards are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from negjax.config import Config, updated
from negjax.errors import NegjaxError
from negjax.utils import atomic_write_text

METRICS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")


_COMMON = {
    "data.dataset": "wordnet",
    "checkpoint.every_steps": 100, "checkpoint.keep": 1, "checkpoint.best_metric": "",
    "train.seed": 0, "train.schedule": "linear",
    "eval.split": "none",                 # both rounds are evaluated on the test split at the end
    "mining.relative_margin": 0.05,       # NV-Retriever's TopK-PercPos 95%
    "mining.negatives_kept": 16, "mining.rank_range": "1:50", "mining.audit_queries": 300,
    "data.negative_sampling": "random",   # one of the 16 kept per query, rotating per epoch
}
_MODELS = {
    "tiny": {"model.name": "tiny", "model.hidden_size": 128, "model.num_layers": 2,
             "model.num_heads": 2, "model.intermediate_size": 512, "model.query_max_len": 32,
             "model.doc_max_len": 64, "model.dropout": 0.1, "train.steps": 300,
             "train.batch_size": 128, "train.learning_rate": 5e-4, "train.warmup_steps": 30,
             "loss.temperature": 0.05},
    "minilm": {"model.name": "minilm", "model.query_max_len": 32, "model.doc_max_len": 64,
               "train.steps": 60, "train.batch_size": 32, "train.learning_rate": 2e-5,
               "train.warmup_steps": 6, "loss.temperature": 0.05,
               "mining.encode_batch_size": 128},
}


def base_config(model: str, workdir: Path, **changes) -> Config:
    """Settings sized for a few minutes per round on 2 CPU cores (+ `changes`, by key)."""
    if model not in _MODELS:
        raise NegjaxError(f"quickstart --model {model!r}: expected 'tiny' or 'minilm'")
    return updated(Config(), {**_COMMON, **_MODELS[model], "workdir": str(workdir), **changes})


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    x = np.arange(len(METRICS))
    for i, row in enumerate(rows):
        ax.bar(x + i * width, [row[m] for m in METRICS], width, label=row["name"])
    ax.set_xticks(x + width * (len(rows) - 1) / 2, METRICS)
    ax.set_ylim(0, 1)
    ax.set_title("WordNet sense retrieval, test split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def quickstart(workdir, *, model: str = "tiny", steps: int | None = None,
               batch_size: int | None = None, hard_negatives: int = 1, data: str | None = None) -> dict:
    """Run the four stages (see the module docstring). `data`: a directory with corpus.jsonl,
    train.jsonl, test_queries.jsonl, test_qrels.tsv (and optionally dev_*) instead of the
    built-in WordNet data."""
    import jax

    from negjax.data import wordnet
    from negjax.evaluation.evaluate import EvalSet, evaluate_encoder
    from negjax.mining.job import run_mining
    from negjax.model.loader import load_model
    from negjax.train.loop import train

    workdir = Path(workdir).absolute()
    t0 = time.perf_counter()
    sizes = {key: v for key, v in (("train.steps", steps), ("train.batch_size", batch_size)) if v}
    if data:
        data_dir = Path(data).absolute()
        for name in ("corpus.jsonl", "train.jsonl", "test_queries.jsonl", "test_qrels.tsv"):
            if not (data_dir / name).is_file():
                raise NegjaxError(f"{data_dir / name}: not found (quickstart --data needs corpus.jsonl, "
                                  "train.jsonl, test_queries.jsonl, test_qrels.tsv)")
        sizes["data.dataset"] = str(data_dir)
    else:
        data_dir = Path(wordnet.ensure_exported())
    cfg1 = base_config(model, workdir / "round1", **sizes)
    timings = {}

    print(f"[1/4] round 1: {cfg1.model.name}, {cfg1.train.steps} steps x batch "
          f"{cfg1.train.batch_size}, in-batch negatives only", flush=True)
    t = time.perf_counter()
    train(cfg1)
    timings["round1_train_s"] = time.perf_counter() - t

    print("[2/4] mining hard negatives with the round-1 model", flush=True)
    t = time.perf_counter()
    enc, params1, info1 = load_model(workdir / "round1")
    neg_dir = workdir / "negatives"
    run_mining(enc, params1, corpus_path=data_dir / "corpus.jsonl", train_path=data_dir / "train.jsonl",
               out_dir=neg_dir, mining_cfg=cfg1.mining, query_max_len=cfg1.model.query_max_len,
               doc_max_len=cfg1.model.doc_max_len, model_info={"path": info1["path"], "step": info1["step"]},
               cache_dir=cfg1.data.cache_dir or None)
    timings["mining_s"] = time.perf_counter() - t

    cfg2 = base_config(model, workdir / "round2", **sizes,
                       **{"data.negatives": str(neg_dir), "data.num_negatives": hard_negatives})
    print(f"[3/4] round 2: same steps and batch, in-batch + {hard_negatives} mined hard "
          "negative(s) per query", flush=True)
    t = time.perf_counter()
    train(cfg2)
    timings["round2_train_s"] = time.perf_counter() - t

    print("[4/4] evaluating both rounds on the test split", flush=True)
    t = time.perf_counter()
    test, rows = None, []
    for rnd, name in ((1, "round 1: in-batch negatives"), (2, "round 2: + mined hard negatives")):
        enc, params, info = load_model(workdir / f"round{rnd}")
        if test is None:  # (both rounds' models share the tokenizer and prompts)
            test = EvalSet.from_files(data_dir / "corpus.jsonl", data_dir / "test_queries.jsonl",
                                      data_dir / "test_qrels.tsv", encoder=enc,
                                      doc_max_len=cfg1.model.doc_max_len,
                                      cache_dir=cfg1.data.cache_dir or None)
        res = evaluate_encoder(enc, params, test, batch_size=256, query_max_len=cfg1.model.query_max_len,
                               doc_max_len=cfg1.model.doc_max_len)
        rows.append({"round": rnd, "name": name, "model": cfg1.model.name, "steps": info["step"],
                     "batch_size": cfg1.train.batch_size, **res})
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    jax.effects_barrier()

    if jax.process_index() == 0:
        atomic_write_text(workdir / "results.json", json.dumps(rows, indent=1) + "\n")
        atomic_write_text(workdir / "timings.json", json.dumps(timings, indent=1) + "\n")
        _plot(rows, workdir / "results.png")
        header = f"{'round':<34}" + "".join(f"{m:>11}" for m in METRICS)
        print("\n" + header)
        print("-" * len(header))
        for row in rows:
            print(f"{row['name']:<34}" + "".join(f"{row[m]:>11.4f}" for m in METRICS))
        print(f"\n{test.query_ids.__len__()} test queries, {len(test.corpus_ids)} documents; "
              f"total {timings['total_s'] / 60:.1f} min")
        print(f"results:     {workdir / 'results.json'} (plot: {workdir / 'results.png'})")
        print(f"training:    {workdir / 'round1'}, {workdir / 'round2'} (metrics.jsonl, "
              "diagnostics.png, tb/, checkpoints/)")
        print(f"hard negatives: {neg_dir} (manifest.json, report.json, report.png)")
    return {"rounds": rows, "timings": timings, "workdir": str(workdir)}
