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


class NegjaxWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as
    one `negjax: warning: ...` line), e.g. a damaged checkpoint skipped on resume."""


def warn(msg: str) -> None:
    import warnings

    warnings.warn(msg, NegjaxWarning, stacklevel=2)


class NegjaxDeprecationWarning(FutureWarning):
    """A renamed config key or flag was used (shown by default, unlike DeprecationWarning)."""


def warn_deprecated(old: str, new: str, until: str = "0.3") -> None:
    """Warn once per call site that `old` is deprecated in favour of `new`."""
    import warnings

    warnings.warn(f"{old} is deprecated and will be removed in negjax {until}: use {new}",
                  NegjaxDeprecationWarning, stacklevel=3)
