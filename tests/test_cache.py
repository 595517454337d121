"""`negjax cache`: what the cache holds, and `clean` removing exactly what no job can find
again (stores and digests of changed or deleted inputs, builds whose process died), so that
the next run over the current inputs is still warm."""

import json
import os
import subprocess
import sys

from negjax.cache import builder_tag, scan
from negjax.data.records import input_digest
from test_prepared import DOCS, TRAIN, prepare, tok, write_jsonl  # noqa: F401 (tok: a fixture)
from tests.helpers import run_negjax


def _names(cache, status=None):
    return sorted(e.path.name for e in scan(cache) if status is None or e.status == status)


def test_clean_removes_what_no_job_can_find_and_keeps_the_rest(tmp_path, tok):  # noqa: F811
    cache = tmp_path / "cache"
    paths = {"corpus": write_jsonl(tmp_path / "corpus.jsonl", DOCS),
             "train": write_jsonl(tmp_path / "train.jsonl", TRAIN), "train_qrels": None}
    old = prepare(paths, tok, cache)
    input_digest(paths["corpus"], cache)
    other = {"corpus": write_jsonl(tmp_path / "other.jsonl", DOCS[:5]),
             "train": write_jsonl(tmp_path / "other_train.jsonl", TRAIN[:1]), "train_qrels": None}
    prepare(other, tok, cache)
    assert _names(cache, "stale") == []

    # A new corpus (other mtime and size) makes the old stores and digest unreachable; the
    # deleted inputs make theirs so too.
    write_jsonl(paths["corpus"], DOCS + [{"id": "d9", "text": "a new document"}])
    new = prepare(paths, tok, cache)
    assert new.docs.dir != old.docs.dir
    input_digest(paths["corpus"], cache)
    for p in other.values():
        if p:
            p.unlink()
    # A build whose process died (same host), and one in progress (this process).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    tag = builder_tag()
    abandoned = cache / "tokens" / f".docs-0123.{tag[:tag.rindex('-')]}-{dead}.abcd.tmp"
    building = cache / "tokens" / f".docs-4567.{tag}.efgh.tmp"
    for d in (abandoned, building):
        d.mkdir()
        (d / "ids.raw").write_bytes(b"\0" * 1000)

    by_status = {e.path.name: e.status for e in scan(cache)}
    stale = sorted(n for n, s in by_status.items() if s == "stale")
    # old docs + train stores, other's two stores, the old corpus digest
    assert len(stale) == 5 and old.docs.dir.name in stale
    assert by_status[abandoned.name] == "abandoned" and by_status[building.name] == "building"
    keep = sorted(n for n, s in by_status.items() if s == "ok")
    assert new.docs.dir.name in keep and new.examples.query_store.dir.parent.name in keep

    listing = run_negjax("cache", "--dir", str(cache), check=True).stdout
    counts = {line[:16].strip(): (int(line[16:23]), line.split("; ")[1].split()[0] if "; " in line else "0")
              for line in listing.splitlines()[1:] if line.startswith("  ")}
    assert counts == {"temporary": (2, "1"), "token store": (3, "2"), "training data": (3, "2"),
                      "digest": (2, "1")}, listing
    dry = run_negjax("cache", "clean", "--dry-run", "--dir", str(cache), check=True).stdout
    assert "would remove 6 of" in dry and sorted(_names(cache)) == sorted(by_status)

    out = run_negjax("cache", "clean", "--dir", str(cache), check=True).stdout
    assert "removed 6 of" in out
    assert _names(cache) == sorted(keep + [building.name])
    assert not any(p.name.startswith(".removing.") for p in (cache / "tokens").iterdir())
    # The current inputs are still warm: nothing is built, the digest is remembered.
    again = prepare(paths, tok, cache)
    assert again.built == [] and again.docs.dir == new.docs.dir
    memo = [json.loads(p.read_text()) for p in (cache / "digests").iterdir()]
    assert [m["fingerprint"][0][0] for m in memo] == [str(paths["corpus"].resolve())]

    entries = [json.loads(x) for x in run_negjax("cache", "--json", "--dir", str(cache),
                                                 check=True).stdout.splitlines()]
    assert {e["status"] for e in entries} == {"ok", "building"}
    assert run_negjax("cache", "clean", "--all", "--dir", str(cache), check=True).returncode == 0
    assert _names(cache) == [building.name]  # a build in progress is left to its process
    assert os.path.isdir(building)
    bad = run_negjax("cache", "--dir", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such cache directory" in bad.stderr
