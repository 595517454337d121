"""The one exception type for errors a user can cause (bad file, flag, config, model dir).

The CLI turns a `NegjaxError` into a single line on stderr and exit status 2. Messages say
what is wrong and where (file and line, config key, tensor name) and, when it helps, what to
do about it.
"""


class NegjaxError(Exception):
    """A user-facing error: bad input file, bad flag, bad config value, broken model dir."""


def file_error(path, line: int | None, msg: str) -> NegjaxError:
    """A `NegjaxError` that names the file (and line, 1-based) it is about."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return NegjaxError(f"{where}: {msg}")
