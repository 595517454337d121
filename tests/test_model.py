"""The Flax BERT encoder against PyTorch, remat, dropout, towers, dtypes, broken model dirs.

Fixtures come from tools/make_fixtures.py (a random 2-layer BertModel and its hidden states).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require_devices

from negjax.config import ModelConfig
from negjax.model import load_encoder

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_bert"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "tiny_bert_reference.npz"))


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(ModelConfig(name=str(TINY)))


def test_tiny_bert_hidden_states_match_pytorch(tiny, ref):
    hidden = np.asarray(tiny.hidden_states(tiny.params, ref["tokens"], ref["mask"]))
    assert hidden.dtype == np.float32 and hidden.shape == ref["hidden"].shape
    np.testing.assert_allclose(hidden, ref["hidden"], atol=1e-5, rtol=0)
    # Pooling is over real tokens only: mean of the reference's unpadded rows, normalised.
    emb = np.asarray(tiny.encode(tiny.params, ref["tokens"], ref["mask"]))
    m = ref["mask"][:, :, None]
    want = (ref["hidden"] * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, want, atol=1e-5)
    assert tiny.dim == 32 and tiny.pooling == "mean" and tiny.normalize


def _grads(enc, ref, rng):
    w = jax.random.normal(jax.random.PRNGKey(3), (ref["tokens"].shape[0], enc.dim))

    def loss(params):
        emb = enc.encode(params, ref["tokens"], ref["mask"], rng=rng, deterministic=False)
        return jnp.sum(emb * w)

    return jax.jit(jax.value_and_grad(loss))(enc.params)


def test_remat_gradients_equal(ref):
    plain = load_encoder(ModelConfig(name=str(TINY), remat=False))
    remat = load_encoder(ModelConfig(name=str(TINY), remat=True))
    rng = jax.random.PRNGKey(7)  # dropout on: remat must replay the same masks
    loss_a, ga = _grads(plain, ref, rng)
    loss_b, gb = _grads(remat, ref, rng)
    assert jax.tree.structure(ga) == jax.tree.structure(gb)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    # Not bitwise: XLA (jaxlib 0.12) fuses the recomputed forward differently from the saved
    # one, so entries differ by up to ~2 float32 ulps of the O(1) gradient scale (max 3e-7,
    # 1.3e-7 on an entry of 1.7e-3). A mask that was not replayed would be off by ~1e-2.
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ga)) > 0


def test_exact_gelu_gradient_under_shard_map():
    """The exact GELU (PyTorch's erf formula) is the float64 GELU to float32 rounding; its
    stated derivative equals autodiff of `jax.nn.gelu` and, unlike it in jax 0.12, also
    traces inside `jax.shard_map` (see `negjax.model.bert.gelu_exact`)."""
    require_devices(2)
    import math

    from jax.sharding import NamedSharding, PartitionSpec as P

    from negjax.model.bert import gelu_exact

    x = jnp.linspace(-10.0, 10.0, 4002, dtype=jnp.float32)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(jax.jit(gelu_exact)(x), exact, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(gelu_exact(x), jax.nn.gelu(x, approximate=False), rtol=1e-7, atol=1e-6)
    want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    got = jax.vmap(jax.grad(gelu_exact))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-7)
    mesh = jax.make_mesh((2,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    grad = jax.shard_map(jax.grad(lambda v: gelu_exact(v).sum()), mesh=mesh,
                         in_specs=P("data"), out_specs=P("data"))
    np.testing.assert_allclose(jax.jit(grad)(xs), want, rtol=1e-6, atol=2e-7)


def test_dropout_needs_and_follows_rng(tiny, ref):
    args = (tiny.params, ref["tokens"], ref["mask"])
    det = np.asarray(tiny.encode(*args))
    a = np.asarray(tiny.encode(*args, rng=jax.random.PRNGKey(1), deterministic=False))
    b = np.asarray(tiny.encode(*args, rng=jax.random.PRNGKey(1), deterministic=False))
    c = np.asarray(tiny.encode(*args, rng=jax.random.PRNGKey(2), deterministic=False))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - det).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    with pytest.raises(ValueError, match="rng"):
        tiny.encode(*args, deterministic=False)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_mask_statistics(rate):
    """The hash-based keep-mask: the requested rate, a pure function of the key, no visible
    correlation between neighbouring elements or between keys."""
    from negjax.model.bert import dropout_keep_mask

    shape = (16, 4, 128, 128)                       # 1,048,576 elements, an attention shape
    n = int(np.prod(shape))
    m1 = np.asarray(dropout_keep_mask(jax.random.key(3), 1 - rate, shape))
    m1b = np.asarray(dropout_keep_mask(jax.random.key(3), 1 - rate, shape))
    m2 = np.asarray(dropout_keep_mask(jax.random.fold_in(jax.random.key(3), 1), 1 - rate, shape))
    assert m1.dtype == bool and m1.shape == shape
    np.testing.assert_array_equal(m1, m1b)
    tol = 6 * np.sqrt(rate * (1 - rate) / n)        # 6 standard errors
    drop1, drop2 = 1 - m1.ravel(), 1 - m2.ravel()
    assert abs(drop1.mean() - rate) < tol
    assert abs(drop2.mean() - rate) < tol
    # Pairs: P(both dropped) = rate^2 for neighbours along every axis and across keys.
    tol2 = 6 * np.sqrt(rate**2 * (1 - rate**2) / n)
    for axis in range(len(shape)):
        a = np.moveaxis(1 - m1, axis, 0).astype(np.float64)
        assert abs((a[1:] * a[:-1]).mean() - rate**2) < tol2 * 2, axis
    assert abs((drop1 * drop2).mean() - rate**2) < tol2
    # Every position is dropped at the rate (no stuck bits): mean over 64 keys per position.
    keys = [jax.random.fold_in(jax.random.key(5), i) for i in range(64)]
    per_pos = np.mean([1 - np.asarray(dropout_keep_mask(k, 1 - rate, (4096,))) for k in keys], axis=0)
    assert abs(per_pos.mean() - rate) < 0.01
    assert per_pos.min() < rate < per_pos.max()


def test_towers(ref):
    tok_dir = str(TINY)  # any tokenizer dir works for 'tiny'; vocab comes from it
    cfg = ModelConfig(name="tiny", tokenizer=tok_dir, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, tied_towers=False)
    sep = load_encoder(cfg)
    assert set(sep.params) == {"query", "doc"}
    assert sep.config.vocab_size == 100
    leaves_q, leaves_d = jax.tree.leaves(sep.params["query"]), jax.tree.leaves(sep.params["doc"])
    assert all(x.dtype == jnp.float32 for x in leaves_q)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves_q, leaves_d))
    q = sep.encode(sep.params, ref["tokens"], ref["mask"], tower="query")
    d = sep.encode(sep.params, ref["tokens"], ref["mask"], tower="doc")
    assert np.abs(np.asarray(q) - np.asarray(d)).max() > 1e-3

    tied = load_encoder(dataclasses.replace(cfg, tied_towers=True))
    assert set(tied.params) == {"encoder"}
    q = tied.encode(tied.params, ref["tokens"], ref["mask"], tower="query")
    d = tied.encode(tied.params, ref["tokens"], ref["mask"], tower="doc")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(d))

    # A pretrained checkpoint with separate towers: both start from its weights.
    pre = load_encoder(ModelConfig(name=str(TINY), tied_towers=False))
    for a, b in zip(jax.tree.leaves(pre.params["query"]), jax.tree.leaves(pre.params["doc"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute(tiny, ref):
    bf = load_encoder(ModelConfig(name=str(TINY), dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf.params))
    emb = np.asarray(bf.encode(bf.params, ref["tokens"], ref["mask"]))
    full = np.asarray(tiny.encode(tiny.params, ref["tokens"], ref["mask"]))
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert 0 < np.abs(emb - full).max() < 0.1  # bf16 really ran, and stays close
    assert (emb * full).sum(1).min() > 0.99


def test_int8_dense_inference(tiny, ref):
    """model.dtype=int8: the dense layers in int8 (per-token and per-feature scales), the
    same float32 params; embeddings close to float32; training through it is refused."""
    from negjax.errors import NegjaxError
    from negjax.model.bert import quantize_int8

    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32).at[2].set(0)
    q, scale = quantize_int8(x, axis=-1)
    assert q.dtype == jnp.int8 and scale.shape == (5, 1) and int(jnp.abs(q).max()) == 127
    np.testing.assert_allclose(q * scale, x, atol=float(scale.max()) / 2 + 1e-7)
    i8 = load_encoder(ModelConfig(name=str(TINY), dtype="int8"))
    assert jax.tree.structure(i8.params) == jax.tree.structure(tiny.params)
    emb = np.asarray(i8.encode(tiny.params, ref["tokens"], ref["mask"]))
    full = np.asarray(tiny.encode(tiny.params, ref["tokens"], ref["mask"]))
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    assert 0 < np.abs(emb - full).max() < 0.1  # int8 really ran, and stays close
    assert (emb * full).sum(1).min() > 0.99
    with pytest.raises(NegjaxError, match="int8"):
        i8.encode(tiny.params, ref["tokens"], ref["mask"], rng=jax.random.PRNGKey(0),
                  deterministic=False)


def test_explicit_mesh_sharded_batch(tiny, ref):
    """The encoder runs (forward, and backward with dropout) on a batch sharded over an
    Explicit-axes mesh, as in the training step, and matches the unsharded result."""
    require_devices(8)
    from jax.sharding import NamedSharding, PartitionSpec as P

    tokens, mask = np.tile(ref["tokens"], (2, 1)), np.tile(ref["mask"], (2, 1))
    base = np.asarray(tiny.encode(tiny.params, tokens, mask))
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        t, m = jax.device_put((tokens, mask), NamedSharding(mesh, P("data")))
        params = jax.device_put(tiny.params, NamedSharding(mesh, P()))
        out = jax.jit(lambda p, t, m: tiny.encode(p, t, m))(params, t, m)
        assert out.sharding.spec[0] == "data"
        np.testing.assert_allclose(np.asarray(out), base, atol=1e-5)

        def loss(p, rng):
            return jnp.sum(tiny.encode(p, t, m, rng=rng, deterministic=False) ** 2 * 0.5)

        grads = jax.jit(jax.grad(loss))(params, jax.random.PRNGKey(0))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------- broken dirs

def _save(tensors, path):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _tiny_tensors():
    from safetensors.numpy import load_file

    return load_file(str(TINY / "model.safetensors"))


def _broken(kind: str, d: Path) -> str:
    """Make broken model dir `d` of one kind; return a fragment its error must contain."""
    if kind != "no_config":
        shutil.copytree(TINY, d)
    else:
        d.mkdir()
        shutil.copy(TINY / "model.safetensors", d)
        return "no config.json"
    if kind == "unknown_arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))
        return "unknown architecture"
    if kind == "wrong_shape":
        t = _tiny_tensors()
        t["encoder.layer.1.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
        _save(t, d / "model.safetensors")
        return "'encoder.layer.1.intermediate.dense.weight' has shape [64, 31], expected [64, 32]"
    if kind == "missing_tensor":
        t = _tiny_tensors()
        del t["encoder.layer.0.attention.self.key.bias"]
        _save(t, d / "model.safetensors")
        return "missing tensor 'encoder.layer.0.attention.self.key.bias'"
    if kind == "bin_only":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return "never loads pickles"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_config", "unknown_arch", "wrong_shape", "missing_tensor",
                                  "bin_only"])
def test_broken_model_dirs_one_line_exit_2(kind, tmp_path, capsys):
    from negjax.cli import main

    model_dir = tmp_path / "model"
    expected = _broken(kind, model_dir)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a cat"}\n')
    out = tmp_path / "out.npy"
    rc = main(["encode", "--model", str(model_dir), "--input", str(inp), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not out.exists()


def _save_with_word_tokenizer(out: Path, model, words: list[str], template: str, special: dict,
                              **tokens) -> Path:
    """Save a transformers `model` and a word-level tokenizer over `words` (id = position)
    whose post-processor is `template` (e.g. "<s> $A </s>") into `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=list(special.items()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _tiny_roberta_dir(root: Path, model_type: str):
    """A random 2-layer RobertaModel / XLMRobertaModel saved by transformers, with a 100-token
    word-level tokenizer (<s> = 0, <pad> = 1, </s> = 2, as RoBERTa's) -> (dir, torch model)."""
    import torch
    from transformers import RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

    config_cls, model_cls = {"roberta": (RobertaConfig, RobertaModel),
                             "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel)}[model_type]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    model = model_cls(cfg).eval()
    words = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(96)]
    out = _save_with_word_tokenizer(root / model_type, model, words, "<s> $A </s>",
                                    {"<s>": 0, "</s>": 2}, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
    return out, model


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_families_match_transformers_and_export(tmp_path, model_type):
    """RoBERTa / XLM-RoBERTa: positions counted from pad_token_id + 1 over non-pad tokens.
    negjax's hidden states equal transformers' on a right-padded batch of mixed lengths; the
    pooled embeddings too; the export loads in transformers as the same architecture with the
    same outputs, and in sentence-transformers with negjax's embeddings."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from negjax.model import encode_texts, tokenize_padded
    from negjax.model.hf import write_hf_dir

    model_dir, model = _tiny_roberta_dir(tmp_path, model_type)
    enc = load_encoder(ModelConfig(name=str(model_dir)))
    assert enc.config.model_type == model_type and enc.config.position_offset == 2
    assert enc.max_length == 38  # 40 positions, the first two never used
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", "w11", "w12 w13 w14 w15", "w5 w5 w5 w5 w5 w5 w5"]
    tokens, mask = tokenize_padded(enc.tokenizer, texts, 16)
    assert tokens[1, 3:].tolist() == [1] * 13  # right padding with <pad>
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    got = np.asarray(enc.hidden_states(enc.params, tokens, mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    m = mask[:, :, None]
    pooled = (want * m).sum(1) / m.sum(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    emb = encode_texts(enc, enc.params, texts)  # buckets and its own padding
    assert (emb * pooled).sum(1).min() >= 0.99999

    out = write_hf_dir(tmp_path / "export", enc.config, enc.tower_params(enc.params, "doc"),
                       enc.tokenizer, pooling="mean", normalize=True, max_length=16,
                       extras=enc.extras)
    back = AutoModel.from_pretrained(str(out)).eval()
    assert type(back) is type(model)
    with torch.no_grad():
        again = back(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(again, want, atol=1e-6, rtol=0)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    assert (st * emb).sum(1).min() >= 0.99999


def test_roberta_tokenizer_must_pad_with_the_config_pad_id(tmp_path):
    """RoBERTa positions depend on pad_token_id: a tokenizer padding with another id is refused."""
    from negjax.errors import NegjaxError

    model_dir, _ = _tiny_roberta_dir(tmp_path, "roberta")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "pad_token_id": 3}))
    with pytest.raises(NegjaxError, match="pads with id 1 but config.json's pad_token_id is 3"):
        load_encoder(ModelConfig(name=str(model_dir)))


def test_train_refuses_lengths_beyond_the_position_embeddings(tmp_path, capsys):
    """model.doc_max_len past what the position embeddings cover (40 RoBERTa positions = 38
    tokens) stops `negjax train` before any step, with one line naming the key; nothing is
    written."""
    from negjax.cli import main

    model_dir, _ = _tiny_roberta_dir(tmp_path, "xlm-roberta")
    work = tmp_path / "run"
    rc = main(["train", "--config", str(Path(__file__).parents[1] / "experiments/configs/tiny-wordnet.toml"),
               "--set", f"model.name={model_dir}", "--set", "model.doc_max_len=39",
               "--set", "model.query_max_len=16", "--workdir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2 and "model.doc_max_len = 39 exceeds the 38 tokens" in err, err
    assert not work.exists()


def _tiny_qwen_dir(root: Path, model_type: str = "qwen3", template: str = "$A <|endoftext|>"):
    """A random 2-layer Qwen3Model / Qwen2Model (grouped-query attention: 4 heads, 2 KV heads)
    saved by transformers, with a 100-token word-level tokenizer that appends <|endoftext|>
    (id 0, also the padding token, as Qwen3-Embedding's) -> (dir, torch model)."""
    import torch
    from transformers import Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model

    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3Model), "qwen2": (Qwen2Config, Qwen2Model)}[model_type]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, intermediate_size=48,
                     max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                     pad_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(98)]
    out = _save_with_word_tokenizer(root / model_type, model, words, template,
                                    {"<|endoftext|>": 0}, eos_token="<|endoftext|>",
                                    pad_token="<|endoftext|>")
    return out, model


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_qwen_matches_transformers_right_and_left_padding_and_export(tmp_path, model_type):
    """Qwen3 (and Qwen2: q/k/v biases, no q/k norm): grouped-query attention, RoPE, RMSNorm,
    SwiGLU, causal. negjax's hidden states at real tokens equal transformers' with right and
    with left padding; the default pooling is the last real token (the appended EOS); the
    export reloads in transformers with the same outputs."""
    import torch
    from transformers import AutoModel

    from negjax.model import encode_texts
    from negjax.model.hf import write_hf_dir

    model_dir, model = _tiny_qwen_dir(tmp_path, model_type)
    enc = load_encoder(ModelConfig(name=str(model_dir)))
    assert enc.pooling == "last" and enc.config.model_type == model_type
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", "w11", "w12 w13 w14 w15", "w5 w5 w5 w5 w5 w5 w5"]
    rows = [[int(w[1:]) + 2 for w in t.split()] + [0] for t in texts]  # "wI" is id I + 2; EOS
    if model_type == "qwen3":  # (AutoTokenizer turns this word-level file into a Qwen2 BPE one)
        assert [enc.tokenizer(t)["input_ids"] for t in texts] == rows  # EOS appended
    length = max(map(len, rows))
    for side in ("right", "left"):
        tokens = np.zeros((len(rows), length), np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
            tokens[i, sl], mask[i, sl] = r, 1
        with torch.no_grad():
            want = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
        got = np.asarray(enc.hidden_states(enc.params, tokens, mask))
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)
        last = np.asarray(enc.encode(enc.params, tokens, mask))
        ref = want[np.arange(len(rows)), [np.flatnonzero(m)[-1] for m in mask]]
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        assert (last * ref).sum(1).min() >= 0.99999
    if model_type == "qwen3":
        emb = encode_texts(enc, enc.params, texts)
        assert (emb * ref).sum(1).min() >= 0.99999

    out = write_hf_dir(tmp_path / "export", enc.config, enc.tower_params(enc.params, "doc"),
                       enc.tokenizer, pooling="last", normalize=True, max_length=32)
    back = AutoModel.from_pretrained(str(out)).eval()
    assert type(back) is type(model)
    with torch.no_grad():
        again = back(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(again[real], want[real], atol=1e-6, rtol=0)


def test_qwen_tokenizer_without_eos_gets_it_appended(tmp_path):
    """A Qwen tokenizer that does not end texts with EOS is made to (as Qwen3-Embedding's
    does): encode and the training token stores see the EOS, truncation keeps it last, and
    the last-token embedding is the EOS token's."""
    from negjax.data.token_store import load_backend_tokenizer
    from negjax.model import encode_texts, tokenize_padded

    model_dir, _ = _tiny_qwen_dir(tmp_path, "qwen3", template="$A")
    enc = load_encoder(ModelConfig(name=str(model_dir)))
    assert enc.tokenizer("w1 w2")["input_ids"] == [3, 4, 0]
    backend, pad = load_backend_tokenizer(enc.tokenizer)
    assert backend.encode("w1 w2").ids == [3, 4, 0] and pad == 0
    assert enc.tokenizer("w1 w2 w3 w4", truncation=True, max_length=3)["input_ids"] == [3, 4, 0]
    tokens, mask = tokenize_padded(enc.tokenizer, ["w1 w2", "w5"], 4)
    want = np.asarray(enc.encode(enc.params, tokens, mask))
    np.testing.assert_allclose(encode_texts(enc, enc.params, ["w1 w2", "w5"]), want, atol=1e-6)
    assert tokens.tolist() == [[3, 4, 0, 0], [7, 0, 0, 0]] and mask.sum(1).tolist() == [3, 2]


def test_attention_kernel_matches_the_written_out_reference():
    """`attend` (jax.nn.dot_product_attention) against the einsum reference, values and
    gradients: multi-head and grouped-query, padding on the right and on the left, causal, a
    sliding window, float32."""
    from negjax.model.attention import attend, reference_attention

    rng = np.random.default_rng(0)
    n, length, hq, hkv, d = 3, 9, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((n, length, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((n, length, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n, length, hkv, d)), jnp.float32)
    right = np.zeros((n, length), np.int32)
    for i, real in enumerate((9, 5, 2)):
        right[i, :real] = 1
    for mask in (jnp.asarray(right), jnp.asarray(right[:, ::-1].copy())):
        for causal, window in ((False, None), (True, None), (False, 2)):
            kw = dict(causal=causal, window=window)
            # Rows that are real queries: a padded query's output is never used.
            rows = np.asarray(mask, bool)[:, :, None, None]

            def loss(fn, q, k, v):
                return jnp.sum(jnp.where(rows, fn(q, k, v, mask, **kw), 0.0) ** 2)

            got = attend(q, k, v, mask, **kw)
            want = reference_attention(q, k, v, mask, **kw)
            np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=1e-6)
            g_got = jax.grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2))(q, k, v)
            g_want = jax.grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
            for a, b in zip(g_got, g_want):
                np.testing.assert_allclose(a, b, atol=1e-5)
    # The window is symmetric and inclusive: with window 2, query 4 sees keys 2..6 only.
    one = jnp.ones((1, length), jnp.int32)
    v1 = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None, None], (1, length, 1, d))
    out = attend(jnp.zeros((1, length, 1, d)), jnp.zeros((1, length, 1, d)), v1, one, window=2)
    assert float(out[0, 4, 0, 0]) == pytest.approx(4.0)   # mean of 2..6
    assert float(out[0, 0, 0, 0]) == pytest.approx(1.0)   # mean of 0..2


def _tiny_modernbert_dir(root: Path, **overrides):
    """A random 4-layer ModernBertModel (layers 0 and 3 global, 1 and 2 sliding with
    local_attention 4: keys within 2 positions) with every bias and non-trivial LayerNorms,
    saved by transformers with a 100-token word-level tokenizer that adds [CLS] (id 0) and
    [SEP] (id 2) and pads with [PAD] (id 1) -> (dir, torch model)."""
    import torch
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, local_attention=4,
              global_attn_every_n_layers=3, global_rope_theta=1000.0, local_rope_theta=100.0,
              norm_bias=True, attention_bias=True, mlp_bias=True, pad_token_id=1,
              bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2,
              attn_implementation="eager")
    model = ModernBertModel(ModernBertConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("Wqkv.weight"):  # peaked attention: positions matter
                p.mul_(10.0)
    words = ["[CLS]", "[PAD]", "[SEP]", "<unk>"] + [f"w{i}" for i in range(96)]
    out = _save_with_word_tokenizer(root / "modernbert", model, words, "[CLS] $A [SEP]",
                                    {"[CLS]": 0, "[SEP]": 2}, cls_token="[CLS]",
                                    sep_token="[SEP]", pad_token="[PAD]")
    return out, model


def test_modernbert_matches_transformers_and_export(tmp_path):
    """ModernBERT: fused q/k/v, RoPE with a global and a local theta, global and sliding-window
    (|i - j| <= local_attention // 2) layers, gated MLP, pre-LayerNorm with none in layer 0.
    negjax's hidden states at real tokens equal transformers' on a right-padded batch of mixed
    lengths (the window and the thetas matter: changing them changes the outputs); no EOS is
    appended and pooling defaults to mean; the export reloads in transformers as a
    ModernBertModel with the same outputs, and in sentence-transformers with negjax's
    embeddings. A ModernBertForMaskedLM checkpoint loads the same encoder (its head ignored)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, ModernBertForMaskedLM

    from negjax.model import encode_texts, tokenize_padded
    from negjax.model.encoder import export_hf
    from negjax.model.hf import read_hf_dir
    from negjax.model.modernbert import ModernBertConfig

    model_dir, model = _tiny_modernbert_dir(tmp_path)
    enc = load_encoder(ModelConfig(name=str(model_dir)))
    cfg = enc.config
    assert isinstance(cfg, ModernBertConfig) and enc.pooling == "mean" and enc.max_length == 64
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention",
                               "full_attention")
    assert (cfg.global_rope_theta, cfg.local_rope_theta, cfg.sliding_window) == (1000.0, 100.0, 2)
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", "w11", "w12 w13 w14 w15", "w5 w5 w5 w5 w5 w5 w5"]
    assert enc.tokenizer("w1 w2")["input_ids"] == [0, 5, 6, 2]  # [CLS] .. [SEP], no EOS added
    tokens, mask = tokenize_padded(enc.tokenizer, texts, 16)
    assert tokens[1, 3:].tolist() == [1] * 13  # right padding with [PAD]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    got = np.asarray(enc.hidden_states(enc.params, tokens, mask))
    real = mask.astype(bool)
    diff = np.abs(got[real] - want[real]).max()
    assert diff <= 1e-5, diff
    for change in (dict(local_attention=6), dict(local_rope_theta=1000.0),
                   dict(global_rope_theta=100.0)):
        other = dataclasses.replace(enc, config=cfg.replace(**change))
        moved = np.abs(np.asarray(other.hidden_states(enc.params, tokens, mask))[real] - want[real])
        assert moved.max() > 1e-3, change
    m = mask[:, :, None]
    pooled = (want * m).sum(1) / m.sum(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    emb = encode_texts(enc, enc.params, texts)  # buckets and its own padding
    assert (emb * pooled).sum(1).min() >= 0.99999

    out = export_hf(enc, enc.params, tmp_path / "export")
    assert read_hf_dir(out).config == cfg
    back = AutoModel.from_pretrained(str(out)).eval()  # (default attention: sdpa)
    assert type(back) is type(model) and back.config.layer_types == list(cfg.layer_types)
    with torch.no_grad():
        again = back(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(again[real], want[real], atol=1e-5, rtol=0)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    assert (st * emb).sum(1).min() >= 0.99999

    mlm = ModernBertForMaskedLM(model.config).eval()
    mlm.model.load_state_dict(model.state_dict())
    mlm.save_pretrained(str(tmp_path / "mlm"))
    hf = read_hf_dir(tmp_path / "mlm")
    assert hf.config == cfg and not hf.extras
    for a, b in zip(jax.tree.leaves(hf.params), jax.tree.leaves(enc.params["encoder"])):
        np.testing.assert_array_equal(a, b)


def test_modernbert_old_style_config_reads_the_same(tmp_path):
    """A config.json in the older form (global_attn_every_n_layers, global_rope_theta /
    local_rope_theta; no layer_types / rope_parameters) gives the same ModernBertConfig; a
    RoPE type other than 'default' is refused naming the file."""
    from negjax.errors import NegjaxError
    from negjax.model.hf import read_config

    model_dir, _ = _tiny_modernbert_dir(tmp_path)
    new = json.loads((model_dir / "config.json").read_text())
    assert "layer_types" in new and "rope_parameters" in new
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")}
    old.update(global_attn_every_n_layers=3, global_rope_theta=1000.0, local_rope_theta=100.0)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "config.json").write_text(json.dumps(old))
    cfg = read_config(model_dir)
    assert read_config(old_dir) == cfg
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention",
                               "full_attention")
    assert (cfg.global_rope_theta, cfg.local_rope_theta, cfg.local_attention) == (1000.0, 100.0, 4)
    (old_dir / "config.json").write_text(json.dumps(
        {**old, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(NegjaxError, match="config.json: only the default RoPE"):
        read_config(old_dir)


def test_sharded_safetensors_import_and_export(tmp_path):
    """A checkpoint transformers wrote in shards (model.safetensors.index.json) loads as the
    single-file one does; an export over --max-shard-size is written in shards with an index
    that transformers and negjax load back, with the same weights."""
    import torch
    from transformers import AutoModel

    from negjax.model.encoder import export_hf

    model_dir, model = _tiny_qwen_dir(tmp_path, "qwen3")
    sharded = tmp_path / "sharded"
    shutil.copytree(model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    one = load_encoder(ModelConfig(name=str(model_dir)))
    many = load_encoder(ModelConfig(name=str(sharded)))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
        np.testing.assert_array_equal(a, b)

    out = export_hf(many, many.params, tmp_path / "export", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists() and len(files) > 2
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    back = load_encoder(ModelConfig(name=str(out)))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(a, b)
    tokens = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    mask = (torch.arange(4)[None] < torch.tensor([[4], [3]])).long()
    with torch.no_grad():
        want = model(input_ids=tokens, attention_mask=mask).last_hidden_state
        got = AutoModel.from_pretrained(str(out)).eval()(input_ids=tokens, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_qwen_bidirectional_option_is_used_and_exported(tmp_path):
    """model.bidirectional: a Qwen token's state then depends on the tokens after it (not so
    when causal); the export records it and loads back bidirectional; encoders refuse it."""
    from negjax.errors import NegjaxError
    from negjax.model.encoder import export_hf

    model_dir, _ = _tiny_qwen_dir(tmp_path, "qwen3")
    causal = load_encoder(ModelConfig(name=str(model_dir)))
    both = load_encoder(ModelConfig(name=str(model_dir), bidirectional=True))
    mask = np.ones((2, 5), np.int32)
    tokens = np.array([[3, 4, 5, 6, 0], [3, 4, 5, 9, 0]], np.int32)  # differ at position 3
    for enc, moves in ((causal, False), (both, True)):
        h = np.asarray(enc.hidden_states(enc.params, tokens, mask))
        assert (np.abs(h[0, :3] - h[1, :3]).max() > 1e-4) == moves
    out = export_hf(both, both.params, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["negjax_bidirectional"] is True
    assert load_encoder(ModelConfig(name=str(out))).config.causal is False
    with pytest.raises(NegjaxError, match="bidirectional"):
        load_encoder(ModelConfig(name="tiny", bidirectional=True))


@pytest.mark.parametrize("arch", ["qwen2", "modernbert"])
def test_export_of_a_tiny_family_reloads_with_its_own_tokenizer(tmp_path, arch):
    """An export keeps its tokenizer.json as it is: AutoTokenizer would pick the class of the
    model_type (for qwen2, a BPE rebuilt from the WordPiece vocabulary, one token more)."""
    from negjax.model.encoder import export_hf

    enc = load_encoder(ModelConfig(name="tiny", architecture=arch, hidden_size=32, num_layers=1,
                                   num_heads=2, intermediate_size=48))
    out = export_hf(enc, enc.params, tmp_path / arch)
    back = load_encoder(ModelConfig(name=str(out)))
    texts = ["a domestic dog", "rain falling"]
    assert len(back.tokenizer) == len(enc.tokenizer)
    assert back.tokenizer(texts)["input_ids"] == enc.tokenizer(texts)["input_ids"]
    tokens = np.array([[2, 85, 1623, 3]], np.int32)
    mask = np.ones_like(tokens)
    np.testing.assert_allclose(back.encode(back.params, tokens, mask),
                               enc.encode(enc.params, tokens, mask), atol=1e-6)


def test_negjax_process_runs_without_torch():
    """The `negjax` process marks PyTorch absent (libraries it loads would import all of it:
    ~460 MB and seconds per process): its tokenizers give the ids of tokenizers loaded the
    usual way, tensorboardX writes its events, and no PyTorch is imported."""
    import subprocess
    import sys

    from negjax.data.wordnet import tokenizer_dir
    from negjax.model.packaged import minilm_dir
    from negjax.model.tokenizer import load_tokenizer

    dirs = [str(tokenizer_dir()), str(minilm_dir()), str(TINY)]
    texts = ["Héllo wörld, a test!", "日本語 text", "x" * 300, ""]
    child = f"""
import json, sys, tempfile
from negjax import cli
from negjax.model.tokenizer import load_tokenizer
def main():
    ids = [load_tokenizer(d)({texts!r}, truncation=True, max_length=16)["input_ids"]
           for d in {dirs!r}]
    from tensorboardX import SummaryWriter
    with tempfile.TemporaryDirectory() as tb:
        w = SummaryWriter(tb)
        w.add_scalar("loss", 1.5, 0)
        w.close()
    print(json.dumps({{"ids": ids, "torch": sys.modules.get("torch") is not None}}))
    return 0
cli.main = main
cli.entry()
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch"] is False
    assert got["ids"] == [load_tokenizer(d)(texts, truncation=True, max_length=16)["input_ids"]
                          for d in dirs]
