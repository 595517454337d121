"""Tests run on the CPU with 8 simulated devices; the flags must be set before jax loads."""

import json
import os
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NEGJAX_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small slice of the built-in WordNet data: 400 documents, 96 train queries, 40 dev
    (shared by every test module that trains through the CLI)."""
    from negjax.data import wordnet

    root = Path(wordnet.ensure_exported(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("data")
    train = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()[:96]]
    dev_q = [json.loads(x) for x in (root / "dev_queries.jsonl").read_text().splitlines()[:40]]
    dev_ids = {q["id"] for q in dev_q}
    qrels = [x.split("\t") for x in (root / "dev_qrels.tsv").read_text().splitlines()[1:]]
    qrels = [r for r in qrels if r[0] in dev_ids]
    needed = {p for t in train for p in t["pos"]} | {r[1] for r in qrels}
    corpus = []
    for i, line in enumerate((root / "corpus.jsonl").read_text().splitlines()):
        doc = json.loads(line)
        if doc["id"] in needed or i % 300 == 0:
            corpus.append(line)
    (out / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (out / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in train))
    (out / "dev_queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in dev_q))
    (out / "dev_qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    return out
