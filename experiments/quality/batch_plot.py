"""Plot of the batch-size ablation (experiments/quality/README.md, section G): MRR@10 and R@10
against the global batch at equal examples seen, for the tiny model (CPU, tiny_ablation.sh
batch rows + base_s0 at 128) and all-MiniLM-L6-v2 (GPU, ablate.py batch rows + inbatch_s0 at 128).

    python experiments/quality/batch_plot.py --out experiments/quality/batch_size.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def points(res: Path, base: str, prefix: str = "batch") -> list[tuple[int, float, float]]:
    out = []
    for path in sorted(res.glob(f"{prefix}*.json")):
        b = path.stem[len(prefix):]
        if b.isdigit():
            r = json.loads(path.read_text().splitlines()[0])
            out.append((int(b), r["mrr@10"], r["recall@10"]))
    if (res / f"{base}.json").is_file():
        r = json.loads((res / f"{base}.json").read_text().splitlines()[0])
        out.append((128, r["mrr@10"], r["recall@10"]))
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "batch_size.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"tiny (2 layers, from scratch; 38,400 examples)": points(HERE / "results/tiny", "base_s0_d128"),
              "all-MiniLM-L6-v2 (43,256 examples, GPU)": points(HERE / "results/gpu", "inbatch_s0")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (i, label) in zip(axes, ((1, "MRR@10"), (2, "Recall@10"))):
        for name, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[i] for p in pts], "o-", label=name)
                print(name, label, [(p[0], round(p[i], 4)) for p in pts])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch (queries), equal examples seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Batch size at equal examples seen (in-batch negatives, same learning rate)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
