"""Training checkpoints with orbax: one directory per step under WORKDIR/checkpoints holding

- `state`: the TrainState (params, optimizer state, step, skip counter, memory bank) — arrays;
- `meta`:  JSON — the data iterator state, the hard-negative directory (and its manifest's
  sha256) in use, the seed, the step and the dev metrics.

The rng needs no storage: every random choice derives from (train.seed, step). Saving is
asynchronous; the last `keep` checkpoints are kept plus the best one by `best_metric`.
The workdir layout (config.toml, checkpoints/<step>/state) is defined in
`negjax.model.loader`, whose `load_model(workdir)` turns a checkpoint back into (encoder,
params) for export, evaluation and mining.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax

from negjax.config import Config, CheckpointConfig, load_config
from negjax.errors import NegjaxError
from negjax.model.loader import CONFIG_NAME, META_ITEM, STATE_ITEM


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
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=(STATE_ITEM, META_ITEM))

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


def save_run_config(cfg: Config, workdir: Path) -> None:
    """Write the resolved config into the workdir (what `load_model` rebuilds from); a
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
