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
towers, ...) come from `model_cfg`; a training checkpoint brings its own, except that
`model_cfg.dtype='int8'` (int8 encoding) applies to it too. The layout of a
training workdir (config.toml, checkpoints/<step>/state) is stated here, below the train
package, so that mining and evaluation load trained models without importing it.

Every checkpoint written since checksums were introduced holds `checksums.json` (the sha256
of each file of its items, written at save before orbax commits the step); loading a step
verifies it and refuses a damaged one by name. A checkpoint without the file (older runs)
loads unverified, as before.
"""

from __future__ import annotations

import dataclasses
import json
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
CHECKSUMS = "checksums.json"     # in a step dir: sha256 of every file of its items
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


def write_checksums(step_dir) -> dict:
    """Write CHECKSUMS into `step_dir`: {name, bytes, sha256} of every file under its items
    (the shard manifest's scheme, `negjax.data.shards`). Returns what it wrote."""
    from negjax.utils import atomic_write_text, sha256_file

    step_dir = Path(step_dir)
    files = []
    for item in (STATE_ITEM, META_ITEM):
        for path in sorted((step_dir / item).rglob("*")):
            if path.is_file():
                files.append({"name": path.relative_to(step_dir).as_posix(),
                              "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    if not files:
        raise NegjaxError(f"{step_dir}: no checkpoint files to checksum")
    out = {"format_version": 1, "files": files}
    atomic_write_text(step_dir / CHECKSUMS, json.dumps(out, indent=1) + "\n")
    return out


def verify_checkpoint(step_dir) -> bool:
    """Check a step dir against its CHECKSUMS (size, then sha256 of every listed file).
    NegjaxError naming the checkpoint and the file when one is missing or differs; False when
    the step has no CHECKSUMS (written before checksums existed: not verifiable), else True."""
    from negjax.utils import sha256_file

    step_dir = Path(step_dir)
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return False
    what = f"checkpoint {step_dir} is damaged"
    try:
        files = json.loads(path.read_text())["files"]
        listed = [(f["name"], int(f["bytes"]), str(f["sha256"])) for f in files]
    except (ValueError, KeyError, TypeError) as e:
        raise NegjaxError(f"{what}: unreadable {CHECKSUMS} ({e})") from None
    for name, size, digest in listed:
        f = step_dir / name
        if not f.is_file():
            raise NegjaxError(f"{what}: {name} is missing")
        if f.stat().st_size != size:
            raise NegjaxError(f"{what}: {name} has {f.stat().st_size} bytes, {CHECKSUMS} says {size}")
        got = sha256_file(f)
        if got != digest:
            raise NegjaxError(f"{what}: {name} sha256 {got[:12]}... does not match {CHECKSUMS} "
                              f"({digest[:12]}...)")
    return True


def restore_model_params(ckdir: Path, step: int) -> dict:
    """The encoder params (`state.params["model"]`, tower layout) of checkpoint `step` as
    numpy arrays, whatever topology (devices, processes) the run that saved it had."""
    return jax.tree.map(np.asarray, _restore_state(ckdir, step)["params"]["model"])


def restore_state_arrays(ckdir: Path, step: int) -> dict:
    """The whole train state of checkpoint `step` (params, optimizer, memory bank, ...) as a
    tree of numpy arrays, whatever topology the run that saved it had."""
    return jax.tree.map(np.asarray, _restore_state(ckdir, step))


def _restore_state(ckdir: Path, step: int) -> dict:
    """The train state of checkpoint `step` on this process' first device: the target of the
    restore is the saved tree's own metadata, so any saving topology restores."""
    import orbax.checkpoint as ocp

    verify_checkpoint(Path(ckdir) / str(step))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(ckdir, item_handlers=handlers) as mgr:
        meta = mgr.item_metadata(step)[STATE_ITEM]
        tree = getattr(meta, "tree", meta)
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = mgr.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(like)}))
    return restored[STATE_ITEM]


def saved_config(name):
    """The `Config` a training workdir / checkpoint NAME was trained with (its config.toml), or
    None when NAME is not one ('tiny', 'minilm', a model directory)."""
    if name is None or str(name) in BUILT_IN or not is_training_checkpoint(name):
        return None
    workdir, _, _ = find_checkpoint(name)
    return load_config(workdir / CONFIG_NAME)


def _encoder_of(name: str, model_cfg: ModelConfig | None) -> tuple[Encoder, dict | None]:
    """(encoder, run info or None) for NAME without restoring a training checkpoint's params."""
    if name not in BUILT_IN and is_training_checkpoint(name):
        workdir, ckdir, step = find_checkpoint(name)
        saved = load_config(workdir / CONFIG_NAME).model
        if model_cfg is not None and model_cfg.dtype == "int8":  # how to encode, not the model
            saved = dataclasses.replace(saved, dtype="int8")
        enc, _ = _encoder_of(saved.name, saved)
        if model_cfg is not None:  # prompts set where the model is named win over the run's
            given = {"query": model_cfg.query_prompt, "doc": model_cfg.doc_prompt}
            enc = enc.with_prompts({t: v for t, v in given.items() if v})
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
