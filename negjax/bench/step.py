"""`negjax bench step`: training-step throughput, FLOPs, MFU, memory and a time breakdown.

    negjax bench step --model minilm --batch 64 --query-len 32 --doc-len 128 --negatives 1
    negjax bench step --model tiny --hidden-size 768 --num-layers 12 --num-heads 12 \\
        --intermediate-size 3072 --dtype bf16 --batch 512 --json      # BERT-base-sized
    negjax bench step --model tiny --hidden-size 1024 --num-layers 24 --num-heads 16 \\
        --intermediate-size 4096 --fsdp 8 --batch 8 --no-breakdown   # BERT-large, FSDP 8

Inputs are synthetic: random token ids (uniform over the vocabulary, [CLS]/[PAD] ignored),
full masks, exactly --query-len / --doc-len tokens, B queries and B*(1+H) documents with
distinct ids, so the step does the work of a real batch at the longest bucket. The step is
the real one (`negjax.train.step.make_train_step`: shard_map over a 'data' mesh, dropout,
AdamW, gradient clipping, GradCache with --grad-cache CHUNK = queries per device per
sub-batch); any other setting comes from --config / --set (e.g. --set loss.chunk_size=1024).

Timing: the step is compiled ahead (`compile_s`), run --warmup times, then --steps times,
each call followed by block_until_ready; step time is reported as median and p10/p90.
examples/s = B / median step time (an example is a query with its 1+H documents);
tokens/s counts every (padded) query and document token.

FLOPs and MFU: `negjax.bench.flops` (documented there: useful model FLOPs, 3x forward, the
loss matmuls included, GradCache's re-forward and remat not counted). MFU = model FLOPs per
step / median step time / (peak per device x devices). Peaks come from a table of known chips
(bf16 or the default-precision fp32 figure, by --dtype); a CPU has no entry: pass
--peak-tflops (per device; simulated CPU devices share the machine's cores).

Memory: parameters and optimizer state per device (their shards under --fsdp), XLA's
`memory_analysis()` of the compiled step per device (arguments, outputs, temporaries), the
devices' peak bytes in use where the backend reports it (GPU/TPU `memory_stats()`), and the
process's peak RSS (Linux) before timing (compilation included)
and during the timed steps (the high-water mark is reset after compilation and warm-up).

Breakdown (separately jitted pieces on the same shapes, run round-robin together with the
whole step for min(--steps, 5) rounds, medians; percentages are of the step's median in
those same rounds, so load from elsewhere affects all of them alike):
  encoder     encode queries + documents forward and backward on each device's local batch
              with a fixed cotangent (with GradCache: the activation-free pass plus the
              re-encode + backward of every sub-batch), parameter gradients summed
  loss        loss + gradients w.r.t. precomputed embeddings (includes its gather)
  gather      all_gather of the document embeddings over 'data' and its transpose
              (psum_scatter), the collectives the loss runs
  grads       the step without the optimizer (`step.loss_and_grads`)
  optimizer   step - grads (AdamW, clipping, the finite-check; derived, not measured alone)
"""

from __future__ import annotations

import json
import time

from negjax.bench.breakdown import breakdown, summary
from negjax.errors import NegjaxError
from negjax.utils import process_memory_bytes, reset_peak_rss

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def add_arguments(p) -> None:
    from negjax.cli import add_config_args

    p.add_argument("--model", default="minilm", help="'tiny', 'minilm' or a model directory")
    p.add_argument("--batch", type=int, default=64, help="global batch (queries)")
    p.add_argument("--query-len", type=int, default=32, help="query tokens")
    p.add_argument("--doc-len", type=int, default=128, help="document tokens")
    p.add_argument("--negatives", type=int, default=1, help="hard negatives per query (H)")
    p.add_argument("--grad-cache", type=int, default=0, metavar="CHUNK",
                   help="GradCache sub-batch, queries per device; 0 = plain step")
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="compute dtype")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--devices", type=int, default=0,
                   help="devices in the mesh; 0 = all. On CPU this many devices are simulated")
    p.add_argument("--fsdp", type=int, default=0,
                   help="FSDP group size: parameters and optimizer state sharded over this many "
                   "devices (mesh 'data' x 'fsdp'); 0 = distributed.fsdp of the config (1)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s per device for MFU (default: the table of known chips)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-piece timing")
    p.add_argument("--dropout", type=float, default=-1.0,
                   help="dropout rate; negative = the model's own (training default)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir for 'tiny' (sets its vocabulary); "
                   "default: the built-in WordNet tokenizer")
    p.add_argument("--hidden-size", type=int, default=0, help="'tiny' only: hidden size")
    p.add_argument("--num-layers", type=int, default=0, help="'tiny' only: layers")
    p.add_argument("--num-heads", type=int, default=0, help="'tiny' only: attention heads")
    p.add_argument("--intermediate-size", type=int, default=0, help="'tiny' only: feed-forward size")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", default="", help="also write the JSON results to this file")
    add_config_args(p)


def _config(args):
    """The loaded config with the flags' settings (a new, validated config)."""
    from negjax.config import load_config, updated

    for name in ("batch", "query_len", "doc_len", "steps"):
        if getattr(args, name) < 1:
            raise NegjaxError(f"--{name.replace('_', '-')} must be >= 1")
    if args.negatives < 0 or args.grad_cache < 0 or args.warmup < 0 or args.devices < 0:
        raise NegjaxError("--negatives, --grad-cache, --warmup and --devices must be >= 0")
    cfg = load_config(args.config, args.overrides)
    changes = {"model.name": args.model, "model.dtype": _DTYPES[args.dtype],
               "model.remat": cfg.model.remat or args.remat,
               "model.query_max_len": args.query_len, "model.doc_max_len": args.doc_len,
               "train.batch_size": args.batch, "train.grad_cache_chunk": args.grad_cache,
               "data.num_negatives": args.negatives}
    if args.dropout >= 0:
        changes["model.dropout"] = args.dropout
    if args.tokenizer:
        changes["model.tokenizer"] = args.tokenizer
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        value = getattr(args, name)
        if value:
            if args.model != "tiny":
                raise NegjaxError(f"--{name.replace('_', '-')} applies to --model tiny only")
            changes[f"model.{name}"] = value
    return updated(cfg, changes)


def _set_cpu_devices(n: int) -> None:
    """Ask for `n` CPU devices (simulated) before JAX starts its backends; later it is too
    late and `make_mesh` reports a shortage."""
    import jax

    if n:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            pass


def synthetic_batch(rng, *, batch: int, group_size: int, query_len: int, doc_len: int,
                    vocab_size: int) -> dict:
    """The pipeline's batch layout (numpy): random ids in [1, vocab), full masks, distinct
    document ids 0..B*G-1, each query's positive id in `query_pos_ids` [B, 1]."""
    import numpy as np

    low = 1000 if vocab_size > 2000 else 1  # skip the special/unused ids of BERT vocabularies
    n_docs = batch * group_size
    doc_ids = np.arange(n_docs, dtype=np.int32)
    return {
        "q_tokens": rng.integers(low, vocab_size, (batch, query_len)).astype(np.int32),
        "q_mask": np.ones((batch, query_len), np.int32),
        "d_tokens": rng.integers(low, vocab_size, (n_docs, doc_len)).astype(np.int32),
        "d_mask": np.ones((n_docs, doc_len), np.int32),
        "doc_ids": doc_ids,
        "query_pos_ids": doc_ids[::group_size, None].copy(),
    }


def _state_bytes_per_device(state) -> dict:
    """The largest per-device bytes of the parameters and of the optimizer state (their
    shards under FSDP)."""
    import jax

    out = {}
    for name, tree in (("params", state.params), ("opt_state", state.opt_state)):
        per: dict = {}
        for leaf in jax.tree.leaves(tree):
            for shard in leaf.addressable_shards:
                per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
        out[name] = max(per.values()) if per else 0
    return out


def _compiled_memory(compiled) -> dict | None:
    """XLA's memory analysis of the compiled step, per device (None where unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _device_peak(devices) -> int | None:
    peaks = []
    for dev in devices:
        try:
            stats = dev.memory_stats() or {}
        except Exception:  # noqa: BLE001 - backends without memory stats raise
            stats = {}
        if stats.get("peak_bytes_in_use"):
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

def measure(args) -> dict:
    """Run the benchmark described by the parsed `args`; returns the results dict."""
    cfg = _config(args)
    _set_cpu_devices(args.devices)
    import jax
    import numpy as np

    from negjax.bench.flops import Shape, peak_tflops, step_flops
    from negjax.distributed import batch_devices, global_batch_from_local, make_mesh
    from negjax.model.loader import load_model
    from negjax.train.state import init_state
    from negjax.train.sharding import place_state
    from negjax.train.step import make_train_step

    fsdp = args.fsdp or cfg.distributed.fsdp
    mesh = make_mesh(args.devices or None, fsdp=fsdp)
    n_dev = batch_devices(mesh)
    B, H = args.batch, args.negatives
    G = 1 + H
    if B % n_dev:
        raise NegjaxError(f"--batch {B} must be divisible by the {n_dev} devices")
    if args.grad_cache and (B // n_dev) % args.grad_cache:
        raise NegjaxError(f"--grad-cache {args.grad_cache} must divide the per-device batch {B // n_dev}")

    t0 = time.perf_counter()
    enc, params, _ = load_model(None, cfg.model)
    load_s = time.perf_counter() - t0
    bc = enc.config
    state = place_state(init_state(params, cfg, dim=enc.dim), mesh)
    local = synthetic_batch(np.random.default_rng(args.seed), batch=B, group_size=G,
                            query_len=args.query_len, doc_len=args.doc_len, vocab_size=bc.vocab_size)
    batch = global_batch_from_local(local, mesh)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state_bytes = _state_bytes_per_device(state)
    compiled_memory = _compiled_memory(compiled)
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    rss_before = process_memory_bytes("VmHWM")
    reset = reset_peak_rss()

    times = []
    metrics = None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    rss_steps = process_memory_bytes("VmHWM") if reset else None
    dev = mesh.devices.flat[0]
    device_peak = _device_peak(list(mesh.devices.flat))
    loss = float(jax.device_get(metrics["loss"]))

    extra_fwd = int(bool(args.grad_cache)) + int(bool(cfg.model.remat))
    flops = step_flops(Shape.of(bc), batch=B, query_len=args.query_len, doc_len=args.doc_len,
                       group_size=G, dim=enc.dim, symmetric=cfg.loss.symmetric,
                       extra_docs=cfg.loss.memory_bank_size,
                       momentum_encoder=bool(cfg.loss.memory_bank_size), extra_forwards=extra_fwd)
    t = summary(times)
    med = t["median_s"]
    tokens = B * args.query_len + B * G * args.doc_len
    peak = args.peak_tflops or peak_tflops(dev.device_kind, cfg.model.dtype)
    achieved = flops["model"] / med / 1e12
    res = {
        "model": args.model, "source": enc.source,
        "architecture": {"hidden_size": bc.hidden_size, "num_layers": bc.num_layers,
                         "num_heads": bc.num_heads, "intermediate_size": bc.intermediate_size,
                         "vocab_size": bc.vocab_size, "dropout": bc.hidden_dropout},
        "dtype": cfg.model.dtype, "remat": bool(cfg.model.remat),
        "batch": B, "query_len": args.query_len, "doc_len": args.doc_len, "negatives": H,
        "group_size": G, "grad_cache": args.grad_cache,
        "loss_chunk_size": cfg.loss.chunk_size, "symmetric": cfg.loss.symmetric,
        "platform": dev.platform, "device_kind": dev.device_kind, "devices": n_dev,
        "jax_version": jax.__version__,
        "load_s": load_s, "compile_s": compile_s, "warmup_steps": args.warmup,
        "steps": args.steps, "step_time": t,
        "examples_per_s": B / med, "tokens_per_s": tokens / med, "batches_per_s": 1.0 / med,
        "tokens_per_step": tokens,
        "flops_per_step": flops, "tflops_per_s": achieved,
        "hardware_tflops_per_s": flops["executed"] / med / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": achieved / (peak * n_dev) if peak else None,
        "mesh": dict(mesh.shape), "state_bytes_per_device": state_bytes,
        "compiled_memory_per_device": compiled_memory,
        "device_peak_bytes": device_peak,
        "peak_rss_bytes": max(x for x in (rss_before, rss_steps) if x is not None) if rss_before else None,
        "peak_rss_before_timing_bytes": rss_before, "peak_rss_steps_bytes": rss_steps,
        "final_loss": loss,
    }
    if not args.no_breakdown and fsdp > 1:
        res["breakdown_skipped"] = "the breakdown's pieces assume replicated parameters (fsdp = 1)"
    elif not args.no_breakdown:
        n = max(1, min(args.steps, 5))
        bd = breakdown(enc, cfg, mesh, G, {"state": state}, compiled, step_fn, batch, n)
        med_of = {name: v["median_s"] for name, v in bd.items()}
        res["breakdown"] = {
            "encoder_s": med_of["encoder"], "loss_s": med_of["loss"], "gather_s": med_of["gather"],
            "grads_s": med_of["grads"], "step_in_rounds_s": med_of["step"],
            "optimizer_s": med_of["step"] - med_of["grads"], "rounds": n, "pieces": bd}
    return res


def _si(x: float, unit: str) -> str:
    """1.23e12 -> '1.23 T<unit>' (also G, M, k)."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _gib(x) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _report(r: dict) -> str:
    a = r["architecture"]
    t = r["step_time"]
    fl = r["flops_per_step"]
    lines = [
        f"bench step: {r['model']} ({a['num_layers']} layer{'s' if a['num_layers'] != 1 else ''}, hidden {a['hidden_size']}, "
        f"{a['num_heads']} heads, ffn {a['intermediate_size']}), {r['dtype']}"
        f"{', remat' if r['remat'] else ''}, batch {r['batch']} x (query {r['query_len']} + "
        f"{r['group_size']} docs x {r['doc_len']} tokens)"
        + (f", GradCache chunk {r['grad_cache']}" if r["grad_cache"] else "")
        + f" on {r['devices']} x {r['device_kind']} ({r['platform']})",
        f"  compile {r['compile_s']:.1f} s, {r['warmup_steps']} warm-up steps, {r['steps']} timed",
        f"  step time   median {t['median_s'] * 1e3:.1f} ms  (p10 {t['p10_s'] * 1e3:.1f}, "
        f"p90 {t['p90_s'] * 1e3:.1f})",
        f"  throughput  {r['examples_per_s']:,.1f} examples/s, {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['batches_per_s']:.3f} batches/s",
        f"  FLOPs/step  {_si(fl['model'], 'FLOP')} model (encoder {_si(fl['encoder'], 'FLOP')}, "
        f"loss {_si(fl['loss'], 'FLOP')}); executed {_si(fl['executed'], 'FLOP')}",
        f"  achieved    {_si(r['tflops_per_s'] * 1e12, 'FLOP/s')} model "
        f"({_si(r['hardware_tflops_per_s'] * 1e12, 'FLOP/s')} executed); "
        + (f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g} TFLOP/s x {r['devices']}"
           if r["mfu"] is not None else
           f"MFU n/a (no known peak for '{r['device_kind']}': pass --peak-tflops)"),
        f"  memory      device peak {_gib(r['device_peak_bytes'])}; process peak RSS "
        f"{_gib(r['peak_rss_bytes'])} (during timed steps {_gib(r['peak_rss_steps_bytes'])})",
        f"  per device  params {_gib(r['state_bytes_per_device']['params'])} + optimizer state "
        f"{_gib(r['state_bytes_per_device']['opt_state'])} (mesh "
        + " x ".join(f"{k} {v}" for k, v in r["mesh"].items()) + ")"
        + ("" if not r["compiled_memory_per_device"] else
           "; compiled step: arguments {}, outputs {}, temporaries {}".format(
               *(_gib(r["compiled_memory_per_device"].get(k)) for k in
                 ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")))),
    ]
    if "breakdown_skipped" in r:
        lines.append(f"  breakdown   skipped: {r['breakdown_skipped']}")
    if "breakdown" in r:
        b = r["breakdown"]
        med = b["step_in_rounds_s"]
        def part(name, key):
            return f"{name} {b[key] * 1e3:.1f} ms ({100 * b[key] / med:.0f}%)"
        lines.append("  breakdown   " + ", ".join([
            part("encoder fwd+bwd", "encoder_s"), part("loss+grad", "loss_s"),
            part("gather", "gather_s")]))
        lines.append("              " + ", ".join([
            part("step w/o optimizer", "grads_s"), part("optimizer (step - that)", "optimizer_s")])
            + f"; % of the step's {med * 1e3:.1f} ms in the same {b['rounds']} rounds")
    lines.append(f"  final loss {r['final_loss']:.4f}")
    return "\n".join(lines)


def run(args) -> int:
    res = measure(args)
    text = json.dumps(res, indent=1)
    if args.out:
        from negjax.utils import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text if args.json else _report(res), flush=True)
    return 0

