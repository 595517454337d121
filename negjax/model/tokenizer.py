"""Tokenizers (Hugging Face fast tokenizers via transformers) and padding to token arrays.

Token arrays follow the project contract: `tokens [N, L] int32`, `mask [N, L] int32`
(1 = real token); token type ids are always zero and never passed around.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from negjax.errors import NegjaxError

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def _generic_class(path: Path) -> bool:
    """tokenizer_config.json names the generic fast tokenizer (and tokenizer.json exists)."""
    import json

    config = path / "tokenizer_config.json"
    if not (config.is_file() and (path / "tokenizer.json").is_file()):
        return False
    try:
        cls = json.loads(config.read_text()).get("tokenizer_class")
    except (ValueError, AttributeError):
        return False
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """A `transformers` fast tokenizer from a directory holding tokenizer.json (or vocab.txt).

    Uses `AutoTokenizer` (which reads tokenizer_config.json when present); a directory with
    only tokenizer.json falls back to `PreTrainedTokenizerFast` over that file.
    """
    # negjax runs without PyTorch by design; transformers' "PyTorch was not found" advice at
    # import time would only confuse (an advisory, so this silences nothing else).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise NegjaxError(f"{path}: tokenizer directory not found")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise NegjaxError(f"{path}: no tokenizer.json (or vocab.txt) in the directory")
    try:
        if _generic_class(path):
            # A generic tokenizers-backed tokenizer (what transformers 5 saves for any
            # tokenizer.json): load that file as it is. AutoTokenizer would pick the class of
            # config.json's model_type instead and, e.g. for 'qwen2', rebuild a BPE from the
            # vocabulary (other ids, an extra token).
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if not (path / "tokenizer.json").is_file():
            raise NegjaxError(f"{path}: cannot load tokenizer: {e}") from None
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    for key in ("local_files_only", "is_local"):  # load-time flags, not worth re-exporting
        tok.init_kwargs.pop(key, None)
    if not getattr(tok, "is_fast", False):
        raise NegjaxError(f"{path}: tokenizer is not a fast (tokenizers) tokenizer")
    if tok.pad_token_id is None:
        raise NegjaxError(f"{path}: tokenizer has no padding token ([PAD])")
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Texts -> token id lists with [CLS]/[SEP], truncated to `max_length` tokens (unpadded)."""
    if not texts:
        return []
    out = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                    add_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False)
    return out["input_ids"]


def pad_ids(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (tokens [N, length] int32, mask [N, length] int32), right-padded.

    Rows longer than `length` are cut (callers truncate with the tokenizer first, which keeps
    the final [SEP]).
    """
    tokens = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        n = min(len(row), length)
        tokens[i, :n] = row[:n]
        mask[i, :n] = 1
    return tokens, mask


def tokenize_padded(tokenizer, texts: Sequence[str], max_length: int,
                    length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (tokens, mask) [N, length or max_length] int32."""
    return pad_ids(tokenize(tokenizer, texts, max_length), length or max_length, tokenizer.pad_token_id)
