"""Shared test helpers (import as `from helpers import ...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from negjax.multihost import local_env, start_local_job

REPO = Path(__file__).resolve().parents[1]


def require_devices(n: int) -> None:
    """Skip the calling test when fewer than `n` JAX devices exist."""
    import jax

    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")


def subprocess_env(devices: int = 8, **extra) -> dict:
    """Environment for a child Python process with `devices` simulated CPU devices
    (`negjax.multihost.local_env`)."""
    return local_env(devices, **extra)


def run_negjax(*args, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run the CLI in a child process (`python -m negjax ...`) and capture its output."""
    proc = subprocess.run([sys.executable, "-m", "negjax", *map(str, args)], capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"negjax {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def start_processes(argv_for, processes: int, *, devices: int = 1, **env_extra) -> list[subprocess.Popen]:
    """Start `processes` Python processes of one `jax.distributed` job on localhost
    (`negjax.multihost.start_local_job`, the launcher `negjax bench mine` uses too): process i
    runs `python argv_for(i)...` with NEGJAX_COORDINATOR / NEGJAX_NUM_PROCESSES /
    NEGJAX_PROCESS_ID set and `devices` simulated CPU devices; output (stdout + stderr) is
    captured as text. The one launcher of every multi-process test."""
    return start_local_job(argv_for, processes, devices=devices, cwd=REPO, **env_extra)


def start_negjax_processes(args_for, processes: int, *, devices: int = 1, prefix=None,
                           **env_extra) -> list[subprocess.Popen]:
    """`start_processes` for the CLI: `args_for(i)` gives process i's negjax arguments;
    `prefix(i)`, when given and not empty, replaces process i's `-m negjax` (e.g. a
    fault-injection script)."""
    cmd = lambda i: list(prefix(i) if prefix else []) or ["-m", "negjax"]  # noqa: E731
    return start_processes(lambda i: [*cmd(i), *args_for(i)], processes, devices=devices,
                           **env_extra)


def wait_all(procs, timeout: float = 600, *, check: bool = True) -> list[str]:
    """Each process's output, after all have exited (any still running after `timeout` s is
    killed); with `check`, an AssertionError with its output unless every one exited 0."""
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if check:
        for i, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"process {i} of {len(procs)} exited {p.returncode}:\n{out[-3000:]}"
    return outs


# ---------------------------------------------------------------------------------------------
# Meshes, batches and configs for in-process step and loss tests
# ---------------------------------------------------------------------------------------------

B, G, LQ, LD = 8, 2, 8, 12   # queries, documents per query, query / document tokens


def mesh_of(n):
    """A 1-D 'data' mesh over the first `n` devices (skips the test if there are fewer)."""
    import jax

    require_devices(n)
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def put_rows(mesh, *arrays):
    """Arrays split on their first axis over 'data' (plain device arrays without a mesh)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    sh = NamedSharding(mesh, P("data"))
    return tuple(jax.device_put(a, sh) for a in arrays)


def put_batch(batch, mesh):
    """A step's batch dict placed as the train step expects (`batch_shardings`)."""
    import jax

    from negjax.train.sharding import batch_shardings

    sh = batch_shardings(mesh)
    return {k: jax.device_put(v, sh[k]) for k, v in batch.items()}


def make_cfg(**kw):
    """The default Config with `section__key=value` overrides."""
    from negjax.config import Config, updated

    return updated(Config(), {key.replace("__", "."): value for key, value in kw.items()})


def make_token_batch(seed=0, b=B, g=G):
    """A step's batch of random tokens: `b` queries, `b*g` documents, a duplicate of query 0's
    positive among the documents and a second positive for query 1."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def toks(n, length):
        t = rng.integers(1000, 2000, (n, length)).astype(np.int32)
        lens = rng.integers(3, length + 1, n)
        m = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
        return t * m, m
    qt, qm = toks(b, LQ)
    dt, dm = toks(b * g, LD)
    doc_ids = np.arange(b * g, dtype=np.int32) + 100
    doc_ids[3 * g] = doc_ids[0]                # a duplicate of query 0's positive
    dt[3 * g], dm[3 * g] = dt[0], dm[0]
    pos = np.full((b, 2), -1, np.int32)
    pos[:, 0] = doc_ids[::g]
    pos[1, 1] = doc_ids[2 * g]                 # query 1 has a second positive
    return dict(q_tokens=qt, q_mask=qm, d_tokens=dt, d_mask=dm, doc_ids=doc_ids, query_pos_ids=pos)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-9):
    """Elementwise rtol, with an absolute floor of rtol x the tensor's largest entry (and at
    least `atol`): float32 sums over devices in a different order differ by rounding at that
    level."""
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=max(rtol * float(np.abs(y).max()), atol))


# ---------------------------------------------------------------------------------------------
# `negjax train` through the CLI on a small data slice (the `small_data` fixture)
# ---------------------------------------------------------------------------------------------

TINY_MODEL = """
[model]
name = "tiny"
hidden_size = 32
num_layers = 1
num_heads = 2
intermediate_size = 64
query_max_len = 16
doc_max_len = 32
dropout = 0.1
"""

TRAIN_CONFIG = TINY_MODEL + """
[data]
dataset = "{data}"
cache_dir = "{cache}"
prefetch = 2

[train]
steps = {steps}
batch_size = 16
learning_rate = 1e-3
warmup_steps = 2
log_every = 1

[checkpoint]
every_steps = 3
keep = 2

[eval]
max_queries = 40
encode_batch_size = 64
"""


def write_config(tmp_path, data, steps=12, name="c.toml"):
    """A tiny-model training config (`TRAIN_CONFIG`) for the data directory `data`."""
    path = tmp_path / name
    path.write_text(TRAIN_CONFIG.format(data=data, cache=tmp_path / "tokcache", steps=steps))
    return path


def train_cmd(cfg, workdir):
    return [sys.executable, "-m", "negjax", "train", "--config", str(cfg), "--workdir", str(workdir)]
