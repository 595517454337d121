"""The train step against a plain single-device reference: gradients over 1, 2, 4, 8
devices, GradCache == plain, learnable temperature, memory bank, non-finite guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (B, G, assert_trees_close, make_cfg, make_token_batch, mesh_of, put_batch,
                     require_devices)
from negjax.config import ModelConfig
from negjax.losses import contrastive_loss
from negjax.model import load_encoder
from negjax.model.packaged import minilm_dir
from negjax.train.state import init_state
from negjax.train.sharding import place_state
from negjax.train.step import make_train_step

@pytest.fixture(scope="module")
def enc():
    cfg = ModelConfig(name="tiny", tokenizer=str(minilm_dir()), hidden_size=16, num_layers=1,
                      num_heads=2, intermediate_size=32, dropout=0.0)
    return load_encoder(cfg)


def reference(enc, params, batch, cfg, g=G):
    """Plain single-device computation: encode everything, the public loss, jax.grad."""
    def loss_fn(p):
        q = enc.encode(p["model"], batch["q_tokens"], batch["q_mask"], tower="query")
        d = enc.encode(p["model"], batch["d_tokens"], batch["d_mask"], tower="doc")
        return contrastive_loss(q, d, group_size=g, temperature=cfg.loss.temperature,
                                query_pos_ids=batch["query_pos_ids"], doc_ids=batch["doc_ids"],
                                symmetric=cfg.loss.symmetric)
    return jax.value_and_grad(loss_fn)({"model": params})


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["plain", "gradcache", "chunked_symmetric", "ring_gradcache"])
def test_grads_match_reference(enc, n, mode):
    require_devices(n)
    kw = dict(train__grad_cache_chunk=0)
    if mode == "ring_gradcache":  # the ring loss inside the GradCache step
        kw.update(loss__collective="ring", loss__chunk_size=5, loss__symmetric=True)
    if mode in ("gradcache", "ring_gradcache"):
        if B // n < 2:
            kw["train__grad_cache_chunk"] = 1
        else:
            kw["train__grad_cache_chunk"] = B // n // 2
    if mode == "chunked_symmetric":
        kw.update(loss__chunk_size=5, loss__symmetric=True)
    cfg = make_cfg(**kw)
    batch = make_token_batch()
    ref_loss, ref_grads = reference(enc, enc.params, batch, cfg)
    mesh = mesh_of(n)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    loss, metrics, grads = step_fn.loss_and_grads({"model": enc.params}, put_batch(batch, mesh), jnp.int32(0))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_gradcache_equals_plain_with_dropout(enc):
    enc_d = dataclasses.replace(enc, config=enc.config.replace(hidden_dropout=0.1, attention_dropout=0.1))
    mesh = mesh_of(2)
    batch = put_batch(make_token_batch(1), mesh)
    # Same sub-batch = the whole per-device batch: identical dropout keys, so identical grads.
    plain = make_train_step(enc_d, make_cfg(), mesh, group_size=G)
    cached = make_train_step(enc_d, make_cfg(train__grad_cache_chunk=B // 2), mesh, group_size=G)
    out_p = plain.loss_and_grads({"model": enc.params}, batch, jnp.int32(3))
    out_c = cached.loss_and_grads({"model": enc.params}, batch, jnp.int32(3))
    np.testing.assert_allclose(float(out_p[0]), float(out_c[0]), rtol=1e-6)
    assert_trees_close(out_p[2], out_c[2])
    # Dropout is really on: a different step gives a different loss.
    other = plain.loss_and_grads({"model": enc.params}, batch, jnp.int32(4))
    assert abs(float(other[0]) - float(out_p[0])) > 1e-6


def test_train_steps_learnable_temperature_and_guard(enc):
    mesh = mesh_of(4)
    cfg = make_cfg(loss__learnable_temperature=True, train__learning_rate=1e-3, train__warmup_steps=0)
    state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    batch = put_batch(make_token_batch(2), mesh)
    t0 = float(cfg.loss.temperature)
    losses = []
    for _ in range(5):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert int(state.step) == 5 and int(state.nonfinite) == 0
    assert float(m["temperature"]) != pytest.approx(t0)
    # A NaN in the inputs' embeddings path: poison the params -> the step is skipped.
    bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan if x.ndim == 2 else x, state.params))
    bad_params = jax.tree.map(np.asarray, bad.params)
    bad, m = step_fn(bad, batch)
    assert int(bad.nonfinite) == 1 and float(m["skipped"]) == 1.0
    assert int(bad.step) == 6
    assert_trees_close(jax.tree.map(np.asarray, bad.params), bad_params)


def test_memory_bank_rotates_and_gets_no_gradient(enc):
    mesh = mesh_of(2)
    k = 2 * B * G  # two steps of documents
    cfg = make_cfg(loss__memory_bank_size=k, loss__momentum=0.5)
    state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    b1, b2, b3 = (make_token_batch(s) for s in (10, 11, 12))
    for shift, b in ((1000, b1), (2000, b2)):  # distinct document ids per batch
        b["doc_ids"] = b["doc_ids"] + shift
        b["query_pos_ids"] = np.where(b["query_pos_ids"] >= 0, b["query_pos_ids"] + shift, -1)
    state, _ = step_fn(state, put_batch(b1, mesh))
    ids = np.asarray(state.bank_ids)
    # each device enqueues its own documents at the front of its half of the queue
    half = k // 2
    np.testing.assert_array_equal(ids[:B * G // 2], b1["doc_ids"][:B * G // 2])
    np.testing.assert_array_equal(ids[half:half + B * G // 2], b1["doc_ids"][B * G // 2:])
    assert (ids == -1).sum() == k - B * G
    state, _ = step_fn(state, put_batch(b2, mesh))
    assert (np.asarray(state.bank_ids) >= 0).all()
    # third step overwrites the oldest entries (b1's)
    state, _ = step_fn(state, put_batch(b3, mesh))
    ids = np.asarray(state.bank_ids)
    assert set(ids.tolist()).isdisjoint(set(b1["doc_ids"].tolist()) - set(b3["doc_ids"].tolist()))
    # Queued embeddings act as negatives without gradient: the loss changes with the bank,
    # the gradient w.r.t. the bank is zero.
    batch = put_batch(b3, mesh)
    l_bank, _, _ = step_fn.loss_and_grads(state.params, batch, state.step, state.bank, state.bank_ids)
    l_none, _, _ = step_fn.loss_and_grads(state.params, batch, state.step)
    assert float(l_bank) > float(l_none)

    def loss_wrt_bank(bank):
        return step_fn.loss_and_grads(state.params, batch, state.step, bank, state.bank_ids)[0]
    with jax.set_mesh(mesh):
        g_bank = jax.grad(loss_wrt_bank)(state.bank)
    assert float(jnp.abs(g_bank).max()) == 0.0


def test_memory_bank_with_gradcache_enqueues_the_same_embeddings(enc):
    """The momentum encoder encodes in GradCache sub-batches: the queue gets what the plain
    step's whole-batch encode gives."""
    mesh = mesh_of(2)
    banks = []
    for chunk in (0, B // 2 // 2):
        cfg = make_cfg(loss__memory_bank_size=2 * B * G, loss__momentum=0.5,
                       train__grad_cache_chunk=chunk)
        state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
        state, _ = make_train_step(enc, cfg, mesh, group_size=G)(state, put_batch(make_token_batch(4), mesh))
        banks.append((np.asarray(state.bank), np.asarray(state.bank_ids)))
    np.testing.assert_array_equal(banks[0][1], banks[1][1])
    assert np.abs(banks[0][0]).max() > 0
    np.testing.assert_allclose(banks[1][0], banks[0][0], rtol=1e-5, atol=1e-6)


def device_bytes(tree):
    """The largest per-device total of `tree`'s shards (bytes)."""
    per = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values())


@pytest.mark.parametrize("mode", ["plain", "gradcache_bank_temperature"])
def test_fsdp_matches_replicated(enc, mode):
    """8 devices as ('data' 8), ('data' 1 x 'fsdp' 8) and ('data' 2 x 'fsdp' 4): the same
    losses for 5 steps and the same parameters after them, with parameters + optimizer state
    cut to 1/8 and 1/4 per device."""
    from negjax.distributed import make_mesh

    require_devices(8)
    kw = dict(train__learning_rate=1e-3, train__warmup_steps=0)
    if mode != "plain":
        kw.update(train__grad_cache_chunk=1, loss__memory_bank_size=2 * B * G,
                  loss__momentum=0.5, loss__learnable_temperature=True)
    cfg = make_cfg(**kw)
    batches = [make_token_batch(20 + s) for s in range(5)]
    runs = {}
    for fsdp in (1, 8, 4):
        mesh = make_mesh(8, fsdp=fsdp)
        state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
        size = device_bytes((state.params, state.opt_state))
        step_fn = make_train_step(enc, cfg, mesh, group_size=G)
        losses = []
        for b in batches:
            state, m = step_fn(state, put_batch(b, mesh))
            losses.append(float(m["loss"]))
        runs[fsdp] = (losses, size, jax.tree.map(np.asarray, state.params), state)
    losses, size, params, ref_state = runs[1]
    for fsdp in (8, 4):
        np.testing.assert_allclose(runs[fsdp][0], losses, rtol=1e-5)
        # Parameters whose gradient is zero in exact arithmetic (the attention key bias: softmax
        # ignores a per-query constant) get rounding noise as gradients, which AdamW turns into
        # steps of up to ~1e-9 of either sign in any layout (measured: 1.3e-9 against 1.2e-10).
        # A wrong gradient moves a parameter by about lr per step: 1e-3 x lr sits between.
        assert_trees_close(runs[fsdp][2], params, rtol=1e-4, atol=1e-3 * cfg.train.learning_rate)
        assert runs[fsdp][1] <= size / fsdp * 1.05, (fsdp, runs[fsdp][1], size)
    if mode != "plain":  # the queue and the momentum encoder follow too
        for fsdp in (8, 4):
            state = runs[fsdp][3]
            np.testing.assert_array_equal(np.asarray(state.bank_ids), np.asarray(ref_state.bank_ids))
            np.testing.assert_allclose(np.asarray(state.bank), np.asarray(ref_state.bank),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1])
def test_step_returns_the_diagnostics_sample(enc, chunk):
    """The step hands the diagnostics the embeddings it computed (plain and GradCache): with
    2 queries per device, all of them, in device order, replicated."""
    mesh = mesh_of(4)
    cfg = make_cfg(train__grad_cache_chunk=chunk)
    batch = make_token_batch(7)
    _, metrics, _ = make_train_step(enc, cfg, mesh, group_size=G).loss_and_grads(
        {"model": enc.params}, put_batch(batch, mesh), jnp.int32(0))
    q = enc.encode(enc.params, batch["q_tokens"], batch["q_mask"], tower="query")
    d = enc.encode(enc.params, batch["d_tokens"], batch["d_mask"], tower="doc")
    np.testing.assert_allclose(np.asarray(metrics["sample_q"]), q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["sample_d"]), d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,gc", [(1, 0), (4, 1), (8, 0)])
def test_matryoshka_step_matches_reference(enc, n, gc):
    """loss.matryoshka_dims through the train step (plain and GradCache) == the public loss
    with the same dims on one device."""
    require_devices(n)
    dims, weights = [16, 8, 4], [1.0, 1.0, 0.5]
    cfg = make_cfg(train__grad_cache_chunk=gc, loss__matryoshka_dims=dims,
                   loss__matryoshka_weights=weights)
    batch = make_token_batch(3)

    def loss_fn(p):
        q = enc.encode(p["model"], batch["q_tokens"], batch["q_mask"], tower="query")
        d = enc.encode(p["model"], batch["d_tokens"], batch["d_mask"], tower="doc")
        return contrastive_loss(q, d, group_size=G, temperature=cfg.loss.temperature,
                                query_pos_ids=batch["query_pos_ids"], doc_ids=batch["doc_ids"],
                                matryoshka_dims=dims, matryoshka_weights=weights)
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)({"model": enc.params})
    mesh = mesh_of(n)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    loss, _, grads = step_fn.loss_and_grads({"model": enc.params}, put_batch(batch, mesh), jnp.int32(0))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    plain = reference(enc, enc.params, batch, cfg)[0]
    assert abs(float(loss) - float(plain)) > 1e-3  # the truncated terms are really there


@pytest.mark.parametrize("n,gc,mode", [(1, 0, "kl"), (4, 1, "kl"), (8, 0, "margin_mse")])
def test_distillation_step_matches_reference(enc, n, gc, mode):
    """loss.distill through the train step (plain and GradCache, several devices) == InfoNCE +
    weight x the public distillation loss on one device; its value is a metric."""
    from negjax.losses import distillation_loss

    require_devices(n)
    cfg = make_cfg(train__grad_cache_chunk=gc, loss__distill=mode, loss__distill_weight=0.5,
                   loss__teacher_temperature=2.0)
    batch = make_token_batch(4)
    t = np.random.default_rng(5).normal(size=(B, G)).astype(np.float32)
    t[2, 1] = np.nan
    batch["teacher_scores"] = t

    def loss_fn(p):
        q = enc.encode(p["model"], batch["q_tokens"], batch["q_mask"], tower="query")
        d = enc.encode(p["model"], batch["d_tokens"], batch["d_mask"], tower="doc")
        nce = contrastive_loss(q, d, group_size=G, temperature=cfg.loss.temperature,
                               query_pos_ids=batch["query_pos_ids"], doc_ids=batch["doc_ids"])
        dist, _ = distillation_loss(q, d, t, group_size=G, mode=mode,
                                    temperature=cfg.loss.temperature, teacher_temperature=2.0)
        return nce + 0.5 * dist, dist
    (ref_loss, ref_dist), ref_grads = jax.value_and_grad(loss_fn, has_aux=True)({"model": enc.params})
    mesh = mesh_of(n)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    placed = put_batch({k: v for k, v in batch.items() if k != "teacher_scores"}, mesh)
    placed["teacher_scores"] = jax.device_put(t, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    loss, metrics, grads = step_fn.loss_and_grads({"model": enc.params}, placed, jnp.int32(0))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill_loss"]), float(ref_dist), rtol=1e-5)
    assert int(metrics["distill_queries"]) == B - 1
    assert_trees_close(grads, ref_grads)
