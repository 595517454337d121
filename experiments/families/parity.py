"""negjax vs transformers, per family, on the tiny random models of tests/test_model.py: max
|hidden state difference| at real tokens (right padding; Qwen also left), min cosine of the
pooled embeddings, and the export reloaded by transformers.AutoModel.

    python experiments/families/parity.py --json experiments/families/parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def main():
    import torch
    from transformers import AutoModel

    from negjax.config import ModelConfig
    from negjax.model import load_encoder
    from negjax.model.encoder import export_hf
    from test_model import _tiny_modernbert_dir, _tiny_qwen_dir, _tiny_roberta_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(REPO / "experiments/families/parity.json"))
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19, 20], [21]]
    out = {}
    makers = {"roberta": lambda: _tiny_roberta_dir(root, "roberta"),
              "xlm-roberta": lambda: _tiny_roberta_dir(root, "xlm-roberta"),
              "modernbert": lambda: _tiny_modernbert_dir(root),
              "qwen3": lambda: _tiny_qwen_dir(root, "qwen3"),
              "qwen2": lambda: _tiny_qwen_dir(root, "qwen2")}
    for fam, make in makers.items():
        model_dir, model = make()
        enc = load_encoder(ModelConfig(name=str(model_dir)))
        pad = enc.config.pad_token_id
        length = max(map(len, rows))
        res = {}
        for side in ("right", "left") if fam.startswith("qwen") else ("right",):
            tokens = np.full((len(rows), length), pad, np.int32)
            mask = np.zeros((len(rows), length), np.int32)
            for i, r in enumerate(rows):
                sl = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
                tokens[i, sl], mask[i, sl] = r, 1
            tt = torch.tensor(tokens, dtype=torch.long)
            tm = torch.tensor(mask, dtype=torch.long)
            with torch.no_grad():
                want = model(input_ids=tt, attention_mask=tm).last_hidden_state.numpy()
            got = np.asarray(enc.hidden_states(enc.params, tokens, mask))
            real = mask.astype(bool)
            emb = np.asarray(enc.encode(enc.params, tokens, mask))
            if enc.pooling == "last":
                ref = want[np.arange(len(rows)), [np.flatnonzero(m)[-1] for m in mask]]
            else:
                ref = (want * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
            ref /= np.linalg.norm(ref, axis=1, keepdims=True)
            res[side] = {"max_abs_diff": float(np.abs(got[real] - want[real]).max()),
                         "min_cosine": float((emb * ref).sum(1).min())}
            if side == "right":
                exported = export_hf(enc, enc.params, root / f"{fam}-export")
                with torch.no_grad():
                    again = AutoModel.from_pretrained(str(exported)).eval()(
                        input_ids=tt, attention_mask=tm).last_hidden_state.numpy()
                res["export_max_abs_diff"] = float(np.abs(again[real] - want[real]).max())
        out[fam] = res
        print(fam, json.dumps(res), flush=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
