"""One live `negjax train` per workdir: an exclusive `flock` on WORKDIR/.lock.

    lock = WorkdirLock(workdir).acquire()   # NegjaxError naming the holder when it is taken
    ...
    lock.release()

The kernel drops the lock when the holding process dies, however it dies (`kill -9`, OOM,
a lost node's processes ending), so a stale lock never blocks: the next run simply takes it
and overwrites the holder record (pid, host, start time) kept in the file for the error
message. The file itself stays in the workdir. Only process 0 of a multi-process job takes
it. A filesystem without flock support gives a warning and no protection.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from negjax.errors import NegjaxError, warn

LOCK_NAME = ".lock"


def _holder(fd: int) -> str:
    """'pid N on HOST since TIME' from the lock file ('pid unknown' when it cannot be read)."""
    for _ in range(20):  # the holder writes its record just after taking the lock
        raw = os.pread(fd, 4096, 0)
        if raw.strip():
            break
        time.sleep(0.05)
    try:
        rec = json.loads(raw)
        return (f"pid {rec['pid']} on {rec['host']} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rec['time']))}")
    except (ValueError, KeyError, TypeError):
        return "pid unknown"


class WorkdirLock:
    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = _holder(fd)
                os.close(fd)
                raise NegjaxError(f"{self.workdir}: in use by a running negjax train ({who}); "
                                  "wait for it to end or stop it, or use another workdir") from None
            os.close(fd)
            warn(f"{self.path}: cannot lock the workdir ({e.strerror}); nothing stops a second "
                 "run from using it at the same time")
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None
