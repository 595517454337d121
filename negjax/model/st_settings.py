"""The JSON files of a Hugging Face / sentence-transformers model directory that are not the
model itself: the sentence-transformers pipeline (modules.json, the Pooling module's
config.json, Normalize, sentence_bert_config.json), its prompts, and where the Transformer
module lives. Read by `negjax.model.hf`."""

from __future__ import annotations

import json
from pathlib import Path

from negjax.errors import NegjaxError, file_error


def read_json(path: Path):
    """A JSON file; invalid JSON is an error naming the file and line."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise file_error(path, e.lineno, f"invalid JSON: {e.msg}") from None


def read_st_settings(model_dir: Path) -> tuple[str | None, bool | None, int | None]:
    """(pooling, normalize, max_seq_length) from sentence-transformers files, None if absent.

    Only Transformer -> Pooling (mean or CLS) -> Normalize pipelines are supported; any other
    module (Dense, max pooling, ...) would change the embeddings, so it is an error."""
    modules_path = model_dir / "modules.json"
    pooling = normalize = max_length = None
    if modules_path.is_file():
        modules = read_json(modules_path)
        if not isinstance(modules, list):
            raise file_error(modules_path, None, "expected a JSON list of modules")
        normalize = False
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
            if kind == "Transformer":
                continue
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pooling = _read_pooling(model_dir / m.get("path", "1_Pooling") / "config.json")
            else:
                raise file_error(modules_path, None, f"unsupported sentence-transformers module "
                                 f"{m.get('type') if isinstance(m, dict) else m!r}")
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        value = read_json(sbert).get("max_seq_length")
        max_length = int(value) if value else None
    return pooling, normalize, max_length


def _read_pooling(path: Path) -> str:
    if not path.is_file():
        raise NegjaxError(f"{path}: pooling config not found (named in modules.json)")
    cfg = read_json(path)
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if on == ["pooling_mode_mean_tokens"]:
        return "mean"
    if on == ["pooling_mode_cls_token"]:
        return "cls"
    if on == ["pooling_mode_lasttoken"]:
        return "last"
    raise file_error(path, None, f"unsupported pooling {on} (negjax supports mean, CLS or last token)")


def transformer_dir(model_dir: Path) -> Path:
    """Where config.json, the weights and the tokenizer live: the directory itself, or the
    Transformer module's subfolder of a sentence-transformers directory (e.g. 0_BERT/)."""
    modules_path = model_dir / "modules.json"
    if (model_dir / "config.json").is_file() or not modules_path.is_file():
        return model_dir
    modules = read_json(modules_path)
    for m in modules if isinstance(modules, list) else []:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("Transformer") and m.get("path"):
            return model_dir / m["path"]
    return model_dir


# sentence-transformers prompt names -> negjax towers
_PROMPT_NAMES = {"query": "query", "document": "doc", "passage": "doc", "doc": "doc"}


def read_st_prompts(model_dir: Path) -> dict:
    """{"query": str, "doc": str} from config_sentence_transformers.json's `prompts` (names
    'query' and 'document' / 'passage'); empty when absent."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    prompts = read_json(path).get("prompts") or {}
    if not isinstance(prompts, dict):
        raise file_error(path, None, "'prompts' must be an object of name -> text")
    out = {}
    for name, tower in _PROMPT_NAMES.items():
        if isinstance(prompts.get(name), str) and prompts[name] and tower not in out:
            out[tower] = prompts[name]
    return out
