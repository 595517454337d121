"""Runs that cannot go wrong silently (issue 14, item 5): a resume with other hard negatives,
a second `negjax train` on a live run's workdir, damaged checkpoints, and eval / mine lengths
from a training workdir. One tiny in-process training run (4 steps, checkpoints at 2 and 4)
is shared; tests that change a workdir work on a copy."""

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import subprocess_env, write_config


def make_negatives(data: Path, out: Path) -> Path:
    """A valid hard-negative shard directory for data's train.jsonl (2 random docs a query)."""
    from negjax.data.shards import ShardWriter

    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    docs = [json.loads(x)["id"] for x in (data / "corpus.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    negs = [rng.sample([d for d in docs if d not in t["pos"]][:50], 2) for t in train]
    w = ShardWriter(out)
    info = w.write(0, query_ids=[t["id"] for t in train], positive_ids=[t["pos"] for t in train],
                   negative_ids=negs, negative_scores=[[0.5, 0.4]] * len(train))
    w.finalize(shards=[info])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):  # noqa: F811
    """(config file, workdir, negatives dir): 4 steps with mined negatives, checkpoints 2, 4."""
    from negjax.config import load_config
    from negjax.train.loop import train

    root = tmp_path_factory.mktemp("guards")
    negs = make_negatives(small_data, root / "negs_a")
    cfg_path = write_config(root, small_data, steps=4)
    text = cfg_path.read_text().replace("every_steps = 3", "every_steps = 2")
    text = text.replace("prefetch = 2", f'prefetch = 2\nnum_negatives = 1\nnegatives = "{negs}"')
    cfg_path.write_text(text.replace("[eval]\n", '[eval]\nsplit = "none"\n'))
    work = root / "w"
    out = train(load_config(cfg_path, [f'workdir="{work}"']))
    assert out["step"] == 4
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    return cfg_path, work, negs


def snapshot(workdir: Path, skip=(".lock",)) -> dict:
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name not in skip}


def cli(capsys, *args) -> tuple[int, str]:
    from negjax.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def copy_workdir(work: Path, dest: Path) -> Path:
    shutil.copytree(work, dest)
    return dest


def test_resume_with_other_negatives_is_refused(trained, tmp_path, capsys):
    from negjax.config import load_config
    from negjax.train.loop import _check_resume_negatives

    cfg_path, work, negs = trained
    other = shutil.copytree(negs, tmp_path / "negs_b")
    before = snapshot(work, skip=())
    for given, named in ((other, str(other)), ("", "data.negatives=(none)")):
        extra = ["--set", f"data.negatives={given}"] + (["--set", "data.num_negatives=0"] if not given else [])
        rc, err = cli(capsys, "train", "--config", cfg_path, "--workdir", work, *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(negs) in err and named in err and "resuming a run started with" in err, err
    assert snapshot(work, skip=()) == before  # nothing written, not even the lock file
    # the same directory spelled differently, or the run's own config, passes
    cfg = load_config(cfg_path, [f'workdir="{work}"', f'data.negatives="{negs.parent}/./{negs.name}"'])
    _check_resume_negatives(cfg)
    # a re-mined run's checkpoint names WORKDIR/negatives/step_N: the start's data.negatives
    # (config.toml) is what a resume must repeat, not the checkpoint's
    meta = json.loads((work / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["negatives"] == str(negs)


def test_live_run_holds_the_workdir_and_a_stale_lock_is_taken_over(trained, tmp_path, capsys):
    cfg_path, trained_work, _ = trained
    work = copy_workdir(trained_work, tmp_path / "w")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom negjax.train.workdir_lock import WorkdirLock\n"
         "WorkdirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)", str(work)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(1))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(work, skip=())
        rc, err = cli(capsys, "train", "--config", cfg_path, "--workdir", work)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(work) in err and f"pid {holder.pid}" in err and "in use" in err, err
        assert snapshot(work, skip=()) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: the next run takes it over and resumes
    rc, err = cli(capsys, "train", "--config", cfg_path, "--workdir", work)
    assert rc == 0, err
    import os

    assert json.loads((work / ".lock").read_text())["pid"] == os.getpid()
    from negjax.train.workdir_lock import WorkdirLock

    WorkdirLock(work).acquire().release()  # released at the end of the run


def largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in (len(raw) // 3, len(raw) // 2, 2 * len(raw) // 3):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_checkpoint_is_refused_and_the_run_resumes_from_a_good_one(trained, tmp_path, capsys):
    from negjax.errors import NegjaxError
    from negjax.model.loader import CHECKSUMS, load_model

    cfg_path, trained_work, _ = trained
    _, want, _ = load_model(trained_work)
    leaves = lambda tree: [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]  # noqa: E731
    for step in ("2", "4"):
        listed = json.loads((trained_work / "checkpoints" / step / CHECKSUMS).read_text())["files"]
        assert any(f["name"].startswith("state/") for f in listed)
        assert any(f["name"].startswith("meta/") for f in listed)

    work = copy_workdir(trained_work, tmp_path / "w")
    flip_bytes(largest_state_file(work / "checkpoints" / "4"))
    with pytest.raises(NegjaxError, match=r"checkpoints/4 is damaged: state/.* sha256"):
        load_model(work)  # eval / export / encode / mine
    rc, err = cli(capsys, "train", "--config", cfg_path, "--workdir", work)
    assert rc == 0, err
    assert "negjax: warning:" in err and "checkpoints/4 is damaged" in err
    assert "resuming from checkpoint 2" in err
    assert (work / "checkpoints.damaged" / "4" / CHECKSUMS).is_file()
    _, got, info = load_model(work)  # steps 3 and 4 retrained: the same weights
    assert info["step"] == 4
    for a, b in zip(leaves(want), leaves(got)):
        np.testing.assert_array_equal(a, b)

    # every checkpoint damaged: a clear error, nothing moved or written
    work = copy_workdir(trained_work, tmp_path / "w2")
    for step in ("2", "4"):
        flip_bytes(largest_state_file(work / "checkpoints" / step))
    before = snapshot(work)
    rc, err = cli(capsys, "train", "--config", cfg_path, "--workdir", work)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "checkpoints/4 is damaged" in err and "no checkpoint" in err and "verifies" in err, err
    assert snapshot(work) == before and not (work / "checkpoints.damaged").exists()

    # checkpoints written before checksums existed load as before
    work = copy_workdir(trained_work, tmp_path / "w3")
    for step in ("2", "4"):
        (work / "checkpoints" / step / CHECKSUMS).unlink()
    _, got, info = load_model(work)
    assert info["step"] == 4
    for a, b in zip(leaves(want), leaves(got)):
        np.testing.assert_array_equal(a, b)


def test_eval_and_mine_default_to_the_workdirs_lengths(trained, small_data, tmp_path,  # noqa: F811
                                                         capsys, monkeypatch):
    import negjax.mining.job
    import negjax.mining.report
    import negjax.model.encode

    cfg_path, work, _ = trained
    seen = {}

    def fake_encode(enc, params, texts, *, tower, max_length, **kw):
        seen[tower] = max_length
        x = np.random.default_rng(0).normal(size=(len(texts), enc.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def fake_encode_store(enc, params, store, *a, tower, **kw):  # (the corpus: a token store)
        seen[tower] = store.max_len
        x = np.random.default_rng(0).normal(size=(len(store), enc.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def fake_mining(enc, params, *, query_max_len, doc_max_len, **kw):
        seen.update(query=query_max_len, doc=doc_max_len)

    monkeypatch.setattr(negjax.model.encode, "encode_texts", fake_encode)
    monkeypatch.setattr(negjax.model.encode, "encode_store", fake_encode_store)
    monkeypatch.setattr(negjax.mining.job, "run_mining", fake_mining)
    monkeypatch.setattr(negjax.mining.report, "summary_text", lambda out: "")
    files = ["--corpus", small_data / "corpus.jsonl"]
    ev = ["eval", *files, "--queries", small_data / "dev_queries.jsonl",
          "--qrels", small_data / "dev_qrels.tsv", "--json"]
    mine = ["mine", *files, "--train", small_data / "train.jsonl", "--out", tmp_path / "o"]
    # the workdir trained with query_max_len 16, doc_max_len 32 (the defaults are 32 / 128)
    cases = [
        (ev + ["--model", work], (16, 32)),
        (ev + ["--model", work / "checkpoints" / "2", "--doc-max-length", 64], (16, 64)),
        (ev + ["--model", "tiny"], (32, 128)),
        (mine + ["--model", work], (16, 32)),
        (mine + ["--model", work, "--query-max-length", 8], (8, 32)),
        (mine + ["--model", work, "--set", "model.doc_max_len=48"], (16, 48)),
        (mine + ["--model", "tiny"], (32, 128)),
    ]
    for args, (q, d) in cases:
        seen.clear()
        rc, err = cli(capsys, *args)
        assert rc == 0, err
        assert (seen["query"], seen["doc"]) == (q, d), args


@pytest.mark.parametrize("async_save", [True, False])
def test_checkpointer_writes_checksums_with_each_step(tmp_path, async_save):
    """Written before orbax commits the step (sync or async save); verified by the loader."""
    import jax.numpy as jnp

    from negjax.config import CheckpointConfig
    from negjax.model.loader import CHECKSUMS, verify_checkpoint
    from negjax.train.checkpoint import Checkpointer, select_checkpoint

    ck = Checkpointer(tmp_path / "checkpoints",
                      CheckpointConfig(keep=2, best_metric="", async_save=async_save))
    for step in (1, 2, 3):
        ck.save(step, {"w": jnp.full((64, 8), float(step))}, {"step": step})
        if not async_save:  # the save returned: committed, checksums included
            assert (tmp_path / "checkpoints" / str(step) / CHECKSUMS).is_file()
    ck.close()
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["2", "3"]  # nothing left in orbax's temporary directories
    for step in steps:
        assert verify_checkpoint(tmp_path / "checkpoints" / step) is True
    assert select_checkpoint(tmp_path / "checkpoints") == 3
