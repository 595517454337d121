"""`negjax bench step`: the FLOP count against a hand count, the peak table, and a smoke run
of the command whose JSON is checked field by field (never its speed)."""

import json

import numpy as np
import pytest

from helpers import run_negjax, subprocess_env
from negjax.bench.flops import Shape, encoder_forward_flops, layer_forward_flops, loss_flops, peak_tflops, step_flops
from negjax.bench.step import synthetic_batch

# The tiny configuration counted by hand below: 1 layer, hidden 8, feed-forward 16 (heads do
# not change the count), B = 4 queries of 4 tokens, G = 2 documents each of 6 tokens, D = 8.
SHAPE = Shape(hidden_size=8, num_layers=1, intermediate_size=16)
B, G, LQ, LD, D = 4, 2, 4, 6, 8

# One query (L = 4), one layer, forward, multiply-add = 2 FLOPs:
#   Q, K, V      3 * 2*4*8*8   = 1536
#   output proj.     2*4*8*8   =  512
#   Q K^T            2*4*4*8   =  256
#   P V              2*4*4*8   =  256
#   FFN          2 * 2*4*8*16  = 2048
#                               -----
#                                4608
# One document (L = 6):
#   Q, K, V      3 * 2*6*8*8   = 2304
#   output proj.     2*6*8*8   =  768
#   Q K^T            2*6*6*8   =  576
#   P V              2*6*6*8   =  576
#   FFN          2 * 2*6*8*16  = 3072
#                               -----
#                                7296
HAND_QUERY, HAND_DOC = 4608, 7296
HAND_FORWARD = 4 * HAND_QUERY + 8 * HAND_DOC       # 18432 + 58368 = 76800
# Loss: logits [4, 8] = q [4, 8] @ d[8, 8]^T: 2*4*8*8 = 512 forward; backward dq and dd: x3.
HAND_LOSS = 3 * 512                                # 1536
HAND_MODEL = 3 * HAND_FORWARD + HAND_LOSS          # 231936
HAND_EXECUTED_GRADCACHE = HAND_MODEL + HAND_FORWARD  # 308736: GradCache's extra forward


def test_flops_match_hand_count():
    assert sum(layer_forward_flops(SHAPE, LQ).values()) == HAND_QUERY
    assert sum(layer_forward_flops(SHAPE, LD).values()) == HAND_DOC
    assert encoder_forward_flops(SHAPE, 8, LD) == 8 * HAND_DOC
    assert loss_flops(B, G, D) == HAND_LOSS
    f = step_flops(SHAPE, batch=B, query_len=LQ, doc_len=LD, group_size=G, dim=D, extra_forwards=1)
    assert f["encoder_forward"] == HAND_FORWARD
    assert f["model"] == HAND_MODEL
    assert f["executed"] == HAND_EXECUTED_GRADCACHE
    # Two layers double the encoder part only.
    two = step_flops(Shape(hidden_size=8, num_layers=2, intermediate_size=16), batch=B, query_len=LQ,
                     doc_len=LD, group_size=G, dim=D)
    assert two["encoder"] == 2 * 3 * HAND_FORWARD and two["loss"] == HAND_LOSS
    # Symmetric: positives [4, 8] against queries [4, 8]: 2*4*4*8 = 256 forward, x3.
    assert step_flops(SHAPE, batch=B, query_len=LQ, doc_len=LD, group_size=G, dim=D,
                      symmetric=True)["loss"] == HAND_LOSS + 3 * 256
    # Two layers double the encoder, not the loss.
    two = step_flops(Shape(8, 2, 16), batch=B, query_len=LQ, doc_len=LD, group_size=G, dim=D)
    assert two["model"] == 2 * 3 * HAND_FORWARD + HAND_LOSS


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 156.0
    assert peak_tflops("TPU v4", "bfloat16") == 275.0
    assert peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert peak_tflops("TPU v5p", "bfloat16") == 459.0
    assert peak_tflops("cpu", "float32") is None


def test_synthetic_batch_layout():
    b = synthetic_batch(np.random.default_rng(0), batch=3, group_size=2, query_len=5,
                        doc_len=7, vocab_size=500)
    assert b["q_tokens"].shape == (3, 5) and b["d_tokens"].shape == (6, 7)
    assert b["q_mask"].all() and b["d_mask"].all()
    assert all(v.dtype == np.int32 for v in b.values())
    assert 1 <= b["d_tokens"].min() and b["d_tokens"].max() < 500
    assert len(set(b["doc_ids"].tolist())) == 6
    np.testing.assert_array_equal(b["query_pos_ids"][:, 0], b["doc_ids"][::2])


@pytest.fixture(scope="module")
def smoke():
    # The hand-counted configuration, on 2 of the simulated devices, with GradCache (chunk 1
    # of the 2 queries per device), so the gather, the cached path and the breakdown all run.
    proc = run_negjax("bench", "step", "--model", "tiny", "--hidden-size", 8, "--num-layers", 1,
                      "--num-heads", 2, "--intermediate-size", 16, "--batch", B,
                      "--query-len", LQ, "--doc-len", LD, "--negatives", G - 1,
                      "--grad-cache", 1, "--devices", 2, "--steps", 2, "--warmup", 1,
                      "--peak-tflops", 0.5, "--json", env=subprocess_env(devices=8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_smoke_fields(smoke):
    r = smoke
    assert r["devices"] == 2 and r["platform"] == "cpu" and r["grad_cache"] == 1
    assert r["architecture"]["hidden_size"] == 8 and r["architecture"]["num_layers"] == 1
    # The FLOPs the command reports are the hand count (the embedding size D is the hidden size).
    assert r["flops_per_step"]["model"] == HAND_MODEL
    assert r["flops_per_step"]["executed"] == HAND_EXECUTED_GRADCACHE
    assert r["tokens_per_step"] == B * LQ + B * G * LD
    t = r["step_time"]
    assert len(t["all_s"]) == 2 and t["min_s"] <= t["p10_s"] <= t["median_s"] <= t["p90_s"] <= t["max_s"]
    assert r["examples_per_s"] == pytest.approx(B / t["median_s"])
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / t["median_s"])
    assert r["tflops_per_s"] == pytest.approx(HAND_MODEL / t["median_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / (0.5 * 2))
    assert r["compile_s"] > 0 and np.isfinite(r["final_loss"])
    assert r["device_peak_bytes"] is None  # the CPU backend reports no memory stats
    assert r["peak_rss_bytes"] > 0
    bd = r["breakdown"]
    for key in ("encoder_s", "loss_s", "gather_s", "grads_s"):
        assert bd[key] > 0
    assert bd["optimizer_s"] == pytest.approx(bd["step_in_rounds_s"] - bd["grads_s"])


def test_errors():
    proc = run_negjax("bench", "step", "--model", "tiny", "--hidden-size", 8, "--num-layers", 1,
                      "--num-heads", 2, "--intermediate-size", 16, "--batch", 4,
                      "--grad-cache", 3, "--devices", 1, env=subprocess_env(devices=1))
    assert proc.returncode == 2 and "--grad-cache 3 must divide" in proc.stderr
    proc = run_negjax("bench", "step", "--model", "minilm", "--hidden-size", 8,
                      env=subprocess_env(devices=1))
    assert proc.returncode == 2 and "--model tiny only" in proc.stderr


def test_gpu_script_cpu_smoke(tmp_path):
    """experiments/gpu/run.sh end to end with NEGJAX_GPU_SMOKE=1 (tiny shapes on the CPU):
    every run it lists completes and the JSON it writes carries the figures."""
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "gpu.json"
    env = subprocess_env(devices=1, NEGJAX_GPU_SMOKE=1, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu" / "run.sh"), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["env"]["smoke"] is True and res["env"]["platform"] == "cpu"
    names = [r["name"] for r in res["runs"]]
    assert names == ["minilm", "minilm-gradcache", "bert-base", "bert-base-gradcache", "bert-base-remat"]
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["examples_per_s"] > 0 and r["flops_per_step"]["model"] > 0 and np.isfinite(r["final_loss"])
    assert "wrote" in proc.stdout and not (tmp_path / "gpu.json.tmp").exists()


def test_flops_of_grouped_query_and_gated_families():
    """Qwen: q 4 heads x 8, k and v 2 heads x 8, SwiGLU (3 matmuls); ModernBERT: GeGLU."""
    from negjax.bench.flops import layer_forward_flops
    from negjax.model.modernbert import ModernBertConfig
    from negjax.model.qwen3 import Qwen3Config

    L, H, inter = 10, 32, 48
    qwen = Shape.of(Qwen3Config(vocab_size=50, hidden_size=H, num_layers=1, num_heads=4,
                                num_kv_heads=2, head_dim=8, intermediate_size=inter))
    f = layer_forward_flops(qwen, L)
    assert f["qkv"] == 2 * L * H * (32 + 2 * 16)
    assert f["attention_output"] == 2 * L * 32 * H and f["scores"] == 2 * L * L * 32
    assert f["ffn"] == 3 * 2 * L * H * inter
    modern = Shape.of(ModernBertConfig(vocab_size=50, hidden_size=H, num_layers=1, num_heads=4,
                                       intermediate_size=inter))
    g = layer_forward_flops(modern, L)
    assert g["qkv"] == 3 * 2 * L * H * H and g["ffn"] == 3 * 2 * L * H * inter


def test_breakdown_times_the_loss_training_runs():
    """The breakdown's loss piece is the train step's loss (one `LossSpec`, `embedding_loss`):
    with precision, Matryoshka, the false-negative guard and a memory bank set, on the step's
    own embeddings it gives the step's loss (`loss_and_grads`, what `negjax train` runs), and
    that loss differs from the plain one the breakdown used to time."""
    import jax

    from helpers import G as G2, make_cfg, make_token_batch, mesh_of, put_batch, put_rows
    from negjax.bench.breakdown import pieces
    from negjax.config import ModelConfig
    from negjax.losses import contrastive_loss_and_metrics
    from negjax.model import load_encoder
    from negjax.model.packaged import minilm_dir
    from negjax.train.state import init_state
    from negjax.train.sharding import place_state
    from negjax.train.step import make_train_step, temperature_of

    enc = load_encoder(ModelConfig(name="tiny", tokenizer=str(minilm_dir()), hidden_size=16,
                                   num_layers=1, num_heads=2, intermediate_size=32, dropout=0.0))
    cfg = make_cfg(loss__precision="high", loss__matryoshka_dims=[16, 8],
                   loss__false_negative_margin=0.3, loss__memory_bank_size=32,
                   loss__temperature=0.1)
    mesh = mesh_of(2)
    state = place_state(init_state(enc.params, cfg, dim=enc.dim), mesh)
    step_fn = make_train_step(enc, cfg, mesh, group_size=G2)
    state, _ = step_fn(state, put_batch(make_token_batch(1), mesh))  # the bank holds a step
    assert (np.asarray(state.bank_ids) >= 0).sum() == 16
    raw = make_token_batch(2)
    batch = put_batch(raw, mesh)
    want, metrics, _ = step_fn.loss_and_grads(state.params, batch, state.step, state.bank,
                                              state.bank_ids)
    params = jax.tree.map(np.asarray, state.params["model"])
    q = enc.encode(params, raw["q_tokens"], raw["q_mask"], tower="query")
    d = enc.encode(params, raw["d_tokens"], raw["d_mask"], tower="doc")
    _, loss, _ = pieces(enc, cfg, mesh, G2)
    q_s, d_s = put_rows(mesh, np.asarray(q), np.asarray(d))
    got, got_metrics, _ = loss(q_s, d_s, {k: batch[k] for k in ("query_pos_ids", "doc_ids")},
                               temperature_of(state.params, cfg), state.bank, state.bank_ids)
    np.testing.assert_allclose(np.asarray(got), float(want), rtol=1e-5)
    assert float(np.asarray(got_metrics["false_negatives_masked"])[0]) == float(
        metrics["false_negatives_masked"])
    plain, _ = contrastive_loss_and_metrics(
        q, d, group_size=G2, temperature=0.1, query_pos_ids=raw["query_pos_ids"],
        doc_ids=raw["doc_ids"])
    assert abs(float(plain) - float(want)) > 1e-2
