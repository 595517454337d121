"""`negjax export --checkpoint DIR --out HF_DIR`: write a Hugging Face / sentence-transformers
directory (config.json, model.safetensors, tokenizer, modules.json, pooling) that
`transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load.

--checkpoint accepts a training workdir (its latest checkpoint), a checkpoints/<step>
directory, a Hugging Face directory (re-export) or 'minilm' / 'tiny'.
"""

from __future__ import annotations


def add_parser(sub):
    from negjax.cli import add_config_args

    p = sub.add_parser("export", help="export a model as a Hugging Face / sentence-transformers dir")
    p.add_argument("--checkpoint", required=True,
                   help="model to export: a training workdir or checkpoint step dir, a "
                   "Hugging Face directory, 'minilm' or 'tiny'")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--tower", choices=("query", "doc"), default="query",
                   help="which tower to write (only matters with separate towers)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="larger weights are written as model-0000i-of-0000n.safetensors shards "
                   "with model.safetensors.index.json (default 5 GB, as transformers)")
    add_config_args(p)
    return p


def run(args) -> int:
    from negjax.config import load_config
    from negjax.errors import NegjaxError
    from negjax.model import export_hf
    from negjax.model.loader import load_model, saved_config

    cfg = load_config(args.config, args.overrides)
    enc, params, info = load_model(args.checkpoint, cfg.model)
    step = info["step"]
    if args.max_shard_size <= 0:
        raise NegjaxError(f"--max-shard-size must be > 0, got {args.max_shard_size}")
    saved = saved_config(args.checkpoint)  # a training run: the Matryoshka sizes it trained
    out = export_hf(enc, params, args.out, tower=args.tower, overwrite=args.overwrite,
                    max_shard_bytes=int(args.max_shard_size * 1e9),
                    matryoshka_dims=saved.loss.matryoshka_dims if saved else None)
    what = enc.source + (f" step {step}" if step is not None else "")
    print(f"exported {what} ({enc.config.num_layers} layers, dim {enc.dim}, "
          f"{enc.pooling} pooling{', normalised' if enc.normalize else ''}) to {out}")
    return 0
