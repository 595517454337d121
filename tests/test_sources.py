"""Many sources in one run ([[data.sources]]): the sampler's counts, single-source global
batches on every process (2 x 4 devices = 1 x 8, with GradCache, FSDP 2, the memory bank and
re-mining), kill -9 and rerun, per-source prompts in train / mine / eval, masked slots, in-batch negatives
off, text duplicates masked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, TINY_MODEL, start_processes, subprocess_env, wait_all
from negjax.config import load_config
from negjax.data.sources import SourceSampler, build_sources_pipeline, sources_of

PROMPTS = {"nouns": ("noun sense : ", "noun : "), "verbs": ("verb sense : ", ""),
           "adjectives": ("", "")}

SOURCES = """
[[data.sources]]
name = "nouns"
dataset = "{root}/nouns"
query_prompt = "noun sense : "
doc_prompt = "noun : "
num_negatives = 2

[[data.sources]]
name = "verbs"
dataset = "{root}/verbs"
query_prompt = "verb sense : "
num_negatives = 1
in_batch_negatives = false
weight = 2.0

[[data.sources]]
name = "adjectives"
dataset = "{root}/adjectives"
num_negatives = 1
"""

CONFIG = TINY_MODEL + """
[data]
cache_dir = "{cache}"
prefetch = 1
source_sampling = "temperature"
source_temperature = 0.5
""" + SOURCES + """
[train]
steps = 10
batch_size = 16
learning_rate = 1e-3
warmup_steps = 1
log_every = 1
grad_cache_chunk = 1       # crossed with GradCache and FSDP: what a pod run combines

[loss]
memory_bank_size = 96     # and with the memory bank: 2 steps of documents (16 x 3 x 2)

[distributed]
fsdp = 2

[checkpoint]
every_steps = 4
async_save = false

[eval]
encode_batch_size = 32

[mining]
every_steps = 5
index = "exact"
k = 20
negatives_kept = 3
audit_queries = 4
encode_batch_size = 32
"""


@pytest.fixture(scope="module")
def pos_root(tmp_path_factory):
    """The built-in data split by part of speech, small: 40 training and 16 dev queries per
    source, corpora of ~100-250 documents."""
    from negjax.data.wordnet import split_by_pos

    root = tmp_path_factory.mktemp("pos")
    split_by_pos(root, cache_dir=tmp_path_factory.mktemp("wn"), max_train=40, max_dev=16,
                 corpus_every=400)
    return root


def write_config(tmp_path: Path, root: Path, extra: str = "") -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(CONFIG.format(root=root, cache=tmp_path / "cache") + extra)
    return path


# ------------------------------------------------------------------------------ the sampler

@pytest.mark.parametrize("mode,alpha", [("proportional", 1.0), ("temperature", 0.5),
                                        ("temperature", 0.0), ("round_robin", 1.0)])
def test_sampler_counts_within_one_percent(mode, alpha):
    sizes, weights = [5000, 1200, 300], [1.0, 1.0, 2.0]
    s = SourceSampler(sizes, weights, mode, alpha, seed=3)
    want = {"proportional": np.multiply(sizes, weights),
            "temperature": np.multiply(np.power(sizes, alpha), weights),
            "round_robin": np.ones(3)}[mode]
    want = want / want.sum()
    np.testing.assert_allclose(s.probabilities, want, rtol=1e-12)
    drawn = s.sources(0, 10_000)
    got = np.bincount(drawn, minlength=3) / 10_000
    assert np.all(np.abs(got - want) <= 0.01 * want), (got, want)
    if mode == "round_robin":
        assert drawn[:7].tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Positions are pure functions of the sub-batch index: any start agrees with the sequence.
    for u in (0, 1, 1023, 1024, 1025, 4097, 10_000):
        np.testing.assert_array_equal(s.counts_before(u), np.bincount(drawn[:u], minlength=3))
    np.testing.assert_array_equal(s.sources(2040, 2050), drawn[2040:2050])
    # Another seed draws another sequence with the same balance.
    other = SourceSampler(sizes, weights, mode, alpha, seed=4).sources(0, 10_000)
    assert mode == "round_robin" or (other != drawn).any()


# -------------------------------------------------------------------- the combined batches

def test_sources_pipeline_batches_slices_and_state(tmp_path, pos_root):
    """Every global batch from one source; the two process slices concatenate to the
    one-process batch; masked slots, in_batch flags and prompts; the state resumes."""
    from negjax.data import wordnet
    from tokenizers import Tokenizer

    cfg = load_config(write_config(tmp_path, pos_root))
    tok = wordnet.tokenizer_dir()
    sources = sources_of(cfg)
    one = build_sources_pipeline(cfg, tok, sources, process_index=0, process_count=1)
    two = [build_sources_pipeline(cfg, tok, sources, process_index=p, process_count=2)
           for p in range(2)]
    assert one.group_size == 3 and [p.group_size for p in one.pipes] == [3, 2, 2]
    assert [s["probability"] for s in one.info["sources"]] == pytest.approx(
        (lambda w: w / w.sum())(np.array([1, 2, 1]) * np.sqrt([40, 40, 40])))
    decode = Tokenizer.from_file(str(Path(tok) / "tokenizer.json")).decode
    seen = set()
    for k in range(12):
        batch = one.batch(k)
        halves = [p.batch(k) for p in two]
        assert batch.keys() == halves[0].keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([h[key] for h in halves]))
        (j,) = one.source_of_step(k)
        seen.add(j)
        ids = batch["doc_ids"].reshape(16, 3)
        real = ids[ids >= 0]
        assert ((real >= one.bases[j]) & (real < one.bases[j] + one.pipes[j].num_docs)).all()
        G = one.pipes[j].group_size
        assert (ids[:, G:] == -2).all() and (ids[:, :G] >= 0).all()  # masked slots
        # the masked slots carry the positive's tokens
        d = batch["d_tokens"].reshape(16, 3, -1)
        assert (d[:, G:] == d[:, :1]).all()
        assert (batch["in_batch"] == int(sources[j].in_batch_negatives)).all()
        q_prompt = PROMPTS[sources[j].name][0]
        text = decode(batch["q_tokens"][0].tolist())
        assert text.startswith(q_prompt.strip()) if q_prompt else not text.startswith(("noun", "verb"))
    assert seen == {0, 1, 2}
    # The state: a new pipeline set to it continues with the same batches.
    for _ in range(5):
        next(one)
    state = json.loads(json.dumps(one.get_state()))
    assert {s["name"]: s["position"] for s in state["sources"]} == one.positions(5)
    assert sum(s["position"] for s in state["sources"]) == 5
    want = [next(one) for _ in range(3)]
    again = build_sources_pipeline(cfg, tok, sources, process_index=0, process_count=1)
    again.set_state(state)
    for w in want:
        got = next(again)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    bad = dict(state, sources=state["sources"][::-1])
    with pytest.raises(Exception, match="other sources"):
        again.set_state(bad)
    for p in [one, again, *two]:
        p.close()


def test_mixed_batches_of_sub_batches(tmp_path, pos_root):
    """data.sources_per_batch = 4: each global batch is 4 sub-batches of 4 queries, each from
    its own draw; process slices (here across sub-batch boundaries: 2 x 8) still concatenate
    to the one-process batch."""
    from negjax.config import updated
    from negjax.data import wordnet

    cfg = updated(load_config(write_config(tmp_path, pos_root)), {"data.sources_per_batch": 4})
    tok = wordnet.tokenizer_dir()
    sources = sources_of(cfg)
    one = build_sources_pipeline(cfg, tok, sources, process_index=0, process_count=1)
    two = [build_sources_pipeline(cfg, tok, sources, process_index=p, process_count=2)
           for p in range(2)]
    mixed = 0
    for k in range(6):
        batch = one.batch(k)
        halves = [p.batch(k) for p in two]
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([h[key] for h in halves]))
        drawn = one.source_of_step(k)
        mixed += len(set(drawn)) > 1
        ids = batch["doc_ids"].reshape(4, 4 * 3)
        for t, j in enumerate(drawn):
            real = ids[t][ids[t] >= 0]
            assert ((real >= one.bases[j]) & (real < one.bases[j] + one.pipes[j].num_docs)).all()
            assert (batch["in_batch"][4 * t:4 * t + 4] == int(sources[j].in_batch_negatives)).all()
    assert mixed > 0 and sum(one.positions(6).values()) == 24
    for p in [one, *two]:
        p.close()


def test_duplicate_texts_are_masked(tmp_path):
    """Two queries whose positives are different rows of equal text: the batch gives them one
    id (so each is masked for the other query), the count is in the stats, and the sampler
    never picks a negative whose text is a positive's."""
    from negjax.config import updated
    from negjax.data import wordnet
    from negjax.data.pipeline import build_pipeline
    from negjax.losses import contrastive_loss

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    root = tmp_path / "dup"
    root.mkdir()
    docs = [" ".join(words[i % 10:] + words[:i % 10]) + f" number {i}" for i in range(40)]
    docs[1] = docs[0]                       # rows 0 and 1: one text
    docs[2] = docs[0].upper()               # row 2: the same normalised text
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    rows = [{"id": f"q{i}", "query": f"query {words[i % 10]} {i}", "pos": [f"d{i}"],
             "neg": [d for d in ("d0", "d1", "d2") if d != f"d{i}"] + [f"d{10 + i}"]}
            for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = updated(load_config(None), {"data.dataset": str(root), "data.cache_dir": str(tmp_path / "c"),
                                      "train.batch_size": 8, "data.num_negatives": 2,
                                      "data.prefetch": 0, "model.doc_max_len": 32})
    pipe = build_pipeline(cfg, wordnet.tokenizer_dir(), process_index=0, process_count=1)
    batch, stats = pipe._element(0)
    ids = batch["doc_ids"].reshape(8, 3)
    g = pipe.global_batch(0)
    pos_rows = g.d_rows.reshape(8, 3)[:, 0]
    at = {int(r): b for b, r in enumerate(pos_rows)}
    assert {0, 1, 2} <= set(at)  # the three positives of one text are all in the batch
    assert ids[at[0], 0] == ids[at[1], 0] == ids[at[2], 0] == 0
    assert stats["duplicate_texts"] == 2
    # No negative has the text of d0 (every query's own "neg" list starts with its copies).
    th = pipe.doc_store.text_hash
    assert th[0] not in set(th[g.d_rows.reshape(8, 3)[:, 1:].ravel()].tolist())
    # The loss: query at[0]'s softmax holds neither d1's nor d2's column.
    rng = np.random.default_rng(0)
    q = rng.normal(size=(8, 8)).astype(np.float32)
    d = rng.normal(size=(24, 8)).astype(np.float32)
    got = contrastive_loss(q, d, group_size=3, temperature=0.5, doc_ids=batch["doc_ids"],
                           query_pos_ids=batch["query_pos_ids"])
    s = (q.astype(np.float64) @ d.astype(np.float64).T) / 0.5
    keep = np.ones_like(s, bool)
    for b in range(8):
        for c in range(24):
            if c != 3 * b and batch["doc_ids"][c] in set(batch["query_pos_ids"][b]) | {ids[b, 0]}:
                keep[b, c] = False
    assert (~keep).sum() == 6  # each of the three queries masks the other two's positives
    lse = np.log(np.where(keep, np.exp(s), 0).sum(axis=1))
    ref = np.mean(lse - s[np.arange(8), 3 * np.arange(8)])
    assert float(got) == pytest.approx(ref, rel=1e-5)
    pipe.close()


# ------------------------------------------------------------------------------ via the CLI

_CHECKED_TRAIN = textwrap.dedent("""
    # `negjax train` whose every batch is checked to come from the step's one source (on every
    # process), recorded to OUT/sources-<process>.jsonl.
    import json, sys
    import numpy as np
    from negjax.data import sources

    out = sys.argv[1]
    original = sources.SourcesPipeline.__next__

    def checked(self):
        k = self.step
        batch = original(self)
        ids = batch["doc_ids"][batch["doc_ids"] >= 0]
        owner = np.searchsorted(self.bases, ids, side="right") - 1
        (j,) = self.source_of_step(k)
        assert (owner == j).all(), (k, j, sorted(set(owner.tolist())))
        with open(f"{out}/sources-{self.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"step": k, "source": self.names[j],
                                "masked": int((batch["doc_ids"] == -2).sum())}) + "\\n")
        return batch

    sources.SourcesPipeline.__next__ = checked
    from negjax.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _checked_train(tmp_path, cfg, workdir, processes):
    script = tmp_path / "checked_train.py"
    script.write_text(_CHECKED_TRAIN)
    workdir.mkdir(parents=True, exist_ok=True)
    argv = lambda i: [str(script), str(workdir), "train", "--config",  # noqa: E731
                      str(cfg), "--workdir", str(workdir)]
    if processes == 1:
        return [subprocess.Popen([sys.executable, *argv(0)], cwd=REPO, env=subprocess_env(8),
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    return start_processes(argv, processes, devices=8 // processes)


def _losses(workdir):
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pos_root):
    """`negjax train`, three sources, 10 steps: 1 process x 8 devices and 2 x 4, at once."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = write_config(tmp, pos_root)
    one, two = tmp / "one", tmp / "two"
    logs = wait_all(_checked_train(tmp, cfg, one, 1) + _checked_train(tmp, cfg, two, 2))
    return {"cfg": cfg, "one": one, "two": two, "log": logs[0], "tmp": tmp}


def test_two_processes_equal_one_with_three_sources(runs):
    one, two = runs["one"], runs["two"]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # Every process saw every batch from the one source of its step, the same on both.
    recs = [[json.loads(x) for x in (w / f"sources-{p}.jsonl").read_text().splitlines()]
            for w, p in ((one, 0), (two, 0), (two, 1))]
    assert [r["source"] for r in recs[0]] == [r["source"] for r in recs[1]] == \
        [r["source"] for r in recs[2]]
    assert len({r["source"] for r in recs[0]}) == 3
    # masked slots: 16 queries x (3 - G) per batch of verbs and adjectives (G 2)
    want = {"nouns": 0, "verbs": 16, "adjectives": 16}
    assert all(r["masked"] == want[r["source"]] for r in recs[0])
    assert all(r["masked"] * 2 == want[r["source"]] for r in recs[1] + recs[2])
    # The start-up log shows the sources; metrics.jsonl the loss per source.
    log = runs["log"]
    assert "3 data sources, temperature (alpha 0.5) sampling" in log, log[-3000:]
    assert "verbs: 40 queries" in log and "weight 2, p = 0.500" in log, log[-3000:]
    lines = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    for r, src in zip(lines, recs[0]):
        assert r[f"batches/{src['source']}"] == 1 and r[f"loss/{src['source']}"] == r["loss"]
        assert "duplicate_texts" in r
    ev = [json.loads(x) for x in (one / "eval.jsonl").read_text().splitlines()][-1]
    assert set(ev["sources"]) == {"nouns", "verbs", "adjectives"}
    # Re-mining at step 5: every source against its own corpus, the same rows on 2 processes.
    import pyarrow.parquet as pq

    for name in ("nouns", "verbs", "adjectives"):
        rows = [[r for f in sorted((w / "negatives" / "step_5" / name).glob("*.parquet"))
                 for r in pq.read_table(f).to_pylist()] for w in (one, two)]
        assert len(rows[0]) == len(rows[1]) == 40
        assert [r["negative_ids"] for r in rows[0]] == [r["negative_ids"] for r in rows[1]]
        prefix = {"nouns": "n.", "verbs": "v.", "adjectives": ("a.", "s.", "r.")}[name]
        assert all(d.startswith(prefix) for r in rows[0] for d in r["negative_ids"])
    assert ev["mrr@10"] == pytest.approx(np.mean([e["mrr@10"] for e in ev["sources"].values()]))
    # The memory bank holds the last 2 steps' documents: their masked slots as empty (-2),
    # the rest as real documents (ids offset per source), on 1 and on 2 processes alike.
    from negjax.model.loader import restore_state_arrays

    want_empty = sum(r["masked"] for r in recs[0][-2:])
    for w in (one, two):
        ids = restore_state_arrays(w / "checkpoints", 10)["bank_ids"]
        assert ids.shape == (96,) and (ids == -2).sum() == want_empty and (ids >= 0).sum() == 96 - want_empty


def test_kill9_and_rerun_with_three_sources_is_exact(runs):
    """kill -9 after step 6 (checkpoint 4, re-mined at 5), rerun (from 4, re-mining again):
    the final weights equal the uninterrupted 1-process run's bit for bit."""
    from test_train import final_params

    work = runs["tmp"] / "killed"
    cmd = [sys.executable, str(Path(__file__).parent / "faults.py"), "step:6", "train",
           "--config", str(runs["cfg"]), "--workdir", str(work)]
    killed = subprocess.run(cmd, cwd=REPO, env=subprocess_env(8), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    rerun = subprocess.run([sys.executable, "-m", "negjax", "train", "--config", str(runs["cfg"]),
                            "--workdir", str(work)], cwd=REPO, env=subprocess_env(8),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint 4" in rerun.stderr
    step_a, a = final_params(runs["one"])
    step_b, b = final_params(work)
    assert step_a == step_b == 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(_losses(work), _losses(runs["one"]), rtol=0, atol=0)


def test_source_prompts_reach_train_mine_and_eval(runs, pos_root, tmp_path):
    """train: each source's token stores hold its prompts; eval: `negjax eval --source` gives
    the run's per-source dev metrics (and without the prompts other ones); mine: `negjax mine
    --source nouns` mines what a one-dataset config with the nouns prompts mines."""
    from negjax.data import wordnet
    from negjax.data.token_store import TokenStore
    from tokenizers import Tokenizer

    decode = Tokenizer.from_file(str(Path(wordnet.tokenizer_dir()) / "tokenizer.json")).decode
    tokens = runs["tmp"] / "cache" / "tokens"
    checked = 0
    for train in tokens.glob("train-*"):
        meta = json.loads((train / "meta.json").read_text())
        name = Path(meta["train_path"]).parent.name
        q_prompt, d_prompt = PROMPTS[name]
        query = decode(TokenStore.open(train / "queries").pad([0], 16)[0][0].tolist())
        doc = decode(TokenStore.open(tokens / meta["docs"]).pad([0], 32)[0][0].tolist())
        for text, prompt in ((query, q_prompt), (doc, d_prompt)):
            assert text.startswith(prompt.strip()) if prompt else not text.startswith(("noun", "verb"))
        checked += 1
    assert checked == 3

    ev = [json.loads(x) for x in (runs["one"] / "eval.jsonl").read_text().splitlines()][-1]
    env = subprocess_env(8)
    base = [sys.executable, "-m", "negjax", "eval", "--model", str(runs["one"]), "--json"]
    got = subprocess.run(base + ["--source", "nouns", "--split", "dev"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    res = json.loads(got.stdout.strip().splitlines()[-1])
    for key, v in ev["sources"]["nouns"].items():
        assert res[key] == pytest.approx(v, abs=1e-6), key
    files = [f"--corpus={pos_root}/nouns/corpus.jsonl", f"--queries={pos_root}/nouns/dev_queries.jsonl",
             f"--qrels={pos_root}/nouns/dev_qrels.tsv"]
    plain = subprocess.run(base + files, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    res_plain = json.loads(plain.stdout.strip().splitlines()[-1])
    assert any(res_plain[k] != pytest.approx(res[k], abs=1e-6) for k in ("mrr@10", "ndcg@10"))

    single = tmp_path / "nouns.toml"
    single.write_text(TINY_MODEL + f"""
[data]
dataset = "{pos_root}/nouns"
cache_dir = "{tmp_path / 'cache'}"
""")
    mine = [sys.executable, "-m", "negjax", "mine", "--model", str(runs["one"]), "--index",
            "exact", "--k", "20", "--negatives-kept", "4", "--audit-queries", "4"]
    a = subprocess.run(mine + ["--config", str(runs["cfg"]), "--source", "nouns",
                               "--out", str(tmp_path / "by-source")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    assert not (tmp_path / "by-source" / "verbs").exists()
    b = subprocess.run(mine + ["--config", str(single), "--out", str(tmp_path / "single"),
                               "--set", 'model.query_prompt="noun sense : "',
                               "--set", 'model.doc_prompt="noun : "'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    import pyarrow.parquet as pq

    def rows(d):
        return [r for f in sorted(Path(d).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    ra, rb = rows(tmp_path / "by-source" / "nouns"), rows(tmp_path / "single")
    assert len(ra) == len(rb) == 40
    for x, y in zip(ra, rb):
        assert x["negative_ids"] == y["negative_ids"]
        np.testing.assert_allclose(x["negative_scores"], y["negative_scores"], atol=1e-6)


def test_data_validate_reads_every_source_of_a_config(pos_root, tmp_path):
    """`negjax data validate --config` checks each source's files; a malformed line in one
    source's training file names the source, the file and the line (exit 2)."""
    import shutil

    from helpers import run_negjax

    cfg = write_config(tmp_path, pos_root)
    ok = run_negjax("data", "validate", "--config", cfg, check=True)
    stats = json.loads(ok.stdout)
    assert list(stats) == ["nouns", "verbs", "adjectives"]
    assert all(s["ok"] and s["train"]["queries"] == 40 and s["qrels"]["queries"] == 16
               for s in stats.values())
    bad_root = tmp_path / "bad"
    shutil.copytree(pos_root, bad_root)
    train = bad_root / "verbs" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[6] = lines[6][:-3]
    train.write_text("\n".join(lines) + "\n")
    (tmp_path / "b").mkdir()
    bad = run_negjax("data", "validate", "--config", write_config(tmp_path / "b", bad_root))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("negjax: error: source 'verbs': ") and f"{train}:7" in bad.stderr
    both = run_negjax("data", "validate", "--config", cfg, "--train", train)
    assert both.returncode == 2 and "not both" in both.stderr
