"""`negjax bench loss`: time and peak memory of the contrastive loss + gradients w.r.t. the
embeddings, unchunked vs chunked, as the global batch grows.

    negjax bench loss --batches 4096,32768 --group-size 2 --dim 384 --chunk-size 1024

Each (batch, mode) runs in its own child process (so its peak RSS is its own) on
`--devices` simulated CPU devices (0 = the machine's real devices; then device memory is
reported where the backend exposes it). Embeddings are random unit vectors generated on the
devices, sharded over a 'data' mesh axis; every document has its own id and each query lists
its positive (so the id masking runs). Timed: one jitted value_and_grad, compiled ahead;
`step_s` is the fastest of `--repeats` runs. Unchunked runs whose [B, B*G] float32 logits
exceed `--max-matrix-gib` are skipped. Where both modes ran, the loss and the gradients are
compared (`max_rel_diff` = max |chunked - unchunked| / max |unchunked| over q and d grads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from negjax.errors import NegjaxError
from negjax.utils import process_memory_bytes


def add_arguments(p):
    p.add_argument("--batches", default="1024,4096", help="comma-separated global batch sizes (queries)")
    p.add_argument("--group-size", type=int, default=2, help="documents per query (1 + hard negatives)")
    p.add_argument("--dim", type=int, default=384, help="embedding size")
    p.add_argument("--chunk-size", type=int, default=1024, help="columns per block of the chunked loss")
    p.add_argument("--modes", default="unchunked,chunked", help="comma-separated: unchunked, chunked")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices per child; 0 = the real devices of this machine")
    p.add_argument("--symmetric", action="store_true", help="add the document->query direction")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (fastest kept)")
    p.add_argument("--max-matrix-gib", type=float, default=1.0,
                   help="skip unchunked runs whose B x B*G float32 logits exceed this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default="", help="also write the JSON results to this file")


def _parse(args):
    try:
        batches = [int(x) for x in str(args.batches).split(",") if x.strip()]
    except ValueError:
        raise NegjaxError(f"--batches {args.batches!r}: expected comma-separated integers") from None
    modes = [m.strip() for m in str(args.modes).split(",") if m.strip()]
    if not batches or any(b < 1 for b in batches):
        raise NegjaxError(f"--batches {args.batches!r}: need positive integers")
    if not modes or any(m not in ("unchunked", "chunked") for m in modes):
        raise NegjaxError(f"--modes {args.modes!r}: choose from unchunked, chunked")
    for name in ("group_size", "dim", "chunk_size", "repeats"):
        if getattr(args, name) < 1:
            raise NegjaxError(f"--{name.replace('_', '-')} must be >= 1")
    if args.devices < 0:
        raise NegjaxError("--devices must be >= 0")
    if args.devices:
        bad = [b for b in batches if b % args.devices]
        if bad:
            raise NegjaxError(f"--batches {bad}: must be divisible by --devices {args.devices}")
    return batches, modes


def _child_env(devices: int) -> dict:
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_child(spec: dict, devices: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "negjax.bench.loss", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(devices), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0]
    return {**spec, "error": f"exit {proc.returncode}: {why}"}


def _compare(a: dict, b: dict) -> dict:
    import numpy as np

    worst = 0.0
    for name in ("gq", "gd"):
        x, y = np.load(a["grads"][name]), np.load(b["grads"][name])
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    loss_rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-30)
    return {"loss_rel_diff": loss_rel, "max_rel_diff": worst, "match": bool(worst < 1e-4 and loss_rel < 1e-5)}


def run(args) -> int:
    batches, modes = _parse(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="negjax-bench-loss-") as tmp:
        for batch in batches:
            matrix_gib = batch * batch * args.group_size * 4 / 2 ** 30
            done = {}
            unchunked_runs = "unchunked" in modes and matrix_gib <= args.max_matrix_gib
            compare = unchunked_runs and "chunked" in modes
            for mode in modes:
                spec = dict(batch=batch, group_size=args.group_size, dim=args.dim, mode=mode,
                            chunk_size=args.chunk_size if mode == "chunked" else None,
                            symmetric=bool(args.symmetric), repeats=args.repeats,
                            save=str(Path(tmp) / f"{batch}-{mode}") if compare else "")
                if mode == "unchunked" and not unchunked_runs:
                    res = {**spec, "skipped": f"logits {matrix_gib:.1f} GiB > --max-matrix-gib {args.max_matrix_gib}"}
                else:
                    res = _run_child(spec, args.devices, args.timeout)
                res.pop("save", None)
                done[mode] = res
                if not args.json:
                    _print_row(res)
            if all(m in done and "loss" in done[m] for m in ("chunked", "unchunked")):
                cmp = _compare(done["chunked"], done["unchunked"])
                done["chunked"].update(cmp)
                if not args.json:
                    print(f"    batch {batch}: chunked vs unchunked loss rel diff {cmp['loss_rel_diff']:.2e}, "
                          f"grads max rel diff {cmp['max_rel_diff']:.2e} -> {'match' if cmp['match'] else 'MISMATCH'}")
            for res in done.values():
                res.pop("grads", None)
                results.append(res)
    text = json.dumps(results, indent=2)
    if args.out:
        from negjax.utils import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    if args.json:
        print(text)
    failed = [r for r in results if "error" in r or r.get("match") is False]
    return 1 if failed else 0


def _print_row(r: dict) -> None:
    head = f"batch {r['batch']:>7} x G {r['group_size']} x dim {r['dim']}  {r['mode']:<9}"
    if r.get("chunk_size"):
        head += f" (chunk {r['chunk_size']})"
    if "skipped" in r:
        print(f"{head}  skipped: {r['skipped']}")
    elif "error" in r:
        print(f"{head}  ERROR: {r['error']}")
    else:
        dev = f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB" if r.get("device_peak_bytes") else ""
        print(f"{head}  loss {r['loss']:.6f}  step {r['step_s']:.3f} s (compile {r['compile_s']:.1f} s)  "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{dev}", flush=True)


# ---------------------------------------------------------------------------------------
# Child process: one configuration
# ---------------------------------------------------------------------------------------

def _child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from negjax.distributed import data_sharding, make_mesh, replicated
    from negjax.losses import contrastive_loss

    B, G, dim = spec["batch"], spec["group_size"], spec["dim"]
    mesh = make_mesh()
    sh = data_sharding(mesh)

    def make(key):
        kq, kd = jax.random.split(key)
        q = jax.random.normal(kq, (B, dim), jnp.float32)
        d = jax.random.normal(kd, (B * G, dim), jnp.float32)
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
        d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
        ids = jnp.arange(B * G, dtype=jnp.int32)
        pos = jnp.stack([ids[::G], jnp.full((B,), -1, jnp.int32)], axis=1)
        return q, d, pos, ids

    def loss_fn(q, d, pos, ids):
        return contrastive_loss(q, d, group_size=G, temperature=0.05, query_pos_ids=pos, doc_ids=ids,
                                symmetric=spec["symmetric"], chunk_size=spec["chunk_size"])

    with jax.set_mesh(mesh):
        q, d, pos, ids = jax.jit(make, out_shardings=(sh, sh, sh, sh))(jax.random.key(0))
        jax.block_until_ready(q)
        rss_setup = process_memory_bytes("VmRSS")
        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), in_shardings=(sh, sh, sh, sh),
                       out_shardings=(replicated(mesh), (sh, sh)))
        t0 = time.perf_counter()
        compiled = step.lower(q, d, pos, ids).compile()
        compile_s = time.perf_counter() - t0
        times, outputs = [], None
        for _ in range(spec["repeats"]):
            outputs = None  # free the previous run's gradients first
            t0 = time.perf_counter()
            outputs = jax.block_until_ready(compiled(q, d, pos, ids))
            times.append(time.perf_counter() - t0)
        loss, (gq, gd) = outputs
    out = dict(spec, loss=float(loss), step_s=min(times), step_s_all=times, compile_s=compile_s,
               devices=jax.device_count(), platform=jax.devices()[0].platform,
               rss_after_setup_bytes=rss_setup, peak_rss_bytes=process_memory_bytes("VmHWM"))
    stats = [dev.memory_stats() or {} for dev in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use")]
    if peaks:
        out["device_peak_bytes"] = max(peaks)
    if spec["save"]:
        out["grads"] = {}
        for name, g in (("gq", gq), ("gd", gd)):
            path = f"{spec['save']}-{name}.npy"
            np.save(path, np.asarray(g))
            out["grads"][name] = path
    out.pop("save", None)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))), flush=True)
    else:
        print("usage: negjax bench loss [...] (this module's --child mode is internal)", file=sys.stderr)
        sys.exit(2)
