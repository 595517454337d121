"""The FLOP count behind MFU, checked against a count done by hand for a tiny BERT."""

from negjax.bench.flops import Shape, peak_tflops, step_flops


def test_step_flops_hand_count():
    # 1 layer, hidden 8, feed-forward 16; 2 queries of 4 tokens, 2 x 2 documents of 6 tokens.
    # Query sequence (L=4): QKV 3*2*4*8*8=1536, out 2*4*8*8=512, scores 2*4*4*8=256,
    #   weighted sum 256, FFN 2*2*4*8*16=2048                      -> 4608
    # Document sequence (L=6): 2304 + 768 + 576 + 576 + 3072       -> 7296
    # Forward: 2*4608 + 4*7296 = 38400; useful encoder FLOPs 3x = 115200.
    # Loss: 2 queries x 4 documents x dim 8, 2 FLOPs per MAC, forward + 2 backward matmuls
    #   = 3 * 2*2*4*8 = 384.
    f = step_flops(Shape(hidden_size=8, num_layers=1, intermediate_size=16), batch=2, query_len=4,
                   doc_len=6, group_size=2, dim=8)
    assert f["encoder_forward"] == 38400
    assert f["encoder"] == 115200
    assert f["loss"] == 384
    assert f["model"] == 115584
    # GradCache's extra activation-free forward is executed but not useful work.
    g = step_flops(Shape(8, 1, 16), batch=2, query_len=4, doc_len=6, group_size=2, dim=8,
                   extra_forwards=1)
    assert g["model"] == 115584 and g["executed"] == 115584 + 38400
    # Two layers double the encoder part only.
    h = step_flops(Shape(8, 2, 16), batch=2, query_len=4, doc_len=6, group_size=2, dim=8)
    assert h["encoder"] == 2 * 115200 and h["loss"] == 384


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "float32") == 156.0
    assert peak_tflops("cpu", "float32") is None
