"""Training diagnostics: cosine-similarity histograms of positives, hard negatives and
in-batch negatives over training, the loss curve, and an embedding-collapse signal (mean
pairwise cosine and effective rank of a batch's document embeddings).

Recorded on process 0 from a sample of `SAMPLE` queries of the batch (and their documents):
the embeddings the train step itself computed (the first SAMPLE / devices queries of every
device, returned by the step as `sample_q` / `sample_d`), about 20 times per run (at the
loop's logging points), into WORKDIR/diagnostics.jsonl; `plot` draws
WORKDIR/diagnostics.png. The sample bounds the cost: the in-batch similarity matrix and the
collapse signal are quadratic in the rows, and a GradCache batch of thousands of queries
would otherwise be encoded (and compared) whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BINS = np.linspace(-1.0, 1.0, 41)
SAMPLE = 256  # queries per record (with their 1 + H documents each)


def batch_similarities(q: np.ndarray, d: np.ndarray, group_size: int) -> dict:
    """Cosines of a batch. q [b, D], d [b*G, D] -> positives [b], hard negatives [b*(G-1)],
    in-batch negatives (other queries' documents) [b*(b-1)*G]."""
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    sim = qn @ dn.T
    b = q.shape[0]
    owner = np.arange(b * group_size) // group_size
    own = owner[None, :] == np.arange(b)[:, None]
    target = np.zeros_like(own)
    target[np.arange(b), np.arange(b) * group_size] = True
    return {"positive": sim[target], "hard_negative": sim[own & ~target], "in_batch_negative": sim[~own]}


def collapse_signal(d: np.ndarray) -> dict:
    """Mean pairwise cosine (→ 1 when embeddings collapse) and effective rank
    exp(entropy of normalised singular values) (→ 1 when they collapse onto a line)."""
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    n = len(dn)
    sim = dn @ dn.T
    mean_cos = float((sim.sum() - np.trace(sim)) / max(n * (n - 1), 1))
    s = np.linalg.svd(dn - 0.0, compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    p = p[p > 0]
    return {"mean_pairwise_cos": mean_cos, "effective_rank": float(np.exp(-(p * np.log(p)).sum()))}


class Diagnostics:
    def __init__(self, workdir, *, enabled: bool = True, times: int = 20):
        self.path = Path(workdir) / "diagnostics.jsonl"
        self.png = Path(workdir) / "diagnostics.png"
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.times = times
        self._last = None

    def due(self, step: int, cfg) -> bool:
        """Whether a record is due at this logging point: the first, then one per
        train.steps / times steps."""
        every = max(cfg.train.steps // self.times, 1)
        return self._last is None or step // every > self._last // every

    def record(self, step: int, q: np.ndarray, d: np.ndarray) -> None:
        """Record the step's sample of embeddings (`q` [s, D] queries, `d` [s*G, D] their
        documents, as the step computed them, dropout included): no encoder runs here."""
        self._last = step
        if not self.enabled:
            return
        q, d = np.asarray(q, np.float32), np.asarray(d, np.float32)
        group = d.shape[0] // q.shape[0]
        sims = batch_similarities(q, d, group)
        rec = {"step": step, **collapse_signal(d)}
        for name, values in sims.items():
            rec[f"{name}_hist"] = np.histogram(values, BINS)[0].tolist() if len(values) else []
            rec[f"{name}_mean"] = float(values.mean()) if len(values) else None
        lines = []
        if self.path.is_file():  # a resumed run replaces records past its restart point
            lines = [x for x in self.path.read_text().splitlines()
                     if x.strip() and json.loads(x)["step"] < step]
        lines.append(json.dumps(rec))
        self.path.write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        if self.enabled and self.path.is_file():
            plot(self.workdir, self.png)


def plot(workdir, out) -> Path:
    """diagnostics.png: loss curve, cosine histograms (first / last record), collapse signal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    recs = [json.loads(x) for x in (workdir / "diagnostics.jsonl").read_text().splitlines() if x.strip()]
    metrics = []
    if (workdir / "metrics.jsonl").is_file():
        metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0, 0]
    if metrics:
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=0.8)
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    centers = 0.5 * (BINS[1:] + BINS[:-1])
    for ax, rec, when in ((axes[0, 1], recs[0], "first"), (axes[1, 0], recs[-1], "last")):
        for name, color in (("positive", "tab:green"), ("hard_negative", "tab:red"),
                            ("in_batch_negative", "tab:blue")):
            h = np.asarray(rec.get(f"{name}_hist") or [], float)
            if h.size and h.sum() > 0:
                ax.plot(centers, h / h.sum(), label=name.replace("_", " "), color=color)
        ax.set(title=f"cosine similarity, step {rec['step']} ({when} record)", xlabel="cosine",
               ylabel="fraction")
        ax.legend()
    ax = axes[1, 1]
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["mean_pairwise_cos"] for r in recs], label="mean pairwise cosine (docs)")
    ax.set(title="embedding collapse signal", xlabel="step", ylabel="mean pairwise cosine")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["effective_rank"] for r in recs], color="tab:orange", label="effective rank")
    ax2.set_ylabel("effective rank")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
