"""Where a dataset's files are: the layout of a dataset directory, shared by training,
mining, evaluation and the experiments.

    paths = resolve_dataset(cfg.data)      # {"corpus", "train", "train_qrels", "dev_queries",
                                           #  "dev_qrels", "test_queries", "test_qrels"}
    corpus, examples = load_training_data(cfg.data)

A dataset directory holds corpus.jsonl and train.jsonl (or BEIR queries.jsonl +
qrels/train.tsv), dev_queries.jsonl + dev_qrels.tsv (or BEIR qrels/dev.tsv) and optionally
test_queries.jsonl + test_qrels.tsv. Any of the .jsonl files may be in another input format
under the same stem (`find_input`): .jsonl.gz, .parquet, .arrow, .tsv (corpus and queries)
or a directory of Parquet / Arrow files. `data.dataset = "wordnet"` is the built-in dataset,
exported to the cache in this layout. Explicit file fields of `DataConfig` override.
"""

from __future__ import annotations

from pathlib import Path

from negjax.data.formats import Corpus, TrainExamples, read_training
from negjax.utils import default_cache_dir
from negjax.errors import NegjaxError


INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow", ".tsv", ".tsv.gz", "")


def find_input(root: Path, name: str) -> Path | None:
    """`root/name` for a file name like corpus.jsonl, or the same stem in another input format
    (corpus.jsonl.gz, corpus.parquet, corpus.tsv, a corpus/ directory of Parquet or Arrow
    files); None when there is none. Names of other files (qrels TSVs) are taken as they are."""
    if (root / name).exists():
        return root / name
    if not name.endswith(".jsonl"):
        return None
    stem = name[: -len(".jsonl")]
    for suffix in INPUT_SUFFIXES:
        if (root / (stem + suffix)).exists():
            return root / (stem + suffix)
    return None


def resolve_dataset(data_cfg, cache_dir=None) -> dict[str, Path | None]:
    """Paths (or None) of the dataset's files from `DataConfig` (see the module docstring)."""
    root = None
    if data_cfg.dataset == "wordnet":
        from negjax.data import wordnet

        root = Path(wordnet.ensure_exported(default_cache_dir(cache_dir or data_cfg.cache_dir)))
    elif data_cfg.dataset:
        root = Path(data_cfg.dataset)
        if not root.is_dir():
            raise NegjaxError(f"data.dataset {data_cfg.dataset!r}: not 'wordnet' nor a directory")

    def pick(explicit, *names):
        if explicit:
            return Path(explicit)
        for name in names:
            found = find_input(root, name) if root is not None else None
            if found is not None:
                return found
        return None

    train = pick(data_cfg.train, "train.jsonl")
    train_qrels = pick(getattr(data_cfg, "train_qrels", ""))
    if train is None and root is not None and (root / "qrels" / "train.tsv").is_file():
        train, train_qrels = root / "queries.jsonl", train_qrels or root / "qrels" / "train.tsv"
    return {"corpus": pick(data_cfg.corpus, "corpus.jsonl"), "train": train,
            "train_qrels": train_qrels,
            "dev_queries": pick(data_cfg.dev_queries, "dev_queries.jsonl", "queries.jsonl"),
            "dev_qrels": pick(data_cfg.dev_qrels, "dev_qrels.tsv", "qrels/dev.tsv"),
            "test_queries": pick("", "test_queries.jsonl"),
            "test_qrels": pick("", "test_qrels.tsv", "qrels/test.tsv")}


def load_training_data(data_cfg, cache_dir=None) -> tuple[Corpus, TrainExamples]:
    """The corpus and training examples of `DataConfig`."""
    paths = resolve_dataset(data_cfg, cache_dir)
    if paths["train"] is None:
        raise NegjaxError("no training data: set data.dataset or data.train")
    return read_training(paths["train"], paths["corpus"], qrels=paths["train_qrels"])
