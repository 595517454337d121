"""The mining report: what the job mined, as `report.json` and `report.png`, plus a summary.

Per-shard statistics (from `negjax.mining.block.mine_block`, saved under `OUT/.work/stats/`) are
merged here: counts, score histograms (fixed bin edges shared by all shards) of positives,
candidates that passed the filters, negatives written and candidates each filter removed,
and the histogram of positives' retrieval ranks (bin 0 = outside the top-k).

The PNG has four panels: score histograms; positive ranks (with how many fell outside the
top-k); candidates removed per filter; a text panel with the settings, counts, timings and the
index's recall@k against exact search on the audit sample (also in the title).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from negjax.mining.filters import FILTER_ORDER
from negjax.utils import atomic_path, atomic_write_text

_SCALARS = ("queries", "candidates", "passed_filters", "negatives", "queries_short",
            "queries_without_negatives", "positives", "positives_outside_topk",
            "queries_positive_outside_topk", "queries_no_positive_in_topk")


def merge_counts(parts: list[dict]) -> dict:
    """Sum the per-shard counts -> {scalar counts..., "removed": {filter: n}, "removed_total"}."""
    out = {key: int(sum(int(p[key]) for p in parts)) for key in _SCALARS}
    removed = np.sum([np.asarray(p["removed"]) for p in parts], axis=0) if parts else \
        np.zeros(len(FILTER_ORDER), np.int64)
    out["removed"] = {name: int(n) for name, n in zip(FILTER_ORDER, removed)}
    out["removed_total"] = int(removed.sum())
    return out


def _sum(parts, key):
    return np.sum([np.asarray(p[key]) for p in parts], axis=0).astype(np.int64)


def build_report(parts: list[dict], *, edges: np.ndarray, k: int, counts: dict, filters: dict,
                 index: dict, model: dict, timings: dict, encode: dict, inputs: dict,
                 out_dir: str, build_seconds: float = 0.0) -> dict:
    """The JSON-able report of a finished run (`parts`: every shard's stats)."""
    for p in parts:
        if not np.array_equal(p["edges"], edges):
            raise ValueError("shard statistics were computed with different histogram bins")
    removed = _sum(parts, "hist_removed")
    return {
        "out_dir": out_dir, "inputs": inputs, "model": model, "index": index,
        "index_build_seconds": build_seconds, "filters": filters, "counts": counts,
        "encode": encode, "timings": timings, "k": k,
        "histograms": {
            "edges": [float(x) for x in edges],
            "positive": _sum(parts, "hist_positive").tolist(),
            "passed_filters": _sum(parts, "hist_passed").tolist(),
            "negatives": _sum(parts, "hist_negatives").tolist(),
            "removed": {name: removed[i].tolist() for i, name in enumerate(FILTER_ORDER)},
        },
        # rank_hist[r] = positives retrieved at rank r (1-based); [0] = not in the top-k.
        "positive_rank_hist": _sum(parts, "rank_hist").tolist(),
    }


def _recall_line(index: dict) -> str:
    audit = index.get("audit") or {}
    if index.get("type") == "exact":
        return "exact search"
    if audit.get("recall_at_k") is None:
        return f"{index.get('type')} (recall not audited)"
    r100 = f"recall@100 {audit['recall_at_100']:.4f}, " if "recall_at_100" in audit else ""
    return (f"ScaNN {r100}recall@{audit['k']} {audit['recall_at_k']:.4f} vs exact "
            f"on {audit['queries']:,} queries")


def _index_line(index: dict) -> str:
    sc = index.get("scann")
    if not sc:
        return "exact search (blockwise matmul)"
    if sc.get("brute_force"):
        return "ScaNN brute force"
    tree = (f"{sc['num_leaves']} leaves / search {sc['leaves_to_search']}, "
            if sc.get("num_leaves") else "")
    return f"ScaNN {tree}AH, reorder {sc['reorder']}"


def _tuning_lines(index: dict) -> list[str]:
    t = index.get("tuning")
    if not t:
        return []
    first, last = t["steps"][0], t["steps"][-1]
    return [f"tuned for recall >= {t['target']:g} on {t['queries']:,} queries: "
            f"leaves {first['leaves_to_search']}->{last['leaves_to_search']}, "
            f"reorder {first['reorder']}->{last['reorder']}",
            f"  (recall {first['recall_at_k']:.3f}->{last['recall_at_k']:.3f}"
            f"{'' if t['reached'] else ', target NOT reached'})"]


def plot_report(rep: dict, path) -> None:
    """Write the four-panel PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = rep["histograms"]
    edges = np.asarray(h["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    counts = rep["counts"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))

    ax = axes[0, 0]
    filtered = np.sum([h["removed"][f] for f in FILTER_ORDER if f != "positive_id"], axis=0)
    series = [("positives (best per query)", h["positive"], "tab:green"),
              ("passed filters", h["passed_filters"], "tab:blue"),
              ("negatives written", h["negatives"], "tab:orange"),
              ("filtered (false-negative filters)", filtered, "tab:red"),
              ("positives retrieved (removed by id)", h["removed"]["positive_id"], "tab:olive")]
    nonzero = np.flatnonzero(np.sum([np.asarray(s[1]) for s in series], axis=0))
    for label, y, colour in series:
        if np.sum(y):
            ax.step(centres, y, where="mid", label=f"{label} ({int(np.sum(y)):,})", color=colour)
    if len(nonzero):
        lo, hi = centres[nonzero[0]], centres[nonzero[-1]]
        pad = (hi - lo) * 0.05 + (edges[1] - edges[0])
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_yscale("log")
    peak = max(max(np.max(np.asarray(y), initial=0) for _, y, _ in series), 1)
    ax.set_ylim(0.5, peak * 300)  # headroom above the curves for the legend
    ax.set_xlabel("score (inner product)")
    ax.set_ylabel("count (log)")
    ax.set_title("Scores: positives vs candidates")
    ax.legend(fontsize=7.5, loc="upper left")

    ax = axes[0, 1]
    ranks = np.asarray(rep["positive_rank_hist"])
    if len(ranks) > 1:
        ax.bar(np.arange(1, len(ranks)), ranks[1:], width=1.0, color="tab:green")
    ax.set_yscale("log" if ranks[1:].max(initial=0) > 0 else "linear")
    ax.set_xlabel(f"rank of the positive among the top-{rep['k']}")
    ax.set_ylabel("positives (log)")
    ax.set_title("Positive rank")
    ax.text(0.98, 0.95, f"outside top-{rep['k']}: {counts['positives_outside_topk']:,} of "
            f"{counts['positives']:,} positives\n{counts['queries_positive_outside_topk']:,} of "
            f"{counts['queries']:,} queries have a positive outside\n"
            f"{counts['queries_no_positive_in_topk']:,} queries have none inside",
            transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8})

    ax = axes[1, 0]
    names = list(FILTER_ORDER) + ["passed filters", "negatives written"]
    values = [counts["removed"][f] for f in FILTER_ORDER] + [counts["passed_filters"],
                                                              counts["negatives"]]
    colours = ["tab:red"] * len(FILTER_ORDER) + ["tab:blue", "tab:orange"]
    bars = ax.barh(names[::-1], values[::-1], color=colours[::-1])
    for bar, v in zip(bars, values[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,}", va="center",
                fontsize=8)
    ax.set_xlabel(f"candidates (of {counts['candidates']:,} retrieved)")
    ax.set_title("Candidates removed per filter (first matching filter)")
    ax.margins(x=0.2)

    ax = axes[1, 1]
    ax.axis("off")
    f = rep["filters"]
    idx = rep["index"]
    index_line = _index_line(idx)
    margin = lambda v: "off" if v < 0 else f"{v:g}"  # noqa: E731
    rank_max = "inf" if f["rank_max"] >= 1 << 30 else f["rank_max"]
    t = rep["timings"]
    lines = [
        f"model: {rep['model'].get('path')}  step: {rep['model'].get('step')}",
        f"corpus: {idx['corpus']:,} docs  queries: {counts['queries']:,}  dim {idx['dim']}",
        f"index: {index_line}  k = {rep['k']}",
        f"audit: {_recall_line(idx)}",
        *_tuning_lines(idx),
        *([f"note: {idx['advice'][:90]}", f"  {idx['advice'][90:]}"] if idx.get("advice") else []),
        f"filters: dedup text {f['dedup_text']}, ranks {f['rank_min']}:{rank_max}, "
        f"scores [{f['min_score']:g}, {f['max_score']:g}]",
        f"  relative margin {margin(f['relative_margin'])}, "
        f"absolute margin {margin(f['absolute_margin'])}",
        f"sampling: {f['sampling']}, {f['num_negatives']} per query, seed {f['seed']}",
        f"negatives written: {counts['negatives']:,} "
        f"({counts['negatives'] / max(counts['queries'], 1):.1f} per query)",
        f"queries short of {f['num_negatives']}: {counts['queries_short']:,}  "
        f"with none: {counts['queries_without_negatives']:,}",
    ]
    times = [f"{key[:-2]} {v:.0f}s" for key, v in t.items()]
    lines += ["time (this run): " + ", ".join(times[:4]), "  " + ", ".join(times[4:])]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    fig.suptitle(f"negjax mine — {_recall_line(idx)}", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(out_dir, rep: dict) -> tuple[Path, Path]:
    """Write OUT/report.json and OUT/report.png (atomically)."""
    out = Path(out_dir)
    json_path, png_path = out / "report.json", out / "report.png"
    atomic_write_text(json_path, json.dumps(rep, indent=1) + "\n")
    plot_report(rep, png_path)
    return json_path, png_path


def summary_text(out_dir) -> str:
    """A few lines saying what was mined and where everything is (from OUT's report and
    manifest)."""
    out = Path(out_dir)
    rep = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    c = rep["counts"]
    removed = ", ".join(f"{k} {v:,}" for k, v in c["removed"].items() if v)
    return "\n".join([
        f"mined {c['negatives']:,} hard negatives for {c['queries']:,} queries "
        f"({c['negatives'] / max(c['queries'], 1):.1f} per query, {c['queries_short']:,} "
        f"short of {rep['filters']['num_negatives']})",
        f"  filters removed {c['removed_total']:,} of {c['candidates']:,} candidates"
        + (f": {removed}" if removed else ""),
        f"  positives outside the top-{rep['k']}: {c['positives_outside_topk']:,} of "
        f"{c['positives']:,}",
        f"  index: {_recall_line(rep['index'])}"
        + (f" ({rep['index']['sharding']['processes']} corpus shards)"
           if rep["index"].get("sharding", {}).get("processes", 1) > 1 else ""),
        *([f"  note: {rep['index']['advice']}"] if rep["index"].get("advice") else []),
        f"  shards:   {out}/ ({len(manifest['shards'])} x shard-*.parquet, manifest.json)",
        f"  report:   {out / 'report.json'}, {out / 'report.png'}",
        f"  work dir: {out / '.work'} (embeddings, index; delete when done)",
    ])
