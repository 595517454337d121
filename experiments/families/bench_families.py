"""Train-step time of every encoder family at equal parameter counts, measured through
`negjax bench step --model DIR` (the command users run) on a Hugging Face directory of each
family written by negjax's export.

Shapes: hidden 256, 4 layers, 4 heads, built-in 8k vocabulary. Feed-forward sizes equalise
the non-embedding parameters per layer (786k): BERT / RoBERTa 4H^2 + 2HI with I = 1024;
ModernBERT (GeGLU: three H x I matmuls) I = 683; Qwen3 / Qwen2 (grouped-query attention
with 2 key/value heads: 3H^2, SwiGLU) I = 768. Families run one after another in rounds
(round-robin), each a fresh process; the table reports the median over rounds.

    python experiments/families/bench_families.py --rounds 2 --json experiments/families/bench_families.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = {"bert": 1024, "roberta": 1024, "modernbert": 683, "qwen3": 768, "qwen2": 768}


def make_dirs(root: Path) -> dict:
    import jax

    from negjax.config import ModelConfig
    from negjax.model import load_encoder
    from negjax.model.encoder import export_hf

    out = {}
    for fam, inter in SIZES.items():
        enc = load_encoder(ModelConfig(name="tiny", architecture=fam, hidden_size=256,
                                       num_layers=4, num_heads=4, intermediate_size=inter,
                                       doc_max_len=128))
        n = sum(int(x.size) for x in jax.tree.leaves(enc.params))
        out[fam] = (export_hf(enc, enc.params, root / fam), n)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=str(REPO / "experiments/families/bench_families.json"))
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="negjax-families-"))
    dirs = make_dirs(root)
    runs = {fam: [] for fam in dirs}
    for r in range(a.rounds):
        for fam, (path, n) in dirs.items():
            cmd = [sys.executable, "-m", "negjax", "bench", "step", "--model", str(path),
                   "--batch", str(a.batch), "--query-len", "32", "--doc-len", "128",
                   "--negatives", "1", "--steps", str(a.steps), "--devices", "1",
                   "--no-breakdown", "--json"]
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{fam}: {p.stderr[-2000:]}")
            res = json.loads(p.stdout)
            runs[fam].append({"median_s": res["step_time"]["median_s"],
                              "model_tflops_per_s": res["tflops_per_s"],
                              "examples_per_s": res["examples_per_s"]})
            print(fam, r, json.dumps(runs[fam][-1]), flush=True)
    rows = []
    base = None
    for fam, (_, n) in dirs.items():
        med = sorted(x["median_s"] for x in runs[fam])[len(runs[fam]) // 2]
        base = base or med
        rows.append({"family": fam, "params": n, "step_median_s": med, "vs_bert": med / base,
                     "rounds": runs[fam]})
    Path(a.json).write_text(json.dumps({"batch": a.batch, "query_len": 32, "doc_len": 128,
                                        "negatives": 1, "rows": rows}, indent=1) + "\n")
    for row in rows:
        print(f"{row['family']:<11} {row['params']:>10,} params  {row['step_median_s'] * 1e3:8.1f} ms"
              f"  x{row['vs_bert']:.2f} vs bert")


if __name__ == "__main__":
    main()
