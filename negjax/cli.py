"""The `negjax` command. Each subcommand lives in `negjax/commands/<name>.py` with
`add_parser(subparsers)` and `run(args) -> int`; heavy imports (jax, transformers) happen
inside `run`, so `negjax --help` is instant.

User errors (`NegjaxError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from negjax import __version__
from negjax.errors import NegjaxError

# Order is the order shown by --help. A module that does not exist yet is simply not listed.
COMMANDS = ["quickstart", "train", "mine", "eval", "encode", "export", "bench", "data", "config"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: one line, exit 2
        raise NegjaxError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="negjax", description="Dense-retriever training in JAX: global in-batch "
                     "negatives and offline-mined hard negatives.")
    parser.add_argument("--version", action="version", version=f"negjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"negjax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"negjax.commands.{name}":
                continue
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config FILE and repeated --set section.key=value."""
    p.add_argument("--config", required=required, help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
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
    sys.exit(main())


if __name__ == "__main__":
    entry()
