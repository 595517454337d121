"""`negjax bench step|loss|mine|pipeline|data`: each benchmark lives in `negjax/bench/<name>.py` with
`add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

BENCHES = {
    "step": "training-step throughput: examples/s, tokens/s, MFU, breakdown",
    "loss": "time and peak memory of loss+gradients vs global batch (chunked / unchunked)",
    "mine": "ScaNN vs exact search: queries/s, recall@k, peak RSS (corpus sharded over --processes)",
    "pipeline": "input pipeline throughput: batches/s at a given batch size, lengths and H",
    "data": "a synthetic corpus of N documents; negjax train on it cold and warm: time to "
            "first step, build rate, peak RSS",
}


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmarks: step throughput, loss memory, mining speed")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from negjax.cli import import_if_present

    for name, help_text in BENCHES.items():
        module = import_if_present(f"negjax.bench.{name}")
        if module is None:
            continue
        bp = bsub.add_parser(name, help=help_text)
        module.add_arguments(bp)
        bp.set_defaults(_bench_run=module.run)
    return p


def run(args) -> int:
    return int(args._bench_run(args) or 0)
