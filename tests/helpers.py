"""Shared test helpers (import as `from helpers import ...`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def require_devices(n: int) -> None:
    """Skip the calling test when fewer than `n` JAX devices exist."""
    import jax

    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(devices: int = 8, **extra) -> dict:
    """Environment for a child Python process with `devices` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["NEGJAX_PROGRESS"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_negjax(*args, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run the CLI in a child process (`python -m negjax ...`) and capture its output."""
    proc = subprocess.run([sys.executable, "-m", "negjax", *map(str, args)], capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"negjax {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def start_negjax_processes(args_for, processes: int, *, devices: int = 1, prefix=None,
                           **env_extra) -> list[subprocess.Popen]:
    """Start `processes` CLI processes of one `jax.distributed` job on localhost (the job is
    given by NEGJAX_COORDINATOR / NEGJAX_NUM_PROCESSES / NEGJAX_PROCESS_ID, which every
    command reads): `args_for(i)` gives process i's negjax arguments; `prefix(i)`, when given
    and not empty, replaces process i's `-m negjax` (e.g. a fault-injection script). Output
    (stdout + stderr) is captured as text."""
    port = free_port()
    cmd = lambda i: list(prefix(i) if prefix else []) or ["-m", "negjax"]  # noqa: E731
    return [subprocess.Popen([sys.executable, *cmd(i), *map(str, args_for(i))],
                             env=subprocess_env(devices=devices, NEGJAX_COORDINATOR=f"localhost:{port}",
                                                NEGJAX_NUM_PROCESSES=processes,
                                                NEGJAX_PROCESS_ID=i, **env_extra),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(processes)]


def wait_all(procs, timeout: float = 600) -> list[str]:
    """Each process's output, after all have exited (any still running after `timeout` s is
    killed)."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
