"""Retrieval quality: sentence-transformers (PyTorch) fine-tuning on negjax's exact batches.

    /work/venv/bin/python experiments/peer/quality_vs_sentence_transformers.py \
        --config experiments/configs/minilm-wordnet.toml \
        --set data.negatives=/tmp/exp/neg_margin_dedup --set data.num_negatives=1 \
        --eval-dir /tmp/exp/evalset --seed 0 --json experiments/quality/results/st_margin_dedup_s0.json

The peer needs PyTorch and sentence-transformers, which are never negjax dependencies:

    pip install torch==2.13.0 sentence-transformers        # (tested: 2.13.0+cpu, 6.2.0)

Same model: all-MiniLM-L6-v2 loaded from the directory negjax uses
(`negjax.model.packaged.minilm_dir()`). Same triples in the same order: the script builds
negjax's own training pipeline from the same config (`negjax.data.pipeline.build_pipeline`)
and takes global batch k = (query, positive, hard negative x H) ids for k = 0..steps-1, i.e.
exactly what `negjax train` with that config sees (including its de-duplication of documents
within the batch and its random fills for queries without mined negatives). The texts are
tokenised by the peer's tokenizer with the same max lengths (queries model.query_max_len,
documents model.doc_max_len).

Same recipe: MultipleNegativesRankingLoss with scale = 1 / loss.temperature; AdamW
(lr train.learning_rate, betas 0.9/0.999, eps 1e-6, weight decay train.weight_decay on
matrices only), linear warm-up over train.warmup_steps then linear decay to 0 at
train.steps, gradient clipping at train.max_grad_norm, dropout as in the model config
(train mode). The step is what SentenceTransformerTrainer does per batch (loss(features),
backward, clip, optimizer step, scheduler step); the trainer itself is not used because it
needs the `datasets` package, and a hand-written loop lets us feed negjax's batches.
Differences that remain: negjax's loss also masks in-batch columns that are one of the
query's own positives (rare after the pipeline's de-duplication), and the torch seed
(--seed) drives dropout only.

Evaluation: the same reduced eval set (experiments/quality/make_eval_set.py), embeddings from
the peer model (normalised), rankings by `negjax.search.index.exact_search` and metrics by
`negjax.evaluation.metrics.evaluate_rankings` -- the same code as `negjax eval`.
`mine_hard_negatives` is not used: both sides train on negjax's mined shard directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--eval-dir", required=True, help="corpus.jsonl, queries.jsonl, qrels.tsv")
    p.add_argument("--seed", type=int, default=0, help="torch seed (dropout); data order = train.seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--steps", type=int, default=0, help="override train.steps (0 = config)")
    p.add_argument("--zero-shot", action="store_true", help="evaluate the untrained model only")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--save-run", help="write the rankings as a TREC run file (as `negjax eval --save-run`)")
    args = p.parse_args()

    try:
        import sentence_transformers
        import torch
    except ImportError as e:
        raise SystemExit(f"the peer needs PyTorch and sentence-transformers ({e}): "
                         "pip install torch==2.13.0 sentence-transformers")
    import numpy as np
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import losses

    from negjax.config import load_config
    from negjax.data.layout import load_training_data
    from negjax.data.pipeline import build_pipeline
    from negjax.evaluation.evaluate import EvalSet
    from negjax.evaluation.metrics import evaluate_rankings
    from negjax.search.index import exact_search
    from negjax.model.packaged import minilm_dir
    from negjax.model.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.set)
    steps = args.steps or cfg.train.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    qlen, dlen = cfg.model.query_max_len, cfg.model.doc_max_len
    t0 = time.time()
    losses_seen = []
    if not args.zero_shot:
        corpus, examples = load_training_data(cfg.data)
        pipe = build_pipeline(cfg, load_tokenizer(minilm_dir()), process_index=0, process_count=1)
        G = pipe.group_size
        loss_fn = losses.MultipleNegativesRankingLoss(model, scale=1.0 / cfg.loss.temperature)
        decay = [w for w in model.parameters() if w.ndim >= 2]
        no_decay = [w for w in model.parameters() if w.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.train.learning_rate, betas=(0.9, 0.999), eps=1e-6)
        warm = cfg.train.warmup_steps

        def lr_factor(s):  # HF get_linear_schedule_with_warmup
            if s < warm:
                return s / max(1, warm)
            return max(0.0, (steps - s) / max(1, steps - warm))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        tok = model.tokenizer

        def feats(texts, n):
            return dict(tok(texts, max_length=n, truncation=True, padding=True, return_tensors="pt"))
        model.train()
        for k in range(steps):
            gb = pipe.global_batch(k)
            d_rows = np.asarray(gb.d_rows).reshape(-1, G)
            cols = [feats([examples.queries[i] for i in gb.q_rows], qlen)]
            cols += [feats([corpus.texts[j] for j in d_rows[:, c]], dlen) for c in range(G)]
            loss = loss_fn(cols, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses_seen.append(float(loss.detach()))
            if (k + 1) % 10 == 0:
                print(f"[peer] step {k + 1}/{steps} loss {np.mean(losses_seen[-10:]):.4f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        pipe.close()
    train_s = time.time() - t0

    model.eval()
    ev = Path(args.eval_dir)
    data = EvalSet.from_files(ev / "corpus.jsonl", ev / "queries.jsonl", ev / "qrels.tsv")
    model.max_seq_length = dlen
    c_emb = model.encode(data.corpus_texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    model.max_seq_length = qlen
    q_emb = model.encode(data.query_texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    ids, scores = exact_search(q_emb, c_emb, min(100, len(data.corpus_ids)), show_progress=False)
    run = {q: [data.corpus_ids[j] for j in row if j >= 0] for q, row in zip(data.query_ids, ids)}
    if args.save_run:
        Path(args.save_run).parent.mkdir(parents=True, exist_ok=True)
        tmp_run = Path(args.save_run + ".tmp")
        with open(tmp_run, "w") as f:
            for q, row, srow in zip(data.query_ids, ids, scores):
                for rank, (j, s) in enumerate(zip(row, srow), start=1):
                    if j >= 0:
                        f.write(f"{q} Q0 {data.corpus_ids[j]} {rank} {float(s):.6f} st\n")
        tmp_run.rename(args.save_run)
    metrics = evaluate_rankings(run, data.qrels)
    out = {"side": "sentence-transformers", "torch": torch.__version__,
           "sentence_transformers": sentence_transformers.__version__, "seed": args.seed,
           "data_seed": cfg.train.seed, "steps": 0 if args.zero_shot else steps,
           "batch_size": cfg.train.batch_size, "num_negatives": cfg.data.num_negatives,
           "negatives": cfg.data.negatives, "train_seconds": round(train_s, 1),
           "final_loss_10": float(np.mean(losses_seen[-10:])) if losses_seen else None, **metrics}
    print(json.dumps(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.rename(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
