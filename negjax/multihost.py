"""Sharing work between the processes of a multi-process job (host-side helpers).

    from negjax import multihost
    mine = multihost.process_chunks(n, chunk)        # [(c, lo, hi)] this process handles
    rows = multihost.allgather_rows(local, counts)   # every process's rows, in process order
    res = multihost.broadcast_floats(values)         # process 0's float64 values, bit-exact
    if multihost.host_leader(cache_dir): ...         # one process per (host, directory)

Each is a no-op (or a plain local computation) in a one-process run. The gathering ones are
collectives: every process must call them, in the same order. See `negjax.distributed` for
start-up, the mesh and barriers.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from pathlib import Path

import numpy as np

# Rows gathered per collective round are capped so that the gathered block (process_count x
# rows x row bytes, replicated on every local device) stays near this many bytes.
_GATHER_BYTES = 64 << 20


def process_chunks(n: int, chunk: int, process_index: int | None = None,
                   process_count: int | None = None) -> list[tuple[int, int, int]]:
    """The chunks (c, lo, hi) of `n` items cut into runs of `chunk` that this process handles:
    chunk c covers items [c*chunk, min(n, (c+1)*chunk)) and goes to process c % process_count.
    With chunk = ceil(n / process_count) every process gets one contiguous slice (or none)."""
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    chunk = max(1, int(chunk))
    n_chunks = max(1, math.ceil(n / chunk))
    return [(c, c * chunk, min(n, (c + 1) * chunk)) for c in range(pi, n_chunks, pc)]


def allgather_rows(local: np.ndarray, counts) -> np.ndarray:
    """Concatenate every process's rows (process 0's first): `local` is this process's
    [counts[pi], ...] array, `counts` every process's row count (known to all). Exact (an
    all-gather moves bits), done in blocks so device memory stays bounded whatever the total."""
    import jax

    counts = [int(c) for c in counts]
    pc, pi = jax.process_count(), jax.process_index()
    local = np.asarray(local)
    if local.shape[0] != counts[pi]:
        raise ValueError(f"process {pi} holds {local.shape[0]} rows, counts say {counts[pi]}")
    if pc == 1:
        return local
    from jax.experimental import multihost_utils

    width = max(1, math.prod(local.shape[1:]) * local.dtype.itemsize)
    block = max(1, _GATHER_BYTES // (pc * width))
    longest = max(counts)
    parts: list[list[np.ndarray]] = [[] for _ in range(pc)]
    for lo in range(0, max(longest, 1), block):
        buf = np.zeros((block, *local.shape[1:]), local.dtype)
        mine = local[lo:lo + block]
        buf[:len(mine)] = mine
        got = np.asarray(multihost_utils.process_allgather(buf))  # [pc, block, ...]
        for p in range(pc):
            parts[p].append(got[p, :max(0, min(block, counts[p] - lo))])
    return np.concatenate([x for p in parts for x in p], axis=0)


def broadcast_floats(values) -> np.ndarray:
    """Process 0's float64 `values` on every process, bit for bit (sent as int32 words, so
    neither float32 conversion nor the sum behind the broadcast can round them). Every process
    passes an array of the same length (its contents matter only on process 0)."""
    import jax

    arr = np.ascontiguousarray(values, dtype=np.float64)
    if jax.process_count() == 1:
        return arr
    from jax.experimental import multihost_utils

    words = multihost_utils.broadcast_one_to_all(arr.view(np.int32))
    return np.ascontiguousarray(np.asarray(words, np.int32)).view(np.float64)


def host_key(directory) -> np.ndarray:
    """[2] uint32: a hash of (host name, resolved `directory`): equal for the processes that
    see the same directory on the same machine."""
    where = f"{socket.gethostname()}\0{os.path.realpath(Path(directory).expanduser())}"
    digest = hashlib.blake2b(where.encode("utf-8"), digest_size=8).digest()
    return np.frombuffer(digest, np.uint32).copy()


def host_leader(directory) -> bool:
    """True for one process per (host, `directory`): the lowest process index among those
    with the same `host_key`. Collective (an all-gather of the keys); True in one process."""
    import jax

    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    key = host_key(directory)
    keys = np.asarray(multihost_utils.process_allgather(key)).reshape(jax.process_count(), -1)
    first = next(p for p in range(len(keys)) if np.array_equal(keys[p], key))
    return first == jax.process_index()
