"""Small shared helpers: atomic writes, hashing, progress and log lines."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or exception leaves no file under the final name that a later step could mistake
    for complete output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_npy(path: str | os.PathLike, arr) -> None:
    """`np.save` to `path` atomically (`atomic_path`)."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    """`np.savez` of `arrays` to `path` atomically (`atomic_path`)."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir, else $NEGJAX_CACHE, else ~/.cache/negjax (token stores, the exported
    WordNet data, the unpacked MiniLM)."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("NEGJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "negjax"


def stable_hash64(text: str) -> int:
    """A stable signed 63-bit hash of a string (same on every run, host and Python version)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool | None = None,
             initial: int = 0):
    """Progress of long work on stderr: a tqdm bar on a terminal; elsewhere (a pod's log file,
    a pipe) one line about every NEGJAX_PROGRESS_EVERY seconds (default 30) with the count,
    rate and ETA (`LineProgress`). NEGJAX_PROGRESS=1 forces the bar, 0 silences both;
    `disable=True` silences this one (e.g. on processes other than 0); `initial`: units already
    done (a resumed run), not counted in the rate."""
    forced = os.environ.get("NEGJAX_PROGRESS")
    if disable or forced == "0":
        disable = True
    elif forced != "1" and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=bool(disable), initial=initial,
                dynamic_ncols=True)


_IMPORTED = __import__("time").time()


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since negjax loaded)."""
    import time

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def log(msg: str, *, every_process: bool = False) -> None:
    """One line on stderr, flushed at once (a pod's log is a file, read while the job runs).
    In a multi-process job only process 0 writes, unless `every_process`; the others then
    end the line with "[process i]"."""
    jax = sys.modules.get("jax")  # never import jax here: single process if it is not loaded
    pi = jax.process_index() if jax is not None and jax.process_count() > 1 else 0
    if pi and not every_process:
        return
    print(f"{msg} [process {pi}]" if pi else msg, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineProgress:
    """The part of tqdm's interface negjax uses (iterate, `update`, `set_postfix`, `close`, a
    context manager), written as plain lines for logs:

        negjax: tokenise docs: 120,000/1,000,000 text (12%), 4,012 text/s, ETA 3m39s

    A line when the first update comes, then at most one per NEGJAX_PROGRESS_EVERY seconds,
    and a last one with the total time when closed."""

    def __init__(self, iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0):
        import time

        try:
            self.every = max(0.0, float(os.environ.get("NEGJAX_PROGRESS_EVERY", "30")))
        except ValueError:
            self.every = 30.0
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial, self.postfix = total, initial, initial, ""
        self._start = time.monotonic()
        self._last: float | None = None
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self, done: bool = False) -> str:
        import time

        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        count = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f}%)"
        tail = (f", {'finished in' if self.n == self.total else 'stopped after'} "
                f"{_duration(elapsed)}" if done else
                f", ETA {_duration((self.total - self.n) / rate)}" if self.total and rate > 0 else "")
        post = f", {self.postfix}" if self.postfix else ""
        speed = f"{rate:,.2f}" if rate < 10 else f"{rate:,.0f}"
        return f"negjax: {self.desc}: {count}, {speed} {self.unit}/s{tail}{post}"

    def update(self, n: int = 1) -> None:
        import time

        self.n += n
        now = time.monotonic()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            print(self._line(), file=sys.stderr, flush=True)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._last is not None:  # something was reported: say how it ended
                print(self._line(done=True), file=sys.stderr, flush=True)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size, so a later
    `process_memory_bytes("VmHWM")` is the peak since now (Linux >= 4.0); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_memory_bytes(field: str = "VmHWM") -> int | None:
    """This process's memory from /proc/self/status (Linux): 'VmHWM' = peak resident set,
    'VmRSS' = current. Where that is unavailable, the peak from getrusage (KiB on Linux,
    bytes on macOS) for 'VmHWM', else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field != "VmHWM":
        return None
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---------------------------------------------------------------------------------------------
# Third-party log lines
# ---------------------------------------------------------------------------------------------

_VERBOSE = False


def set_verbose(on: bool) -> None:
    """`--verbose`: show third-party log lines (ScaNN's C++ absl logging, absl/orbax/jax
    Python logging at INFO). Off: only warnings and errors from Python loggers, and the
    native lines of a quiet block only when it fails."""
    import logging

    global _VERBOSE
    _VERBOSE = bool(on)
    level = logging.INFO if on else logging.WARNING
    for name in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(name).setLevel(level)


@contextmanager
def quiet_native_logs():
    """Silence what native code writes to file descriptor 2 inside the block (ScaNN logs
    `I0000 ... partitioner_factory_base.cc` lines through its own copy of absl, which no
    Python setting reaches). The lines are replayed if the block raises, or always with
    `--verbose`. Python's own `sys.stderr` writes are unaffected (flushed before)."""
    if _VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()
