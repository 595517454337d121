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
