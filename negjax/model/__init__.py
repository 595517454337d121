"""The encoder: a Flax BERT-family bi-encoder, Hugging Face import/export, batch encoding.

    from negjax.model import load_encoder, encode_texts, export_hf
    enc = load_encoder(cfg.model)                       # 'tiny' | 'minilm' | model dir
    emb = encode_texts(enc, enc.params, texts, tower="doc", max_length=128, batch_size=128)
    export_hf(enc, enc.params, "out/hf")                # AutoModel / SentenceTransformer dir
"""

from negjax.model.bert import BertConfig, BertEncoder, l2_normalize, pool
from negjax.model.encode import bucket_lengths, encode_texts, encode_tokens, local_mesh
from negjax.model.encoder import TOWERS, Encoder, export_hf, load_encoder
from negjax.model.packaged import minilm_dir
from negjax.model.tokenizer import load_tokenizer, pad_ids, tokenize, tokenize_padded

__all__ = [
    "BertConfig", "BertEncoder", "Encoder", "TOWERS", "bucket_lengths", "encode_texts",
    "encode_tokens", "export_hf", "l2_normalize", "load_encoder", "load_tokenizer",
    "local_mesh", "minilm_dir", "pad_ids", "pool", "tokenize", "tokenize_padded",
]
