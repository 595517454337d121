"""negjax's train step vs sentence-transformers' (PyTorch, CPU), side by side, alternating.

    /work/venv/bin/python experiments/peer/step_vs_sentence_transformers.py            # defaults
    ... --modes plain,cached --grad-cache 16 --rounds 5 --steps 5 --json results.json

The peer needs PyTorch and sentence-transformers, which are never negjax dependencies:

    pip install torch==2.13.0 sentence-transformers        # (tested: 2.13.0+cpu, 6.2.0)

Same model on both sides: all-MiniLM-L6-v2 (negjax `--model minilm`; the peer loads the same
unzipped directory, `negjax.model.packaged.minilm_dir()`), fp32, dropout 0.1 (train mode),
AdamW (lr 5e-5, weight decay 0.01 on matrices, eps 1e-6), gradient clipping at norm 1,
temperature 0.05 = the peer's scale 20. Identical pre-tokenised inputs on both sides (the same
random token ids, full masks, query 32 / document 128 tokens), so tokenisation is excluded:
negjax gets the pipeline's layout (documents grouped per query: positive, then H negatives),
the peer gets the columns (anchor, positive, negative_1..H) that its trainer's collator makes.

The peer's step is what `SentenceTransformerTrainer` does per batch: `loss(features, None)`
(the model's forward on the tokenised features happens inside the loss), `backward()`,
`clip_grad_norm_(1.0)`, `optimizer.step()` (HF's default for torch >= 2.8: fused AdamW),
`zero_grad()`. Modes:
  plain   negjax's plain step          vs MultipleNegativesRankingLoss
  cached  negjax's GradCache step      vs CachedMultipleNegativesRankingLoss
          (chunk = --grad-cache queries)  (mini_batch_size = the same number)

Each side runs in its own worker process (no shared thread pools or allocators), compiled /
warmed up first; then the parent alternates rounds of --steps timed steps, swapping which
side goes first every round, and reports per-side medians of the per-step times (wall
clock; process CPU time alongside, which is less sensitive to other load on the machine).
Threads: torch.set_num_threads(--threads) (default: the machine's cores); JAX uses its
default (all cores), one CPU device (no simulated device count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def batch_arrays(batch: int, negatives: int, query_len: int, doc_len: int, seed: int = 0):
    """The shared synthetic batch: numpy int32 token ids (full masks implied)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    g = 1 + negatives
    return (rng.integers(1000, 30522, (batch, query_len)).astype(np.int32),
            rng.integers(1000, 30522, (batch * g, doc_len)).astype(np.int32))


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------

def negjax_worker(args):
    """Set up negjax's step; returns (run_one_step, info)."""
    import jax
    import numpy as np

    from negjax.config import Config, updated
    from negjax.distributed import global_batch_from_local, make_mesh
    from negjax.model import load_encoder
    from negjax.train.state import init_state
    from negjax.train.sharding import place_state
    from negjax.train.step import make_train_step

    cfg = updated(Config(), {
        "model.name": "minilm", "train.learning_rate": 5e-5, "train.warmup_steps": 0,
        "train.weight_decay": 0.01, "train.max_grad_norm": 1.0, "loss.temperature": 0.05,
        "train.grad_cache_chunk": args.grad_cache if args.mode == "cached" else 0})
    enc = load_encoder(cfg.model)
    g = 1 + args.negatives
    q, d = batch_arrays(args.batch, args.negatives, args.query_len, args.doc_len)
    ids = np.arange(args.batch * g, dtype=np.int32)
    local = {"q_tokens": q, "q_mask": np.ones_like(q), "d_tokens": d, "d_mask": np.ones_like(d),
             "doc_ids": ids, "query_pos_ids": ids[::g, None].copy()}
    mesh = make_mesh(1)
    batch = global_batch_from_local(local, mesh)
    holder = {"state": place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)}
    t0 = time.perf_counter()
    compiled = make_train_step(enc, cfg, mesh, group_size=g).lower(holder["state"], batch).compile()
    compile_s = time.perf_counter() - t0

    def one():
        holder["state"], m = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])

    info = {"side": "negjax", "jax": jax.__version__, "compile_s": compile_s,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform}
    return one, info


def peer_worker(args):
    """Set up sentence-transformers' training step; returns (run_one_step, info)."""
    try:
        import sentence_transformers
        import torch
    except ImportError as e:
        raise SystemExit(f"the peer needs PyTorch and sentence-transformers ({e}): "
                         f"pip install torch==2.13.0 sentence-transformers")
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import losses

    from negjax.model.packaged import minilm_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.train()
    if args.mode == "cached":
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0,
                                                            mini_batch_size=args.grad_cache)
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=5e-5, eps=1e-6, fused=True)
        fused = True
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=5e-5, eps=1e-6)
        fused = False

    g = 1 + args.negatives
    q, d = batch_arrays(args.batch, args.negatives, args.query_len, args.doc_len)

    def feats(x):
        ids = torch.from_numpy(x.astype("int64"))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids)}
    # Columns as the trainer's collator makes them: anchor, positive, negative_1..H.
    columns = [feats(q)] + [feats(d[k::g]) for k in range(g)]

    def one():
        loss = loss_fn([dict(c) for c in columns], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    attn = getattr(model[0].auto_model.config, "_attn_implementation", None)
    info = {"side": "peer", "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "threads": torch.get_num_threads(), "fused_adamw": fused, "attention": attn,
            "loss": type(loss_fn).__name__}
    return one, info


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main(args) -> None:
    """Line protocol on stdin/stdout: after set-up and warm-up print one JSON line; then each
    'run N' runs N timed steps and prints their times; 'quit' exits."""
    one, info = (negjax_worker if args.worker == "negjax" else peer_worker)(args)
    t0 = time.perf_counter()
    losses = [one() for _ in range(args.warmup)]
    info.update(warmup_s=time.perf_counter() - t0, warmup_losses=losses)
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        wall, cpu, losses = [], [], []
        for _ in range(int(cmd[1])):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(one())
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(json.dumps({"wall": wall, "cpu": cpu, "losses": losses, "peak_rss": _peak_rss()}),
              flush=True)


# ---------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------

class Worker:
    def __init__(self, side: str, mode: str, args):
        cmd = [sys.executable, __file__, "--worker", side, "--mode", mode]
        for name in ("batch", "query_len", "doc_len", "negatives", "grad_cache", "warmup", "threads"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # one CPU device
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.side} worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, n: int) -> dict:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def compare(mode: str, args) -> dict:
    import numpy as np

    # Set up one side at a time (compilation and model loading would disturb the other).
    workers = {"negjax": Worker("negjax", mode, args)}
    workers["peer"] = Worker("peer", mode, args)
    times = {s: {"wall": [], "cpu": [], "losses": []} for s in workers}
    peak = {}
    try:
        for r in range(args.rounds):
            order = ("negjax", "peer") if r % 2 == 0 else ("peer", "negjax")
            for side in order:
                out = workers[side].run(args.steps)
                for k in ("wall", "cpu", "losses"):
                    times[side][k] += out[k]
                peak[side] = out["peak_rss"]
            med = {s: np.median(times[s]["wall"][-args.steps:]) for s in workers}
            print(f"  [{mode}] round {r + 1}/{args.rounds}: negjax {med['negjax']:.2f} s/step, "
                  f"peer {med['peer']:.2f} s/step", flush=True)
    finally:
        for w in workers.values():
            w.close()
    res = {"mode": mode}
    for s in workers:
        wall, cpu = np.asarray(times[s]["wall"]), np.asarray(times[s]["cpu"])
        res[s] = {"info": workers[s].info, "step_s_median": float(np.median(wall)),
                  "step_s_p10": float(np.percentile(wall, 10)),
                  "step_s_p90": float(np.percentile(wall, 90)),
                  "cpu_s_median": float(np.median(cpu)),
                  "examples_per_s": args.batch / float(np.median(wall)),
                  "peak_rss_gib": peak[s] / 2**30,
                  "first_loss": times[s]["losses"][0], "last_loss": times[s]["losses"][-1],
                  "wall_s": [round(x, 4) for x in wall], "cpu_s": [round(x, 4) for x in cpu]}
    res["ratio_examples_per_s"] = res["negjax"]["examples_per_s"] / res["peer"]["examples_per_s"]
    res["ratio_cpu_time"] = res["peer"]["cpu_s_median"] / res["negjax"]["cpu_s_median"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="plain,cached", help="comma-separated: plain, cached")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=128)
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--grad-cache", type=int, default=16,
                   help="negjax's GradCache chunk = the peer's mini_batch_size")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after set-up")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--worker", choices=("negjax", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0

    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("plain", "cached"):
            p.error(f"unknown mode {mode!r}")
        print(f"{mode}: batch {args.batch}, query {args.query_len} / doc {args.doc_len} tokens, "
              f"H={args.negatives}" + (f", chunk {args.grad_cache}" if mode == "cached" else "")
              + f"; {args.rounds} rounds x {args.steps} steps per side", flush=True)
        res = compare(mode, args)
        results.append(res)
        for s in ("negjax", "peer"):
            r = res[s]
            print(f"  {s:<7} {r['examples_per_s']:6.2f} examples/s  (median {r['step_s_median']:.2f} s/step, "
                  f"p10 {r['step_s_p10']:.2f}, p90 {r['step_s_p90']:.2f}; CPU {r['cpu_s_median']:.2f} s/step; "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f})")
        print(f"  negjax / peer examples/s: {res['ratio_examples_per_s']:.2f}x "
              f"(CPU time per step, peer / negjax: {res['ratio_cpu_time']:.2f}x)", flush=True)
    by_mode = {r["mode"]: r for r in results}
    if "plain" in by_mode and "cached" in by_mode:
        overhead = by_mode["cached"]["negjax"]["step_s_median"] / by_mode["plain"]["negjax"]["step_s_median"]
        peer_overhead = by_mode["cached"]["peer"]["step_s_median"] / by_mode["plain"]["peer"]["step_s_median"]
        print(f"GradCache overhead at equal batch: negjax {overhead:.2f}x the plain step, "
              f"peer {peer_overhead:.2f}x (measured in different rounds)")
        results.append({"gradcache_overhead_negjax": overhead, "gradcache_overhead_peer": peer_overhead})
    if args.json:
        sys.path.insert(0, str(ROOT))
        from negjax.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
