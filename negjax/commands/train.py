"""`negjax train --config F.toml [--set k=v ...]`: train (or resume) a retriever."""

from __future__ import annotations

from negjax.utils import log


def add_parser(sub):
    from negjax.cli import add_config_args

    p = sub.add_parser("train", help="train a retriever (resumes from the workdir's latest checkpoint)")
    add_config_args(p, required=True)
    p.add_argument("--workdir", help="shortcut for --set workdir=DIR")
    return p


def run(args) -> int:

    from negjax.config import load_config

    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f'workdir="{args.workdir}"')
    cfg = load_config(args.config, overrides)
    from negjax.train.loop import train

    summary = train(cfg)
    import jax

    line = (f"negjax train: {summary['status']} at step {summary['step']} (mesh "
            f"{summary['mesh']}); workdir {summary['workdir']}")
    if jax.process_index() == 0:
        def metrics(ev):
            return "  ".join(f"{k}={v:.4f}" for k, v in ev.items() if k != "queries")
        evs = metrics(summary.get("eval") or {})
        per = summary.get("eval_sources") or {}
        if per:  # with [[data.sources]]: each source's dev set, then their macro average
            evs = "".join(f"\n    {name}: {metrics(ev)}" for name, ev in per.items()) + \
                f"\n    macro average: {evs}"
        print(line + (f"\n  dev: {evs}" if evs else ""))
    else:  # every host's log says where it stopped (all stop at the same step)
        log(line, every_process=True)
    return 0
