"""contrastive_loss against a float64 NumPy reference on 1, 2, 4 and 8 simulated devices."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import mesh_of, put_rows, require_devices
from negjax.errors import NegjaxError
from negjax.losses import (contrastive_loss, contrastive_loss_and_metrics, init_log_scale,
                           temperature_from_log_scale)

B, D, TEMP = 8, 6, 0.1


# ---------------------------------------------------------------------------------------
# NumPy reference (float64, analytic gradients of softmax cross-entropy)
# ---------------------------------------------------------------------------------------

def _positive_sets(G, pos_ids, doc_ids, nq):
    if doc_ids is None:
        return [set() for _ in range(nq)]
    sets = [{int(doc_ids[i * G])} for i in range(nq)]
    if pos_ids is not None:
        for i in range(nq):
            sets[i] |= {int(x) for x in pos_ids[i] if x >= 0}
    return sets


def _softmax_ce(logits, keep, targets):
    """Mean CE over rows with masked columns; returns (loss, dloss/dlogits)."""
    z = np.where(keep, logits, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.where(keep, np.exp(z), 0.0)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(targets))
    loss = -np.log(p[rows, targets]).mean()
    y = np.zeros_like(p)
    y[rows, targets] = 1.0
    return loss, (p - y) / len(targets)


def reference(q, d, G, T, pos_ids=None, doc_ids=None, symmetric=False, extra=None, extra_ids=None,
              margin=None, in_batch=None):
    """-> loss, dq, dd, dT, metrics (float64). `margin`: the false-negative guard (a negative
    scoring above the row's positive x (1 - margin) is no column of that row). `in_batch [nq]`
    bool: a query whose flag is False has only its own group's columns i*G .. i*G+G-1 (no other
    query's documents, no extra columns); in the symmetric direction its positive's row has
    only its own query."""
    q = np.asarray(q, np.float64)
    d = np.asarray(d, np.float64)
    nq, s = len(q), 1.0 / T
    pos = _positive_sets(G, pos_ids, doc_ids, nq)
    if extra is not None and extra_ids is not None:  # empty slots (id -1) are no columns
        extra, extra_ids = np.asarray(extra)[extra_ids >= 0], np.asarray(extra_ids)[extra_ids >= 0]
    cols = d if extra is None else np.concatenate([d, np.asarray(extra, np.float64)])
    ids = None
    if doc_ids is not None:
        ids = list(doc_ids) + ([-1] * len(extra) if extra is not None and extra_ids is None
                               else list(extra_ids) if extra is not None else [])
    keep = np.ones((nq, len(cols)), bool)
    targets = np.arange(nq) * G
    for i in range(nq):
        for c in range(len(cols)):
            if c != targets[i] and ids is not None and ids[c] in pos[i]:
                keep[i, c] = False
            if in_batch is not None and not in_batch[i] and not i * G <= c < (i + 1) * G:
                keep[i, c] = False
    sim = q @ cols.T
    masked = 0
    if margin is not None:
        above = (sim > sim[np.arange(nq), targets][:, None] * (1 - margin)) & keep
        above[np.arange(nq), targets] = False
        masked = int(above.sum())
        keep &= ~above
    loss, dlog = _softmax_ce(sim * s, keep, targets)
    dq = dlog @ cols * s
    dd = (dlog.T @ q * s)[: len(d)]
    ds = np.sum(dlog * sim)
    cos = sim / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(cols, axis=1)[None, :]
    neg = keep.copy()
    neg[np.arange(nq), targets] = False
    tgt = sim[np.arange(nq), targets]
    metrics = dict(
        accuracy=np.mean([tgt[i] > sim[i][neg[i]].max(initial=-np.inf) for i in range(nq)]),
        pos_cos=cos[np.arange(nq), targets].mean(),
        hardest_neg_cos=np.mean([cos[i][neg[i]].max() for i in range(nq) if neg[i].any()]),
        neg_cos=cos[neg].mean())
    if margin is not None:
        metrics["false_negatives_masked"] = masked
    if symmetric:
        pd = d[::G]
        keep2 = np.ones((nq, nq), bool)
        for j in range(nq):
            for i in range(nq):
                if i != j and doc_ids is not None and int(doc_ids[j * G]) in pos[i]:
                    keep2[j, i] = False
                if i != j and in_batch is not None and not in_batch[j]:
                    keep2[j, i] = False
        sim2 = pd @ q.T
        if margin is not None:
            above = (sim2 > np.diag(sim2)[:, None] * (1 - margin)) & keep2
            np.fill_diagonal(above, False)
            keep2 &= ~above
        loss2, dlog2 = _softmax_ce(sim2 * s, keep2, np.arange(nq))
        dd2 = np.zeros_like(d)
        dd2[::G] = dlog2 @ q * s
        dq2 = dlog2.T @ pd * s
        loss, dq, dd = 0.5 * (loss + loss2), 0.5 * (dq + dq2), 0.5 * (dd + dd2)
        ds = 0.5 * (ds + np.sum(dlog2 * sim2))
    return loss, dq, dd, -ds / T ** 2, metrics


# ---------------------------------------------------------------------------------------
# Data and mesh helpers
# ---------------------------------------------------------------------------------------

def make_embeddings(G, seed=0, nq=B, dim=D, npos=3):
    """Random unit embeddings and ids with many duplicates and extra positives."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(nq, dim)).astype(np.float32)
    d = rng.normal(size=(nq * G, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    doc_ids = rng.integers(0, max(2, nq * G // 2), size=nq * G).astype(np.int32)
    pos_ids = np.full((nq, npos), -1, np.int32)
    pos_ids[:, 0] = doc_ids[::G]
    pos_ids[:, 1] = rng.choice(doc_ids, size=nq)          # another column as extra positive
    pos_ids[::2, 2] = rng.choice(doc_ids, size=len(pos_ids[::2]))
    return q, d, pos_ids, doc_ids


class _NoMesh:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def in_mesh(mesh):
    return jax.set_mesh(mesh) if mesh is not None else _NoMesh()


# variants: (symmetric, chunk_size, with ids, collective)
VARIANTS = [(False, None, True, "gather"), (True, None, True, "gather"),
            (False, 3, True, "gather"), (True, 3, True, "gather"), (False, 5, False, "gather"),
            (True, 4, True, "gather"),
            (False, None, True, "ring"), (True, None, True, "ring"), (True, 3, True, "ring"),
            (False, 5, False, "ring")]


@functools.cache
def _matrix_fn(G):
    """One jitted function evaluating loss and gradients (q, d, temperature) for every variant,
    so each (devices, G) case compiles once."""
    def all_variants(q, d, pos_ids, doc_ids, temp):
        out = []
        for sym, chunk, ids, coll in VARIANTS:
            f = lambda q, d, t: contrastive_loss(  # noqa: E731
                q, d, group_size=G, temperature=t, query_pos_ids=pos_ids if ids else None,
                doc_ids=doc_ids if ids else None, symmetric=sym, chunk_size=chunk,
                collective=coll)
            out.append(jax.value_and_grad(f, argnums=(0, 1, 2))(q, d, temp))
        return out
    return jax.jit(all_variants)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("ndev", [1, 2, 4, 8])
def test_matches_numpy_reference(ndev, G):
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=ndev * 10 + G)
    with in_mesh(mesh):
        args = put_rows(mesh, q, d, pos_ids, doc_ids)
        results = _matrix_fn(G)(*args, jnp.float32(TEMP))
    for (sym, chunk, ids, coll), (loss, (gq, gd, gt)) in zip(VARIANTS, results):
        what = f"devices={ndev} G={G} symmetric={sym} chunk={chunk} ids={ids} {coll}"
        rl, rq, rd, rt, _ = reference(q, d, G, TEMP, pos_ids if ids else None,
                                      doc_ids if ids else None, sym)
        np.testing.assert_allclose(loss, rl, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(gq, rq, rtol=1e-5, atol=1e-6, err_msg=what)
        np.testing.assert_allclose(gd, rd, rtol=1e-5, atol=1e-6, err_msg=what)
        np.testing.assert_allclose(gt, rt, rtol=1e-4, atol=1e-6, err_msg=what)
        if mesh is not None:  # gradients of documents live on their owners
            assert gd.sharding.spec[0] == "data", what


def test_masking_is_exercised():
    """The matrix data really masks columns (else the id tests above prove nothing)."""
    q, d, pos_ids, doc_ids = make_embeddings(2, seed=22)
    masked = reference(q, d, 2, TEMP, pos_ids, doc_ids)[0]
    plain = reference(q, d, 2, TEMP)[0]
    assert abs(masked - plain) > 1e-3
    got = contrastive_loss(q, d, group_size=2, temperature=TEMP, query_pos_ids=pos_ids, doc_ids=doc_ids)
    np.testing.assert_allclose(got, masked, rtol=1e-5)


@pytest.mark.parametrize("chunk, collective", [(None, "gather"), (5, "gather"), (5, "ring")])
def test_gathered_layout_targets_own_positive(chunk, collective):
    """Catches the interleaved-gather bug: on 4 devices with hard negatives every query is
    identical to its own positive and orthogonal to all other documents, so the loss is tiny
    and top-1 is always the target column i*G. Any other gathered order scores a query
    against a wrong column and the loss is ~1/temperature."""
    G, nq = 4, 8
    mesh = mesh_of(4)
    eye = np.eye(nq * G, dtype=np.float32)
    d = eye                     # every document its own direction
    q = eye[::G].copy()         # query i == its positive d[i*G]
    with jax.set_mesh(mesh):
        qs, ds = put_rows(mesh, q, d)
        loss, metrics = jax.jit(lambda q, d: contrastive_loss_and_metrics(
            q, d, group_size=G, temperature=0.05, chunk_size=chunk, collective=collective))(qs, ds)
    assert float(loss) < 1e-6
    assert float(metrics["accuracy"]) == 1.0
    np.testing.assert_allclose(metrics["pos_cos"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["hardest_neg_cos"], 0.0, atol=1e-6)
    # If each device's hard negatives were placed elsewhere (e.g. positives first, then
    # negatives), query i's target column would hold another document: huge loss.
    perm = np.concatenate([np.arange(0, nq * G, G)] + [np.arange(k, nq * G, G) for k in range(1, G)])
    bad = contrastive_loss(q, d[perm], group_size=G, temperature=0.05)
    assert float(bad) > 5.0


@pytest.mark.parametrize("chunk, collective", [(None, "gather"), (7, "gather"), (None, "ring"),
                                               (7, "ring")])
def test_metrics_and_memory_bank(chunk, collective):
    """Extra negative columns (memory bank): in the softmax, masked by id, no gradient; the
    metrics match the reference on 4 devices."""
    G, K = 2, 8
    mesh = mesh_of(4)
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=5)
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(K, D)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank[0] = q[3]                                   # a bank entry that is a false negative...
    bank_ids = rng.integers(100, 200, size=K).astype(np.int32)
    bank_ids[0] = doc_ids[3 * G]                      # ...with the id of query 3's positive
    bank_ids[5] = -1

    def f(q, d, bank):
        return contrastive_loss_and_metrics(q, d, group_size=G, temperature=TEMP, query_pos_ids=pos_ids,
                                            doc_ids=doc_ids, chunk_size=chunk, extra_docs=bank,
                                            extra_doc_ids=bank_ids, collective=collective)
    with jax.set_mesh(mesh):
        args = put_rows(mesh, q, d, bank)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*args)
    rl, rq, rd, _, rm = reference(q, d, G, TEMP, pos_ids, doc_ids, extra=bank, extra_ids=bank_ids)
    np.testing.assert_allclose(loss, rl, rtol=1e-5)
    np.testing.assert_allclose(grads[0], rq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], rd, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grads[2]) == 0.0)
    for k, v in rm.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=k)
    # The bank changes the loss (its entries are real negatives).
    assert abs(rl - reference(q, d, G, TEMP, pos_ids, doc_ids)[0]) > 1e-3


@pytest.mark.parametrize("ndev, collective", [(1, "gather"), (4, "gather"), (4, "ring")])
def test_inside_user_shard_map_and_unsharded_inputs(ndev, collective):
    """Called inside a shard_map that is already manual over 'data' (the train step, GradCache)
    the arguments are the local shards; gradients taken inside it, also w.r.t. a replicated
    temperature through the chunked custom VJP, are right. With unsharded inputs under the
    mesh, they are laid out first. All equal the reference."""
    G = 2
    mesh = jax.make_mesh((ndev,), ("data",), devices=jax.devices()[:ndev])
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=9)
    kw = dict(group_size=G, symmetric=True, chunk_size=3, collective=collective)
    rl, rq, rd, rt, _ = reference(q, d, G, TEMP, pos_ids, doc_ids, symmetric=True)

    def inner(q, d, t, p, i):
        loss, (gq, gd, gt) = jax.value_and_grad(
            lambda q, d, t: contrastive_loss(q, d, temperature=t, query_pos_ids=p, doc_ids=i, **kw),
            argnums=(0, 1, 2))(q, d, t)
        return loss, gq * ndev, gd * ndev, gt   # local grads are of the global mean
    spec = P("data")
    with jax.set_mesh(mesh):
        args = put_rows(mesh, q, d)
        ids = put_rows(mesh, pos_ids, doc_ids)
        sm = jax.shard_map(inner, in_specs=(spec, spec, P(), spec, spec), out_specs=(P(), spec, spec, P()))
        loss, gq, gd, gt = jax.jit(sm)(*args, jnp.float32(TEMP), *ids)
        got2 = jax.jit(lambda *a: contrastive_loss(*a[:2], temperature=TEMP, query_pos_ids=a[2],
                                                   doc_ids=a[3], **kw))(q, d, pos_ids, doc_ids)
    np.testing.assert_allclose(loss, rl, rtol=1e-5)
    np.testing.assert_allclose(gq / ndev, rq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gd / ndev, rd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-4)
    np.testing.assert_allclose(got2, rl, rtol=1e-5)


def test_learnable_temperature_gradient_flows():
    G = 2
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=3)
    log_scale = init_log_scale(0.07)
    np.testing.assert_allclose(temperature_from_log_scale(log_scale, 0.01, 1.0), 0.07, rtol=1e-6)

    def f(ls, chunk):
        t = temperature_from_log_scale(ls, 0.01, 1.0)
        return contrastive_loss(q, d, group_size=G, temperature=t, doc_ids=doc_ids, chunk_size=chunk)
    g_dense = jax.grad(f)(log_scale, None)
    g_chunk = jax.grad(f)(log_scale, 4)
    _, _, _, dT, _ = reference(q, d, G, 0.07, None, doc_ids)
    np.testing.assert_allclose(g_dense, dT * -0.07, rtol=1e-4)   # dT/dlog_scale = -T
    np.testing.assert_allclose(g_chunk, g_dense, rtol=1e-5)
    # Clipped: no gradient outside [min, max].
    assert float(jax.grad(f)(init_log_scale(2.0), 4)) == 0.0


def test_chunked_never_materialises_the_matrix():
    """Compiled temp memory of the chunked loss+grads stays far below one [b, N] matrix."""
    nq, G, dim, chunk = 1024, 4, 16, 128
    q = jax.ShapeDtypeStruct((nq, dim), jnp.float32)
    d = jax.ShapeDtypeStruct((nq * G, dim), jnp.float32)

    def temp_bytes(chunk_size):
        f = jax.grad(lambda q, d: contrastive_loss(q, d, group_size=G, temperature=TEMP,
                                                   chunk_size=chunk_size), argnums=(0, 1))
        return jax.jit(f).lower(q, d).compile().memory_analysis().temp_size_in_bytes

    matrix = nq * nq * G * 4
    assert temp_bytes(None) >= matrix
    assert temp_bytes(chunk) < matrix / 4


def test_bad_arguments():
    q, d, pos_ids, doc_ids = make_embeddings(2, seed=1)
    with pytest.raises(NegjaxError, match=r"B\*group_size"):
        contrastive_loss(q, d, group_size=3, temperature=TEMP)
    with pytest.raises(NegjaxError, match="doc_ids"):
        contrastive_loss(q, d, group_size=2, temperature=TEMP, query_pos_ids=pos_ids)
    np.testing.assert_allclose(contrastive_loss(q, d, group_size=2, temperature=TEMP, chunk_size=0),
                               reference(q, d, 2, TEMP)[0], rtol=1e-5)
    with pytest.raises(NegjaxError, match="chunk_size"):
        contrastive_loss(q, d, group_size=2, temperature=TEMP, chunk_size=-1)
    with pytest.raises(NegjaxError, match="collective 'allreduce'"):
        contrastive_loss(q, d, group_size=2, temperature=TEMP, collective="allreduce")
    mesh = mesh_of(8)
    with jax.set_mesh(mesh), pytest.raises(NegjaxError, match="divide"):
        contrastive_loss(q[:4], d[:8], group_size=2, temperature=TEMP)


def test_bench_loss_command_compares_modes(tmp_path):
    """`negjax bench loss` runs each mode in a child process and checks chunked == unchunked."""
    import json

    from helpers import run_negjax

    out = tmp_path / "bench.json"
    proc = run_negjax("bench", "loss", "--batches", "32", "--dim", "8", "--chunk-size", "20",
                      "--devices", "4", "--repeats", "1", "--symmetric", "--json", "--out", out, check=True)
    rows = json.loads(proc.stdout)
    assert rows == json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["unchunked", "chunked"]
    assert all(r["devices"] == 4 and r["peak_rss_bytes"] > 0 for r in rows)
    assert rows[1]["match"] is True and rows[1]["max_rel_diff"] < 1e-4
    skipped = run_negjax("bench", "loss", "--batches", "64", "--dim", "8", "--modes", "unchunked",
                         "--max-matrix-gib", "0", "--json", check=True)
    assert "skipped" in json.loads(skipped.stdout)[0]
    bad = run_negjax("bench", "loss", "--batches", "30", "--devices", "8")
    assert bad.returncode == 2 and "divisible" in bad.stderr


@pytest.mark.parametrize("second, collective", [("model", "gather"), ("fsdp", "gather"),
                                                ("fsdp", "ring")])
def test_two_axis_mesh(second, collective):
    """A mesh with a second axis: a 'model' axis is not a batch axis (the loss shards over
    'data' only); 'fsdp' is (the batch is split over 'data' x 'fsdp', 8 shards)."""
    require_devices(8)
    G = 2
    mesh = jax.make_mesh((4, 2), ("data", second))
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=13)
    axes = ("data",) if second == "model" else ("data", "fsdp")

    def f(q, d):
        return contrastive_loss(q, d, group_size=G, temperature=TEMP, query_pos_ids=pos_ids,
                                doc_ids=doc_ids, symmetric=True, chunk_size=3,
                                collective=collective)
    with jax.set_mesh(mesh):
        args = tuple(jax.device_put(a, NamedSharding(mesh, P(axes))) for a in (q, d))
        loss, (gq, gd) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
    rl, rq, rd, _, _ = reference(q, d, G, TEMP, pos_ids, doc_ids, symmetric=True)
    np.testing.assert_allclose(loss, rl, rtol=1e-5)
    np.testing.assert_allclose(gq, rq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gd, rd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ndev", [1, 4])
def test_empty_bank_slots_are_not_columns(ndev):
    """A memory bank not yet full (slots of id -1 holding zero vectors): the loss, gradients
    and metrics equal those with only the filled slots (a zero vector would otherwise add a
    logit of 0 to every row's softmax). On one device under an Explicit mesh too."""
    G, K = 2, 8
    mesh = jax.make_mesh((ndev,), ("data",), devices=jax.devices()[:ndev])
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=21)
    rng = np.random.default_rng(22)
    bank = rng.normal(size=(K, D)).astype(np.float32)
    bank_ids = rng.integers(100, 200, size=K).astype(np.int32)
    bank[1::2], bank_ids[1::2] = 0.0, -1                # every other slot empty

    def f(q, d, bank, ids):
        return contrastive_loss_and_metrics(q, d, group_size=G, temperature=TEMP,
                                            query_pos_ids=pos_ids, doc_ids=doc_ids,
                                            extra_docs=bank, extra_doc_ids=ids, chunk_size=5)
    with jax.set_mesh(mesh):
        (loss, m), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
            *put_rows(mesh, q, d, bank, bank_ids))
    full = bank[::2]
    rl, rq, rd, _, rm = reference(q, d, G, TEMP, pos_ids, doc_ids, extra=full, extra_ids=bank_ids[::2])
    np.testing.assert_allclose(loss, rl, rtol=1e-5)
    np.testing.assert_allclose(g[0], rq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1], rd, rtol=1e-5, atol=1e-6)
    for k, v in rm.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, err_msg=k)
    # with the empty slots counted as columns the loss would differ
    with np.errstate(invalid="ignore"):  # cosines of zero vectors
        zero_cols = reference(q, d, G, TEMP, pos_ids, doc_ids, extra=bank, extra_ids=None)[0]
    assert abs(zero_cols - rl) > 1e-3


def test_precision_reaches_the_matmuls():
    """loss.precision: 'highest' (default) compiles float32 matmuls as HIGHEST, 'default'
    leaves the backend's choice; an unknown value is refused."""
    G = 2
    q, d, _, doc_ids = make_embeddings(G, seed=3)

    def text(precision, chunk):
        f = lambda q, d: contrastive_loss(q, d, group_size=G, temperature=TEMP,  # noqa: E731
                                          doc_ids=doc_ids, chunk_size=chunk, precision=precision)
        return jax.jit(jax.grad(f)).lower(q, d).as_text()
    for chunk in (None, 5):
        assert "HIGHEST" in text("highest", chunk)
        assert "HIGHEST" not in text("default", chunk) and "HIGH" in text("high", chunk)
    with pytest.raises(NegjaxError, match="precision"):
        contrastive_loss(q, d, group_size=G, temperature=TEMP, precision="fast")


MATRYOSHKA = dict(matryoshka_dims=[6, 4, 2], matryoshka_weights=[1.0, 0.5, 2.0])


def _cut(x, k):
    x = np.asarray(x, np.float64)[:, :k]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("ndev", [1, 2, 4, 8])
def test_matryoshka_loss_matches_references(ndev):
    """loss.matryoshka_dims: the weighted sum of the loss over truncated, re-normalised
    embeddings. Loss against the float64 reference per dimension; gradients (dense, chunked
    symmetric, ring; a memory bank on top) against the same sum written out on one device."""
    G, K = 2, 8
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=40 + ndev)
    rng = np.random.default_rng(7)
    bank = rng.normal(size=(K, D)).astype(np.float32)
    bank_ids = rng.integers(100, 200, size=K).astype(np.int32)
    dims, weights = MATRYOSHKA["matryoshka_dims"], MATRYOSHKA["matryoshka_weights"]

    def written_out(q, d, bank, sym, with_bank):
        from negjax.losses import truncate
        total = 0.0
        for k, w in zip(dims, weights):
            loss, _ = contrastive_loss_and_metrics(
                truncate(q, k, True), truncate(d, k, True), group_size=G, temperature=TEMP,
                query_pos_ids=pos_ids, doc_ids=doc_ids, symmetric=sym,
                extra_docs=truncate(bank, k, True) if with_bank else None,
                extra_doc_ids=bank_ids if with_bank else None)
            total = total + w * loss
        return total

    variants = [(False, None, "gather", False), (True, 3, "gather", False),
                (False, None, "ring", False), (False, 5, "gather", True)]
    for sym, chunk, coll, with_bank in variants:
        what = f"devices={ndev} symmetric={sym} chunk={chunk} {coll} bank={with_bank}"

        def f(q, d, bank):
            return contrastive_loss_and_metrics(
                q, d, group_size=G, temperature=TEMP, query_pos_ids=pos_ids, doc_ids=doc_ids,
                symmetric=sym, chunk_size=chunk, collective=coll,
                extra_docs=bank if with_bank else None,
                extra_doc_ids=bank_ids if with_bank else None, **MATRYOSHKA)[0]
        with in_mesh(mesh):
            got_loss, got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*put_rows(mesh, q, d, bank))
        want_loss, want = jax.value_and_grad(written_out, argnums=(0, 1))(
            jnp.asarray(q), jnp.asarray(d), jnp.asarray(bank), sym, with_bank)
        ref = sum(w * reference(_cut(q, k), _cut(d, k), G, TEMP, pos_ids, doc_ids, sym,
                                extra=_cut(bank, k) if with_bank else None,
                                extra_ids=bank_ids if with_bank else None)[0]
                  for k, w in zip(dims, weights))
        np.testing.assert_allclose(got_loss, ref, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(want_loss, ref, rtol=1e-5, err_msg=what)
        for a, b in zip(got, want):  # float32 sums in another order: rounding at 1e-5 of the largest
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()),
                                       err_msg=what)
    # Only the leading dimensions: a change in the last two coordinates moves only the 6-dim term.
    base = contrastive_loss(q, d, group_size=G, temperature=TEMP, matryoshka_dims=[4, 2])
    d2 = d.copy()
    d2[:, 4:] += 1.0
    assert float(contrastive_loss(q, d2, group_size=G, temperature=TEMP,
                                  matryoshka_dims=[4, 2])) == pytest.approx(float(base), rel=1e-6)
    with pytest.raises(NegjaxError, match="matryoshka"):
        contrastive_loss(q, d, group_size=G, temperature=TEMP, matryoshka_dims=[8])


@pytest.mark.parametrize("ndev", [1, 2, 4, 8])
def test_false_negative_guard_matches_reference(ndev):
    """loss.false_negative_margin: negatives scoring above positive x (1 - m) leave the row's
    softmax, on every path (dense, chunked, ring, symmetric, a memory bank); the number masked
    is reported."""
    G, K, m = 2, 8, 0.2
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=60 + ndev)
    rng = np.random.default_rng(8)
    bank = rng.normal(size=(K, D)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_ids = rng.integers(100, 200, size=K).astype(np.int32)
    variants = [(False, None, "gather", False), (True, 3, "gather", False),
                (True, None, "ring", False), (False, 5, "ring", True), (False, None, "gather", True)]
    for sym, chunk, coll, with_bank in variants:
        what = f"devices={ndev} symmetric={sym} chunk={chunk} {coll} bank={with_bank}"
        extra = dict(extra_docs=bank, extra_doc_ids=bank_ids) if with_bank else {}

        def f(q, d):
            return contrastive_loss_and_metrics(
                q, d, group_size=G, temperature=TEMP, query_pos_ids=pos_ids, doc_ids=doc_ids,
                symmetric=sym, chunk_size=chunk, collective=coll, false_negative_margin=m,
                **extra)
        with in_mesh(mesh):
            if with_bank and mesh is not None:
                extra = dict(extra_docs=put_rows(mesh, bank)[0], extra_doc_ids=put_rows(mesh, bank_ids)[0])
            (loss, metrics), (gq, gd) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
                *put_rows(mesh, q, d))
        rl, rq, rd, _, rm = reference(q, d, G, TEMP, pos_ids, doc_ids, sym, margin=m,
                                      extra=bank if with_bank else None,
                                      extra_ids=bank_ids if with_bank else None)
        np.testing.assert_allclose(loss, rl, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(gq, rq, rtol=1e-5, atol=1e-6, err_msg=what)
        np.testing.assert_allclose(gd, rd, rtol=1e-5, atol=1e-6, err_msg=what)
        assert int(metrics["false_negatives_masked"]) == rm["false_negatives_masked"] > 0, what
        for k in ("accuracy", "pos_cos", "neg_cos"):
            np.testing.assert_allclose(metrics[k], rm[k], rtol=1e-5, err_msg=f"{what} {k}")
    # Off and m -> 1 (threshold 0 for positive scores) differ; a bad margin is refused.
    off = reference(q, d, G, TEMP, pos_ids, doc_ids)[0]
    assert abs(off - reference(q, d, G, TEMP, pos_ids, doc_ids, margin=m)[0]) > 1e-3
    with pytest.raises(NegjaxError, match="false_negative_margin"):
        contrastive_loss(q, d, group_size=G, temperature=TEMP, false_negative_margin=1.5)


# ---------------------------------------------------------------------------------------
# In-batch negatives off (per query)
# ---------------------------------------------------------------------------------------

IB_G = 3
IB_MIXED = np.array([True, False, False, True, False, True, True, False])  # per query, B = 8
# (symmetric, chunk_size, collective): chunk 4 is below both the 24 document and 8 query columns
IB_VARIANTS = [(sym, chunk, coll) for coll in ("gather", "ring") for chunk in (None, 4)
               for sym in (False, True)]


def _masks_inside_restricted_group(G, pos_ids, doc_ids, flags):
    """Whether some query without in-batch negatives has a hard negative masked by its id."""
    pos = _positive_sets(G, pos_ids, doc_ids, len(flags))
    return any(int(doc_ids[c]) in pos[i] for i in np.flatnonzero(~flags)
               for c in range(i * G + 1, (i + 1) * G))


@functools.cache
def _in_batch_fn():
    """One jitted function: loss and gradients (q, d, temperature) of every variant with
    in_batch_negatives=False (a Python bool) and with a traced per-query array."""
    def all_variants(q, d, pos_ids, doc_ids, flags, temp):
        out = []
        for sym, chunk, coll in IB_VARIANTS:
            for ib in (False, flags):
                f = lambda q, d, t: contrastive_loss(  # noqa: E731
                    q, d, group_size=IB_G, temperature=t, query_pos_ids=pos_ids, doc_ids=doc_ids,
                    symmetric=sym, chunk_size=chunk, collective=coll, in_batch_negatives=ib)
                out.append(jax.value_and_grad(f, argnums=(0, 1, 2))(q, d, temp))
        return out
    return jax.jit(all_variants)


@pytest.mark.parametrize("ndev", [1, 2, 4, 8])
def test_in_batch_negatives_off_matches_reference(ndev):
    """in_batch_negatives False / per query: a query without in-batch negatives is scored only
    against its own group (ids still masked inside it), the symmetric row of its positive only
    against itself; loss and gradients match the float64 reference on every path."""
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(IB_G, seed=70 + ndev)
    assert _masks_inside_restricted_group(IB_G, pos_ids, doc_ids, IB_MIXED)
    with in_mesh(mesh):
        results = _in_batch_fn()(*put_rows(mesh, q, d, pos_ids, doc_ids, IB_MIXED),
                                 jnp.float32(TEMP))
    results = iter(results)
    for sym, chunk, coll in IB_VARIANTS:
        for name, flags in (("False", np.zeros(B, bool)), ("mixed", IB_MIXED)):
            loss, (gq, gd, gt) = next(results)
            what = f"devices={ndev} symmetric={sym} chunk={chunk} {coll} in_batch={name}"
            rl, rq, rd, rt, _ = reference(q, d, IB_G, TEMP, pos_ids, doc_ids, sym, in_batch=flags)
            np.testing.assert_allclose(loss, rl, rtol=1e-5, err_msg=what)
            np.testing.assert_allclose(gq, rq, rtol=1e-5, atol=1e-6, err_msg=what)
            np.testing.assert_allclose(gd, rd, rtol=1e-5, atol=1e-6, err_msg=what)
            np.testing.assert_allclose(gt, rt, rtol=1e-4, atol=1e-6, err_msg=what)
            # the restriction matters for this data
            assert abs(rl - reference(q, d, IB_G, TEMP, pos_ids, doc_ids, sym)[0]) > 1e-2, what


@pytest.mark.parametrize("ndev", [1, 4])
def test_in_batch_negatives_all_true_is_unchanged(ndev):
    """A [B] array of True gives the results of the call without the argument; a Python True
    passes nothing on (the same program)."""
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(IB_G, seed=75)
    variants = [(True, None, "gather"), (True, 4, "gather"), (True, None, "ring"),
                (False, 4, "ring")]
    kw = dict(group_size=IB_G, temperature=TEMP, query_pos_ids=pos_ids, doc_ids=doc_ids)

    def both(q, d, ones):
        out = []
        for sym, chunk, coll in variants:
            for ib in ({}, dict(in_batch_negatives=ones)):
                f = lambda q, d: contrastive_loss(q, d, symmetric=sym, chunk_size=chunk,  # noqa: E731
                                                  collective=coll, **kw, **ib)
                out.append(jax.value_and_grad(f, argnums=(0, 1))(q, d))
        return out
    with in_mesh(mesh):
        args = put_rows(mesh, q, d, np.ones(B, bool))
        results = jax.jit(both)(*args)
        program = lambda **ib: jax.jit(functools.partial(  # noqa: E731
            contrastive_loss, symmetric=True, chunk_size=4, collective="ring", **kw, **ib)
        ).lower(*args[:2]).as_text()
        assert program(in_batch_negatives=True) == program()
    for (sym, chunk, coll), plain, ones in zip(variants, results[::2], results[1::2]):
        what = f"devices={ndev} symmetric={sym} chunk={chunk} {coll}"
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ones)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-7, err_msg=what)


@pytest.mark.parametrize("ndev", [1, 4])
def test_in_batch_negatives_off_metrics_and_bank(ndev):
    """With a memory bank and the false-negative guard: a query without in-batch negatives
    never has a bank column or another query's document as a negative, in the loss or the
    metrics (a bank copy of such a query, or another query's hard negative equal to it, would
    be guarded and counted); `LossSpec`, 0/1 ints, matryoshka and an already-manual
    shard_map take the flags too."""
    from negjax.losses import LossSpec

    G, K, m = IB_G, 8, 0.2
    mesh = mesh_of(ndev) if ndev > 1 else None
    q, d, pos_ids, doc_ids = make_embeddings(G, seed=80 + ndev)
    rng = np.random.default_rng(81)
    bank = rng.normal(size=(K, D)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_ids = rng.integers(100, 200, size=K).astype(np.int32)
    off, on = np.flatnonzero(~IB_MIXED), np.flatnonzero(IB_MIXED)
    bank[:2] = q[off[:2]]                  # restricted queries' own vectors in the bank
    bank_ids[5] = -1                       # an empty slot
    d[on[0] * G + 1] = q[off[2]]           # and as another query's hard negative
    flags = IB_MIXED
    # (symmetric, chunk_size, collective, margin)
    variants = [(False, None, "gather", m), (False, 4, "gather", None), (False, None, "ring", m),
                (True, 4, "ring", m)]

    def all_variants(q, d, bank, bank_ids, flags):
        out = []
        for sym, chunk, coll, margin in variants:
            spec = LossSpec(group_size=G, symmetric=sym, chunk_size=chunk, collective=coll,
                            false_negative_margin=margin)
            f = lambda q, d: spec(q, d, temperature=TEMP, query_pos_ids=pos_ids,  # noqa: E731
                                  doc_ids=doc_ids, extra_docs=bank, extra_doc_ids=bank_ids,
                                  in_batch_negatives=flags)
            out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(q, d))
        return out
    with in_mesh(mesh):
        results = jax.jit(all_variants)(*put_rows(mesh, q, d, bank, bank_ids, flags))
    for (sym, chunk, coll, margin), ((loss, metrics), (gq, gd)) in zip(variants, results):
        what = f"devices={ndev} symmetric={sym} chunk={chunk} {coll} margin={margin}"
        rl, rq, rd, _, rm = reference(q, d, G, TEMP, pos_ids, doc_ids, sym, extra=bank,
                                      extra_ids=bank_ids, margin=margin, in_batch=flags)
        np.testing.assert_allclose(loss, rl, rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(gq, rq, rtol=1e-5, atol=1e-6, err_msg=what)
        np.testing.assert_allclose(gd, rd, rtol=1e-5, atol=1e-6, err_msg=what)
        for k, v in rm.items():
            np.testing.assert_allclose(metrics[k], v, rtol=1e-5, err_msg=f"{what} {k}")
        if margin is not None:  # counts: only the restricted queries' own groups' columns
            everyone = reference(q, d, G, TEMP, pos_ids, doc_ids, extra=bank, extra_ids=bank_ids,
                                 margin=margin)[4]["false_negatives_masked"]
            assert int(metrics["false_negatives_masked"]) == rm["false_negatives_masked"], what
            assert rm["false_negatives_masked"] + 3 <= everyone, what
    want = reference(q, d, G, TEMP, pos_ids, doc_ids, True, in_batch=flags)[0]
    if mesh is None:
        kw = dict(group_size=G, temperature=TEMP, query_pos_ids=pos_ids, doc_ids=doc_ids)
        got = contrastive_loss(q, d, symmetric=True, in_batch_negatives=flags.astype(np.int32), **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        got = contrastive_loss(q, d, matryoshka_dims=[4], in_batch_negatives=flags, **kw)
        ref = reference(_cut(q, 4), _cut(d, 4), G, TEMP, pos_ids, doc_ids, in_batch=flags)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        for bad in (flags[:-1], flags.astype(np.float32)):
            with pytest.raises(NegjaxError, match="in_batch_negatives"):
                contrastive_loss(q, d, in_batch_negatives=bad, **kw)
    else:  # inside a shard_map already manual over 'data' the flags are the local shard
        def inner(q, d, p, i, f):
            return contrastive_loss(q, d, group_size=G, temperature=TEMP, query_pos_ids=p,
                                    doc_ids=i, symmetric=True, chunk_size=4, collective="ring",
                                    in_batch_negatives=f)
        with jax.set_mesh(mesh):
            sm = jax.shard_map(inner, in_specs=(P("data"),) * 5, out_specs=P())
            got = jax.jit(sm)(*put_rows(mesh, q, d, pos_ids, doc_ids, flags))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def _distill_reference(q, d, t, G, mode, T, Tt):
    """float64: per-query KL / margin-MSE over the scored documents of its group."""
    q, d, t = (np.asarray(x, np.float64) for x in (q, d, t))
    s = np.einsum("bd,bgd->bg", q, d.reshape(len(q), G, -1)) / T
    rows = []
    for i in range(len(q)):
        known = np.isfinite(t[i])
        if not (known[0] and known[1:].any()):
            continue
        ti, si = t[i][known] / Tt, s[i][known]
        if mode == "kl":
            pt = np.exp(ti - ti.max()) / np.exp(ti - ti.max()).sum()
            lps = si - si.max() - np.log(np.exp(si - si.max()).sum())
            rows.append(float(np.sum(pt * (np.log(pt) - lps))))
        else:
            neg = np.flatnonzero(known[1:]) + 1
            rows.append(float(np.mean(((s[i, 0] - s[i, neg]) - (t[i, 0] - t[i, neg]) / Tt) ** 2)))
    return np.mean(rows), len(rows)


@pytest.mark.parametrize("mode", ["kl", "margin_mse"])
def test_distillation_loss_matches_reference(mode):
    """loss.distill: the teacher's scores over each query's group, unscored documents (NaN)
    left out, queries without a scored positive and negative not counted; gradients finite."""
    from negjax.losses import distillation_loss

    G = 4
    q, d, _, _ = make_embeddings(G, seed=90)
    rng = np.random.default_rng(91)
    t = rng.normal(size=(B, G)).astype(np.float32) * 3
    t[1, 2] = np.nan
    t[2, 1:] = np.nan          # no scored negative: not counted
    t[3, 0] = np.nan           # no scored positive: not counted
    want, n = _distill_reference(q, d, t, G, mode, TEMP, 2.0)
    f = lambda q, d: distillation_loss(q, d, t, group_size=G, mode=mode, temperature=TEMP,  # noqa: E731
                                       teacher_temperature=2.0)
    (got, count), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(q, d)
    assert int(count) == n == B - 2
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.abs(np.asarray(grads[0])[2]).max() == 0.0  # an uncounted query gets no gradient
    with pytest.raises(NegjaxError, match="distillation"):
        distillation_loss(q, d, t[:, :2], group_size=G, mode=mode, temperature=TEMP)
