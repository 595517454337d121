"""What the negjax cache (`NEGJAX_CACHE`, default ~/.cache/negjax) holds, and which of it can
go: `negjax cache` lists it, `negjax cache clean` removes what no job can use again.

    tokens/docs-KEY, tokens/train-KEY  token stores and prepared training data; KEY hashes the
                                       inputs' fingerprints (path, size, mtime), so a store whose
                                       inputs changed or are gone is never found again: stale
    tokens/.NAME.by-HOST-PID.RND.tmp   a store being built (RND: mkdtemp's letters); abandoned once its builder is dead
                                       (same host) or it is older than `ABANDONED_AFTER_S`
    digests/KEY.json                   inputs' sha256s by fingerprint (mining): stale alike
    jax-compile/                       the persistent compilation cache (JAX's files)
    models/all-MiniLM-L6-v2-SIZE-MTIME the unpacked packaged MiniLM (one per installed version)
    wordnet-VERSION/                   the exported built-in data

Removal renames an entry to a hidden name first, then deletes it: a job that opens the cache
meanwhile finds an entry whole or not at all. Stale and abandoned entries are by construction
not found by any job, so cleaning them is safe while jobs run; `--all` is not. Inputs are
looked up at the paths recorded when the store was built: on a cache shared by hosts,
clean from a host that sees every input (a host-local input looks gone elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

ABANDONED_AFTER_S = 24 * 3600  # a temporary entry of another host (or an unknown builder)


@dataclass
class Entry:
    path: Path
    kind: str        # 'token store', 'training data', 'digest', 'compile cache', 'model', ...
    bytes: int
    status: str      # 'ok', 'stale', 'abandoned' or 'building'
    why: str = ""


def builder_tag() -> str:
    """`by-HOST-PID`: put into a temporary build directory's name (`build_into`), so `scan` can
    tell a build in progress from one whose process died."""
    return f"by-{socket.gethostname()}-{os.getpid()}"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _read_json(path: Path) -> dict | None:
    try:
        got = json.loads(path.read_text())
        return got if isinstance(got, dict) else None
    except (OSError, ValueError):
        return None


def _fingerprint_changed(fp) -> str:
    """'' when the files of fingerprint `fp` ([[path, size, mtime_ns], ...]) are unchanged,
    else what changed."""
    for path, size, mtime_ns in fp:
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is gone"
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return f"{path} changed"
    return ""


_TAG = re.compile(r"\.by-(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _temporary(path: Path, now: float) -> Entry:
    """A hidden temporary entry: a build (`.NAME.by-HOST-PID.RND.tmp`), an atomic write, or
    a removal that was interrupted (`.removing.*`)."""
    age = now - path.lstat().st_mtime
    m = _TAG.search(path.name)
    status, why = "abandoned", "left by a write that did not finish"
    if path.name.startswith(".removing."):
        why = "an interrupted removal"
    elif m and m["host"] == socket.gethostname():
        try:
            os.kill(int(m["pid"]), 0)
            status, why = "building", f"process {m['pid']} is writing it"
        except ProcessLookupError:
            why = f"its writer (process {m['pid']}) is gone"
        except PermissionError:  # alive, another user's
            status, why = "building", f"process {m['pid']} is writing it"
    elif age < ABANDONED_AFTER_S:
        who = f"host {m['host']}" if m else "a writer"
        status, why = "building", f"{who} started it {age / 3600:.1f} h ago"
    return Entry(path, "temporary", _size(path), status, why)


def _token_entry(path: Path, root: Path) -> Entry:
    meta = _read_json(path / "meta.json")
    kind = "training data" if path.name.startswith("train-") else "token store"
    if meta is None:
        return Entry(path, kind, _size(path), "stale", "no readable meta.json (incomplete)")
    if kind == "training data":
        for name, fp in (meta.get("inputs") or {}).items():
            why = _fingerprint_changed(fp) if fp else ""
            if why:
                return Entry(path, kind, _size(path), "stale", f"{name}: {why}")
        docs = meta.get("docs")
        if docs and not (root / docs / "meta.json").is_file():
            return Entry(path, kind, _size(path), "stale", f"its document store {docs} is gone")
        return Entry(path, kind, _size(path), "ok")
    if meta.get("inputs"):
        why = _fingerprint_changed(meta["inputs"])
    else:  # built before stores recorded their inputs: only a missing source is known stale
        source = meta.get("source")
        why = f"{source} is gone" if source and not Path(source).exists() else ""
    return Entry(path, kind, _size(path), "stale" if why else "ok", why)


def _current_model_name() -> str | None:
    from negjax.model.packaged import minilm_dir_name

    try:
        return minilm_dir_name()
    except Exception:  # the package is not installed: nothing to compare with
        return None


def scan(root) -> list[Entry]:
    """Every entry of the cache at `root`, with its size and status."""
    root = Path(root)
    now = time.time()
    out: list[Entry] = []
    if not root.is_dir():
        return out
    tokens = root / "tokens"
    if tokens.is_dir():
        for p in sorted(tokens.iterdir()):
            if p.name.startswith("."):
                out.append(_temporary(p, now))
            elif p.is_dir():
                out.append(_token_entry(p, tokens))
    digests = root / "digests"
    if digests.is_dir():
        for p in sorted(digests.iterdir()):
            if p.name.startswith("."):
                out.append(_temporary(p, now))
                continue
            memo = _read_json(p)
            why = "unreadable" if memo is None else _fingerprint_changed(memo.get("fingerprint") or [])
            out.append(Entry(p, "digest", _size(p), "stale" if why else "ok", why))
    if (root / "jax-compile").is_dir():
        out.append(Entry(root / "jax-compile", "compile cache", _size(root / "jax-compile"), "ok"))
    models = root / "models"
    if models.is_dir():
        current = _current_model_name()
        for p in sorted(models.iterdir()):
            if p.name.startswith("."):
                out.append(_temporary(p, now))
            else:  # another version may be another environment's: `--all` removes it
                out.append(Entry(p, "model", _size(p), "ok", "" if p.name == current else
                                 "not this environment's version"))
    for p in sorted(root.glob("wordnet-*")):
        out.append(Entry(p, "built-in data", _size(p), "ok"))
    return out


def remove(entry: Entry) -> None:
    """Delete an entry: renamed to a hidden name first (it vanishes at once), then removed."""
    path = entry.path
    gone = path.with_name(f".removing.{path.name}.{os.getpid()}")
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return
    if gone.is_dir():
        shutil.rmtree(gone, ignore_errors=True)
    else:
        gone.unlink(missing_ok=True)
