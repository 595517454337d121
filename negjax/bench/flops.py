"""FLOPs of a training step, counted from the architecture, and peak FLOP/s of known chips.

Convention (the one MFU is normally quoted in: PaLM's appendix B, "6ND"): count the
*useful* model FLOPs of a step, i.e. matmul FLOPs of one forward pass times 3 (backward =
2x forward: gradients w.r.t. activations and w.r.t. weights). A multiply-add is 2 FLOPs.

Counted, per transformer layer and per sequence of length L (hidden H, feed-forward I):

    Q, K, V projections      3 * 2*L*H*H
    attention output proj.       2*L*H*H
    scores  Q K^T                2*L*L*H      (all heads together: heads * L*L*(H/heads))
    weighted sum  P V            2*L*L*H
    feed-forward (2 matmuls)     2 * 2*L*H*I
    ---------------------------------------
    forward                      8*L*H^2 + 4*L^2*H + 4*L*H*I

Not counted: the embedding lookups (gathers, no matmul), LayerNorm, softmax, GELU, dropout,
biases, mean pooling and L2 normalisation (O(L*H) elementwise work per sequence, < 1% of the
total for BERT shapes). Padded positions are counted: the benchmark uses full-length inputs
and the step computes every position anyway.

The contrastive loss adds the similarity matmul of B queries against all B*G documents of the
global batch, 2*B*(B*G)*D forward, and two matmuls of the same size backward (d/dq and d/dd):
x3. With `symmetric`, the positives-vs-queries matrix (B x B) adds 2*B*B*D x3. Extra
(memory-bank) columns get no gradient: 2*B*K*D forward + the same for d/dq, x2.

Re-computation is not useful work: GradCache's first, activation-free forward pass and
layer rematerialisation each add one encoder forward (4x instead of 3x) to the FLOPs the
hardware executes, reported as `executed` (for hardware FLOP utilisation), while MFU uses
`model` (so GradCache or remat lower MFU by exactly the time they cost).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The parts of an encoder config that set the matmul FLOPs. `q_size` / `kv_size`: the
    widths of the query and of each of the key / value projections (heads x head_dim; None =
    hidden_size, as in BERT); `glu`: a gated feed-forward (three matmuls of H x I: Qwen's
    SwiGLU, ModernBERT's GeGLU) instead of two."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_size: int | None = None
    kv_size: int | None = None
    glu: bool = False

    @classmethod
    def of(cls, cfg) -> "Shape":
        """From a `BertConfig`, `Qwen3Config` or `ModernBertConfig`."""
        head_dim = getattr(cfg, "head_dim", None)
        q = kv = None
        if head_dim is not None:  # Qwen: grouped-query attention
            q, kv = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
        glu = type(cfg).__name__ in ("Qwen3Config", "ModernBertConfig")
        return cls(cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, q, kv, glu)


def layer_forward_flops(shape: Shape, length: int) -> dict:
    """Forward matmul FLOPs of one layer on one sequence of `length` tokens, by part. (A
    sliding-window layer is counted in full: the attention computes every score, then masks.)"""
    L, H, inter = length, shape.hidden_size, shape.intermediate_size
    q = shape.q_size or H
    kv = shape.kv_size or H
    return {
        "qkv": 2 * L * H * (q + 2 * kv),
        "attention_output": 2 * L * q * H,
        "scores": 2 * L * L * q,
        "weighted_sum": 2 * L * L * q,
        "ffn": (3 if shape.glu else 2) * 2 * L * H * inter,
    }


def encoder_forward_flops(shape: Shape, num_sequences: int, length: int) -> int:
    """Forward matmul FLOPs of the encoder on `num_sequences` sequences of `length` tokens."""
    per_seq = sum(layer_forward_flops(shape, length).values()) * shape.num_layers
    return per_seq * num_sequences


def loss_flops(batch: int, group_size: int, dim: int, *, symmetric: bool = False,
               extra_docs: int = 0) -> int:
    """Forward + backward FLOPs of the similarity matmuls of the contrastive loss over a
    global batch of `batch` queries and `batch*group_size` documents of size `dim`."""
    total = 3 * 2 * batch * (batch * group_size) * dim
    if symmetric:
        total += 3 * 2 * batch * batch * dim
    if extra_docs:
        total += 2 * 2 * batch * extra_docs * dim
    return total


def step_flops(shape: Shape, *, batch: int, query_len: int, doc_len: int, group_size: int,
               dim: int, symmetric: bool = False, extra_docs: int = 0,
               momentum_encoder: bool = False, extra_forwards: int = 0) -> dict:
    """FLOPs of one training step on a global batch (ints):

    encoder_forward  one forward pass over the B queries and B*G documents
    encoder          useful encoder FLOPs: 3 x forward (+ one forward of the documents
                     through the momentum encoder that fills a memory bank)
    loss             the loss matmuls, forward + backward
    model            encoder + loss: the useful FLOPs, the numerator of MFU
    executed         model + `extra_forwards` more encoder forwards (1 for GradCache's
                     first pass, 1 for remat; 2 with both)
    """
    docs_fwd = encoder_forward_flops(shape, batch * group_size, doc_len)
    fwd = encoder_forward_flops(shape, batch, query_len) + docs_fwd
    encoder = 3 * fwd + (docs_fwd if momentum_encoder else 0)
    loss = loss_flops(batch, group_size, dim, symmetric=symmetric, extra_docs=extra_docs)
    model = encoder + loss
    return {"encoder_forward": fwd, "encoder": encoder, "loss": loss, "model": model,
            "executed": model + extra_forwards * fwd}


# Dense (no sparsity) peak TFLOP/s per chip, from the vendors' data sheets: bf16 matmuls, and
# float32 matmuls as the default precision runs them (TF32 tensor cores on NVIDIA Ampere and
# later; one bf16 pass on TPU, so the bf16 figure). Matched on `device.device_kind`, first
# match wins (so the longer names come first).
PEAK_TFLOPS = [
    # (substring of device_kind, lower-case), bf16, fp32 (default precision)
    ("h100 pcie", 756.0, 378.0),
    ("h100 nvl", 835.0, 418.0),
    ("h100", 989.0, 494.0),          # SXM
    ("h200", 989.0, 494.0),
    ("gh200", 989.0, 494.0),
    ("a100", 312.0, 156.0),
    ("l4", 121.0, 60.0),
    ("a10g", 70.0, 35.0),
    ("tpu v6 lite", 918.0, 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0, 918.0),
    ("tpu v5 lite", 197.0, 197.0),  # v5e
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),       # v5p reports "TPU v5"
    ("tpu v4", 275.0, 275.0),
    ("tpu v3", 123.0, 123.0),
]


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s of one chip for matmuls in `dtype` ('float32' | 'bfloat16'), or
    None when the chip is not in the table (CPUs: pass --peak-tflops)."""
    kind = device_kind.lower()
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name in kind:
            return bf16 if dtype == "bfloat16" else fp32
    return None
