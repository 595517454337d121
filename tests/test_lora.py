"""LoRA: gradients of the adapters against a plain reference (1-8 devices, GradCache, FSDP),
frozen base weights bit-identical after training, an optimizer state of adapters only, and
an export that merges them (kernel + (alpha / r) A B)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import (G, assert_trees_close, make_cfg, make_token_batch, mesh_of, put_batch,
                     require_devices)
from negjax.config import ModelConfig
from negjax.losses import contrastive_loss
from negjax.model import load_encoder
from negjax.model.lora import combine, split_trainable
from negjax.model.packaged import minilm_dir
from negjax.train.state import init_state
from negjax.train.sharding import place_state, tree_specs
from negjax.train.step import make_train_step

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def enc():
    cfg = ModelConfig(name="tiny", tokenizer=str(minilm_dir()), hidden_size=16, num_layers=2,
                      num_heads=2, intermediate_size=32, dropout=0.0, lora_rank=RANK,
                      lora_alpha=ALPHA, lora_targets=["query", "value", "intermediate"])
    enc = load_encoder(cfg)
    # B starts at zero (no gradient reaches A then); give it values so both get gradients.
    rng = np.random.default_rng(0)
    flat = flatten_dict(enc.params)
    enc.params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32)
        if str(path[-1].key) == "lora_b" else x, enc.params)
    assert any(k[-1] == "lora_a" for k in flat)
    return enc


def adapter_paths(tree):
    return sorted(k for k in flatten_dict(tree) if k[-1] in ("lora_a", "lora_b"))


def test_fresh_adapters_leave_the_model_unchanged():
    base = ModelConfig(name="tiny", tokenizer=str(minilm_dir()), hidden_size=16, num_layers=1,
                       num_heads=2, intermediate_size=32, dropout=0.0)
    plain = load_encoder(base)
    lora = load_encoder(dataclasses.replace(base, lora_rank=2))
    # Only the default targets (attention projections) get adapters.
    layers = {k[-2] for k in adapter_paths(lora.params)}
    assert layers == {"query", "key", "value", "attention_output"}
    _, frozen = split_trainable(lora.params)
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(x, y)
    batch = make_token_batch()
    a = lora.encode(lora.params, batch["q_tokens"], batch["q_mask"])
    b = plain.encode(plain.params, batch["q_tokens"], batch["q_mask"])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def reference(enc, params, batch, cfg):
    """Single device, the public loss, jax.grad w.r.t. the adapters only."""
    trainable, frozen = split_trainable(params)

    def loss_fn(t):
        p = combine(t, frozen)
        q = enc.encode(p, batch["q_tokens"], batch["q_mask"], tower="query")
        d = enc.encode(p, batch["d_tokens"], batch["d_mask"], tower="doc")
        return contrastive_loss(q, d, group_size=G, temperature=cfg.loss.temperature,
                                query_pos_ids=batch["query_pos_ids"], doc_ids=batch["doc_ids"])
    return jax.value_and_grad(loss_fn)(trainable)


@pytest.mark.parametrize("n,mode", [(1, "plain"), (2, "plain"), (4, "plain"), (8, "plain"),
                                    (2, "gradcache"), (8, "fsdp")])
def test_lora_gradients_match_reference(enc, n, mode):
    require_devices(n)
    cfg = make_cfg(train__grad_cache_chunk=2 if mode == "gradcache" else 0)
    batch = make_token_batch()
    ref_loss, ref_grads = reference(enc, enc.params, batch, cfg)
    if mode == "fsdp":
        from negjax.distributed import make_mesh
        mesh = make_mesh(n, fsdp=4)
    else:
        mesh = mesh_of(n)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    params = {"model": enc.params}
    # Parameters cut over 'fsdp' as the train state places them.
    params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                                 tree_specs(params, mesh),
                                                 is_leaf=lambda x: isinstance(x, P)))
    loss, _, grads = step_fn.loss_and_grads(params, put_batch(batch, mesh), jnp.int32(0))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    # The gradient tree holds the adapters and nothing else.
    assert adapter_paths(grads["model"]) == sorted(flatten_dict(grads["model"]))
    assert_trees_close(grads["model"], ref_grads)


def test_training_freezes_the_base_and_export_merges(enc, tmp_path):
    from safetensors.numpy import load_file

    from negjax.model.encoder import export_hf

    mesh = mesh_of(2)
    cfg = make_cfg(train__learning_rate=1e-2, train__warmup_steps=0)
    state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
    before = jax.tree.map(np.asarray, enc.params)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)
    losses = []
    for s in range(4):
        state, m = step_fn(state, put_batch(make_token_batch(30 + s % 2), mesh))
        losses.append(float(m["loss"]))
    after = jax.tree.map(np.asarray, state.params["model"])
    assert losses[-1] < losses[0]
    # Frozen weights: bit for bit; adapters: moved.
    flat_b, flat_a = flatten_dict(before), flatten_dict(after)
    assert flat_b.keys() == flat_a.keys()
    for k in flat_b:
        if k[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(flat_a[k], flat_b[k]), k
        else:
            assert flat_a[k].tobytes() == flat_b[k].tobytes(), k
    # The optimizer state: AdamW moments of the adapters only.
    opt_arrays = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                  if np.ndim(x) > 0]
    assert opt_arrays
    assert all(str(p[-1].key) in ("lora_a", "lora_b") for p, _ in opt_arrays)
    n_adapter = sum(flat_a[k].size for k in adapter_paths(after))
    assert sum(np.size(x) for _, x in opt_arrays) == 2 * n_adapter

    # Export: plain kernels = base + (alpha / r) A B; transformers-free check on the tensors,
    # then the export loads as a plain model that encodes as the adapted one does.
    out = export_hf(enc, after, tmp_path / "merged")
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in tensors)
    tower = after["encoder"]
    for i in range(2):
        for name, hf in (("query", f"encoder.layer.{i}.attention.self.query.weight"),
                         ("intermediate", f"encoder.layer.{i}.intermediate.dense.weight")):
            dense = tower[f"layer_{i}"]["attention"][name] if name == "query" else tower[f"layer_{i}"][name]
            want = (dense["kernel"].astype(np.float64)
                    + ALPHA / RANK * dense["lora_a"].astype(np.float64) @ dense["lora_b"].astype(np.float64))
            np.testing.assert_allclose(tensors[hf].T, want, rtol=1e-6, atol=1e-7)
    merged = load_encoder(ModelConfig(name=str(out), pooling="mean"))
    assert not adapter_paths(merged.params)
    batch = make_token_batch(5)
    for tower_name, t, m in (("query", "q_tokens", "q_mask"), ("doc", "d_tokens", "d_mask")):
        a = enc.encode(after, batch[t], batch[m], tower=tower_name)
        b = merged.encode(merged.params, batch[t], batch[m], tower=tower_name)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
