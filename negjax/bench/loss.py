"""`negjax bench loss`: time and peak memory of the contrastive loss + gradients w.r.t. the
embeddings, unchunked vs chunked, gather vs ring, as the global batch grows.

    negjax bench loss --batches 4096,32768 --group-size 2 --dim 384 --chunk-size 1024
    negjax bench loss --batches 1048576 --dim 768 --modes chunked --chunk-size 4096 \
        --collective gather,ring --compile-only        # per-device memory, nothing run

With `--compile-only` nothing is allocated or run: the inputs are abstract (shapes and
shardings) and each configuration reports the compiled executable's `memory_analysis()` per
device (temporaries, arguments, outputs), so memory at a million queries is measurable on a
CPU. Otherwise:

Each (batch, mode) runs in its own child process (its peak RSS, reset after the inputs are
made, is that of compiling and running the loss alone) on
`--devices` simulated CPU devices (0 = the machine's real devices; then device memory is
reported where the backend exposes it). Embeddings are random unit vectors generated on the
devices, sharded over a 'data' mesh axis; every document has its own id and each query lists
its positive (so the id masking runs). Timed: one jitted value_and_grad, compiled ahead;
`step_s` is the fastest of `--repeats` runs. Unchunked runs whose [B, B*G] float32 logits
exceed `--max-matrix-gib` are skipped. Where both modes ran, the loss and the gradients are
compared with the batch's first run (`max_rel_diff` = max |this - first| / max |first| over
q and d grads): chunked vs unchunked, ring vs gather.
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
from negjax.utils import process_memory_bytes, reset_peak_rss


def add_arguments(p):
    p.add_argument("--batches", default="1024,4096", help="comma-separated global batch sizes (queries)")
    p.add_argument("--group-size", type=int, default=2, help="documents per query (1 + hard negatives)")
    p.add_argument("--dim", type=int, default=384, help="embedding size")
    p.add_argument("--chunk-size", type=int, default=1024, help="columns per block of the chunked loss")
    p.add_argument("--modes", default="unchunked,chunked", help="comma-separated: unchunked, chunked")
    p.add_argument("--collective", default="gather",
                   help="comma-separated: gather (all-gather the documents), ring (ppermute)")
    p.add_argument("--compile-only", action="store_true",
                   help="report the compiled executable's per-device memory; run nothing")
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
    collectives = [c.strip() for c in str(args.collective).split(",") if c.strip()]
    if not collectives or any(c not in ("gather", "ring") for c in collectives):
        raise NegjaxError(f"--collective {args.collective!r}: choose from gather, ring")
    for name in ("group_size", "dim", "chunk_size", "repeats"):
        if getattr(args, name) < 1:
            raise NegjaxError(f"--{name.replace('_', '-')} must be >= 1")
    if args.devices < 0:
        raise NegjaxError("--devices must be >= 0")
    if args.devices:
        bad = [b for b in batches if b % args.devices]
        if bad:
            raise NegjaxError(f"--batches {bad}: must be divisible by --devices {args.devices}")
    return batches, modes, collectives


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
    batches, modes, collectives = _parse(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="negjax-bench-loss-") as tmp:
        for batch in batches:
            matrix_gib = batch * batch * args.group_size * 4 / 2 ** 30
            unchunked_runs = "unchunked" in modes and (matrix_gib <= args.max_matrix_gib
                                                       or args.compile_only)
            compare = not args.compile_only and len(modes) * len(collectives) > 1
            first = None
            for collective in collectives:
                for mode in modes:
                    spec = dict(batch=batch, group_size=args.group_size, dim=args.dim, mode=mode,
                                collective=collective,
                                chunk_size=args.chunk_size if mode == "chunked" else None,
                                symmetric=bool(args.symmetric), repeats=args.repeats,
                                compile_only=bool(args.compile_only),
                                save=str(Path(tmp) / f"{batch}-{mode}-{collective}") if compare else "")
                    if mode == "unchunked" and not unchunked_runs:
                        res = {**spec, "skipped": f"logits {matrix_gib:.1f} GiB > --max-matrix-gib {args.max_matrix_gib}"}
                    else:
                        res = _run_child(spec, args.devices, args.timeout)
                    res.pop("save", None)
                    if "loss" in res and compare:
                        if first is None:
                            first = res
                        else:
                            res.update(_compare(res, first))
                    if not args.json:
                        _print_row(res, first)
                    results.append(res)
    for res in results:
        res.pop("grads", None)
    text = json.dumps(results, indent=2)
    if args.out:
        from negjax.utils import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    if args.json:
        print(text)
    failed = [r for r in results if "error" in r or r.get("match") is False]
    return 1 if failed else 0


def _print_row(r: dict, first: dict | None) -> None:
    head = f"batch {r['batch']:>7} x G {r['group_size']} x dim {r['dim']}  {r['collective']:<6} {r['mode']:<9}"
    if r.get("chunk_size"):
        head += f" (chunk {r['chunk_size']})"
    if "skipped" in r:
        print(f"{head}  skipped: {r['skipped']}")
    elif "error" in r:
        print(f"{head}  ERROR: {r['error']}")
    elif r.get("compile_only"):
        m = r["memory"]
        print(f"{head}  per device: temporaries {m['temp_bytes'] / 2**30:.3f} GiB, arguments "
              f"{m['argument_bytes'] / 2**30:.3f} GiB, outputs {m['output_bytes'] / 2**30:.3f} GiB "
              f"(compile {r['compile_s']:.1f} s)", flush=True)
    else:
        dev = f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB" if r.get("device_peak_bytes") else ""
        print(f"{head}  loss {r['loss']:.6f}  step {r['step_s']:.3f} s (compile {r['compile_s']:.1f} s)  "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB (inputs made: "
              f"{r['rss_after_setup_bytes'] / 2**30:.2f} GiB){dev}", flush=True)
        if "match" in r:
            print(f"    vs {first['collective']} {first['mode']}: loss rel diff "
                  f"{r['loss_rel_diff']:.2e}, grads max rel diff {r['max_rel_diff']:.2e} -> "
                  f"{'match' if r['match'] else 'MISMATCH'}", flush=True)


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
                                symmetric=spec["symmetric"], chunk_size=spec["chunk_size"],
                                collective=spec.get("collective", "gather"))

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), in_shardings=(sh, sh, sh, sh),
                       out_shardings=(replicated(mesh), (sh, sh)))
        if spec.get("compile_only"):
            abstract = jax.eval_shape(make, jax.random.key(0))
            abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in abstract]
            t0 = time.perf_counter()
            compiled = step.lower(*abstract).compile()
            ma = compiled.memory_analysis()
            memory = {name: int(getattr(ma, f"{name}_size_in_bytes")) for name in
                      ("temp", "argument", "output", "generated_code")}
            return dict(spec, compile_s=time.perf_counter() - t0, devices=jax.device_count(),
                        platform=jax.devices()[0].platform,
                        memory={f"{k}_bytes": v for k, v in memory.items()})
        q, d, pos, ids = jax.jit(make, out_shardings=(sh, sh, sh, sh))(jax.random.key(0))
        jax.block_until_ready(q)
        rss_setup = process_memory_bytes("VmRSS")
        peak_setup = process_memory_bytes("VmHWM")
        # Generating the inputs can peak above the loss itself: measure the loss alone.
        reset = reset_peak_rss()
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
               rss_after_setup_bytes=rss_setup, peak_rss_setup_bytes=peak_setup,
               peak_rss_bytes=process_memory_bytes("VmHWM") if reset else None)
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
