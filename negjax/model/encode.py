"""Batch inference: texts (or token rows) -> embeddings [N, D] float32, in input order.

Each row goes to the smallest of a few bucket lengths (powers of two up to the max length)
that holds it; rows are sorted by length and cut into batches that never mix buckets, so
padding waste stays low and only one program per bucket is compiled. A batch is padded to a
multiple of the local device count and split over a `Mesh` with axis 'data'; params are
replicated. Batches are dispatched ahead of reading results back so that host work
(padding, copies) overlaps device work.

On each device the program runs the encoder over its rows in micro-batches of
`micro_rows(L)` rows (about `MICRO_TOKENS` tokens; a `fori_loop`). On the CPU this is ~20%
cheaper than one pass over a large per-device batch: the activations of a micro-batch stay
in cache and its buffers are reused from one micro-batch to the next, where a [256, 128]
batch allocates (and page-faults) 100 MB intermediates per layer.

Reproducibility: a row's embedding depends on its own tokens, its bucket and the shape of its
micro-batch, not on which other rows share its batch (checked on CPU: any order, any split of
the input). The micro-batch shape is a function of the bucket and the per-device batch;
`rows_per_device` fixes the latter, so the result does not depend on the local device count
either; `encode_across_processes` uses it to split an encode over the processes of a
multi-process job with the result of a one-process run on as many devices.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from negjax.model.tokenizer import pad_ids, tokenize
from negjax.utils import progress

MIN_BUCKET = 16
# Tokens per micro-batch (rows x bucket length), at least 2 rows. MiniLM, CPU time per token
# on 2 AVX-512 cores (experiments/encode_micro_batch.py; experiments/bench/README.md): at
# L=128 512 tokens are the cheapest (1.16x cheaper than 4,096 and 1.36x than 16,384 tokens);
# at L=512 2 rows are 1.33x cheaper than 1 and 1.16x than 32.
MICRO_TOKENS = 512


def bucket_lengths(max_length: int, min_length: int = MIN_BUCKET) -> list[int]:
    """Powers of two from `min_length` below `max_length`, then `max_length` itself."""
    out, n = [], min_length
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices, axis 'data' (Explicit, like `jax.make_mesh`)."""
    return Mesh(np.array(jax.local_devices()), ("data",), axis_types=(AxisType.Explicit,))


def _addressable(x):
    """A params leaf this process can place on its own devices. A multi-process global array
    (training params) becomes a local copy: its local shard when replicated, otherwise an
    all-gather (a collective: then every process must call the encode function)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return x.addressable_data(0)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x


def rows_per_device(batch_size: int) -> int:
    """Rows per device of a `batch_size`-text batch spread over every device of the job (all
    processes): the fixed per-device batch that makes an encode independent of how its rows
    are split over processes (`encode_across_processes`, the mining job's chunks)."""
    return max(1, math.ceil(int(batch_size) / jax.device_count()))


def micro_rows(length: int, per_device: int) -> int:
    """Rows of one micro-batch at bucket length `length` for a `per_device`-row batch: about
    `MICRO_TOKENS` tokens but at least 2 rows, and at most `per_device`."""
    return max(1, min(int(per_device), max(2, MICRO_TOKENS // int(length))))


def _micro_encode(enc, tower: str, mesh: Mesh, rows: int):
    """jit of (params, tokens, mask [n, L] and counts [devices] int32, sharded over 'data') ->
    [n, D]: each device encodes the first `counts[d]` of its micro-batches of `rows` rows, one
    after the other (its row count is a multiple of `rows`; the rows of micro-batches it skips
    come back as zeros). One per encoder, tower, mesh and micro-batch size, so repeated
    encodes reuse compiled programs."""
    key = ("micro", tower, mesh, rows)
    if key not in enc._jitted:
        def local(params, tokens, mask, count):
            n, length = tokens.shape
            tokens = tokens.reshape(n // rows, rows, length)
            mask = mask.reshape(n // rows, rows, length)

            def one(i, out):
                return out.at[i].set(enc.encode(params, tokens[i], mask[i], tower=tower))

            # Varying over 'data' like the loop's results (a shard_map carry keeps one type).
            out = jax.lax.pcast(jnp.zeros((n // rows, rows, enc.dim), jnp.float32), ("data",),
                                to="varying")
            return jax.lax.fori_loop(0, count[0], one, out).reshape(n, enc.dim)

        enc._jitted[key] = jax.jit(jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=P("data")))
    return enc._jitted[key]


def _run_batches(enc, params, lengths: np.ndarray, rows: Callable[[np.ndarray, int], tuple],
                 *, tower: str, batch_size: int, buckets: Sequence[int], desc: str,
                 per_device: int | None = None) -> np.ndarray:
    """The shared loop: `rows(indices, L)` -> (tokens, mask) [len(indices), L] int32.
    `per_device`: rows per device of a batch (None: `batch_size` over the local devices, or
    fewer for a short input), rounded up to whole micro-batches (`micro_rows`)."""
    n = len(lengths)
    out = np.zeros((n, enc.dim), np.float32)
    if n == 0:
        return out
    mesh = local_mesh()
    ndev = mesh.devices.size
    # Rows per device of a batch; the micro-batch at each bucket follows from it.
    pd = int(per_device) if per_device else -(-min(batch_size, n) // ndev)
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    one = jax.device_put(jax.tree.map(_addressable, enc.tower_params(params, tower)), replicated)
    layout = {"encoder": one} if enc.tied_towers else {tower: one}

    buckets = np.asarray(sorted(set(buckets)))
    # Each row's bucket depends on its own length only, and a batch never mixes buckets.
    row_bucket = buckets[np.minimum(np.searchsorted(buckets, lengths), len(buckets) - 1)]
    order = np.lexsort((-lengths, -row_bucket))  # longest bucket first, longest rows first
    sorted_neg = -row_bucket[order]
    batches = []  # (row indices, bucket length, micro-batch rows, micro-batches per device)
    for b in buckets[::-1]:
        lo, hi = np.searchsorted(sorted_neg, -b), np.searchsorted(sorted_neg, -b, side="right")
        micro = micro_rows(int(b), pd)
        steps = -(-pd // micro)
        bs = steps * micro * ndev
        batches += [(order[s:min(s + bs, hi)], int(b), micro, steps)
                    for s in range(int(lo), int(hi), bs)]
    pending: deque = deque()
    bar = progress(total=n, desc=desc, unit="text")

    def drain(limit):
        while len(pending) > limit:
            idx, slots, result = pending.popleft()
            out[idx] = np.asarray(result)[slots]
            bar.update(len(idx))

    # Our own mesh as the context, whatever mesh the caller (a training loop) has set.
    with jax.set_mesh(mesh):
        for idx, length, micro, steps in batches:
            step = _micro_encode(enc, tower, mesh, micro)
            # Micro-batch g of this batch goes to device g % ndev, so a short batch (the last
            # of a bucket) keeps every device busy; devices skip the micro-batches left empty.
            g = np.arange(len(idx)) // micro
            slots = (g % ndev) * steps * micro + (g // ndev) * micro + np.arange(len(idx)) % micro
            used = -(-len(idx) // micro)
            counts = np.array([(used - d + ndev - 1) // ndev for d in range(ndev)], np.int32)
            bs = steps * micro * ndev
            tokens = np.full((bs, length), enc.config.pad_token_id, np.int32)
            mask = np.zeros((bs, length), np.int32)
            mask[:, 0] = 1  # filler rows: one real token, so nothing divides by zero
            tokens[slots], mask[slots] = rows(idx, length)
            t, m, c = jax.device_put((tokens, mask, counts), data)
            pending.append((idx, slots, step(layout, t, m, c)))
            drain(limit=2)  # keep two batches in flight
        drain(limit=0)
    bar.close()
    return out


def encode_texts(enc, params, texts: Sequence[str], *, tower: str = "query",
                 max_length: int | None = None, batch_size: int = 128,
                 buckets: Sequence[int] | None = None, desc: str = "encode",
                 per_device: int | None = None) -> np.ndarray:
    """Texts -> embeddings [N, D] float32 in input order (jitted, sharded over all local
    devices, length-bucketed, progress bar). `max_length` defaults to `enc.max_length`.
    `per_device`: a fixed number of rows per device in every batch (see the module docstring;
    None: `batch_size` texts per batch over the local devices)."""
    max_length = int(max_length or enc.max_length)
    if max_length > enc.config.max_tokens:
        from negjax.errors import NegjaxError

        raise NegjaxError(f"max length {max_length} exceeds the {enc.config.max_tokens} tokens "
                          f"the model's position embeddings cover")
    ids = tokenize(enc.tokenizer, enc.prompted(texts, tower), max_length)
    lengths = np.fromiter((len(r) for r in ids), np.int64, count=len(ids))
    pad = enc.config.pad_token_id

    def rows(idx, length):
        return pad_ids([ids[i] for i in idx], length, pad)

    return _run_batches(enc, params, lengths, rows, tower=tower, batch_size=batch_size,
                        buckets=buckets or bucket_lengths(max_length), desc=desc,
                        per_device=per_device)


def encode_store(enc, params, store, lo: int = 0, hi: int | None = None, *,
                 tower: str = "doc", batch_size: int = 128, buckets: Sequence[int] | None = None,
                 desc: str = "encode", per_device: int | None = None) -> np.ndarray:
    """Rows lo..hi of a token store (`negjax.data.token_store`, tokenised with this encoder's
    tokenizer, the tower's prompt and the max length) -> embeddings [hi - lo, D] float32: the
    same as `encode_texts` of those texts, without them (only the rows' tokens are read)."""
    hi = len(store) if hi is None else int(hi)
    lengths = np.asarray(store.lengths[lo:hi], dtype=np.int64)

    pad = enc.config.pad_token_id

    def rows(idx, length):
        tokens, mask = store.pad(lo + np.asarray(idx, dtype=np.int64), length)
        tokens[mask == 0] = pad  # (the model's pad id, as encode_texts pads)
        return tokens, mask

    return _run_batches(enc, params, lengths, rows, tower=tower, batch_size=batch_size,
                        buckets=buckets or bucket_lengths(store.max_len), desc=desc,
                        per_device=per_device)


def encode_across_processes(enc, params, texts: Sequence[str], *, tower: str = "query",
                            max_length: int | None = None, batch_size: int = 128,
                            desc: str = "encode") -> np.ndarray:
    """`encode_texts` split over the processes of a multi-process job: process p tokenises and
    encodes the p-th contiguous slice of `texts` (strings, or a token store: `encode_store`)
    on its local devices, then every process
    receives all embeddings [N, D] (an all-gather). `batch_size` counts the texts of one batch
    over all devices of all processes; the per-device batch is fixed (`rows_per_device`), so
    the result equals, bit for bit, a one-process run on the same number of devices.
    Collective: every process calls it with the same texts. One process: `encode_texts`."""
    from negjax.multihost import allgather_rows, process_chunks

    n, pc = len(texts), jax.process_count()
    share = max(1, math.ceil(n / pc))
    slices = [process_chunks(n, share, p, pc) for p in range(pc)]
    counts = [sum(hi - lo for _, lo, hi in s) for s in slices]
    mine = slices[jax.process_index()]
    lo, hi = (mine[0][1], mine[-1][2]) if mine else (0, 0)
    if hasattr(texts, "pad"):  # a token store: this process reads only its rows' tokens
        local = encode_store(enc, params, texts, lo, hi, tower=tower, batch_size=batch_size,
                             desc=desc, per_device=rows_per_device(batch_size))
    else:
        local = encode_texts(enc, params, texts[lo:hi], tower=tower, max_length=max_length,
                             batch_size=batch_size, desc=desc,
                             per_device=rows_per_device(batch_size))
    return allgather_rows(local, counts)


def encode_tokens(enc, params, tokens: np.ndarray, mask: np.ndarray, *, tower: str = "query",
                  batch_size: int = 128, buckets: Sequence[int] | None = None,
                  desc: str = "encode", per_device: int | None = None) -> np.ndarray:
    """Pre-tokenised rows (tokens, mask [N, L] int32, right-padded, e.g. a token store) ->
    embeddings [N, D] float32 in input order, with the same bucketing and sharding."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask)
    lengths = mask.sum(axis=1).astype(np.int64)
    width = tokens.shape[1]

    pad = enc.config.pad_token_id

    def rows(idx, length):
        w = min(length, width)  # a bucket may be wider than the stored rows
        t = np.full((len(idx), length), pad, np.int32)
        m = np.zeros((len(idx), length), np.int32)
        t[:, :w], m[:, :w] = tokens[idx, :w], mask[idx, :w]
        return t, m

    return _run_batches(enc, params, lengths, rows, tower=tower, batch_size=batch_size,
                        buckets=buckets or bucket_lengths(width), desc=desc,
                        per_device=per_device)
