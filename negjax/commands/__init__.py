"""One module per `negjax` subcommand: `add_parser(subparsers)` and `run(args) -> int`."""
