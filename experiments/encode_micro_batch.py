"""CPU cost of one MiniLM encoder call by micro-batch size: why `negjax.model.encode` runs
each device's rows in micro-batches of ~`MICRO_TOKENS` tokens.

    python experiments/encode_micro_batch.py --json experiments/bench/encode_micro_batch.json

For each length L and row count R, the jitted encoder (float32, one device, the machine's
threads) runs on R random rows of L tokens; reported: tokens/s and CPU seconds per 1,000
tokens (user + system of this process), after a warm-up call, over >= 3 calls and >= 16k
tokens, and the model's effective GFLOP/s (dense layers 2 x (4 H^2 + 2 H I) and attention
4 L H FLOPs per token and layer). Then the GEMM the dense layers spend most of that time in,
[512, 384] x [384, 1536] float32, by XLA (jit), NumPy (its BLAS) and PyTorch (MKL/oneDNN):
the ceiling of a float32 encoder on this CPU. Results: experiments/bench/README.md
("Encoding long documents").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--rows", default="1,2,4,8,32,128")
    ap.add_argument("--json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from negjax.config import ModelConfig
    from negjax.model import load_encoder

    enc = load_encoder(ModelConfig(name="minilm"))
    f = jax.jit(lambda p, t, m: enc.encode(p, t, m, tower="doc"))
    rng = np.random.default_rng(0)
    out = []
    for length in map(int, args.lengths.split(",")):
        for rows in map(int, args.rows.split(",")):
            t = jnp.asarray(rng.integers(1000, 20000, (rows, length)), jnp.int32)
            m = jnp.ones((rows, length), jnp.int32)
            f(enc.params, t, m).block_until_ready()
            calls = max(3, -(-16384 // (rows * length)))
            c0, t0 = os.times(), time.perf_counter()
            for _ in range(calls):
                f(enc.params, t, m).block_until_ready()
            wall, c1 = time.perf_counter() - t0, os.times()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            tokens = calls * rows * length
            c = enc.config
            flops = c.num_layers * (2 * (4 * c.hidden_size ** 2 + 2 * c.hidden_size *
                                         c.intermediate_size) + 4 * length * c.hidden_size)
            out.append({"length": length, "rows": rows, "tokens": rows * length,
                        "tokens_per_s": round(tokens / wall), "cpu_s_per_1k_tokens":
                        round(1000 * cpu / tokens, 4),
                        "gflop_per_s": round(flops * tokens / wall / 1e9, 1)})
            print(json.dumps(out[-1]), flush=True)
    gemm = gemm_rates()
    print(json.dumps(gemm), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "runs": out,
                                               "gemm_gflop_per_s": gemm}, indent=1) + "\n")


def gemm_rates(m: int = 512, k: int = 384, n: int = 1536, repeats: int = 200) -> dict:
    """GFLOP/s of one float32 [m, k] x [k, n] product: XLA, NumPy, PyTorch (median of 3)."""
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((k, n), dtype=np.float32)
    f = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    sides = {"xla": lambda: f(ja, jb).block_until_ready(), "numpy": lambda: a @ b,
             "torch": lambda: ta @ tb}
    rates = {name: [] for name in sides}
    for _ in range(3):
        for name, fn in sides.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            rates[name].append(2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return {name: round(statistics.median(v), 1) for name, v in rates.items()}


if __name__ == "__main__":
    main()
