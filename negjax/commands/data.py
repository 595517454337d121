"""`negjax data export|stats|validate`: built-in datasets and a look at a dataset directory.

    negjax data export wordnet /tmp/wn    # write corpus.jsonl, train.jsonl, {dev,test}_{queries.jsonl,qrels.tsv}
    negjax data stats /tmp/wn             # counts + length percentiles (words, characters)
    negjax data validate --corpus C --train T [--qrels Q]
    negjax data validate --config sources.toml   # each of its datasets
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from negjax.errors import NegjaxError

# name -> module under negjax.data exposing export(out_dir) -> {file: records}
DATASETS = {"wordnet": "negjax.data.wordnet"}
PERCENTILES = (50, 90, 99)


def add_parser(sub):
    p = sub.add_parser("data", help="export a built-in dataset, show statistics of a dataset directory")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ex = dsub.add_parser("export", help=f"write a built-in dataset ({', '.join(DATASETS)}) into DIR")
    ex.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(DATASETS)}")
    ex.add_argument("dir", metavar="DIR", help="output directory (created if needed)")
    st = dsub.add_parser("stats", help="counts and length percentiles of a dataset directory")
    st.add_argument("dir", metavar="DIR", help="directory with corpus, train, *queries (each "
                    "JSONL, Parquet, Arrow or TSV), *qrels.tsv (or qrels/*.tsv)")
    st.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    va = dsub.add_parser("validate", help="check a corpus + training file (+ qrels), or every "
                         "dataset of a config, and print stats")
    va.add_argument("--corpus", help="corpus: JSONL(.gz), Parquet, Arrow or TSV (omit when the "
                    "training data carries texts)")
    va.add_argument("--train", help="training data: JSONL(.gz), Parquet or Arrow")
    va.add_argument("--qrels", help="qrels TSV (optional)")
    va.add_argument("--config", help="a training config: check its dataset, or each of its "
                    "[[data.sources]] (training files and dev qrels), instead of --corpus/--train")
    return p


def run(args) -> int:
    if args.data_command == "export":
        return _export(args.dataset, args.dir)
    if args.data_command == "stats":
        stats = dataset_stats(args.dir)
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
        return 0
    if args.data_command == "validate":
        from negjax.data.validate import validate_config, validate_dataset

        if args.config:
            if args.corpus or args.train or args.qrels:
                raise NegjaxError("data validate: --config or --corpus/--train/--qrels, not both")
            out = validate_config(args.config)
        elif not args.train:
            raise NegjaxError("data validate: --train (or --config) is required")
        else:
            out = validate_dataset(args.corpus, args.train, args.qrels)
        print(json.dumps(out, indent=2, default=str))
        return 0
    raise NegjaxError(f"unknown data action {args.data_command!r}")


def _export(name: str, out_dir: str) -> int:
    if name not in DATASETS:
        raise NegjaxError(f"unknown dataset {name!r}; built-in datasets: {', '.join(DATASETS)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NegjaxError(f"{out}: exists and is not a directory")
    module = importlib.import_module(DATASETS[name])
    written = module.export(out)
    for fname, n in written.items():
        print(f"{out / fname}\t{n}")
    return 0


# ---------------------------------------------------------------------------------- stats

def _lengths(texts) -> dict:
    """Summaries of word and character counts of `texts`."""
    import numpy as np

    words = np.fromiter((len(t.split()) for t in texts), np.int64, count=len(texts))
    chars = np.fromiter((len(t) for t in texts), np.int64, count=len(texts))
    return {"words": _summary(words), "chars": _summary(chars)}


def _summary(arr) -> dict:
    import numpy as np

    if arr.size == 0:
        return {"n": 0}
    out = {"n": int(arr.size), "mean": round(float(arr.mean()), 1)}
    for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES)):
        out[f"p{p}"] = int(round(float(v)))
    out["max"] = int(arr.max())
    return out


def _stem(name: str) -> str:
    from negjax.data.layout import INPUT_SUFFIXES

    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dataset_stats(directory) -> dict:
    """Counts and length statistics of the recognised files in `directory`: the corpus, the
    training data, *queries and *qrels.tsv / qrels/*.tsv (BEIR layout), each input in any
    format (`negjax.data.layout.find_input`: corpus.jsonl, corpus.parquet, corpus.tsv, a
    corpus/ directory of Parquet or Arrow files, ...). Files are read (and so checked) by
    negjax.data.formats: qrels ids must exist in the corpus and in the matching queries file
    (X_qrels.tsv <-> X_queries.*, qrels/*.tsv <-> queries.*). Document lengths are of the
    text a model embeds ("title text" when there is a title)."""
    from negjax.data import formats
    from negjax.data.layout import find_input

    d = Path(directory)
    if not d.is_dir():
        raise NegjaxError(f"{d}: not a directory")
    stats: dict = {"dir": str(d), "files": {}, "lengths": {}}
    corpus = None
    corpus_path = find_input(d, "corpus.jsonl")
    if corpus_path is not None:
        corpus = formats.read_corpus(corpus_path)
        stats["files"][corpus_path.name] = {"documents": len(corpus),
                                            "with_title": sum(bool(t) for t in corpus.titles)}
        stats["lengths"]["documents"] = _lengths(corpus.texts)
    train_path = find_input(d, "train.jsonl")
    if train_path is not None:
        corpus_or_none = corpus if formats.detect_train_format(train_path) in (
            "pairs", "tevatron", "tevatron-ids") else None
        _, train = formats.read_training(train_path, corpus_or_none)
        stats["files"][train_path.name] = {"queries": len(train),
                                           "positives": sum(map(len, train.positives)),
                                           "negatives": sum(map(len, train.negatives))}
        stats["lengths"]["train queries"] = _lengths(train.queries)
    queries = {}
    for qpath in sorted(p for p in d.iterdir() if _stem(p.name).endswith("queries")):
        queries[_stem(qpath.name)] = q = formats.read_queries(qpath)
        stats["files"][qpath.name] = {"queries": len(q)}
        label = _stem(qpath.name)[: -len("queries")].strip("_") or "eval"
        stats["lengths"][f"{label} queries"] = _lengths(q.texts)
    for rpath in sorted(d.glob("*qrels.tsv")) + sorted(d.glob("qrels/*.tsv")):
        partner = (rpath.name[: -len("qrels.tsv")] + "queries") if rpath.parent == d else "queries"
        known = queries[partner].ids if partner in queries else None
        qrels = formats.read_qrels(rpath, corpus=corpus, query_ids=known)
        stats["files"][rpath.relative_to(d).as_posix()] = {
            "judgements": sum(map(len, qrels.values())), "queries": len(qrels)}
    if not stats["files"]:
        raise NegjaxError(f"{d}: no corpus, train, *queries or *qrels.tsv input found")
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"{stats['dir']}"]
    width = max(len(n) for n in stats["files"]) + 2
    for name, counts in stats["files"].items():
        lines.append(f"  {name:<{width}}" + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()))
    if stats["lengths"]:
        cols = ["n", "mean", *(f"p{p}" for p in PERCENTILES), "max"]
        lw = max(len(k) for k in stats["lengths"]) + 8
        lines.append("")
        lines.append(f"  {'lengths':<{lw}}" + "".join(f"{c:>9}" for c in cols))
        for label, by_unit in stats["lengths"].items():
            for unit, s in by_unit.items():
                cells = "".join(f"{s.get(c, '-'):>9}" for c in cols)
                lines.append(f"  {label + ' (' + unit + ')':<{lw}}{cells}")
    return "\n".join(lines)
