"""The `negjax` command. Each subcommand lives in `negjax/commands/<name>.py` with
`add_parser(subparsers)` and `run(args) -> int`; heavy imports (jax, transformers) happen
inside `run`, so `negjax --help` is instant.

User errors (`NegjaxError`) print one line on stderr and exit with status 2. Third-party log
lines (ScaNN's absl output, absl/orbax INFO logging) are hidden unless `--verbose`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from negjax import __version__
from negjax.errors import NegjaxDeprecationWarning, NegjaxError, NegjaxWarning, warn_deprecated

# Order is the order shown by --help. A module that does not exist yet is simply not listed.
COMMANDS = ["quickstart", "train", "mine", "eval", "encode", "export", "bench", "data", "config",
            "cache"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: one line, exit 2
        raise NegjaxError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="negjax", description="Dense-retriever training in JAX: global in-batch "
                     "negatives and offline-mined hard negatives.")
    parser.add_argument("--version", action="version", version=f"negjax {__version__}")
    _add_verbose(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = import_if_present(f"negjax.commands.{name}")
        if module is None:
            continue
        p = module.add_parser(sub)
        _add_verbose(p)
        p.set_defaults(_run=module.run)
    return parser


def import_if_present(name: str):
    """The module `name`, or None when it does not exist (a subcommand not built yet); an
    import error inside an existing module propagates."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show third-party log lines (ScaNN, absl, orbax, jax)")


class _DeprecatedFlag(argparse.Action):
    """An old flag name: stores into the new flag's dest and warns."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(f"flag {option_string}", self.new)
        setattr(namespace, self.dest, values)


def add_renamed_flag(p, old: str, new: str, **kw) -> None:
    """Accept `old` (hidden from --help, with a deprecation warning) for the flag `new`."""
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_DeprecatedFlag, new=new,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, (NegjaxDeprecationWarning, NegjaxWarning)):
        print(f"negjax: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config FILE and repeated --set section.key=value."""
    p.add_argument("--config", required=required, help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    from negjax.utils import set_verbose

    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        set_verbose(getattr(args, "verbose", False))
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except NegjaxError as e:
        msg = str(e).splitlines()[0] if str(e) else "error"
        print(f"negjax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("negjax: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `negjax` process (console script, `python -m negjax`). negjax never uses PyTorch,
    but libraries it loads import all of it when it is installed (transformers to load a
    tokenizer, tensorboardX), ~460 MB resident and ~1.6 s in every process: the process
    marks it absent (a None in `sys.modules`: `import torch` raises ImportError and
    `find_spec` finds nothing), which those libraries handle."""
    sys.modules.setdefault("torch", None)
    sys.exit(main())


if __name__ == "__main__":
    entry()
