#!/usr/bin/env python
"""Build negjax's built-in WordNet sense-retrieval dataset and its tokenizer.

    /work/venv/bin/python tools/build_wordnet.py                       # rebuild the shipped data
    /work/venv/bin/python tools/build_wordnet.py --src /usr/share/wordnet --out negjax/data/wordnet_data

Reads the WordNet 3.0 database files (Debian's `wordnet-base`: data.noun/verb/adj/adv) and writes
into `--out`:

  corpus.jsonl.gz     one document per synset: {"id": "n.00001740",
                      "text": "entity (noun): that which is perceived or known ..."}: the
                      lemmas, part of speech and definition, never the usage examples (no
                      "title": readers embed "title text", which would repeat the lemma)
  queries.jsonl.gz    one query per usage example: {"id": "q.v.00001740.0", "text": ...,
                      "pos": ["v.00001740"], "split": "train" | "dev" | "test"}
  LICENSE             WordNet 3.0 licence (it asks to ship the notice with every copy)
  manifest.json       source, counts, split rule, sha256 of every file written
  tokenizer/          a lower-cased WordPiece tokenizer (BERT layout) trained on the corpus
                      texts and the *train* queries only, loadable by AutoTokenizer

The split is a stable hash of the synset id (90/5/5), so every query of a synset lands in the
same split and dev/test synsets are never training positives (the few synsets whose documents
are the same text count as one, see build_dataset). Everything written is a pure
function of the WordNet files (sorted iteration, gzip mtime 0, single-threaded tokenizer
training), so a rebuild reproduces the shipped bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negjax.utils import atomic_path, stable_hash64  # noqa: E402

POS_FILES = ("noun", "verb", "adj", "adv")
POS_LETTER = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
SS_TYPE_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SPLIT_RULE = ("stable_hash64(synset_id) % 100: <90 train, <95 dev, else test; synsets with "
              "identical document text use the first id of their group")
MIN_EXAMPLE_WORDS = 2
MIN_EXAMPLE_CHARS = 8
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, [PAD] = 0

# Adjective lemmas may carry a syntactic marker: (a) attributive, (p) predicative, (ip) postnominal.
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# A definition piece that ends in a quoted example ("...: \"the range of a jet\"") -- unless the
# quote is a phrase the definition mentions ("as in the expression \"on the job\"").
_TRAILING_EXAMPLE = re.compile(r'^(.*?)([\s:,]*)"([^"]+)"?\s*$')
_MENTION = re.compile(r"(\bas in|\be\.g\.|\bi\.e\.|\bphrase|\bexpression|\bterm|\bword|\bas)\W*$", re.I)
_SPACES = re.compile(r"\s+")


def split_of(synset_id: str) -> str:
    """'train' | 'dev' | 'test' from a stable hash of the synset id (~90/5/5)."""
    bucket = stable_hash64(synset_id) % 100
    return "train" if bucket < 90 else "dev" if bucket < 95 else "test"


def _split_outside_quotes(text: str) -> list[str]:
    """Split on ';' except inside "..." (only called when the quotes are balanced)."""
    pieces, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            pieces.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    pieces.append("".join(cur))
    return pieces


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A WordNet gloss -> (definition, raw usage examples).

    The gloss is `definition; "example"; "example" - Author`. About 1% of glosses break the
    pattern (examples after ':' or ',', several quoted strings in one piece, ~20 with an
    unbalanced quote); those are handled so that no quoted example text stays in the definition
    unless the definition quotes a phrase itself (`as in the expression "on the job"`).
    """
    gloss = gloss.strip()
    balanced = gloss.count('"') % 2 == 0
    pieces = _split_outside_quotes(gloss) if balanced else gloss.split(";")
    definition, examples = [], []
    for i, piece in enumerate(pieces):
        piece = piece.strip()
        if not piece:
            continue
        is_example = piece.startswith('"') if balanced else (i > 0 and '"' in piece)
        if is_example:
            if balanced:  # quoted strings only: drops attributions such as `- Shakespeare`
                examples.extend(re.findall(r'"([^"]*)"', piece))
            else:  # stray quote: every quote-delimited fragment that is not an attribution
                examples.extend(f for f in piece.split('"') if f.strip() and not f.lstrip().startswith("-"))
            continue
        m = _TRAILING_EXAMPLE.match(piece) if piece.count('"') in (1, 2) else None
        if m and m.group(1).strip() and (":" in m.group(2) or not _MENTION.search(m.group(1))):
            piece = m.group(1)
            examples.append(m.group(3))
        if piece.count('"') % 2:  # an unmatched quote in a definition is a typo
            piece = piece.replace('"', "")
        definition.append(piece.strip())
    return "; ".join(d for d in definition if d), examples


def clean_example(text: str) -> str | None:
    """Normalise whitespace and stray quotes; None when too short to be a useful query."""
    text = _SPACES.sub(" ", text).strip().strip("\"'`").strip(" ;:,").strip()
    if len(text) < MIN_EXAMPLE_CHARS or len(text.split()) < MIN_EXAMPLE_WORDS:
        return None
    return text


def parse_data_line(line: str, pos_letter: str) -> dict:
    """One synset line of a WordNet `data.<pos>` file -> {id, lemmas, pos, definition, examples}.

    Line layout: offset lex_filenum ss_type w_cnt(hex) [word lex_id]* p_cnt [ptr]* [frames] | gloss
    """
    head, sep, gloss = line.partition("|")
    if not sep:
        raise ValueError("no '|' before the gloss")
    fields = head.split()
    offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
    lemmas: list[str] = []
    for k in range(w_cnt):
        word = _ADJ_MARKER.sub("", fields[4 + 2 * k]).replace("_", " ")
        if word.lower() not in {w.lower() for w in lemmas}:
            lemmas.append(word)
    definition, examples = split_gloss(gloss)
    return {"id": f"{pos_letter}.{offset}", "lemmas": lemmas, "pos": SS_TYPE_NAME[ss_type],
            "definition": definition, "examples": examples}


def read_synsets(src: Path) -> list[dict]:
    synsets = []
    for name in POS_FILES:
        path = src / f"data.{name}"
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  "):  # licence header
                    continue
                try:
                    synsets.append(parse_data_line(line, POS_LETTER[name]))
                except (ValueError, IndexError, KeyError) as e:
                    raise SystemExit(f"{path}:{lineno}: cannot parse synset line: {e}")
    synsets.sort(key=lambda s: s["id"])
    return synsets


def build_dataset(src: Path) -> tuple[list[dict], list[dict], dict]:
    """WordNet dir -> (docs, queries, drop counts). Docs and queries sorted by id.

    Texts are compared after `normalize_text` (NFKC, lower case, spaces), the project's notion
    of "the same text". Synsets whose documents are the same text (6 pairs, e.g. two senses of
    "repaint: paint again") cannot be told apart by any retriever: they form one group, every
    member is a positive of the group's queries, and the group is split by its first synset id.
    An example sentence that illustrates several synsets is one query with all of them as
    positives when they share a split, and is dropped otherwise, so no query text (and no
    positive) is shared between splits.
    """
    from negjax.data.formats import normalize_text

    synsets = read_synsets(src)
    docs, candidates = [], []
    dropped = {"short": 0, "in_positive_doc": 0, "duplicate_in_synset": 0, "cross_split": 0}
    for s in synsets:
        text = f"{', '.join(s['lemmas'])} ({s['pos']}): {s['definition']}"
        docs.append({"id": s["id"], "text": text})
        seen = set()
        for k, raw in enumerate(s["examples"]):
            q = clean_example(raw)
            if q is None:
                dropped["short"] += 1
            elif normalize_text(q) in normalize_text(text):
                dropped["in_positive_doc"] += 1
            elif normalize_text(q) in seen:
                dropped["duplicate_in_synset"] += 1
            else:
                seen.add(normalize_text(q))
                candidates.append((q, f"q.{s['id']}.{k}", s["id"]))

    same_text: dict[str, list[str]] = {}
    for d in docs:
        same_text.setdefault(normalize_text(d["text"]), []).append(d["id"])
    group = {sid: ids for ids in same_text.values() for sid in ids}  # sorted, as docs are
    doc_text = {d["id"]: normalize_text(d["text"]) for d in docs}

    by_text: dict[str, list[tuple[str, str, str]]] = {}
    for q, qid, sid in candidates:
        by_text.setdefault(normalize_text(q), []).append((qid, q, sid))
    queries = []
    for key, hits in by_text.items():
        pos = sorted({p for _, _, sid in hits for p in group[sid]})
        splits = {split_of(group[sid][0]) for _, _, sid in hits}
        if len(splits) > 1:
            dropped["cross_split"] += len(hits)
            continue
        if any(key in doc_text[p] for p in pos):
            dropped["in_positive_doc"] += len(hits)
            continue
        qid, q, _ = min(hits)
        queries.append({"id": qid, "text": q, "pos": pos, "split": splits.pop()})
    queries.sort(key=lambda r: r["id"])
    return docs, queries, dropped


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Deterministic gzip (mtime 0, no file name in the header)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                   compresslevel=9) as gz:
            with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A BERT-style lower-cased WordPiece tokenizer ([PAD]=0 [UNK] [CLS] [SEP] [MASK])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False,
                                        continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The trainer picks a stable token set, but ids of equally frequent tokens follow Rust
    # HashMap order and change between runs: renumber canonically (specials first, then sorted).
    learned = set(tok.get_vocab()) - set(SPECIAL_TOKENS)
    order = SPECIAL_TOKENS + sorted(learned, key=lambda t: (t.startswith("##"), t))
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(order)}, unk_token="[UNK]",
                                 max_input_chars_per_word=100, continuing_subword_prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (AutoTokenizer-loadable)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp), pretty=True)
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
              "do_lower_case": True, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
              "padding_side": "right", "truncation_side": "right", **specials}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with atomic_path(out / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_license(src: Path) -> str:
    """WordNet's licence text from the header of data.noun (every data file carries it)."""
    lines = []
    with open(src / "data.noun", encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                break
            m = re.match(r"\s*\d+ ?(.*)$", line)  # "  12 text of line 12  "
            lines.append(m.group(1).rstrip() if m else "")
    text = "\n".join(l.rstrip() for l in lines).strip()
    if "WordNet 3.0 Copyright" not in text:
        raise SystemExit(f"{src / 'data.noun'}: licence header not found")
    return text + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict dir")
    ap.add_argument("--out", type=Path, default=REPO / "negjax" / "data" / "wordnet_data")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--skip-tokenizer", action="store_true", help="rebuild the data files only")
    args = ap.parse_args(argv)
    docs, queries, dropped = build_dataset(args.src)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl_gz(args.out / "corpus.jsonl.gz", docs)
    _write_jsonl_gz(args.out / "queries.jsonl.gz", queries)
    with atomic_path(args.out / "LICENSE") as tmp:
        tmp.write_text("The negjax WordNet dataset (corpus.jsonl.gz, queries.jsonl.gz) and tokenizer "
                       "are derived from WordNet 3.0,\nused under the following licence:\n\n"
                       + read_license(args.src))
    if not args.skip_tokenizer:
        # One thread, so that the trainer's parallel counting cannot reorder anything.
        os.environ["RAYON_NUM_THREADS"] = "1"
        texts = [d["text"] for d in docs] + [q["text"] for q in queries if q["split"] == "train"]
        save_tokenizer(train_tokenizer(texts, args.vocab_size), args.out / "tokenizer")

    counts = {"corpus": len(docs)}
    for split in ("train", "dev", "test"):
        counts[split] = sum(q["split"] == split for q in queries)
        counts[f"{split}_qrels"] = sum(len(q["pos"]) for q in queries if q["split"] == split)
    files = sorted(p.relative_to(args.out).as_posix() for p in args.out.rglob("*")
                   if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    manifest = {"name": "wordnet-sense-retrieval", "source": "WordNet 3.0 (Debian wordnet-base)",
                "counts": counts, "dropped_examples": dropped, "split": SPLIT_RULE,
                "min_example": {"words": MIN_EXAMPLE_WORDS, "chars": MIN_EXAMPLE_CHARS},
                "tokenizer_vocab_size": args.vocab_size,
                "files": {name: _sha256(args.out / name) for name in files}}
    with atomic_path(args.out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"counts": counts, "dropped_examples": dropped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
