"""JAX's persistent compilation cache, on by default, and what compiling cost.

    compile_cache.enable()             # after jax.distributed.initialize, before compiling
    stats = compile_cache.stats()      # {"hits", "misses", "compile_s"} since start-up

A restarted (preempted, resumed) run then loads its compiled programs instead of compiling
them again: the train step, evaluation's and mining's encoders. Where: `NEGJAX_COMPILE_CACHE`
(a path, or `off`), else `<negjax cache>/jax-compile` (`NEGJAX_CACHE`, ~/.cache/negjax). On a
pod point it at a shared filesystem so every host reads what process 0 compiled once.

Only process 0 writes (JAX itself skips the write on every other process: they compile the
same programs, and concurrent writers to one key gain nothing); all read. Programs that
compile in under `MIN_COMPILE_S` are not written.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

MIN_COMPILE_S = 0.1
_ENV = "NEGJAX_COMPILE_CACHE"
_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0, "compile_s": 0.0}
_listening = False
_enabled: Path | None = None


def cache_path(setting: str | None = None) -> Path | None:
    """The cache directory for `setting` (a path, '' = default, 'off' = none), else the
    environment's choice, else the default under the negjax cache."""
    from negjax.utils import default_cache_dir

    value = setting if setting else os.environ.get(_ENV, "")
    if value.strip().lower() in ("off", "0", "false", "none"):
        return None
    return Path(value).expanduser() if value else default_cache_dir() / "jax-compile"


def enable(setting: str | None = None) -> Path | None:
    """Turn the persistent cache on (see the module docstring); returns its directory, or
    None when it is off. Idempotent. Starts counting hits, misses and compile time."""
    global _enabled
    import jax

    _listen()
    path = cache_path(setting)
    if path is None or _enabled == path:
        return path
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    return path


def _listen() -> None:
    global _listening
    if _listening:
        return
    from jax import monitoring

    def on_event(event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            with _lock:
                _counts["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            with _lock:
                _counts["misses"] += 1

    def on_duration(event: str, duration: float, **_):
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/core/compile/jaxpr_to_mlir_module_duration",
                     "/jax/core/compile/jaxpr_trace_duration"):
            with _lock:
                _counts["compile_s"] += duration

    monitoring.register_event_listener(on_event)
    monitoring.register_event_duration_secs_listener(on_duration)
    _listening = True


def stats() -> dict:
    """{"hits", "misses", "compile_s"} since start-up (compile_s: tracing, lowering and
    XLA compiling, a cache hit's load included)."""
    with _lock:
        return dict(_counts)


def describe(before: dict | None = None) -> str:
    """'3.2 s compiling, persistent cache 2 hits / 1 miss' since `before` (a `stats()`)."""
    now = stats()
    if before:
        now = {k: now[k] - before.get(k, 0) for k in now}
    if _enabled is None:
        cache = "persistent cache off"
    else:
        cache = (f"persistent cache {now['hits']} hit{'s' * (now['hits'] != 1)} / "
                 f"{now['misses']} miss{'es' * (now['misses'] != 1)}")
    return f"{now['compile_s']:.1f} s compiling, {cache}"
