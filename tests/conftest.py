"""Tests run on the CPU with 8 simulated devices; the flags must be set before jax loads."""

import json
import os
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NEGJAX_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache (on by default: negjax.compile_cache) is process-global
# state: enabled inside this pytest process by the first test that initialises negjax, it
# would write every later test's programs to disk and load them back. A CI run aborted inside
# XLA while executing test_losses' 8-device program with it on (not reproduced on the
# development machine), so it is off here and in the child processes, which inherit this;
# the tests of the cache (test_train's kill -9 restart) give their children a private one.
os.environ["NEGJAX_COMPILE_CACHE"] = "off"


@pytest.fixture(scope="session")
def wordnet_slice(tmp_path_factory):
    """Factory of small slices of the built-in WordNet data, each made once per session:
    `wordnet_slice(train=96, dev=40, every=300)` -> a directory with corpus.jsonl (the
    positives of the first `train` training queries and of the first `dev` dev queries, plus
    every `every`-th document), train.jsonl, dev_queries.jsonl and dev_qrels.tsv."""
    from negjax.data import wordnet

    made: dict[tuple, Path] = {}

    def make(train: int = 96, dev: int = 40, every: int = 300) -> Path:
        key = (train, dev, every)
        if key in made:
            return made[key]
        root = Path(wordnet.ensure_exported(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("data")
        rows = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()[:train]]
        dev_q = [json.loads(x) for x in (root / "dev_queries.jsonl").read_text().splitlines()[:dev]]
        dev_ids = {q["id"] for q in dev_q}
        qrels = [x.split("\t") for x in (root / "dev_qrels.tsv").read_text().splitlines()[1:]]
        qrels = [r for r in qrels if r[0] in dev_ids]
        needed = {p for t in rows for p in t["pos"]} | {r[1] for r in qrels}
        corpus = [line for i, line in enumerate((root / "corpus.jsonl").read_text().splitlines())
                  if i % every == 0 or json.loads(line)["id"] in needed]
        (out / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
        (out / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in rows))
        (out / "dev_queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in dev_q))
        (out / "dev_qrels.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                           + "".join("\t".join(r) + "\n" for r in qrels))
        made[key] = out
        return out
    return make


@pytest.fixture(scope="session")
def small_data(wordnet_slice):
    """400 documents, 96 train queries, 40 dev: shared by the modules that train via the CLI."""
    return wordnet_slice(train=96, dev=40, every=300)
