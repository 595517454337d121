"""Training checkpoints with orbax: one directory per step under WORKDIR/checkpoints holding

- `state`: the TrainState (params, optimizer state, step, skip counter, memory bank) — arrays;
- `meta`:  JSON — the data iterator state, the hard-negative directory (and its manifest's
  sha256) in use, the seed, the step and the dev metrics.

The rng needs no storage: every random choice derives from (train.seed, step). Saving is
asynchronous; the last `keep` checkpoints are kept plus the best one by `best_metric`.
`load_trained(path)` turns a workdir or a step directory back into (encoder, params) for
export, evaluation and mining.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from negjax.config import Config, CheckpointConfig, load_config
from negjax.errors import NegjaxError

CONFIG_NAME = "config.toml"


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager` (see the module docstring)."""

    def __init__(self, directory, cfg: CheckpointConfig):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self.dir = Path(directory).absolute()
        policies = [cm.LatestN(n=cfg.keep)]
        if cfg.best_metric:
            metric = cfg.best_metric
            policies.append(cm.BestN(get_metric_fn=lambda m: m[metric], reverse=False, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
        import orbax.checkpoint as ocp

        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)

    def restore(self, step: int, like_state):
        """(state, meta) of `step`; `like_state` gives structure, shapes and shardings."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def manifest_digest(negatives_dir: str) -> str:
    """sha256 of a hard-negative directory's manifest.json ('' for none)."""
    if not negatives_dir:
        return ""
    path = Path(negatives_dir) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _find_checkpoint(path: Path) -> tuple[Path, Path, int]:
    """(workdir, checkpoints dir, step) from a workdir, its checkpoints dir or a step dir."""
    path = path.absolute()
    candidates = [(path, path / "checkpoints", None), (path.parent, path, None)]
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
    raise NegjaxError(f"{path}: not a negjax training workdir or checkpoint "
                      f"(expected {CONFIG_NAME} and checkpoints/<step>/)")


def is_training_checkpoint(path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path.parent / CONFIG_NAME).is_file() or \
        (path.name.isdigit() and (path.parent.parent / CONFIG_NAME).is_file())


def load_trained(path, *, tower: str | None = None):
    """(enc, params, info) from a training workdir (latest checkpoint), its checkpoints dir
    or one step directory. params are the encoder params (tower layout) as numpy arrays."""
    import orbax.checkpoint as ocp

    from negjax.model import load_encoder

    from negjax.train.state import init_state

    workdir, ckdir, step = _find_checkpoint(Path(path))
    cfg = load_config(workdir / CONFIG_NAME)
    enc = load_encoder(cfg.model)
    # The target tree says "everything on this process' first device", whatever topology
    # (devices, processes) the run that saved it had.
    like = jax.eval_shape(lambda p: init_state(p, cfg, dim=enc.dim), enc.params)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    with ocp.CheckpointManager(ckdir, item_names=("state", "meta")) as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
    params = jax.tree.map(np.asarray, restored["state"].params["model"])
    info = {"path": str(workdir), "step": int(step), "checkpoint": str(ckdir / str(step))}
    return enc, params, info


def save_run_config(cfg: Config, workdir: Path) -> None:
    """Write the resolved config into the workdir (what `load_trained` rebuilds from); a
    resumed run must use the same config for the fields that shape the model."""
    from negjax.config import to_toml
    from negjax.utils import atomic_write_text

    path = workdir / CONFIG_NAME
    text = to_toml(cfg)
    if path.is_file():
        old = load_config(path)
        for section in ("model",):
            if getattr(old, section) != getattr(cfg, section):
                raise NegjaxError(f"{workdir}: holds a run with a different [{section}] config; "
                                  "use a new workdir or the same config")
    atomic_write_text(path, text)
