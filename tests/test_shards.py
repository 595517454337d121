"""Hard-negative shards: writer/reader round trip, resume, and refusal of broken directories."""

import json

import numpy as np
import pytest

from negjax.data import shards
from negjax.data.formats import Corpus, TrainExamples
from negjax.data.shards import ShardWriter, load_negatives, verify
from negjax.errors import NegjaxError

CORPUS = Corpus([f"d{i}" for i in range(10)], [f"text {i}" for i in range(10)], [""] * 10)
EXAMPLES = TrainExamples(["q0", "q1", "q2"], ["a", "b", "c"], [[0], [1, 2], [3]], [[], [], []],
                         [1, 2, 3])


def rows(qids, negs):
    return dict(query_ids=qids, positive_ids=[["d0"] for _ in qids], negative_ids=negs,
                negative_scores=[np.linspace(0.9, 0.5, len(n), dtype=np.float32) for n in negs],
                positive_score=np.full(len(qids), 0.95, np.float32))


def finished(tmp_path):
    """A complete directory: shard 0 = q0, q1 (+ a query not in training), shard 1 = q9."""
    w = ShardWriter(tmp_path / "neg")
    a = w.write(0, **rows(["q0", "q1", "qx"], [["d5", "d4", "d5"], ["d2", "d6"], ["d7"]]))
    b = w.write(1, **rows(["q9"], [["d1"]]))
    w.finalize(model={"path": "/ckpt/1000", "step": 1000}, index={"kind": "exact", "k": 10},
               filters={"rank_range": "1:10"}, shards=[a, b])
    return tmp_path / "neg"


def test_round_trip(tmp_path):
    d = finished(tmp_path)
    m = verify(d)
    assert m["format_version"] == 1 and m["model"] == {"path": "/ckpt/1000", "step": 1000}
    assert m["counts"] == {"shards": 2, "queries": 4, "negatives": 7}
    assert [s["name"] for s in m["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    t = shards.read_table(d)
    assert t.schema.equals(shards.schema())
    assert t.column("query_id").to_pylist() == ["q0", "q1", "qx", "q9"]
    assert t.column("negative_ranks").to_pylist()[0] == [1, 2, 3]
    neg = load_negatives(d, EXAMPLES, CORPUS)
    # q0: ranked, duplicate dropped; q1: its own positive d2 dropped; q2: not mined.
    lists = [neg.rows[neg.offsets[i]:neg.offsets[i + 1]].tolist() for i in range(3)]
    assert lists == [[5, 4], [6], []]
    assert neg.queries_found == 2 and neg.extra_queries == 2


def test_flipped_byte_is_refused(tmp_path):
    d = finished(tmp_path)
    p = d / "shard-00001.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(NegjaxError, match=r"shard-00001\.parquet: sha256 .* does not match "
                                          r"manifest\.json .*corrupt"):
        load_negatives(d, EXAMPLES, CORPUS)


def test_truncated_parquet_is_refused(tmp_path):
    d = finished(tmp_path)
    p = d / "shard-00000.parquet"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(NegjaxError, match=r"shard-00000\.parquet: \d+ bytes, manifest\.json says "
                                          r"\d+ \(truncated\)"):
        verify(d)
    # Without the manifest's sizes and checksums, the broken footer itself is named.
    with pytest.raises(NegjaxError, match="not a readable Parquet file"):
        shards.shard_info(p)


def test_missing_manifest_is_refused(tmp_path):
    d = finished(tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(NegjaxError, match=r"no manifest\.json.*2 shard\(s\).*did not finish"):
        load_negatives(d, EXAMPLES, CORPUS)
    with pytest.raises(NegjaxError, match="not found"):
        verify(tmp_path / "nowhere")


def test_partial_directory_is_refused(tmp_path):
    d = finished(tmp_path)
    (d / "shard-00001.parquet").unlink()
    with pytest.raises(NegjaxError, match=r"shard-00001\.parquet: listed in manifest\.json but "
                                          r"missing \(partial directory\)"):
        verify(d)


def test_unlisted_shard_and_bad_manifest_are_refused(tmp_path):
    d = finished(tmp_path)
    (d / "shard-00007.parquet").write_bytes((d / "shard-00001.parquet").read_bytes())
    with pytest.raises(NegjaxError, match=r"not listed in manifest\.json: \['shard-00007"):
        verify(d)
    (d / "shard-00007.parquet").unlink()
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["rows"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NegjaxError, match=r"3 rows, manifest\.json says 99"):
        verify(d)
    (d / "manifest.json").write_text('{"format_version": 1, "shards": [')
    with pytest.raises(NegjaxError, match=r"manifest\.json.*invalid JSON"):
        verify(d)


def test_incremental_write_and_resume(tmp_path):
    out = tmp_path / "neg"
    w = ShardWriter(out)
    w.write(0, **rows(["q0"], [["d5"]]))
    (out / ".shard-00001.parquet.abc.tmp").write_bytes(b"PAR1 half written")  # a crash mid-write
    with pytest.raises(NegjaxError, match="no manifest"):
        verify(out)
    # The resumed job sees shard 0 as done (the temp file is not a shard) and carries on.
    w2 = ShardWriter(out)
    assert sorted(w2.completed()) == [0]
    w2.write(1, **rows(["q1", "q2"], [["d6", "d7"], []]))
    m = w2.finalize()
    assert m["counts"]["queries"] == 3 and m["counts"]["negatives"] == 3
    verify(out)
    neg = load_negatives(out, EXAMPLES, CORPUS)
    assert neg.rows.tolist() == [5, 6, 7]
    with pytest.raises(NegjaxError, match="already holds a finished shard set"):
        ShardWriter(out)
    ShardWriter(out, overwrite=True)
    assert not any(out.glob("shard-*.parquet")) and not (out / "manifest.json").exists()


def test_ids_that_do_not_fit_the_training_data(tmp_path):
    w = ShardWriter(tmp_path / "a")
    w.write(0, **rows(["q0", "q1"], [["d5"], ["d1", "nope"]]))
    w.finalize()
    with pytest.raises(NegjaxError, match=r"shard-00000\.parquet: row 1: unknown document id 'nope'"):
        load_negatives(tmp_path / "a", EXAMPLES, CORPUS)
    w = ShardWriter(tmp_path / "b")
    w.write(0, **rows(["q0"], [["d5"]]))
    w.write(3, **rows(["q2", "q0"], [["d6"], ["d7"]]))
    w.finalize()
    with pytest.raises(NegjaxError, match=r"shard-00003\.parquet: row 1: query 'q0' appears twice"):
        load_negatives(tmp_path / "b", EXAMPLES, CORPUS)
