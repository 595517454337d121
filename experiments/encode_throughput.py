"""Encode throughput of all-MiniLM-L6-v2: negjax (JAX, jitted, length-bucketed) next to
sentence-transformers (PyTorch) on the same sentences, measured alternately in one run.

    /work/venv/bin/python experiments/encode_throughput.py [--n 2000] [--batch-size 128] \
        [--max-length 128] [--rounds 3] [--devices 1]

Sentences are WordNet 3.0 glosses (/usr/share/wordnet), sampled deterministically: short
to long definitions with usage examples. Both sides use fp32 on the CPU, the same batch size
and max length; each round times negjax then sentence-transformers; the median round is
reported. negjax's compile time (one program per length bucket) is reported separately.

Results (2026-11-26, this 2-core CPU machine, shared with other jobs: load average 5-8, so
absolute numbers are low and noisy; the ratio held in every round):

    python experiments/encode_throughput.py --n 2000 --rounds 3            # 1 JAX device
      negjax 130 sentences/s (rounds 130/177/97), sentence-transformers 63/s (64/63/49)
    python experiments/encode_throughput.py --n 2000 --rounds 3 --devices 2
      negjax 146 sentences/s (rounds 153/133/146), sentence-transformers 63/s (65/61/63)

    Agreement: min cosine 1.000000, max |diff| 2.4e-7. negjax first call incl. compiling
    4 buckets: 21-23 s. Bucket padding: 68% of padded tokens are real.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path


def wordnet_glosses(n: int, seed: int = 0) -> list[str]:
    """`n` glosses (definition plus quoted examples) from WordNet's data files."""
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(Path("/usr/share/wordnet") / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                glosses.append(line.split(" | ", 1)[1].strip())
    random.Random(seed).shuffle(glosses)
    return glosses[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--n", 2000), ("--batch-size", 128), ("--max-length", 128),
                          ("--rounds", 3)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--devices", type=int, default=1,
                    help="simulated XLA CPU devices for negjax (1 = one device using all cores)")
    args = ap.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("NEGJAX_PROGRESS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import jax
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from negjax.config import ModelConfig
    from negjax.model import bucket_lengths, encode_texts, load_encoder, minilm_dir
    from negjax.model.tokenizer import tokenize

    texts = wordnet_glosses(args.n)
    enc = load_encoder(ModelConfig(name="minilm"))
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    st.max_seq_length = args.max_length

    lengths = np.array([len(t) for t in tokenize(enc.tokenizer, texts, args.max_length)])
    buckets = bucket_lengths(args.max_length)
    padded = [next(b for b in buckets if b >= n) for n in np.sort(lengths)[::-1]]
    print(f"{len(texts)} WordNet glosses, tokens/text mean {lengths.mean():.1f} "
          f"max {lengths.max()}; buckets {buckets}; JAX devices {jax.device_count()} "
          f"({jax.devices()[0].platform}), torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")

    def run_negjax():
        return encode_texts(enc, enc.params, texts, max_length=args.max_length,
                            batch_size=args.batch_size)

    def run_st():
        return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    t0 = time.perf_counter()
    ours = run_negjax()  # compiles one program per bucket used
    first = time.perf_counter() - t0
    ref = run_st()  # warm-up
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"negjax first call (incl. compile) {first:.1f} s; agreement with sentence-transformers: "
          f"min cosine {cos.min():.6f}, max |diff| {np.abs(ours - ref).max():.2e}")

    rates = {"negjax": [], "sentence-transformers": []}
    for r in range(args.rounds):
        for name, fn in (("negjax", run_negjax), ("sentence-transformers", run_st)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            rates[name].append(len(texts) / dt)
        print(f"round {r + 1}: negjax {rates['negjax'][-1]:.0f}/s, "
              f"sentence-transformers {rates['sentence-transformers'][-1]:.0f}/s")
    print(f"\nencode throughput, all-MiniLM-L6-v2, fp32 CPU, batch {args.batch_size}, "
          f"max length {args.max_length}, {len(texts)} sentences, median of {args.rounds}:")
    for name, values in rates.items():
        print(f"  {name:22s} {statistics.median(values):8.0f} sentences/s")
    print(f"  padding: negjax buckets {lengths.sum() / sum(padded):.0%} real tokens")


if __name__ == "__main__":
    main()
