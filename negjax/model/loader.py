"""One way to turn a `--model` argument into (encoder, params, info), for every command and
the training loop.

    enc, params, info = load_model("runs/tiny")          # a training workdir: latest step
    enc, params, info = load_model("minilm")             # info = {"path": "minilm", "step": None}
    enc, params, info = load_model(None, cfg.model)      # cfg.model.name, with its settings

NAME is one of
- 'tiny': a small BERT from scratch (random init, seed 0; `model_cfg` sets its shape);
- 'minilm': the packaged all-MiniLM-L6-v2;
- a Hugging Face / sentence-transformers directory (config.json + safetensors);
- a training workdir (its latest checkpoint), its `checkpoints/` directory or one
  `checkpoints/<step>/` directory: the encoder its saved config.toml describes, with the
  parameters of that step.

For 'tiny', 'minilm' and model directories the other settings (pooling, dtype, dropout,
towers, ...) come from `model_cfg`; a training checkpoint brings its own. The layout of a
training workdir (config.toml, checkpoints/<step>/state) is stated here, below the train
package, so that mining and evaluation load trained models without importing it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from negjax.config import ModelConfig, load_config
from negjax.errors import NegjaxError
from negjax.model.encoder import Encoder, load_encoder

CONFIG_NAME = "config.toml"      # the resolved config of a training run, in its workdir
CHECKPOINTS = "checkpoints"      # orbax: one directory per step
STATE_ITEM = "state"             # the TrainState item of a checkpoint (params["model"] inside)
META_ITEM = "meta"               # its JSON item (data iterator state, negatives in use, step)
BUILT_IN = ("tiny", "minilm")


def find_checkpoint(path) -> tuple[Path, Path, int]:
    """(workdir, checkpoints dir, step) from a workdir, its checkpoints dir or a step dir."""
    path = Path(path).absolute()
    candidates = [(path, path / CHECKPOINTS, None), (path.parent, path, None)]
    if path.name.isdigit():
        candidates.insert(0, (path.parent.parent, path.parent, int(path.name)))
    for workdir, ckdir, step in candidates:
        if (workdir / CONFIG_NAME).is_file() and ckdir.is_dir():
            steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
            if not steps:
                raise NegjaxError(f"{ckdir}: no checkpoints")
            if step is None:
                step = steps[-1]
            elif step not in steps:
                raise NegjaxError(f"{ckdir}: no checkpoint for step {step}")
            return workdir, ckdir, step
    raise NegjaxError(f"{path}: not a training workdir or checkpoint "
                      f"(expected {CONFIG_NAME} and {CHECKPOINTS}/<step>/)")


def is_training_checkpoint(path) -> bool:
    """True for a training workdir, its checkpoints dir or a step dir (by their config.toml)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path.parent / CONFIG_NAME).is_file() or \
        (path.name.isdigit() and (path.parent.parent / CONFIG_NAME).is_file())


def restore_model_params(ckdir: Path, step: int) -> dict:
    """The encoder params (`state.params["model"]`, tower layout) of checkpoint `step` as
    numpy arrays, whatever topology (devices, processes) the run that saved it had: the
    target of the restore is the saved tree's own metadata, placed on this process' first
    device."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(ckdir, item_handlers=handlers) as mgr:
        meta = mgr.item_metadata(step)[STATE_ITEM]
        tree = getattr(meta, "tree", meta)
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = mgr.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(like)}))
    state = restored[STATE_ITEM]
    params = state["params"] if isinstance(state, dict) else state.params
    return jax.tree.map(np.asarray, params["model"])


def _encoder_of(name: str, model_cfg: ModelConfig | None) -> tuple[Encoder, dict | None]:
    """(encoder, run info or None) for NAME without restoring a training checkpoint's params."""
    if name not in BUILT_IN and is_training_checkpoint(name):
        workdir, ckdir, step = find_checkpoint(name)
        saved = load_config(workdir / CONFIG_NAME).model
        enc, _ = _encoder_of(saved.name, saved)
        return enc, {"path": str(workdir), "step": int(step), "checkpoint": str(ckdir / str(step)),
                     "_ckdir": ckdir}
    if name not in BUILT_IN and not Path(name).expanduser().exists():
        raise NegjaxError(f"{name}: model not found (expected 'tiny', 'minilm', a Hugging Face "
                          "directory, or a training workdir / checkpoint directory)")
    cfg = dataclasses.replace(model_cfg or ModelConfig(), name=name)
    return load_encoder(cfg), None


def load_model(name: str | None = None, model_cfg: ModelConfig | None = None
               ) -> tuple[Encoder, dict, dict]:
    """`--model NAME` -> (encoder, params in its tower layout, info {"path", "step", ...}).

    NAME None: `model_cfg.name`. See the module docstring for the accepted names."""
    if name is None:
        if model_cfg is None:
            raise NegjaxError("no model given")
        name = model_cfg.name
    name = str(name)
    enc, run = _encoder_of(name, model_cfg)
    if run is None:
        path = name if name in BUILT_IN else str(Path(name).expanduser().resolve())
        return enc, enc.params, {"path": path, "step": None}
    params = restore_model_params(run.pop("_ckdir"), run["step"])
    return enc, params, run
