"""`negjax encode --model DIR|minilm|tiny --input FILE.jsonl --output FILE.npy`: embed texts.

Input lines are `{"text": ...}` or `{"id": ..., "text": ...}`; the output is float32 [N, D]
in input order (row i = line i, blank lines skipped), written atomically.
"""

from __future__ import annotations

from pathlib import Path

from negjax.errors import NegjaxError, file_error


def add_parser(sub):
    from negjax.cli import add_config_args, add_renamed_flag

    p = sub.add_parser("encode", help="embed texts from JSONL into a float32 .npy [N, D]")
    p.add_argument("--model", help="'minilm', 'tiny', a Hugging Face / sentence-transformers "
                   "directory or a negjax training workdir / checkpoint directory (default: "
                   "model.name from the config)")
    p.add_argument("--input", required=True, help='JSONL, one {"text"} or {"id","text"} per line')
    p.add_argument("--output", required=True, help="output .npy, float32 [N, D]")
    p.add_argument("--max-length", type=int, default=0,
                   help="max tokens per text (default: the model's max_seq_length)")
    p.add_argument("--encode-batch-size", type=int, default=128,
                   help="texts per encoding batch (all local devices)")
    add_renamed_flag(p, "--batch-size", "--encode-batch-size", type=int)
    p.add_argument("--pooling", choices=("mean", "cls", "last"),
                   help="override the model's pooling (default: its own; 'last' = the last "
                   "real token)")
    p.add_argument("--dim", type=int, default=0, metavar="K", help="keep the first K embedding dimensions (re-normalised when the model normalises): a Matryoshka-trained model at a smaller size (default: all)")
    p.add_argument("--tower", choices=("query", "doc"), default="query",
                   help="which tower encodes and whose prompt (model.query_prompt / "
                   "doc_prompt) goes in front of the texts (default query)")
    add_config_args(p)
    return p


def read_texts(path: Path) -> list[str]:
    """Texts of a JSONL file in line order; a malformed line raises naming file:line."""
    if not path.is_file():
        raise NegjaxError(f"{path}: input file not found")
    from negjax.data.records import iter_jsonl

    texts = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec.get("text"), str):
            raise file_error(path, lineno, 'expected an object with a string "text"')
        texts.append(rec["text"])
    return texts


def run(args) -> int:
    import numpy as np

    from negjax.config import load_config
    from negjax.model import encode_texts
    from negjax.model.loader import load_model
    from negjax.utils import atomic_save_npy

    if args.encode_batch_size <= 0:
        raise NegjaxError(f"--encode-batch-size must be > 0, got {args.encode_batch_size}")
    if args.max_length < 0:
        raise NegjaxError(f"--max-length must be > 0, got {args.max_length}")
    cfg = load_config(args.config, args.overrides)
    texts = read_texts(Path(args.input))
    enc, params, _ = load_model(args.model, cfg.model)
    if args.pooling:
        enc.pooling = args.pooling
    if args.dim:
        enc = enc.truncated(args.dim)
    emb = encode_texts(enc, params, texts, tower=args.tower,
                       max_length=args.max_length or None, batch_size=args.encode_batch_size)
    atomic_save_npy(args.output, emb.astype(np.float32))
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}")
    return 0
