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
    add_config_args(p)
    return p


def run(args) -> int:
    from negjax.config import load_config
    from negjax.model import export_hf
    from negjax.model.loader import load_model

    cfg = load_config(args.config, args.overrides)
    enc, params, info = load_model(args.checkpoint, cfg.model)
    step = info["step"]
    out = export_hf(enc, params, args.out, tower=args.tower, overwrite=args.overwrite)
    what = enc.source + (f" step {step}" if step is not None else "")
    print(f"exported {what} ({enc.config.num_layers} layers, dim {enc.dim}, "
          f"{enc.pooling} pooling{', normalised' if enc.normalize else ''}) to {out}")
    return 0
