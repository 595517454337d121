"""`negjax train`: the loop that connects the data pipeline, the jitted step and checkpoints.

    negjax train --config experiments/configs/tiny-wordnet.toml --set workdir=runs/tiny

Per step boundary, in order: re-mine (if `mining.every_steps` is due), evaluate (if
`train.eval_every` is due), checkpoint (if `checkpoint.every_steps` is due or on SIGTERM).
Restarting the same command resumes from the latest checkpoint and continues the same
sequence of batches; metrics.jsonl keeps exactly one line per logging window (below).

`Trainer` holds what changes during a run (state, pipeline, the hard-negative directory in
use); the config stays as loaded. `model.name` may also be a training workdir or checkpoint
(continue from its weights; `negjax.model.loader`).

Outputs in the workdir: config.toml, checkpoints/<step>/, metrics.jsonl (one line per logging
window: the means over `window_steps` steps ending at `step`, written every `train.log_every`
steps and at every evaluation, re-mining and checkpoint),
eval.jsonl (one line per evaluation), tb/ (TensorBoard events), negatives/step_<s>/ (re-mined
hard negatives), diagnostics (cosine histograms over training).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import weakref
from collections import deque
from pathlib import Path

import jax
import numpy as np

from negjax import compile_cache, distributed
from negjax.config import Config
from negjax.data.layout import resolve_dataset
from negjax.data.pipeline import build_pipeline
from negjax.data.sources import any_without_in_batch, build_sources_pipeline, sources_of
from negjax.data.records import input_kind
from negjax.errors import NegjaxError
from negjax.evaluation.evaluate import EvalSet, evaluate_encoder
from negjax.mining.job import run_mining
from negjax.model.loader import load_model
from negjax.model.loader import CHECKPOINTS, CONFIG_NAME
from negjax.multihost import Watchdog
from negjax.train.checkpoint import (Checkpointer, manifest_digest, save_run_config,
                                     select_checkpoint)
from negjax.train.diagnostics import Diagnostics
from negjax.train.state import init_state, learning_rate_schedule, relayout_bank
from negjax.train.sharding import state_shardings
from negjax.train.step import make_train_step
from negjax.train.workdir_lock import WorkdirLock
from negjax.utils import atomic_write_text, log, process_age, progress


def _check_inputs(cfg: Config) -> dict:
    """Fail before any work on bad paths and settings; returns the resolved dataset paths of
    every source ({name: paths}; one source, 'default', without [[data.sources]])."""
    if not cfg.workdir:
        raise NegjaxError("config key 'workdir' is empty: set it, e.g. --set workdir=runs/x")
    out = {}
    for src in sources_of(cfg):
        where = f"data source {src.name!r}: " if cfg.data.sources else ""
        key_of = (lambda k: f"data.sources.{k}") if cfg.data.sources else (lambda k: f"data.{k}")
        d = src.data
        try:
            paths = resolve_dataset(d)
        except NegjaxError as e:
            if not where:
                raise
            raise NegjaxError(f"{where}{str(e).replace('data.dataset', 'dataset')}") from None
        for key in ("corpus", "train"):
            if paths.get(key) is None:
                raise NegjaxError(f"{where}no {key} file: set {key_of(key)} or {key_of('dataset')}")
            if not Path(paths[key]).exists():
                raise NegjaxError(f"{where}{paths[key]}: {key} file not found")
            input_kind(paths[key])  # a file, or a Parquet / Arrow directory: else a clear error
        for key in ("dev_queries", "dev_qrels"):
            if paths.get(key) is not None and not Path(paths[key]).exists():
                raise NegjaxError(f"{where}{paths[key]}: {key} file not found")
        if d.negatives and not d.num_negatives:
            raise NegjaxError(f"{where}{key_of('negatives')}={d.negatives!r} is set but "
                              f"{key_of('num_negatives')} is 0, so no mined negative would be "
                              "used: set it (hard negatives per query)")
        if d.negatives and not (Path(d.negatives) / "manifest.json").is_file():
            raise NegjaxError(f"{where}{d.negatives}: not a hard-negative directory (no manifest.json)")
        if cfg.mining.every_steps and not d.num_negatives:
            raise NegjaxError(f"{where}mining.every_steps needs {key_of('num_negatives')} > 0 "
                              "(mined negatives per query)")
        out[src.name] = paths
    _check_resume_negatives(cfg)
    return out


def _check_resume_negatives(cfg: Config) -> None:
    """A resume (a checkpoint exists in the workdir) must name the hard negatives the run
    started with: the `data.negatives` of the workdir's config.toml, written when the run
    started (a resume that passes rewrites it unchanged). Not the checkpoint's own
    `negatives`: a run that re-mines (`mining.every_steps`) continues on
    WORKDIR/negatives/step_N, so the same command must still resume it. A different
    `data.negatives` (or one added or dropped) is refused naming both directories; equal
    strings or paths that resolve to the same directory pass."""
    workdir = Path(cfg.workdir)
    saved, ckdir = workdir / CONFIG_NAME, workdir / CHECKPOINTS
    if not saved.is_file() or not ckdir.is_dir() or not any(p.name.isdigit() for p in ckdir.iterdir()):
        return
    import tomllib

    try:
        data = tomllib.loads(saved.read_text()).get("data", {})
    except (tomllib.TOMLDecodeError, OSError):
        return  # not ours to judge here; save_run_config reports a broken config.toml
    if cfg.data.sources:
        started = {s.get("name"): s.get("negatives", "") for s in data.get("sources", [])}
        pairs = [(f"data.sources[{s.name}].negatives", started.get(s.name, ""), s.negatives)
                 for s in cfg.data.sources]
    else:
        pairs = [("data.negatives", data.get("negatives", ""), cfg.data.negatives)]
    for key, started, given in pairs:
        if started == given or (started and given and
                                Path(started).resolve() == Path(given).resolve()):
            continue
        raise NegjaxError(f"{workdir}: resuming a run started with {key}="
                          f"{started or '(none)'} but {key}={given or '(none)'} was given; resume "
                          "with the run's own negatives (re-mined lists are picked up from the "
                          "checkpoint) or train in a new workdir")


def _claim_workdir(workdir: Path, main: bool, count: int):
    """Process 0 locks the workdir (`WorkdirLock`) and picks the checkpoint to resume from
    (`select_checkpoint`: the newest that verifies, damaged newer ones moved aside); the other
    processes learn the step, or that process 0 refused, from one broadcast. Returns
    (lock or None, step or None)."""
    lock, step, err = None, None, None
    if main:
        try:
            lock = WorkdirLock(workdir).acquire()
            step = select_checkpoint(workdir / CHECKPOINTS, move_damaged=True)
        except NegjaxError as e:
            err = e
            if lock is not None:
                lock.release()
    if count > 1:
        from jax.experimental import multihost_utils

        got = np.asarray(multihost_utils.broadcast_one_to_all(
            np.array([err is not None, -1 if step is None else step], np.int32)))
        if not main:
            if got[0]:
                raise NegjaxError(f"{workdir}: process 0 refused the run (its error says why)")
            step = None if got[1] < 0 else int(got[1])
    if err is not None:
        raise err
    return lock, step


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
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.asarray(flags).any())


def _topology(mesh) -> dict:
    """Who trains: processes, devices (all of them split the batch) and the mesh's axes."""
    return {"processes": jax.process_count(), "devices": jax.device_count(),
            "mesh": {str(k): int(v) for k, v in mesh.shape.items()}}


def _describe(t: dict) -> str:
    p, d = t["processes"], t["devices"]
    mesh = " x ".join(f"{k} {v}" for k, v in t["mesh"].items())
    return f"{p} process{'es' if p > 1 else ''} x {d // p} device{'s' if d // p > 1 else ''} ({mesh})"


def _to_float(x) -> float:
    return float(np.asarray(x))


@jax.jit
def _add(window: dict, metrics: dict) -> dict:
    """Metric sums of a logging window, kept on the devices."""
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), window, metrics)


def macro_average(per_source: dict) -> dict:
    """The mean over sources of each metric ('queries': their sum)."""
    keys = [k for k in next(iter(per_source.values())) if all(k in r for r in per_source.values())]
    return {k: (sum(r[k] for r in per_source.values()) if k == "queries" else
                float(np.mean([r[k] for r in per_source.values()]))) for k in keys}


def _eval_sets(cfg: Config, paths: dict, sources, enc) -> dict:
    """{source name: (the encoder with the source's prompts, its `EvalSet`)} of the sources
    that have the split `eval.split` (collective)."""
    out = {}
    for src in sources:
        senc = enc.with_prompts(src.prompts)
        ev = _eval_set(cfg, paths[src.name], senc)
        if ev is not None:
            out[src.name] = (senc, ev)
    return out


def _eval_set(cfg: Config, paths: dict, enc) -> EvalSet | None:
    """The split evaluated during training (`eval.split`), or None; its corpus a token store
    (collective)."""
    split = cfg.eval.split
    if split == "none":
        return None
    queries, qrels = paths.get(f"{split}_queries"), paths.get(f"{split}_qrels")
    beside = Path(paths["corpus"]).parent  # a corpus given as a file: look beside it
    if queries is None and (beside / f"{split}_queries.jsonl").is_file():
        queries, qrels = beside / f"{split}_queries.jsonl", beside / f"{split}_qrels.tsv"
    if queries is None or qrels is None:
        return None
    return EvalSet.from_files(paths["corpus"], queries, qrels, max_queries=cfg.eval.max_queries,
                              encoder=enc, doc_max_len=cfg.model.doc_max_len,
                              cache_dir=cfg.data.cache_dir or None)


class Trainer:
    """One training run (see the module docstring); `run()` trains to `train.steps`."""

    def __init__(self, cfg: Config, paths: dict, watchdog: Watchdog | None = None):
        self.cfg, self.paths = cfg, paths
        self.watchdog = watchdog  # told the step, for the message naming a lost process
        # Time to first step, by phase (logged after the first step).
        self.phases, self._t_phase = {"start-up": process_age()}, time.perf_counter()
        self.time_to_first_step: dict | None = None  # the phases' figures, after step 1
        self.pi, self.pc = distributed.initialize(cfg.distributed)
        self.main = self.pi == 0
        self.workdir = Path(cfg.workdir).absolute()
        self.mesh = distributed.make_mesh(fsdp=cfg.distributed.fsdp)
        distributed.local_batch_size(cfg.train.batch_size, self.mesh)
        if cfg.model.dtype == "int8":
            raise NegjaxError("model.dtype 'int8' is for encoding only (encode, eval, mine); "
                              "train in float32 or bfloat16")
        self.enc, params, _ = load_model(None, cfg.model)
        self._phase("model")
        for key in ("query_max_len", "doc_max_len"):
            if getattr(cfg.model, key) > self.enc.config.max_tokens:
                raise NegjaxError(f"model.{key} = {getattr(cfg.model, key)} exceeds the "
                                  f"{self.enc.config.max_tokens} tokens the model's position "
                                  "embeddings cover")
        too_big = [k for k in cfg.loss.matryoshka_dims if k > self.enc.dim]
        if too_big:
            raise NegjaxError(f"loss.matryoshka_dims {too_big}: the model's embeddings have "
                              f"{self.enc.dim} dimensions")
        lock, resume_step = _claim_workdir(self.workdir, self.main, self.pc)  # before any write
        self._unlock = weakref.finalize(self, lock.release) if lock else lambda: None
        if self.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            save_run_config(cfg, self.workdir)
        if cfg.model.name == "tiny":  # from scratch: initialisation follows the run's seed
            params = self.enc.init_params(jax.random.PRNGKey(cfg.train.seed))
        self.ckpt = Checkpointer(self.workdir / "checkpoints", cfg.checkpoint)
        fresh = lambda: init_state(params, cfg, dim=self.enc.dim)  # noqa: E731
        shardings = state_shardings(jax.eval_shape(fresh), self.mesh)
        # The data sources (one, 'default', without [[data.sources]]) and the hard negatives in
        # use: a directory, or {source: directory} with sources (re-mining replaces them).
        self.sources, self.multi = sources_of(cfg, self.enc.prompts), bool(cfg.data.sources)
        self.negatives_dir = ({s.name: s.data.negatives for s in self.sources} if self.multi
                              else cfg.data.negatives)
        self.start, meta = 0, None
        if resume_step is not None:
            self.state, meta = self._restore(resume_step, fresh, shardings)
            self._phase("restore")
        else:
            self.state = jax.device_put(fresh(), shardings)
            self._phase("init")
        self.pipeline = self._pipeline(meta["data"] if meta is not None else None)
        if self.multi and self.main:
            self._log_sources()
        self._phase("data")
        if meta is not None:
            self._relayout_bank(meta.get("topology", _topology(self.mesh)), shardings)
        self.step_fn = make_train_step(self.enc, cfg, self.mesh,
                                       group_size=self.pipeline.group_size)
        self.lr_at = learning_rate_schedule(cfg.train)
        self.dev = _eval_sets(cfg, paths, self.sources, self.enc)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.eval_path = self.workdir / "eval.jsonl"
        self.writer = None
        if self.main:
            _truncate_jsonl(self.metrics_path, self.start)
            _truncate_jsonl(self.eval_path, self.start)
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.workdir / "tb"),
                                        purge_step=self.start + 1 if self.start else None)
        self.diagnostics = Diagnostics(self.workdir, enabled=self.main)
        self.last_eval: dict = {}          # (with sources: their macro average)
        self.last_eval_sources: dict = {}  # {source: metrics}, with sources
        self._phase("setup")

    def _phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t_phase
        self._t_phase = now

    def _log_first_step(self, loss, compiled_before: dict) -> None:
        """After the first step: the time since the process started and its phases, with
        what compiling cost and whether the persistent cache served it."""
        loss.block_until_ready()
        self._phase("first step")
        total = sum(self.phases.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        log(f"negjax train: first step {total:.1f} s after start ({parts}; first step: "
            f"{compile_cache.describe(compiled_before)})")
        self.time_to_first_step = {"total_s": round(total, 3),
                                   **{k: round(v, 3) for k, v in self.phases.items()},
                                   "compile": compile_cache.stats()}

    def _restore(self, step: int, fresh, shardings):
        """(state, meta) of checkpoint `step`, read straight into this run's shardings (each
        process its own shards; the writer's processes, devices and FSDP factor may differ).
        The memory bank is re-laid for a new device count; the log says what changed."""
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(fresh), shardings)
        state, meta = self.ckpt.restore(step, abstract)
        self.start = int(meta["step"])
        self.negatives_dir = meta.get("negatives", "")
        if isinstance(self.negatives_dir, dict) != self.multi:
            raise NegjaxError(f"checkpoint {step} is of a run {'without' if self.multi else 'with'} "
                              "[[data.sources]]: train this config in a new workdir")
        dirs = self.negatives_dir if self.multi else {"": self.negatives_dir}
        sha = meta.get("negatives_sha256", {} if self.multi else "")
        sha = sha if self.multi else {"": sha}
        for name, d in dirs.items():
            if d and manifest_digest(d) != sha.get(name, ""):
                raise NegjaxError(f"{d}: the hard negatives changed since checkpoint {step} "
                                  "was written (manifest checksum differs)")
        now = _topology(self.mesh)
        then = meta.get("topology", now)  # (checkpoints written before it was recorded)
        change = "" if then == now else f", written on {_describe(then)}, now on {_describe(now)}"
        log(f"negjax train: resuming from checkpoint {step}{change}")
        return state, meta

    def _relayout_bank(self, then: dict, shardings) -> None:
        """A memory bank written on another number of devices, laid out for this mesh
        (`relayout_bank`: same queue, same eviction order)."""
        now, state = _topology(self.mesh), self.state
        if state.bank is None or then["devices"] == now["devices"]:
            return
        bank, ids, ptr = relayout_bank(
            distributed.to_host(state.bank), distributed.to_host(state.bank_ids),
            int(distributed.to_host(state.bank_ptr)), old_devices=then["devices"],
            new_devices=now["devices"], docs_per_step=self.cfg.train.batch_size * self.pipeline.group_size)
        put = lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: a[i])  # noqa: E731
        self.state = state.replace(bank=put(bank, shardings.bank),
                                   bank_ids=put(ids, shardings.bank_ids),
                                   bank_ptr=put(np.asarray(ptr, np.int32), shardings.bank_ptr))

    def _pipeline(self, data_state: dict | None):
        if self.multi:
            pipe = build_sources_pipeline(self.cfg, self.enc.tokenizer, self.sources,
                                          negatives_dirs=self.negatives_dir,
                                          process_index=self.pi, process_count=self.pc)
        else:
            pipe = build_pipeline(self.cfg, self.enc.tokenizer, prompts=self.enc.prompts,
                                  negatives_dir=self.negatives_dir,
                                  process_index=self.pi, process_count=self.pc)
        if self.cfg.loss.distill and not pipe.has_teacher_scores:
            pipe.close()
            raise NegjaxError(f"loss.distill = {self.cfg.loss.distill!r} needs teacher scores: "
                              "give the training records \"pos_scores\" / \"neg_scores\" (one "
                              "number per \"pos\" / \"neg\" entry)")
        if data_state is not None:
            pipe.set_state(data_state)
        return pipe

    def _log_sources(self) -> None:
        """The sources at start: size, weight and the probability they get."""
        info = self.pipeline.info
        d = self.cfg.data
        how = d.source_sampling + (f" (alpha {d.source_temperature:g})"
                                   if d.source_sampling == "temperature" else "")
        per = (f", {info['sources_per_batch']} sources per global batch"
               if info["sources_per_batch"] > 1 else ", one source per global batch")
        lines = [f"negjax train: {len(info['sources'])} data sources, {how} sampling{per}:"]
        for s in info["sources"]:
            negs = "no hard negatives"
            if s["negatives"]:
                where = ("random documents" if s["negatives_source"] == "none"
                         else s["negatives_source"])
                negs = f"{s['negatives']} hard negatives per query from {where}"
            lines.append(f"  {s['name']}: {s['queries']} queries, {s['documents']} documents, "
                         f"weight {s['weight']:g}, p = {s['probability']:.3f}, {negs}"
                         + ("" if s["in_batch_negatives"] else ", no in-batch negatives"))
        log("\n".join(lines))

    def _model_params(self):
        """Host copies of the encoder's parameters (gathered from their FSDP shards)."""
        return distributed.to_host(self.state.params["model"])

    def evaluate(self, step: int) -> dict:
        """Collective: every process encodes a slice of the dev corpus and queries; all return
        the same metrics; process 0 writes them."""
        if not self.dev:
            return {}
        c = self.cfg
        params = self._model_params()
        per = {name: evaluate_encoder(senc, params, ev, batch_size=c.eval.encode_batch_size,
                                      query_max_len=c.model.query_max_len,
                                      doc_max_len=c.model.doc_max_len, index=c.eval.index)
               for name, (senc, ev) in self.dev.items()}
        res = macro_average(per) if self.multi else per["default"]
        self.last_eval = res
        if not self.main:
            return res
        with open(self.eval_path, "a") as f:
            f.write(json.dumps({"step": step, **res, **({"sources": per} if self.multi else {})})
                    + "\n")
        for k, v in res.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        if self.multi:
            for name, r in per.items():
                for k, v in r.items():
                    self.writer.add_scalar(f"eval/{name}/{k}", v, step)
            self.last_eval_sources = per
        return res

    def remine(self, step: int) -> dict:
        """Mine with the current parameters into negatives/step_<step>; the pipeline continues
        its sequence of batches with the new lists."""
        c = self.cfg
        out = self.workdir / "negatives" / f"step_{step}"
        params = self._model_params()
        manifests, dirs = {}, {}
        for src in self.sources:  # with sources: each against its own corpus, its own prompts
            paths = self.paths[src.name]
            where = out / src.name if self.multi else out
            manifests[src.name] = run_mining(
                self.enc.with_prompts(src.prompts), params, corpus_path=paths["corpus"],
                train_path=paths["train"], out_dir=where, mining_cfg=c.mining,
                query_max_len=c.model.query_max_len, doc_max_len=c.model.doc_max_len,
                model_info={"path": str(self.workdir), "step": step},
                train_qrels=paths.get("train_qrels"),
                teacher_scores=c.mining.teacher_scores or None,
                cache_dir=c.data.cache_dir or None)
            dirs[src.name] = str(where)
        data_state = self.pipeline.get_state()
        self.pipeline.close()
        self.negatives_dir = dirs if self.multi else dirs["default"]
        self.pipeline = self._pipeline(data_state)
        return manifests if self.multi else manifests["default"]

    def save(self, step: int, metrics: dict | None = None) -> None:
        meta = {"step": step, "data": self.pipeline.get_state(), "negatives": self.negatives_dir,
                "negatives_sha256": manifest_digest(self.negatives_dir), "seed": self.cfg.train.seed,
                "topology": _topology(self.mesh)}
        self.ckpt.save(step, self.state, meta, metrics=metrics or None)

    def _flush(self, step: int, preempt=None) -> bool:
        """A logging point: fetch the window's metric sums (one device-to-host transfer), write
        one metrics.jsonl line of window means, check the non-finite counter, record
        diagnostics; returns whether any process asked to stop (preemption agreement)."""
        c = self.cfg
        with jax.transfer_guard_device_to_host("allow"):
            if self._window is not None:
                diag = self.diagnostics.due(step, c)
                drawn, self._window_sources = self._window_sources, []
                sums, nonfinite, sample, losses = jax.device_get(
                    (self._window, self.state.nonfinite, self._sample if diag else None,
                     [loss for _, loss in drawn]))
                self.fetches += 1
                n = step - self._window_start
                now = time.perf_counter()
                dt = (now - self._t_window) / max(n, 1)
                self._t_window, self._window, self._window_start = now, None, step
                m = {k: _to_float(v) / n for k, v in sums.items()}
                m.update(self._data_window([srcs for srcs, _ in drawn], losses))
                if self.main:
                    self._log_window(step, n, m, dt)
                if int(nonfinite) > c.train.max_nonfinite:
                    raise NegjaxError(
                        f"training diverged: {int(nonfinite)} steps had a NaN/Inf loss or "
                        f"gradient (limit train.max_nonfinite={c.train.max_nonfinite}); lower "
                        "train.learning_rate or check the data")
                if diag:
                    self.diagnostics.record(step, *sample)
            return preempt is not None and preempt.any_process()

    def _data_window(self, drawn: list, losses: list) -> dict:
        """The window's data figures: text duplicates masked in its batches and, with
        sources, each source's sub-batches and (one source per batch) mean loss."""
        total = self.pipeline.stats.get("duplicate_texts", 0)
        out = {"duplicate_texts": total - self._dup_seen}
        self._dup_seen = total
        if not self.multi:
            return out
        names = self.pipeline.names
        for j, name in enumerate(names):
            out[f"batches/{name}"] = sum(srcs.count(j) for srcs in drawn)
            if self.pipeline.per_batch == 1:
                mine = [float(v) for srcs, v in zip(drawn, losses) if srcs[0] == j]
                if mine:  # (a source not drawn in the window has no loss line)
                    out[f"loss/{name}"] = float(np.mean(mine))
        return out

    def _log_window(self, step: int, n: int, m: dict, dt: float) -> None:
        c = self.cfg
        rec = {"step": step, "window_steps": n, **m, "lr": float(self.lr_at(step - 1)),
               "step_time": dt, "examples_per_s": c.train.batch_size / dt if dt > 0 else 0.0}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k not in ("step", "window_steps") and isinstance(v, float) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.2f}",
                             ex_s=f"{rec['examples_per_s']:.0f}")

    def _next_batch(self):
        """The next batch from the pipeline as global device arrays (the transfer starts now
        and overlaps the step already dispatched)."""
        return distributed.global_batch_from_local(next(self.pipeline), self.mesh)

    def run(self, preempt: "_Preemption | None" = None) -> dict:
        """Train to `train.steps`. Nothing is fetched from the devices between logging points:
        metrics are summed on device and fetched every `train.log_every` steps (and at every
        evaluation, re-mining, checkpoint and the end), where the non-finite guard and the
        cross-process preemption agreement also run. The next batch is transferred while the
        current step runs; at most two steps are in flight. `preempt`: the SIGTERM handler
        `train` installs before start-up (else one is installed for the loop)."""
        c = self.cfg
        total = c.train.steps
        self.bar = progress(total=total, desc="train", unit="step",
                            disable=None if self.main else True, initial=self.start)
        status = "finished"
        step = self.start
        self.fetches = 0
        self._window, self._window_start, self._t_window = None, step, time.perf_counter()
        self._window_sources, self._dup_seen = [], self.pipeline.stats.get("duplicate_texts", 0)
        inflight: deque = deque()
        with contextlib.nullcontext(preempt) if preempt else _Preemption() as preempt:
            nxt = self._next_batch() if step < total else None
            compiled_before = compile_cache.stats()
            while step < total:
                batch = nxt
                self.state, m = self.step_fn(self.state, batch)
                if step == self.start:
                    self._log_first_step(m["loss"], compiled_before)
                self._sample = (m.pop("sample_q"), m.pop("sample_d"))  # the diagnostics'
                self._window = m if self._window is None else _add(self._window, m)
                if self.multi:  # which source(s) the step's batch came from, and its loss
                    self._window_sources.append((self.pipeline.source_of_step(step), m["loss"]))
                step += 1
                if self.watchdog is not None:
                    self.watchdog.where = f"step {step}"
                self.bar.update(1)
                inflight.append(m["loss"])
                if len(inflight) > 2:  # bound how far the host runs ahead (no transfer)
                    inflight.popleft().block_until_ready()
                remine = bool(c.mining.every_steps and step % c.mining.every_steps == 0
                              and step < total)
                evaluate = bool(c.train.eval_every and step % c.train.eval_every == 0
                                and step < total)
                ckpt = step % c.checkpoint.every_steps == 0 or step == total
                # one process's SIGTERM is seen at once; all agree at the next logging point
                stop = step < total and preempt.requested and jax.process_count() == 1
                if step % c.train.log_every == 0 or remine or evaluate or ckpt or stop:
                    stop = self._flush(step, preempt if step < total else None) or stop
                    with jax.transfer_guard_device_to_host("allow"):
                        if remine:
                            self.remine(step)
                        ev = self.evaluate(step) if evaluate else None
                        if ckpt or stop:
                            if step == total and self.dev is not None:
                                ev = self.evaluate(step)
                            self.save(step, ev)
                if stop:
                    status = "preempted"
                    break
                if step < total:
                    nxt = self._next_batch()
        self.close()
        with jax.transfer_guard_device_to_host("allow"):
            nonfinite = int(self.state.nonfinite)
        return {"status": status, "step": step, "workdir": str(self.workdir),
                "mesh": " x ".join(f"{k} {v}" for k, v in self.mesh.shape.items()),
                "eval": self.last_eval, "eval_sources": self.last_eval_sources,
                "nonfinite": nonfinite, "fetches": self.fetches,
                "time_to_first_step": self.time_to_first_step,
                "data_stats": self.pipeline.stats}

    def close(self) -> None:
        self.bar.close()
        self.ckpt.close()
        self.pipeline.close()
        if self.writer is not None:
            self.writer.close()
        self.diagnostics.close()
        self._unlock()


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns a summary dict (final step, last metrics, eval)."""
    paths = _check_inputs(cfg)
    distributed.initialize(cfg.distributed)
    # A lost process ends every other one within NEGJAX_PEER_TIMEOUT s, naming it and the step.
    # SIGTERM from start-up on: a preemption while loading still saves after the first step.
    with Watchdog("train") as watchdog, _Preemption() as preempt:
        return Trainer(cfg, paths, watchdog=watchdog).run(preempt)
