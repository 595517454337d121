"""Accelerator checks, run once on a GPU: bf16 attention numerics of both attention paths
(`model.attention = xla | cudnn`) against a float32 reference, and `negjax bench step`
throughput / MFU of all-MiniLM-L6-v2 in fp32 and bf16 (xla and cudnn attention).

    python experiments/bench/gpu_checks.py --model MINILM_DIR --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def attention_numerics() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from negjax.model.attention import attend

    out = []
    rng = np.random.default_rng(0)
    for n, length, heads, d, causal in ((64, 64, 12, 32, False), (16, 512, 12, 64, False),
                                        (16, 256, 16, 64, True)):
        q, k, v = (jnp.asarray(rng.standard_normal((n, length, heads, d)), jnp.float32) for _ in range(3))
        lens = rng.integers(1, length + 1, size=n)
        mask = jnp.asarray(np.arange(length)[None, :] < lens[:, None])
        real = np.asarray(mask)[:, :, None, None]

        def ref_fn(q, k, v):
            with jax.default_matmul_precision("highest"):
                return attend(q, k, v, mask, causal=causal, implementation="xla")

        ref = np.asarray(ref_fn(q, k, v)) * real
        g_ref = np.asarray(jax.grad(lambda q: jnp.sum(ref_fn(q, k, v) * mask[:, :, None, None]))(q))
        for impl in ("xla", "cudnn"):
            f = jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, mask, causal=causal, implementation=impl))
            b = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
            try:
                got = np.asarray(f(*b).astype(jnp.float32)) * real
                g = np.asarray(jax.grad(lambda q: jnp.sum(f(q, b[1], b[2]).astype(jnp.float32)
                                                          * mask[:, :, None, None]))(b[0]).astype(jnp.float32))
                f(*b).block_until_ready()
                t = time.perf_counter()
                for _ in range(20):
                    r = f(*b)
                r.block_until_ready()
                ms = (time.perf_counter() - t) / 20 * 1e3
                out.append(dict(shape=[n, length, heads, d], causal=causal, impl=impl,
                                rel_err=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                                grad_rel_err=float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)),
                                finite=bool(np.isfinite(got).all() and np.isfinite(g).all()),
                                forward_ms=round(ms, 4)))
            except Exception as e:  # noqa: BLE001  (report, keep going)
                out.append(dict(shape=[n, length, heads, d], causal=causal, impl=impl,
                                error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(json.dumps(out[-1]), flush=True)
    return out


def bench(model: str, batch: int) -> list[dict]:
    runs = []
    for dtype, attn in (("bf16", "xla"), ("bf16", "cudnn"), ("fp32", "xla")):
        cmd = [sys.executable, "-m", "negjax", "bench", "step", "--model", model, "--batch", str(batch),
               "--query-len", "32", "--doc-len", "64", "--negatives", "1", "--dtype", dtype,
               "--steps", "10", "--warmup", "3", "--no-breakdown", "--json",
               "--set", f"model.attention={attn}"]
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240)
        row = dict(dtype=dtype, attention=attn, batch=batch, rc=p.returncode, wall_s=round(time.time() - t, 1))
        if p.returncode == 0:
            row["result"] = json.loads(p.stdout[p.stdout.index("{"):])
        else:
            row["stderr"] = p.stderr[-1500:]
        print(json.dumps(row)[:1500], flush=True)
        runs.append(row)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=2048, help="global batch of the bench steps")
    a = ap.parse_args()
    import jax

    res = dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
               device_kind=jax.devices()[0].device_kind)
    print(json.dumps(res), flush=True)
    res["attention"] = attention_numerics()
    Path(a.json).write_text(json.dumps(res, indent=1))
    res["bench_step"] = bench(a.model, a.batch)
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
