"""Fault injection for tests, from the outside: run the negjax CLI in this process and make it
SIGKILL itself at a known point (a real `kill -9`, nothing in negjax reads a test hook).

    python tests/faults.py doc:2 mine --model tiny ...     # killed after its 2nd doc chunk
    python tests/faults.py shard:2 mine ...                # killed after its 2nd shard

    python tests/faults.py step:25 train --config ...      # kill -9 after its 25th step
    python tests/faults.py term:13 train --config ...      # SIGTERM (preemption) after it

STAGE is 'doc' or 'query' (embedding chunks written by `negjax.mining.embeddings.save_chunk`)
'search' (a block of candidates saved by the mining job's search) or 'shard'
(`negjax.data.shards.ShardWriter.write`); N counts this run's writes. 'step' and 'term' count
the training steps (the step number, a resumed run's included): the signal is sent once the
step's result is ready. In a multi-process job give the prefix to one process only.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _kill_after(stage: str, n: int) -> None:
    from negjax.data import shards
    from negjax.mining import embeddings

    count = [0]

    def tick():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if stage in ("doc", "query"):
        save = embeddings.save_chunk

        def save_chunk(path, emb, *args, **kwargs):
            save(path, emb, *args, **kwargs)
            if Path(path).parent.name.startswith(f"{stage}-"):
                tick()
        embeddings.save_chunk = save_chunk
    elif stage == "search":
        from negjax.mining import job

        save_cand = job.save_candidates

        def save_candidates(path, cand):
            save_cand(path, cand)
            tick()
        job.save_candidates = save_candidates
    elif stage == "shard":
        write = shards.ShardWriter.write

        def write_shard(self, *args, **kwargs):
            out = write(self, *args, **kwargs)
            tick()
            return out
        shards.ShardWriter.write = write_shard
    elif stage in ("step", "term"):
        from negjax.train import loop

        make = loop.make_train_step
        sig = signal.SIGKILL if stage == "step" else signal.SIGTERM

        def make_train_step(*args, **kwargs):
            step_fn = make(*args, **kwargs)

            def faulty(state, batch):
                state, metrics = step_fn(state, batch)
                if int(state.step.addressable_data(0)) == n:  # waits for the step to end
                    os.kill(os.getpid(), sig)
                return state, metrics
            return faulty
        loop.make_train_step = make_train_step
    else:
        raise SystemExit(f"faults.py: unknown stage {stage!r}")


if __name__ == "__main__":
    stage, n = sys.argv[1].split(":")
    _kill_after(stage, int(n))
    from negjax.cli import main

    sys.exit(main(sys.argv[2:]))
