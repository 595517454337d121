"""Tests run on the CPU with 8 simulated devices; the flags must be set before jax loads."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NEGJAX_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
