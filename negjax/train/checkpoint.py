"""Training checkpoints with orbax: one directory per step under WORKDIR/checkpoints holding

- `state`: the TrainState (params, optimizer state, step, skip counter, memory bank) — arrays;
- `meta`:  JSON — the data iterator state, the hard-negative directory (and its manifest's
  sha256) in use, the seed, the step and the dev metrics.

The rng needs no storage: every random choice derives from (train.seed, step). Saving is
asynchronous; the last `keep` checkpoints are kept plus the best one by `best_metric`.

Each step dir also holds `checksums.json` (sha256 per file, `negjax.model.loader.write_checksums`).
It is written by orbax's post-finalization callback: in the background, on process 0, after
every process has written its files and before orbax renames `<step>.orbax-checkpoint-tmp`
to `<step>`; so a committed step always has its checksums (orbax is always run in async mode
for this; `async_save = false` waits for the save to finish). `select_checkpoint` picks the
newest step that verifies for a resume.
The workdir layout (config.toml, checkpoints/<step>/state) is defined in
`negjax.model.loader`, whose `load_model(workdir)` turns a checkpoint back into (encoder,
params) for export, evaluation and mining.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from negjax.config import Config, CheckpointConfig, load_config
from negjax.errors import NegjaxError
from negjax.model.loader import (CONFIG_NAME, META_ITEM, STATE_ITEM, verify_checkpoint,
                                  write_checksums)

DAMAGED = "checkpoints.damaged"  # in the workdir: damaged steps moved aside on resume


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
        # Always orbax's async checkpointer: only it runs the callback that writes the
        # checksums before the step is committed; a synchronous save waits for it.
        self.sync = not cfg.async_save
        self._saving: int | None = None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True, create=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=(STATE_ITEM, META_ITEM))

    def _write_checksums(self) -> None:
        """orbax's post-finalization callback (process 0, background thread): the step's files
        are complete and still in orbax's temporary directory, which is renamed next. An
        error here leaves the step uncommitted (and surfaces on the next save or wait)."""
        step = self._saving
        tmp = sorted(self.dir.glob(f"{step}.orbax-checkpoint-tmp*"), key=lambda p: p.stat().st_mtime)
        target = tmp[-1] if tmp else self.dir / str(step)  # commit-file filesystems: in place
        if not (target / STATE_ITEM).is_dir():
            raise RuntimeError(f"checkpoint {step}: no directory to checksum in {self.dir}")
        write_checksums(target)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
        import orbax.checkpoint as ocp

        if step in self.manager.all_steps():
            return False
        self.manager.wait_until_finished()  # one save (and its checksum callback) at a time
        self._saving = step
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        if self.sync:
            self.manager.wait_until_finished()
        return saved

    def restore(self, step: int, abstract_state):
        """(state, meta) of `step`, read straight into the shardings of `abstract_state` (a
        tree of `jax.ShapeDtypeStruct` with `sharding`, e.g. `abstract_train_state`): each
        process reads only the shards its devices hold, whatever mesh wrote the checkpoint,
        and nothing moves between processes."""
        import orbax.checkpoint as ocp

        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def select_checkpoint(ckdir, *, move_damaged: bool = False) -> int | None:
    """The newest step under `ckdir` whose checksums verify (or that has none: written before
    checksums existed), None when there is no checkpoint. Each newer damaged step is
    reported with a warning naming it; with `move_damaged` (process 0 of a resume) it is
    moved to WORKDIR/checkpoints.damaged/ so that the run saves that step afresh and
    `load_model(workdir)` finds the good one. NegjaxError, with nothing moved, when checkpoints
    exist and none verifies."""
    import shutil

    from negjax.errors import warn

    ckdir = Path(ckdir)
    steps = sorted((int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and p.is_dir()),
                   reverse=True) if ckdir.is_dir() else []
    damaged: list[tuple[int, str]] = []
    for step in steps:
        try:
            verify_checkpoint(ckdir / str(step))
        except NegjaxError as e:
            damaged.append((step, str(e)))
            continue
        for bad, why in damaged:
            note = ""
            if move_damaged:
                dest = ckdir.parent / DAMAGED / str(bad)
                k = 1
                while dest.exists():
                    dest, k = ckdir.parent / DAMAGED / f"{bad}-{k}", k + 1
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(ckdir / str(bad)), str(dest))
                note = f"; moved to {dest}"
            warn(f"{why}; resuming from checkpoint {step} instead{note}")
        return step
    if damaged:
        raise NegjaxError(f"{damaged[0][1]}; no checkpoint in {ckdir} verifies "
                          f"(steps {', '.join(str(s) for s, _ in damaged)}): restore one from a "
                          "backup or start over in a new workdir")
    return None


def manifest_digest(negatives_dir):
    """sha256 of a hard-negative directory's manifest.json ('' for none); of a multi-source
    run's {source: directory}, {source: sha256}."""
    if isinstance(negatives_dir, dict):
        return {name: manifest_digest(d) for name, d in negatives_dir.items()}
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
