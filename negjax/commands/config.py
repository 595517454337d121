"""`negjax config show --config F [--set k=v ...]`: print the resolved config as TOML."""

from __future__ import annotations


def add_parser(sub):
    from negjax.cli import add_config_args

    p = sub.add_parser("config", help="show the resolved config or list every key")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults <- file <- --set)")
    add_config_args(show)
    csub.add_parser("keys", help="list every config key with its default and documentation")
    return p


def run(args) -> int:
    from negjax import config

    if args.config_command == "keys":
        for key, default, doc in config.describe_keys():
            print(f"{key} = {default}\n    {doc}")
        return 0
    cfg = config.load_config(args.config, args.overrides)
    print(config.to_toml(cfg), end="")
    return 0
