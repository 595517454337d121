"""`negjax export --checkpoint DIR --out HF_DIR`: write a Hugging Face / sentence-transformers
directory (config.json, model.safetensors, tokenizer, modules.json, pooling) that
`transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load.

--checkpoint accepts a training workdir (its latest checkpoint), a checkpoints/<step>
directory, a Hugging Face directory (re-export) or 'minilm' / 'tiny'.
"""

from __future__ import annotations

from pathlib import Path

from negjax.errors import NegjaxError


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
    from negjax.model import export_hf, load_encoder

    from negjax.train.checkpoint import is_training_checkpoint, load_trained

    cfg = load_config(args.config, args.overrides)
    ckpt = args.checkpoint
    step = None
    if ckpt not in ("minilm", "tiny") and is_training_checkpoint(ckpt):
        enc, params, info = load_trained(ckpt)
        step = info["step"]
    else:
        if ckpt not in ("minilm", "tiny"):
            path = Path(ckpt)
            if not path.is_dir():
                raise NegjaxError(f"{path}: checkpoint directory not found")
            if not (path / "config.json").is_file():
                raise NegjaxError(f"{path}: neither a training workdir/checkpoint (config.toml + "
                                  "checkpoints/) nor a Hugging Face directory (config.json)")
        cfg.model.name = ckpt
        enc = load_encoder(cfg.model)
        params = enc.params
    out = export_hf(enc, params, args.out, tower=args.tower, overwrite=args.overwrite)
    what = enc.source + (f" step {step}" if step is not None else "")
    print(f"exported {what} ({enc.config.num_layers} layers, dim {enc.dim}, "
          f"{enc.pooling} pooling{', normalised' if enc.normalize else ''}) to {out}")
    return 0
