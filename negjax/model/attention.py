"""Self-attention for every encoder family, through `jax.nn.dot_product_attention`.

    out = attend(q, k, v, mask, causal=False, window=None, implementation="xla")

q [N, L, Hq, D], k and v [N, L, Hkv, D] (Hq a multiple of Hkv: grouped-query attention),
mask [N, L] (1 = a real token) -> [N, L, Hq, D] in v's dtype. Logits and softmax are float32.

`implementation` is `model.attention`:
- 'xla' (the default): the padding mask (right or left padding), the causal mask and the
  sliding window are boolean masks; runs everywhere.
- 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (bfloat16 / float16 compute).
  Padding is passed as sequence lengths, which assumes right padding -- what negjax's own
  token stores and encoder batches always use. cuDNN supports no symmetric sliding window:
  ModernBERT's local layers fall back to 'xla'.

Attention-probability dropout (BERT's `attention_probs_dropout_prob` while training) has no
place in `jax.nn.dot_product_attention`; when it is active the same math runs written out
(`reference_attention`), with the dropout applied to the probabilities.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from negjax.errors import NegjaxError

IMPLEMENTATIONS = ("xla", "cudnn")


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise NegjaxError(f"config key 'model.attention': {name!r} is not one of "
                          f"{list(IMPLEMENTATIONS)}")
    return name


def keep_mask(mask, length: int, *, causal: bool, window: int | None):
    """[N, 1, L, L] bool: query i may attend key j (j real; j <= i if causal; |i - j| <= window)."""
    keep = mask[:, None, None, :].astype(bool)
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    if causal:
        keep = keep & (j <= i)[None, None]
    if window is not None:
        keep = keep & (jnp.abs(i - j) <= window)[None, None]
    return keep


def reference_attention(q, k, v, mask, *, causal: bool = False, window: int | None = None,
                        drop: Callable | None = None):
    """The attention written out (einsum, float32 softmax): the path with dropout on the
    probabilities, and the reference the tests hold `attend` to."""
    n, length, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(n, length, hkv, hq // hkv, d)
    scores = jnp.einsum("nqkgd,nskd->nkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    keep = keep_mask(mask, length, causal=causal, window=window)[:, :, None]
    # Masked keys get the most negative float (as PyTorch's BERT); a query with no key left
    # (padding under a causal mask) averages all keys, and its output is never used.
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if drop is not None:
        probs = drop(probs)
    ctx = jnp.einsum("nkgqs,nskd->nqkgd", probs.astype(v.dtype), v)
    return ctx.reshape(n, length, hq, d)


def attend(q, k, v, mask, *, causal: bool = False, window: int | None = None,
           implementation: str = "xla", drop: Callable | None = None):
    """Scaled dot-product self-attention (see the module docstring). `drop`: dropout applied to
    the attention probabilities (training only), which takes the written-out path."""
    if drop is not None:
        return reference_attention(q, k, v, mask, causal=causal, window=window, drop=drop)
    length = q.shape[1]
    if implementation == "cudnn" and window is None and q.dtype in (jnp.bfloat16, jnp.float16):
        lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    keep = keep_mask(mask, length, causal=causal, window=window)
    return jax.nn.dot_product_attention(q, k, v, mask=keep, implementation="xla")
