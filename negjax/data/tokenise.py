"""Token ids of texts for token stores, with a word cache for word-local tokenizers.

    encode = Encoder(backend)           # a tokenizers.Tokenizer with truncation enabled
    lengths, ids = encode(texts)        # [n] int32; every text's ids back to back, int32

Most of a cold build is the tokenizer (about 100 us a 300-byte text on one core here), and a
corpus repeats its words endlessly. For a tokenizer whose pipeline is word-local - a text's
tokens are the tokens of its space-separated words, one word after another (BERT's normaliser
and pre-tokeniser with a WordPiece model: the BERT, MiniLM and E5 families and negjax's
built-in vocabulary) - the encoder tokenises each distinct word once, keeps its ids in a
bounded cache, and assembles a text from its first words until the length budget is full (the
words past it are never tokenised), between the special tokens the tokenizer adds.

The ids are the tokenizer's own: the assembly is checked against the tokenizer on the first
texts of every encoder (any difference switches the cache off for good, with a warning), and
tests/test_token_store.py compares whole stores on texts made to break it (accents, CJK,
control characters, repeated and trailing spaces, words longer than the model's limit). Other
tokenizers (byte-level BPE, SentencePiece) tokenise whole texts, as does every text that its
first words do not fill while more follow.
"""

from __future__ import annotations

import json
import warnings
from itertools import chain

import numpy as np

CHUNK = 8192  # texts per encode_batch call
CACHE_WORDS = 1 << 20  # distinct words kept (~100-200 bytes each; emptied when full)
CHECK_TEXTS = 512  # texts of each encoder compared with the tokenizer's own ids

# Pipelines whose tokens of a text are the concatenation of its words' tokens, a word being a
# run of characters between ASCII spaces: normalisers that act on one character at a time (or
# on a combining sequence, which a space ends), pre-tokenisers that split at every space, and a
# model that tokenises each pre-tokenised word alone.
_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFD", "StripAccents"}
_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits"}
_MODELS = {"WordPiece"}
_POST_PROCESSORS = {None, "TemplateProcessing", "BertProcessing"}


def _kinds(component) -> list:
    """The `type`s of a serialised normaliser / pre-tokeniser, Sequences flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        inner = component.get("normalizers") or component.get("pretokenizers") or []
        return [kind for part in inner for kind in _kinds(part)]
    return [component.get("type")]


def word_local(backend) -> bool:
    """Whether `backend`'s tokens of a text are its space-separated words' tokens in order
    (see the module docstring); False for anything not known to be."""
    spec = json.loads(backend.to_str())
    trunc = spec.get("truncation") or {}
    if not trunc or trunc.get("direction", "Right") != "Right" or trunc.get("stride", 0):
        return False
    pre = _kinds(spec.get("pre_tokenizer"))
    post = spec.get("post_processor")
    return (set(_kinds(spec.get("normalizer"))) <= _NORMALIZERS and bool(pre)
            and set(pre) <= _PRE_TOKENIZERS
            and (spec.get("model") or {}).get("type") in _MODELS
            and (post or {}).get("type") in _POST_PROCESSORS)


class Encoder:
    """`encoder(texts) -> (lengths, ids)`; see the module docstring."""

    def __init__(self, backend):
        from tokenizers import Tokenizer

        # (encode_batch_fast: the same ids without character offsets, ~2x faster)
        self._batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.cached = False
        self.checked = 0
        self.whole = 0  # texts tokenised whole although cached (first words did not fill them)
        if not word_local(backend):
            return
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_truncation()
        self._plain = plain
        # The special tokens around a text's own ids: [CLS] ... [SEP] for BERT.
        probe = "a"
        full = plain.encode(probe, add_special_tokens=True).ids  # (untruncated)
        own = plain.encode(probe, add_special_tokens=False).ids
        starts = [k for k in range(len(full) - len(own) + 1) if full[k:k + len(own)] == own]
        if len(own) == 0 or len(starts) != 1:
            return
        k = starts[0]
        as_bytes = lambda ids: np.asarray(ids, dtype="<i4").tobytes()  # noqa: E731
        self._head, self._tail = as_bytes(full[:k]), as_bytes(full[k + len(own):])
        self._room = backend.truncation["max_length"] - len(full) + len(own)
        if self._room < 0:
            return
        self._cache: dict = {}
        self.cached = True

    def _learn(self, words) -> None:
        """Tokenise words not in the cache (one batch) and keep their ids as int32 bytes."""
        words = set(words)
        new = words - self._cache.keys()
        if len(self._cache) + len(new) > CACHE_WORDS:
            self._cache.clear()  # (memory stays bounded; the words in use come back at once)
            new = words
        new = list(new)
        for lo in range(0, len(new), CHUNK):
            self._cache.update(self._tokenise_words(new[lo:lo + CHUNK]))

    def _tokenise_words(self, words: list):
        """(word, its ids as int32 bytes) for words without spaces: one encoding of the words
        joined by spaces (one call instead of one a word, ~8x faster), each token given to the
        word its character offsets fall in (a token never spans the space between two words
        of a word-local pipeline: the pre-tokeniser splits there)."""
        enc = self._plain.encode(" ".join(words), add_special_tokens=False)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        token_starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64,
                                   count=len(enc.offsets))
        owner = np.searchsorted(starts, token_starts, side="right") - 1
        ids = np.asarray(enc.ids, dtype="<i4")
        ends = np.cumsum(np.bincount(owner, minlength=len(words)))
        begins = np.concatenate([[0], ends[:-1]])
        return ((w, ids[b:e].tobytes()) for w, b, e in zip(words, begins.tolist(), ends.tolist()))

    def _assemble(self, texts: list) -> list:
        """Every text's ids (int32 bytes) from the word cache; a text is its first `room` words
        (each gives at least one token, or rarely none) between the special tokens."""
        room, head, tail = self._room, self._head, self._tail
        keep = 4 * room
        heads, longer, out, missed = [], [], [], []
        get = self._cache.__getitem__
        for i, text in enumerate(texts):
            words = text.split(" ", room)
            if len(words) > room:
                words.pop()
                longer.append(i)
            heads.append(words)
            try:
                out.append(head + b"".join(map(get, words))[:keep] + tail)
            except KeyError:
                out.append(None)
                missed.append(i)
        if missed:
            self._learn(chain.from_iterable(heads[i] for i in missed))
            get = self._cache.__getitem__
            for i in missed:
                out[i] = head + b"".join(map(get, heads[i]))[:keep] + tail
        # A longer text that its first words do not fill: the whole text decides.
        full = len(head) + keep + len(tail)
        again = [i for i in longer if len(out[i]) < full]
        if again:
            self.whole += len(again)
            for i, e in zip(again, self._batch([texts[i] for i in again], add_special_tokens=True)):
                out[i] = np.asarray(e.ids, dtype="<i4").tobytes()
        return out

    def _ids(self, texts: list) -> list:
        """Every text's ids as int32 bytes."""
        as_bytes = lambda ids: np.asarray(ids, dtype="<i4").tobytes()  # noqa: E731
        if not self.cached:
            return [as_bytes(e.ids) for e in self._batch(texts, add_special_tokens=True)]
        out = self._assemble(texts)
        if self.checked < CHECK_TEXTS:
            n = min(len(texts), CHECK_TEXTS - self.checked)
            truth = [as_bytes(e.ids) for e in self._batch(texts[:n], add_special_tokens=True)]
            self.checked += n
            if truth != out[:n]:
                self.cached = False
                warnings.warn("token store: the word cache disagrees with the tokenizer on this "
                              "tokenizer's texts; tokenising whole texts instead", stacklevel=2)
                return [as_bytes(e.ids) for e in self._batch(texts, add_special_tokens=True)]
        return out

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        lengths, parts = [], []
        for lo in range(0, len(texts), CHUNK):
            ids = self._ids(list(texts[lo:lo + CHUNK]))
            lengths.append(np.fromiter(map(len, ids), dtype=np.int32, count=len(ids)) // 4)
            parts.append(np.frombuffer(b"".join(ids), dtype="<i4").astype(np.int32))
        if not lengths:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(lengths), np.concatenate(parts)
