"""`negjax train`: the loop that connects the data pipeline, the jitted step and checkpoints.

    negjax train --config experiments/configs/tiny-wordnet.toml --set workdir=runs/tiny

Per step boundary, in order: re-mine (if `mining.every_steps` is due), evaluate (if
`train.eval_every` is due), checkpoint (if `checkpoint.every_steps` is due or on SIGTERM).
Restarting the same command resumes from the latest checkpoint and continues the same
sequence of batches; metrics.jsonl keeps exactly one line per step.

Outputs in the workdir: config.toml, checkpoints/<step>/, metrics.jsonl (one line per step),
eval.jsonl (one line per evaluation), tb/ (TensorBoard events), negatives/step_<s>/ (re-mined
hard negatives), diagnostics (cosine histograms over training).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np

from negjax.config import Config
from negjax.errors import NegjaxError
from negjax.utils import atomic_write_text, progress


def _check_inputs(cfg: Config) -> dict:
    """Fail before any work on bad paths and settings; returns the resolved dataset paths."""
    from negjax.data.pipeline import resolve_dataset

    if not cfg.workdir:
        raise NegjaxError("config key 'workdir' is empty: set it, e.g. --set workdir=runs/x")
    paths = resolve_dataset(cfg.data)
    for key in ("corpus", "train"):
        if paths.get(key) is None:
            raise NegjaxError(f"no {key} file: set data.{key} or data.dataset")
        if not Path(paths[key]).is_file():
            raise NegjaxError(f"{paths[key]}: {key} file not found")
    for key in ("dev_queries", "dev_qrels"):
        if paths.get(key) is not None and not Path(paths[key]).is_file():
            raise NegjaxError(f"{paths[key]}: {key} file not found")
    if cfg.data.negatives and not (Path(cfg.data.negatives) / "manifest.json").is_file():
        raise NegjaxError(f"{cfg.data.negatives}: not a hard-negative directory (no manifest.json)")
    if cfg.mining.every_steps and not cfg.data.num_negatives:
        raise NegjaxError("mining.every_steps needs data.num_negatives > 0 (mined negatives per query)")
    return paths


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))


class _Preemption:
    """SIGTERM -> save a checkpoint at the next step boundary and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_process(self) -> bool:
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.asarray(flags).any())


def _to_float(x) -> float:
    return float(np.asarray(x))


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns a summary dict (final step, last metrics, eval)."""
    import jax

    from negjax import distributed
    from negjax.data.pipeline import build_pipeline
    from negjax.evaluation.evaluate import EvalSet, evaluate_encoder
    from negjax.model import load_encoder
    from negjax.train.checkpoint import Checkpointer, manifest_digest, save_run_config
    from negjax.train.diagnostics import Diagnostics
    from negjax.train.state import init_state, learning_rate_schedule
    from negjax.train.step import make_train_step, place_state

    paths = _check_inputs(cfg)
    pi, pc = distributed.initialize(cfg.distributed)
    workdir = Path(cfg.workdir).absolute()
    main = pi == 0
    mesh = distributed.make_mesh()
    distributed.local_batch_size(cfg.train.batch_size, mesh)
    enc = load_encoder(cfg.model)
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, workdir)
    params = enc.params
    if cfg.model.name == "tiny":  # from scratch: initialisation follows the run's seed
        params = enc.init_params(jax.random.PRNGKey(cfg.train.seed))

    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    state = init_state(params, cfg, dim=enc.dim)
    negatives_dir = cfg.data.negatives
    start = 0
    latest = ckpt.latest_step()
    meta = None
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        start = int(meta["step"])
        negatives_dir = meta.get("negatives", "")
        if negatives_dir and manifest_digest(negatives_dir) != meta.get("negatives_sha256", ""):
            raise NegjaxError(f"{negatives_dir}: the hard negatives changed since checkpoint "
                              f"{latest} was written (manifest checksum differs)")
    cfg.data.negatives = negatives_dir
    pipeline = build_pipeline(cfg, enc.tokenizer, process_index=pi, process_count=pc)
    if meta is not None:
        pipeline.set_state(meta["data"])
    state = place_state(state, mesh)
    step_fn = make_train_step(enc, cfg, mesh, group_size=pipeline.group_size)
    lr_at = learning_rate_schedule(cfg.train)

    dev = None
    if paths.get("dev_queries") and paths.get("dev_qrels") and cfg.eval.split == "dev":
        dev = EvalSet.from_files(paths["corpus"], paths["dev_queries"], paths["dev_qrels"],
                                 max_queries=cfg.eval.max_queries)
    elif cfg.eval.split == "test":
        root = Path(paths["corpus"]).parent
        if (root / "test_queries.jsonl").is_file():
            dev = EvalSet.from_files(paths["corpus"], root / "test_queries.jsonl",
                                     root / "test_qrels.tsv", max_queries=cfg.eval.max_queries)

    metrics_path = workdir / "metrics.jsonl"
    eval_path = workdir / "eval.jsonl"
    writer = None
    if main:
        _truncate_jsonl(metrics_path, start)
        _truncate_jsonl(eval_path, start)
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"), purge_step=start + 1 if start else None)
    diagnostics = Diagnostics(workdir, enabled=main)
    last_eval: dict = {}

    def evaluate(step):
        nonlocal last_eval
        if dev is None or not main:
            return {}
        res = evaluate_encoder(enc, jax.device_get(state.params["model"]), dev,
                               batch_size=cfg.eval.batch_size, query_max_len=cfg.model.query_max_len,
                               doc_max_len=cfg.model.doc_max_len, index=cfg.eval.index)
        last_eval = res
        with open(eval_path, "a") as f:
            f.write(json.dumps({"step": step, **res}) + "\n")
        for k, v in res.items():
            writer.add_scalar(f"eval/{k}", v, step)
        return res

    def remine(step):
        nonlocal pipeline, negatives_dir
        from negjax.mining.job import run_mining

        out = workdir / "negatives" / f"step_{step}"
        manifest = run_mining(enc, jax.device_get(state.params["model"]), corpus_path=paths["corpus"],
                              train_path=paths["train"], out_dir=out, mining_cfg=cfg.mining,
                              query_max_len=cfg.model.query_max_len, doc_max_len=cfg.model.doc_max_len,
                              model_info={"path": str(workdir), "step": step})
        data_state = pipeline.get_state()
        pipeline.close()
        negatives_dir = str(out)
        cfg.data.negatives = negatives_dir
        pipeline = build_pipeline(cfg, enc.tokenizer, process_index=pi, process_count=pc)
        pipeline.set_state(data_state)
        return manifest

    def save(step, metrics=None):
        meta = {"step": step, "data": pipeline.get_state(), "negatives": negatives_dir,
                "negatives_sha256": manifest_digest(negatives_dir), "seed": cfg.train.seed}
        ckpt.save(step, state, meta, metrics=metrics or None)

    total = cfg.train.steps
    bar = progress(total=total, desc="train", unit="step", disable=None if main else True)
    bar.update(start)
    examples = 0
    t_last = time.perf_counter()
    status = "finished"
    from negjax.distributed import global_batch_from_local

    with _Preemption() as preempt:
        step = start
        while step < total:
            local = next(pipeline)
            batch = global_batch_from_local(local, mesh)
            state, m = step_fn(state, batch)
            m = {k: _to_float(v) for k, v in jax.device_get(m).items()}
            step += 1
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            examples += cfg.train.batch_size
            rec = {"step": step, **m, "lr": float(lr_at(step - 1)), "step_time": dt,
                   "examples_per_s": cfg.train.batch_size / dt if dt > 0 else 0.0}
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                for k, v in rec.items():
                    if k != "step" and isinstance(v, float) and math.isfinite(v):
                        writer.add_scalar(f"train/{k}", v, step)
                diagnostics.maybe_record(step, enc, state, local, cfg)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}",
                                ex_s=f"{rec['examples_per_s']:.0f}")
                bar.update(1)
            nonfinite = int(state.nonfinite)
            if nonfinite > cfg.train.max_nonfinite:
                raise NegjaxError(f"training diverged: {nonfinite} steps had a NaN/Inf loss or "
                                  f"gradient (limit train.max_nonfinite={cfg.train.max_nonfinite}); "
                                  "lower train.learning_rate or check the data")
            if cfg.mining.every_steps and step % cfg.mining.every_steps == 0 and step < total:
                remine(step)
            ev = None
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                ev = evaluate(step)
            stop = step < total and preempt.any_process()
            if step % cfg.checkpoint.every_steps == 0 or step == total or stop:
                if step == total and dev is not None:
                    ev = evaluate(step)
                save(step, ev)
            if stop:
                status = "preempted"
                break
    bar.close()
    ckpt.close()
    pipeline.close()
    if writer is not None:
        writer.close()
    diagnostics.close()
    return {"status": status, "step": step, "workdir": str(workdir), "eval": last_eval,
            "nonfinite": int(state.nonfinite), "data_stats": pipeline.stats}
