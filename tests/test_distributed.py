"""Mesh, shardings, host-local -> global batches, and the loss across two real processes."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from helpers import require_devices, start_processes, wait_all
from negjax import distributed
from negjax.config import DistributedConfig
from negjax.errors import NegjaxError
from negjax.losses import contrastive_loss


def test_make_mesh_and_shardings():
    require_devices(8)
    mesh = distributed.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    small = distributed.make_mesh(2, axis_type="auto")
    assert small.shape["data"] == 2 and small.axis_types == (jax.sharding.AxisType.Auto,)
    x = jax.device_put(np.arange(16.0).reshape(8, 2), distributed.data_sharding(mesh))
    assert [s.data.shape for s in x.addressable_shards] == [(1, 2)] * 8
    r = jax.device_put(np.ones(3), distributed.replicated(mesh))
    assert all(s.data.shape == (3,) for s in r.addressable_shards)
    with pytest.raises(NegjaxError, match="devices"):
        distributed.make_mesh(jax.device_count() + 1)
    with pytest.raises(NegjaxError, match="axis_type"):
        distributed.make_mesh(2, axis_type="manual")


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_global_batch_and_jit_in_shardings(axis_type):
    """A global batch from local numpy arrays keeps the per-query grouping on each device, and
    a jit with in_shardings runs the sharded loss on both mesh axis types."""
    require_devices(4)
    mesh = distributed.make_mesh(4, axis_type=axis_type)
    G = 3
    local = {"q": np.arange(8 * 2, dtype=np.float32).reshape(8, 2),
             "d": np.repeat(np.arange(8, dtype=np.float32), G)[:, None] * np.ones((1, 2), np.float32),
             "doc_ids": np.arange(8 * G, dtype=np.int32)}
    with jax.set_mesh(mesh):
        batch = distributed.global_batch_from_local(local, mesh)
        for name, arr in local.items():
            np.testing.assert_array_equal(distributed.local_rows(batch[name]), arr)
        # device k holds queries 2k, 2k+1 and exactly their 2*G documents
        for qs, ds in zip(batch["q"].addressable_shards, batch["d"].addressable_shards):
            q_rows = np.asarray(qs.data)[:, 0] / 2
            np.testing.assert_array_equal(np.asarray(ds.data)[:, 0], np.repeat(q_rows, G))
        sh = distributed.data_sharding(mesh)
        f = jax.jit(lambda q, d, i: contrastive_loss(q, d, group_size=G, temperature=0.5, doc_ids=i),
                    in_shardings=(sh, sh, sh), out_shardings=distributed.replicated(mesh))
        got = f(batch["q"] / 10, batch["d"] / 10, batch["doc_ids"])
    want = contrastive_loss(local["q"] / 10, local["d"] / 10, group_size=G, temperature=0.5,
                            doc_ids=local["doc_ids"])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(NegjaxError, match="divide"):
        distributed.global_batch_from_local({"x": np.zeros((6, 2))}, mesh)
    assert distributed.local_batch_size(64, mesh) == 64
    with pytest.raises(NegjaxError, match="divisible"):
        distributed.local_batch_size(6, mesh)


def test_initialize_single_process_and_bad_settings(monkeypatch):
    for key in ("NEGJAX_COORDINATOR", "NEGJAX_NUM_PROCESSES", "NEGJAX_PROCESS_ID",
                "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize(DistributedConfig()) == (0, 1)
    assert distributed.initialize(None) == (0, 1)
    with pytest.raises(NegjaxError, match="coordinator"):
        distributed.initialize(DistributedConfig(num_processes=2))
    with pytest.raises(NegjaxError, match="process_id"):
        distributed.initialize(DistributedConfig(coordinator_address="localhost:1", num_processes=2))
    monkeypatch.setenv("NEGJAX_COORDINATOR", "localhost:1")
    monkeypatch.setenv("NEGJAX_NUM_PROCESSES", "two")
    with pytest.raises(NegjaxError, match="NEGJAX_NUM_PROCESSES"):
        distributed.initialize(None)
    assert not jax.distributed.is_initialized()


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from negjax import distributed

    data, out = sys.argv[1], sys.argv[2]
    pid, _ = distributed.initialize()  # the job: NEGJAX_COORDINATOR etc. (helpers.start_processes)
    import jax
    from negjax.losses import contrastive_loss
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    z = np.load(data)
    G, b = int(z["G"]), len(z["q"]) // 2
    local = {"q": z["q"][pid * b:(pid + 1) * b], "d": z["d"][pid * b * G:(pid + 1) * b * G],
             "pos": z["pos"][pid * b:(pid + 1) * b], "ids": z["ids"][pid * b * G:(pid + 1) * b * G]}
    # One collective reached through different Python stacks (as under a wrapper script)
    # still meets: the programs' locations hold no traceback (distributed.initialize).
    from jax.experimental import multihost_utils
    bcast = lambda: multihost_utils.broadcast_one_to_all(np.int32(7 + pid))
    assert int((lambda: bcast())() if pid else bcast()) == 7
    mesh = distributed.make_mesh()
    with jax.set_mesh(mesh):
        batch = distributed.global_batch_from_local(local, mesh)
        for chunk in (None, 5):
            f = lambda q, d, p, i: contrastive_loss(q, d, group_size=G, temperature=0.1,
                                                    query_pos_ids=p, doc_ids=i, symmetric=True,
                                                    chunk_size=chunk)
            loss, (gq, gd) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
                batch["q"], batch["d"], batch["pos"], batch["ids"])
            np.savez(f"{out}.{chunk}.npz", loss=np.asarray(loss), gq=distributed.local_rows(gq),
                     gd=distributed.local_rows(gd))
    print("ok", pid)
""")


def test_two_processes_match_single_process(tmp_path):
    """Two processes x 4 CPU devices (gloo collectives) compute the same loss and gradients
    as one process with 8 devices."""
    require_devices(8)
    G, nq, dim = 2, 16, 8
    rng = np.random.default_rng(42)
    q = rng.normal(size=(nq, dim)).astype(np.float32)
    d = rng.normal(size=(nq * G, dim)).astype(np.float32)
    ids = rng.integers(0, nq, size=nq * G).astype(np.int32)
    pos = np.stack([ids[::G], rng.choice(ids, nq), np.full(nq, -1)], 1).astype(np.int32)
    np.savez(tmp_path / "data.npz", q=q, d=d, ids=ids, pos=pos, G=G)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    wait_all(start_processes(lambda i: [script, tmp_path / "data.npz", tmp_path / f"out{i}"], 2,
                             devices=4), timeout=240)

    mesh = distributed.make_mesh(8)
    for chunk in (None, 5):
        def f(q, d, p, i):
            return contrastive_loss(q, d, group_size=G, temperature=0.1, query_pos_ids=p, doc_ids=i,
                                    symmetric=True, chunk_size=chunk)
        with jax.set_mesh(mesh):
            want, (wq, wd) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
                jnp.asarray(q), jnp.asarray(d), jnp.asarray(pos), jnp.asarray(ids))
        res = [np.load(tmp_path / f"out{i}.{chunk}.npz") for i in range(2)]
        for r in res:
            np.testing.assert_allclose(r["loss"], want, rtol=1e-6)
        np.testing.assert_allclose(np.concatenate([r["gq"] for r in res]), wq, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.concatenate([r["gd"] for r in res]), wd, rtol=1e-5, atol=1e-7)
