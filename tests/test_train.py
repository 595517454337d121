"""`negjax train` / `eval`: exact resume after kill -9 (2 processes: test_pod_faults.py),
eval vs ranx, clear errors before any work."""

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, run_negjax, subprocess_env, train_cmd, write_config

def final_params(workdir):
    from negjax.model.loader import load_model

    _, params, info = load_model(workdir)
    import jax

    return info["step"], [np.asarray(x) for x in jax.tree.leaves(params)]


def metric_steps(workdir):
    return [json.loads(x)["step"] for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


MINING = """
[mining]
every_steps = 5
index = "exact"
negatives_kept = 4
audit_queries = 8
"""


def test_kill9_and_resume_is_exact(tmp_path, small_data):
    """With re-mining at steps 5 and 10 (ANCE-style): kill -9 at a random step, rerun."""
    cfg = write_config(tmp_path, small_data)
    cfg.write_text(cfg.read_text().replace("prefetch = 2", "prefetch = 2\nnum_negatives = 1") + MINING)
    ref = tmp_path / "ref"
    # Output to a pipe, as on a pod: progress comes as plain lines (NEGJAX_PROGRESS_EVERY
    # seconds apart; 0 here: every update), while tokenising and while re-mining too.
    jit_cache = str(tmp_path / "jit")  # this test's own persistent compilation cache
    run = subprocess.run(train_cmd(cfg, ref), capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=subprocess_env(4, NEGJAX_PROGRESS="", NEGJAX_PROGRESS_EVERY=0,
                                            NEGJAX_COMPILE_CACHE=jit_cache))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    for what in ("tokenise", "encode doc", "mine", "train"):  # (mine, encode doc: re-mining)
        assert any(x.startswith(f"negjax: {what}") and "/s" in x for x in lines), (what, run.stderr[-3000:])
    assert not any("\r" in x for x in lines)  # no terminal bar in the log
    first = [x for x in lines if x.startswith("negjax train: first step")]
    assert len(first) == 1 and "persistent cache 0 hits" in first[0], run.stderr[-3000:]
    # Kill -9 after a random number of completed steps, once the first checkpoint is complete
    # (orbax renames it to its step number when finalised; saving is asynchronous).
    kill_after = random.Random(os.getpid()).randint(4, 10)
    work = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(cfg, work), env=subprocess_env(4, NEGJAX_COMPILE_CACHE=jit_cache), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, ckpts = work / "metrics.jsonl", work / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after \
                and ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(train_cmd(cfg, work), env=subprocess_env(4, NEGJAX_COMPILE_CACHE=jit_cache),
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The restart loads the step the first runs compiled (the log says so).
    first = [x for x in resumed.stderr.splitlines() if x.startswith("negjax train: first step")]
    assert len(first) == 1 and " restore " in first[0], resumed.stderr[-3000:]
    assert re.search(r"persistent cache [1-9]\d* hits? / 0 misses\)", first[0]), first[0]
    step_a, a = final_params(ref)
    step_b, b = final_params(work)
    assert step_a == step_b == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # ... and so are the exported Hugging Face weights.
    from safetensors.numpy import load_file

    tensors = []
    for w in (ref, work):
        r = run_negjax("export", "--checkpoint", w, "--out", tmp_path / f"hf_{w.name}", env=subprocess_env(1))
        assert r.returncode == 0, r.stderr[-2000:]
        tensors.append(load_file(tmp_path / f"hf_{w.name}" / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 10
    for key in tensors[0]:
        np.testing.assert_array_equal(tensors[0][key], tensors[1][key])
    assert metric_steps(work) == list(range(1, 13))
    # re-mined on schedule; the checkpoint names the shards in use, which verify
    from negjax.data.shards import verify
    from negjax.train.checkpoint import manifest_digest

    for w in (ref, work):
        assert sorted(p.name for p in (w / "negatives").iterdir()) == ["step_10", "step_5"]
        for sub in ("step_5", "step_10"):
            verify(w / "negatives" / sub)
        meta = json.loads((w / "checkpoints" / "12" / "meta" / "metadata").read_text())
        assert meta["negatives"] == str(w / "negatives" / "step_10")
        assert meta["negatives_sha256"] == manifest_digest(meta["negatives"])
        assert meta["data"]["stats"]["negatives"] > 0
    # the resumed run mined the same negatives as the uninterrupted one
    import pyarrow.parquet as pq

    for sub in ("step_5", "step_10"):
        rows = [pq.read_table(sorted((w / "negatives" / sub).glob("*.parquet"))[0]).to_pylist()
                for w in (ref, work)]
        assert rows[0] == rows[1]
    ref_loss = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    got_loss = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert ref_loss == got_loss


def test_sigterm_saves_and_exits(tmp_path, small_data):
    cfg = write_config(tmp_path, small_data, steps=200)
    work = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(cfg, work), env=subprocess_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in out
    last = metric_steps(work)[-1]
    from negjax.model.loader import load_model

    assert load_model(work)[2]["step"] == last


def test_eval_matches_ranx(tmp_path, small_data):
    ranx = pytest.importorskip("ranx")
    run_file = tmp_path / "run.trec"
    r = run_negjax("eval", "--model", "tiny", "--corpus", small_data / "corpus.jsonl",
                   "--queries", small_data / "dev_queries.jsonl", "--qrels", small_data / "dev_qrels.tsv",
                   "--save-run", run_file, "--json", "--doc-max-length", 32,
                   env=subprocess_env(2, NEGJAX_CACHE=tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [x.split("\t") for x in (small_data / "dev_qrels.tsv").read_text().splitlines()[1:]]
    qrels = {}
    for q, d, s in rows:
        qrels.setdefault(q, {})[d] = int(s)
    run = {}
    for line in run_file.read_text().splitlines():
        q, _, d, rank, score, _ = line.split()
        run.setdefault(q, {})[d] = float(score) - 1e-9 * int(rank)  # ties: keep our order
    theirs = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run),
                           ["recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"])
    for m, v in theirs.items():
        assert ours[m] == pytest.approx(v, abs=1e-6), m


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.learning_rate=-1"], "train.learning_rate"),
    (["--set", "data.dataset=/no/such/dir"], "/no/such/dir"),
    (["--set", "data.negatives=/no/such/negs"], "/no/such/negs"),
    (["--set", "data.corpus=/no/corpus.jsonl"], "/no/corpus.jsonl"),
    (["--set", "model.name=/no/model"], "/no/model"),
    (["--set", f"data.negatives={REPO}"], "data.num_negatives is 0"),
])
def test_bad_config_or_paths_fail_fast(tmp_path, small_data, args, needle):
    cfg = write_config(tmp_path, small_data)
    r = run_negjax("train", "--config", cfg, "--workdir", tmp_path / "w", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_quickstart_end_to_end_on_small_data(tmp_path, small_data):
    """The quickstart's four stages on a small data directory (the real run uses WordNet)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shutil.copy(data / "dev_queries.jsonl", data / "test_queries.jsonl")
    shutil.copy(data / "dev_qrels.tsv", data / "test_qrels.tsv")
    work = tmp_path / "qs"
    r = run_negjax("quickstart", "--workdir", work, "--data", data, "--steps", 4, "--batch-size", 16,
                   env=subprocess_env(2, NEGJAX_CACHE=tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((work / "results.json").read_text())
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["steps"] == 4 and row["queries"] == 40
        for m in ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"):
            assert 0.0 <= row[m] <= 1.0
    assert "mrr@10" in r.stdout and str(work / "results.json") in r.stdout
    assert (work / "results.png").stat().st_size > 0
    from negjax.data.shards import verify

    manifest = verify(work / "negatives")
    assert manifest["model"]["step"] == 4
    meta = json.loads((work / "round2" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["negatives"] == str(work / "negatives") and meta["data"]["stats"]["negatives"] > 0


def test_training_workdir_is_a_model_for_every_command(tmp_path, small_data):
    """One loader: a workdir, its checkpoints dir and a step dir load the same trained params,
    and encode / export / eval / mine accept them like any other --model."""
    from negjax.model import encode_texts
    from negjax.model.loader import load_model

    cfg = write_config(tmp_path, small_data, steps=3)
    work = tmp_path / "w"
    r = subprocess.run(train_cmd(cfg, work), env=subprocess_env(2), capture_output=True,
                       text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    enc, params, info = load_model(work)
    assert info["step"] == 3 and info["path"] == str(work.absolute())
    for other in (work / "checkpoints", work / "checkpoints" / "3"):
        _, p2, i2 = load_model(other)
        assert i2["step"] == 3
        assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(params), jax_leaves(p2)))
    texts = ["a quick test", "another sentence about words"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = run_negjax("encode", "--model", work / "checkpoints" / "3", "--input", tmp_path / "in.jsonl",
                   "--output", tmp_path / "e.npy", env=subprocess_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    want = encode_texts(enc, params, texts, tower="query", batch_size=8)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, rtol=1e-5, atol=1e-6)
    r = run_negjax("export", "--checkpoint", work, "--out", tmp_path / "hf", env=subprocess_env(1))
    assert r.returncode == 0 and "step 3" in r.stdout, r.stderr[-3000:]
    r = run_negjax("encode", "--model", tmp_path / "nowhere", "--input", tmp_path / "in.jsonl",
                   "--output", tmp_path / "x.npy", env=subprocess_env(1))
    assert r.returncode == 2 and "model not found" in r.stderr
    assert not (tmp_path / "x.npy").exists()


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_loop_fetches_only_at_logging_points(tmp_path, small_data, monkeypatch):
    """20 steps with train.log_every = 10: every device-to-host read happens at step 10 or 20
    (CPU arrays have no transfer guard, so count reads of jax arrays' host values), one
    metric fetch per window, and metrics.jsonl holds the window means of the per-step values
    (checked against a log_every = 1 run)."""
    from jax._src.array import ArrayImpl

    from negjax.config import load_config, updated
    from negjax.train.loop import Trainer, _check_inputs

    base = load_config(write_config(tmp_path, small_data, steps=20))
    base = updated(base, {"checkpoint.every_steps": 100, "eval.split": "none"})
    reads, dispatched = [], [0]
    value = ArrayImpl._value

    def counted(self):
        reads.append(dispatched[0])
        return value.fget(self)
    cfg = updated(base, {"workdir": str(tmp_path / "w10"), "train.log_every": 10})
    trainer = Trainer(cfg, _check_inputs(cfg))
    step_fn = trainer.step_fn

    def step_counted(state, batch):
        dispatched[0] += 1
        return step_fn(state, batch)
    trainer.step_fn = step_counted
    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    out = trainer.run()
    monkeypatch.undo()
    assert out["step"] == 20 and out["fetches"] == 2
    assert {r for r in reads if r > 0} == {10, 20}, sorted(set(reads))  # reads are seen
    lines = [json.loads(x) for x in (tmp_path / "w10" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["window_steps"]) for x in lines] == [(10, 10), (20, 10)]
    # the diagnostics recorded at the logging points, from the step's own sample (16 queries)
    diag = [json.loads(x) for x in (tmp_path / "w10" / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in diag] == [10, 20]
    assert sum(diag[0]["positive_hist"]) == 16 and sum(diag[0]["in_batch_negative_hist"]) == 16 * 15

    cfg = updated(base, {"workdir": str(tmp_path / "w1"), "train.log_every": 1})
    Trainer(cfg, _check_inputs(cfg)).run()
    per_step = [json.loads(x) for x in (tmp_path / "w1" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in per_step] == list(range(1, 21))
    for window, lo in zip(lines, (0, 10)):
        for key in ("loss", "accuracy", "grad_norm"):
            want = np.mean([x[key] for x in per_step[lo:lo + 10]])
            assert window[key] == pytest.approx(want, rel=1e-5), key
