"""Sharing work between the processes of a multi-process job (host-side helpers).

    from negjax import multihost
    mine = multihost.process_chunks(n, chunk)        # [(c, lo, hi)] this process handles
    rows = multihost.allgather_rows(local, counts)   # every process's rows, in process order
    res = multihost.broadcast_floats(values)         # process 0's float64 values, bit-exact
    if multihost.host_leader(cache_dir): ...         # one process per (host, directory)
    procs = multihost.start_local_job(argv_for, 2)  # a job of local processes (benchmarks, tests)

Each is a no-op (or a plain local computation) in a one-process run. The gathering ones are
collectives: every process must call them, in the same order. See `negjax.distributed` for
start-up, the mesh and barriers.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------
# Lost processes
# ---------------------------------------------------------------------------------------------

_DONE = "done"


def _peer_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get("NEGJAX_PEER_TIMEOUT", "20")))
    except ValueError:
        return 20.0


class Watchdog:
    """Makes a lost process end the job for everyone within a bounded time, with a message
    naming it, instead of leaving the others in a barrier until JAX's own heartbeat timeout
    (100 s by default, and a message that does not say which process).

        with multihost.Watchdog("train") as dog:
            dog.where = f"step {step}"   # optional: named in the message
            ...   # collective work

    A background thread publishes a counter under the job's key-value store (the
    `jax.distributed` coordination service) every `interval` seconds and reads every other
    process's counter; one that has not moved for `timeout` seconds (NEGJAX_PEER_TIMEOUT,
    default 20; clocks of other hosts are never compared) is reported and this process exits
    with status 2 at once (`os._exit`: a normal exit would wait for the lost process in JAX's
    shutdown barrier). Work already saved (atomic files) stays for the rerun. When process 0
    (which hosts the coordination service) dies, JAX itself terminates the others at once with
    "the leader task was preempted/died". The threads release the GIL-free native calls they
    wait on (ScaNN builds, XLA, numpy), so a busy process still beats. A no-op in one process.

    Watchdogs nest (training re-mines inside its own): the message names every active one,
    outermost first, with its `where` ("'train' at step 25 > 'mine'"). A process that leaves
    its watchdog normally says so ("done"), so a peer still finishing (a final save) never
    takes it for lost.
    """

    _active: list["Watchdog"] = []

    def __init__(self, name: str, *, interval: float = 1.0, timeout: float | None = None):
        import threading

        self.name, self.interval = name, float(interval)
        self.where = ""
        self.timeout = _peer_timeout() if timeout is None else float(timeout)
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "Watchdog":
        import threading

        import jax

        Watchdog._active.append(self)
        if jax.process_count() > 1:
            from jax._src import distributed

            self._client = distributed.global_state.client
            self._pi, self._pc = jax.process_index(), jax.process_count()
            # Unique per entry, equal in every process (they enter in the same order).
            entry = self._client.key_value_increment(
                f"negjax/watchdog/{self.name}/{self._pi}/entries", 1)
            self._key = f"negjax/watchdog/{self.name}/{entry}"
            self._thread = threading.Thread(target=self._run, name=f"negjax-watchdog-{self.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is not None and exc_type is not None:
            from negjax.errors import NegjaxError

            if not issubclass(exc_type, (NegjaxError, KeyboardInterrupt)):
                # A collective failing (e.g. gloo's "connection reset by peer") usually means a
                # process died: give the monitor time to see whose heartbeat stopped, so the
                # user reads which process was lost (it exits the process) rather than a
                # transport error and a hang in JAX's shutdown barrier.
                self._stop.wait(self.timeout + 3 * self.interval)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if exc_type is None:
                try:
                    self._client.key_value_set(f"{self._key}/{self._pi}", _DONE, allow_overwrite=True)
                except Exception:
                    pass
        if self in Watchdog._active:
            Watchdog._active.remove(self)

    def _lost(self, who: int, why: str) -> None:
        import sys

        during = " > ".join(f"'{w.name}'" + (f" at {w.where}" if w.where else "")
                            for w in Watchdog._active) or f"'{self.name}'"
        print(f"negjax: error: process {who} of {self._pc} was lost during {during} ({why}); "
              f"process {self._pi} stops too. Work already saved is kept: rerun every process "
              "with the same command to resume.", file=sys.stderr, flush=True)
        os._exit(2)

    def _run(self) -> None:
        import time

        beat = 0
        last_value: dict[int, str | None] = {p: None for p in range(self._pc) if p != self._pi}
        last_change = {p: time.monotonic() for p in last_value}
        while not self._stop.is_set():
            beat += 1
            try:
                self._client.key_value_set(f"{self._key}/{self._pi}", str(beat), allow_overwrite=True)
            except Exception as e:  # the coordination service (process 0) is gone
                if self._stop.is_set():
                    return
                self._lost(0, f"coordination service unreachable: {str(e).splitlines()[0][:120]}")
            now = time.monotonic()
            for p in last_value:
                try:
                    value = self._client.key_value_try_get(f"{self._key}/{p}")
                except Exception:
                    value = None  # not published yet
                if value == _DONE:
                    continue  # left its watchdog normally: finishing, not lost
                if value != last_value[p]:
                    last_value[p], last_change[p] = value, now
                elif now - last_change[p] > self.timeout and not self._stop.is_set():
                    self._lost(p, f"no heartbeat for {now - last_change[p]:.0f} s")
            self._stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------
# A job of local processes (benchmarks, tests, experiments)
# ---------------------------------------------------------------------------------------------

_JOB_VARS = ("NEGJAX_COORDINATOR", "NEGJAX_NUM_PROCESSES", "NEGJAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")


def free_port() -> int:
    """A TCP port free on localhost now (for the coordinator of a local job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(devices: int = 1, **extra) -> dict:
    """The environment of a local CPU process: `devices` simulated CPU devices, no progress
    output, this negjax importable, no job variables inherited from the caller; `extra`
    (values turned into strings) on top."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["NEGJAX_PROGRESS"] = "0"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in _JOB_VARS:
        env.pop(var, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_local_job(argv_for, processes: int, *, devices: int = 1, cwd=None, **extra) -> list:
    """Start `processes` Python processes of one `jax.distributed` job on localhost: process i
    runs `python *argv_for(i)` with NEGJAX_COORDINATOR / NEGJAX_NUM_PROCESSES /
    NEGJAX_PROCESS_ID set (read by `negjax.distributed.initialize()` and every CLI command; one
    process gets none of them) and `local_env(devices, **extra)`. Returns the `Popen`s, stdin
    closed, stdout and stderr together in a text pipe."""
    port = free_port()
    job = lambda i: ({} if processes == 1 else dict(  # noqa: E731
        NEGJAX_COORDINATOR=f"localhost:{port}", NEGJAX_NUM_PROCESSES=processes, NEGJAX_PROCESS_ID=i))
    return [subprocess.Popen([sys.executable, *map(str, argv_for(i))],
                             env=local_env(devices, **job(i), **extra), cwd=cwd,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace")
            for i in range(processes)]
