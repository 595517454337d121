"""`negjax quickstart [--workdir DIR] [--model tiny|minilm]`: train, mine, retrain, evaluate."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("quickstart", help="end to end on built-in WordNet data: train, mine hard "
                       "negatives, retrain, evaluate (minutes on a laptop CPU)")
    p.add_argument("--workdir", default="runs/quickstart", help="output directory (default: %(default)s)")
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny",
                   help="'tiny' (from scratch, default) or 'minilm' (fine-tune all-MiniLM-L6-v2; slower)")
    p.add_argument("--steps", type=int, help="training steps per round (default: 300 tiny, 60 minilm)")
    p.add_argument("--batch-size", type=int, help="global batch (default: 128 tiny, 32 minilm)")
    p.add_argument("--hard-negatives", type=int, default=1, help="mined negatives per query in round 2")
    p.add_argument("--data", help="your own data directory (corpus.jsonl, train.jsonl, test_queries.jsonl, "
                   "test_qrels.tsv) instead of the built-in WordNet data")
    return p


def run(args) -> int:
    from negjax.errors import NegjaxError
    from negjax.quickstart import quickstart

    for name in ("steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise NegjaxError(f"--{name.replace('_', '-')} must be >= 1")
    if args.hard_negatives < 1:
        raise NegjaxError("--hard-negatives must be >= 1")
    quickstart(args.workdir, model=args.model, steps=args.steps, batch_size=args.batch_size,
               hard_negatives=args.hard_negatives, data=args.data)
    return 0
